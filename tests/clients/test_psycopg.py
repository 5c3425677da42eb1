"""psycopg 3, sync and async, through transaction pooling (prepare_threshold=None until named statements are pooled)."""

from __future__ import annotations

import asyncio
import datetime
import decimal
import time
from concurrent.futures import ThreadPoolExecutor

import psycopg
import pytest
from psycopg import sql
from psycopg.types.json import Jsonb

from clientsupport import BackendSampler
from pgusers import APP, APP_DATABASE


def _connect(proxy, **kwargs) -> psycopg.Connection:
    return psycopg.connect(proxy.dsn(APP.name, APP.password, APP_DATABASE), prepare_threshold=None,
                           connect_timeout=10, **kwargs)


async def _aconnect(proxy, **kwargs) -> psycopg.AsyncConnection:
    return await psycopg.AsyncConnection.connect(proxy.dsn(APP.name, APP.password, APP_DATABASE),
                                                 prepare_threshold=None, connect_timeout=10, **kwargs)


def test_psycopg_executemany_inserts_every_row_and_returns_them(pgmux) -> None:
    proxy = pgmux(default_pool_size=2)
    rows = [(i, f"name-{i}", decimal.Decimal(i) / 100) for i in range(2_000)]
    with _connect(proxy) as conn:
        conn.execute("DROP TABLE IF EXISTS psycopg_many")
        conn.execute("CREATE TABLE psycopg_many (id int PRIMARY KEY, name text, price numeric)")
        with conn.cursor() as cur:
            # psycopg runs executemany as a pipeline: many Bind/Execute, one Sync.
            cur.executemany("INSERT INTO psycopg_many VALUES (%s, %s, %s)", rows)
            assert cur.rowcount == len(rows)
            cur.executemany("INSERT INTO psycopg_many VALUES (%s, %s, %s) RETURNING id * 10",
                            [(10_000 + i, "returned", None) for i in range(5)], returning=True)
            returned = []
            while True:
                returned.append(cur.fetchone()[0])
                if not cur.nextset():
                    break
            assert returned == [(10_000 + i) * 10 for i in range(5)]
        conn.commit()
        assert conn.execute("SELECT count(*), sum(id), sum(price) FROM psycopg_many WHERE id < 10000").fetchone() == (
            2_000, sum(range(2_000)), sum(r[2] for r in rows))
        conn.execute("DROP TABLE psycopg_many")
        conn.commit()


def test_psycopg_pipeline_ending_in_flush_frees_the_backend_at_its_last_ready_for_query(pgmux) -> None:
    """psycopg ends every pipeline, and so its executemany, with a Flush that asks for no answer."""
    proxy = pgmux(default_pool_size=1, query_wait_timeout=3)
    with _connect(proxy, autocommit=True) as first, _connect(proxy, autocommit=True) as second:
        pid = first.execute("SELECT pg_backend_pid()").fetchone()[0]
        for step in ("pipeline", "executemany"):
            if step == "pipeline":
                with first.pipeline():
                    first.execute("SELECT 1")
            else:
                with first.cursor() as cur:
                    cur.executemany("SELECT %s::int", [(1,), (2,)])
            started = time.monotonic()
            # The only backend is free at once: the first client sits idle between transactions.
            assert second.execute("SELECT pg_backend_pid()").fetchone() == (pid,), step
            assert time.monotonic() - started < 1.0, f"after {step}: waited {time.monotonic() - started:.1f}s"
        assert first.execute("SELECT pg_backend_pid()").fetchone() == (pid,)
    with _connect(proxy) as third:
        assert third.execute("SELECT pg_backend_pid()").fetchone() == (pid,)  # never closed at disconnect
    assert proxy.call(lambda p: sum(pool.stats.server_connects for pool in p.router.pools.values())) == 1


def test_psycopg_named_cursor_streams_inside_a_transaction(pgmux) -> None:
    proxy = pgmux(default_pool_size=1)
    with _connect(proxy, autocommit=True) as conn, _connect(proxy, autocommit=True) as other:
        with conn.transaction():
            pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
            with conn.cursor(name="psycopg_stream") as cur:
                cur.itersize = 500  # FETCH FORWARD 500 at a time from the DECLAREd cursor
                cur.execute("SELECT n, repeat('x', n % 50) FROM generate_series(1, 20000) AS n")
                total = count = 0
                for n, text in cur:
                    total += n
                    count += 1
                    assert len(text) == n % 50
                assert (count, total) == (20_000, sum(range(1, 20_001)))
            with conn.cursor(name="psycopg_scroll", scrollable=True) as cur:
                cur.execute("SELECT generate_series(1, 100)")
                cur.scroll(90, mode="absolute")
                assert cur.fetchone() == (91,)
                cur.scroll(-50)
                assert cur.fetchmany(2) == [(42,), (43,)]
            # The cursor's FETCHes all ran on one backend: the transaction kept it.
            assert conn.execute("SELECT pg_backend_pid()").fetchone()[0] == pid
        # Outside the transaction the single backend is free for the other client again.
        assert other.execute("SELECT pg_backend_pid()").fetchone()[0] == pid


