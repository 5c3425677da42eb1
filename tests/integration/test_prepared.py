"""Named prepared statements in transaction mode, with drivers at their default settings."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import subprocess
import time
from collections.abc import AsyncIterator

import asyncpg
import psycopg
import pytest

from pgusers import APP, APP_DATABASE
from proxy.embedded import postgres_bin_dir


async def _connect(proxy, **kwargs) -> asyncpg.Connection:
    # Note: no statement_cache_size=0 here — asyncpg's default named-statement cache is the point.
    return await asyncpg.connect(host=proxy.host, port=proxy.port(), user=APP.name, password=APP.password,
                                 database=APP_DATABASE, **kwargs)


def _prepared_counters(proxy) -> tuple[int, int, int]:
    def read(p):
        hits = misses = evictions = 0
        for pool in p.router.pools.values():
            counters = pool.stats.prepared
            hits, misses, evictions = hits + counters.hits, misses + counters.misses, evictions + counters.evictions
        return hits, misses, evictions
    return proxy.call(read)


def test_asyncpg_statement_cache_works_with_50_clients_on_4_backends(pgmux) -> None:
    proxy = pgmux(default_pool_size=4)
    statements = [f"SELECT $1::int + {i}" for i in range(20)]

    async def client(n: int) -> int:
        conn = await _connect(proxy)
        total = 0
        try:
            for round_ in range(3):
                for i, sql in enumerate(statements):
                    total += await conn.fetchval(sql, n) - n - i
            async with conn.transaction():
                for sql in statements[:5]:
                    await conn.fetchval(sql, n)
        finally:
            await conn.close()
        return total

    async def scenario() -> list[int]:
        return await asyncio.gather(*(client(n) for n in range(50)))

    assert asyncio.run(scenario()) == [0] * 50
    hits, misses, _ = _prepared_counters(proxy)
    assert hits > 50 * 20  # named statements were found on the backends the clients got


def test_explicit_prepare_is_reused_across_transactions(pgmux) -> None:
    proxy = pgmux(default_pool_size=2)

    async def scenario() -> None:
        conn = await _connect(proxy)
        busy = [await _connect(proxy) for _ in range(2)]
        statement = await conn.prepare("SELECT $1::text || '!' AS shout")
        for i in range(20):
            if i % 5 == 0:  # move conn to another backend now and then
                for other in busy:
                    await other.fetchval("SELECT 1")
            assert await statement.fetchval(f"hey{i}") == f"hey{i}!"
            async with conn.transaction():
                assert await statement.fetchval("in") == "in!"
        assert [a.name for a in statement.get_attributes()] == ["shout"]
        for c in [conn, *busy]:
            await c.close()

    asyncio.run(scenario())
    hits, misses, _ = _prepared_counters(proxy)
    assert misses >= 1  # the statement was injected on the second backend when conn moved there


def test_psycopg_prepares_after_threshold_and_with_threshold_zero(pgmux) -> None:
    proxy = pgmux(default_pool_size=2)
    dsn = proxy.dsn(APP.name, APP.password, APP_DATABASE)
    for threshold in (5, 0):
        conns = [psycopg.connect(dsn, prepare_threshold=threshold, autocommit=True) for _ in range(4)]
        for i in range(30):
            for n, conn in enumerate(conns):
                assert conn.execute("SELECT %s::int * 3", (i + n,)).fetchone() == ((i + n) * 3,)
        with conns[0].transaction():
            assert conns[0].execute("SELECT %s::int * 3", (7,)).fetchone() == (21,)
        for conn in conns:
            conn.close()
    hits, misses, _ = _prepared_counters(proxy)
    assert hits > 0  # the drivers' named statements were rewritten and found on the backends


def _process_dsn(pgmux_process) -> str:
    # libpq's blocking calls (pgconn.prepare) hold the GIL, which an in-process pgmux needs.
    port = pgmux_process().ports()[0]
    return f"postgresql://{APP.name}:{APP.password}@127.0.0.1:{port}/{APP_DATABASE}"


def test_redefining_a_name_fails_like_postgres_unless_closed_first(pgmux_process) -> None:
    with psycopg.connect(_process_dsn(pgmux_process), autocommit=True) as conn:
        conn.execute("PREPARE ignored AS SELECT 1")  # SQL PREPARE passes through (session state)
        pgconn = conn.pgconn
        pgconn.prepare(b"s1", b"SELECT 1")
        result = pgconn.prepare(b"s1", b"SELECT 2")
        assert result.error_field(psycopg.pq.DiagnosticField.SQLSTATE) == b"42P05"
        assert pgconn.close_prepared(b"s1").status == psycopg.pq.ExecStatus.COMMAND_OK
        assert pgconn.prepare(b"s1", b"SELECT 2").status == psycopg.pq.ExecStatus.COMMAND_OK
        out = pgconn.exec_prepared(b"s1", [])
        assert out.get_value(0, 0) == b"2"
        missing = pgconn.exec_prepared(b"nope", [])
        assert missing.error_field(psycopg.pq.DiagnosticField.SQLSTATE) == b"26000"


def test_failed_parse_leaves_no_name_behind(pgmux_process) -> None:
    with psycopg.connect(_process_dsn(pgmux_process), autocommit=True) as conn:
        pgconn = conn.pgconn
        bad = pgconn.prepare(b"s2", b"SELEC 1")
        assert bad.error_field(psycopg.pq.DiagnosticField.SQLSTATE) == b"42601"
        assert pgconn.prepare(b"s2", b"SELECT 5").status == psycopg.pq.ExecStatus.COMMAND_OK
        assert pgconn.exec_prepared(b"s2", []).get_value(0, 0) == b"5"


def test_deallocate_all_clears_the_clients_names(pgmux_process) -> None:
    with psycopg.connect(_process_dsn(pgmux_process), autocommit=True) as conn:
        pgconn = conn.pgconn
        pgconn.prepare(b"s3", b"SELECT 3")
        conn.execute("DEALLOCATE ALL")
        assert pgconn.exec_prepared(b"s3", []).error_field(psycopg.pq.DiagnosticField.SQLSTATE) == b"26000"
        assert pgconn.prepare(b"s3", b"SELECT 33").status == psycopg.pq.ExecStatus.COMMAND_OK
        assert pgconn.exec_prepared(b"s3", []).get_value(0, 0) == b"33"


def test_the_last_client_holding_a_statement_closes_it_on_the_backend(pgmux_process) -> None:
    port = pgmux_process(PGMUX_DEFAULT_POOL_SIZE="1").ports()[0]
    dsn = f"postgresql://{APP.name}:{APP.password}@127.0.0.1:{port}/{APP_DATABASE}"
    with psycopg.connect(dsn, autocommit=True) as first, psycopg.connect(dsn, autocommit=True) as second:
        def held() -> int:  # on the one backend both use
            return first.execute("SELECT count(*) FROM pg_prepared_statements WHERE statement = 'SELECT 41'"
                                 ).fetchone()[0]
        ok = psycopg.pq.ExecStatus.COMMAND_OK
        assert first.pgconn.prepare(b"mine", b"SELECT 41").status == ok
        assert second.pgconn.prepare(b"theirs", b"SELECT 41").status == ok
        assert held() == 1  # one server statement for both
        assert first.pgconn.close_prepared(b"mine").status == ok
        assert held() == 1  # the other client still holds it
        assert second.pgconn.exec_prepared(b"theirs", []).get_value(0, 0) == b"41"
        assert second.pgconn.close_prepared(b"theirs").status == ok
        assert held() == 0  # nobody holds it: closed on the backend
        missing = second.pgconn.exec_prepared(b"theirs", [])
        assert missing.error_field(psycopg.pq.DiagnosticField.SQLSTATE) == b"26000"
        assert second.pgconn.prepare(b"theirs", b"SELECT 41").status == ok  # and it can be made again
        assert second.pgconn.exec_prepared(b"theirs", []).get_value(0, 0) == b"41"


def test_discard_all_padded_past_the_held_head_is_told_from_one_that_fails(pgmux_process) -> None:
    # A simple Query over 64 KiB streams on after its head, unless it could still be DISCARD ALL or
    # DEALLOCATE ALL padded with whitespace: that one is held whole and judged on all of its text.
    dsn = _process_dsn(functools.partial(pgmux_process, PGMUX_DEFAULT_POOL_SIZE="1"))
    with psycopg.connect(dsn, autocommit=True) as conn:
        pgconn = conn.pgconn
        assert pgconn.prepare(b"s4", b"SELECT 4").status == psycopg.pq.ExecStatus.COMMAND_OK
        # Not a DISCARD ALL after all (it fails: a multi-statement Query is a transaction block).
        # A megabyte of whitespace: judging it must take linear time, not stall pgmux for hours.
        started = time.monotonic()
        with pytest.raises(psycopg.errors.ActiveSqlTransaction):
            conn.execute("DISCARD ALL" + " " * 1_000_000 + "; SELECT 1")
        assert time.monotonic() - started < 10
        assert pgconn.exec_prepared(b"s4", []).get_value(0, 0) == b"4"  # the name still works
        conn.execute("DISCARD" + " " * 100_000 + "ALL")  # the ALL beyond the head
        missing = pgconn.exec_prepared(b"s4", [])
        assert missing.error_field(psycopg.pq.DiagnosticField.SQLSTATE) == b"26000"
        assert b'"s4"' in missing.error_field(psycopg.pq.DiagnosticField.MESSAGE_PRIMARY)
        # The server lost its statements too: the same text under a new name is prepared there afresh.
        assert pgconn.prepare(b"s5", b"SELECT 4").status == psycopg.pq.ExecStatus.COMMAND_OK
        assert pgconn.exec_prepared(b"s5", []).get_value(0, 0) == b"4"


def test_named_statements_past_the_held_head_are_held_whole_and_prepared_on_other_backends(pgmux) -> None:
    proxy = pgmux(default_pool_size=2, max_client_buffer="1MiB")
    dsn = proxy.dsn(APP.name, APP.password, APP_DATABASE)
    text = "SELECT length(%s) + length('" + "z" * 200_000 + "')"
    with psycopg.connect(dsn, autocommit=True) as conn, psycopg.connect(dsn, autocommit=True) as holder:
        parameter = "p" * 300_000  # a Bind past the head too
        assert conn.execute(text, [parameter], prepare=True).fetchone() == (500_000,)
        # Hold the backend the statement was prepared on: the next run is on the other one, where
        # pgmux prepares it first from the Parse it kept.
        holder.execute("BEGIN")
        holder.execute("SELECT 1")
        assert conn.execute(text, ["q"], prepare=True).fetchone() == (200_001,)
        holder.execute("COMMIT")
    _, misses, _ = _prepared_counters(proxy)
    assert misses >= 1


def test_named_parse_over_max_client_buffer_is_refused_with_54000_and_unnamed_ones_stream(pgmux) -> None:
    proxy = pgmux(max_client_buffer="128KiB")
    dsn = proxy.dsn(APP.name, APP.password, APP_DATABASE)
    text = "SELECT length('" + "z" * 300_000 + "')"
    with psycopg.connect(dsn, autocommit=True) as conn:
        # Unnamed, the same text and a large parameter stream through: nothing is held whole.
        assert conn.execute(text + " + length(%s)", ["p" * 300_000], prepare=False).fetchone() == (600_000,)
    with psycopg.connect(dsn, autocommit=True) as conn:
        with pytest.raises(psycopg.Error, match=r"max_client_buffer=131072") as refused:
            conn.execute(text, prepare=True)
        assert refused.value.sqlstate == "54000"
        assert conn.closed or conn.broken
    assert proxy.call(lambda p: dict(p.registry.rejections)).get("max_client_buffer") == 1


def test_many_distinct_statements_never_exceed_max_prepared_statements_per_server(pgmux, postgres) -> None:
    proxy = pgmux(default_pool_size=1, max_prepared_statements=50)

    async def scenario() -> None:
        conn = await _connect(proxy, statement_cache_size=2000)
        for i in range(1000):
            assert await conn.fetchval(f"SELECT {i}::int") == i
        # The one backend: its statements, seen by PostgreSQL itself.
        held = await conn.fetchval("SELECT count(*) FROM pg_prepared_statements WHERE name LIKE 'pgmux_%'")
        assert held <= 50 + 1
        await conn.close()

    asyncio.run(scenario())
    _, _, evictions = _prepared_counters(proxy)
    assert evictions >= 1000 - 51


def test_schema_change_reaches_asyncpg_which_reprepares(pgmux) -> None:
    proxy = pgmux(default_pool_size=2)

    async def scenario() -> None:
        conn = await _connect(proxy)
        await conn.execute("DROP TABLE IF EXISTS shifting; CREATE TABLE shifting (a int)")
        await conn.execute("INSERT INTO shifting VALUES (1)")
        assert (await conn.fetchrow("SELECT * FROM shifting"))["a"] == 1
        await conn.execute("ALTER TABLE shifting ADD COLUMN b text DEFAULT 'x'")
        # asyncpg sees 0A000 (or reloads its cache on the first try) and re-prepares: it must work.
        row = await conn.fetchrow("SELECT * FROM shifting")
        assert dict(row) == {"a": 1, "b": "x"}
        await conn.execute("DROP TABLE shifting")
        await conn.close()

    asyncio.run(scenario())


def test_pgbench_prepared_mode_has_no_failed_transactions(pgmux, postgres) -> None:
    proxy = pgmux(default_pool_size=5)
    bin_dir = postgres_bin_dir()
    env = {"PGPASSWORD": APP.password, "PATH": "/usr/bin:/bin"}
    common = ["-h", "127.0.0.1", "-U", APP.name]
    subprocess.run([str(bin_dir / "pgbench"), "-i", "-s", "1", "-q", *common, "-p", str(postgres.port), APP_DATABASE],
                   env=env, check=True, capture_output=True, timeout=120)
    run = subprocess.run([str(bin_dir / "pgbench"), "-S", "-M", "prepared", "-c", "10", "-j", "2", "-t", "200",
                          *common, "-p", str(proxy.port()), APP_DATABASE],
                         env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "number of failed transactions: 0" in run.stdout
    assert "number of transactions actually processed: 2000/2000" in run.stdout


def test_session_mode_passes_named_statements_through_unchanged(pgmux) -> None:
    proxy = pgmux(listeners=[{"address": "127.0.0.1:0", "pool_mode": "session"}])

    async def scenario() -> None:
        conn = await asyncpg.connect(host=proxy.host, port=proxy.port(1), user=APP.name, password=APP.password,
                                     database=APP_DATABASE)
        statement = await conn.prepare("SELECT $1::int * 2")
        assert await statement.fetchval(21) == 42
        # The backend holds the driver's own statement name: nothing was renamed.
        names = await conn.fetch("SELECT name FROM pg_prepared_statements")
        assert names and not any(row["name"].startswith("pgmux_") for row in names)
        await conn.close()

    asyncio.run(scenario())
    assert _prepared_counters(proxy) == (0, 0, 0)


@pytest.mark.slow
def test_10000_distinct_statements_leave_at_most_max_prepared_statements_per_server(pgmux) -> None:
    proxy = pgmux(default_pool_size=2, max_prepared_statements=100)

    async def scenario() -> list[int]:
        conns = [await _connect(proxy, statement_cache_size=100) for _ in range(4)]

        async def run(conn: asyncpg.Connection, start: int) -> None:
            for i in range(start, 10_000, len(conns)):
                assert await conn.fetchval(f"SELECT {i}::bigint") == i

        await asyncio.gather(*(run(conn, n) for n, conn in enumerate(conns)))
        held = []
        for _ in range(4):  # sample what the backends hold, as PostgreSQL itself reports it
            held.append(await conns[0].fetchval(
                "SELECT count(*) FROM pg_prepared_statements WHERE name LIKE 'pgmux_%'"))
        for conn in conns:
            await conn.close()
        return held

    held = asyncio.run(scenario())
    # Between transactions a server is trimmed to the limit; within one it may hold the few it just got.
    assert max(held) <= 100 + 1
    assert _prepared_counters(proxy)[2] >= 10_000 - 2 * 101


async def _drop_statements_from_another_client(proxy, how: str, sql: str) -> None:
    """Client B runs ``sql``, which may empty the backend it shares with everyone (pool of 1)."""
    if how == "psycopg_extended":
        # binary=True makes psycopg send Parse/Bind/Execute of an unnamed statement (pgjdbc's and
        # Npgsql's default way), not a simple Query.
        dsn = proxy.dsn(APP.name, APP.password, APP_DATABASE)
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            await conn.execute(sql, binary=True)
        return
    conn = await _connect(proxy)
    try:
        if how == "asyncpg_named_statement":
            await conn.fetch(sql)  # asyncpg's cache: a named Parse, then Bind/Execute of it
        else:
            await conn.execute(sql)  # no arguments: one simple Query
    finally:
        await conn.close()


@pytest.mark.parametrize(("how", "sql"), [
    ("psycopg_extended", "DEALLOCATE ALL"),
    ("asyncpg_named_statement", "DEALLOCATE ALL"),
    ("simple_query", "SELECT 1; DEALLOCATE ALL"),
    ("simple_query", "/* c */ DISCARD ALL"),
    ("simple_query", "select 1;\n-- tidy up\n  deallocate prepare all;"),
    ("simple_query", "discard plans"),
    ("simple_query", "DEALLOCATE ALL"),
])
def test_statements_dropped_by_one_client_never_fail_anothers_prepared_statements(pgmux, how, sql) -> None:
    proxy = pgmux(default_pool_size=1)
    statements = [f"SELECT $1::int * {factor}" for factor in range(1, 4)]

    async def run_all(conn: asyncpg.Connection) -> None:
        for factor, statement in enumerate(statements, 1):
            assert await conn.fetchval(statement, 7) == 7 * factor

    async def scenario() -> None:
        a = await _connect(proxy)
        try:
            for _ in range(3):
                await run_all(a)
                await _drop_statements_from_another_client(proxy, how, sql)
                await run_all(a)  # the backend lost them: pgmux prepares them there again
                c = await _connect(proxy)  # a newcomer shares the same server statements
                try:
                    await run_all(c)
                finally:
                    await c.close()
        finally:
            await a.close()

    asyncio.run(scenario())


def test_a_false_alarm_inside_a_transaction_leaves_its_prepared_statements_working(pgmux) -> None:
    # Any mention of DEALLOCATE/DISCARD makes pgmux forget the backend's statements; they must then
    # really be gone (pgmux deallocates them itself), or re-preparing one would fail with 42P05.
    proxy = pgmux(default_pool_size=1)

    async def scenario() -> None:
        conn = await _connect(proxy)
        try:
            assert await conn.fetchval("SELECT $1::int + 1", 1) == 2
            async with conn.transaction():
                assert await conn.fetchval("SELECT 'discard all'::text") == "discard all"
                assert await conn.fetchval("SELECT $1::int + 1", 2) == 3
                assert await conn.fetchval("SELECT $1::int + 2", 2) == 4
            assert await conn.fetchval("SELECT $1::int + 1", 3) == 4
        finally:
            await conn.close()

    asyncio.run(scenario())


@contextlib.asynccontextmanager
async def _user_and_forgetter(proxy) -> AsyncIterator[tuple[asyncpg.Connection, asyncpg.Connection]]:
    """Two clients; the second can run pgmux_test_forget(), which deallocates everything unseen by pgmux."""
    a = await _connect(proxy)
    b = await _connect(proxy)
    try:
        await b.execute("CREATE OR REPLACE FUNCTION pgmux_test_forget() RETURNS void LANGUAGE plpgsql "
                        "AS $$ BEGIN EXECUTE 'DEAL' || 'LOCATE ALL'; END $$")
        yield a, b
        await b.execute("DROP FUNCTION pgmux_test_forget()")
    finally:
        await a.close()
        await b.close()


def test_statements_lost_where_pgmux_cannot_see_it_are_prepared_again_without_an_error(pgmux) -> None:
    # A function deallocates behind pgmux's back: no DEALLOCATE/DISCARD in the client's text. The
    # backend's 26000 about a pgmux_ statement tells pgmux its record is wrong; outside a transaction
    # nothing of the failed request has run, so pgmux prepares the statements again and re-sends it.
    proxy = pgmux(default_pool_size=1)

    async def scenario() -> None:
        async with _user_and_forgetter(proxy) as (a, b):
            assert await a.fetchval("SELECT $1::int * 5", 2) == 10
            assert await a.fetchval("SELECT $1::int * 7", 2) == 14
            for attempt in range(3):
                await b.execute("SELECT pgmux_test_forget()")
                # Bind/Execute/Sync of a statement a has prepared: the first answer is the 26000.
                assert await a.fetchval("SELECT $1::int * 5", attempt) == 5 * attempt
                assert await a.fetchval("SELECT $1::int * 7", attempt) == 7 * attempt
                await b.execute("SELECT pgmux_test_forget()")
                # A newcomer's Parse of a statement the backend is believed to hold, then its Describe:
                # the ParseComplete comes before the 26000, and must not reach the client twice.
                c = await _connect(proxy)
                try:
                    assert await c.fetchval("SELECT $1::int * 5", 3) == 15
                    assert await c.fetch("SELECT $1::int * 7 AS n", 3) == [(21,)]
                finally:
                    await c.close()

    asyncio.run(scenario())


def test_statements_lost_inside_a_transaction_fail_that_transaction_once_then_work_again(pgmux) -> None:
    # Inside a transaction the 26000 has aborted it: PostgreSQL's answer stands (re-sending would run
    # in an aborted block), and the statements are prepared again for the next use.
    proxy = pgmux(default_pool_size=1)

    async def use(conn: asyncpg.Connection, n: int) -> None:
        async with conn.transaction():
            assert await conn.fetchval("SELECT $1::int * 5", n) == 5 * n

    async def scenario() -> None:
        async with _user_and_forgetter(proxy) as (a, b):
            assert await a.fetchval("SELECT $1::int * 5", 2) == 10
            await b.execute("SELECT pgmux_test_forget()")
            failures = 0
            for attempt in range(5):
                try:
                    await use(a, attempt)
                except asyncpg.InvalidSQLStatementNameError:
                    failures += 1
            assert failures == 1
            c = await _connect(proxy)
            try:
                assert await c.fetchval("SELECT $1::int * 5", 3) == 15
            finally:
                await c.close()

    asyncio.run(scenario())


def test_a_partly_lost_set_of_statements_is_prepared_again_without_an_error(pgmux_process) -> None:
    # Only one of pgmux's statements is gone (a function deallocated it by name): preparing the lost
    # one again must not collide with the ones still there (42P05).
    with psycopg.connect(_process_dsn(pgmux_process), autocommit=True) as conn:
        conn.execute("CREATE OR REPLACE FUNCTION pgmux_test_forget_one() RETURNS void LANGUAGE plpgsql AS $$ "
                     "DECLARE name text; BEGIN SELECT p.name INTO name FROM pg_prepared_statements p "
                     "WHERE p.statement LIKE '%* 11%' AND p.name LIKE 'pgmux%'; "
                     "EXECUTE 'DEAL' || 'LOCATE ' || quote_ident(name); END $$")
        try:
            pgconn = conn.pgconn
            assert pgconn.prepare(b"eleven", b"SELECT $1::int * 11").status == psycopg.pq.ExecStatus.COMMAND_OK
            assert pgconn.prepare(b"twelve", b"SELECT $1::int * 12").status == psycopg.pq.ExecStatus.COMMAND_OK
            assert conn.execute("SELECT pgmux_test_forget_one()", prepare=False).fetchone() == ("",)
            for n in range(3):
                eleven = pgconn.exec_prepared(b"eleven", [str(n).encode()])
                assert eleven.status == psycopg.pq.ExecStatus.TUPLES_OK, eleven.error_message
                assert eleven.get_value(0, 0) == str(11 * n).encode()
                twelve = pgconn.exec_prepared(b"twelve", [str(n).encode()])
                assert twelve.status == psycopg.pq.ExecStatus.TUPLES_OK, twelve.error_message
                assert twelve.get_value(0, 0) == str(12 * n).encode()
        finally:
            conn.execute("DROP FUNCTION pgmux_test_forget_one()")


def test_an_unnamed_deallocate_all_bound_late_in_a_pipeline_is_noticed_where_it_runs(pgmux_process) -> None:
    # Parse("", DEALLOCATE ALL) drops nothing; its Bind/Execute, later in the same batch, does.
    with psycopg.connect(_process_dsn(pgmux_process), autocommit=True) as conn:
        pgconn = conn.pgconn
        assert pgconn.prepare(b"s1", b"SELECT 41 + 1").status == psycopg.pq.ExecStatus.COMMAND_OK
        pgconn.enter_pipeline_mode()
        pgconn.send_prepare(b"", b"DEALLOCATE ALL")
        pgconn.send_query_prepared(b"s1", None)  # still there: PostgreSQL has dropped nothing yet
        pgconn.send_query_prepared(b"", None)  # now everything goes, s1 and pgmux's statements alike
        pgconn.send_prepare(b"s1", b"SELECT 43")  # so the name is free again, as in PostgreSQL
        pgconn.send_query_prepared(b"s1", None)
        pgconn.pipeline_sync()
        results = []
        while len(results) < 6:
            result = pgconn.get_result()
            if result is None:
                continue
            results.append(result)
        pgconn.exit_pipeline_mode()
        errors = [r.error_message for r in results if r.status == psycopg.pq.ExecStatus.FATAL_ERROR]
        assert not errors
        values = [r.get_value(0, 0) for r in results if r.status == psycopg.pq.ExecStatus.TUPLES_OK]
        assert values == [b"42", b"43"]


def test_a_client_leaving_a_failed_transaction_after_a_false_alarm_leaves_the_backend_usable(pgmux) -> None:
    # The alarm made pgmux forget the backend's statements inside a failed transaction, where it
    # cannot DEALLOCATE ALL yet; the client then leaves: the cleanup must deallocate them too.
    proxy = pgmux(default_pool_size=1)

    async def scenario() -> None:
        a = await _connect(proxy)
        b = await _connect(proxy)
        try:
            assert await a.fetchval("SELECT $1::int + 1", 1) == 2
            transaction = b.transaction()
            await transaction.start()
            with pytest.raises(asyncpg.InvalidTextRepresentationError):
                await b.execute("SELECT 'discard'::int")
            await b.close()  # without ROLLBACK: pgmux cleans the backend up
            assert await a.fetchval("SELECT $1::int + 1", 2) == 3
        finally:
            await a.close()

    asyncio.run(scenario())


def test_deallocating_one_of_pgmuxs_own_statements_by_name_is_noticed(pgmux) -> None:
    proxy = pgmux(default_pool_size=1)

    async def scenario() -> None:
        a = await _connect(proxy)
        b = await _connect(proxy, statement_cache_size=0)  # so b's own query prepares nothing named
        try:
            assert await a.fetchval("SELECT $1::int - 1", 1) == 0
            names = [row["name"] for row in await b.fetch(
                "SELECT name FROM pg_prepared_statements WHERE name LIKE 'pgmux_%'")]
            assert names
            for name in names:
                await b.execute(f'DEALLOCATE "{name}"')
            assert await a.fetchval("SELECT $1::int - 1", 2) == 1
        finally:
            await a.close()
            await b.close()

    asyncio.run(scenario())


# ---- shared statements behave as each client's own (PostgreSQL directly is the reference) ----------------

_TARGETS = ["postgres", "pgmux"]


def _target_address(target: str, pgmux, postgres) -> tuple[str, int]:
    """Where a scenario connects: PostgreSQL itself, or a pgmux with one backend (so clients share it)."""
    if target == "postgres":
        return postgres.host, postgres.port
    proxy = pgmux(default_pool_size=1)
    return proxy.host, proxy.port()


async def _connect_to(address: tuple[str, int], **kwargs) -> asyncpg.Connection:
    host, port = address
    return await asyncpg.connect(host=host, port=port, user=APP.name, password=APP.password,
                                 database=APP_DATABASE, **kwargs)


def _address_dsn(address: tuple[str, int]) -> str:
    host, port = address
    return f"postgresql://{APP.name}:{APP.password}@{host}:{port}/{APP_DATABASE}"


_RECREATE_MOODS = ("DROP TABLE IF EXISTS moods; DROP TYPE IF EXISTS mood; "
                   "CREATE TYPE mood AS ENUM ('sad', 'happy'); CREATE TABLE moods (m mood); "
                   "INSERT INTO moods VALUES ('happy'), ('happy'), ('sad')")
# $1 is inferred as the enum: its type is fixed when the statement is prepared, and DROP TYPE removes it.
_COUNT_MOODS = "SELECT count(*) FROM moods WHERE m = $1"


@pytest.mark.parametrize("target", _TARGETS)
def test_a_statement_whose_parameter_type_was_dropped_is_prepared_afresh_for_a_new_client(
        pgmux, postgres, target) -> None:
    # Directly, a newcomer's Parse after DROP TYPE/CREATE TYPE infers the new type and succeeds, while
    # the statement an old session prepared fails with XX000 "cache lookup failed for type" forever.
    # Through pgmux the newcomer must succeed too (its Parse reused the old session's server statement),
    # at the first try; and pgmux prepares the old session's statement afresh as well.
    address = _target_address(target, pgmux, postgres)

    async def scenario() -> None:
        admin = await _connect_to(address, statement_cache_size=0)
        old = await _connect_to(address)
        try:
            await admin.execute(_RECREATE_MOODS)
            assert await old.fetchval(_COUNT_MOODS, "happy") == 2
            await admin.execute(_RECREATE_MOODS)
            newcomer = await _connect_to(address)
            try:
                for _ in range(2):
                    assert await newcomer.fetchval(_COUNT_MOODS, "happy") == 2
            finally:
                await newcomer.close()
            if target == "postgres":
                with pytest.raises(asyncpg.InternalServerError, match="cache lookup failed for type"):
                    await old.fetchval(_COUNT_MOODS, "happy")
            else:
                assert await old.fetchval(_COUNT_MOODS, "happy") == 2
        finally:
            await old.close()
            await admin.close()

    asyncio.run(scenario())


@pytest.mark.parametrize("target", _TARGETS)
def test_a_libpq_statement_whose_parameter_type_was_dropped_is_prepared_afresh_for_a_new_client(
        pgmux, postgres, target) -> None:
    # psycopg prepares (Parse, Sync) and then binds (Bind, Describe, Execute, Sync): through pgmux the
    # Bind is where the stale server statement fails, the first reply of its batch, which pgmux re-sends.
    address = _target_address(target, pgmux, postgres)
    sql = "SELECT count(*) FROM moods WHERE m = %s"
    with psycopg.connect(_address_dsn(address), autocommit=True) as admin, \
            psycopg.connect(_address_dsn(address), autocommit=True, prepare_threshold=0) as old:
        admin.execute(_RECREATE_MOODS)
        assert old.execute(sql, ["happy"]).fetchone() == (2,)
        admin.execute(_RECREATE_MOODS)
        with psycopg.connect(_address_dsn(address), autocommit=True, prepare_threshold=0) as newcomer:
            for _ in range(2):
                assert newcomer.execute(sql, ["happy"]).fetchone() == (2,)
        if target == "postgres":
            with pytest.raises(psycopg.errors.InternalError_, match="cache lookup failed for type"):
                old.execute(sql, ["happy"])
        else:
            assert old.execute(sql, ["happy"]).fetchone() == (2,)


def test_a_dropped_parameter_type_inside_a_transaction_fails_that_transaction_once_then_works(pgmux) -> None:
    # Inside a transaction the failed batch cannot be re-sent (it aborted the transaction): the client
    # gets PostgreSQL's XX000 once, as with 0A000, and the statement is prepared afresh everywhere.
    proxy = pgmux(default_pool_size=1)

    async def scenario() -> None:
        admin = await _connect(proxy, statement_cache_size=0)
        old = await _connect(proxy)
        newcomer = await _connect(proxy)
        try:
            await admin.execute(_RECREATE_MOODS)
            assert await old.fetchval(_COUNT_MOODS, "happy") == 2
            await admin.execute(_RECREATE_MOODS)
            failures = 0
            for _ in range(3):
                try:
                    async with newcomer.transaction():
                        assert await newcomer.fetchval(_COUNT_MOODS, "happy") == 2
                except asyncpg.InternalServerError:
                    failures += 1
            assert failures == 1
            assert await old.fetchval(_COUNT_MOODS, "happy") == 2
        finally:
            for conn in (old, newcomer, admin):
                await conn.close()

    asyncio.run(scenario())


_TWO_SCHEMAS = (
    "DROP SCHEMA IF EXISTS north CASCADE; DROP SCHEMA IF EXISTS south CASCADE;"
    "CREATE SCHEMA north; CREATE SCHEMA south;"
    # The same shape in both schemas: only the rows tell them apart.
    "CREATE TABLE north.items (id int, v text); INSERT INTO north.items VALUES (1, 'north one');"
    "CREATE TABLE south.items (id int, v text); INSERT INTO south.items VALUES (1, 'south one');"
    # Another shape: `SELECT *` answers other columns in each schema.
    "CREATE TABLE north.shapes (id int, v text); INSERT INTO north.shapes VALUES (1, 'n');"
    "CREATE TABLE south.shapes (id bigint, w int, v text); INSERT INTO south.shapes VALUES (1, 2, 's');")
_PER_SCHEMA = ["SELECT v FROM items WHERE id = $1", "SELECT * FROM shapes WHERE id = $1"]
_EXPECTED_IN = {
    "north": [[{"v": "north one"}], [{"id": 1, "v": "n"}]],
    "south": [[{"v": "south one"}], [{"id": 1, "w": 2, "v": "s"}]],
}


async def _run_per_schema(conn: asyncpg.Connection) -> list[list[dict]]:
    return [[dict(row) for row in await conn.fetch(sql, 1)] for sql in _PER_SCHEMA]


@pytest.mark.parametrize("target", _TARGETS)
def test_clients_with_different_search_paths_sharing_statement_texts_each_read_their_own_schema(
        pgmux, postgres, target) -> None:
    # Through pgmux with one backend, both clients' statements run on the same backend: PostgreSQL
    # re-analyses a statement under another search_path, but a table of another shape would fail the
    # shared statement with 0A000; pgmux shares statements only between clients of one search_path.
    address = _target_address(target, pgmux, postgres)

    async def scenario() -> None:
        admin = await _connect_to(address, statement_cache_size=0)
        await admin.execute(_TWO_SCHEMAS)
        north = await _connect_to(address, server_settings={"search_path": "north"})
        south = await _connect_to(address, server_settings={"search_path": "south"})
        local = await _connect_to(address)  # chooses its schema with SET LOCAL, in each transaction
        try:
            for _ in range(3):
                assert await _run_per_schema(north) == _EXPECTED_IN["north"]
                assert await _run_per_schema(south) == _EXPECTED_IN["south"]
                for schema in ("south", "north"):
                    # Its own statement over tables of another shape would fail with 0A000 directly too.
                    async with local.transaction():
                        await local.execute(f"SET LOCAL search_path = {schema}")
                        rows = await local.fetch(_PER_SCHEMA[0], 1)
                        assert [[dict(row) for row in rows]] == _EXPECTED_IN[schema][:1]
        finally:
            for conn in (north, south, local, admin):
                await conn.close()

    asyncio.run(scenario())


_TENANTS = ("pgmux_tenant_a", "pgmux_tenant_b")


@pytest.fixture
def tenant_roles(postgres):
    """Two roles that `app` may SET ROLE to; a table whose row-level security shows each its own rows;
    and a schema per role (same shape) that a "$user" search_path finds."""
    create = "".join(
        f"DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{role}') THEN CREATE ROLE {role}; "
        f"END IF; END $$; GRANT {role} TO {APP.name};" for role in _TENANTS)
    postgres.psql(create)
    setup = ("DROP TABLE IF EXISTS public.docs; CREATE TABLE public.docs (owner name, body text);"
             "ALTER TABLE public.docs ENABLE ROW LEVEL SECURITY;"
             "CREATE POLICY own_rows ON public.docs USING (owner = current_user);")
    for role in _TENANTS:
        setup += (f"INSERT INTO public.docs VALUES ('{role}', 'doc of {role}');"
                  f"GRANT SELECT ON public.docs TO {role};"
                  f"DROP SCHEMA IF EXISTS {role} CASCADE; CREATE SCHEMA {role} AUTHORIZATION {role};"
                  f"CREATE TABLE {role}.notes (id int, body text); INSERT INTO {role}.notes VALUES (1, 'note of {role}');"
                  f"ALTER TABLE {role}.notes OWNER TO {role};")
    postgres.psql(setup, database=APP_DATABASE)
    yield _TENANTS
    postgres.psql("DROP TABLE public.docs;" + "".join(f"DROP SCHEMA {role} CASCADE;" for role in _TENANTS),
                  database=APP_DATABASE)


@pytest.mark.parametrize("target", _TARGETS)
def test_clients_in_different_roles_sharing_statement_texts_each_get_their_roles_rows(
        pgmux, postgres, tenant_roles, target) -> None:
    # Row-level security and a "$user" search_path both depend on the role: PostgreSQL plans a statement
    # again for another role and re-analyses it when "$user" names another schema, so a statement two
    # clients share gives each its own rows.
    address = _target_address(target, pgmux, postgres)

    async def scenario() -> None:
        clients = [await _connect_to(address) for _ in tenant_roles]
        try:
            for _ in range(3):
                for conn, role in zip(clients, tenant_roles):
                    async with conn.transaction():
                        await conn.execute(f"SET LOCAL ROLE {role}")
                        assert await conn.fetch("SELECT body FROM docs WHERE body <> $1", "") == [
                            (f"doc of {role}",)]
                        assert await conn.fetchval("SELECT body FROM notes WHERE id = $1", 1) == f"note of {role}"
        finally:
            for conn in clients:
                await conn.close()

    asyncio.run(scenario())
