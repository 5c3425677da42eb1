"""Admission control, the wait line and timeouts: every refusal is a clear 53300 (or the right SQLSTATE)."""

from __future__ import annotations

import asyncio
import socket
import struct
import time

import asyncpg
import psycopg
import pytest

from pgusers import APP, APP_DATABASE, MD5
from proxy.protocol import messages as m
from proxy.protocol.startup import build_cancel_request, build_startup_message


async def _connect(proxy, **kwargs) -> asyncpg.Connection:
    kwargs.setdefault("statement_cache_size", 0)
    user = kwargs.pop("user", APP.name)
    password = kwargs.pop("password", APP.password)
    return await asyncpg.connect(host=proxy.host, port=proxy.port(), user=user, password=password,
                                 database=APP_DATABASE, **kwargs)


def _rejections(proxy) -> dict[str, int]:
    return proxy.call(lambda p: dict(p.registry.rejections))


def test_client_over_max_client_conn_gets_fatal_53300_naming_the_limit(pgmux) -> None:
    proxy = pgmux(max_client_conn=3)

    async def scenario() -> None:
        held = [await _connect(proxy) for _ in range(3)]
        with pytest.raises(asyncpg.TooManyConnectionsError) as info:
            await _connect(proxy)
        assert "max_client_conn=3" in str(info.value)
        assert "no more connections allowed" in str(info.value)
        for conn in held:
            await conn.close()
        late = await _connect(proxy)  # room again once others left
        assert await late.fetchval("SELECT 1") == 1
        await late.close()

    asyncio.run(scenario())
    assert _rejections(proxy)["max_client_conn"] == 1


def test_per_database_and_per_user_client_limits_refuse_with_53300(pgmux) -> None:
    proxy = pgmux(max_db_client_connections=2)

    async def scenario() -> None:
        held = [await _connect(proxy) for _ in range(2)]
        with pytest.raises(asyncpg.TooManyConnectionsError) as info:
            await _connect(proxy)
        assert 'database "app"' in str(info.value) and "max_db_client_connections=2" in str(info.value)
        for conn in held:
            await conn.close()

    asyncio.run(scenario())
    assert _rejections(proxy)["db_client_limit"] == 1

    proxy = pgmux(max_user_client_connections=1)

    async def per_user() -> None:
        held = await _connect(proxy)
        with pytest.raises(asyncpg.TooManyConnectionsError) as info:
            await _connect(proxy)
        assert 'user "app"' in str(info.value) and "max_user_client_connections=1" in str(info.value)
        # libpq reports any refusal at connect as OperationalError; the text says which limit it was.
        with pytest.raises(psycopg.OperationalError, match="max_user_client_connections=1"):
            psycopg.connect(proxy.dsn(APP.name, APP.password, APP_DATABASE))
        await held.close()

    asyncio.run(per_user())
    assert _rejections(proxy)["user_client_limit"] == 2


def test_wait_timeout_is_an_error_53300_and_the_connection_stays_usable(pgmux) -> None:
    proxy = pgmux(default_pool_size=1, query_wait_timeout=0.5)

    async def scenario() -> None:
        holder = await _connect(proxy)
        waiter = await _connect(proxy)
        await holder.execute("BEGIN")
        started = time.monotonic()
        with pytest.raises(asyncpg.TooManyConnectionsError) as info:
            await waiter.fetchval("SELECT 1")
        waited = time.monotonic() - started
        text = str(info.value)
        assert "app/app" in text and "query_wait_timeout=0.5s" in text and "1 of 1 busy" in text
        assert waited < 5
        await holder.execute("COMMIT")
        assert await waiter.fetchval("SELECT 2") == 2  # same connection, usable after the refusal
        await holder.close()
        await waiter.close()

    asyncio.run(scenario())
    assert _rejections(proxy)["wait_timeout"] == 1


