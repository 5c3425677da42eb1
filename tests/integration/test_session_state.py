"""No state crosses clients in transaction mode: session settings follow their client, session-only state pins it.

Differential: each scripted session runs straight against PostgreSQL and through pgmux on a pool of one
backend shared with a bystander; the client must see exactly what PostgreSQL showed it, the bystander
always the defaults.
"""

from __future__ import annotations

import psycopg
import pytest

from pgusers import APP, APP_DATABASE

STATE_ROLE = "pgmux_state_role"
SETUP = f"""
DROP ROLE IF EXISTS {STATE_ROLE};
CREATE ROLE {STATE_ROLE} NOLOGIN;
GRANT {STATE_ROLE} TO {APP.name};
"""
# What a session can observe of its own state. A custom setting that was reset reads '' where one never
# set reads NULL (PostgreSQL keeps the placeholder): both show as '-' (see the README's table).
PROBE = """SELECT current_user, current_setting('work_mem'), current_setting('statement_timeout'),
  current_setting('lock_timeout'), current_setting('search_path'),
  coalesce(nullif(current_setting('app.tenant_id', true), ''), '-'),
  current_setting('default_transaction_read_only'), current_setting('default_transaction_isolation'),
  current_setting('TimeZone'),
  (SELECT count(*) FROM pg_catalog.pg_class WHERE relnamespace = pg_catalog.pg_my_temp_schema()),
  (SELECT count(*) FROM pg_catalog.pg_locks WHERE locktype = 'advisory' AND pid = pg_catalog.pg_backend_pid()),
  (SELECT count(*) FROM pg_catalog.pg_listening_channels())"""

SETTING_SCRIPTS = {
    "set": ["SET work_mem = '8MB'"],
    "set_session": ["SET SESSION statement_timeout = '5s'"],
    "set_search_path": ["SET search_path TO pg_catalog, public"],
    "set_schema": ["SET SCHEMA 'pg_catalog'"],
    "set_role": [f"SET ROLE {STATE_ROLE}"],
    "set_role_then_reset_role": [f"SET ROLE {STATE_ROLE}", "RESET ROLE"],
    "custom_setting": ["SET app.tenant_id = '42'"],
    "set_config_session": ["SELECT set_config('app.tenant_id', '7', false)"],
    "set_config_local": ["BEGIN", "SELECT set_config('app.tenant_id', '7', true)", "COMMIT"],
    "read_only_default": ["SET default_transaction_read_only = on"],
    "time_zone": ["SET TIME ZONE 'Europe/Paris'"],
    "characteristics": ["SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL SERIALIZABLE"],
    "rolled_back": ["BEGIN", "SET work_mem = '16MB'", "ROLLBACK"],
    "committed": ["BEGIN", "SET work_mem = '16MB'", "COMMIT"],
    "savepoint_rolled_back": ["BEGIN", "SAVEPOINT s", "SET lock_timeout = '2s'", "ROLLBACK TO SAVEPOINT s", "COMMIT"],
    "savepoint_released": ["BEGIN", "SAVEPOINT s", "SET lock_timeout = '2s'", "RELEASE SAVEPOINT s", "COMMIT"],
    "set_local": ["BEGIN", "SET LOCAL work_mem = '16MB'", "COMMIT"],
    "multi_statement": ["SELECT 1; SET lock_timeout = 3000; SELECT 2"],
    "reset_all": ["SET work_mem = '8MB'", f"SET ROLE {STATE_ROLE}", "RESET ALL"],
    "set_default": ["SET work_mem = '8MB'", "SET work_mem TO DEFAULT"],
    "set_in_a_function": ["DO $$BEGIN PERFORM set_config('work_mem', '9MB', false); END$$"],
    "comment_before_set": ["/* tenant */ SET work_mem = '7MB'"],
}


@pytest.fixture(scope="module")
def state_role(postgres) -> None:
    postgres.psql(SETUP, database=APP_DATABASE)


def _direct(postgres) -> psycopg.Connection:
    return psycopg.connect(postgres.dsn(user=APP.name, password=APP.password, database=APP_DATABASE),
                           autocommit=True)


def _pooled(proxy) -> psycopg.Connection:
    return psycopg.connect(host=proxy.host, port=proxy.port(), user=APP.name, password=APP.password,
                           dbname=APP_DATABASE, autocommit=True, connect_timeout=10)


def _probe(conn: psycopg.Connection) -> tuple:
    row = conn.execute(PROBE).fetchone()
    assert row is not None
    return tuple(row)


