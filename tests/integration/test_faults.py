"""Faults: backends killed mid-query, PostgreSQL restarted under load, clients that vanish mid-transaction/COPY/result."""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import asyncpg
import psycopg
import pytest

from pgusers import APP, APP_DATABASE
from proxy.embedded import start_embedded_postgres
from proxy.pool import SERVER_CLOSE_DEADLINE
from proxy.protocol import messages as m
from test_admission import RawClient

# What a client may see when the backend serving it dies: PostgreSQL's own FATAL (relayed) or pgmux's;
# asyncpg reports either as 08003 (ConnectionDoesNotExistError) with the server's text when the socket closes.
BACKEND_DIED = {"57P01", "08006", "08003"}
# asyncpg runs a query with arguments as two round trips (Parse/Describe/Flush, then Bind/Execute/Sync).
# A FATAL the dying backend sends between them reaches asyncpg while it is idle, as it would from
# PostgreSQL directly: asyncpg cannot file it, and its next call fails with InternalClientError before
# it has seen the socket close. That is the same death of the backend, reported without a SQLSTATE.
FATAL_BETWEEN_ROUND_TRIPS = "InternalClientError"


async def _connect(proxy, user: str = APP.name, password: str = APP.password, database: str = APP_DATABASE,
                   **kwargs) -> asyncpg.Connection:
    kwargs.setdefault("statement_cache_size", 0)
    return await asyncpg.connect(host=proxy.host, port=proxy.port(), user=user, password=password,
                                 database=database, **kwargs)


def _sqlstate(exc: BaseException) -> str:
    return getattr(exc, "sqlstate", None) or type(exc).__name__


async def _wait_closed(conn: asyncpg.Connection, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not conn.is_closed():
        assert time.monotonic() < deadline, "asyncpg failed internally on a connection that stayed open"
        await asyncio.sleep(0.01)


def _wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:g}s: {what}")
        time.sleep(0.05)


# ---- a server killed mid-query: that client gets an error, nobody else notices ------------------------


def test_server_killed_mid_query_fails_only_its_client_while_clients_on_other_backends_carry_on(
        pgmux, postgres) -> None:
    # 1 victim + 3 clients inside long transactions + 2 autocommit loopers = 6 backends at most.
    proxy = pgmux(default_pool_size=6, query_wait_timeout=10)

    async def in_transaction(conn: asyncpg.Connection, killed: asyncio.Event) -> tuple[int, int, int]:
        """Holds one backend in a transaction across the kill; every statement must still succeed on it."""
        async with conn.transaction():
            pid = await conn.fetchval("SELECT pg_backend_pid()")
            before = after = 0
            while not killed.is_set() or after < 10:
                assert await conn.fetchval("SELECT pg_backend_pid() FROM pg_sleep(0.01)") == pid
                if killed.is_set():
                    after += 1
                else:
                    before += 1
        return pid, before, after

    async def autocommit(conn: asyncpg.Connection, killed: asyncio.Event) -> tuple[int, int]:
        """Short transactions on whatever backend the pool lends; none may fail."""
        before = after = 0
        while not killed.is_set() or after < 20:
            assert await conn.fetchval("SELECT $1::int + 1", before + after) == before + after + 1
            if killed.is_set():
                after += 1
            else:
                before += 1
        return before, after

    async def scenario() -> None:
        victim = await _connect(proxy)
        holders = [await _connect(proxy) for _ in range(3)]
        loopers = [await _connect(proxy) for _ in range(2)]
        killed = asyncio.Event()

        await victim.execute("BEGIN")
        victim_pid = await victim.fetchval("SELECT pg_backend_pid()")
        running = asyncio.ensure_future(victim.execute("SELECT pg_sleep(30)"))
        others = [asyncio.ensure_future(in_transaction(c, killed)) for c in holders]
        others += [asyncio.ensure_future(autocommit(c, killed)) for c in loopers]
        await asyncio.sleep(0.3)  # everyone is busy on its backend
        assert not any(task.done() for task in others)

        await asyncio.to_thread(postgres.psql, f"SELECT pg_terminate_backend({victim_pid})")
        killed.set()
        with pytest.raises((asyncpg.PostgresError, asyncpg.InterfaceError, OSError)) as info:
            await asyncio.wait_for(running, 10)
        assert _sqlstate(info.value) in BACKEND_DIED, info.value

        results = await asyncio.wait_for(asyncio.gather(*others), 20)  # any failure re-raises here
        holder_pids = {pid for pid, _, _ in results[:3]}
        assert len(holder_pids) == 3 and victim_pid not in holder_pids
        for _, before, after in results[:3]:
            assert before > 0 and after >= 10  # their transactions spanned the kill and committed
        for before, after in results[3:]:
            assert before > 0 and after >= 20
        for conn in [*holders, *loopers]:
            assert await conn.fetchval("SELECT 1") == 1
            await conn.close()
        victim.terminate()

        fresh = await _connect(proxy)  # the pool replaced the dead backend
        assert await fresh.fetchval("SELECT pg_backend_pid()") != victim_pid
        await fresh.close()

    asyncio.run(scenario())
    assert proxy.call(lambda p: max(pool.total for pool in p.router.pools.values())) <= 6


