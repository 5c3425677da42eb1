"""The compiled relay's transport (proxy/_relay.c) on real socket pairs: asyncio's transport contract, and the
relay's steady state (whole messages its table lets pass go socket to socket; everything else, split messages
included, reaches data_received with message boundaries kept).

The protocol here is a recorder standing where ClientConnection and ServerConnection stand: the transport's
contract is with whatever protocol it drives, and these tests check that contract byte by byte.
"""

from __future__ import annotations

import asyncio
import functools
import os
import shutil
import socket
import struct
import tracemalloc
import weakref

import pytest

import proxy
from proxy import sockets
from proxy.compiled import PURE_PYTHON_ENV
from proxy.protocol import messages as m

pytestmark = pytest.mark.skipif(sockets.SocketTransport is None, reason="the compiled relay is not built (pure Python)")

def in_loop(test):
    """Run an async test in a fresh event loop (uvloop where installed, as pgmux runs)."""
    @functools.wraps(test)
    def run(*args, **kwargs):
        try:
            import uvloop
            runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
        except ImportError:
            runner = asyncio.Runner()
        async def body():
            try:
                await test(*args, **kwargs)
            finally:  # inside the loop: a transport's close reports through it
                while _EDGES:
                    _EDGES.pop().close()

        with runner:
            runner.run(body())
    return run


CLIENT_TABLE = sockets.relay_table(
    frozenset(range(256)) - {m.TERMINATE, m.COPY_DONE, m.COPY_FAIL},
    {m.SYNC: sockets.BATCH_END, m.FLUSH: sockets.NEUTRAL, m.COPY_DATA: sockets.NEUTRAL,
     m.QUERY: sockets.BATCH_END | sockets.WORDS | sockets.QUERY, m.PARSE: sockets.WORDS})
# Where statements are renamed (transaction mode with max_prepared_statements), as client.py builds it.
PREPARED_CLIENT_TABLE = sockets.relay_table(
    frozenset(range(256)) - {m.TERMINATE, m.COPY_DONE, m.COPY_FAIL},
    {m.SYNC: sockets.BATCH_END, m.FLUSH: sockets.NEUTRAL, m.QUERY: sockets.BATCH_END | sockets.WORDS | sockets.QUERY,
     m.PARSE: sockets.WORDS | sockets.UNNAMED, m.BIND: sockets.UNNAMED, m.DESCRIBE: sockets.UNNAMED,
     m.CLOSE: sockets.UNNAMED})
SERVER_TABLE = sockets.relay_table(
    frozenset(range(256)) - {m.ERROR_RESPONSE, m.PARAMETER_STATUS},
    {m.READY_FOR_QUERY: sockets.READY, m.PARSE_COMPLETE: sockets.PARSE_COMPLETE})


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler here, so no compiled relay was built")
@pytest.mark.skipif(not proxy.BUILD.compiled and PURE_PYTHON_ENV in os.environ,
                    reason=f"{PURE_PYTHON_ENV} is set: the pure-Python build is under test")
def test_the_compiled_relay_is_built_where_a_compiler_exists() -> None:
    assert sockets.SocketTransport is not None


def test_accepting_gives_none_on_an_empty_backlog_and_a_non_blocking_no_delay_socket_for_a_connection() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    app = None
    try:
        assert sockets._accept_socket(listener.fileno(), listener.family) is None
        app = socket.create_connection(listener.getsockname())
        accepted = sockets._accept_socket(listener.fileno(), listener.family)
        try:
            assert accepted.getpeername() == app.getsockname()
            assert accepted.gettimeout() == 0.0  # non-blocking in Python's eyes, as the fd is
            assert not os.get_blocking(accepted.fileno())
            assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            assert accepted.type == socket.SOCK_STREAM
        finally:
            accepted.close()
        assert sockets._accept_socket(listener.fileno(), listener.family) is None
    finally:
        listener.close()
        if app is not None:
            app.close()