def test_psycopg_sees_wait_timeout_as_too_many_connections(pgmux) -> None:
    proxy = pgmux(default_pool_size=1, query_wait_timeout=0.3)
    dsn = proxy.dsn(APP.name, APP.password, APP_DATABASE)
    with psycopg.connect(dsn, autocommit=True, prepare_threshold=None) as holder, \
            psycopg.connect(dsn, autocommit=True, prepare_threshold=None) as waiter:
        holder.execute("BEGIN")
        with pytest.raises(psycopg.errors.TooManyConnections):
            waiter.execute("SELECT 1")
        holder.execute("COMMIT")
        assert waiter.execute("SELECT 3").fetchone() == (3,)


@pytest.mark.timeout(60)  # the bug was a hang: fail instead of blocking the suite
def test_refused_request_with_a_3mb_parameter_gets_53300_and_the_connection_stays_usable(pgmux) -> None:
    # Past 1 MB the skipped bytes of a refused request used to be queued again, reading paused at
    # the queue's high-water mark and the Sync behind the parameter was never read: no ReadyForQuery.
    proxy = pgmux(default_pool_size=1, query_wait_timeout=0.5)
    dsn = proxy.dsn(APP.name, APP.password, APP_DATABASE)
    with psycopg.connect(dsn, autocommit=True) as holder, psycopg.connect(dsn, autocommit=True) as waiter:
        holder.execute("BEGIN")
        started = time.monotonic()
        with pytest.raises(psycopg.errors.TooManyConnections, match="query_wait_timeout=0.5s"):
            waiter.execute("SELECT length(%s)", ["x" * (3 * 1024 * 1024)])
        assert time.monotonic() - started < 10
        holder.execute("COMMIT")
        assert waiter.execute("SELECT 1").fetchone() == (1,)  # the same connection, usable
        assert waiter.execute("SELECT length(%s)", ["y" * (3 * 1024 * 1024)]).fetchone() == (3 * 1024 * 1024,)
    assert _rejections(proxy)["wait_timeout"] == 1


class RawClient:
    """A hand-driven protocol client (trust auth) to send exactly the bytes a test needs."""

    def __init__(self, host: str, port: int, user: str = APP.name, database: str = APP_DATABASE) -> None:
        self.sock = socket.create_connection((host, port), timeout=10)
        self.sock.sendall(build_startup_message({"user": user, "database": database}))
        self.buffer = b""
        kinds = self.read_until_ready()
        assert m.AUTHENTICATION in kinds and kinds[-1] == m.READY_FOR_QUERY

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_message(self) -> tuple[int, bytes]:
        while len(self.buffer) < 5 or len(self.buffer) < 1 + struct.unpack_from("!I", self.buffer, 1)[0]:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed")
            self.buffer += chunk
        length = struct.unpack_from("!I", self.buffer, 1)[0]
        kind, body = self.buffer[0], self.buffer[5:1 + length]
        self.buffer = self.buffer[1 + length:]
        return kind, body

    def read_until_ready(self) -> list[int]:
        kinds = []
        while True:
            kind, _ = self.read_message()
            kinds.append(kind)
            if kind == m.READY_FOR_QUERY:
                return kinds

    def close(self) -> None:
        self.sock.close()


def extended_query(sql: str) -> bytes:
    parse = m.message(m.PARSE, b"\x00" + sql.encode() + b"\x00" + b"\x00\x00")
    bind = m.message(m.BIND, b"\x00\x00" + b"\x00\x00" + b"\x00\x00" + b"\x00\x00")
    execute = m.message(m.EXECUTE, b"\x00" + b"\x00\x00\x00\x00")
    return parse + bind + execute + m.message(m.SYNC)


