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


# What a LOADed library leaves: its settings exist (a fresh backend reads NULL).
LOADED = "SELECT current_setting('auto_explain.log_min_duration', true)"


def _superuser_pgmux(pgmux, postgres, **settings):
    """A pgmux serving database app as the superuser (LOAD of a library outside $libdir/plugins needs one),
    and how to connect to it."""
    superuser = psycopg.conninfo.conninfo_to_dict(postgres.dsn())
    proxy = pgmux(upstream_url=postgres.dsn(database=APP_DATABASE, sslmode="disable"), **settings)

    def connect() -> psycopg.Connection:
        return psycopg.connect(host=proxy.host, port=proxy.port(), user=superuser["user"],
                               password=superuser["password"], dbname=APP_DATABASE, autocommit=True,
                               connect_timeout=10)
    return proxy, connect


@pytest.mark.parametrize(("statement", "named"), [
    ("CREATE TEMP TABLE scratch (id int)", "temporary objects"),
    ("CREATE TABLE pg_temp.scratch (id int)", "temporary objects"),
    ("SELECT 1 AS one INTO TEMP scratch", "temporary objects"),
    ("SELECT pg_advisory_lock(4242)", "session advisory locks"),
    ("SELECT pg_catalog.pg_try_advisory_lock_shared(1, 2)", "session advisory locks"),
    ("LISTEN pgmux_channel", "LISTEN"),
    ("DECLARE held CURSOR WITH HOLD FOR SELECT 1", "WITH HOLD cursors"),
    ("PREPARE sql_level AS SELECT 1", "SQL-level PREPARE"),
    ("LOAD 'auto_explain'", "LOAD"),
])
def test_refuse_answers_session_only_statements_with_0A000_and_the_session_goes_on(
        pgmux, postgres, state_role, statement, named) -> None:
    proxy = pgmux(default_pool_size=1, query_wait_timeout=1, session_state="refuse")
    with _pooled(proxy) as client, _pooled(proxy) as bystander:
        defaults = _probe(bystander)
        with pytest.raises(psycopg.errors.FeatureNotSupported) as refused:
            client.execute(statement)
        assert refused.value.diag.message_primary.startswith(named)
        assert "session_state = refuse" in refused.value.diag.message_primary
        assert "session-mode listener" in (refused.value.diag.message_hint or "")
        assert _probe(client) == defaults  # nothing of it was made, and the session is usable
        assert _probe(bystander) == defaults  # and nothing pins: the one backend serves the bystander
        assert client.execute(LOADED).fetchone() == (None,)
        assert proxy.call(lambda p: [c.pins for c in p.registry.clients if c.pins]) == []
        assert proxy.call(lambda p: sum(p.registry.session_refusals.values())) == 1


def test_refuse_fails_the_statement_as_postgresql_fails_one(pgmux, postgres, state_role) -> None:
    proxy = pgmux(default_pool_size=1, session_state="refuse")
    with _pooled(proxy) as client:
        # Inside a transaction: the transaction is aborted, as by any error, and ROLLBACK ends it.
        client.execute("BEGIN")
        client.execute("SET LOCAL work_mem = '9MB'")
        with pytest.raises(psycopg.errors.FeatureNotSupported):
            client.execute("CREATE TEMP TABLE scratch (id int)")
        assert client.info.transaction_status is psycopg.pq.TransactionStatus.INERROR
        with pytest.raises(psycopg.errors.InFailedSqlTransaction):
            client.execute("SELECT 1")
        client.execute("ROLLBACK")
        # In a multi-statement Query the statements before the refused one run (BEGIN opens a block that
        # the error leaves failed), those after it do not.
        with pytest.raises(psycopg.errors.FeatureNotSupported):
            client.execute("BEGIN; SELECT 1; LISTEN pgmux_channel; SELECT 2")
        assert client.info.transaction_status is psycopg.pq.TransactionStatus.INERROR
        client.execute("ROLLBACK")
        # With values bound as parameters, through a named statement psycopg prepares: the same error.
        for _ in range(2):
            with pytest.raises(psycopg.errors.FeatureNotSupported):
                client.execute("SELECT pg_advisory_lock(%s)", (77,), prepare=True)
        assert client.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'").fetchone() == (0,)
        # What creates nothing that outlives its transaction, and every release, is not refused.
        client.execute("BEGIN")
        client.execute("SELECT pg_advisory_xact_lock(1)")
        client.execute("DECLARE plain CURSOR WITHOUT HOLD FOR SELECT 1")
        client.execute("COMMIT")
        client.execute("SELECT pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL; DEALLOCATE ALL")
        client.execute("SELECT 'LISTEN x; CREATE TEMP TABLE t' AS text_only /* pg_advisory_lock(1) */")