def _messages_until_ready(client: RawClient) -> list[str]:
    """Kinds of the messages up to ReadyForQuery (an ErrorResponse shown with its SQLSTATE), or up to a close."""
    seen = []
    while True:
        try:
            kind, body = client.read_message()
        except (ConnectionError, OSError):
            return [*seen, "<closed>"]
        if kind == m.ERROR_RESPONSE:
            fields = dict((chunk[:1], chunk[1:]) for chunk in body.split(b"\x00") if chunk)
            seen.append(f"E {fields.get(b'C', b'?').decode()}")
        else:
            seen.append(chr(kind))
        if kind == m.READY_FOR_QUERY:
            return seen


def test_backend_dying_right_after_its_answer_is_dropped_without_touching_any_client(pgmux) -> None:
    """The answer and the backend's own FATAL arrive in one read: the FATAL must go to nobody.

    Client A gets its answer and nothing else; client B, waiting in line for the only server, must
    not be handed the dying one: it is served by a fresh backend.
    """
    proxy = pgmux(default_pool_size=1, auth_type="trust", query_wait_timeout=10)
    a = RawClient(proxy.host, proxy.port())
    b = RawClient(proxy.host, proxy.port())
    # The backend answers after 0.2 s, then ends its own session 50 ms later (FATAL 57P05).
    a.send(m.query("SET idle_session_timeout = '50ms'; SELECT pg_sleep(0.2)"))
    time.sleep(0.05)
    b.send(m.query("SELECT 2"))  # in line for the only server
    time.sleep(0.05)
    proxy.call(lambda p: time.sleep(0.6))  # pgmux busy meanwhile: answer and FATAL land in one read
    assert _messages_until_ready(a) == ["C", "T", "D", "C", "Z"]
    assert _messages_until_ready(b) == ["T", "D", "C", "Z"], "B was handed the dying backend"
    a.send(m.query("SELECT 1"))
    assert _messages_until_ready(a) == ["T", "D", "C", "Z"], "A got the FATAL of a backend it had released"
    a.close()
    b.close()


# ---- PostgreSQL restarted under load ------------------------------------------------------------------


def _port_refuses(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=0.5).close()
    except ConnectionRefusedError:
        return True
    except OSError:
        return False
    return False