class Recorder:
    """A protocol that writes down what its transport tells it, and answers the relay as it is told to."""

    def __init__(self) -> None:
        self.transport: object = None
        self.received: list[bytes] = []
        self.requests: list[tuple[int, int, int, int]] = []
        self.reports: list[tuple[int, int, int]] = []
        self.target: object = None  # what relay_request / relay_target answer
        self.events: list[str] = []
        self.lost: asyncio.Future[Exception | None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: object) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.received.append(data)

    def eof_received(self) -> None:
        self.events.append("eof")

    def connection_lost(self, exc: Exception | None) -> None:
        self.events.append("lost")
        self.lost.set_result(exc)

    def pause_writing(self) -> None:
        self.events.append("pause_writing")

    def resume_writing(self) -> None:
        self.events.append("resume_writing")

    def relay_request(self, nbytes: int, batch_ends: int, queries: int, mid_batch: int, parses: int,
                      binds: int) -> object:
        self.requests.append((nbytes, batch_ends, queries, mid_batch, parses, binds))
        return self.target

    def relay_target(self) -> object:
        return self.target

    def relayed(self, nbytes: int, status: int, parse_completes: int) -> None:
        self.reports.append((nbytes, status, parse_completes))


def query(sql: str) -> bytes:
    return m.message(m.QUERY, sql.encode() + b"\x00")


def ready(status: bytes = b"I") -> bytes:
    return m.message(m.READY_FOR_QUERY, status)


def data_row(value: bytes) -> bytes:
    return m.message(m.DATA_ROW, struct.pack("!hi", 1, len(value)) + value)


async def settle(predicate, timeout: float = 2.0) -> None:
    """Let the loop run until ``predicate()`` holds."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.002)


async def recv_exactly(sock: socket.socket, count: int) -> bytes:
    """Read ``count`` bytes from the far end while the loop runs (the transport must read to send them)."""
    sock.setblocking(False)
    out = b""
    deadline = asyncio.get_running_loop().time() + 2
    while len(out) < count:
        assert asyncio.get_running_loop().time() < deadline, f"timed out after {len(out)} of {count} bytes"
        try:
            chunk = sock.recv(count - len(out))
        except BlockingIOError:
            await asyncio.sleep(0.001)
            continue
        assert chunk, f"closed after {len(out)} of {count} bytes"
        out += chunk
    return out


class Edge:
    """One transport over a socket pair: ``app`` is the far end a test plays (a client app, or PostgreSQL)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.app, near = socket.socketpair()
        near.setblocking(False)  # as the listener's accept and a connect give it
        self.protocol = Recorder()
        self.transport = sockets.adopt(loop, near, self.protocol)

    def close(self) -> None:
        self.transport.abort()
        self.app.close()


_EDGES: list[Edge] = []  # closed by in_loop when the test ends


def edge() -> Edge:
    made = Edge(asyncio.get_running_loop())
    _EDGES.append(made)
    return made


# ---- the asyncio transport contract ------------------------------------------------------------------

@in_loop
async def test_bytes_pass_both_ways_like_an_asyncio_transport() -> None:
    one = edge()
    one.app.sendall(b"hello")
    await settle(lambda: one.protocol.received)
    assert b"".join(one.protocol.received) == b"hello"
    one.transport.write(b"world")
    one.transport.writelines([b"!", memoryview(b"?")])
    assert await recv_exactly(one.app, 7) == b"world!?"
    assert one.transport.get_extra_info("socket") is not None
    assert one.transport.get_extra_info("peername", "none") is not None
    assert one.transport.get_extra_info("missing", 42) == 42


@in_loop
async def test_a_write_the_kernel_cannot_take_is_queued_and_pauses_then_resumes_the_protocol() -> None:
    one = edge()
    one.transport.set_write_buffer_limits(high=64 * 1024)
    payload = os.urandom(4 * 1024 * 1024)
    one.transport.write(payload)  # a socket pair takes a few hundred KiB: the rest waits in the transport
    assert one.transport.get_write_buffer_size() > 64 * 1024
    assert one.protocol.events == ["pause_writing"]
    got = bytearray()
    one.app.setblocking(False)
    while len(got) < len(payload):
        try:
            got += one.app.recv(1 << 20)
        except BlockingIOError:
            await asyncio.sleep(0.001)
    assert bytes(got) == payload
    await settle(lambda: "resume_writing" in one.protocol.events)
    assert one.transport.get_write_buffer_size() == 0


