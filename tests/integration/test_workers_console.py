"""`workers = 2`: the admin console answers for, and commands, the whole pgmux from whichever worker the kernel
hands the console connection to."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import asyncpg
import psycopg

from pgusers import APP, APP_DATABASE
from test_workers import _clients_on, _wait_for_listeners


def _start(pgmux_process, tmp_path: Path, **env: str):
    config = tmp_path / "pgmux.toml"
    config.write_text('admin_users = ["app"]\ndefault_pool_size = 4\nmax_client_conn = 100\n')
    process = pgmux_process("--config", str(config), PGMUX_WORKERS="2", **env)
    _wait_for_listeners(process, 2)
    return process, process.ports()[0]


def _console(port: int, notices: list[str] | None = None) -> psycopg.Connection:
    conn = psycopg.connect(f"postgresql://{APP.name}:{APP.password}@127.0.0.1:{port}/pgmux?sslmode=disable",
                           autocommit=True, application_name="console")
    if notices is not None:
        conn.add_notice_handler(lambda diagnostic: notices.append(diagnostic.message_primary or ""))
    return conn


def _rows(conn: psycopg.Connection, command: str) -> list[dict]:
    cursor = conn.execute(command)
    names = [column.name for column in cursor.description]
    return [dict(zip(names, row)) for row in cursor.fetchall()]


def test_every_console_connection_shows_the_clients_and_servers_of_every_worker(pgmux_process, tmp_path) -> None:
    process, port = _start(pgmux_process, tmp_path)

    async def scenario() -> None:
        zero = await _clients_on(process, port, 0, 3)
        one = await _clients_on(process, port, 1, 2)
        for conn in zero + one:
            assert await conn.fetchval("SELECT 1") == 1
        for _ in range(6):  # console connections land on either worker: each answers for both
            with _console(port) as console:
                pool = next(r for r in _rows(console, "SHOW POOLS") if r["database"] == APP_DATABASE)
                assert pool["cl_active"] + pool["cl_waiting"] == 5
                assert 1 <= pool["sv_idle"] + pool["sv_active"] <= 4
                clients = [r for r in _rows(console, "SHOW CLIENTS") if r["database"] == APP_DATABASE]
                assert len(clients) == 5
                assert len({r["id"] for r in clients}) == 5 and len({r["ptr"] for r in clients}) == 5
                assert sorted(r["ptr"].split()[0] for r in clients) == ["w0", "w0", "w0", "w1", "w1"]
                servers = _rows(console, "SHOW SERVERS")
                assert {r["ptr"].split()[0] for r in servers} == {"w0", "w1"}  # each worker opened its own
                assert len({r["id"] for r in servers}) == len(servers) == pool["sv_idle"] + pool["sv_active"]
                database = next(r for r in _rows(console, "SHOW DATABASES") if r["name"] == APP_DATABASE)
                # pool_size holds for the whole pgmux already: not doubled; the client shares add up again.
                assert (database["pool_size"], database["current_client_connections"]) == (4, 5)
                config = {r["key"]: r["value"] for r in _rows(console, "SHOW CONFIG")}
                assert (config["max_client_conn"], config["default_pool_size"]) == ("100", "4")
                stats = next(r for r in _rows(console, "SHOW STATS") if r["database"] == APP_DATABASE)
                assert stats["total_xact_count"] >= 5
                lists = {r["list"]: r["items"] for r in _rows(console, "SHOW LISTS")}
                assert lists["used_clients"] >= 6 and lists["pools"] == 1
                assert {r["key"]: r["value"] for r in _rows(console, "SHOW STATE")}["paused"] == "no"
        for conn in zero + one:
            await conn.close()

    asyncio.run(scenario())


def test_pause_on_one_console_holds_queries_in_every_worker_until_resume_on_another(pgmux_process,
                                                                                    tmp_path) -> None:
    process, port = _start(pgmux_process, tmp_path)

    async def scenario() -> None:
        clients = await _clients_on(process, port, 0, 2) + await _clients_on(process, port, 1, 2)
        pausing = await asyncio.to_thread(_console, port)
        assert (await asyncio.to_thread(pausing.execute, "PAUSE")).statusmessage == "PAUSE"
        queries = [asyncio.create_task(conn.fetchval("SELECT 7")) for conn in clients]
        await asyncio.sleep(1)
        assert not any(query.done() for query in queries)  # held in both workers
        with await asyncio.to_thread(_console, port) as other:
            state = {r["key"]: r["value"] for r in await asyncio.to_thread(_rows, other, "SHOW STATE")}
            assert state["paused"] == "yes"
            databases = await asyncio.to_thread(_rows, other, "SHOW DATABASES")
            assert next(r for r in databases if r["name"] == APP_DATABASE)["paused"] == 1
            assert (await asyncio.to_thread(other.execute, "RESUME")).statusmessage == "RESUME"
        assert await asyncio.wait_for(asyncio.gather(*queries), 10) == [7, 7, 7, 7]
        pausing.close()
        for conn in clients:
            await conn.close()

    asyncio.run(scenario())


def test_kill_client_by_its_id_closes_that_client_in_whichever_worker_holds_it(pgmux_process, tmp_path) -> None:
    process, port = _start(pgmux_process, tmp_path)

    async def scenario() -> None:
        clients = await _clients_on(process, port, 0, 2) + await _clients_on(process, port, 1, 2)
        ports = [conn._transport.get_extra_info("sockname")[1] for conn in clients]
        with await asyncio.to_thread(_console, port) as console:
            rows = {r["port"]: r for r in await asyncio.to_thread(_rows, console, "SHOW CLIENTS")}
            for victim in (0, 3):  # one on each worker: one of them is not the console's worker
                command = f"KILL_CLIENT {rows[ports[victim]]['id']}"
                assert (await asyncio.to_thread(console.execute, command)).statusmessage == "KILL_CLIENT"
            left = {r["port"] for r in await asyncio.to_thread(_rows, console, "SHOW CLIENTS")}
        assert ports[0] not in left and ports[3] not in left and {ports[1], ports[2]} <= left
        for index, conn in enumerate(clients):
            if index in (0, 3):
                try:
                    await conn.fetchval("SELECT 1")
                except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
                    continue
                raise AssertionError(f"client {index} was not killed")
            assert await conn.fetchval("SELECT 1") == 1
            await conn.close()

    asyncio.run(scenario())


def test_a_sibling_killed_with_sigkill_is_named_in_a_notice_and_never_hangs_the_console(pgmux_process,
                                                                                       tmp_path) -> None:
    process, port = _start(pgmux_process, tmp_path)
    notices: list[str] = []

    def state(console: psycopg.Connection) -> str:
        return {r["key"]: r["value"] for r in _rows(console, "SHOW STATE")}["paused"]

    with _console(port, notices) as console:
        own = int(next(r for r in _rows(console, "SHOW CLIENTS") if r["application_name"] == "console")["ptr"]
                  .split()[0][1:])
        other = 1 - own
        assert console.execute("PAUSE").statusmessage == "PAUSE"
        victim = process.worker_pids()[other]
        process.signal_pid(victim, signal.SIGKILL)
        started = time.monotonic()
        assert _rows(console, "SHOW DATABASES")
        assert state(console) == "yes"  # the worker that answers is paused; the dead one is left out
        assert time.monotonic() - started < 5  # each within the 1.5 s a sibling has to answer
        assert any(f"worker {other} did not answer" in notice for notice in notices), notices
        # Its replacement answers again, and starts unpaused: the whole is partly paused.
        deadline = time.monotonic() + 20
        while process.worker_pids()[other] == victim:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        _wait_for_listeners(process, 3)
        while True:
            assert time.monotonic() < deadline, notices
            notices.clear()
            paused = state(console)
            if not notices:
                break
            time.sleep(0.1)
        assert paused == "mixed"
        # RESUME works where it can, and names the worker that was not paused.
        assert console.execute("RESUME").statusmessage == "RESUME"
        assert any(f"worker {other}: pooler is not paused" in notice for notice in notices), notices
        assert state(console) == "no"
    assert process.process.poll() is None


def test_shutdown_on_the_console_stops_every_worker_and_the_supervisor(pgmux_process, tmp_path) -> None:
    process, port = _start(pgmux_process, tmp_path)
    with _console(port) as console:
        assert console.execute("SHUTDOWN WAIT_FOR_CLIENTS").statusmessage == "SHUTDOWN"
    assert process.process.wait(20) == 0
    log = process.log_path.read_text()
    assert "all workers stopped" in log and "starting a new one" not in log