def test_refused_pipeline_is_answered_batch_by_batch_like_a_server_error(pgmux) -> None:
    proxy = pgmux(default_pool_size=1, query_wait_timeout=0.3, auth_type="trust")

    async def hold() -> asyncpg.Connection:
        holder = await _connect(proxy)
        await holder.execute("BEGIN")
        return holder

    loop = asyncio.new_event_loop()
    holder = loop.run_until_complete(hold())
    client = RawClient(proxy.host, proxy.port())
    client.send(extended_query("SELECT 1") + extended_query("SELECT 2"))
    # Two batches, each refused on its own: ErrorResponse + ReadyForQuery, twice.
    assert client.read_until_ready() == [m.ERROR_RESPONSE, m.READY_FOR_QUERY]
    assert client.read_until_ready() == [m.ERROR_RESPONSE, m.READY_FOR_QUERY]
    loop.run_until_complete(holder.execute("COMMIT"))
    client.send(extended_query("SELECT 3"))
    kinds = client.read_until_ready()
    assert m.DATA_ROW in kinds and m.ERROR_RESPONSE not in kinds
    client.close()
    loop.run_until_complete(holder.close())
    loop.close()


def test_queue_cap_sheds_load_at_once_with_53300(pgmux) -> None:
    proxy = pgmux(default_pool_size=1, max_wait_clients=2, query_wait_timeout=10)

    async def scenario() -> None:
        holder = await _connect(proxy)
        await holder.execute("BEGIN")
        waiting = [await _connect(proxy) for _ in range(2)]
        queued = [asyncio.ensure_future(c.fetchval("SELECT 1")) for c in waiting]
        await asyncio.sleep(0.3)
        shed = await _connect(proxy)
        started = time.monotonic()
        with pytest.raises(asyncpg.TooManyConnectionsError) as info:
            await shed.fetchval("SELECT 1")
        assert time.monotonic() - started < 2  # refused at once, not after the wait timeout
        assert "max_wait_clients=2" in str(info.value)
        await holder.execute("COMMIT")
        assert await asyncio.gather(*queued) == [1, 1]
        for conn in [holder, shed, *waiting]:
            await conn.close()

    asyncio.run(scenario())
    assert _rejections(proxy)["queue_full"] == 1


def test_reserve_pool_opens_after_reserve_pool_timeout_and_no_further(pgmux, postgres) -> None:
    proxy = pgmux(default_pool_size=1, reserve_pool_size=1, reserve_pool_timeout=0.2, query_wait_timeout=0.8)

    async def scenario() -> None:
        holder = await _connect(proxy)
        await holder.execute("BEGIN")
        holder_pid = await holder.fetchval("SELECT pg_backend_pid()")
        second = await _connect(proxy)
        await second.execute("BEGIN")  # served by the reserve connection after 0.2 s
        assert await second.fetchval("SELECT pg_backend_pid()") != holder_pid
        third = await _connect(proxy)
        with pytest.raises(asyncpg.TooManyConnectionsError):
            await third.fetchval("SELECT 1")  # pool (1) + reserve (1) are both busy
        assert proxy.call(lambda p: max(pool.total for pool in p.router.pools.values())) == 2
        for conn in (holder, second):
            await conn.execute("COMMIT")
            await conn.close()
        await third.close()

    asyncio.run(scenario())


def test_max_db_connections_bounds_backends_across_the_pools_of_a_database(pgmux, postgres) -> None:
    proxy = pgmux(default_pool_size=5, max_db_connections=1, query_wait_timeout=5,
                  users={MD5.name: {"password": MD5.password}})

    def backends() -> int:
        out = postgres.psql(f"SELECT count(*) FROM pg_stat_activity WHERE datname = '{APP_DATABASE}' "
                            f"AND usename IN ('{APP.name}', '{MD5.name}')")
        return int(out.strip())

    async def scenario() -> None:
        app = await _connect(proxy)
        other = await _connect(proxy, user=MD5.name, password=MD5.password)
        await app.execute("BEGIN")
        pending = asyncio.ensure_future(other.fetchval("SELECT current_user"))
        await asyncio.sleep(0.3)
        assert not pending.done()
        assert backends() <= 1
        await app.execute("COMMIT")  # the app pool's idle server is closed to make room
        assert await asyncio.wait_for(pending, 5) == MD5.name
        assert backends() <= 1
        await app.close()
        await other.close()

    asyncio.run(scenario())


