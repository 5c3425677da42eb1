/*
 * The loops pgmux runs over every relayed request, compiled.
 *
 * walk: the inner loop of FrameScanner.feed (proxy/protocol/framing.py). It walks whole message
 * headers in one received chunk and stops where Python has to decide something: the chunk's end, a
 * split header, a body that runs past the chunk, an invalid length. Pass-through runs and captured
 * Frames are appended to `out` exactly as the pure-Python walk in framing.py does.
 *
 * mentions_reset: whether a simple Query's text has the word RESET or DISCARD, as the regex in
 * proxy/protocol/sql_words.py answers it.
 *
 * mentions_session_state: whether a Query's or Parse's text may change the session's state (a
 * setting, the role, temporary objects, advisory locks...), as a third regex there answers it.
 *
 * mentions_statement_drop: whether a simple Query's or a Parse's text has the word DEALLOCATE or
 * DISCARD, as the other regex in sql_words.py answers it.
 *
 * The Python versions stay the reference and the fallback, and the tests run both.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#define CAPTURE 1
#define COUNTED 2
#define NEUTRAL 4

/* Keep in step with the WALK_* constants in framing.py. */
enum { WALK_DONE = 0, WALK_HEADER_SPLIT = 1, WALK_CAPTURE_SPLIT = 2, WALK_BODY_SPLIT = 3, WALK_INVALID = 4 };

static int
append_slice(PyObject *out, PyObject *view, Py_ssize_t start, Py_ssize_t stop)
{
    PyObject *slice = PySequence_GetSlice(view, start, stop);
    if (slice == NULL)
        return -1;
    int rc = PyList_Append(out, slice);
    Py_DECREF(slice);
    return rc;
}

static int
append_frame(PyObject *out, PyTypeObject *frame_type, unsigned char kind, PyObject *view,
             Py_ssize_t start, Py_ssize_t stop)
{
    PyObject *slice = PySequence_GetSlice(view, start, stop);
    if (slice == NULL)
        return -1;
    PyObject *frame = frame_type->tp_alloc(frame_type, 2);  /* a tuple subclass (a NamedTuple) */
    if (frame == NULL) {
        Py_DECREF(slice);
        return -1;
    }
    PyTuple_SET_ITEM(frame, 0, PyLong_FromLong(kind));
    PyTuple_SET_ITEM(frame, 1, slice);
    if (PyTuple_GET_ITEM(frame, 0) == NULL) {
        Py_DECREF(frame);
        return -1;
    }
    int rc = PyList_Append(out, frame);
    Py_DECREF(frame);
    return rc;
}

/* walk(data, view, pos, run_start, flags, max_length, frame_type, out)
 *   -> (status, pos, run_start, counted, mid_batch, total)
 * mid_batch: -1 when no message changed it, else 0/1. total: the size of the message the walk
 * stopped at (for the split statuses), else 0. */