def test_postgres_restart_under_load_serves_waiting_clients_once_it_is_back(pgmux) -> None:
    """Clients that ask while PostgreSQL is down wait in line and are served when it is back.

    Only queries that were running on a backend when the postmaster went down may fail (57P01 or
    08006: their transaction is gone). Everyone in line, including clients that log in during the
    outage, gets an answer from the new postmaster within query_wait_timeout.
    """
    wait_timeout = 15.0
    down_for = 1.5
    with start_embedded_postgres() as server:
        # server_login_retry is how long clients keep waiting through an outage; the default 15 s covers a restart.
        proxy = pgmux(upstream_url=server.dsn(sslmode="disable"), default_pool_size=4,
                      query_wait_timeout=wait_timeout, server_login_retry=5, server_connect_timeout=2)
        login = {"user": server.superuser, "password": server.password, "database": "postgres"}

        async def worker(index: int, stop: asyncio.Event, log: list[tuple[float, str]]) -> None:
            """Load: back-to-back short queries; reconnects when its connection is closed under it."""
            conn = await _connect(proxy, **login)
            while not stop.is_set():
                try:
                    assert await conn.fetchval("SELECT $1::int FROM pg_sleep(0.02)", index) == index
                    log.append((time.monotonic(), "ok"))
                except asyncpg.exceptions._base.InternalClientError:
                    # Only a connection that pgmux then closes may fail this way (see above).
                    await _wait_closed(conn)
                    log.append((time.monotonic(), FATAL_BETWEEN_ROUND_TRIPS))
                    conn = await _connect(proxy, **login)
                except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
                    log.append((time.monotonic(), _sqlstate(exc)))
                    if conn.is_closed() or _sqlstate(exc) in BACKEND_DIED:
                        # A FATAL comes just before the socket closes: reconnect without waiting for
                        # asyncpg to see the close.
                        conn.terminate()
                        conn = await _connect(proxy, **login)
            await conn.close()

        async def ask_while_down(conn: asyncpg.Connection | None, value: int) -> tuple[float, float, int]:
            sent = time.monotonic()
            if conn is None:  # a client that logs in during the outage
                conn = await _connect(proxy, **login)
            try:
                got = await asyncio.wait_for(conn.fetchval("SELECT $1::int", value), wait_timeout + 5)
            finally:
                await conn.close()
            return sent, time.monotonic(), got

        async def scenario() -> None:
            stop = asyncio.Event()
            logs: list[list[tuple[float, str]]] = [[] for _ in range(8)]
            workers = [asyncio.ensure_future(worker(i, stop, logs[i])) for i in range(8)]
            idle = [await _connect(proxy, **login) for _ in range(6)]  # logged in before, idle during the restart
            await asyncio.sleep(0.5)
            assert all(log and log[-1][1] == "ok" for log in logs), "load is running before the restart"

            restart = asyncio.ensure_future(asyncio.to_thread(server.restart, down_for=down_for))
            deadline = time.monotonic() + 10
            while not await asyncio.to_thread(_port_refuses, server.host, server.port):
                assert time.monotonic() < deadline, "the postmaster did not go down"
            down_at = time.monotonic()
            asks = [asyncio.ensure_future(ask_while_down(conn, i)) for i, conn in enumerate(idle)]
            asks += [asyncio.ensure_future(ask_while_down(None, 100 + i)) for i in range(2)]
            await restart
            up_at = time.monotonic()
            assert up_at - down_at >= down_for * 0.5

            outcomes = await asyncio.gather(*asks, return_exceptions=True)
            failed = [o for o in outcomes if isinstance(o, BaseException)]
            assert not failed, (
                f"{len(failed)} of {len(outcomes)} clients that asked while PostgreSQL was down for {down_for}s "
                f"were refused instead of served within query_wait_timeout={wait_timeout:g}s: "
                f"{sorted({f'{_sqlstate(f)}: {f}' for f in failed})}")
            for (sent, answered, got), expected in zip(outcomes, [*range(6), 100, 101]):
                assert got == expected
                assert answered >= up_at - 0.2  # served by the new postmaster...
                assert answered - sent < wait_timeout  # ...within their wait timeout

            await asyncio.sleep(1.0)  # load keeps running on the new postmaster
            stop.set()
            await asyncio.wait_for(asyncio.gather(*workers), 20)
            for log in logs:
                after = [outcome for at, outcome in log if at > up_at + 0.5]
                assert after and set(after) == {"ok"}, f"a worker is not served after the restart: {log[-5:]}"
                during = {outcome for _, outcome in log} - {"ok"}
                # Only a query running on a backend when it died may fail, with 57P01 or 08006.
                assert during <= BACKEND_DIED | {FATAL_BETWEEN_ROUND_TRIPS}, during

        asyncio.run(scenario())
        assert proxy.call(lambda p: max(pool.total for pool in p.router.pools.values())) <= 4