@in_loop
async def test_the_write_queue_lets_its_memory_go_once_drained() -> None:
    # A slow reader of a large result makes the queue grow to the backlog; kept afterwards, that buffer would
    # stay with an idle connection for good (thousands of them). tracemalloc sees the transport's PyMem buffer.
    one = edge()
    payload = os.urandom(4 * 1024 * 1024)
    got = bytearray(len(payload))  # read into memory taken before measuring
    tracemalloc.start()
    try:
        one.transport.write(payload)
        queued = one.transport.get_write_buffer_size()
        assert queued > 2 * 1024 * 1024  # a socket pair takes a few hundred KiB: the rest waits in the transport
        while_queued = tracemalloc.get_traced_memory()[0]
        view, received = memoryview(got), 0
        one.app.setblocking(False)
        while received < len(payload):
            try:
                received += one.app.recv_into(view[received:])
            except BlockingIOError:
                await asyncio.sleep(0.001)
        await settle(lambda: one.transport.get_write_buffer_size() == 0)
        drained = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert bytes(got) == payload
    assert while_queued - drained >= queued


@in_loop
async def test_close_sends_what_is_queued_first_and_then_reports_the_loss() -> None:
    one = edge()
    payload = os.urandom(2 * 1024 * 1024)
    one.transport.write(payload)
    one.transport.close()
    assert one.transport.is_closing()
    got = bytearray()
    one.app.setblocking(False)
    while True:
        try:
            chunk = one.app.recv(1 << 20)
        except BlockingIOError:
            await asyncio.sleep(0.001)
            continue
        if not chunk:
            break
        got += chunk
    assert bytes(got) == payload
    assert await asyncio.wait_for(one.protocol.lost, 2) is None


@in_loop
async def test_abort_drops_what_is_queued() -> None:
    one = edge()
    one.transport.write(os.urandom(4 * 1024 * 1024))
    one.transport.abort()
    assert await asyncio.wait_for(one.protocol.lost, 2) is None
    one.app.settimeout(2)
    received = 0
    while chunk := one.app.recv(1 << 20):
        received += len(chunk)
    assert received < 4 * 1024 * 1024


class QuietCloser(Recorder):
    """A protocol that ends the connection itself on its first read, as ClientConnection does at Terminate."""

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self.transport.close_quietly()  # type: ignore[attr-defined]


@in_loop
async def test_close_quietly_within_the_wake_closes_without_connection_lost_and_lets_the_protocol_go() -> None:
    one = edge()
    protocol = QuietCloser()
    protocol.connection_made(one.transport)
    one.transport.set_protocol(protocol)
    one.protocol = protocol
    gone = weakref.ref(protocol)
    del protocol
    one.app.sendall(b"bye")
    await settle(lambda: one.transport.is_closing())
    one.app.settimeout(2)
    assert one.app.recv(1) == b""  # closed
    for _unused in range(5):  # a connection_lost would be a call_soon away
        await asyncio.sleep(0)
    assert one.protocol.received == [b"bye"] and one.protocol.events == []
    assert one.transport.is_closing() and one.transport.get_protocol() is None
    one.protocol = None
    assert gone() is None  # the transport kept no reference once its wake ended: no cycle left to the collector


@in_loop
async def test_close_quietly_outside_the_wake_is_close_and_reports_the_loss() -> None:
    one = edge()
    one.transport.close_quietly()
    assert await asyncio.wait_for(one.protocol.lost, 2) is None
    one.app.settimeout(2)
    assert one.app.recv(1) == b""


@in_loop
async def test_the_peer_closing_calls_eof_received_then_connection_lost() -> None:
    one = edge()
    one.app.shutdown(socket.SHUT_WR)
    assert await asyncio.wait_for(one.protocol.lost, 2) is None
    assert one.protocol.events == ["eof", "lost"]


