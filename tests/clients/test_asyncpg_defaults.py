"""asyncpg as applications use it through pgmux: pools, COPY, typed values, server_settings at connect.

statement_cache_size=0 until named prepared statements are pooled; everything else is asyncpg's default.
"""

from __future__ import annotations

import asyncio
import datetime
import decimal
import hashlib
import io
import json
import os
import time
import uuid
from typing import Any

import asyncpg
import pytest

from clientsupport import BackendSampler
from pgusers import APP, APP_DATABASE


def _params(proxy, **kwargs: Any) -> dict[str, Any]:
    kwargs.setdefault("statement_cache_size", 0)
    return dict(host=proxy.host, port=proxy.port(), user=APP.name, password=APP.password, database=APP_DATABASE,
                timeout=10, **kwargs)


async def _connect(proxy, **kwargs: Any) -> asyncpg.Connection:
    return await asyncpg.connect(**_params(proxy, **kwargs))


def test_asyncpg_pool_of_20_runs_300_tasks_on_5_backends(pgmux, postgres) -> None:
    proxy = pgmux(default_pool_size=5, query_wait_timeout=60)
    sampler = BackendSampler(postgres, APP_DATABASE, proxy)
    sampler.wait_until_no_backends()

    async def scenario() -> tuple[list[int], list[int]]:
        async with asyncpg.create_pool(**_params(proxy), min_size=5, max_size=20) as pool:
            async def in_transaction(i: int) -> int:
                async with pool.acquire() as conn:
                    async with conn.transaction():
                        await conn.execute("SELECT pg_sleep(0.001)")
                        return await conn.fetchval("SELECT $1::int * 2", i)

            doubled = await asyncio.gather(*(in_transaction(i) for i in range(300)))
            # Pool shortcuts acquire and release (asyncpg resets the connection on release) around each call.
            fetched = await asyncio.gather(*(pool.fetchval("SELECT $1::int + 1", i) for i in range(100)))
            return list(doubled), list(fetched)

    with sampler.running():
        doubled, fetched = asyncio.run(asyncio.wait_for(scenario(), 60))
    assert doubled == [i * 2 for i in range(300)]
    assert fetched == [i + 1 for i in range(100)]
    seen_by_postgres, held_by_pgmux = sampler.peak()
    assert seen_by_postgres <= 5
    assert held_by_pgmux <= 5


def test_asyncpg_copy_records_to_table_and_copy_from_query(pgmux, tmp_path) -> None:
    proxy = pgmux(default_pool_size=2)
    records = [(i, f"name {i}", decimal.Decimal(i) / 8, None if i % 7 == 0 else [i, -i]) for i in range(50_000)]

    async def scenario() -> None:
        conn = await _connect(proxy)
        try:
            await conn.execute("DROP TABLE IF EXISTS asyncpg_copy")
            await conn.execute("CREATE TABLE asyncpg_copy (id int PRIMARY KEY, name text, share numeric, pair int[])")
            # Binary COPY FROM STDIN, after asyncpg looks up the table's column types.
            status = await conn.copy_records_to_table("asyncpg_copy", records=records,
                                                      columns=["id", "name", "share", "pair"])
            assert status == "COPY 50000"
            assert await conn.fetchval("SELECT count(*) FROM asyncpg_copy WHERE pair IS NULL") == len(
                [r for r in records if r[3] is None])

            # COPY (query) TO STDOUT into a file, a file object and a callback.
            path = tmp_path / "copy.csv"
            status = await conn.copy_from_query("SELECT id, name FROM asyncpg_copy WHERE id < $1 ORDER BY id", 1000,
                                                output=str(path), format="csv")
            assert status == "COPY 1000"
            assert path.read_text().splitlines() == [f"{i},name {i}" for i in range(1000)]

            buffer = io.BytesIO()
            await conn.copy_from_table("asyncpg_copy", columns=["id"], output=buffer)
            assert sorted(int(line) for line in buffer.getvalue().split()) == list(range(50_000))

            chunks: list[bytes] = []

            async def sink(chunk: bytes) -> None:
                chunks.append(chunk)

            await conn.copy_from_query("SELECT repeat('y', 1000) FROM generate_series(1, 2000)", output=sink)
            assert b"".join(chunks) == (b"y" * 1000 + b"\n") * 2000

            # The connection is still an ordinary one after all that COPY traffic.
            row = await conn.fetchrow("SELECT sum(id) AS ids, sum(share) AS shares FROM asyncpg_copy")
            assert row["ids"] == sum(range(50_000))
            assert row["shares"] == sum(r[2] for r in records)
            await conn.execute("DROP TABLE asyncpg_copy")
        finally:
            await conn.close()

    asyncio.run(asyncio.wait_for(scenario(), 60))


