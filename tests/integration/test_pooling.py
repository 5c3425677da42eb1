"""Transaction and session pooling through real drivers against a real PostgreSQL."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time

import asyncpg
import psycopg
import pytest

from pgusers import APP, APP_DATABASE
from proxy.protocol import messages as m
from test_admission import RawClient, extended_query


async def _connect(pgmux, listener: int = 0, **kwargs) -> asyncpg.Connection:
    kwargs.setdefault("statement_cache_size", 0)
    return await asyncpg.connect(host=pgmux.host, port=pgmux.port(listener), user=APP.name, password=APP.password,
                                 database=APP_DATABASE, **kwargs)


def _pgmux_backends(postgres, application_name: str | None = None) -> int:
    """Backends the app role holds in the app database, seen by PostgreSQL itself."""
    out = postgres.psql(f"SELECT count(*) FROM pg_stat_activity WHERE usename = '{APP.name}' "
                        f"AND datname = '{APP_DATABASE}' AND backend_type = 'client backend'")
    return int(out.strip())


def _idle_in_transaction(postgres) -> int:
    out = postgres.psql(f"SELECT count(*) FROM pg_stat_activity WHERE usename = '{APP.name}' "
                        "AND state LIKE 'idle in transaction%'")
    return int(out.strip())


def test_asyncpg_queries_through_transaction_pooling(pgmux) -> None:
    proxy = pgmux()

    async def scenario() -> None:
        conn = await _connect(proxy)
        assert await conn.fetchval("SELECT 1") == 1
        rows = await conn.fetch("SELECT generate_series(1, 3) AS n")
        assert [r["n"] for r in rows] == [1, 2, 3]
        assert await conn.fetchval("SELECT $1::int + $2::int", 40, 2) == 42
        await conn.close()

    asyncio.run(scenario())


def test_200_clients_share_5_backends_and_postgres_never_sees_more(pgmux, postgres) -> None:
    proxy = pgmux(default_pool_size=5)
    observed: list[int] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            observed.append(_pgmux_backends(postgres))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()

    async def client(i: int) -> int:
        conn = await _connect(proxy)
        try:
            async with conn.transaction():
                await conn.execute("SELECT pg_sleep(0.005)")
                return await conn.fetchval("SELECT $1::int", i)
        finally:
            await conn.close()

    async def scenario() -> list[int]:
        return await asyncio.gather(*(client(i) for i in range(200)))

    try:
        results = asyncio.run(scenario())
    finally:
        done.set()
        sampler.join()
    assert sorted(results) == list(range(200))
    assert observed and max(observed) <= 5
    pool_total = proxy.call(lambda p: max(pool.total for pool in p.router.pools.values()))
    assert pool_total <= 5


def test_client_in_begin_keeps_its_backend_while_others_wait(pgmux) -> None:
    proxy = pgmux(default_pool_size=1, query_wait_timeout=10)

    async def scenario() -> None:
        holder = await _connect(proxy)
        other = await _connect(proxy)
        tr = holder.transaction()
        await tr.start()
        pid = await holder.fetchval("SELECT pg_backend_pid()")
        waiting = asyncio.ensure_future(other.fetchval("SELECT pg_backend_pid()"))
        await asyncio.sleep(0.3)
        assert not waiting.done(), "the only backend is in a transaction: the other client must wait"
        assert await holder.fetchval("SELECT pg_backend_pid()") == pid
        await tr.commit()
        assert await asyncio.wait_for(waiting, 5) == pid  # it got the same (only) backend once freed
        await holder.close()
        await other.close()

    asyncio.run(scenario())


def test_pipelined_extended_queries_with_several_syncs(pgmux) -> None:
    proxy = pgmux(default_pool_size=2)
    with psycopg.connect(proxy.dsn(APP.name, APP.password, APP_DATABASE), prepare_threshold=None) as conn:
        with conn.pipeline():
            cursors = []
            for i in range(50):
                cur = conn.cursor()
                cur.execute("SELECT %s::int * 2", (i,))
                cursors.append(cur)
                if i % 10 == 9:
                    conn.pipeline_sync() if hasattr(conn, "pipeline_sync") else None
        assert [c.fetchone()[0] for c in cursors] == [i * 2 for i in range(50)]


def test_copy_from_stdin_and_to_stdout(pgmux) -> None:
    proxy = pgmux()
    with psycopg.connect(proxy.dsn(APP.name, APP.password, APP_DATABASE), prepare_threshold=None) as conn:
        conn.execute("CREATE TEMP TABLE copied (id int, name text)") if False else None
        conn.execute("DROP TABLE IF EXISTS copy_test")
        conn.execute("CREATE TABLE copy_test (id int, name text)")
        conn.commit()
        with conn.cursor() as cur:
            with cur.copy("COPY copy_test FROM STDIN") as copy:
                for i in range(10_000):
                    copy.write_row((i, f"name-{i}"))
        conn.commit()
        with conn.cursor() as cur:
            out = bytearray()
            with cur.copy("COPY copy_test TO STDOUT") as copy:
                for chunk in copy:
                    out += chunk
        assert out.count(b"\n") == 10_000
        assert conn.execute("SELECT count(*), sum(id) FROM copy_test").fetchone() == (10_000, sum(range(10_000)))
        conn.execute("DROP TABLE copy_test")
        conn.commit()


def test_100mb_result_streams_without_pgmux_holding_it(pgmux) -> None:
    import psutil

    proxy = pgmux()
    process = psutil.Process()
    before = process.memory_info().rss

    async def scenario() -> int:
        conn = await _connect(proxy)
        total = 0
        # A cursor fetches in chunks, so neither the driver nor pgmux needs the whole result at once.
        async with conn.transaction():
            async for record in conn.cursor("SELECT repeat('x', 1000) FROM generate_series(1, 100000)",
                                            prefetch=1000):
                total += len(record[0])
        await conn.close()
        return total

    assert asyncio.run(scenario()) == 100_000 * 1000
    grown = process.memory_info().rss - before
    # pgmux runs in this process: 100 MB passed through, far less than that may have stayed.
    assert grown < 50 * 1024 * 1024, f"RSS grew by {grown / 1e6:.0f} MB"


def test_client_killed_mid_transaction_leaves_no_lock_and_a_clean_server(pgmux, postgres) -> None:
    proxy = pgmux(default_pool_size=1)

    async def scenario() -> None:
        setup = await _connect(proxy)
        await setup.execute("DROP TABLE IF EXISTS locked_row; CREATE TABLE locked_row (id int primary key)")
        await setup.execute("INSERT INTO locked_row VALUES (1)")
        await setup.close()

        victim = await _connect(proxy)
        await victim.execute("BEGIN")
        await victim.execute("UPDATE locked_row SET id = 1 WHERE id = 1")
        await victim.execute("SET LOCAL statement_timeout = 12345")
        victim.terminate()  # vanish without a Terminate message

        nextone = await _connect(proxy)
        # Same single backend: it must be out of the transaction, and the row lock released.
        assert await nextone.fetchval("SHOW statement_timeout") == "0"
        assert _idle_in_transaction(postgres) == 0
        await nextone.execute("SET lock_timeout = '2s'")
        await nextone.execute("UPDATE locked_row SET id = 1 WHERE id = 1")
        await nextone.execute("DROP TABLE locked_row")
        await nextone.close()

    asyncio.run(scenario())


def test_each_client_keeps_its_own_timezone_on_a_shared_backend(pgmux) -> None:
    proxy = pgmux(default_pool_size=1)

    async def scenario() -> None:
        tokyo = await _connect(proxy, server_settings={"TimeZone": "Asia/Tokyo"})
        lima = await _connect(proxy)
        await lima.execute("SET TimeZone = 'America/Lima'")
        for _ in range(5):
            assert await tokyo.fetchval("SHOW TimeZone") == "Asia/Tokyo"
            assert await lima.fetchval("SHOW TimeZone") == "America/Lima"
        assert await tokyo.fetchval("SELECT pg_backend_pid()") == await lima.fetchval("SELECT pg_backend_pid()")
        await tokyo.close()
        await lima.close()

    asyncio.run(scenario())


def test_session_listener_keeps_session_state_and_resets_it_afterwards(pgmux, postgres) -> None:
    proxy = pgmux(default_pool_size=1, listeners=[{"address": "127.0.0.1:0", "pool_mode": "session"}])
    session_listener = 1  # the listen shorthand comes first, then [[listeners]]

    async def scenario() -> None:
        first = await _connect(proxy, listener=session_listener)
        pid = await first.fetchval("SELECT pg_backend_pid()")
        await first.execute("SET statement_timeout = 4321")
        await first.execute("CREATE TEMP TABLE mine (x int)")
        assert await first.fetchval("SHOW statement_timeout") == "4321ms"
        assert await first.fetchval("SELECT pg_backend_pid()") == pid
        await first.close()

        second = await _connect(proxy, listener=session_listener)
        assert await second.fetchval("SELECT pg_backend_pid()") == pid  # the same backend, reset
        assert await second.fetchval("SHOW statement_timeout") == "0"
        assert await second.fetchval("SELECT count(*) FROM pg_tables WHERE tablename = 'mine'") == 0
        await second.close()

    asyncio.run(scenario())


def test_server_killed_mid_query_gives_that_client_an_error_and_the_pool_recovers(pgmux, postgres) -> None:
    proxy = pgmux(default_pool_size=2)

    async def scenario() -> None:
        victim = await _connect(proxy)
        await victim.execute("BEGIN")
        pid = await victim.fetchval("SELECT pg_backend_pid()")
        running = asyncio.ensure_future(victim.execute("SELECT pg_sleep(30)"))
        await asyncio.sleep(0.2)
        postgres.psql(f"SELECT pg_terminate_backend({pid})")
        with pytest.raises((asyncpg.PostgresError, asyncpg.exceptions.ConnectionDoesNotExistError, OSError)) as info:
            await asyncio.wait_for(running, 10)
        # PostgreSQL's FATAL is the only error (pgmux adds none): 57P01, or 08003 with its text when
        # asyncpg sees the close first.
        assert ("terminating connection due to administrator command" in str(info.value)
                or getattr(info.value, "sqlstate", "") == "57P01")
        other = await _connect(proxy)
        assert await other.fetchval("SELECT 1") == 1
        await other.close()

    asyncio.run(scenario())


@pytest.mark.parametrize("protocol", ["simple", "extended"])
def test_requests_that_wait_for_the_only_server_are_each_answered_and_counted_once(pgmux, protocol) -> None:
    # 12 clients on one backend: almost every request arrives while the server is lent, waits in the queue and
    # is handed the server as the previous client's ReadyForQuery passes (the compiled relay sends such a waiting
    # request whole). Each client must get its own answers, and SHOW STATS must count every query exactly once.
    proxy = pgmux(default_pool_size=1, admin_users=[APP.name])
    clients, rounds = 12, 40

    async def client(n: int) -> None:
        # psycopg sends a query without parameters as a simple Query, one with them as Parse/Bind/Describe/
        # Execute/Sync of the unnamed statement (no prepared statements here)
        async with await psycopg.AsyncConnection.connect(proxy.dsn(APP.name, APP.password, APP_DATABASE),
                                                         autocommit=True, prepare_threshold=None) as conn:
            for i in range(rounds):
                value = n * 1000 + i
                if protocol == "simple":
                    cursor = await conn.execute(f"SELECT {value}")
                else:
                    cursor = await conn.execute("SELECT %s::int", (value,))
                assert await cursor.fetchone() == (value,)

    async def run() -> None:
        await asyncio.gather(*(client(n) for n in range(clients)))

    def query_count() -> int:
        with psycopg.connect(proxy.dsn(APP.name, APP.password, "pgmux"), autocommit=True) as console:
            cursor = console.execute("SHOW STATS")
            names = [c.name for c in cursor.description]
            stats = next(dict(zip(names, row)) for row in cursor.fetchall() if row[0] == APP_DATABASE)
            return stats["total_query_count"]

    asyncio.run(client(0))  # the pool's first login, outside the count
    before = query_count()
    asyncio.run(run())
    assert query_count() - before == clients * rounds


def _values(client: RawClient) -> list[bytes]:
    """The first column of each DataRow up to the next ReadyForQuery."""
    values = []
    while True:
        kind, body = client.read_message()
        assert kind != m.ERROR_RESPONSE, body
        if kind == m.DATA_ROW:
            length = int.from_bytes(body[2:6], "big")
            values.append(body[6:6 + length])
        if kind == m.READY_FOR_QUERY:
            return values


def test_requests_a_waiting_client_sends_in_separate_reads_are_answered_in_order(pgmux) -> None:
    # The first read of a client in line stays in its transport (the compiled hand-over sends it to the server it
    # is lent); a second read must go behind it, not ahead of it or instead of it.
    proxy = pgmux(auth_type="trust", default_pool_size=1)
    holder = RawClient(proxy.host, proxy.port())
    holder.send(m.query("BEGIN"))
    holder.read_until_ready()  # the only server is taken
    waiting = RawClient(proxy.host, proxy.port())
    waiting.send(m.query("SELECT 1"))
    time.sleep(0.1)
    waiting.send(extended_query("SELECT 2"))
    time.sleep(0.1)
    waiting.send(m.query("SELECT 3"))
    time.sleep(0.1)
    holder.send(m.query("COMMIT"))
    holder.read_until_ready()
    assert [_values(waiting) for _ in range(3)] == [[b"1"], [b"2"], [b"3"]]
    waiting.send(m.query("SELECT 4"))  # and the session goes on
    assert _values(waiting) == [b"4"]
    waiting.close()
    holder.close()


def test_the_request_of_a_client_that_leaves_the_line_never_runs(pgmux, postgres) -> None:
    postgres.psql(f"DROP TABLE IF EXISTS left_line; CREATE TABLE left_line (id int); "
                  f"ALTER TABLE left_line OWNER TO {APP.name}", database=APP_DATABASE)
    proxy = pgmux(auth_type="trust", default_pool_size=1)
    try:
        holder = RawClient(proxy.host, proxy.port())
        holder.send(m.query("BEGIN"))
        holder.read_until_ready()
        leaving = RawClient(proxy.host, proxy.port())
        leaving.send(m.query("INSERT INTO left_line VALUES (1)"))  # held for it while it waits
        time.sleep(0.1)
        leaving.close()
        time.sleep(0.1)
        holder.send(m.query("COMMIT"))
        holder.read_until_ready()
        holder.send(m.query("SELECT count(*) FROM left_line"))  # the server is still this pool's, and clean
        assert _values(holder) == [b"0"]
        other = RawClient(proxy.host, proxy.port())
        other.send(m.query("SELECT count(*) FROM left_line"))
        assert _values(other) == [b"0"]
        other.close()
        holder.close()
    finally:
        postgres.psql("DROP TABLE IF EXISTS left_line", database=APP_DATABASE)


def test_a_closed_server_counts_against_the_pool_until_postgresql_has_ended_its_backend(pgmux, postgres) -> None:
    # pgmux sends Terminate and waits for PostgreSQL to close the connection: until then the backend still exists
    # (and counts against max_connections), so its place in the pool is not given to a new one. The backend is
    # stopped (SIGSTOP, by its pid) so that its exit cannot come before pgmux would open the next.
    proxy = pgmux(default_pool_size=1, auth_type="trust", admin_users=[APP.name], query_wait_timeout=10)
    first = RawClient(proxy.host, proxy.port())
    first.send(m.query("SELECT pg_backend_pid()"))
    pid = int(_values(first)[0])
    first.close()
    os.kill(pid, signal.SIGSTOP)
    try:
        with psycopg.connect(proxy.dsn(APP.name, APP.password, "pgmux"), autocommit=True) as console:
            console.execute("RECONNECT")  # closes the idle server now: Terminate sent, the backend cannot act on it
        waiting = RawClient(proxy.host, proxy.port())
        waiting.send(m.query("SELECT 1"))
        waiting.sock.settimeout(0.5)
        with pytest.raises(TimeoutError):
            waiting.read_message()  # no second backend while the first still exists
        assert _pgmux_backends(postgres) == 1
    finally:
        os.kill(pid, signal.SIGCONT)
    waiting.sock.settimeout(10)
    assert _values(waiting) == [b"1"]  # the backend exited, pgmux saw its close, and the next one serves
    waiting.close()