def test_a_login_retry_timer_that_fires_early_still_ends_the_backoff(pgmux) -> None:
    """uvloop's millisecond timers can run a callback just before time.monotonic() reaches its due time.

    The login-retry timer must end the backoff itself: had it only re-checked the clock, clients in
    line behind a failed login would wait out query_wait_timeout although PostgreSQL was back (the
    restart test above failed that way in about 2 of 5 runs on uvloop).
    """
    proxy = pgmux(default_pool_size=2, query_wait_timeout=20)

    def the_pool(p):
        return next(iter(p.router.pools.values()))

    def as_if_a_login_had_just_failed(p) -> float:
        pool = the_pool(p)
        for server in list(pool.idle):
            pool.close_server(server, "test: no backend left")
        pool._retry_at = time.monotonic() + 60  # a backoff the clock says is far from over
        return pool._retry_at

    async def scenario() -> None:
        first = await _connect(proxy)
        assert await first.fetchval("SELECT 1") == 1  # the pool has worked, so clients wait through a failure
        await first.close()
        retry_at = proxy.call(as_if_a_login_had_just_failed)

        waiting = await _connect(proxy)
        query = asyncio.ensure_future(waiting.fetchval("SELECT 2"))
        await asyncio.sleep(0.3)
        assert not query.done(), "served while the pool was backing off"
        proxy.call(lambda p: the_pool(p)._backoff_over(retry_at))  # the retry timer, firing early
        assert await asyncio.wait_for(query, 5) == 2
        await waiting.close()

    asyncio.run(scenario())


def test_outage_longer_than_server_login_retry_fails_clients_fast_with_08006_and_recovers_when_postgres_is_back(
        pgmux) -> None:
    """Past server_login_retry a waiting client gets 08006 (without the upstream's address), long before query_wait_timeout.

    The refusal is an ERROR, so the session stays usable; once PostgreSQL is back the next query is
    served (not refused because logins failed earlier).
    """
    down_for = 3.0
    with start_embedded_postgres() as server:
        proxy = pgmux(upstream_url=server.dsn(sslmode="disable"), default_pool_size=2,
                      query_wait_timeout=30, server_login_retry=0.5, server_connect_timeout=2)

        async def scenario() -> None:
            conn = await _connect(proxy, user=server.superuser, password=server.password, database="postgres")
            assert await conn.fetchval("SELECT 1") == 1
            restart = asyncio.ensure_future(asyncio.to_thread(server.restart, down_for=down_for))
            deadline = time.monotonic() + 10
            while not await asyncio.to_thread(_port_refuses, server.host, server.port):
                assert time.monotonic() < deadline, "the postmaster did not go down"
            asked = time.monotonic()
            with pytest.raises(asyncpg.PostgresError) as info:
                await asyncio.wait_for(conn.fetchval("SELECT 2"), 10)
            assert time.monotonic() - asked < down_for  # told during the outage, not at query_wait_timeout=30s
            assert info.value.sqlstate == "08006"
            assert str(server.port) not in str(info.value) and server.password not in str(info.value)
            await restart
            await asyncio.sleep(1.0)  # PostgreSQL is back and pgmux's login backoff (<= 0.5 s) has passed
            assert await asyncio.wait_for(conn.fetchval("SELECT 3"), 10) == 3
            await conn.close()

        asyncio.run(scenario())


# ---- a client that vanishes leaves no lock, no open transaction and no dirty server ---------------------


def _simple_query(client: RawClient, sql: str) -> tuple[list[list[bytes | None]], int]:
    """Run one simple Query; return its rows and the ReadyForQuery status byte. Fails on an ErrorResponse."""
    client.send(m.query(sql))
    rows: list[list[bytes | None]] = []
    while True:
        kind, body = client.read_message()
        if kind == m.ERROR_RESPONSE:
            raise AssertionError(f"{sql!r} failed: {body!r}")
        if kind == m.DATA_ROW:
            rows.append(_data_row(body))
        if kind == m.READY_FOR_QUERY:
            return rows, body[0]