def test_asyncpg_typed_values_round_trip(pgmux) -> None:
    proxy = pgmux(default_pool_size=1)
    blob = os.urandom(1024 * 1024)
    document = {"name": "ünïcødé ✓", "nested": {"list": [1, 2.5, None, True], "empty": {}}, "n": 10**20}
    moment = datetime.datetime(2024, 2, 29, 23, 59, 59, 999999, tzinfo=datetime.timezone(datetime.timedelta(hours=5)))
    identifier = uuid.uuid4()
    numbers = [decimal.Decimal("0"), decimal.Decimal("-1.5"), decimal.Decimal("123456789012345678901234567890.123456789"),
               decimal.Decimal("NaN")]

    async def scenario() -> None:
        conn = await _connect(proxy)
        try:
            await conn.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")
            row = await conn.fetchrow(
                "SELECT $1::jsonb AS doc, $2::numeric[] AS numbers, $3::timestamptz AS moment, $4::uuid AS id, "
                "$5::bytea AS blob, $6::int[] AS ints, $7::text[] AS texts, $8::int[][] AS grid, "
                "$9::interval AS span, $10::date AS day, $11::bigint AS big, $12::float8 AS real",
                document, numbers, moment, identifier, blob, [1, None, 3], ["a", None, "ü,\"}"], [[1, 2], [3, 4]],
                datetime.timedelta(days=3, microseconds=7), datetime.date(1, 1, 1), -(2**63), float("inf"))
            assert row["doc"] == document
            assert row["numbers"][:3] == numbers[:3] and row["numbers"][3].is_nan()
            assert row["moment"] == moment
            assert row["id"] == identifier
            assert row["blob"] == blob
            assert row["ints"] == [1, None, 3]
            assert row["texts"] == ["a", None, "ü,\"}"]
            assert row["grid"] == [[1, 2], [3, 4]]
            assert row["span"] == datetime.timedelta(days=3, microseconds=7)
            assert row["day"] == datetime.date(1, 1, 1)
            assert row["big"] == -(2**63)
            assert row["real"] == float("inf")

            # The same values stored and read back from a table, and a 1 MB bytea computed by the server.
            await conn.execute("DROP TABLE IF EXISTS asyncpg_types")
            await conn.execute("CREATE TABLE asyncpg_types (id uuid PRIMARY KEY, doc jsonb, blob bytea, at timestamptz)")
            await conn.execute("INSERT INTO asyncpg_types VALUES ($1, $2, $3, $4)", identifier, document, blob, moment)
            stored = await conn.fetchrow("SELECT doc, blob, at, md5(blob) AS digest FROM asyncpg_types WHERE id = $1",
                                         identifier)
            assert (stored["doc"], stored["blob"], stored["at"]) == (document, blob, moment)
            assert stored["digest"] == hashlib.md5(blob).hexdigest()
            generated = await conn.fetchval("SELECT decode(repeat('ab', 1024 * 1024), 'hex')")
            assert generated == b"\xab" * (1024 * 1024)
            await conn.execute("DROP TABLE asyncpg_types")
        finally:
            await conn.close()

    asyncio.run(asyncio.wait_for(scenario(), 60))


def test_asyncpg_server_settings_at_connect_hold_on_a_shared_backend(pgmux) -> None:
    proxy = pgmux(default_pool_size=1)

    async def scenario() -> None:
        custom = await _connect(proxy, server_settings={"application_name": "x", "search_path": "public"})
        plain = await _connect(proxy)
        try:
            # One backend serves both clients in turn; each sees its own settings every time.
            for _ in range(5):
                assert await custom.fetchval("SHOW application_name") == "x"
                assert await custom.fetchval("SHOW search_path") == "public"
                assert await plain.fetchval("SHOW application_name") == ""
                assert await plain.fetchval("SHOW search_path") == '"$user", public'
            assert await custom.fetchval("SELECT pg_backend_pid()") == await plain.fetchval("SELECT pg_backend_pid()")
            assert await custom.fetchval(
                "SELECT application_name FROM pg_stat_activity WHERE pid = pg_backend_pid()") == "x"
            assert custom.get_settings().application_name == "x"
        finally:
            await custom.close()
            await plain.close()

    asyncio.run(asyncio.wait_for(scenario(), 30))