@in_loop
async def test_a_peer_reset_reaches_connection_lost_as_the_socket_error() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    app = socket.create_connection(listener.getsockname())
    near, _ = listener.accept()
    near.setblocking(False)
    listener.close()
    protocol = Recorder()
    transport = sockets.adopt(asyncio.get_running_loop(), near, protocol)
    try:
        app.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        app.close()  # RST
        await asyncio.sleep(0.05)
        transport.write(b"x" * 100)  # writing to a reset connection fails: the loss carries the error
        exc = await asyncio.wait_for(protocol.lost, 2)
        assert exc is None or isinstance(exc, ConnectionError)
        assert "lost" in protocol.events
    finally:
        transport.abort()


@in_loop
async def test_pause_reading_holds_the_bytes_in_the_socket_until_resumed() -> None:
    one = edge()
    one.transport.pause_reading()
    assert not one.transport.is_reading()
    one.app.sendall(b"later")
    await asyncio.sleep(0.05)
    assert one.protocol.received == []
    one.transport.resume_reading()
    await settle(lambda: one.protocol.received)
    assert b"".join(one.protocol.received) == b"later"


# ---- the relay's steady state ------------------------------------------------------------------------

async def linked() -> tuple[Edge, Edge]:
    client, server = edge(), edge()
    client.transport.relay(sockets.CLIENT_EDGE, CLIENT_TABLE)
    server.transport.relay(sockets.SERVER_EDGE, SERVER_TABLE)
    client.protocol.target = server.transport
    server.protocol.target = client.transport
    return client, server


@in_loop
async def test_whole_requests_go_to_the_server_socket_and_python_only_counts_them() -> None:
    client, server = await linked()
    batch = query("SELECT 1") + query("SELECT 2")
    client.app.sendall(batch)
    assert await recv_exactly(server.app, len(batch)) == batch
    assert client.protocol.received == []
    assert client.protocol.requests == [(len(batch), 2, 2, 0, 0, 0)]


@in_loop
async def test_an_extended_batch_counts_its_sync_and_a_flush_leaves_it_open() -> None:
    client, server = await linked()
    parse = m.message(m.PARSE, b"\x00SELECT $1\x00\x00\x00")
    flush = m.message(m.FLUSH)
    client.app.sendall(parse + flush)
    assert await recv_exactly(server.app, len(parse + flush)) == parse + flush
    sync = m.message(m.SYNC)
    client.app.sendall(sync)
    await recv_exactly(server.app, len(sync))
    assert client.protocol.requests == [(len(parse + flush), 0, 0, 1, 0, 0), (len(sync), 1, 0, 0, 0, 0)]


@in_loop
async def test_a_query_that_may_change_the_session_goes_to_python() -> None:
    client, server = await linked()
    setter = query("SET search_path = x")
    client.app.sendall(setter)
    await settle(lambda: client.protocol.received)
    assert b"".join(client.protocol.received) == setter
    assert client.protocol.requests == []


@in_loop
async def test_a_query_that_may_change_the_session_goes_to_python_after_a_clean_one_differing_only_in_its_first_word(
) -> None:
    """Clean texts are remembered (the same statements come again and again); one of the same length that
    agrees everywhere past its first word may share its slot, and must still be tested."""
    client, server = await linked()
    clean = query("SHOW search_path; SELECT 'the same text from here on, long enough'")
    setter = query("SET  search_path; SELECT 'the same text from here on, long enough'")
    assert len(clean) == len(setter)
    for _ in range(2):  # the second is a remembered one
        client.app.sendall(clean)
        assert await recv_exactly(server.app, len(clean)) == clean
    client.app.sendall(setter)
    await settle(lambda: client.protocol.received)
    assert b"".join(client.protocol.received) == setter
    assert len(client.protocol.requests) == 2


@in_loop
async def test_a_message_the_table_stops_goes_to_python_with_the_whole_read() -> None:
    client, server = await linked()
    read = query("SELECT 1") + m.message(m.TERMINATE)
    client.app.sendall(read)
    await settle(lambda: client.protocol.received)
    assert b"".join(client.protocol.received) == read