def _data_row(body: bytes) -> list[bytes | None]:
    (count,) = struct.unpack_from("!h", body, 0)
    pos, values = 2, []
    for _ in range(count):
        (length,) = struct.unpack_from("!i", body, pos)
        pos += 4
        if length < 0:
            values.append(None)
        else:
            values.append(body[pos:pos + length])
            pos += length
    return values


def _read_until(client: RawClient, kind: int, at_least: int = 1) -> None:
    seen = 0
    while seen < at_least:
        got, body = client.read_message()
        assert got != m.ERROR_RESPONSE, body
        if got == kind:
            seen += 1


def _vanish(client: RawClient) -> None:
    """Disappear without a Terminate: RST, as when the app process is killed or the network drops."""
    client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.sock.close()


def _lock_and_mark(client: RawClient, table: str) -> int:
    """Open a transaction that holds an exclusive lock and a dirty row; return the backend pid."""
    rows, status = _simple_query(
        client, f"BEGIN; SET LOCAL statement_timeout = 12345; LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE; "
                f"INSERT INTO {table} VALUES (2, 'dirty'); SELECT pg_backend_pid()")
    assert status == m.TransactionStatus.IN_TRANSACTION.value
    return int(rows[0][0])


def _vanish_in_transaction(client: RawClient, table: str) -> int:
    return _lock_and_mark(client, table)


def _vanish_mid_copy_in(client: RawClient, table: str) -> int:
    pid = _lock_and_mark(client, table)
    client.send(m.query(f"COPY {table} FROM STDIN"))
    _read_until(client, m.COPY_IN_RESPONSE)
    client.send(b"".join(m.message(m.COPY_DATA, f"{i}\tcopied\n".encode()) for i in range(10, 2010)))
    time.sleep(0.2)  # the rows reached the backend; no CopyDone ever comes
    return pid


def _vanish_mid_result(client: RawClient, table: str) -> int:
    pid = _lock_and_mark(client, table)
    # 1 GB if anyone read it all: the backend is still producing it when the client disappears.
    client.send(m.query("SELECT repeat('x', 10000) FROM generate_series(1, 100000)"))
    _read_until(client, m.DATA_ROW, at_least=50)
    return pid


def _vanish_mid_copy_out(client: RawClient, table: str) -> int:
    pid = _lock_and_mark(client, table)
    client.send(m.query("COPY (SELECT repeat('x', 10000) FROM generate_series(1, 100000)) TO STDOUT"))
    _read_until(client, m.COPY_DATA, at_least=50)
    return pid


def _unsynced(sql: str) -> bytes:
    """Parse/Bind/Execute of one statement, without the Sync that would end its implicit transaction."""
    parse = m.message(m.PARSE, b"\x00" + sql.encode() + b"\x00" + b"\x00\x00")
    bind = m.message(m.BIND, b"\x00\x00" + b"\x00\x00" + b"\x00\x00" + b"\x00\x00")
    return parse + bind + m.message(m.EXECUTE, b"\x00" + b"\x00\x00\x00\x00")


def _vanish_mid_extended_batch(client: RawClient, table: str) -> int:
    # Executed but never synced: PostgreSQL holds the lock and the row in an implicit transaction
    # that only a Sync would commit. Whoever sends the next Sync on this backend must not be someone else.
    client.send(_unsynced(f"UPDATE {table} SET note = 'dirty' WHERE id = 1")
                + _unsynced(f"INSERT INTO {table} VALUES (2, 'dirty')")
                + _unsynced("SELECT pg_backend_pid()") + m.message(m.FLUSH))
    while True:
        kind, body = client.read_message()
        assert kind != m.ERROR_RESPONSE, body
        if kind == m.DATA_ROW:
            pid = int(_data_row(body)[0])
        if kind == m.COMMAND_COMPLETE and body.startswith(b"SELECT"):
            return pid


VANISHINGS = {
    "mid-transaction": _vanish_in_transaction,
    "mid-extended-batch": _vanish_mid_extended_batch,
    "mid-copy-from-stdin": _vanish_mid_copy_in,
    "mid-result": _vanish_mid_result,
    "mid-copy-to-stdout": _vanish_mid_copy_out,
}