def test_asyncpg_pool_keeps_server_settings_after_its_reset_on_release(pgmux, postgres) -> None:
    """asyncpg's Pool runs `RESET ALL` (with CLOSE ALL, UNLISTEN *) when a connection is released.

    Against PostgreSQL RESET ALL returns to the session defaults, which include the startup
    packet's settings; through pgmux the connection must look the same on its next acquire.
    """
    proxy = pgmux(default_pool_size=2)
    settings = {"application_name": "x", "search_path": "public", "TimeZone": "Asia/Tokyo"}

    async def observed(host: str, port: int) -> list[tuple[str, str, str]]:
        params = _params(proxy, server_settings=settings) | {"host": host, "port": port}
        async with asyncpg.create_pool(**params, min_size=1, max_size=1) as pool:
            seen = []
            for _ in range(3):
                async with pool.acquire() as conn:
                    seen.append((await conn.fetchval("SHOW application_name"), await conn.fetchval("SHOW search_path"),
                                 await conn.fetchval("SHOW TimeZone")))
            return seen

    direct = asyncio.run(asyncio.wait_for(observed(postgres.host, postgres.port), 30))
    assert direct == [("x", "public", "Asia/Tokyo")] * 3  # what PostgreSQL itself does
    assert asyncio.run(asyncio.wait_for(observed(proxy.host, proxy.port()), 30)) == direct


@pytest.mark.parametrize("isolation", ["read_committed", "repeatable_read", "serializable"])
def test_asyncpg_transaction_options_and_savepoints(pgmux, isolation) -> None:
    proxy = pgmux(default_pool_size=1)

    async def scenario() -> None:
        conn = await _connect(proxy)
        try:
            await conn.execute("DROP TABLE IF EXISTS asyncpg_tx; CREATE TABLE asyncpg_tx (x int)")
            async with conn.transaction(isolation=isolation):
                assert await conn.fetchval("SHOW transaction_isolation") == isolation.replace("_", " ")
                await conn.execute("INSERT INTO asyncpg_tx VALUES (1)")
                with pytest.raises(asyncpg.UniqueViolationError):
                    async with conn.transaction():  # a SAVEPOINT inside the outer transaction
                        await conn.execute("INSERT INTO asyncpg_tx VALUES (2)")
                        raise asyncpg.UniqueViolationError("roll back to the savepoint")
                await conn.execute("INSERT INTO asyncpg_tx VALUES (3)")
            assert [r["x"] for r in await conn.fetch("SELECT x FROM asyncpg_tx ORDER BY x")] == [1, 3]
            async with conn.transaction(readonly=True):
                with pytest.raises(asyncpg.ReadOnlySQLTransactionError):
                    await conn.execute("INSERT INTO asyncpg_tx VALUES (4)")
            assert await conn.fetchval("SELECT count(*) FROM asyncpg_tx") == 2
            await conn.execute("DROP TABLE asyncpg_tx")
        finally:
            await conn.close()

    asyncio.run(asyncio.wait_for(scenario(), 30))


def test_asyncpg_close_returns_at_once_while_every_backend_is_busy(pgmux) -> None:
    # asyncpg's close() sends Terminate and waits for the server side to hang up.
    proxy = pgmux(default_pool_size=1, query_wait_timeout=4)

    async def scenario() -> float:
        holder = await _connect(proxy)
        leaver = await _connect(proxy)
        try:
            await holder.execute("BEGIN")  # the only backend stays in this transaction while the other leaves
            started = asyncio.get_running_loop().time()
            await leaver.close(timeout=20)
            took = asyncio.get_running_loop().time() - started
            await holder.execute("COMMIT")
            return took
        finally:
            leaver.terminate()
            await holder.close()

    took = asyncio.run(asyncio.wait_for(scenario(), 30))
    assert took < 2, f"close() took {took:.1f} s: the goodbye waited in line for a backend"


def test_asyncpg_close_of_one_client_never_changes_what_another_client_sees(pgmux) -> None:
    proxy = pgmux(default_pool_size=1)

    async def scenario() -> str:
        mine = await _connect(proxy, server_settings={"application_name": "mine"})
        leaver = await _connect(proxy, server_settings={"application_name": "leaver"})
        try:
            assert await mine.fetchval("SHOW application_name") == "mine"  # the only backend now says "mine"
            # Stall pgmux's loop briefly so the leaver's Terminate and our next Query reach it together,
            # as they do under load: pgmux must still run our query with our settings.
            proxy.loop.call_soon_threadsafe(time.sleep, 0.3)
            await asyncio.sleep(0.05)
            closing = asyncio.ensure_future(leaver.close(timeout=10))
            await asyncio.sleep(0.05)
            seen = await mine.fetchval("SHOW application_name")
            await closing
            return seen
        finally:
            leaver.terminate()
            await mine.close()

    assert asyncio.run(asyncio.wait_for(scenario(), 30)) == "mine"
