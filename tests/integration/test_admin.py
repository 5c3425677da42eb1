"""The admin console: PgBouncer's commands and column sets through psql, psycopg, asyncpg and the pgbouncer exporter."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import socket
import subprocess
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import asyncpg
import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pgusers import APP, APP_DATABASE, MD5, PLAIN
from proxy.embedded import postgres_bin_dir
from proxy.protocol import messages as m
from proxy.protocol.startup import build_startup_message
from test_metrics import scrape, value

# Column names and types exactly as PgBouncer's src/admin.c and src/stats.c write them
# (s text, i int4, q int8, N numeric, T timestamp sent as text). pgmux deviates in two places for
# exporters: SHOW STATS has PgBouncer 1.7's total_requests at the end, and SHOW DATABASES
# keeps the pre-1.24 name reserve_pool. SHOW CLIENTS and SERVERS end with one column of pgmux's own, pinned.
_SOCKETS = ("type user database replication state addr port local_addr local_port connect_time request_time wait "
            "wait_us close_needed ptr link remote_pid tls application_name prepared_statements id pinned",
            "ssssssisiTTiiississiis")
_TOTALS = ("server_assignment_count xact_count query_count bytes_received bytes_sent xact_time query_time "
           "wait_time client_parse_count server_parse_count bind_count client_login_count")
PGBOUNCER_COLUMNS = {
    "POOLS": ("database user cl_active cl_waiting cl_active_cancel_req cl_waiting_cancel_req sv_active "
              "sv_active_cancel sv_being_canceled sv_idle sv_used sv_tested sv_login maxwait maxwait_us pool_mode "
              "load_balance_hosts", "ssiiiiiiiiiiiiiss"),
    "STATS": ("database total_server_assignment_count total_xact_count total_query_count total_received total_sent "
              "total_xact_time total_query_time total_wait_time total_client_parse_count total_server_parse_count "
              "total_bind_count total_client_login_count avg_server_assignment_count avg_xact_count "
              "avg_query_count avg_recv avg_sent avg_xact_time avg_query_time avg_wait_time "
              "avg_client_parse_count avg_server_parse_count avg_bind_count avg_client_login_count total_requests",
              "s" + "N" * 25),
    "STATS_TOTALS": ("database " + _TOTALS, "s" + "N" * 12),
    "STATS_AVERAGES": ("database server_assignment_count xact_count query_count bytes_received bytes_sent "
                       "xact_time query_time wait_time avg_client_parse_count avg_server_parse_count "
                       "avg_bind_count avg_client_login_count", "s" + "N" * 12),
    "TOTALS": ("name value", "sN"),
    "CLIENTS": _SOCKETS,
    "SERVERS": _SOCKETS,
    "DATABASES": ("name host port database force_user pool_size min_pool_size reserve_pool server_lifetime "
                  "pool_mode load_balance_hosts max_connections current_connections max_client_connections "
                  "current_client_connections paused disabled", "ssissiiiissiiiiii"),
    "USERS": ("name pool_size reserve_pool_size pool_mode max_user_connections current_connections "
              "max_user_client_connections current_client_connections", "ssssiiii"),
    "CONFIG": ("key value default changeable", "ssss"),
    "LISTS": ("list items", "si"),
    "VERSION": ("version", "s"),
    "STATE": ("key value", "ss"),
}
_OID = {"s": 25, "T": 25, "i": 23, "q": 20, "N": 1700}


def admin_pgmux(pgmux, **settings):
    settings.setdefault("default_pool_size", 2)
    return pgmux(admin_users=[APP.name], stats_users=[MD5.name],
                 users={MD5.name: {"password": MD5.password}, PLAIN.name: {"password": PLAIN.password}}, **settings)


def admin(proxy, user=APP, database: str = "pgmux") -> psycopg.Connection:
    return psycopg.connect(proxy.dsn(user.name, user.password, database), autocommit=True)


def app(proxy) -> psycopg.Connection:
    return psycopg.connect(proxy.dsn(APP.name, APP.password, APP_DATABASE), autocommit=True, prepare_threshold=None)


def rows(conn: psycopg.Connection, command: str) -> list[dict]:
    cursor = conn.execute(command)
    names = [column.name for column in cursor.description]
    return [dict(zip(names, row)) for row in cursor.fetchall()]


def pool_row(conn: psycopg.Connection) -> dict:
    return next(row for row in rows(conn, "SHOW POOLS") if row["database"] == APP_DATABASE)


def test_every_show_command_has_pgbouncers_columns_and_types(pgmux) -> None:
    proxy = admin_pgmux(pgmux)
    with app(proxy) as client:
        client.execute("SELECT 1")
        with admin(proxy) as console:
            for command, (names, types) in PGBOUNCER_COLUMNS.items():
                cursor = console.execute(f"SHOW {command}")
                assert [c.name for c in cursor.description] == names.split(), command
                assert [c.type_code for c in cursor.description] == [_OID[t] for t in types], command
                cursor.fetchall()
            # Values are real: one pool, one idle server, the client idle in it; the console is a client too.
            pool = pool_row(console)
            assert (pool["user"], pool["cl_active"], pool["cl_waiting"], pool["sv_idle"], pool["sv_active"]) == \
                (APP.name, 1, 0, 1, 0)
            assert pool["pool_mode"] == "transaction"
            clients = rows(console, "SHOW CLIENTS")
            assert {(c["database"], c["state"]) for c in clients} == {(APP_DATABASE, "idle"), ("pgmux", "active")}
            servers = rows(console, "SHOW SERVERS")
            backend_pid = client.execute("SELECT pg_backend_pid()").fetchone()[0]
            assert [(s["type"], s["state"], s["remote_pid"]) for s in rows(console, "SHOW SERVERS")] == \
                [("S", "idle", backend_pid)]
            assert servers[0]["database"] == APP_DATABASE
            database = next(d for d in rows(console, "SHOW DATABASES") if d["name"] == APP_DATABASE)
            assert (database["pool_size"], database["paused"], database["current_connections"],
                    database["current_client_connections"]) == (2, 0, 1, 1)
            stats = next(s for s in rows(console, "SHOW STATS") if s["database"] == APP_DATABASE)
            assert stats["total_xact_count"] >= 2 and stats["total_requests"] == stats["total_query_count"]
            lists = dict((r["list"], r["items"]) for r in rows(console, "SHOW LISTS"))
            assert lists["pools"] == 1 and lists["used_servers"] == 1 and lists["databases"] == 1
            config = {r["key"]: r for r in rows(console, "SHOW CONFIG")}
            assert config["default_pool_size"]["value"] == "2" and config["max_client_conn"]["default"] == "1000"
            assert config["listen"]["changeable"] == "no" and config["query_wait_timeout"]["changeable"] == "yes"
            assert "app-secret" not in str(config)
            assert rows(console, "SHOW STATE") == [{"key": "active", "value": "yes"},
                                                  {"key": "paused", "value": "no"},
                                                  {"key": "suspended", "value": "no"}]
            assert rows(console, "SHOW VERSION")[0]["version"].startswith("pgmux ")


def test_clients_still_logging_in_are_login_clients_in_show_lists_and_metrics_and_in_no_pool(pgmux) -> None:
    # One socket has sent nothing yet, one only its StartupMessage (it has the SCRAM request and never
    # answers): both are logging in, as PgBouncer counts its login_client_list, and belong to no pool yet.
    proxy = admin_pgmux(pgmux, metrics_listen="127.0.0.1:0")
    with app(proxy) as client, admin(proxy) as console:
        client.execute("SELECT 1")
        silent = socket.create_connection((proxy.host, proxy.port()), timeout=10)
        halfway = socket.create_connection((proxy.host, proxy.port()), timeout=10)
        try:
            halfway.sendall(build_startup_message({"user": APP.name, "database": APP_DATABASE}))
            assert halfway.recv(1)[0] == m.AUTHENTICATION
            deadline = time.monotonic() + 10
            while proxy.call(lambda p: len(p.registry.clients)) < 4:  # the silent socket is accepted on the loop's next turn
                assert time.monotonic() < deadline, "pgmux did not accept the silent socket"
                time.sleep(0.02)

            lists = {r["list"]: r["items"] for r in rows(console, "SHOW LISTS")}
            assert (lists["login_clients"], lists["used_clients"]) == (2, 4)
            assert {(c["database"], c["state"]) for c in rows(console, "SHOW CLIENTS")} == \
                {(APP_DATABASE, "idle"), ("pgmux", "active")}
            pool = pool_row(console)
            assert (pool["cl_active"], pool["cl_waiting"]) == (1, 0)
            text = scrape(proxy)
            assert value(text, "pgmux_login_clients") == 2
            assert value(text, "pgmux_client_connections") == 4
            labels = dict(database=APP_DATABASE, user=APP.name)
            assert value(text, "pgmux_clients", state="login", **labels) == 0  # unauthenticated: in no pool
            assert value(text, "pgmux_clients", state="idle", **labels) == 1
            assert value(text, "pgmux_clients", **labels) == 1
        finally:
            silent.close()
            halfway.close()
        deadline = time.monotonic() + 10
        while proxy.call(lambda p: len(p.registry.clients)) > 2:
            assert time.monotonic() < deadline, "pgmux did not notice the logins leave"
            time.sleep(0.02)
        assert {r["list"]: r["items"] for r in rows(console, "SHOW LISTS")}["login_clients"] == 0
        assert value(scrape(proxy), "pgmux_login_clients") == 0


def test_show_stats_counts_the_named_statements_clients_prepare_and_bind(pgmux) -> None:
    proxy = admin_pgmux(pgmux)
    with psycopg.connect(proxy.dsn(APP.name, APP.password, APP_DATABASE), autocommit=True,
                         prepare_threshold=0) as client:  # every parameterised query as a named statement
        for value in range(5):
            assert client.execute("SELECT %s::int + 1", (value,)).fetchone() == (value + 1,)
        client.execute("SELECT %s::text", ("other statement",)).fetchone()
        with admin(proxy) as console:
            stats = next(s for s in rows(console, "SHOW STATS") if s["database"] == APP_DATABASE)
    # Two statements prepared once each and bound six times; pgmux put each on the one backend once.
    assert (stats["total_client_parse_count"], stats["total_server_parse_count"], stats["total_bind_count"]) == \
        (2, 2, 6)


def test_psql_runs_the_admin_commands(pgmux) -> None:
    proxy = admin_pgmux(pgmux)
    psql = postgres_bin_dir() / "psql"
    env = {**os.environ, "PGPASSWORD": APP.password}
    base = [str(psql), "-X", "-h", proxy.host, "-p", str(proxy.port()), "-U", APP.name, "-d", "pgbouncer"]
    result = subprocess.run([*base, "-A", "-F", ",", "-c", "SHOW POOLS", "-c", "SHOW LISTS", "-c", "SHOW HELP",
                             "-c", "RECONNECT", "-c", "PAUSE", "-c", "SHOW STATE", "-c", "RESUME"],
                            env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert "database,user,cl_active,cl_waiting," in result.stdout
    assert "used_clients,1" in result.stdout
    assert "paused,yes" in result.stdout
    assert "SHOW POOLS|CLIENTS" not in result.stderr and "SHOW STATS|STATS_TOTALS|STATS_AVERAGES" in result.stderr
    bad = subprocess.run([*base, "-c", "SELECT * FROM pg_class"], env=env, capture_output=True, text=True, timeout=30)
    assert bad.returncode == 1 and "invalid command 'SELECT * FROM pg_class', use SHOW HELP;" in bad.stderr


def test_stats_users_may_only_show_and_others_get_42501(pgmux) -> None:
    proxy = admin_pgmux(pgmux)
    with admin(proxy, MD5) as console:
        assert rows(console, "SHOW POOLS") == []  # no client has used a pool yet
        for command in ("PAUSE", "RESUME app", "RECONNECT", "KILL app", "RELOAD", "SHUTDOWN", "WAIT_CLOSE"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="admin access needed"):
                console.execute(command)
        assert rows(console, "SHOW STATE")[1] == {"key": "paused", "value": "no"}  # still usable, nothing done
    with pytest.raises(psycopg.OperationalError, match="not allowed to use the pgmux admin console"):
        admin(proxy, PLAIN)

    async def with_asyncpg() -> None:
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await asyncpg.connect(host=proxy.host, port=proxy.port(), user=PLAIN.name, password=PLAIN.password,
                                  database="pgmux")

    asyncio.run(with_asyncpg())
    assert proxy.call(lambda p: p.registry.rejections["admin_not_allowed"]) == 2


def test_unknown_commands_get_a_clear_error_and_the_console_stays_usable(pgmux) -> None:
    proxy = admin_pgmux(pgmux)
    with admin(proxy) as console:
        for command in ("SELECT 1", "SHOW NOTHING", "DROP TABLE x", "PAUSE a b c"):
            with pytest.raises(psycopg.errors.SyntaxError, match="use SHOW HELP"):
                console.execute(command)
        with pytest.raises(psycopg.errors.InvalidCatalogName, match="no such database: nope"):
            console.execute("PAUSE nope")
        with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState, match="not paused"):
            console.execute("RESUME app")
        with pytest.raises(psycopg.errors.FeatureNotSupported, match="SET is not supported"):
            console.execute("SET default_pool_size = 5")
        with pytest.raises(psycopg.errors.FeatureNotSupported, match="extended query protocol"):
            console.execute("SHOW POOLS WHERE %s", [1])
        assert rows(console, "show client_encoding") == [{"client_encoding": "UTF8"}]
        assert rows(console, "show version;")[0]["version"].startswith("pgmux")


def test_asyncpg_runs_commands_as_simple_queries(pgmux) -> None:
    proxy = admin_pgmux(pgmux)

    async def scenario() -> None:
        console = await asyncpg.connect(host=proxy.host, port=proxy.port(), user=APP.name, password=APP.password,
                                        database="pgbouncer")
        assert await console.execute("PAUSE app") == "PAUSE"
        assert proxy.call(lambda p: p.router.is_paused("app"))
        assert await console.execute("RESUME app") == "RESUME"
        assert await console.execute("SHOW POOLS") == "SHOW"
        with pytest.raises(asyncpg.FeatureNotSupportedError, match="extended query protocol"):
            await console.fetch("SHOW POOLS")  # asyncpg's fetch prepares: PgBouncer refuses that too
        assert await console.execute("RECONNECT") == "RECONNECT"
        await console.close()

    asyncio.run(scenario())
    assert not proxy.call(lambda p: p.router.is_paused("app"))


def test_pause_waits_for_transactions_then_holds_clients_until_resume(pgmux) -> None:
    proxy = admin_pgmux(pgmux, query_wait_timeout=30)
    with app(proxy) as busy, app(proxy) as later, admin(proxy) as console, admin(proxy) as observer, \
            ThreadPoolExecutor(2) as pool:
        busy.execute("BEGIN")
        busy.execute("SELECT 1")
        pause = pool.submit(console.execute, "PAUSE app")
        time.sleep(0.5)
        assert not pause.done(), "PAUSE answered while a transaction was still running"
        assert rows(observer, "SHOW DATABASES")[0]["paused"] == 1
        busy.execute("COMMIT")
        assert pause.result(10).statusmessage == "PAUSE"
        # Paused: every server is gone, and a new request waits instead of failing.
        assert proxy.call(lambda p: next(iter(p.router.pools.values())).total) == 0
        query = pool.submit(lambda: later.execute("SELECT 42").fetchone())
        deadline = time.monotonic() + 5
        while pool_row(observer)["cl_waiting"] != 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert pool_row(observer)["cl_waiting"] == 1
        assert not query.done()
        with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState, match="already paused"):
            observer.execute("PAUSE app")
        observer.execute("RESUME app")
        assert query.result(10) == (42,)
        assert busy.execute("SELECT 7").fetchone() == (7,)
        assert rows(observer, "SHOW DATABASES")[0]["paused"] == 0


def test_commands_pipelined_behind_a_waiting_pause_are_answered_in_order(pgmux) -> None:
    from test_admission import RawClient, extended_query

    from proxy.protocol import messages as m

    proxy = admin_pgmux(pgmux, auth_type="trust")
    with app(proxy) as busy:
        busy.execute("BEGIN")
        busy.execute("SELECT 1")
        console = RawClient(proxy.host, proxy.port(), user=APP.name, database="pgmux")
        console.send(m.query("PAUSE app") + m.query("SHOW STATE") + extended_query("SHOW POOLS")
                     + m.query("RESUME app"))
        console.sock.settimeout(0.5)
        with pytest.raises(TimeoutError):
            console.read_message()  # nothing while the transaction runs: PAUSE waits, the rest waits behind it
        console.sock.settimeout(10)
        busy.execute("COMMIT")
        assert console.read_until_ready() == [m.COMMAND_COMPLETE, m.READY_FOR_QUERY]  # PAUSE
        assert console.read_until_ready() == [m.ROW_DESCRIPTION] + [m.DATA_ROW] * 3 + [m.COMMAND_COMPLETE,
                                                                                       m.READY_FOR_QUERY]
        assert console.read_until_ready() == [m.ERROR_RESPONSE, m.READY_FOR_QUERY]  # extended: refused to Sync
        assert console.read_until_ready() == [m.COMMAND_COMPLETE, m.READY_FOR_QUERY]  # RESUME
        console.close()
        assert busy.execute("SELECT 2").fetchone() == (2,)


def test_pause_without_a_database_pauses_everything(pgmux) -> None:
    proxy = admin_pgmux(pgmux)
    with app(proxy) as client, admin(proxy) as console:
        client.execute("SELECT 1")
        console.execute("PAUSE")
        assert rows(console, "SHOW STATE")[1] == {"key": "paused", "value": "yes"}
        with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState, match="already suspended/paused"):
            console.execute("PAUSE app")
        console.execute("RESUME")
        assert client.execute("SELECT 2").fetchone() == (2,)
        with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState, match="not paused"):
            console.execute("RESUME")


def test_reconnect_replaces_servers_after_their_transaction_and_wait_close_waits(pgmux) -> None:
    proxy = admin_pgmux(pgmux, default_pool_size=1)
    with app(proxy) as client, admin(proxy) as console, ThreadPoolExecutor(1) as pool:
        first = client.execute("SELECT pg_backend_pid()").fetchone()[0]
        console.execute("RECONNECT app")
        console.execute("WAIT_CLOSE app")
        second = client.execute("SELECT pg_backend_pid()").fetchone()[0]
        assert second != first  # the idle server was closed at once
        client.execute("BEGIN")
        assert client.execute("SELECT pg_backend_pid()").fetchone()[0] == second
        console.execute("RECONNECT")
        assert [s["close_needed"] for s in rows(console, "SHOW SERVERS")] == [1]
        wait = pool.submit(console.execute, "WAIT_CLOSE")
        time.sleep(0.3)
        assert not wait.done(), "WAIT_CLOSE answered while the server was still in a transaction"
        assert client.execute("SELECT pg_backend_pid()").fetchone()[0] == second  # not cut mid-transaction
        client.execute("COMMIT")
        assert wait.result(10).statusmessage == "WAIT_CLOSE"
        assert client.execute("SELECT pg_backend_pid()").fetchone()[0] not in (first, second)


def test_kill_drops_the_databases_clients_and_new_ones_wait_for_resume(pgmux) -> None:
    proxy = admin_pgmux(pgmux, query_wait_timeout=30)
    with app(proxy) as victim, admin(proxy) as console, ThreadPoolExecutor(1) as pool:
        victim.execute("SELECT 1")
        assert console.execute("KILL app").statusmessage == "KILL"
        with pytest.raises(psycopg.OperationalError):
            victim.execute("SELECT 1")
        assert proxy.call(lambda p: next(iter(p.router.pools.values())).total) == 0
        assert rows(console, "SHOW DATABASES")[0]["paused"] == 1
        with app(proxy) as newcomer:
            query = pool.submit(lambda: newcomer.execute("SELECT 5").fetchone())
            time.sleep(0.3)
            assert not query.done()
            console.execute("RESUME app")
            assert query.result(10) == (5,)
        assert rows(console, "SHOW VERSION")  # the console itself survived the KILL


def test_kill_client_closes_one_connection(pgmux) -> None:
    proxy = admin_pgmux(pgmux)
    with app(proxy) as victim, app(proxy) as bystander, admin(proxy) as console:
        victim.execute("SELECT 1")
        ids = [c["id"] for c in rows(console, "SHOW CLIENTS") if c["database"] == APP_DATABASE]
        assert len(ids) == 2
        console.execute(f"KILL_CLIENT {min(ids)}")
        with pytest.raises(psycopg.OperationalError):
            victim.execute("SELECT 1")
        assert bystander.execute("SELECT 3").fetchone() == (3,)
        with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState, match="client not found"):
            console.execute(f"KILL_CLIENT {min(ids)}")


def test_reload_reads_the_configuration_source_again(pgmux, postgres) -> None:
    proxy = admin_pgmux(pgmux)
    with admin(proxy) as console:
        with pytest.raises(psycopg.errors.ConfigFileError, match="RELOAD failed"):
            console.execute("RELOAD")  # this pgmux was built from settings in memory: nothing to re-read
        changed = proxy.call(lambda p: p.settings).model_copy(update={"default_pool_size": 7})
        proxy.call(lambda p: setattr(p, "reload_settings", lambda: changed))
        assert console.execute("RELOAD").statusmessage == "RELOAD"
        config = {r["key"]: r["value"] for r in rows(console, "SHOW CONFIG")}
        assert config["default_pool_size"] == "7"

        def broken() -> object:
            raise ValueError("default_pool_size: must be at least 1")

        proxy.call(lambda p: setattr(p, "reload_settings", broken))
        with pytest.raises(psycopg.errors.ConfigFileError, match="must be at least 1"):
            console.execute("RELOAD")
        assert {r["key"]: r["value"] for r in rows(console, "SHOW CONFIG")}["default_pool_size"] == "7"


def test_shutdown_stops_pgmux(pgmux) -> None:
    proxy = admin_pgmux(pgmux)
    console = admin(proxy)
    with pytest.raises(psycopg.OperationalError):
        console.execute("SHUTDOWN")  # answered by the connection closing, as PgBouncer does
    deadline = time.monotonic() + 5
    while proxy._thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not proxy._thread.is_alive()
    with pytest.raises(OSError):
        socket.create_connection((proxy.host, proxy.port()), timeout=2)


def test_served_process_reloads_its_file_on_reload_serves_metrics_and_stops_on_shutdown(pgmux_process,
                                                                                        tmp_path: Path) -> None:
    config = tmp_path / "pgmux.toml"
    config.write_text('default_pool_size = 3\nadmin_users = ["app"]\nmetrics_listen = "127.0.0.1:0"\n')
    process = pgmux_process("--config", str(config))
    port = process.ports()[0]
    found = re.search(r"metrics on http://([^:]+):(\d+)/metrics", process.wait_for_log("metrics on http://"))
    assert found is not None
    with urllib.request.urlopen(f"http://{found[1]}:{found[2]}/healthz", timeout=5) as response:
        assert response.status == 200
    dsn = f"postgresql://{APP.name}:{APP.password}@127.0.0.1:{port}/pgmux"
    with psycopg.connect(dsn, autocommit=True) as console:
        assert {r["key"]: r["value"] for r in rows(console, "SHOW CONFIG")}["default_pool_size"] == "3"
        config.write_text('default_pool_size = 4\nadmin_users = ["app"]\nmetrics_listen = "127.0.0.1:0"\n')
        assert console.execute("RELOAD").statusmessage == "RELOAD"
        assert {r["key"]: r["value"] for r in rows(console, "SHOW CONFIG")}["default_pool_size"] == "4"
        config.write_text("default_pool_size = 0\n")
        with pytest.raises(psycopg.errors.ConfigFileError, match="default_pool_size"):
            console.execute("RELOAD")
        with pytest.raises(psycopg.OperationalError):
            console.execute("SHUTDOWN")
    assert process.process.wait(15) == 0
    assert "SHUTDOWN requested on the admin console" in process.log_path.read_text()


# ---- prometheus-pgbouncer-exporter (Debian package) against pgmux --------------------------------

def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_debian_pgbouncer_exporter_scrapes_pgmux(pgmux, tmp_path: Path) -> None:
    exporter = shutil.which("prometheus-pgbouncer-exporter")
    if exporter is None:
        pytest.skip("prometheus-pgbouncer-exporter not installed (Debian package prometheus-pgbouncer-exporter)")
    proxy = admin_pgmux(pgmux, default_pool_size=1, query_wait_timeout=30)
    port = _free_port()
    log_path = tmp_path / "exporter.log"
    with app(proxy) as holder, app(proxy) as waiter, ThreadPoolExecutor(1) as pool, log_path.open("wb") as log:
        holder.execute("BEGIN")
        holder.execute("SELECT 1")
        blocked = pool.submit(lambda: waiter.execute("SELECT 2").fetchone())
        process = subprocess.Popen(
            [exporter, "--pgbouncer-host", proxy.host, "--pgbouncer-port", str(proxy.port()),
             "--pgbouncer-user", APP.name, "--host", "127.0.0.1", "--port", str(port)],
            env={**os.environ, "PGPASSWORD": APP.password}, stdout=log, stderr=subprocess.STDOUT)
        try:
            text = _scrape_exporter(port, process, log_path)
        finally:
            process.terminate()
            process.wait(10)
        holder.execute("COMMIT")
        assert blocked.result(10) == (2,)
    values = {(s.name, tuple(sorted(s.labels.items()))): s.value
              for family in text_string_to_metric_families(text) for s in family.samples}
    app_pool = (("database", APP_DATABASE), ("user", APP.name))
    # The exporter's usual metrics, each from the SHOW command it reads.
    assert values[("pgbouncer_active_clients", app_pool)] == 1  # SHOW POOLS cl_active
    assert values[("pgbouncer_waiting_clients", app_pool)] == 1  # SHOW POOLS cl_waiting
    assert values[("pgbouncer_requests_total", (("database", APP_DATABASE),))] >= 2  # SHOW STATS
    assert values[("pgbouncer_received_bytes_total", (("database", APP_DATABASE),))] > 0
    assert values[("pgbouncer_sent_bytes_total", (("database", APP_DATABASE),))] > 0
    assert ("pgbouncer_query_microseconds_total", (("database", APP_DATABASE),)) in values
    assert values[("pgbouncer_pool_size", (("database", APP_DATABASE),))] == 1  # SHOW DATABASES
    assert values[("pgbouncer_reserve_pool", (("database", APP_DATABASE),))] == 0
    assert values[("pgbouncer_pools", ())] == 1  # SHOW LISTS
    assert values[("pgbouncer_used_servers", ())] == 1
    assert values[("pgbouncer_used_clients", ())] >= 3  # two app clients and the exporter itself
    assert values[("pgbouncer_databases", ())] == 1


def _scrape_exporter(port: int, process: subprocess.Popen, log_path: Path) -> str:
    deadline = time.monotonic() + 20
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
                text = response.read().decode()
            if "pgbouncer_active_clients{" in text:
                return text
        except OSError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"the exporter produced no pgbouncer metrics:\n{log_path.read_text(errors='replace')}")
        time.sleep(0.2)
