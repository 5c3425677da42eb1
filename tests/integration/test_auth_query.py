"""Users looked up in the database (auth_query), logging in upstream as themselves without pgmux ever
knowing their password: SCRAM pass-through with the ClientKey the client's own proof reveals, md5 with the hash."""

from __future__ import annotations

import asyncio
import time

import asyncpg
import psycopg
import pytest

from pgusers import APP, APP_DATABASE, MD5

LOOKED_UP = "pgmux_looked_up"
FIRST, SECOND = "looked-up-secret-1", "looked-up-secret-2"
# The documented way for a non-superuser auth_user: a SECURITY DEFINER function owned by a superuser.
SETUP = f"""
DROP ROLE IF EXISTS {LOOKED_UP};
CREATE ROLE {LOOKED_UP} LOGIN PASSWORD '{FIRST}';
CREATE OR REPLACE FUNCTION public.pgmux_lookup(name text, OUT usename name, OUT passwd text) RETURNS record
  LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog
  AS $$ SELECT usename, passwd FROM pg_catalog.pg_shadow WHERE usename = name $$;
REVOKE ALL ON FUNCTION public.pgmux_lookup(text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION public.pgmux_lookup(text) TO {APP.name};
"""
AUTH_QUERY = "SELECT usename, passwd FROM public.pgmux_lookup($1)"


@pytest.fixture
def looked_up_role(postgres) -> None:
    postgres.psql(SETUP, database=APP_DATABASE)


def _login(proxy, user: str, password: str) -> psycopg.Connection:
    return psycopg.connect(host=proxy.host, port=proxy.port(), user=user, password=password, dbname=APP_DATABASE,
                           autocommit=True, connect_timeout=10)


def test_a_looked_up_user_logs_in_and_runs_upstream_as_itself(pgmux, looked_up_role) -> None:
    proxy = pgmux(auth_user=APP.name, auth_query=AUTH_QUERY)
    assert proxy.call(lambda p: LOOKED_UP not in p.settings.users)  # pgmux's configuration does not know it
    with _login(proxy, LOOKED_UP, FIRST) as conn:
        assert conn.execute("SELECT current_user, session_user").fetchone() == (LOOKED_UP, LOOKED_UP)

    async def with_asyncpg() -> str:
        conn = await asyncpg.connect(host=proxy.host, port=proxy.port(), user=LOOKED_UP, password=FIRST,
                                     database=APP_DATABASE, ssl=False, timeout=10)
        try:
            return await conn.fetchval("SELECT current_user")
        finally:
            await conn.close()

    assert asyncio.run(with_asyncpg()) == LOOKED_UP
    # Its pool logs in with keys, never with a password.
    upstreams = proxy.call(lambda p: [(pool.config.upstream.password, pool.config.upstream.scram_keys is not None)
                                      for key, pool in p.router.pools.items() if key.user == LOOKED_UP])
    assert upstreams == [(None, True)]


def test_a_wrong_password_and_an_unknown_user_get_the_same_28p01(pgmux, looked_up_role) -> None:
    proxy = pgmux(auth_user=APP.name, auth_query=AUTH_QUERY)
    errors = []
    for user, password in ((LOOKED_UP, "wrong"), ("pgmux_nobody", "wrong")):
        with pytest.raises(psycopg.OperationalError) as failed:
            _login(proxy, user, password)
        errors.append(str(failed.value).replace(user, "USER"))
    assert errors[0] == errors[1]
    assert 'password authentication failed for user "USER"' in errors[0]


def test_a_changed_password_takes_effect_within_auth_cache_ttl(pgmux, postgres, looked_up_role) -> None:
    proxy = pgmux(auth_user=APP.name, auth_query=AUTH_QUERY, auth_cache_ttl=0.5)
    with _login(proxy, LOOKED_UP, FIRST) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    postgres.psql(f"ALTER ROLE {LOOKED_UP} PASSWORD '{SECOND}'", database=APP_DATABASE)
    time.sleep(0.6)
    with _login(proxy, LOOKED_UP, SECOND) as conn:
        assert conn.execute("SELECT current_user").fetchone() == (LOOKED_UP,)
        # A backend opened now logs in with the new password's keys.
        assert conn.execute("SELECT count(*) FROM pg_stat_activity WHERE usename = current_user").fetchone()[0] >= 1
    with pytest.raises(psycopg.OperationalError):
        _login(proxy, LOOKED_UP, FIRST)


def test_a_looked_up_md5_user_logs_in_upstream_with_its_hash(pgmux, looked_up_role) -> None:
    proxy = pgmux(auth_user=APP.name, auth_query=AUTH_QUERY, auth_type="md5")
    with _login(proxy, MD5.name, MD5.password) as conn:
        assert conn.execute("SELECT current_user").fetchone() == (MD5.name,)