def test_client_idle_timeout_closes_idle_clients_with_57p05(pgmux) -> None:
    proxy = pgmux(client_idle_timeout=0.4)

    async def scenario() -> None:
        conn = await _connect(proxy)
        assert await conn.fetchval("SELECT 1") == 1
        await asyncio.sleep(1.2)
        with pytest.raises((asyncpg.PostgresError, asyncpg.InterfaceError)):
            await conn.fetchval("SELECT 1")
        assert conn.is_closed()

    asyncio.run(scenario())
    assert _rejections(proxy)["client_idle_timeout"] == 1


def test_idle_transaction_timeout_rolls_back_and_closes_with_25p03(pgmux, postgres) -> None:
    proxy = pgmux(default_pool_size=1, idle_transaction_timeout=0.4)

    async def scenario() -> None:
        conn = await _connect(proxy)
        await conn.execute("BEGIN")
        await conn.execute("CREATE TEMP TABLE abandoned (x int)")
        await asyncio.sleep(1.2)
        with pytest.raises((asyncpg.PostgresError, asyncpg.InterfaceError)):
            await conn.fetchval("SELECT 1")
        again = await _connect(proxy)
        # The one backend was rolled back, not dropped dirty: no abandoned temp table, not in a transaction.
        assert await again.fetchval("SELECT count(*) FROM pg_tables WHERE tablename = 'abandoned'") == 0
        await again.close()

    asyncio.run(scenario())
    assert _rejections(proxy)["idle_transaction_timeout"] == 1


def test_query_timeout_cancels_the_running_query(pgmux) -> None:
    proxy = pgmux(query_timeout=0.3)

    async def scenario() -> None:
        conn = await _connect(proxy)
        started = time.monotonic()
        with pytest.raises(asyncpg.QueryCanceledError):
            await conn.execute("SELECT pg_sleep(10)")
        assert time.monotonic() - started < 5
        assert await conn.fetchval("SELECT 1") == 1
        await conn.close()

    asyncio.run(scenario())


def test_unreachable_upstream_fails_fast_with_08006_naming_neither_its_address_nor_password(pgmux) -> None:
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there now
    proxy = pgmux(upstream_url=f"postgresql://{APP.name}:{APP.password}@127.0.0.1:{port}/{APP_DATABASE}?sslmode=disable",
                  query_wait_timeout=30, server_login_retry=5)

    async def scenario() -> None:
        for _ in range(2):  # the second arrives during the login backoff and must fail fast too
            started = time.monotonic()
            with pytest.raises((asyncpg.PostgresError, OSError)) as info:
                await _connect(proxy)
            assert time.monotonic() - started < 5
            text = str(info.value)
            assert str(port) not in text and APP.password not in text and "Connection refused" in text
            assert getattr(info.value, "sqlstate", "08006") == "08006"

    asyncio.run(scenario())


def test_asyncpg_timeout_cancels_through_pgmux_and_the_connection_stays_usable(pgmux) -> None:
    proxy = pgmux()

    async def scenario() -> None:
        conn = await _connect(proxy)
        with pytest.raises(asyncio.TimeoutError):
            await conn.fetchval("SELECT pg_sleep(10)", timeout=0.3)
        assert await conn.fetchval("SELECT 7") == 7
        await conn.close()

    asyncio.run(scenario())