@pytest.mark.parametrize("moment", list(VANISHINGS))
def test_client_vanishing_leaves_no_lock_no_open_transaction_and_no_dirty_server(pgmux, postgres, moment) -> None:
    table = "vanish_" + moment.replace("-", "_")
    postgres.psql(f"DROP TABLE IF EXISTS {table}; CREATE TABLE {table} (id int PRIMARY KEY, note text); "
                  f"INSERT INTO {table} VALUES (1, 'clean'); ALTER TABLE {table} OWNER TO {APP.name}",
                  database=APP_DATABASE)
    proxy = pgmux(default_pool_size=1, auth_type="trust", query_wait_timeout=10)

    victim = RawClient(proxy.host, proxy.port())
    victim_pid = VANISHINGS[moment](victim, table)
    _vanish(victim)

    def leftovers() -> str:
        return postgres.psql(
            "SELECT a.pid, a.state, l.mode FROM pg_stat_activity a LEFT JOIN pg_locks l "
            f"ON l.pid = a.pid AND l.relation = '{table}'::regclass "
            f"WHERE a.usename = '{APP.name}' AND a.backend_type = 'client backend' "
            "AND (a.state <> 'idle' OR l.pid IS NOT NULL)", database=APP_DATABASE).strip()

    _wait_until(lambda: leftovers() == "", 5, f"no backend of {APP.name} busy, in a transaction or locking {table}")

    async def next_client() -> None:
        conn = await _connect(proxy)  # the pool has one server: this is the victim's, cleaned, or a new one
        pid = await conn.fetchval("SELECT pg_backend_pid()")
        if moment not in ("mid-transaction", "mid-extended-batch"):
            # A backend left mid-query or mid-COPY is in an unknown state: it must be closed, not reused.
            assert pid != victim_pid
        assert await conn.fetchval("SHOW statement_timeout") == "0"
        assert await conn.fetch(f"SELECT id, note FROM {table} ORDER BY id") == [(1, "clean")]
        async with conn.transaction():
            await conn.execute("SET LOCAL lock_timeout = '2s'")
            await conn.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
        await conn.execute(f"DROP TABLE {table}")
        await conn.close()

    asyncio.run(next_client())
    if moment not in ("mid-transaction", "mid-extended-batch"):
        assert postgres.psql(f"SELECT count(*) FROM pg_stat_activity WHERE pid = {victim_pid}").strip() == "0"
    assert proxy.call(lambda p: max(pool.total for pool in p.router.pools.values())) <= 1


# ---- a client that stops reading a large result and leaves: its backend must not stay `closing` ---------

_LARGE_RESULT = "SELECT repeat('x', 1000000) FROM generate_series(1, 50)"


def _pipeline_until_pgmux_stops_reading(client: RawClient, sql: str, limit: int = 64 << 20) -> int:
    """Pipeline ``sql`` again and again, reading nothing, until pgmux takes no more; return the bytes sent.

    pgmux stops reading the client once its write buffer toward the backend is full, which is the
    case as soon as PostgreSQL blocks writing the first result (wait event ClientWrite) and no
    longer reads its socket.
    """
    batch = m.query(sql) * 1000
    client.sock.settimeout(1.0)
    sent = 0
    try:
        while sent < limit:
            client.sock.sendall(batch)
            sent += len(batch)
    except TimeoutError:
        return sent
    raise AssertionError(f"pgmux kept reading {sent} bytes of requests whose answers nobody read")


def _backends_writing_to_pgmux(postgres) -> int:
    return int(postgres.psql(
        f"SELECT count(*) FROM pg_stat_activity WHERE usename = '{APP.name}' AND wait_event = 'ClientWrite'").strip())


def _stuck_behind_unread_results(proxy, postgres, expected_writers: int) -> RawClient:
    """A client whose backend is blocked writing to pgmux and whose server link has unsent requests queued."""
    client = RawClient(proxy.host, proxy.port())
    _pipeline_until_pgmux_stops_reading(client, _LARGE_RESULT)
    _wait_until(lambda: _backends_writing_to_pgmux(postgres) >= expected_writers, 10,
                f"{expected_writers} backend(s) blocked writing results nobody reads (ClientWrite)")
    return client


