"""Wire-protocol features through pgmux: version negotiation, startup options, FunctionCall, notices, LISTEN."""

from __future__ import annotations

import asyncio
import select
import struct
import time

import asyncpg
import psycopg
import pytest

from pgusers import APP, APP_DATABASE
from proxy.protocol import messages as m
from proxy.protocol.startup import PROTOCOL_3_0
from test_admission import RawClient


def _raw_startup(params: dict[str, str], minor: int = 0) -> bytes:
    body = b"".join(k.encode() + b"\x00" + v.encode() + b"\x00" for k, v in params.items()) + b"\x00"
    return struct.pack("!ii", len(body) + 8, PROTOCOL_3_0 | minor) + body


def test_protocol_3_2_client_is_answered_with_negotiate_protocol_version(pgmux) -> None:
    proxy = pgmux(auth_type="trust")
    client = RawClient.__new__(RawClient)
    import socket
    client.sock = socket.create_connection((proxy.host, proxy.port()), timeout=10)
    client.buffer = b""
    client.send(_raw_startup({"user": APP.name, "database": APP_DATABASE, "_pq_.fancy": "on"}, minor=2))
    kind, body = client.read_message()
    assert kind == m.NEGOTIATE_PROTOCOL_VERSION
    newest_minor, count = struct.unpack_from("!ii", body, 0)
    assert (newest_minor, count) == (0, 1) and b"_pq_.fancy" in body
    assert client.read_until_ready()[-1] == m.READY_FOR_QUERY
    client.close()


def test_startup_options_and_extra_float_digits_apply_to_the_session(pgmux) -> None:
    proxy = pgmux(default_pool_size=1)

    async def scenario() -> None:
        conn = await asyncpg.connect(host=proxy.host, port=proxy.port(), user=APP.name, password=APP.password,
                                     database=APP_DATABASE, statement_cache_size=0,
                                     server_settings={"options": "-c statement_timeout=1234 -c work_mem=5MB",
                                                      "extra_float_digits": "2"})
        plain = await asyncpg.connect(host=proxy.host, port=proxy.port(), user=APP.name, password=APP.password,
                                      database=APP_DATABASE, statement_cache_size=0)
        for _ in range(3):  # alternate on the one shared backend: each sees its own values
            assert await conn.fetchval("SHOW statement_timeout") == "1234ms"
            assert await conn.fetchval("SHOW work_mem") == "5MB"
            assert await conn.fetchval("SHOW extra_float_digits") == "2"
            assert await plain.fetchval("SHOW statement_timeout") == "0"
            assert await plain.fetchval("SHOW extra_float_digits") == "1"
        await conn.close()
        await plain.close()

    asyncio.run(scenario())


def test_replication_connections_are_refused_with_08p01(pgmux) -> None:
    proxy = pgmux()

    async def scenario() -> None:
        with pytest.raises(asyncpg.ProtocolViolationError, match="replication"):
            await asyncpg.connect(host=proxy.host, port=proxy.port(), user=APP.name, password=APP.password,
                                  database=APP_DATABASE, server_settings={"replication": "database"})

    asyncio.run(scenario())


def test_function_call_message_is_relayed(pgmux) -> None:
    proxy = pgmux(auth_type="trust")
    client = RawClient(proxy.host, proxy.port())
    pg_backend_pid_oid = 2026
    body = struct.pack("!ihhhh", pg_backend_pid_oid, 0, 0, 0, 0)[:-2] + struct.pack("!h", 0)
    body = struct.pack("!i", pg_backend_pid_oid) + struct.pack("!h", 0) + struct.pack("!h", 0) + struct.pack("!h", 0)
    client.send(m.message(m.FUNCTION_CALL, body))
    kind, payload = client.read_message()
    assert kind == m.FUNCTION_CALL_RESPONSE
    (length,) = struct.unpack_from("!i", payload, 0)
    assert int(payload[4:4 + length]) > 0  # a backend pid, as text
    assert client.read_until_ready() == [m.READY_FOR_QUERY]
    client.close()


def test_notices_and_notifications_reach_the_client(pgmux) -> None:
    proxy = pgmux(listeners=[{"address": "127.0.0.1:0", "pool_mode": "session"}])

    async def scenario() -> None:
        conn = await asyncpg.connect(host=proxy.host, port=proxy.port(1), user=APP.name, password=APP.password,
                                     database=APP_DATABASE, statement_cache_size=0)
        notices: list[str] = []
        conn.add_log_listener(lambda _conn, message: notices.append(message.message))
        await conn.execute("DO $$ BEGIN RAISE NOTICE 'hello from postgres'; END $$")
        received: asyncio.Queue[str] = asyncio.Queue()
        await conn.add_listener("pgmux_channel", lambda *args: received.put_nowait(args[3]))
        other = await asyncpg.connect(host=proxy.host, port=proxy.port(), user=APP.name, password=APP.password,
                                      database=APP_DATABASE, statement_cache_size=0)
        await other.execute("NOTIFY pgmux_channel, 'ping'")
        assert await asyncio.wait_for(received.get(), 5) == "ping"
        await asyncio.sleep(0.1)
        assert notices == ["hello from postgres"]
        await conn.close()
        await other.close()

    asyncio.run(scenario())


