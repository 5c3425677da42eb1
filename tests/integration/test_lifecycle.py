"""Process lifecycle of a real `pgmux serve`: SIGTERM drains, SIGINT stops fast, SIGHUP reloads the file."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import asyncpg
import pytest

from pgusers import APP, APP_DATABASE


async def _connect(port: int, database: str = APP_DATABASE) -> asyncpg.Connection:
    return await asyncpg.connect(host="127.0.0.1", port=port, user=APP.name, password=APP.password,
                                 database=database, statement_cache_size=0)


def test_sigterm_lets_running_transactions_finish_and_closes_idle_clients_with_57p01(pgmux_process) -> None:
    process = pgmux_process("--shutdown-timeout", "10")
    port = process.ports()[0]

    async def scenario() -> None:
        busy = await _connect(port)
        idle = await _connect(port)
        await busy.execute("BEGIN")
        await busy.execute("CREATE TEMP TABLE drained (x int)")
        process.signal(signal.SIGTERM)
        await asyncio.sleep(0.5)
        # The idle client was told and closed; the one in a transaction may still finish it.
        assert idle.is_closed() or await _raises_admin_shutdown(idle)
        await busy.execute("INSERT INTO drained VALUES (1)")
        assert await busy.fetchval("SELECT count(*) FROM drained") == 1
        await busy.execute("COMMIT")
        with pytest.raises(OSError):
            await asyncio.wait_for(_connect(port), 2)  # no longer listening
        await asyncio.sleep(0.5)
        assert busy.is_closed() or await _raises_admin_shutdown(busy)

    asyncio.run(scenario())
    process.process.wait(15)
    assert process.process.returncode == 0
    assert "pgmux stopped" in process.log_path.read_text()


async def _raises_admin_shutdown(conn: asyncpg.Connection) -> bool:
    try:
        await conn.fetchval("SELECT 1")
    except asyncpg.AdminShutdownError:
        return True
    except (asyncpg.InterfaceError, asyncpg.ConnectionDoesNotExistError, OSError):
        return True
    return False


def test_sigint_stops_at_once_even_with_a_transaction_open(pgmux_process) -> None:
    process = pgmux_process("--shutdown-timeout", "60")
    port = process.ports()[0]

    async def scenario() -> None:
        conn = await _connect(port)
        await conn.execute("BEGIN")
        started = time.monotonic()
        process.signal(signal.SIGINT)
        process.process.wait(10)
        assert time.monotonic() - started < 5

    asyncio.run(scenario())
    assert process.process.returncode == 0


def _write_config(path: Path, upstream: str, pool_size: int, extra: str = "") -> None:
    path.write_text(f'default_pool_size = {pool_size}\n[databases.app]\nurl = "{upstream}"\n{extra}')


def test_sighup_reloads_pool_size_and_databases_without_dropping_clients(pgmux_process, postgres, tmp_path) -> None:
    upstream = postgres.dsn(APP.name, APP.password, APP_DATABASE, sslmode="disable")
    config = tmp_path / "pgmux.toml"
    _write_config(config, upstream, pool_size=4)
    process = pgmux_process("--config", str(config), PGMUX_UPSTREAM_URL="")
    port = process.ports()[0]

    async def backends_used(clients: list[asyncpg.Connection]) -> int:
        """Run a short transaction on every client at once; count the distinct backends they got."""
        async def one(conn: asyncpg.Connection) -> int:
            async with conn.transaction():
                pid = await conn.fetchval("SELECT pg_backend_pid()")
                await asyncio.sleep(0.2)
                return pid

        return len(set(await asyncio.gather(*(one(conn) for conn in clients))))

    async def scenario() -> None:
        kept = await _connect(port)
        clients = [await _connect(port) for _ in range(4)]
        assert await backends_used(clients) == 4
        # Shrink the pool and add a database; the connected clients stay.
        second = upstream.replace(f"/{APP_DATABASE}?", "/postgres?")
        _write_config(config, upstream, pool_size=2, extra=f'[databases.other]\nurl = "{second}"\n')
        process.signal(signal.SIGHUP)
        process.wait_for_log("configuration reloaded")
        assert await kept.fetchval("SELECT 1") == 1
        assert await backends_used(clients) <= 2
        other = await _connect(port, database="other")
        assert await other.fetchval("SELECT current_database()") == "postgres"
        # An invalid file is refused; the running configuration stays.
        config.write_text('default_pool_size = "many"\n')
        process.signal(signal.SIGHUP)
        process.wait_for_log("reload refused")
        assert await other.fetchval("SELECT 2") == 2
        fresh = await _connect(port, database="other")
        await fresh.close()
        for conn in [kept, other, *clients]:
            await conn.close()

    asyncio.run(scenario())
    assert "default_pool_size" in process.log_path.read_text()