def test_ignore_lets_session_only_state_stay_on_the_backend_as_pgbouncer_does(pgmux, postgres, state_role) -> None:
    proxy = pgmux(default_pool_size=1, query_wait_timeout=1, session_state="ignore")
    with _pooled(proxy) as client, _pooled(proxy) as bystander:
        client.execute("CREATE TEMP TABLE scratch (id int)")
        client.execute("SET work_mem = '8MB'")
        # Not pinned: the bystander gets the backend, and with it the temporary table (settings still follow).
        assert bystander.execute("SELECT count(*) FROM pg_class WHERE relnamespace = pg_my_temp_schema()"
                                 ).fetchone() == (1,)
        assert bystander.execute("SHOW work_mem").fetchone() != ("8MB",)
        assert client.execute("SHOW work_mem").fetchone() == ("8MB",)
        assert proxy.call(lambda p: [c.pins for c in p.registry.clients if c.pins]) == []


def test_a_client_that_ran_load_keeps_its_backend_which_is_closed_after_it(pgmux, postgres, state_role) -> None:
    proxy, connect = _superuser_pgmux(pgmux, postgres, default_pool_size=1, query_wait_timeout=1)
    with connect() as bystander:
        assert bystander.execute(LOADED).fetchone() == (None,)
        client = connect()
        client.execute("LOAD 'auto_explain'")
        loaded_backend = client.execute("SELECT pg_backend_pid()").fetchone()
        assert client.execute(LOADED).fetchone() == ("-1",)
        with pytest.raises(psycopg.errors.TooManyConnections):
            bystander.execute("SELECT 1")  # pinned: no reset could unload the library
        assert proxy.call(lambda p: [sorted(c.pins) for c in p.registry.clients if c.pins]) == [["load"]]
        client.close()
        assert bystander.execute(LOADED).fetchone() == (None,)
        assert bystander.execute("SELECT pg_backend_pid()").fetchone() != loaded_backend


def test_in_session_mode_a_backend_that_loaded_a_library_is_closed_not_reused(pgmux, postgres) -> None:
    proxy, connect = _superuser_pgmux(pgmux, postgres, default_pool_size=1,
                                      listeners=[{"address": "127.0.0.1:0", "pool_mode": "session"}])
    for prepare in (False, True):  # as a simple Query and as a Parse
        with connect() as client:
            client.execute("LOAD 'auto_explain'", prepare=prepare)
            assert client.execute(LOADED).fetchone() == ("-1",)
        with connect() as next_client:
            assert next_client.execute(LOADED).fetchone() == (None,)


def test_show_clients_and_servers_show_the_pin(pgmux, postgres, state_role) -> None:
    proxy = pgmux(default_pool_size=1, admin_users=[APP.name])
    with _pooled(proxy) as client:
        client.execute("LISTEN pgmux_channel")
        client.execute("SELECT pg_advisory_lock(5)")
        # pgmux reads what the lock left after its ReadyForQuery reached the client; the client's next request
        # waits for that reading, so once it is answered the pin is recorded (SHOW CLIENTS could race it).
        client.execute("SELECT 1")
        with psycopg.connect(host=proxy.host, port=proxy.port(), user=APP.name, password=APP.password,
                             dbname="pgmux", autocommit=True) as admin:
            clients = admin.execute("SHOW CLIENTS")
            names = [column.name for column in clients.description]
            pinned = [row[names.index("pinned")] for row in clients.fetchall()]
            servers = admin.execute("SHOW SERVERS")
            pinned_servers = [row[names.index("pinned")] for row in servers.fetchall()]
    assert sorted(pinned) == ["", "advisory_lock,listen"]  # the admin connection itself holds nothing
    assert pinned_servers == ["advisory_lock,listen"]