@in_loop
async def test_python_answering_the_clients_own_transport_holds_the_read_until_it_is_sent_to_a_server() -> None:
    """The compiled hand-over: a client that waits for a server leaves its request in its transport, which
    sends it on as it is when Python names the server, without data_received or a bytes object."""
    client, server = await linked()
    client.protocol.target = client.transport  # no server free: hold it
    request = query("SELECT 1") + query("SELECT 2")
    client.app.sendall(request)
    await settle(lambda: client.protocol.requests)
    await asyncio.sleep(0.02)
    assert client.protocol.received == []
    assert client.protocol.requests == [(len(request), 2, 2, 0, 0, 0)]
    client.transport.send_held(server.transport)
    assert await recv_exactly(server.app, len(request)) == request
    client.transport.send_held(server.transport)  # nothing held any more: nothing sent
    assert client.transport.take_held() == b""
    client.protocol.target = server.transport  # linked now: the next read goes straight through
    later = query("SELECT 3")
    client.app.sendall(later)
    assert await recv_exactly(server.app, len(later)) == later
    assert client.protocol.received == []


@in_loop
async def test_a_held_read_taken_back_comes_as_bytes_and_later_reads_go_to_python_behind_it() -> None:
    client, _ = await linked()
    client.protocol.target = client.transport
    first = query("SELECT 1")
    client.app.sendall(first)
    await settle(lambda: client.protocol.requests)
    client.protocol.target = None  # still waiting: the next read is Python's, to queue behind the held one
    second = query("SELECT 2")
    client.app.sendall(second)
    await settle(lambda: client.protocol.received)
    assert client.protocol.received == [second]
    assert client.transport.take_held() == first
    assert client.transport.take_held() == b""


@in_loop
async def test_holding_a_second_read_behind_a_held_one_is_refused_and_reported() -> None:
    """Python takes a held read back before anything else is kept; a relay_request that breaks that rule is a
    bug, reported through the loop's exception handler, and the first read stays held."""
    reported: list[dict[str, object]] = []
    asyncio.get_running_loop().set_exception_handler(lambda loop, context: reported.append(context))
    client, _ = await linked()
    client.protocol.target = client.transport
    first, second = query("SELECT 1"), query("SELECT 2")
    client.app.sendall(first)
    await settle(lambda: client.protocol.requests)
    client.app.sendall(second)
    await settle(lambda: reported)
    assert isinstance(reported[0]["exception"], RuntimeError)
    assert client.transport.take_held() == first


@in_loop
async def test_a_closed_transport_drops_its_held_read() -> None:
    client, _ = await linked()
    client.protocol.target = client.transport
    client.app.sendall(query("SELECT 1"))
    await settle(lambda: client.protocol.requests)
    client.transport.abort()
    assert client.transport.take_held() == b""
    with pytest.raises(TypeError):
        client.transport.send_held(None)


@in_loop
async def test_python_answering_none_takes_the_read_itself() -> None:
    client, server = await linked()
    client.protocol.target = None  # e.g. no server to lend yet
    request = query("SELECT 1")
    client.app.sendall(request)
    await settle(lambda: client.protocol.received)
    assert client.protocol.received == [request]
    assert client.protocol.requests == [(len(request), 1, 1, 0, 0, 0)]


@in_loop
async def test_the_server_edge_reports_ready_for_query_and_parse_completes_with_the_bytes_sent() -> None:
    client, server = await linked()
    rows = data_row(b"a") + data_row(b"b")
    server.app.sendall(rows)  # no ReadyForQuery yet: sent on, nothing to report
    assert await recv_exactly(client.app, len(rows)) == rows
    answer = (m.message(m.PARSE_COMPLETE) + m.message(m.BIND_COMPLETE) + data_row(b"c")
              + m.message(m.COMMAND_COMPLETE, b"SELECT 1\x00") + ready(b"T"))
    server.app.sendall(answer)
    assert await recv_exactly(client.app, len(answer)) == answer
    await settle(lambda: server.protocol.reports)
    assert server.protocol.reports == [(len(rows) + len(answer), ord("T"), 1)]
    assert server.protocol.received == []


@in_loop
async def test_bytes_behind_a_ready_for_query_go_to_python() -> None:
    client, server = await linked()
    read = ready() + data_row(b"late")  # the link may end at the ReadyForQuery: what follows is nobody's yet
    server.app.sendall(read)
    await settle(lambda: server.protocol.received)
    assert b"".join(server.protocol.received) == read
    assert server.protocol.reports == []