# ---- when a backend is free again: Flush, and COPY IN begun by Execute ------------------------------


def _server_connects(proxy) -> int:
    return proxy.call(lambda p: sum(pool.stats.server_connects for pool in p.router.pools.values()))


def _read_until(client: RawClient, kind: int) -> list[int]:
    kinds: list[int] = []
    while not kinds or kinds[-1] != kind:
        kinds.append(client.read_message()[0])
        assert kinds[-1] != m.ERROR_RESPONSE or kind == m.READY_FOR_QUERY, kinds
    return kinds


def _answered_at_once(client: RawClient, sql: str, within: float = 1.0) -> list[bytes]:
    """Run ``sql``; it must be answered without an error well within the pool's query_wait_timeout."""
    started = time.monotonic()
    client.send(m.query(sql))
    values: list[bytes] = []
    while True:
        kind, body = client.read_message()
        assert kind != m.ERROR_RESPONSE, body
        if kind == m.DATA_ROW:
            values.append(body[6:])  # one column: int16 count, int32 length, the text
        if kind == m.READY_FOR_QUERY:
            break
    assert time.monotonic() - started < within, f"{sql!r} waited {time.monotonic() - started:.1f}s for a backend"
    return values


def _unnamed_extended(sql: str, ending: int) -> bytes:
    """What libpq's PQsendQueryParams sends: Parse, Bind, Describe (portal), Execute, then Sync or Flush."""
    return (m.message(m.PARSE, m.cstring("") + m.cstring(sql) + b"\x00\x00")
            + m.message(m.BIND, b"\x00\x00" + b"\x00\x00" * 3)
            + m.message(m.DESCRIBE, b"P\x00")
            + m.message(m.EXECUTE, b"\x00" + b"\x00\x00\x00\x00")
            + m.message(ending))


@pytest.mark.parametrize("after_execute", [m.SYNC, m.FLUSH], ids=["sync", "flush"])
@pytest.mark.parametrize("copy_end", [m.COPY_DONE, m.COPY_FAIL], ids=["copy_done", "copy_fail"])
@pytest.mark.parametrize("max_prepared_statements", [0, 200], ids=["plain", "named_statements"])
def test_extended_protocol_copy_in_hands_its_backend_back_when_it_ends(
        pgmux, postgres, after_execute: int, copy_end: int, max_prepared_statements: int) -> None:
    """PostgreSQL ignores the Sync libpq sends behind the Execute of a COPY FROM STDIN: one answer, not two."""
    postgres.psql(f"DROP TABLE IF EXISTS copy_extended; CREATE TABLE copy_extended (n int); "
                  f"ALTER TABLE copy_extended OWNER TO {APP.name}", database=APP_DATABASE)
    proxy = pgmux(auth_type="trust", default_pool_size=1, query_wait_timeout=3,
                  max_prepared_statements=max_prepared_statements)
    first = RawClient(proxy.host, proxy.port())
    first.send(_unnamed_extended("COPY copy_extended FROM STDIN", after_execute))
    assert _read_until(first, m.COPY_IN_RESPONSE) == [m.PARSE_COMPLETE, m.BIND_COMPLETE, m.NO_DATA,
                                                      m.COPY_IN_RESPONSE]
    first.send(m.message(m.COPY_DATA, b"1\n2\n") + m.message(m.COPY_DATA, b"3\n"))
    # libpq's PQputCopyEnd: CopyDone (or CopyFail) and, for a COPY begun by Execute, a Sync.
    first.send(m.message(copy_end, b"" if copy_end == m.COPY_DONE else m.cstring("client gave up"))
               + m.message(m.SYNC))
    assert first.read_until_ready() == (
        [m.COMMAND_COMPLETE, m.READY_FOR_QUERY] if copy_end == m.COPY_DONE else [m.ERROR_RESPONSE, m.READY_FOR_QUERY])
    rows = b"3" if copy_end == m.COPY_DONE else b"0"
    second = RawClient(proxy.host, proxy.port())
    try:
        # The only backend is free at once: the first client sits idle between transactions.
        assert _answered_at_once(second, "SELECT count(*) FROM copy_extended") == [rows]
        assert _answered_at_once(first, "SELECT count(*) FROM copy_extended") == [rows]
        first.close()
        time.sleep(0.2)  # pgmux notices the disconnect
        assert _answered_at_once(second, "SELECT 1") == [b"1"]
        assert _server_connects(proxy) == 1  # the backend was never closed
    finally:
        second.close()
        postgres.psql("DROP TABLE IF EXISTS copy_extended", database=APP_DATABASE)


