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

#include "_words.h"

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

/* The session-state words of sql_words.mentions_session_state_python, in a Query's or Parse's text
   (the message's header skipped). */
static PyObject *
mentions_session_state(PyObject *module, PyObject *arg)
{
    Py_buffer sql;
    if (PyObject_GetBuffer(arg, &sql, PyBUF_SIMPLE) < 0)
        return NULL;
    int found = session_state_in(sql.buf, sql.len);
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
