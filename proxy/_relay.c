/*
 * SocketTransport: pgmux's compiled data plane for plaintext sockets.
 *
 * An asyncio transport over one non-blocking socket whose steady state never builds a Python object: once the
 * connection is a relay (relay(...), after login), a read that holds only whole messages of the kinds its table
 * lets pass is written straight to the peer's socket from one static buffer,
 * and Python hears of it in one call to its protocol:
 *
 * - a client's read: protocol.relay_request(nbytes, batch_ends, queries, mid_batch, parses, binds) returns the linked
 *   server's SocketTransport (taking a server from the pool first when the client has none), or None; or the
 *   client's own transport when no server is free: the transport keeps the read ("held") while the client waits
 *   in line, until Python sends it on to the server it is lent (send_held) or takes it back as bytes (take_held);
 * - a server's read: protocol.relay_target() returns the linked client's SocketTransport, or None; a read
 *   that ends in ReadyForQuery, or holds ParseCompletes, is then reported with
 *   protocol.relayed(nbytes, status, parse_completes).
 *
 * None, any message the table does not let pass (Python decides those: ErrorResponse, ParameterStatus,
 * a Parse or Query whose text may change the session...), a message split across reads, or a connection
 * that is not a relay: the read goes to protocol.data_received(bytes), as from any asyncio transport.
 * The two paths see the same bytes in the same order: a fast read always begins and ends at a message
 * boundary (the transport tracks boundaries over every read, and Python confirms its own), so Python's
 * FrameScanner never loses its place.
 *
 * Readiness: the transports of one event loop share a Poller, an epoll set of their own that the loop watches
 * as one reader (loop.add_reader(poller.fileno(), poller._ready)). Not a reader per socket: uvloop's
 * add_reader drops its callback when a socket reports an error (a reset peer), and the transport would
 * never hear of it; here an error wakes the read, whose recv() then says what happened. One wake also
 * serves every ready socket.
 *
 * Writes go straight to the socket while nothing is queued; what the kernel does not take is queued and
 * sent when the socket is writable, with pause_writing/resume_writing at the limits asyncio uses.
 * close() sends what is queued first; abort() does not. connection_lost comes through loop.call_soon,
 * as from asyncio's transports; close_quietly(), for a protocol that has ended the connection itself, skips
 * it within the poller's wake (the poller keeps the protocol until the wake ends).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <string.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#include "protocol/_words.h"

/* Bits of the relay table, one byte per message type (built by proxy/relay.py: relay_table). */
#define PASS 1           /* may be relayed in the steady state */
#define BATCH_END 2      /* Sync, Query, FunctionCall: each earns one ReadyForQuery */
#define NEUTRAL 4        /* neither begins nor ends a batch (Flush, CopyData...) */
#define WORDS 8          /* passes only when its text mentions no session state (Query, Parse) */
#define QUERY 16         /* a simple Query */
#define READY 32         /* ReadyForQuery: only as the read's last message */
#define PARSE_COMPLETE 64
#define UNNAMED 128      /* passes only when the statement it names is the unnamed one (Parse, Bind, Describe, Close) */

#define READ_SIZE (256 * 1024)
#define CLEAN_SLOTS 64      /* texts the session-state word test found clean, per poller */
#define CLEAN_LONGEST 512   /* longer messages are always tested */
#define DEFAULT_HIGH (64 * 1024)

enum { ROLE_NONE = 0, ROLE_CLIENT = 1, ROLE_SERVER = 2 };


static PyObject *str_call_soon, *str_call_exception_handler;
static PyObject *str_data_received, *str_eof_received, *str_connection_lost, *str_pause_writing;
static PyObject *str_resume_writing, *str_relay_request, *str_relay_target, *str_relayed, *str_close;
static PyObject *str_socket, *str_peername, *str_sockname, *str_getpeername, *str_getsockname, *str_fileno;
static PyObject *socket_type;  /* _socket.socket: what accept_socket makes */

#define POLL_BATCH 256

typedef struct {
    PyObject_HEAD
    int epfd;
    PyObject *loop_ref; /* a weak reference: the loop holds the poller (its reader), not the other way round */
    /* Where its transports read: one loop's reads run one at a time (another thread's loop, as tests run
       pgmux, has its own poller). Not thread-local storage: in a shared library every access to that is a
       __tls_get_addr call, about 1.5% of pgmux's CPU. */
    unsigned char *read_buffer;
    struct clean_text *clean;  /* CLEAN_SLOTS of them: see mentions_session_state */
    int dispatching;           /* inside _ready: serving its sockets' events */
    /* Protocols whose connections closed quietly during this _ready (close_quietly): let go of when it ends,
       when no callback of this wake runs any more, rather than through a connection_lost per connection. */
    PyObject **parked;
    Py_ssize_t parked_len, parked_cap;
} Poller;

static PyTypeObject PollerType;

typedef struct {
    PyObject_HEAD
    int fd;
    Poller *poller;
    uint32_t interest;    /* what the poller watches for: EPOLLIN, EPOLLOUT (0: not registered) */
    PyObject *loop;
    PyObject *protocol;
    PyObject *sock;       /* the socket object: it owns the fd, and closes it; get_extra_info asks it */
    char *wbuf;           /* queued output: wbuf[wstart:wend] */
    Py_ssize_t wstart, wend, wcap;
    Py_ssize_t high, low;
    char reading;         /* watched for reading */
    char paused;          /* pause_reading() in force */
    char writing;         /* watched for writing (something is queued) */
    char closing;
    char closed;          /* the socket is closed; connection_lost is scheduled (unless quiet) */
    char quiet;           /* close_quietly(): the protocol has ended the connection and hears nothing more */
    char protocol_paused; /* pause_writing() was called, resume_writing() not yet */
    char role;
    PyObject *table_owner; /* the relay table's bytes object (shared by every edge of a kind) */
    const unsigned char *table;
    /* Where the last read left the message stream: header bytes of the next message held, or body bytes
       still to come. Only kept for a relay. */
    unsigned char head[5];
    int head_len;
    Py_ssize_t body_left;
    Py_ssize_t unreported; /* a server's relayed bytes not yet given to Python (with the next ReadyForQuery) */
    char *held;            /* a client's read kept while it waits for a server (relay_request said so) */
    Py_ssize_t held_len;
} Transport;

