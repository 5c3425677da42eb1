"""psql through pgmux: plain statements, multi-statement simple queries, \\copy, errors in transactions, settings."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from clientsupport import client_bin_dir, client_env, run
from pgusers import APP, APP_DATABASE


@pytest.fixture(scope="module")
def psql_bin() -> Path:
    return client_bin_dir() / "psql"


def _psql(psql_bin: Path, proxy, *args: str, script: str | None = None, check: bool = True,
          application_name: str | None = None) -> subprocess.CompletedProcess[str]:
    """psql against pgmux, unaligned tuples-only output, stopping at the first error unless the script says not to."""
    query = {"application_name": application_name} if application_name else {}
    dsn = proxy.dsn(APP.name, None, APP_DATABASE, **query)
    command = [psql_bin, "-X", "-v", "ON_ERROR_STOP=1", "-A", "-t", "-q", "-d", dsn, *args]
    if script is not None:
        command += ["-f", "-"]
    return run(command, env=client_env(APP.password), input=script, check=check)


def test_psql_runs_several_statements_in_a_script(pgmux, psql_bin) -> None:
    proxy = pgmux(default_pool_size=2)
    result = _psql(psql_bin, proxy, script="""
        DROP TABLE IF EXISTS psql_items;
        CREATE TABLE psql_items (id int PRIMARY KEY, name text NOT NULL);
        INSERT INTO psql_items SELECT n, 'item-' || n FROM generate_series(1, 100) AS n;
        UPDATE psql_items SET name = upper(name) WHERE id % 10 = 0;
        SELECT count(*), sum(id) FROM psql_items;
        SELECT name FROM psql_items WHERE id IN (9, 10) ORDER BY id;
        DELETE FROM psql_items WHERE id > 50;
        SELECT count(*) FROM psql_items;
        DROP TABLE psql_items;
        DO $$ BEGIN RAISE NOTICE 'notice through pgmux'; END $$;
    """)
    assert result.stdout.split() == ["100|5050", "item-9", "ITEM-10", "50"]
    assert "NOTICE:  notice through pgmux" in result.stderr
    assert "ERROR" not in result.stderr


def test_psql_multi_statement_simple_query_returns_every_result(pgmux, psql_bin) -> None:
    proxy = pgmux(default_pool_size=1)
    # -c sends the whole string as one Query message; since psql 15 every result is shown.
    result = _psql(psql_bin, proxy, "-c",
                   "SELECT 1 AS a; SELECT 'two', 2; CREATE TEMP TABLE psql_tmp (x int); "
                   "INSERT INTO psql_tmp VALUES (7), (8); SELECT sum(x) FROM psql_tmp")
    assert result.stdout.split() == ["1", "two|2", "15"]
    # One Query is one implicit transaction: a failure in the middle undoes what came before it.
    failed = _psql(psql_bin, proxy, "-c",
                   "DROP TABLE IF EXISTS psql_multi; CREATE TABLE psql_multi (x int); "
                   "INSERT INTO psql_multi VALUES (1); SELECT 1/0; INSERT INTO psql_multi VALUES (2)", check=False)
    assert failed.returncode != 0
    assert "division by zero" in failed.stderr
    after = _psql(psql_bin, proxy, "-c", "SELECT to_regclass('psql_multi') IS NULL")
    assert after.stdout.strip() == "t"


def test_psql_copy_in_and_out_of_a_file(pgmux, psql_bin, tmp_path) -> None:
    proxy = pgmux(default_pool_size=1)
    source = tmp_path / "in.csv"
    rows = [f"{i},name {i},\"quoted, {i}\"" for i in range(1, 20_001)]
    source.write_text("\n".join(rows) + "\n")
    table_out = tmp_path / "out.csv"
    query_out = tmp_path / "query.txt"
    result = _psql(psql_bin, proxy, script=f"""
        DROP TABLE IF EXISTS psql_copy;
        CREATE TABLE psql_copy (id int PRIMARY KEY, name text, note text);
        \\copy psql_copy FROM '{source}' WITH (FORMAT csv)
        SELECT count(*), sum(id), count(DISTINCT note) FROM psql_copy;
        \\copy psql_copy TO '{table_out}' WITH (FORMAT csv)
        \\copy (SELECT id * 2 FROM psql_copy WHERE id <= 5 ORDER BY id) TO '{query_out}'
        SELECT 'still usable';
        DROP TABLE psql_copy;
    """)
    assert result.stdout.split("\n")[:2] == ["20000|200010000|20000", "still usable"]
    assert sorted(table_out.read_text().splitlines()) == sorted(rows)
    assert query_out.read_text().split() == ["2", "4", "6", "8", "10"]


def test_psql_error_in_transaction_then_rollback_then_more_queries(pgmux, postgres, psql_bin) -> None:
    proxy = pgmux(default_pool_size=1)
    result = _psql(psql_bin, proxy, script="""
        DROP TABLE IF EXISTS psql_tx;
        CREATE TABLE psql_tx (x int);
        \\set ON_ERROR_STOP off
        BEGIN;
        INSERT INTO psql_tx VALUES (1);
        SELECT 1/0;
        \\echo first :LAST_ERROR_SQLSTATE
        SELECT 'ignored';
        \\echo second :LAST_ERROR_SQLSTATE
        ROLLBACK;
        \\set ON_ERROR_STOP on
        SELECT 'rows', count(*) FROM psql_tx;
        BEGIN;
        INSERT INTO psql_tx VALUES (2);
        COMMIT;
        SELECT 'rows', count(*) FROM psql_tx;
        DROP TABLE psql_tx;
    """)
    assert result.stdout.split() == ["first", "22012", "second", "25P02", "rows|0", "rows|1"]
    assert "division by zero" in result.stderr
    assert "current transaction is aborted" in result.stderr
    idle_in_tx = postgres.psql(f"SELECT count(*) FROM pg_stat_activity WHERE usename = '{APP.name}' "
                               "AND state LIKE 'idle in transaction%'")
    assert idle_in_tx.strip() == "0"


def test_psql_set_application_name_is_what_show_returns(pgmux, psql_bin) -> None:
    proxy = pgmux(default_pool_size=1)
    result = _psql(psql_bin, proxy, application_name="from-dsn", script="""
        SHOW application_name;
        SET application_name = 'psql-set';
        SHOW application_name;
        SELECT current_setting('application_name');
        BEGIN;
        SET LOCAL application_name = 'psql-local';
        SHOW application_name;
        COMMIT;
        SHOW application_name;
        SELECT application_name FROM pg_stat_activity WHERE pid = pg_backend_pid();
    """)
    assert result.stdout.split() == ["from-dsn", "psql-set", "psql-set", "psql-local", "psql-set", "psql-set"]


def test_psql_extended_protocol_bind_and_pipeline(pgmux, psql_bin) -> None:
    proxy = pgmux(default_pool_size=1)
    # \bind sends Parse/Bind/Execute (unnamed); \startpipeline..\endpipeline pipelines them with two Syncs.
    result = _psql(psql_bin, proxy, script="""
        SELECT $1::int + 1 \\bind 41 \\g
        \\startpipeline
        SELECT $1::text \\bind one \\sendpipeline
        SELECT $1::int * 2 \\bind 21 \\sendpipeline
        \\syncpipeline
        SELECT $1::text || $2::text \\bind a b \\sendpipeline
        \\endpipeline
        SELECT 'after pipeline';
    """)
    assert result.stdout.split() == ["42", "one", "42", "ab", "after", "pipeline"]