def _servers(proxy, state: str) -> int:
    return proxy.call(lambda p: sum(len(getattr(pool, state)) for pool in p.router.pools.values()))


def test_clients_that_leave_unread_large_results_do_not_take_the_pool_for_good(pgmux, postgres) -> None:
    """Two clients pipeline large-result queries, never read, and vanish: the pool of 2 must serve the next client.

    Their backends are blocked writing (ClientWrite) and pgmux has requests queued toward them: a
    graceful close (Terminate, then wait for the write buffer to drain) would wait forever, since
    PostgreSQL reads nothing until its write completes and pgmux stops reading a closing transport.
    """
    proxy = pgmux(default_pool_size=2, auth_type="trust", query_wait_timeout=5)
    victims = [_stuck_behind_unread_results(proxy, postgres, expected_writers=n) for n in (1, 2)]
    for victim in victims:
        _vanish(victim)

    async def healthy_client() -> int:
        conn = await _connect(proxy)
        try:
            return await asyncio.wait_for(conn.fetchval("SELECT 1"), 4)
        finally:
            await conn.close()

    started = time.monotonic()
    assert asyncio.run(healthy_client()) == 1
    assert time.monotonic() - started < 4
    _wait_until(lambda: _servers(proxy, "closing") == 0, 5, "no server left closing")
    _wait_until(lambda: _backends_writing_to_pgmux(postgres) == 0, 5, "the abandoned backends are gone")
    assert proxy.call(lambda p: max(pool.total for pool in p.router.pools.values())) <= 2


def _close_gracefully_while_stuck(proxy) -> None:
    """Have the pool retire the stuck client's server the graceful way, as it retires a healthy idle one."""
    def close(p) -> None:
        pool = next(iter(p.router.pools.values()))
        pool.close_server(next(iter(pool.active)), "test: a graceful close that cannot complete")
    proxy.call(close)


def test_a_graceful_close_that_cannot_complete_is_aborted_at_its_deadline(pgmux, postgres) -> None:
    proxy = pgmux(default_pool_size=1, auth_type="trust", query_wait_timeout=5)
    victim = _stuck_behind_unread_results(proxy, postgres, expected_writers=1)
    _close_gracefully_while_stuck(proxy)
    time.sleep(1.0)
    assert _servers(proxy, "closing") == 1, "the graceful close is stuck (the premise of this test)"
    _wait_until(lambda: _servers(proxy, "closing") == 0, SERVER_CLOSE_DEADLINE + 2,
                f"the close aborted once SERVER_CLOSE_DEADLINE={SERVER_CLOSE_DEADLINE:g}s passed")
    _wait_until(lambda: _backends_writing_to_pgmux(postgres) == 0, 5, "the abandoned backend is gone")
    victim.close()

    async def next_client() -> int:
        conn = await _connect(proxy)
        try:
            return await asyncio.wait_for(conn.fetchval("SELECT 1"), 4)
        finally:
            await conn.close()

    assert asyncio.run(next_client()) == 1


@pytest.mark.parametrize("command", ["KILL app", "RECONNECT app"])
def test_admin_kill_and_reconnect_end_servers_stuck_closing(pgmux, postgres, command: str) -> None:
    proxy = pgmux(default_pool_size=1, auth_type="trust", admin_users=[APP.name])
    victim = _stuck_behind_unread_results(proxy, postgres, expected_writers=1)
    _close_gracefully_while_stuck(proxy)
    time.sleep(0.3)
    assert _servers(proxy, "closing") == 1, "the graceful close is stuck (the premise of this test)"
    console = RawClient(proxy.host, proxy.port(), database="pgmux")
    _simple_query(console, command)
    # Well before SERVER_CLOSE_DEADLINE: the command did it, not the janitor.
    _wait_until(lambda: _servers(proxy, "closing") == 0, 1.5, f"{command} ended the server stuck closing")
    _wait_until(lambda: _backends_writing_to_pgmux(postgres) == 0, 5, "the abandoned backend is gone")
    console.close()
    victim.close()