def test_psycopg_cancel_stops_a_running_query(pgmux_process) -> None:
    import threading

    # A separate process: psycopg's blocking cancel() holds the GIL, which an in-process pgmux needs.
    process = pgmux_process()
    dsn = f"postgresql://{APP.name}:{APP.password}@127.0.0.1:{process.ports()[0]}/{APP_DATABASE}"
    with psycopg.connect(dsn, prepare_threshold=None) as conn:
        timer = threading.Timer(0.3, conn.cancel)
        timer.start()
        with pytest.raises(psycopg.errors.QueryCanceled):
            conn.execute("SELECT pg_sleep(10)")
        conn.rollback()
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_cancel_with_an_idle_clients_key_does_not_touch_the_server_it_used(pgmux) -> None:
    proxy = pgmux(default_pool_size=1)

    async def scenario() -> None:
        idle = await _connect(proxy)
        await idle.fetchval("SELECT 1")
        process_id = idle.get_server_pid()
        secret = idle._protocol.backend_secret  # the key pgmux issued to this client
        busy = await _connect(proxy)
        running = asyncio.ensure_future(busy.fetchval("SELECT 42 FROM pg_sleep(0.6)"))
        await asyncio.sleep(0.2)
        _, writer = await asyncio.open_connection(proxy.host, proxy.port())
        writer.write(build_cancel_request(process_id, secret.to_bytes(4, "big", signed=True)
                                          if isinstance(secret, int) else secret))
        await writer.drain()
        writer.close()
        assert await running == 42  # the other client's query was not cancelled
        await idle.close()
        await busy.close()

    asyncio.run(scenario())


def test_idle_server_killed_by_postgres_is_dropped_not_handed_out(pgmux, postgres) -> None:
    proxy = pgmux(default_pool_size=1)

    async def scenario() -> None:
        conn = await _connect(proxy)
        pid = await conn.fetchval("SELECT pg_backend_pid()")
        postgres.psql(f"SELECT pg_terminate_backend({pid})")
        await asyncio.sleep(0.3)
        assert await conn.fetchval("SELECT pg_backend_pid()") != pid  # no error: a fresh backend
        await conn.close()

    asyncio.run(scenario())


def test_slowloris_login_is_cut_off_by_client_login_timeout(pgmux) -> None:
    proxy = pgmux(client_login_timeout=0.5)
    slow = socket.create_connection((proxy.host, proxy.port()), timeout=5)
    slow.sendall(struct.pack("!i", 40)[:3])  # a startup packet that never finishes
    started = time.monotonic()
    received = b""
    while True:
        chunk = slow.recv(4096)
        if not chunk:
            break
        received += chunk
    assert time.monotonic() - started < 3
    assert b"client_login_timeout" in received  # told why, then closed
    slow.close()

    async def others_fine() -> None:
        conn = await _connect(proxy)
        assert await conn.fetchval("SELECT 1") == 1
        await conn.close()

    asyncio.run(others_fine())
    assert _rejections(proxy)["login_timeout"] == 1


def test_backends_stay_bounded_while_a_reload_shrinks_the_pool_under_load(pgmux, postgres) -> None:
    import threading

    from proxy.settings import load_settings

    upstream = postgres.dsn(APP.name, APP.password, APP_DATABASE, sslmode="disable")
    proxy = pgmux(default_pool_size=6, query_wait_timeout=20)
    observed: list[int] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            out = postgres.psql(f"SELECT count(*) FROM pg_stat_activity WHERE usename = '{APP.name}' "
                                f"AND datname = '{APP_DATABASE}' AND backend_type = 'client backend'")
            observed.append(int(out.strip()))
            time.sleep(0.02)

    async def worker(n: int) -> int:
        conn = await _connect(proxy)
        served = 0
        for _ in range(40):
            async with conn.transaction():
                await conn.execute("SELECT pg_sleep(0.005)")
            served += 1
        await conn.close()
        return served

    async def scenario() -> list[int]:
        work = asyncio.gather(*(worker(n) for n in range(30)))
        await asyncio.sleep(0.3)
        smaller = load_settings(None, [], upstream_url=upstream, listen="127.0.0.1:0", default_pool_size=2,
                                query_wait_timeout=20)
        proxy.call(lambda p: p.reload(smaller))
        return await work

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        results = asyncio.run(scenario())
    finally:
        done.set()
        sampler.join()
    assert results == [40] * 30  # every transaction served across the reload
    assert max(observed) <= 6
    assert proxy.call(lambda p: max(pool.total for pool in p.router.pools.values())) <= 2