def _boundaries(stream: bytes) -> set[int]:
    found, pos = set(), 0
    while pos < len(stream):
        pos += 1 + int.from_bytes(stream[pos + 1:pos + 5], "big")
        found.add(pos)
    return found


def _stream() -> bytes:
    return query("SELECT 1") + m.message(m.PARSE, b"\x00SELECT 2\x00\x00\x00") + m.message(m.SYNC) + query("SELECT 3")


@pytest.mark.parametrize("split", range(1, len(_stream())))
@in_loop
async def test_a_message_split_across_reads_reaches_python_and_the_next_whole_one_is_relayed_again(
        split: int) -> None:
    client, server = await linked()
    stream = _stream()
    client.app.sendall(stream[:split])
    await settle(lambda: sum(r[0] for r in client.protocol.requests) + len(b"".join(client.protocol.received))
                 >= split)
    client.app.sendall(stream[split:])
    await settle(lambda: sum(r[0] for r in client.protocol.requests) + len(b"".join(client.protocol.received))
                 >= len(stream))
    # Every byte went exactly one way, in order: relayed reads are whole messages at boundaries.
    relayed = sum(r[0] for r in client.protocol.requests)
    to_python = b"".join(client.protocol.received)
    assert relayed + len(to_python) == len(stream)
    server.app.setblocking(False)
    try:
        on_server = server.app.recv(1 << 16)
    except BlockingIOError:
        on_server = b""
    # A read is relayed whole or not at all: split at a boundary, both halves go on; inside a message, both
    # reach Python (the second begins mid-message).
    at_boundary = split in _boundaries(stream)
    assert (on_server, to_python) == ((stream, b"") if at_boundary else (b"", stream))
    # The stream is back at a boundary: the next whole request is relayed.
    before = len(client.protocol.requests)
    follow = query("SELECT 4")
    client.app.sendall(follow)
    await settle(lambda: len(client.protocol.requests) > before)
    assert client.protocol.requests[-1] == (len(follow), 1, 1, 0, 0, 0)


def extended(name: bytes = b"", sql: bytes = b"SELECT $1", portal: bytes = b"") -> bytes:
    return (m.message(m.PARSE, name + b"\x00" + sql + b"\x00\x00\x00")
            + m.message(m.BIND, portal + b"\x00" + name + b"\x00\x00\x00\x00\x01\x00\x00")
            + m.message(m.DESCRIBE, b"P" + portal + b"\x00") + m.message(m.EXECUTE, portal + b"\x00\x00\x00\x00\x00")
            + m.message(m.SYNC))


@in_loop
async def test_where_statements_are_renamed_an_unnamed_batch_is_relayed_with_its_parses_and_binds_counted() -> None:
    client, server = await linked()
    client.transport.relay(sockets.CLIENT_EDGE, PREPARED_CLIENT_TABLE)
    batch = extended(portal=b"p1")  # a named portal keeps its name: nothing to rewrite
    client.app.sendall(batch)
    assert await recv_exactly(server.app, len(batch)) == batch
    assert client.protocol.requests == [(len(batch), 1, 0, 0, 1, 1)]


@pytest.mark.parametrize("read", [extended(name=b"s1"),  # a named statement: pgmux renames it
                                  m.message(m.DESCRIBE, b"Ss1\x00") + m.message(m.SYNC),
                                  m.message(m.CLOSE, b"Ss1\x00") + m.message(m.SYNC),
                                  extended() + extended()],  # a second batch's Parse: numbered by Python
                         ids=["named", "describe_named", "close_named", "parse_in_second_batch"])
@in_loop
async def test_where_statements_are_renamed_what_names_one_goes_to_python(read: bytes) -> None:
    client, server = await linked()
    client.transport.relay(sockets.CLIENT_EDGE, PREPARED_CLIENT_TABLE)
    client.app.sendall(read)
    await settle(lambda: client.protocol.received)
    assert b"".join(client.protocol.received) == read
    assert client.protocol.requests == []
