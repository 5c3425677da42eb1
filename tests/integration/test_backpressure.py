"""Flow control: a slow reader pauses the server, a slow server pauses the client; pgmux never holds the flood."""

from __future__ import annotations

import hashlib
import struct
import threading
import time

import psutil
import psycopg

from pgusers import APP, APP_DATABASE
from proxy.protocol import messages as m
from test_admission import RawClient

MB = 1024 * 1024
_BACKEND_KINDS = frozenset(b"123ACDEGHINRSTVZcdnst")
# What pgmux may hold for one direction of one connection: a write buffer past its high-water mark
# plus one read. Far below the tens or hundreds of MB these tests push through.
BOUND = 16 * MB
# What pgmux may grow by while huge client messages stream through it: a few reads and write buffers
# per connection, and the allocator's slack. Holding the messages would take hundreds of MB.
STREAMED_BOUND = 64 * MB


def _linked_pair_state(proxy) -> dict[str, object]:
    """Flow-control state of the one client linked to a server, read on pgmux's loop."""

    def read(p) -> dict[str, object]:
        linked = [c for c in p.registry.clients if c.server is not None]
        assert len(linked) == 1, f"expected one client linked to a server mid-result, got {linked}"
        client = linked[0]
        server = client.server
        return {
            "server_reading": server.transport.is_reading(),
            "client_reading": client.transport.is_reading(),
            "to_client_buffered": client.transport.get_write_buffer_size(),
            "to_server_buffered": server.transport.get_write_buffer_size(),
        }

    return proxy.call(read)


def _wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:g}s: {what}")
        time.sleep(0.05)


def _drain(client: RawClient) -> tuple[int, int, list[int]]:
    """Read up to ReadyForQuery; return (DataRows, their bytes, kinds of the other messages)."""
    sock = client.sock
    buffer = bytearray(client.buffer)
    client.buffer = b""
    rows = row_bytes = 0
    others: list[int] = []
    pos = 0
    while True:
        while len(buffer) - pos >= 5:
            kind, length = struct.unpack_from("!BI", buffer, pos)
            assert kind in _BACKEND_KINDS and 4 <= length < 64 * MB, (
                f"corrupt stream after {rows} rows: type {kind!r}, length {length}")
            if len(buffer) - pos < 1 + length:
                break
            if kind == m.DATA_ROW:
                rows += 1
                row_bytes += length + 1
            else:
                others.append(kind)
            pos += 1 + length
            if kind == m.READY_FOR_QUERY:
                client.buffer = bytes(buffer[pos:])
                return rows, row_bytes, others
        del buffer[:pos]
        pos = 0
        chunk = sock.recv(4 * MB)
        if not chunk:
            raise ConnectionError("pgmux closed the connection mid-result")
        buffer += chunk


def test_slow_reader_of_a_huge_result_pauses_the_server_instead_of_buffering_it(pgmux) -> None:
    proxy = pgmux(default_pool_size=1, auth_type="trust")
    client = RawClient(proxy.host, proxy.port())
    client.sock.settimeout(60)
    rows, width = 20_000, 10_000  # ~200 MB of DataRows
    client.send(m.query(f"SELECT repeat('x', {width}) FROM generate_series(1, {rows})"))

    # The client reads nothing: pgmux must stop reading the server once the client's buffer is full.
    def server_paused() -> dict[str, object] | None:
        state = _linked_pair_state(proxy)
        return None if state["server_reading"] else state

    paused = _wait_for(server_paused, 15, "pgmux paused reading the server")
    time.sleep(1.0)  # and stays paused, holding a bounded amount, however long the client dawdles
    later = _linked_pair_state(proxy)
    assert not later["server_reading"]
    held = max(paused["to_client_buffered"], later["to_client_buffered"])
    print(f"\nslow reader: pgmux holds {later['to_client_buffered'] / MB:.2f} MB for the client "
          f"of a {rows * width / MB:.0f} MB result")
    assert held < BOUND, f"pgmux buffered {held / MB:.1f} MB for a client that reads nothing"

    # Reading resumes the server (below the low-water mark) and the whole result arrives intact.
    got_rows, got_bytes, others = _drain(client)
    assert got_rows == rows and got_bytes >= rows * width
    assert others == [m.ROW_DESCRIPTION, m.COMMAND_COMPLETE, m.READY_FOR_QUERY]

    def idle_server_reading(p) -> bool:
        (pool,) = p.router.pools.values()
        return len(pool.idle) == 1 and pool.idle[0].transport.is_reading()

    # Back in the pool the server is read again: a paused idle server would never notice its own death.
    _wait_for(lambda: proxy.call(idle_server_reading), 15, "the released server is read again")
    client.send(m.query("SELECT 1"))
    assert _drain(client)[0] == 1
    client.close()


