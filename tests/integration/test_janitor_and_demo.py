"""Pool upkeep (min_pool_size, server_idle_timeout, server_lifetime), unix-socket upstreams and `pgmux demo`."""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import asyncpg
import psutil
import pytest

from harness import ROOT
from pgusers import APP, APP_DATABASE
from proxy.embedded import postgres_bin_dir


async def _connect(proxy, **kwargs) -> asyncpg.Connection:
    return await asyncpg.connect(host=proxy.host, port=proxy.port(), user=APP.name, password=APP.password,
                                 database=APP_DATABASE, **kwargs)


def _pool_totals(proxy) -> tuple[int, int]:
    return proxy.call(lambda p: (sum(pool.total for pool in p.router.pools.values()),
                                 sum(len(pool.idle) for pool in p.router.pools.values())))


def _eventually(check, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def test_min_pool_size_is_kept_warm_and_idle_servers_above_it_time_out(pgmux) -> None:
    proxy = pgmux(default_pool_size=5, min_pool_size=2, server_idle_timeout=0.5)

    async def burst() -> None:
        conns = [await _connect(proxy) for _ in range(5)]

        async def hold(conn: asyncpg.Connection) -> None:
            async with conn.transaction():
                await conn.execute("SELECT pg_sleep(0.2)")

        await asyncio.gather(*(hold(c) for c in conns))
        for conn in conns:
            await conn.close()

    asyncio.run(burst())
    assert _pool_totals(proxy)[0] == 5
    # Idle past server_idle_timeout: closed down to min_pool_size, not below.
    _eventually(lambda: _pool_totals(proxy)[0] == 2)
    time.sleep(1.0)
    assert _pool_totals(proxy) == (2, 2)


def test_server_lifetime_replaces_old_servers_between_transactions(pgmux) -> None:
    proxy = pgmux(default_pool_size=1, server_lifetime=0.5)

    async def scenario() -> None:
        conn = await _connect(proxy)
        first = await conn.fetchval("SELECT pg_backend_pid()")
        await asyncio.sleep(0.8)
        await conn.fetchval("SELECT 1")  # this one may still run on the old server; it is retired after
        await asyncio.sleep(0.3)
        assert await conn.fetchval("SELECT pg_backend_pid()") != first
        await conn.close()

    asyncio.run(scenario())


def test_upstream_over_a_unix_socket(pgmux, postgres) -> None:
    socket_dir = getattr(postgres, "socket_dir", None)
    if socket_dir is None:
        pytest.skip("the test server was not started by this suite: no known socket directory")
    url = f"postgresql://{APP.name}:{APP.password}@/{APP_DATABASE}?host={socket_dir}&port={postgres.port}"
    proxy = pgmux(upstream_url=url)

    async def scenario() -> None:
        conn = await _connect(proxy)
        # A unix-socket backend has no client address in pg_stat_activity.
        assert await conn.fetchval("SELECT client_addr IS NULL FROM pg_stat_activity WHERE pid = pg_backend_pid()")
        await conn.close()

    asyncio.run(scenario())


def test_demo_prints_urls_serves_them_and_cleans_up_on_ctrl_c(tmp_path: Path) -> None:
    log = tmp_path / "demo.log"
    with log.open("wb") as out:
        demo = subprocess.Popen([sys.executable, "-m", "proxy", "demo", "--listen", "127.0.0.1:0"], cwd=ROOT,
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        text = ""
        while "DIRECT_URL=" not in text:
            assert demo.poll() is None, log.read_text()
            assert time.monotonic() < deadline, text
            time.sleep(0.1)
            text = log.read_text()
        pooled = re.search(r"DATABASE_URL=(\S+)", text).group(1)
        direct = re.search(r"DIRECT_URL=(\S+)", text).group(1)
        console = re.search(r'admin console: psql "(\S+)"', text).group(1)

        async def scenario() -> tuple[int, str]:
            via_pgmux = await asyncpg.connect(pooled)
            straight = await asyncpg.connect(direct)
            answer = await via_pgmux.fetchval("SELECT 40 + 2")
            name = await straight.fetchval("SELECT current_database()")
            await via_pgmux.close()
            await straight.close()
            return answer, name

        assert asyncio.run(scenario()) == (42, "app")
        # The admin console line as printed, run as the user would: the pool the pooled client used is there.
        pools = subprocess.run([str(postgres_bin_dir() / "psql"), "-X", "-At", console, "-c", "SHOW POOLS"],
                               capture_output=True, text=True, timeout=30)
        assert pools.returncode == 0, pools.stderr
        assert pools.stdout.startswith("app|app|"), pools.stdout
        found = re.search(r"PostgreSQL: pid (\d+), data directory (\S+)", text)
        postmaster, data_dir = int(found.group(1)), Path(found.group(2))
        assert psutil.Process(postmaster).is_running() and (data_dir / "PG_VERSION").exists()
        demo.send_signal(signal.SIGINT)
        assert demo.wait(30) == 0
        assert not psutil.pid_exists(postmaster) or psutil.Process(postmaster).status() == psutil.STATUS_ZOMBIE
        assert not data_dir.exists()
        assert "stopped pgmux and PostgreSQL" in log.read_text()
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait(10)