def test_libpq_copy_from_stdin_by_either_protocol_leaves_the_backend_free(pgmux_process, postgres) -> None:
    postgres.psql(f"DROP TABLE IF EXISTS copy_libpq; CREATE TABLE copy_libpq (n int); "
                  f"ALTER TABLE copy_libpq OWNER TO {APP.name}", database=APP_DATABASE)
    # libpq's blocking calls (pgconn.get_result) hold the GIL, which an in-process pgmux needs.
    port = pgmux_process(PGMUX_DEFAULT_POOL_SIZE="1", PGMUX_QUERY_WAIT_TIMEOUT="3").ports()[0]
    dsn = f"postgresql://{APP.name}:{APP.password}@127.0.0.1:{port}/{APP_DATABASE}"

    def served_at_once(conn: psycopg.Connection) -> tuple[int, int]:
        started = time.monotonic()
        row = conn.execute("SELECT count(*), pg_backend_pid() FROM copy_libpq").fetchone()
        assert time.monotonic() - started < 1.0, f"waited {time.monotonic() - started:.1f}s for the backend"
        return row

    try:
        with psycopg.connect(dsn, autocommit=True) as first, psycopg.connect(dsn, autocommit=True) as second:
            pid = first.execute("SELECT pg_backend_pid()").fetchone()[0]
            pgconn = first.pgconn
            pgconn.send_query_params(b"COPY copy_libpq FROM STDIN", None)  # Parse/Bind/Describe/Execute/Sync
            assert pgconn.get_result().status == psycopg.pq.ExecStatus.COPY_IN
            assert pgconn.put_copy_data(b"1\n2\n") == 1
            assert pgconn.put_copy_end() == 1  # CopyDone, then a second Sync
            assert pgconn.get_result().status == psycopg.pq.ExecStatus.COMMAND_OK
            assert pgconn.get_result() is None
            assert served_at_once(second) == (2, pid)
            with first.cursor() as cur, cur.copy("COPY copy_libpq FROM STDIN") as copy:  # a simple Query, as psql's \copy
                copy.write_row((3,))
            assert served_at_once(second) == (3, pid)
            assert served_at_once(first) == (3, pid)
        with psycopg.connect(dsn, autocommit=True) as third:
            assert served_at_once(third) == (3, pid)  # the same backend: none was closed at disconnect
    finally:
        postgres.psql("DROP TABLE IF EXISTS copy_libpq", database=APP_DATABASE)


def test_flush_between_requests_takes_no_backend(pgmux) -> None:
    """psycopg may send its pipeline's closing Flush after the last ReadyForQuery came back."""
    proxy = pgmux(auth_type="trust", default_pool_size=1, query_wait_timeout=3)
    first = RawClient(proxy.host, proxy.port())
    second = RawClient(proxy.host, proxy.port())
    try:
        assert _answered_at_once(first, "SELECT 1") == [b"1"]
        first.send(m.message(m.FLUSH))
        time.sleep(0.2)  # pgmux reads it while first holds no backend
        assert _answered_at_once(second, "SELECT 2") == [b"2"]
        assert _answered_at_once(first, "SELECT 3") == [b"3"]
    finally:
        first.close()
        second.close()


def test_flush_without_sync_keeps_the_backend_until_the_sync(pgmux) -> None:
    """asyncpg prepares with Parse/Describe/Flush and waits: that backend is mid-request, not free."""
    proxy = pgmux(auth_type="trust", default_pool_size=1, query_wait_timeout=5)
    first = RawClient(proxy.host, proxy.port())
    second = RawClient(proxy.host, proxy.port())
    try:
        first.send(m.message(m.PARSE, m.cstring("") + m.cstring("SELECT 42") + b"\x00\x00")
                   + m.message(m.DESCRIBE, b"S\x00") + m.message(m.FLUSH))
        assert _read_until(first, m.ROW_DESCRIPTION) == [m.PARSE_COMPLETE, m.PARAMETER_DESCRIPTION,
                                                         m.ROW_DESCRIPTION]
        second.send(m.query("SELECT 2"))
        readable, _, _ = select.select([second.sock], [], [], 0.5)
        assert not readable, "the second client was given a backend in the middle of the first one's request"
        first.send(m.message(m.BIND, b"\x00\x00" + b"\x00\x00" * 3)
                   + m.message(m.EXECUTE, b"\x00" + b"\x00\x00\x00\x00") + m.message(m.SYNC))
        assert first.read_until_ready() == [m.BIND_COMPLETE, m.DATA_ROW, m.COMMAND_COMPLETE, m.READY_FOR_QUERY]
        assert second.read_until_ready() == [m.ROW_DESCRIPTION, m.DATA_ROW, m.COMMAND_COMPLETE, m.READY_FOR_QUERY]
    finally:
        first.close()
        second.close()