static PyObject *
walk(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 8) {
        PyErr_SetString(PyExc_TypeError, "walk() takes exactly 8 arguments");
        return NULL;
    }
    Py_buffer data;
    if (PyObject_GetBuffer(args[0], &data, PyBUF_SIMPLE) < 0)
        return NULL;
    PyObject *view = args[1];
    Py_ssize_t pos = PyLong_AsSsize_t(args[2]);
    Py_ssize_t run_start = PyLong_AsSsize_t(args[3]);
    long long max_length = PyLong_AsLongLong(args[5]);
    PyObject *out = args[7];
    if (PyErr_Occurred()) {
        PyBuffer_Release(&data);
        return NULL;
    }
    if (!PyBytes_Check(args[4]) || PyBytes_GET_SIZE(args[4]) != 256 || !PyType_Check(args[6])
        || !PyType_IsSubtype((PyTypeObject *)args[6], &PyTuple_Type) || !PyList_Check(out)) {
        PyBuffer_Release(&data);
        PyErr_SetString(PyExc_TypeError, "walk(): flags must be 256 bytes, frame_type a tuple type, out a list");
        return NULL;
    }
    const unsigned char *flags = (const unsigned char *)PyBytes_AS_STRING(args[4]);
    PyTypeObject *frame_type = (PyTypeObject *)args[6];
    const unsigned char *bytes = (const unsigned char *)data.buf;
    Py_ssize_t end = data.len;
    long counted = 0;
    int mid_batch = -1;
    int status = WALK_DONE;
    long long total = 0;

    while (pos < end) {
        if (end - pos < 5) {
            status = WALK_HEADER_SPLIT;
            break;
        }
        unsigned char kind = bytes[pos];
        unsigned long length = ((unsigned long)bytes[pos + 1] << 24) | ((unsigned long)bytes[pos + 2] << 16)
                                | ((unsigned long)bytes[pos + 3] << 8) | (unsigned long)bytes[pos + 4];
        if (length < 4 || (long long)length > max_length) {
            status = WALK_INVALID;
            break;
        }
        unsigned char flag = flags[kind];
        if (flag & COUNTED) {
            counted++;
            mid_batch = 0;
        } else if (!(flag & NEUTRAL)) {
            mid_batch = 1;
        }
        total = (long long)length + 1;
        if (flag & CAPTURE) {
            if (run_start < pos && append_slice(out, view, run_start, pos) < 0)
                goto error;
            run_start = pos;
            if (pos + total <= end) {
                if (append_frame(out, frame_type, kind, view, pos, pos + total) < 0)
                    goto error;
                pos += total;
                run_start = pos;
            } else {
                status = WALK_CAPTURE_SPLIT;
                break;
            }
        } else if (pos + total <= end) {
            pos += total;
        } else {
            status = WALK_BODY_SPLIT;
            break;
        }
    }
    if (status == WALK_DONE || status == WALK_INVALID || status == WALK_HEADER_SPLIT)
        total = 0;
    PyBuffer_Release(&data);
    return Py_BuildValue("(innliL)", status, pos, run_start, counted, mid_batch, total);

error:
    PyBuffer_Release(&data);
    return NULL;
}