static PyTypeObject TransportType;

#define Transport_Check(op) (Py_TYPE(op) == &TransportType)

/* ---- readiness ---------------------------------------------------------------------------------- */

/* Tell the poller what to watch for now. A registration holds a reference: a registered transport stays
   alive until it is taken out, which may free it, so callers hold their own reference. */
static int
watch(Transport *t)
{
    uint32_t interest = (t->reading ? EPOLLIN : 0) | (t->writing ? EPOLLOUT : 0);
    if (interest == t->interest)
        return 0;
    struct epoll_event event = {.events = interest, .data.ptr = t};
    int op = !t->interest ? EPOLL_CTL_ADD : !interest ? EPOLL_CTL_DEL : EPOLL_CTL_MOD;
    if (epoll_ctl(t->poller->epfd, op, t->fd, &event) < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    t->interest = interest;
    if (op == EPOLL_CTL_ADD)
        Py_INCREF(t);
    else if (op == EPOLL_CTL_DEL)
        Py_DECREF(t);
    return 0;
}

static int
start_reading(Transport *t)
{
    if (t->reading || t->paused || t->closing || t->closed)
        return 0;
    t->reading = 1;
    return watch(t);
}

static int
stop_reading(Transport *t)
{
    if (!t->reading)
        return 0;
    t->reading = 0;
    return watch(t);
}

/* ---- closing ------------------------------------------------------------------------------------ */

/* Nothing is queued (any more): let the buffer go. It grew to the largest backlog the connection ever had (a
   slow reader of a large result), and an idle connection has no use for it. */
static void
drop_write_buffer(Transport *t)
{
    PyMem_Free(t->wbuf);
    t->wbuf = NULL;
    t->wstart = t->wend = t->wcap = 0;
}

static void
drop_held(Transport *t)
{
    PyMem_Free(t->held);
    t->held = NULL;
    t->held_len = 0;
}

/* Keep ``protocol`` (its reference passes to the poller) until the poller's _ready ends: 0, or -1 when there is
   no room (the caller then lets go of it as after any close). */
static int
park(Poller *poller, PyObject *protocol)
{
    if (poller->parked_len == poller->parked_cap) {
        Py_ssize_t cap = poller->parked_cap ? poller->parked_cap * 2 : 16;
        PyObject **parked = PyMem_RawRealloc(poller->parked, cap * sizeof(PyObject *));
        if (parked == NULL)
            return -1;
        poller->parked = parked;
        poller->parked_cap = cap;
    }
    poller->parked[poller->parked_len++] = protocol;
    return 0;
}

static void
release_parked(Poller *poller)
{
    while (poller->parked_len > 0)
        Py_DECREF(poller->parked[--poller->parked_len]);  /* may run any finalizer: the array is consistent */
}

/* Close the socket now and tell the protocol on the loop's next turn (a quiet close within a wake: not at all);
   ``exc`` (may be NULL) is why. */
static int
finish(Transport *t, PyObject *exc)
{
    if (t->closed)
        return 0;
    t->closed = 1;
    t->closing = 1;
    int status = 0;
    Py_INCREF(t);  /* taking it out of the poller may drop the last other reference */
    t->reading = t->writing = 0;
    if (watch(t) < 0)
        status = -1;
    drop_write_buffer(t);
    drop_held(t);
    PyObject *result = PyObject_CallMethodNoArgs(t->sock, str_close);
    if (result == NULL)
        status = -1;
    Py_XDECREF(result);
    /* The protocol holds its transport: let go of it, so that the pair is freed by reference counting rather
       than left to the cycle collector (one such cycle per connection otherwise). */
    if (t->quiet && t->poller->dispatching && park(t->poller, t->protocol) == 0) {
        t->protocol = Py_NewRef(Py_None);  /* its reference is the poller's until _ready ends */
    }
    else {
        PyObject *lost = PyObject_GetAttr(t->protocol, str_connection_lost);
        result = lost == NULL ? NULL : PyObject_CallMethodObjArgs(t->loop, str_call_soon, lost,
                                                                  exc != NULL ? exc : Py_None, NULL);
        Py_XDECREF(lost);
        if (result == NULL)
            status = -1;
        Py_XDECREF(result);
        Py_SETREF(t->protocol, Py_NewRef(Py_None));
    }
    Py_DECREF(t);
    return status;
}

/* A socket error: drop the connection, queued bytes and all, with the OSError for errno ``code``. */
static int
fail_with_errno(Transport *t, int code)
{
    PyObject *args = Py_BuildValue("(is)", code, strerror(code));
    if (args == NULL)
        return -1;
    PyObject *exc = PyObject_Call(PyExc_OSError, args, NULL);  /* ConnectionResetError etc., by errno */
    Py_DECREF(args);
    if (exc == NULL)
        return -1;
    int status = finish(t, exc);
    Py_DECREF(exc);
    return status;
}

/* ---- calling the protocol ------------------------------------------------------------------------ */

/* A protocol method looked up once per protocol type. PyObject_VectorcallMethod finds the name in the type's
   MRO on every call (_PyObject_GetMethod: about 2% of pgmux's CPU at -c 50), and a relay calls
   three per transaction on the same two types. Only for instances without a __dict__ (compiled classes), where
   no instance attribute can shadow the method, and for plain methods (Py_TPFLAGS_METHOD_DESCRIPTOR: called
   with self first, as the lookup would bind it); anything else takes the usual lookup. */
typedef struct {
    PyObject **name;
    PyTypeObject *type;        /* strong; NULL: nothing cached */
    unsigned int version;      /* the type's tp_version_tag when found: a changed type is looked up again */
    PyObject *function;        /* strong */
} MethodCache;

static MethodCache call_relay_request = {&str_relay_request}, call_relay_target = {&str_relay_target};
static MethodCache call_relayed = {&str_relayed}, call_data_received = {&str_data_received};

/* ``args[0]`` is the protocol; the rest its arguments (``nargs`` counts them all). */
static PyObject *
call_cached(MethodCache *cache, PyObject *const *args, size_t nargs)
{
    PyTypeObject *type = Py_TYPE(args[0]);
    if (cache->type != type || cache->version != type->tp_version_tag
            || !PyType_HasFeature(type, Py_TPFLAGS_VALID_VERSION_TAG)) {
        PyObject *function = NULL;
        if (type->tp_dictoffset == 0) {
            function = PyObject_GetAttr((PyObject *)type, *cache->name);  /* a method descriptor comes as it is */
            if (function == NULL)
                PyErr_Clear();  /* the usual lookup below raises what a caller expects */
        }
        if (function == NULL || !PyType_HasFeature(Py_TYPE(function), Py_TPFLAGS_METHOD_DESCRIPTOR)
                || !PyType_HasFeature(type, Py_TPFLAGS_VALID_VERSION_TAG)) {
            Py_XDECREF(function);
            return PyObject_VectorcallMethod(*cache->name, (PyObject **)args, nargs, NULL);
        }
        Py_INCREF(type);
        Py_XSETREF(cache->function, function);
        Py_XSETREF(cache->type, type);
        cache->version = type->tp_version_tag;
    }
    return PyObject_Vectorcall(cache->function, args, nargs, NULL);
}

/* ---- writing ------------------------------------------------------------------------------------ */

static int
call_protocol(Transport *t, PyObject *name)
{
    PyObject *result = PyObject_CallMethodNoArgs(t->protocol, name);
    if (result == NULL)
        return -1;
    Py_DECREF(result);
    return 0;
}

static int
queue_bytes(Transport *t, const char *data, Py_ssize_t len)
{
    Py_ssize_t queued = t->wend - t->wstart;
    if (t->wstart > 0 && t->wend + len > t->wcap) {
        memmove(t->wbuf, t->wbuf + t->wstart, queued);
        t->wstart = 0;
        t->wend = queued;
    }
    if (t->wend + len > t->wcap) {
        Py_ssize_t cap = t->wcap ? t->wcap : 4096;
        while (cap < t->wend + len)
            cap *= 2;
        char *grown = PyMem_Realloc(t->wbuf, cap);
        if (grown == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        t->wbuf = grown;
        t->wcap = cap;
    }
    memcpy(t->wbuf + t->wend, data, len);
    t->wend += len;
    return 0;
}

/* Send ``data`` now, queueing what the kernel does not take; 0 also when the connection failed. */
static int
write_bytes(Transport *t, const char *data, Py_ssize_t len)
{
    if (t->closed || len == 0)
        return 0;
    if (t->wend == t->wstart) {
        Py_ssize_t sent = send(t->fd, data, len, MSG_NOSIGNAL);
        if (sent < 0) {
            if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)
                return fail_with_errno(t, errno);
            sent = 0;
        }
        if (sent == len)
            return 0;
        data += sent;
        len -= sent;
    }
    if (queue_bytes(t, data, len) < 0)
        return -1;
    if (!t->writing) {
        t->writing = 1;
        if (watch(t) < 0)
            return -1;
    }
    if (!t->protocol_paused && t->wend - t->wstart > t->high) {
        t->protocol_paused = 1;
        return call_protocol(t, str_pause_writing);
    }
    return 0;
}

/* The socket is writable: send what is queued. */
static int
write_ready(Transport *t)
{
    if (t->closed)
        return 0;
    while (t->wend > t->wstart) {
        Py_ssize_t sent = send(t->fd, t->wbuf + t->wstart, t->wend - t->wstart, MSG_NOSIGNAL);
        if (sent < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                break;
            return fail_with_errno(t, errno);
        }
        t->wstart += sent;
    }
    if (t->wend == t->wstart) {
        drop_write_buffer(t);
        t->writing = 0;
        if (watch(t) < 0)
            return -1;
    }
    if (t->protocol_paused && t->wend - t->wstart <= t->low) {
        t->protocol_paused = 0;
        if (call_protocol(t, str_resume_writing) < 0)
            return -1;
    }
    if (t->closing && t->wend == t->wstart)
        return finish(t, NULL);
    return 0;
}

/* ---- reading ------------------------------------------------------------------------------------ */

static inline Py_ssize_t
message_length(const unsigned char *p)
{
    return ((Py_ssize_t)p[1] << 24) | ((Py_ssize_t)p[2] << 16) | ((Py_ssize_t)p[3] << 8) | (Py_ssize_t)p[4];
}

/* Follow message boundaries through a read the relay did not take, so the next read's start is known. */
static void
track(Transport *t, const unsigned char *data, Py_ssize_t n)
{
    Py_ssize_t pos = 0;
    while (pos < n) {
        if (t->body_left) {
            Py_ssize_t take = n - pos < t->body_left ? n - pos : t->body_left;
            t->body_left -= take;
            pos += take;
            continue;
        }
        while (t->head_len < 5 && pos < n)
            t->head[t->head_len++] = data[pos++];
        if (t->head_len < 5)
            return;
        Py_ssize_t length = message_length(t->head);
        t->head_len = 0;
        t->body_left = length > 4 ? length - 4 : 0;  /* an invalid length: Python refuses it */
    }
}

/* The end of the whole message at data[pos] when its type may pass (its table bits in ``bits``), else -1:
   a header or body cut by the read's end, an invalid length, a type the table stops. */
static inline Py_ssize_t
passing_message(Transport *t, const unsigned char *data, Py_ssize_t pos, Py_ssize_t n, unsigned char *bits)
{
    if (n - pos < 5)
        return -1;
    *bits = t->table[data[pos]];
    Py_ssize_t length = message_length(data + pos);
    if (!(*bits & PASS) || length < 4 || length > n - pos - 1)
        return -1;
    return pos + 1 + length;
}

/* Send a whole read to the peer transport Python named (``peer``: a new reference, or NULL when Python
   failed): 1 when sent, 0 when Python named none (it takes the read), -1 on an error. */
static int
relay_to(PyObject *peer, const unsigned char *data, Py_ssize_t n)
{
    if (peer == NULL)
        return -1;
    if (!Transport_Check(peer)) {
        Py_DECREF(peer);
        return 0;
    }
    int status = write_bytes((Transport *)peer, (const char *)data, n);
    Py_DECREF(peer);
    return status < 0 ? -1 : 1;
}

/* Whether the message at ``p`` (``length`` bytes in all) names the unnamed statement (or a portal, which
   keeps its name): only Parse, Bind, Describe and Close name statements. */
static int
names_unnamed_statement(const unsigned char *p, Py_ssize_t length)
{
    switch (p[0]) {
    case 'P':  /* Parse: the statement's name first */
        return length > 5 && p[5] == 0;
    case 'B': {  /* Bind: the portal's name, then the statement's */
        const unsigned char *nul = memchr(p + 5, 0, length - 5);
        return nul != NULL && nul + 1 < p + length && nul[1] == 0;
    }
    case 'D':  /* Describe, Close: 'S' or 'P', then the name */
    case 'C':
        return length > 6 && (p[5] == 'P' || p[6] == 0);
    default:
        return 1;
    }
}

/* A Query or Parse message the word test found clean lately. Applications send the same few statements again
   and again, and comparing a message with the one remembered in its slot (memcmp) costs a small fraction of the
   test, which looks at every byte. A hit needs the whole message to be equal, so it answers exactly what the
   test would; only clean answers are kept, so a statement that may change the session is always tested. */
struct clean_text {
    Py_ssize_t length;  /* 0: empty */
    unsigned char message[CLEAN_LONGEST];
};

static inline size_t
clean_slot(const unsigned char *s, Py_ssize_t n)
{
    /* Length and a few bytes: statements of the same length usually differ at one of these. A collision only
       costs a miss. */
    size_t hash = (size_t)n;
    hash = hash * 31 + s[n - 2];
    hash = hash * 31 + s[n / 2];
    hash = hash * 31 + s[n / 3];
    hash = hash * 31 + s[n - n / 4];
    return (hash ^ (hash >> 7)) & (CLEAN_SLOTS - 1);
}

/* session_state_in for a whole message of the client edge, remembering clean ones in the poller. */
static int
mentions_session_state(Poller *poller, const unsigned char *s, Py_ssize_t n)
{
    if (n > CLEAN_LONGEST)
        return session_state_in(s, n);
    struct clean_text *seen = &poller->clean[clean_slot(s, n)];
    if (seen->length == n && memcmp(seen->message, s, n) == 0)
        return 0;
    if (session_state_in(s, n))
        return 1;
    seen->length = n;
    memcpy(seen->message, s, n);
    return 0;
}

/* Keep a client's read while it waits for a server: no bytes object, no queue, no data_received. */
static int
hold(Transport *t, const unsigned char *data, Py_ssize_t n)
{
    if (t->held_len) {
        PyErr_SetString(PyExc_RuntimeError, "relay_request asked to hold a read behind one already held");
        return -1;
    }
    t->held = PyMem_Malloc(n);
    if (t->held == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    memcpy(t->held, data, n);
    t->held_len = n;
    return 1;
}

/* A client's read of whole messages that may pass: 1 when it went to the server (or is held for one), 0 when
   Python takes it. */
static int
relay_from_client(Transport *t, const unsigned char *data, Py_ssize_t n)
{
    Py_ssize_t pos = 0, batch_ends = 0, queries = 0, parses = 0, binds = 0;
    int mid_batch = -1;
    while (pos < n) {
        unsigned char bits;
        Py_ssize_t end = passing_message(t, data, pos, n, &bits);
        if (end < 0)
            return 0;
        if ((bits & WORDS) && mentions_session_state(t->poller, data + pos, end - pos))
            return 0;
        if (bits & UNNAMED) {
            if (!names_unnamed_statement(data + pos, end - pos))
                return 0;
            if (data[pos] == 'P') {
                if (batch_ends)
                    return 0;  /* Python numbers each Parse by its batch: one batch's worth here */
                parses++;
            }
            else if (data[pos] == 'B')
                binds++;
        }
        if (bits & BATCH_END) {
            batch_ends++;
            mid_batch = 0;
        }
        else if (!(bits & NEUTRAL))
            mid_batch = 1;
        if (bits & QUERY)
            queries++;
        pos = end;
    }
    PyObject *args[7] = {t->protocol, PyLong_FromSsize_t(n), PyLong_FromSsize_t(batch_ends),
                         PyLong_FromSsize_t(queries), PyLong_FromSsize_t(mid_batch), PyLong_FromSsize_t(parses),
                         PyLong_FromSsize_t(binds)};
    PyObject *server = NULL;
    if (args[1] && args[2] && args[3] && args[4] && args[5] && args[6])
        server = call_cached(&call_relay_request, args, 7);
    for (int i = 1; i < 7; i++)
        Py_XDECREF(args[i]);
    if (server == (PyObject *)t) {  /* no server is free: the client waits in line, and its read with it */
        Py_DECREF(server);
        return hold(t, data, n);
    }
    return relay_to(server, data, n);
}

/* A server's read of whole messages that may pass: 1 when it went to the client, 0 when Python takes it. */
static int
relay_from_server(Transport *t, const unsigned char *data, Py_ssize_t n)
{
    Py_ssize_t pos = 0, parse_completes = 0;
    int status = -1;
    while (pos < n) {
        unsigned char bits;
        Py_ssize_t end = passing_message(t, data, pos, n, &bits);
        if (end < 0)
            return 0;
        if (bits & READY) {
            if (end != n || end - pos != 6)
                return 0;  /* the link may end here: what follows is nobody's yet */
            status = data[pos + 5];
        }
        if (bits & PARSE_COMPLETE)
            parse_completes++;
        pos = end;
    }
    int relayed = relay_to(call_cached(&call_relay_target, &t->protocol, 1), data, n);
    if (relayed <= 0)
        return relayed;
    t->unreported += n;
    if (status < 0 && !parse_completes)
        return 1;
    PyObject *args[4] = {t->protocol, PyLong_FromSsize_t(t->unreported), PyLong_FromSsize_t(status),
                         PyLong_FromSsize_t(parse_completes)};
    t->unreported = 0;
    PyObject *result = NULL;
    if (args[1] && args[2] && args[3])
        result = call_cached(&call_relayed, args, 4);
    for (int i = 1; i < 4; i++)
        Py_XDECREF(args[i]);
    if (result == NULL)
        return -1;
    Py_DECREF(result);
    return 1;
}

static int
received_eof(Transport *t)
{
    if (stop_reading(t) < 0)
        return -1;
    PyObject *keep_open = PyObject_CallMethodNoArgs(t->protocol, str_eof_received);
    if (keep_open == NULL)
        return -1;
    int half_open = PyObject_IsTrue(keep_open);
    Py_DECREF(keep_open);
    if (half_open < 0)
        return -1;
    if (half_open || t->closing)
        return 0;
    t->closing = 1;
    return t->wend == t->wstart ? finish(t, NULL) : 0;
}

/* The socket is readable (or failed: recv says how). */
static int
read_ready(Transport *t)
{
    if (t->closed || !t->reading)
        return 0;
    unsigned char *read_buffer = t->poller->read_buffer;
    Py_ssize_t n = recv(t->fd, read_buffer, READ_SIZE, 0);
    if (n < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)
            return 0;
        return fail_with_errno(t, errno);
    }
    if (n == 0)
        return received_eof(t);
    if (t->role != ROLE_NONE) {
        if (t->head_len == 0 && t->body_left == 0) {
            int relayed = t->role == ROLE_CLIENT ? relay_from_client(t, read_buffer, n)
                                                 : relay_from_server(t, read_buffer, n);
            if (relayed != 0)
                return relayed < 0 ? -1 : 0;
        }
        track(t, read_buffer, n);
    }
    PyObject *data = PyBytes_FromStringAndSize((const char *)read_buffer, n);
    if (data == NULL)
        return -1;
    PyObject *args[2] = {t->protocol, data};
    PyObject *result = call_cached(&call_data_received, args, 2);
    Py_DECREF(data);
    if (result == NULL)
        return -1;
    Py_DECREF(result);
    return 0;
}

/* ---- the poller ---------------------------------------------------------------------------------- */

/* An exception from a protocol callback: the loop's exception handler reports it, as for any callback. */
static void
report_exception(Poller *poller, Transport *t)
{
    PyObject *type, *exc, *traceback;
    PyErr_Fetch(&type, &exc, &traceback);
    PyErr_NormalizeException(&type, &exc, &traceback);
    if (traceback != NULL)
        PyException_SetTraceback(exc, traceback);
    PyObject *loop = poller->loop_ref != NULL ? PyWeakref_GetObject(poller->loop_ref) : NULL;
    PyObject *context = Py_BuildValue("{s:s,s:O,s:O}", "message", "Exception in a pgmux socket callback",
                                      "exception", exc, "transport", (PyObject *)t);
    PyObject *result = NULL;
    if (context != NULL && loop != NULL && loop != Py_None)
        result = PyObject_CallMethodOneArg(loop, str_call_exception_handler, context);
    Py_XDECREF(context);
    if (result == NULL) {
        PyErr_Clear();
        PyErr_Restore(type, exc, traceback);  /* no handler to report it: at least it is printed */
        PyErr_WriteUnraisable((PyObject *)t);
        return;
    }
    Py_DECREF(result);
    Py_XDECREF(type);
    Py_XDECREF(exc);
    Py_XDECREF(traceback);
}

static PyObject *
Poller_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    PyObject *loop;
    if (!PyArg_ParseTuple(args, "O", &loop))
        return NULL;
    Poller *poller = (Poller *)type->tp_alloc(type, 0);
    if (poller == NULL)
        return NULL;
    poller->epfd = -1;
    poller->read_buffer = PyMem_RawMalloc(READ_SIZE);
    poller->clean = PyMem_RawCalloc(CLEAN_SLOTS, sizeof(struct clean_text));
    if (poller->read_buffer == NULL || poller->clean == NULL) {
        Py_DECREF(poller);
        return PyErr_NoMemory();
    }
    poller->epfd = epoll_create1(EPOLL_CLOEXEC);
    if (poller->epfd < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        Py_DECREF(poller);
        return NULL;
    }
    poller->loop_ref = PyWeakref_NewRef(loop, NULL);
    if (poller->loop_ref == NULL) {
        Py_DECREF(poller);
        return NULL;
    }
    return (PyObject *)poller;
}