def test_slow_server_during_copy_from_stdin_pauses_the_client_instead_of_buffering_it(pgmux, postgres) -> None:
    gate = 774411  # advisory lock key: while held elsewhere, every row of the COPY waits on it
    postgres.psql(
        "DROP TABLE IF EXISTS copy_gated; CREATE TABLE copy_gated (line text);\n"
        "CREATE OR REPLACE FUNCTION copy_gate() RETURNS trigger LANGUAGE plpgsql AS\n"
        f"  $$BEGIN PERFORM pg_advisory_xact_lock_shared({gate}); RETURN NEW; END$$;\n"
        "CREATE TRIGGER copy_gate BEFORE INSERT ON copy_gated FOR EACH ROW EXECUTE FUNCTION copy_gate();\n"
        f"ALTER TABLE copy_gated OWNER TO {APP.name};\n", database=APP_DATABASE)
    proxy = pgmux(default_pool_size=1, auth_type="trust")

    locker = psycopg.connect(postgres.dsn(database=APP_DATABASE), autocommit=True)
    locker.execute(f"SELECT pg_advisory_lock({gate})")
    released = False
    client = None
    try:
        client = RawClient(proxy.host, proxy.port())
        client.sock.settimeout(120)
        client.send(m.query("COPY copy_gated FROM STDIN"))
        kind, _ = client.read_message()
        assert kind == m.COPY_IN_RESPONSE

        row = b"y" * 8191 + b"\n"
        chunk = m.message(m.COPY_DATA, row * 128)  # 1 MB
        total_chunks = 128  # 128 MB if nothing pushed back
        sent = [0]

        def send_all() -> None:
            for _ in range(total_chunks):
                client.sock.sendall(chunk)
                sent[0] += len(chunk)

        sender = threading.Thread(target=send_all, daemon=True)
        sender.start()

        def stalled() -> dict[str, object] | None:
            before = sent[0]
            time.sleep(0.5)
            assert sender.is_alive(), (
                f"all {total_chunks} MB were accepted while the server read nothing: pgmux buffered them")
            if sent[0] != before:
                return None
            state = _linked_pair_state(proxy)
            return state if not state["client_reading"] else None

        # The backend blocks on its first row; pgmux must stop reading the client, so the sender stalls.
        state = _wait_for(stalled, 30, "pgmux paused reading the client and the sender stalled")
        print(f"\nslow COPY: sender stalled after {sent[0] / MB:.0f} MB of {total_chunks} MB; pgmux holds "
              f"{state['to_server_buffered'] / MB:.2f} MB for the server")
        assert sent[0] < total_chunks * len(chunk)
        assert state["to_server_buffered"] < BOUND, (
            f"pgmux buffered {state['to_server_buffered'] / MB:.1f} MB for a server that reads nothing")

        locker.execute(f"SELECT pg_advisory_unlock({gate})")
        released = True
        sender.join(120)
        assert not sender.is_alive(), "the COPY did not resume once the server read again"
        client.send(m.message(m.COPY_DONE))
        kinds = []
        while True:
            kind, body = client.read_message()
            kinds.append(kind)
            if kind == m.COMMAND_COMPLETE:
                assert body.rstrip(b"\x00") == f"COPY {total_chunks * 128}".encode()
            if kind == m.READY_FOR_QUERY:
                break
        assert kinds == [m.COMMAND_COMPLETE, m.READY_FOR_QUERY]
        client.close()
    finally:
        if client is not None:
            client.close()  # a COPY left open would hold its lock and block the DROP below
        if not released:
            locker.execute(f"SELECT pg_advisory_unlock({gate})")
        locker.close()
        postgres.psql("SET lock_timeout = '10s'; DROP TABLE IF EXISTS copy_gated; DROP FUNCTION IF EXISTS copy_gate()",
                      database=APP_DATABASE)