def test_psycopg_binary_and_text_results_round_trip_types(pgmux) -> None:
    proxy = pgmux(default_pool_size=1)
    values = (
        42, 2**40, 3.5, decimal.Decimal("12345678901234567890.000000001"), "ünïcødé ✓", b"\x00\xff" * 1000,
        datetime.datetime(2024, 2, 29, 23, 59, 59, 123456, tzinfo=datetime.timezone.utc),
        datetime.date(1999, 12, 31), [1, 2, None, 4], {"k": [1, "two", None]}, None, True,
    )
    query = ("SELECT %s::int4, %s::int8, %s::float8, %s::numeric, %s::text, %s::bytea, %s::timestamptz, "
             "%s::date, %s::int4[], %s::jsonb, %s::text, %s::bool")
    with _connect(proxy) as conn:
        conn.execute("SET TimeZone = 'UTC'")
        params = list(values)
        params[9] = Jsonb(values[9])
        for binary in (False, True):
            with conn.cursor(binary=binary) as cur:
                assert cur.execute(query, params).fetchone() == values, f"binary={binary}"


def test_psycopg_sql_composition_and_errors_keep_the_connection_usable(pgmux) -> None:
    proxy = pgmux(default_pool_size=1)
    with _connect(proxy, autocommit=True) as conn:
        with pytest.raises(psycopg.errors.DivisionByZero):
            conn.execute("SELECT 1/0")
        with pytest.raises(psycopg.errors.InvalidTextRepresentation):
            conn.execute("SELECT %s::int", ("nope",))
        with pytest.raises(psycopg.errors.UndefinedTable):
            with conn.transaction():
                conn.execute(sql.SQL("SELECT * FROM {}").format(sql.Identifier("no_such_table")))
        assert conn.info.transaction_status is psycopg.pq.TransactionStatus.IDLE
        assert conn.execute(sql.SQL("SELECT {} + %s").format(sql.Literal(40)), (2,)).fetchone() == (42,)


def test_100_async_psycopg_connections_share_4_backends(pgmux, postgres) -> None:
    proxy = pgmux(default_pool_size=4, query_wait_timeout=60)
    sampler = BackendSampler(postgres, APP_DATABASE, proxy)
    sampler.wait_until_no_backends()

    async def client(i: int) -> tuple[int, int, str]:
        async with await _aconnect(proxy, application_name=f"psycopg-{i}") as conn:
            async with conn.transaction():
                cur = await conn.execute("SELECT %s::int * 3, pg_sleep(0.002)", (i,))
                tripled = (await cur.fetchone())[0]
                cur = await conn.execute("SELECT count(*) FROM generate_series(1, %s)", (i + 1,))
                counted = (await cur.fetchone())[0]
            cur = await conn.execute("SHOW application_name")
            name = (await cur.fetchone())[0]
            await conn.commit()
            return tripled, counted, name

    async def scenario() -> list[tuple[int, int, str]]:
        return await asyncio.wait_for(asyncio.gather(*(client(i) for i in range(100))), 60)

    with sampler.running():
        results = asyncio.run(scenario())
    assert results == [(i * 3, i + 1, f"psycopg-{i}") for i in range(100)]
    seen_by_postgres, held_by_pgmux = sampler.peak()
    assert seen_by_postgres <= 4
    assert held_by_pgmux <= 4


def test_async_psycopg_executemany_and_named_cursor(pgmux) -> None:
    proxy = pgmux(default_pool_size=2)

    async def scenario() -> tuple[int, int]:
        async with await _aconnect(proxy) as conn:
            await conn.execute("DROP TABLE IF EXISTS psycopg_async")
            await conn.execute("CREATE TABLE psycopg_async (id int PRIMARY KEY, payload jsonb)")
            async with conn.cursor() as cur:
                await cur.executemany("INSERT INTO psycopg_async VALUES (%s, %s)",
                                      [(i, Jsonb({"i": i})) for i in range(500)])
            await conn.commit()
            async with conn.transaction():
                async with conn.cursor(name="psycopg_async_stream") as cur:
                    cur.itersize = 64
                    await cur.execute("SELECT id, payload FROM psycopg_async ORDER BY id")
                    seen = total = 0
                    async for row_id, payload in cur:
                        assert payload == {"i": row_id}
                        seen += 1
                        total += row_id
            await conn.execute("DROP TABLE psycopg_async")
            await conn.commit()
            return seen, total

    assert asyncio.run(scenario()) == (500, sum(range(500)))


def test_psycopg_pool_threads_through_pgmux(pgmux, postgres) -> None:
    psycopg_pool = pytest.importorskip("psycopg_pool", reason="psycopg_pool is not installed")
    proxy = pgmux(default_pool_size=4)
    sampler = BackendSampler(postgres, APP_DATABASE, proxy)
    sampler.wait_until_no_backends()
    pool = psycopg_pool.ConnectionPool(proxy.dsn(APP.name, APP.password, APP_DATABASE), min_size=2, max_size=20,
                                       kwargs={"prepare_threshold": None}, open=False, timeout=30)

    def job(i: int) -> int:
        with pool.connection() as conn:
            return conn.execute("SELECT %s::int + 1", (i,)).fetchone()[0]

    with sampler.running():
        pool.open(wait=True, timeout=30)
        try:
            with ThreadPoolExecutor(max_workers=20) as executor:
                results = list(executor.map(job, range(300)))
        finally:
            pool.close(timeout=10)
    assert results == [i + 1 for i in range(300)]
    seen_by_postgres, held_by_pgmux = sampler.peak()
    assert seen_by_postgres <= 4
    assert held_by_pgmux <= 4