# ---- a backend killed under a client: one error, and nothing about the upstream in it -------------------


def _terminate_when_busy(postgres, query: str) -> None:
    """pg_terminate_backend the backend running ``query`` once it runs it."""
    def running() -> str:
        return postgres.psql(f"SELECT pid FROM pg_stat_activity WHERE query = '{query}' AND state = 'active'").strip()
    _wait_until(lambda: running() != "", 5, f"{query!r} running")
    postgres.psql(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE query = '{query}'")


def _names_the_upstream(text: str, postgres) -> bool:
    return any(word in text for word in (f":{postgres.port}", str(postgres.port), "postgresql://", f'"{APP.name}"',
                                         f"{APP.name}@", f"user {APP.name}"))


def test_backend_killed_mid_query_gives_psycopg_one_error_naming_no_upstream(pgmux, postgres) -> None:
    proxy = pgmux(default_pool_size=2)
    query = "SELECT pg_sleep(30) /* psycopg victim */"
    with psycopg.connect(proxy.dsn(APP.name, APP.password, APP_DATABASE), autocommit=True, connect_timeout=5) as conn:
        with ThreadPoolExecutor(1) as killer:
            killed = killer.submit(_terminate_when_busy, postgres, query)
            with pytest.raises(psycopg.Error) as caught:
                conn.execute(query)
            killed.result(10)
            everything_read = conn.pgconn.error_message.decode()  # libpq keeps every error it read
    text = str(caught.value)
    assert "results from command" not in text, text  # psycopg's complaint about a second FATAL
    assert isinstance(caught.value, psycopg.errors.AdminShutdown), repr(caught.value)  # PostgreSQL's 57P01, alone
    assert everything_read.count("FATAL:") == 1, everything_read
    assert not _names_the_upstream(text, postgres) and not _names_the_upstream(everything_read, postgres), everything_read


def test_backend_killed_mid_query_gives_asyncpg_one_error_naming_no_upstream(pgmux, postgres) -> None:
    proxy = pgmux(default_pool_size=2)
    query = "SELECT pg_sleep(30) /* asyncpg victim */"

    async def scenario() -> BaseException:
        conn = await _connect(proxy)
        killed = asyncio.ensure_future(asyncio.to_thread(_terminate_when_busy, postgres, query))
        with pytest.raises(Exception) as caught:
            await asyncio.wait_for(conn.execute(query), 10)
        await killed
        conn.terminate()
        return caught.value

    error = asyncio.run(scenario())
    assert not isinstance(error, asyncpg.exceptions._base.InternalClientError), repr(error)
    # 57P01, or 08003 when asyncpg sees the close first: either way with PostgreSQL's text, not a second error.
    assert _sqlstate(error) in ("57P01", "08003"), repr(error)
    assert "terminating connection due to administrator command" in str(error), repr(error)
    assert not _names_the_upstream(str(error), postgres), str(error)


def test_backend_killed_mid_query_sends_the_client_exactly_one_fatal(pgmux, postgres) -> None:
    """On the wire: PostgreSQL's FATAL 57P01 is relayed and the connection closes; pgmux adds no second FATAL."""
    proxy = pgmux(default_pool_size=2, auth_type="trust")
    query = "SELECT pg_sleep(30) /* raw victim */"
    client = RawClient(proxy.host, proxy.port())
    client.send(m.query(query))
    _terminate_when_busy(postgres, query)
    errors_seen = []
    while True:
        try:
            kind, body = client.read_message()
        except (ConnectionError, OSError):
            break
        if kind == m.ERROR_RESPONSE:
            fields = dict((chunk[:1], chunk[1:].decode()) for chunk in body.split(b"\x00") if chunk)
            errors_seen.append((fields[b"V"], fields[b"C"], fields[b"M"]))
    assert [(severity, code) for severity, code, _ in errors_seen] == [("FATAL", "57P01")], errors_seen
    assert not _names_the_upstream(errors_seen[0][2], postgres)
    client.close()