static void
Poller_dealloc(Poller *poller)
{
    if (poller->epfd >= 0)
        close(poller->epfd);
    Py_XDECREF(poller->loop_ref);
    release_parked(poller);
    PyMem_RawFree(poller->parked);
    PyMem_RawFree(poller->read_buffer);
    PyMem_RawFree(poller->clean);
    Py_TYPE(poller)->tp_free((PyObject *)poller);
}

static PyObject *
Poller_fileno(Poller *poller, PyObject *unused)
{
    return PyLong_FromLong(poller->epfd);
}

/* The epoll set is readable: serve every ready socket (level-triggered: what is left wakes us again). */
static PyObject *
Poller_ready(Poller *poller, PyObject *unused)
{
    struct epoll_event events[POLL_BATCH];
    int count = epoll_wait(poller->epfd, events, POLL_BATCH, 0);
    if (count < 0) {
        if (errno == EINTR)
            Py_RETURN_NONE;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    /* Held for the whole batch: a transport the first events close stays valid for its own later ones. */
    for (int i = 0; i < count; i++)
        Py_INCREF((PyObject *)events[i].data.ptr);
    poller->dispatching++;
    for (int i = 0; i < count; i++) {
        Transport *t = events[i].data.ptr;
        uint32_t ready = events[i].events;
        if ((ready & (EPOLLIN | EPOLLERR | EPOLLHUP)) && read_ready(t) < 0)
            report_exception(poller, t);
        if ((ready & (EPOLLOUT | EPOLLERR | EPOLLHUP)) && t->writing && write_ready(t) < 0)
            report_exception(poller, t);
    }
    poller->dispatching--;
    for (int i = 0; i < count; i++)
        Py_DECREF((PyObject *)events[i].data.ptr);
    release_parked(poller);
    Py_RETURN_NONE;
}

static PyMethodDef Poller_methods[] = {
    {"_ready", (PyCFunction)Poller_ready, METH_NOARGS, "The epoll set is readable (the loop calls this)."},
    {"fileno", (PyCFunction)Poller_fileno, METH_NOARGS, NULL},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject PollerType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "proxy._relay.Poller",
    .tp_basicsize = sizeof(Poller),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "The sockets of one event loop's SocketTransports, watched as one reader of that loop.",
    .tp_new = Poller_new,
    .tp_dealloc = (destructor)Poller_dealloc,
    .tp_methods = Poller_methods,
};

/* ---- the asyncio.Transport interface ------------------------------------------------------------ */

static PyObject *
Transport_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *keywords[] = {"loop", "poller", "sock", "protocol", NULL};
    PyObject *loop, *poller, *sock, *protocol;
    /* Every accepted connection makes one: positional arguments (as pgmux passes them) skip the keyword parser. */
    if (kwds == NULL && PyTuple_GET_SIZE(args) == 4 && Py_IS_TYPE(PyTuple_GET_ITEM(args, 1), &PollerType)) {
        loop = PyTuple_GET_ITEM(args, 0);
        poller = PyTuple_GET_ITEM(args, 1);
        sock = PyTuple_GET_ITEM(args, 2);
        protocol = PyTuple_GET_ITEM(args, 3);
    }
    else if (!PyArg_ParseTupleAndKeywords(args, kwds, "OO!OO", keywords, &loop, &PollerType, &poller, &sock,
                                          &protocol))
        return NULL;
    PyObject *fileno = PyObject_CallMethodNoArgs(sock, str_fileno);
    if (fileno == NULL)
        return NULL;
    long fd = PyLong_AsLong(fileno);
    Py_DECREF(fileno);
    if (fd < 0) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, "the socket is closed");
        return NULL;
    }
    Transport *t = (Transport *)type->tp_alloc(type, 0);
    if (t == NULL)
        return NULL;
    t->fd = (int)fd;
    t->poller = (Poller *)Py_NewRef(poller);
    t->loop = Py_NewRef(loop);
    t->sock = Py_NewRef(sock);
    t->protocol = Py_NewRef(protocol);
    t->high = DEFAULT_HIGH;
    t->low = DEFAULT_HIGH / 4;
    return (PyObject *)t;
}

