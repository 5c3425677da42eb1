"""Session parameters on a pool of one backend: a failed sync never lends it as synced; bad settings fail the login."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import psycopg
import pytest

from pgusers import APP, APP_DATABASE

TENANT_A_ROWS = ["a-alice", "a-bob"]
TENANT_P_ROWS = ["p-secret-1", "p-secret-2"]
SYNC_ROLE = "pgmux_sync_role"
TENANTS = f"""
DROP SCHEMA IF EXISTS tenant_a CASCADE;
DROP SCHEMA IF EXISTS tenant_p CASCADE;
CREATE SCHEMA tenant_a;
CREATE SCHEMA tenant_p;
CREATE TABLE tenant_a.accounts (name text);
CREATE TABLE tenant_p.accounts (name text);
INSERT INTO tenant_a.accounts VALUES ('a-alice'), ('a-bob');
INSERT INTO tenant_p.accounts VALUES ('p-secret-1'), ('p-secret-2');
GRANT USAGE ON SCHEMA tenant_a, tenant_p TO {APP.name};
GRANT SELECT ON ALL TABLES IN SCHEMA tenant_a, tenant_p TO {APP.name};
DROP TABLE IF EXISTS public.encoding_probe;
CREATE TABLE public.encoding_probe (id int, word text);
GRANT ALL ON public.encoding_probe TO {APP.name};
DROP ROLE IF EXISTS {SYNC_ROLE};
CREATE ROLE {SYNC_ROLE} NOLOGIN;
GRANT {SYNC_ROLE} TO {APP.name};
"""
# Two ways a client's parameters can fail to apply: a setting PostgreSQL refuses outright (pgmux must refuse
# the login as PostgreSQL would), or one it accepted at login and refuses later (the membership that
# `role` needs is revoked): then the sync itself fails on the backend the client was lent.
FAILURES = {
    "misspelled_option": ({"options": "-c statment_timeout=5"}, "42704"),
    "revoked_role": ({"options": f"-c role={SYNC_ROLE}"}, "42501"),
}


@pytest.fixture
def tenants(postgres) -> None:
    postgres.psql(TENANTS, database=APP_DATABASE)


async def _connect(proxy, **settings: str) -> asyncpg.Connection:
    return await asyncpg.connect(host=proxy.host, port=proxy.port(), user=APP.name, password=APP.password,
                                 database=APP_DATABASE, statement_cache_size=0, server_settings=settings,
                                 timeout=10)


async def _accounts(conn: asyncpg.Connection) -> list[str]:
    return [row["name"] for row in await conn.fetch("SELECT name FROM accounts ORDER BY name")]


async def _run_failing_client(proxy, postgres, failure: str, **settings: str) -> tuple[Any, asyncpg.PostgresError | None]:
    """Connect a client whose parameters fail as ``failure`` says and let it query once.

    Returns what its query returned (None if it was refused) and the error it got.
    """
    extra, _ = FAILURES[failure]
    try:
        conn = await _connect(proxy, **settings, **extra)
    except asyncpg.PostgresError as refused:
        return None, refused
    try:
        if failure == "revoked_role":
            await asyncio.to_thread(postgres.psql, f"REVOKE {SYNC_ROLE} FROM {APP.name}", APP_DATABASE)
        try:
            return await conn.fetchval("SELECT string_agg(name, ',' ORDER BY name) FROM accounts"), None
        except asyncpg.PostgresError as error:
            # A FATAL during a query reaches asyncpg as "connection closed", caused by the server's error
            # (the same as for PostgreSQL's own FATALs).
            cause = error.__cause__
            return None, cause if isinstance(cause, asyncpg.PostgresError) else error
    finally:
        conn.terminate()


@pytest.mark.parametrize("failure", sorted(FAILURES))
def test_failed_parameter_sync_never_lends_a_backend_as_synced(pgmux, postgres, tenants, failure: str) -> None:
    proxy = pgmux(default_pool_size=1)

    async def scenario() -> tuple[list[list[str]], Any, asyncpg.PostgresError | None]:
        tenant_p = await _connect(proxy, search_path="tenant_p")
        assert await _accounts(tenant_p) == TENANT_P_ROWS  # the one backend now has search_path=tenant_p
        seen_by_failing, error = await _run_failing_client(proxy, postgres, failure, search_path="tenant_a")
        tenant_a = await _connect(proxy, search_path="tenant_a")
        seen_by_a = []
        for _ in range(3):
            seen_by_a.append(await _accounts(tenant_a))
            assert await _accounts(tenant_p) == TENANT_P_ROWS
        await tenant_a.close()
        await tenant_p.close()
        return seen_by_a, seen_by_failing, error

    seen_by_a, seen_by_failing, error = asyncio.run(asyncio.wait_for(scenario(), 60))
    assert seen_by_a == [TENANT_A_ROWS] * 3
    assert seen_by_failing is None  # refused, and never shown tenant P's rows
    assert error is not None and error.sqlstate == FAILURES[failure][1], error


@pytest.mark.parametrize("failure", sorted(FAILURES))
def test_failed_parameter_sync_never_changes_an_innocent_clients_encoding(pgmux, postgres, tenants,
                                                                         failure: str) -> None:
    proxy = pgmux(default_pool_size=1)

    async def scenario() -> tuple[str, asyncpg.PostgresError | None]:
        latin1 = await asyncio.to_thread(
            psycopg.connect, proxy.dsn(APP.name, APP.password, APP_DATABASE), client_encoding="LATIN1",
            autocommit=True, connect_timeout=10)
        try:
            # The one backend now speaks LATIN1 to its clients.
            assert (await asyncio.to_thread(lambda: latin1.execute("SELECT 'é'").fetchone())) == ("é",)
            _, error = await _run_failing_client(proxy, postgres, failure)
            utf8 = await _connect(proxy)
            await utf8.execute("INSERT INTO encoding_probe VALUES (1, 'café')")
            read_back = await utf8.fetchval("SELECT word FROM encoding_probe WHERE id = 1")
            await utf8.close()
        finally:
            await asyncio.to_thread(latin1.close)
        return read_back, error

    read_back, error = asyncio.run(asyncio.wait_for(scenario(), 60))
    stored = postgres.psql("SELECT word || '|' || char_length(word) FROM encoding_probe WHERE id = 1",
                           database=APP_DATABASE)
    assert stored == "café|4\n"  # as PostgreSQL itself holds it, not 'cafÃ©'
    assert read_back == "café"
    assert error is not None and error.sqlstate == FAILURES[failure][1], error


def test_startup_settings_postgres_refuses_are_refused_at_login_with_its_error(pgmux, postgres) -> None:
    proxy = pgmux(default_pool_size=1, ignore_startup_parameters=["statment_timeout"])

    async def refusal(port: int, host: str, user: str, password: str, **settings: str) -> tuple[str, str, str]:
        with pytest.raises(asyncpg.PostgresError) as info:
            await asyncpg.connect(host=host, port=port, user=user, password=password, database=APP_DATABASE,
                                  server_settings=settings, timeout=10)
        return info.value.sqlstate, info.value.severity, str(info.value)

    async def scenario() -> None:
        for settings in ({"options": "-c statment_timeout=5"}, {"statement_timeout": "abc"},
                         {"options": "-c statement_timeout=5 -c work_mem=lots"}, {"client_encoding": "KLINGON"}):
            from_postgres = await refusal(postgres.port, postgres.host, APP.name, APP.password, **settings)
            assert from_postgres[1] == "FATAL"
            for _ in range(2):  # the second time too: a refusal is never cached as a success
                assert await refusal(proxy.port(), proxy.host, APP.name, APP.password, **settings) == from_postgres
        # A name listed in ignore_startup_parameters is still dropped, never checked.
        ignored = await _connect(proxy, statment_timeout="5", statement_timeout="1234")
        assert await ignored.fetchval("SHOW statement_timeout") == "1234ms"
        await ignored.close()

    asyncio.run(asyncio.wait_for(scenario(), 60))


def test_a_query_mentioning_reset_never_leaves_another_clients_settings_on_the_backend(pgmux, tenants) -> None:
    # pgmux notices RESET/DISCARD by the word alone (here only in a string literal): it must then treat
    # what it SET on the backend as unknown, not as gone, or the next client inherits it.
    proxy = pgmux(default_pool_size=1)

    async def scenario() -> tuple[list[str], list[str]]:
        setter = await _connect(proxy, options=f"-c role={SYNC_ROLE} -c work_mem=5MB")
        plain = await _connect(proxy)
        seen_by_setter, seen_by_plain = [], []
        for _ in range(2):
            seen_by_setter.append(await setter.fetchval("SELECT current_user || ' ' || current_setting('work_mem')"))
            await setter.execute("SELECT length('password reset')")  # a simple Query: the one pgmux reads
            seen_by_plain.append(await plain.fetchval("SELECT current_user || ' ' || current_setting('work_mem')"))
        await setter.close()
        await plain.close()
        return seen_by_setter, seen_by_plain

    seen_by_setter, seen_by_plain = asyncio.run(asyncio.wait_for(scenario(), 30))
    assert seen_by_setter == [f"{SYNC_ROLE} 5MB"] * 2
    assert seen_by_plain == [f"{APP.name} 4MB"] * 2


def test_a_setting_one_client_changes_never_reaches_clients_that_logged_in_with_the_same_parameters(pgmux) -> None:
    # Clients with equal parameters share one copy of them (idle clients are many): a SET by one of them must
    # change its own view only, neither another client's nor that of a client logging in afterwards, nor what
    # the backend was found to hold for their shared copy (ServerConnection.holds).
    proxy = pgmux(default_pool_size=1)

    async def scenario() -> tuple[list[str], list[str], str, str]:
        changer = await _connect(proxy, application_name="same-app")
        other = await _connect(proxy, application_name="same-app")
        for conn in (changer, other, changer):  # the backend is found holding their shared parameters, and kept so
            await conn.fetchval("SELECT 1")
        await changer.execute("SET application_name = 'changed'")
        seen_by_changer, seen_by_other = [], []
        for _ in range(2):  # the one backend goes back and forth between them, straight from the SET to other
            seen_by_other.append(await other.fetchval("SHOW application_name"))
            seen_by_changer.append(await changer.fetchval("SHOW application_name"))
        newcomer = await _connect(proxy, application_name="same-app")
        welcomed_with = newcomer.get_settings().application_name
        shown_to_newcomer = await newcomer.fetchval("SHOW application_name")
        for conn in (changer, other, newcomer):
            await conn.close()
        return seen_by_changer, seen_by_other, welcomed_with, shown_to_newcomer

    seen_by_changer, seen_by_other, welcomed_with, shown_to_newcomer = asyncio.run(asyncio.wait_for(scenario(), 30))
    assert seen_by_changer == ["changed"] * 2
    assert seen_by_other == ["same-app"] * 2
    assert (welcomed_with, shown_to_newcomer) == ("same-app", "same-app")


def test_a_request_behind_a_failed_sync_never_runs_even_if_it_begins_with_rollback(pgmux, postgres, tenants) -> None:
    # Sent right behind a failed sync, a request beginning with ROLLBACK would end the aborted block the
    # sync leaves and run the rest under the previous client's search_path: it must wait for the sync.
    proxy = pgmux(default_pool_size=1)

    async def scenario() -> asyncpg.PostgresError | None:
        tenant_p = await _connect(proxy, search_path="tenant_p")
        assert await _accounts(tenant_p) == TENANT_P_ROWS  # the one backend now has search_path=tenant_p
        failing = await _connect(proxy, search_path="tenant_a", options=f"-c role={SYNC_ROLE}")
        await asyncio.to_thread(postgres.psql, f"REVOKE {SYNC_ROLE} FROM {APP.name}", APP_DATABASE)
        try:
            await failing.execute(
                "ROLLBACK; INSERT INTO public.encoding_probe SELECT 99, string_agg(name, ',') FROM accounts")
        except asyncpg.PostgresError as error:
            cause = error.__cause__
            return cause if isinstance(cause, asyncpg.PostgresError) else error
        finally:
            failing.terminate()
            await tenant_p.close()
        return None

    error = asyncio.run(asyncio.wait_for(scenario(), 60))
    assert error is not None and error.sqlstate == "42501", error
    ran = postgres.psql("SELECT count(*) FROM encoding_probe WHERE id = 99", database=APP_DATABASE)
    assert ran == "0\n"  # the request never ran: neither on tenant P's search_path nor at all



# 日本語 written with Unicode escapes: the SQL text itself is then the same in every client encoding.
NIHONGO = "日本語"
NIHONGO_ESCAPED = "U&'\\65E5\\672C\\8A9E'"
# How a client may ask for its encoding: each must end with PostgreSQL's own spelling, reported and used.
ENCODING_REQUESTS = ["startup_parameter", "PGCLIENTENCODING", "set_client_encoding", "set_names"]


def _connect_with_encoding(dsn: str, how: str, monkeypatch: pytest.MonkeyPatch) -> psycopg.Connection:
    if how == "startup_parameter":
        return psycopg.connect(dsn, client_encoding="euc-jp", autocommit=True, connect_timeout=10)
    if how == "PGCLIENTENCODING":
        with monkeypatch.context() as env:
            env.setenv("PGCLIENTENCODING", "euc-jp")  # libpq sends it as the client_encoding startup parameter
            return psycopg.connect(dsn, autocommit=True, connect_timeout=10)
    conn = psycopg.connect(dsn, client_encoding="utf8", autocommit=True, connect_timeout=10)
    assert conn.info.parameter_status("client_encoding") == "UTF8"  # `utf8` as PostgreSQL spells it
    conn.execute("SET client_encoding = 'euc-jp'" if how == "set_client_encoding" else "SET NAMES 'euc-jp'")
    return conn


@pytest.mark.parametrize("how", ENCODING_REQUESTS)
@pytest.mark.parametrize("pool_mode", ["transaction", "session"])
def test_a_clients_euc_jp_encoding_is_reported_as_postgres_spells_it_and_used_by_its_backend(
        pgmux, postgres, tenants, monkeypatch, pool_mode: str, how: str) -> None:
    # In transaction mode one backend serves both clients in turn, switching encodings between them.
    proxy = pgmux(default_pool_size=1 if pool_mode == "transaction" else 2,
                  listeners=[{"address": "127.0.0.1:0", "pool_mode": pool_mode}])
    dsn = proxy.dsn(APP.name, APP.password, APP_DATABASE, listener=1)
    with _connect_with_encoding(dsn, how, monkeypatch) as euc_jp, \
            psycopg.connect(dsn, autocommit=True, connect_timeout=10) as utf8:
        for round_ in range(3):
            assert euc_jp.info.parameter_status("client_encoding") == "EUC_JP"
            assert euc_jp.info.encoding == "euc_jp"
            assert euc_jp.execute("SHOW client_encoding").fetchone() == ("EUC_JP",)
            # psycopg sends the parameter in EUC-JP: PostgreSQL must decode it as such to find it equal.
            assert euc_jp.execute(f"SELECT %s = {NIHONGO_ESCAPED}", [NIHONGO]).fetchone() == (True,)
            assert euc_jp.execute(f"SELECT {NIHONGO_ESCAPED}").fetchone() == (NIHONGO,)
            euc_jp.execute("INSERT INTO encoding_probe VALUES (%s, %s)", [round_, NIHONGO])
            # The other client, in between, on the same backend in transaction mode: UTF8 as it asked.
            assert utf8.info.parameter_status("client_encoding") == "UTF8"
            assert utf8.execute("SELECT word FROM encoding_probe WHERE id = %s", [round_]).fetchone() == (NIHONGO,)
    stored = postgres.psql("SELECT DISTINCT word || '|' || octet_length(word) FROM encoding_probe",
                           database=APP_DATABASE)
    assert stored == f"{NIHONGO}|9\n"  # held in the database's UTF8, as PostgreSQL converted it