/* ASCII word characters: what \b means in a bytes regex. */
static int
is_word_byte(unsigned char c)
{
    return (c >= '0' && c <= '9') || (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || c == '_';
}

/* `word` (lower case letters) at s[i], in any case, ending at a word boundary. */
static int
word_at(const unsigned char *s, Py_ssize_t i, Py_ssize_t n, const char *word, Py_ssize_t length)
{
    if (i + length > n)
        return 0;
    for (Py_ssize_t k = 0; k < length; k++) {
        /* | 0x20 folds A-Z onto a-z; no other byte folds onto a letter. */
        if ((s[i + k] | 0x20) != (unsigned char)word[k])
            return 0;
    }
    return i + length == n || !is_word_byte(s[i + length]);
}

static PyObject *
mentions_reset(PyObject *module, PyObject *arg)
{
    Py_buffer sql;
    if (PyObject_GetBuffer(arg, &sql, PyBUF_SIMPLE) < 0)
        return NULL;
    const unsigned char *s = sql.buf;
    Py_ssize_t n = sql.len;
    int found = 0;
    for (Py_ssize_t i = 0; i < n && !found; i++) {
        unsigned char c = s[i] | 0x20;
        if ((c != 'r' && c != 'd') || (i > 0 && is_word_byte(s[i - 1])))
            continue;
        found = c == 'r' ? word_at(s, i, n, "reset", 5) : word_at(s, i, n, "discard", 7);
    }
    PyBuffer_Release(&sql);
    return PyBool_FromLong(found);
}

static PyObject *
mentions_statement_drop(PyObject *module, PyObject *arg)
{
    Py_buffer sql;
    if (PyObject_GetBuffer(arg, &sql, PyBUF_SIMPLE) < 0)
        return NULL;
    const unsigned char *s = sql.buf;
    Py_ssize_t n = sql.len;
    int found = 0;
    for (Py_ssize_t i = 0; i < n && !found; i++) {
        if ((s[i] | 0x20) != 'd' || (i > 0 && is_word_byte(s[i - 1])))
            continue;
        found = word_at(s, i, n, "deallocate", 10) || word_at(s, i, n, "discard", 7);
    }
    PyBuffer_Release(&sql);
    return PyBool_FromLong(found);
}

/* `word` (lower case letters and "_") at s[i], letters in any case, whatever follows it. */
static int
prefix_at(const unsigned char *s, Py_ssize_t i, Py_ssize_t n, const char *word, Py_ssize_t length)
{
    if (i + length > n)
        return 0;
    for (Py_ssize_t k = 0; k < length; k++) {
        unsigned char expected = (unsigned char)word[k];
        unsigned char c = expected == '_' ? s[i + k] : (s[i + k] | 0x20);
        if (c != expected)
            return 0;
    }
    return 1;
}

static int
is_sql_space(unsigned char c)
{
    return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v';
}

/* Whether the word SET at s[i] stands where a statement may begin: after the text's start (`start`), a
   character that is neither a word's nor an identifier quote (";", "(", a comment's "/"), or a line break. */
static int
set_may_begin_statement(const unsigned char *s, Py_ssize_t i, Py_ssize_t start)
{
    Py_ssize_t k = i - 1;
    while (k >= start && is_sql_space(s[k])) {
        if (s[k] == '\n')
            return 1;
        k--;
    }
    return k < start || !(is_word_byte(s[k]) || s[k] == '"');
}

/* The session-state words of sql_words.mentions_session_state_python, in a Query's or Parse's text
   (the message's header skipped). */
static PyObject *
mentions_session_state(PyObject *module, PyObject *arg)
{
    Py_buffer sql;
    if (PyObject_GetBuffer(arg, &sql, PyBUF_SIMPLE) < 0)
        return NULL;
    const unsigned char *s = sql.buf;
    Py_ssize_t n = sql.len;
    Py_ssize_t start = 5;
    int found = 0;
    for (Py_ssize_t i = start; i < n && !found; i++) {
        unsigned char c = s[i] | 0x20;
        if (c == 'a') {
            found = prefix_at(s, i, n, "advisory", 8);  /* inside a word too: pg_advisory_lock */
            continue;
        }
        if (i > start && is_word_byte(s[i - 1]))
            continue;
        switch (c) {
        case 'r':
            found = word_at(s, i, n, "reset", 5);
            break;
        case 'd':
            found = word_at(s, i, n, "discard", 7) || word_at(s, i, n, "deallocate", 10)
                    || word_at(s, i, n, "declare", 7);
            break;
        case 'l':
            found = word_at(s, i, n, "listen", 6) || word_at(s, i, n, "load", 4);
            break;
        case 'u':
            found = word_at(s, i, n, "unlisten", 8);
            break;
        case 'p':
            found = word_at(s, i, n, "prepare", 7) || prefix_at(s, i, n, "pg_temp", 7);
            break;
        case 'c':
            found = word_at(s, i, n, "close", 5);
            break;
        case 't':
            found = word_at(s, i, n, "temp", 4) || word_at(s, i, n, "temporary", 9);
            break;
        case 's':
            found = prefix_at(s, i, n, "set_config", 10)
                    || (word_at(s, i, n, "set", 3) && set_may_begin_statement(s, i, start));
            break;
        }
    }
    PyBuffer_Release(&sql);
    return PyBool_FromLong(found);
}

static PyMethodDef methods[] = {
    {"walk", (PyCFunction)(void (*)(void))walk, METH_FASTCALL, "Walk whole messages of one chunk (see framing.py)."},
    {"mentions_reset", mentions_reset, METH_O, "Whether the SQL has the word RESET or DISCARD (see sql_words.py)."},
    {"mentions_session_state", mentions_session_state, METH_O,
     "Whether a Query's or Parse's text may change session state (see sql_words.py)."},
    {"mentions_statement_drop", mentions_statement_drop, METH_O,
     "Whether the SQL has the word DEALLOCATE or DISCARD (see sql_words.py)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_scanner", NULL, -1, methods};

PyMODINIT_FUNC
PyInit__scanner(void)
{
    return PyModule_Create(&module);
}