def _run(conn: psycopg.Connection, script: list[str]) -> None:
    for statement in script:
        conn.execute(statement)


@pytest.mark.parametrize("script", list(SETTING_SCRIPTS), ids=list(SETTING_SCRIPTS))
def test_session_settings_follow_their_client_and_never_reach_another(pgmux, postgres, state_role, script) -> None:
    with _direct(postgres) as direct, _direct(postgres) as fresh:
        _run(direct, SETTING_SCRIPTS[script])
        expected = _probe(direct)
        defaults = _probe(fresh)
    proxy = pgmux(default_pool_size=1)
    with _pooled(proxy) as client, _pooled(proxy) as bystander:
        assert _probe(bystander) == defaults
        _run(client, SETTING_SCRIPTS[script])
        seen = [_probe(bystander), _probe(client), _probe(bystander), _probe(client)]
    assert seen == [defaults, expected, defaults, expected]


def test_a_setting_made_through_a_reused_named_statement_follows_its_client(pgmux, postgres, state_role) -> None:
    # psycopg prepares the statement once (server-side, named) and then only binds it: each Bind must count.
    proxy = pgmux(default_pool_size=1)
    with _pooled(proxy) as client, _pooled(proxy) as bystander:
        for tenant in ("11", "12", "13"):
            client.execute("SELECT set_config('app.tenant_id', %s, false)", (tenant,), prepare=True)
            assert bystander.execute("SELECT coalesce(nullif(current_setting('app.tenant_id', true), ''), '-')"
                                     ).fetchone() == ("-",)
            assert client.execute("SELECT current_setting('app.tenant_id')").fetchone() == (tenant,)


@pytest.mark.parametrize(("take", "release", "reason"), [
    ("CREATE TEMP TABLE scratch (id int)", "DISCARD TEMP", "temp"),
    ("SELECT pg_advisory_lock(4242)", "SELECT pg_advisory_unlock_all()", "advisory_lock"),
    ("LISTEN pgmux_channel", "UNLISTEN *", "listen"),
    ("DECLARE held CURSOR WITH HOLD FOR SELECT 1", "CLOSE ALL", "cursor"),
    ("PREPARE sql_level AS SELECT 1", "DEALLOCATE ALL", "prepared_statement"),
])
def test_session_only_state_pins_its_client_until_released(pgmux, postgres, state_role, take, release, reason) -> None:
    proxy = pgmux(default_pool_size=1, query_wait_timeout=1)
    with _pooled(proxy) as client, _pooled(proxy) as bystander:
        defaults = _probe(bystander)
        client.execute(take)
        held_backend = client.execute("SELECT pg_backend_pid()").fetchone()
        assert client.execute("SELECT pg_backend_pid()").fetchone() == held_backend  # pinned: same backend
        with pytest.raises(psycopg.errors.TooManyConnections):
            bystander.execute("SELECT 1")  # the only backend is pinned: the bystander waits, then 53300
        pins = proxy.call(lambda p: sorted(sorted(c.pins) for c in p.registry.clients if c.pins))
        assert pins == [[reason]]
        client.execute(release)
        assert _probe(bystander) == defaults  # released: the backend serves others again


def test_a_client_that_leaves_holding_session_state_leaves_a_clean_backend(pgmux, postgres, state_role) -> None:
    proxy = pgmux(default_pool_size=1)
    with _pooled(proxy) as bystander:
        defaults = _probe(bystander)
        client = _pooled(proxy)
        client.execute("CREATE TEMP TABLE scratch (id int)")
        client.execute("SELECT pg_advisory_lock(77)")
        client.execute(f"SET ROLE {STATE_ROLE}")
        client.execute("LISTEN pgmux_gone")
        client.close()
        assert _probe(bystander) == defaults
        with _direct(postgres) as direct:
            assert direct.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = 77"
                                  ).fetchone() == (0,)


def test_pool_resets_of_asyncpg_and_psycopg_never_pin(pgmux, postgres, state_role) -> None:
    proxy = pgmux(default_pool_size=1, query_wait_timeout=2)
    with _pooled(proxy) as client, _pooled(proxy) as bystander:
        # asyncpg's Connection.reset() with no listeners or locks of its own; psycopg_pool rolls back.
        client.execute("SELECT pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL;")
        client.execute("ROLLBACK")
        assert bystander.execute("SELECT 1").fetchone() == (1,)