def test_answers_cut_across_reads_at_any_byte_reach_the_client_intact(pgmux) -> None:
    """Reads of the server end wherever the kernel cut them, often inside a 5-byte message header.

    A pipelined client makes the first read of the second answer go the careful way (a ReadyForQuery
    sits inside it) and the next ones the fast way; the bytes of a header cut between the two must
    reach the client exactly once.
    """
    proxy = pgmux(default_pool_size=1, auth_type="trust")
    client = RawClient(proxy.host, proxy.port())
    client.sock.settimeout(30)
    rows = 100_000  # zero-column DataRows are 7 bytes, 5 of them header: most cuts land in a header
    for attempt in range(10):
        # The first answer grows by a byte each time, so the cut lands on every offset within a row.
        client.send(m.query(f"SELECT repeat('x', {attempt}) FROM pg_sleep(0.1)")
                    + m.query(f"SELECT FROM generate_series(1, {rows})"))
        time.sleep(0.05)
        # pgmux busy while both answers pile up: its next read holds the first one's ReadyForQuery
        # and the start of the second, and ends at an arbitrary byte.
        proxy.call(lambda p: time.sleep(0.3))
        first = _drain(client)
        second = _drain(client)
        assert first[0] == 1 and second[0] == rows, f"attempt {attempt}: got {first[0]} and {second[0]} rows"
        assert second[2] == [m.ROW_DESCRIPTION, m.COMMAND_COMPLETE, m.READY_FOR_QUERY], second[2]
    client.close()


class _PeakRss:
    """The peak resident memory of a process, sampled from a thread while a test pushes bytes through it."""

    def __init__(self, pid: int) -> None:
        self._process = psutil.Process(pid)
        self.baseline = self._process.memory_info().rss
        self.peak = self.baseline
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, self._process.memory_info().rss)

    def growth(self) -> int:
        """Stop sampling; return how far above the baseline the process went."""
        self._stop.set()
        self._thread.join(5)
        self.peak = max(self.peak, self._process.memory_info().rss)
        return self.peak - self.baseline


def test_unfinished_huge_queries_stream_to_the_server_instead_of_piling_up_in_pgmux(pgmux_process) -> None:
    # Three clients each send most of a 100 MB simple Query and then say nothing more. pgmux used to
    # assemble each whole (twice its size, growing) and hold it as long as the client liked.
    proxy = pgmux_process(PGMUX_AUTH_TYPE="trust")
    port = proxy.ports()[0]
    clients = [RawClient("127.0.0.1", port) for _ in range(3)]
    size = 100 * MB
    text = b"SELECT length('" + b"x" * (size - 20) + b"')\x00"
    query = m.message(m.QUERY, text)
    memory = _PeakRss(proxy.process.pid)
    for client in clients:
        client.sock.settimeout(60)
        client.send(query[:-4096])  # all but the end: the message stays unfinished
    time.sleep(1.0)  # whatever the kernel still buffered reaches pgmux
    growth = memory.growth()
    print(f"\n3 unfinished {size / MB:.0f} MB Queries: pgmux RSS grew by {growth / MB:.1f} MB")
    assert growth < STREAMED_BOUND, f"pgmux held {growth / MB:.0f} MB of three unfinished Queries"
    # Finished, the Queries run whole on the server: the streamed bytes arrived intact.
    for client in clients:
        client.send(query[-4096:])
    for client in clients:
        kinds = client.read_until_ready()
        assert m.ERROR_RESPONSE not in kinds and m.DATA_ROW in kinds
        client.close()


def test_huge_bind_of_a_named_statement_streams_through_with_its_name_rewritten(pgmux_process) -> None:
    # Transaction mode renames prepared statements, so pgmux looks at every Bind: it used to hold a
    # whole Bind (a 2 x 200 MB bytea Bind took 883 MB). Now only the names at its start are held.
    proxy = pgmux_process()
    dsn = f"postgresql://{APP.name}:{APP.password}@127.0.0.1:{proxy.ports()[0]}/{APP_DATABASE}"
    size = 50 * MB
    first = bytes(range(256)) * (size // 256)
    second = b"\xff" + first[1:]
    with psycopg.connect(dsn, autocommit=True) as conn:
        statement = "SELECT length(%s::bytea), md5(%s::bytea), length(%s::bytea), md5(%s::bytea)"
        memory = _PeakRss(proxy.process.pid)
        row = conn.execute(statement, [first, first, second, second], prepare=True).fetchone()
        growth = memory.growth()
        print(f"\nBind of 4 x {size / MB:.0f} MB bytea: pgmux peak RSS growth {growth / MB:.1f} MB")
        # Every byte arrived, in order, behind the renamed statement name.
        assert row == (size, hashlib.md5(first).hexdigest(), size, hashlib.md5(second).hexdigest())
        assert growth < STREAMED_BOUND, f"pgmux held {growth / MB:.0f} MB of a {4 * size / MB:.0f} MB Bind"
        # A small Bind of the same named statement is renamed the same way.
        assert conn.execute(statement, [b"a", b"a", b"bc", b"bc"], prepare=True).fetchone()[::2] == (1, 2)