static int
Transport_traverse(Transport *t, visitproc visit, void *arg)
{
    Py_VISIT(t->loop);
    Py_VISIT(t->protocol);
    Py_VISIT(t->sock);
    Py_VISIT(t->poller);
    return 0;
}

static int
Transport_clear(Transport *t)
{
    Py_CLEAR(t->loop);
    Py_CLEAR(t->protocol);
    Py_CLEAR(t->table_owner);
    Py_CLEAR(t->poller);
    Py_CLEAR(t->sock);  /* a socket object closes its fd when collected */
    return 0;
}

static void
Transport_dealloc(Transport *t)
{
    PyObject_GC_UnTrack(t);
    Transport_clear(t);
    PyMem_Free(t->wbuf);
    PyMem_Free(t->held);
    Py_TYPE(t)->tp_free((PyObject *)t);
}

static PyObject *
Transport_start(Transport *t, PyObject *unused)
{
    if (start_reading(t) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *
Transport_write(Transport *t, PyObject *data)
{
    Py_buffer view;
    if (PyObject_GetBuffer(data, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    int status = write_bytes(t, view.buf, view.len);
    PyBuffer_Release(&view);
    if (status < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *
Transport_writelines(Transport *t, PyObject *lines)
{
    PyObject *iterator = PyObject_GetIter(lines);
    if (iterator == NULL)
        return NULL;
    PyObject *line;
    while ((line = PyIter_Next(iterator)) != NULL) {
        PyObject *result = Transport_write(t, line);
        Py_DECREF(line);
        if (result == NULL) {
            Py_DECREF(iterator);
            return NULL;
        }
        Py_DECREF(result);
    }
    Py_DECREF(iterator);
    if (PyErr_Occurred())
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *
Transport_close(Transport *t, PyObject *unused)
{
    if (t->closing)
        Py_RETURN_NONE;
    t->closing = 1;
    if (stop_reading(t) < 0)
        return NULL;
    if (t->wend == t->wstart && finish(t, NULL) < 0)
        return NULL;
    Py_RETURN_NONE;
}

/* close(), for a protocol that has ended the connection itself (ClientConnection._close_quietly): during the
   poller's _ready no connection_lost follows, so no call_soon and no handle; the protocol is let go of when
   _ready ends. Elsewhere it is close(), connection_lost and all. */
static PyObject *
Transport_close_quietly(Transport *t, PyObject *unused)
{
    t->quiet = 1;
    return Transport_close(t, unused);
}

static PyObject *
Transport_abort(Transport *t, PyObject *unused)
{
    if (finish(t, NULL) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *
Transport_is_closing(Transport *t, PyObject *unused)
{
    return PyBool_FromLong(t->closing);
}

static PyObject *
Transport_pause_reading(Transport *t, PyObject *unused)
{
    if (t->closing || t->paused)
        Py_RETURN_NONE;
    t->paused = 1;
    if (stop_reading(t) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *
Transport_resume_reading(Transport *t, PyObject *unused)
{
    if (t->closing || !t->paused)
        Py_RETURN_NONE;
    t->paused = 0;
    if (start_reading(t) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *
Transport_is_reading(Transport *t, PyObject *unused)
{
    return PyBool_FromLong(!t->paused && !t->closing);
}

static PyObject *
Transport_get_extra_info(Transport *t, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs < 1 || nargs > 2) {
        PyErr_SetString(PyExc_TypeError, "get_extra_info(name, default=None)");
        return NULL;
    }
    /* Asked of the socket when asked (the admin console, a login's log line): kept, two addresses per
       connection would cost more memory than the rest of an idle client's transport. */
    PyObject *fallback = nargs == 2 ? args[1] : Py_None;
    PyObject *name = args[0];
    if (!PyUnicode_Check(name))
        return Py_NewRef(fallback);
    if (PyUnicode_Compare(name, str_socket) == 0)
        return Py_NewRef(t->closed ? fallback : t->sock);
    PyObject *method = PyUnicode_Compare(name, str_peername) == 0 ? str_getpeername
                       : PyUnicode_Compare(name, str_sockname) == 0 ? str_getsockname : NULL;
    if (method == NULL || t->closed)
        return Py_NewRef(fallback);
    PyObject *address = PyObject_CallMethodNoArgs(t->sock, method);
    if (address == NULL && PyErr_ExceptionMatches(PyExc_OSError)) {
        PyErr_Clear();  /* not connected any more */
        return Py_NewRef(fallback);
    }
    return address;
}

static PyObject *
Transport_set_write_buffer_limits(Transport *t, PyObject *args, PyObject *kwds)
{
    static char *keywords[] = {"high", "low", NULL};
    PyObject *high = Py_None, *low = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|OO", keywords, &high, &low))
        return NULL;
    /* asyncio's rule: high defaults to 64 KiB, or 4 × low; low to high / 4. */
    Py_ssize_t h = high == Py_None ? -1 : PyLong_AsSsize_t(high);
    Py_ssize_t l = low == Py_None ? -1 : PyLong_AsSsize_t(low);
    if (PyErr_Occurred())
        return NULL;
    if (h < 0)
        h = l < 0 ? DEFAULT_HIGH : 4 * l;
    if (l < 0)
        l = h / 4;
    if (!(h >= l && l >= 0)) {
        PyErr_Format(PyExc_ValueError, "high (%zd) must be >= low (%zd) must be >= 0", h, l);
        return NULL;
    }
    t->high = h;
    t->low = l;
    Py_RETURN_NONE;
}

static PyObject *
Transport_get_write_buffer_size(Transport *t, PyObject *unused)
{
    return PyLong_FromSsize_t(t->wend - t->wstart);
}

static PyObject *
Transport_get_write_buffer_limits(Transport *t, PyObject *unused)
{
    return Py_BuildValue("(nn)", t->low, t->high);
}

static PyObject *
Transport_get_protocol(Transport *t, PyObject *unused)
{
    return Py_NewRef(t->protocol);
}

static PyObject *
Transport_set_protocol(Transport *t, PyObject *protocol)
{
    Py_SETREF(t->protocol, Py_NewRef(protocol));
    Py_RETURN_NONE;
}

static PyObject *
Transport_can_write_eof(Transport *t, PyObject *unused)
{
    Py_RETURN_FALSE;
}

/* relay(role, table): from now on this connection is a relay's client (1) or server (2) edge; ``table``
   (256 bytes) says which message types may pass in the steady state. The stream must be at a message
   boundary: the login's messages are behind it. */
static PyObject *
Transport_relay(Transport *t, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer table;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "relay(role, table)");
        return NULL;
    }
    long role = PyLong_AsLong(args[0]);
    if (role == -1 && PyErr_Occurred())
        return NULL;
    if (role != ROLE_CLIENT && role != ROLE_SERVER) {
        PyErr_SetString(PyExc_ValueError, "role: 1 (client) or 2 (server)");
        return NULL;
    }
    if (PyObject_GetBuffer(args[1], &table, PyBUF_SIMPLE) < 0)
        return NULL;
    Py_ssize_t length = table.len;
    PyBuffer_Release(&table);
    if (length != 256 || !PyBytes_CheckExact(args[1])) {
        PyErr_SetString(PyExc_ValueError, "the relay table is bytes, one per message type (256)");
        return NULL;
    }
    Py_XSETREF(t->table_owner, Py_NewRef(args[1]));  /* immutable: its buffer stays put while held */
    t->table = (const unsigned char *)PyBytes_AS_STRING(args[1]);
    t->role = (char)role;
    t->head_len = 0;
    t->body_left = 0;
    Py_RETURN_NONE;
}

/* send_held(peer): write the held read to ``peer`` (the server the waiting client is lent), as the relay would
   have written it at once. */
static PyObject *
Transport_send_held(Transport *t, PyObject *peer)
{
    if (!Transport_Check(peer)) {
        PyErr_SetString(PyExc_TypeError, "send_held(peer): a SocketTransport");
        return NULL;
    }
    int status = t->held_len ? write_bytes((Transport *)peer, t->held, t->held_len) : 0;
    drop_held(t);
    if (status < 0)
        return NULL;
    Py_RETURN_NONE;
}

/* take_held(): the held read as bytes (b"" when none), no longer held. */
static PyObject *
Transport_take_held(Transport *t, PyObject *unused)
{
    PyObject *data = PyBytes_FromStringAndSize(t->held, t->held_len);
    if (data != NULL)
        drop_held(t);
    return data;
}

static PyObject *
Transport_repr(Transport *t)
{
    return PyUnicode_FromFormat("<SocketTransport fd=%d%s%s>", t->fd, t->closing ? " closing" : "",
                                t->closed ? " closed" : "");
}

static PyMethodDef Transport_methods[] = {
    {"start", (PyCFunction)Transport_start, METH_NOARGS, "Begin reading: after the protocol's connection_made."},
    {"relay", (PyCFunction)(void (*)(void))Transport_relay, METH_FASTCALL, "Become a relay edge (see the module)."},
    {"send_held", (PyCFunction)Transport_send_held, METH_O, "Write the held read to the peer transport."},
    {"take_held", (PyCFunction)Transport_take_held, METH_NOARGS, "The held read as bytes (b\"\" when none)."},
    {"write", (PyCFunction)Transport_write, METH_O, NULL},
    {"writelines", (PyCFunction)Transport_writelines, METH_O, NULL},
    {"close", (PyCFunction)Transport_close, METH_NOARGS, NULL},
    {"close_quietly", (PyCFunction)Transport_close_quietly, METH_NOARGS,
     "close(); within the poller's wake, the protocol hears nothing more (it has ended the connection itself)."},
    {"abort", (PyCFunction)Transport_abort, METH_NOARGS, NULL},
    {"is_closing", (PyCFunction)Transport_is_closing, METH_NOARGS, NULL},
    {"pause_reading", (PyCFunction)Transport_pause_reading, METH_NOARGS, NULL},
    {"resume_reading", (PyCFunction)Transport_resume_reading, METH_NOARGS, NULL},
    {"is_reading", (PyCFunction)Transport_is_reading, METH_NOARGS, NULL},
    {"get_extra_info", (PyCFunction)(void (*)(void))Transport_get_extra_info, METH_FASTCALL, NULL},
    {"set_write_buffer_limits", (PyCFunction)(void (*)(void))Transport_set_write_buffer_limits,
     METH_VARARGS | METH_KEYWORDS, NULL},
    {"get_write_buffer_size", (PyCFunction)Transport_get_write_buffer_size, METH_NOARGS, NULL},
    {"get_write_buffer_limits", (PyCFunction)Transport_get_write_buffer_limits, METH_NOARGS, NULL},
    {"get_protocol", (PyCFunction)Transport_get_protocol, METH_NOARGS, NULL},
    {"set_protocol", (PyCFunction)Transport_set_protocol, METH_O, NULL},
    {"can_write_eof", (PyCFunction)Transport_can_write_eof, METH_NOARGS, NULL},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject TransportType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "proxy._relay.SocketTransport",
    .tp_basicsize = sizeof(Transport),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "An asyncio transport over a non-blocking socket that relays the steady state itself.",
    .tp_new = Transport_new,
    .tp_dealloc = (destructor)Transport_dealloc,
    .tp_traverse = (traverseproc)Transport_traverse,
    .tp_clear = (inquiry)Transport_clear,
    .tp_methods = Transport_methods,
    .tp_repr = (reprfunc)Transport_repr,
};

/* ---- accepting ------------------------------------------------------------------------------------ */

/* accept_socket(fd, family): the next connection waiting on the listening socket ``fd``, as a non-blocking
   socket object ready for a SocketTransport (TCP_NODELAY set on TCP), or None when none waits. A login pays
   for its accept: socket.accept() raises BlockingIOError on every wake that empties the backlog, builds the
   peer's address, and leaves the socket blocking (two fcntl calls more); here none of that happens. */
static PyObject *
accept_socket(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2 || !PyLong_Check(args[0]) || !PyLong_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "accept_socket(fd: int, family: int)");
        return NULL;
    }
    int listening = (int)PyLong_AsLong(args[0]);
    int family = (int)PyLong_AsLong(args[1]);
    if (PyErr_Occurred())
        return NULL;
    int fd;
    for (;;) {
        fd = accept4(listening, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd >= 0)
            break;
        if (errno == EAGAIN || errno == EWOULDBLOCK)
            Py_RETURN_NONE;
        if (errno != EINTR && errno != ECONNABORTED)  /* aborted: reset while it waited; take the next */
            return PyErr_SetFromErrno(PyExc_OSError);
    }
    if (family == AF_INET || family == AF_INET6) {
        int on = 1;  /* as asyncio's transports do; a failure costs latency, not correctness */
        (void)setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &on, sizeof on);
    }
    /* Family, type and protocol given: the socket object asks the kernel nothing; SOCK_NONBLOCK in the type
       makes it non-blocking in Python's eyes too (timeout 0) without a call. */
    PyObject *sock = PyObject_CallFunction(socket_type, "iiii", family, SOCK_STREAM | SOCK_NONBLOCK, 0, fd);
    if (sock == NULL)
        close(fd);
    return sock;
}

static PyMethodDef module_methods[] = {
    {"accept_socket", (PyCFunction)(void (*)(void))accept_socket, METH_FASTCALL,
     "The next connection waiting on a listening socket (non-blocking, TCP_NODELAY), or None."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_relay", NULL, -1, module_methods};

#define INTERN(var, text) if ((var = PyUnicode_InternFromString(text)) == NULL) return NULL

PyMODINIT_FUNC
PyInit__relay(void)
{
    INTERN(str_call_soon, "call_soon");
    INTERN(str_call_exception_handler, "call_exception_handler");
    INTERN(str_data_received, "data_received");
    INTERN(str_eof_received, "eof_received");
    INTERN(str_connection_lost, "connection_lost");
    INTERN(str_pause_writing, "pause_writing");
    INTERN(str_resume_writing, "resume_writing");
    INTERN(str_relay_request, "relay_request");
    INTERN(str_relay_target, "relay_target");
    INTERN(str_relayed, "relayed");
    INTERN(str_close, "close");
    INTERN(str_socket, "socket");
    INTERN(str_peername, "peername");
    INTERN(str_sockname, "sockname");
    INTERN(str_getpeername, "getpeername");
    INTERN(str_getsockname, "getsockname");
    INTERN(str_fileno, "fileno");
    if (PyType_Ready(&TransportType) < 0 || PyType_Ready(&PollerType) < 0)
        return NULL;
    PyObject *socket_module = PyImport_ImportModule("_socket");
    if (socket_module == NULL)
        return NULL;
    socket_type = PyObject_GetAttrString(socket_module, "socket");
    Py_DECREF(socket_module);
    if (socket_type == NULL)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddObjectRef(m, "SocketTransport", (PyObject *)&TransportType) < 0
        || PyModule_AddObjectRef(m, "Poller", (PyObject *)&PollerType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    if (PyModule_AddIntConstant(m, "PASS", PASS) < 0 || PyModule_AddIntConstant(m, "BATCH_END", BATCH_END) < 0
        || PyModule_AddIntConstant(m, "NEUTRAL", NEUTRAL) < 0 || PyModule_AddIntConstant(m, "WORDS", WORDS) < 0
        || PyModule_AddIntConstant(m, "QUERY", QUERY) < 0 || PyModule_AddIntConstant(m, "READY", READY) < 0
        || PyModule_AddIntConstant(m, "PARSE_COMPLETE", PARSE_COMPLETE) < 0
        || PyModule_AddIntConstant(m, "UNNAMED", UNNAMED) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
