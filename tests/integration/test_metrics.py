"""/metrics, /healthz, /readyz and the stats log line, checked against the real state of a live pgmux."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import asyncpg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pgusers import APP, APP_DATABASE
from proxy import BUILD
from proxy.metrics import METRICS, REJECTION_REASONS, exposition_names

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "config" / "grafana" / "dashboards" / "pgmux.json"


def _url(proxy, path: str) -> str:
    host, port = proxy.call(lambda p: p.metrics.address)
    return f"http://{host}:{port}{path}"


def _get(proxy, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(_url(proxy, path), timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def scrape(proxy) -> str:
    status, body = _get(proxy, "/metrics")
    assert status == 200
    return body


def samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    return [(s.name, s.labels, s.value) for family in text_string_to_metric_families(text) for s in family.samples]


def value(text: str, name: str, **labels: str) -> float:
    """The sum of the samples named ``name`` whose labels include ``labels``."""
    found = [v for n, l, v in samples(text) if n == name and all(l.get(k) == want for k, want in labels.items())]
    assert found, f"no sample {name}{labels} in the scrape"
    return sum(found)


async def _connect(proxy, **kwargs) -> asyncpg.Connection:
    return await asyncpg.connect(host=proxy.host, port=proxy.port(), user=kwargs.pop("user", APP.name),
                                 password=kwargs.pop("password", APP.password), database=APP_DATABASE,
                                 statement_cache_size=0, **kwargs)


def _metrics_pgmux(pgmux, **settings):
    return pgmux(metrics_listen="127.0.0.1:0", **settings)


def test_seven_waiting_clients_show_as_seven_waiting_and_maxwait_grows(pgmux) -> None:
    proxy = _metrics_pgmux(pgmux, default_pool_size=1, query_wait_timeout=30)
    pool = dict(database=APP_DATABASE, user=APP.name)

    async def scenario() -> None:
        holder = await _connect(proxy)
        waiters = [await _connect(proxy) for _ in range(7)]
        await holder.execute("BEGIN")
        queries = [asyncio.create_task(conn.fetchval("SELECT 1")) for conn in waiters]
        deadline = time.monotonic() + 10
        while True:
            text = await asyncio.to_thread(scrape, proxy)
            if value(text, "pgmux_clients", state="waiting", **pool) == 7 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
        assert value(text, "pgmux_clients", state="waiting", pool_mode="transaction", **pool) == 7
        assert value(text, "pgmux_clients", state="active", **pool) == 1
        assert value(text, "pgmux_clients", state="idle", **pool) == 0
        assert value(text, "pgmux_servers", state="active", **pool) == 1
        assert value(text, "pgmux_servers", state="idle", **pool) == 0
        assert value(text, "pgmux_pool_size", **pool) == 1
        await asyncio.sleep(0.3)
        text = await asyncio.to_thread(scrape, proxy)
        assert value(text, "pgmux_pool_maxwait_seconds", **pool) >= 0.3
        # The numbers are the same objects the admin console and the pool read.
        state = proxy.call(lambda p: (sum(1 for c in p.registry.clients if c.state.value == "waiting"),
                                      len(next(iter(p.router.pools.values())).waiters)))
        assert state == (7, 7)
        await holder.execute("COMMIT")
        assert await asyncio.gather(*queries) == [1] * 7
        text = await asyncio.to_thread(scrape, proxy)
        assert value(text, "pgmux_clients", state="waiting", **pool) == 0
        assert value(text, "pgmux_clients", state="idle", **pool) == 8
        assert value(text, "pgmux_pool_maxwait_seconds", **pool) == 0
        for conn in [holder, *waiters]:
            await conn.close()

    asyncio.run(scenario())


def test_counters_and_histograms_match_the_traffic(pgmux) -> None:
    proxy = _metrics_pgmux(pgmux, default_pool_size=2)
    pool = dict(database=APP_DATABASE, user=APP.name)

    async def scenario() -> None:
        conn = await _connect(proxy)
        for n in range(10):
            assert await conn.fetchval("SELECT $1::int", n) == n
        async with conn.transaction():
            await conn.execute("SELECT 1")
            await conn.execute("SELECT 2")
        await conn.close()

    accepted_before = proxy.call(lambda p: p.registry.accepted["tcp"])
    asyncio.run(scenario())
    text = scrape(proxy)
    stats = proxy.call(lambda p: next(iter(p.router.pools.values())).stats)
    assert value(text, "pgmux_transactions_total", **pool) == stats.xacts >= 11
    assert value(text, "pgmux_queries_total", **pool) == stats.queries >= 14
    assert value(text, "pgmux_received_bytes_total", **pool) == stats.bytes_received > 0
    assert value(text, "pgmux_sent_bytes_total", **pool) == stats.bytes_sent > 0
    assert value(text, "pgmux_server_connects_total", **pool) >= 1
    assert value(text, "pgmux_server_connect_failures_total", **pool) == 0
    assert value(text, "pgmux_client_connections_accepted_total", transport="tcp") == accepted_before + 1
    for name in ("pgmux_prepared_statement_hits_total", "pgmux_prepared_statement_misses_total",
                 "pgmux_prepared_statement_evictions_total", "pgmux_cancels_forwarded_total"):
        assert value(text, name, **pool) >= 0
    # Histograms: cumulative buckets from 100 µs to 30 s, +Inf equal to the count.
    count = value(text, "pgmux_transaction_duration_seconds_count", **pool)
    assert count == stats.xacts
    buckets = [(float(l["le"]), v) for n, l, v in samples(text)
               if n == "pgmux_transaction_duration_seconds_bucket" and l["database"] == APP_DATABASE]
    assert buckets[0][0] == 0.0001 and 30.0 in [b for b, _ in buckets] and buckets[-1] == (float("inf"), count)
    assert [v for _, v in buckets] == sorted(v for _, v in buckets)
    assert value(text, "pgmux_transaction_duration_seconds_sum", **pool) > 0
    assert value(text, "pgmux_client_wait_seconds_count", **pool) >= count
    # Build info and process metrics.
    assert value(text, "pgmux_build_info", hot_path="compiled" if BUILD.compiled else "python") == 1
    assert value(text, "process_resident_memory_bytes") > 0
    assert value(text, "process_open_fds") > 0


def test_rejections_are_counted_by_reason(pgmux) -> None:
    proxy = _metrics_pgmux(pgmux, max_client_conn=2)
    text = scrape(proxy)
    for reason in REJECTION_REASONS:  # exported at 0 from the start, so rate() sees the first one
        assert value(text, "pgmux_client_rejections_total", reason=reason) == 0

    async def scenario() -> None:
        held = [await _connect(proxy) for _ in range(2)]
        with pytest.raises(asyncpg.TooManyConnectionsError):
            await _connect(proxy)
        await held[1].close()
        with pytest.raises(asyncpg.InvalidPasswordError):
            await _connect(proxy, password="wrong")
        with pytest.raises(asyncpg.InvalidPasswordError):  # an unknown database is refused as a wrong password
            await asyncpg.connect(host=proxy.host, port=proxy.port(), user=APP.name, password=APP.password,
                                  database="nosuchdb")
        await held[0].close()

    asyncio.run(scenario())
    text = scrape(proxy)
    assert value(text, "pgmux_client_rejections_total", reason="max_client_conn") == 1
    assert value(text, "pgmux_client_rejections_total", reason="auth_failed") == 1
    assert value(text, "pgmux_client_rejections_total", reason="unknown_database") == 1
    assert value(text, "pgmux_client_rejections_total", reason="wait_timeout") == 0
    assert value(text, "pgmux_client_rejections_total") == 3


def test_wait_timeout_rejection_is_counted(pgmux) -> None:
    proxy = _metrics_pgmux(pgmux, default_pool_size=1, query_wait_timeout=0.3)

    async def scenario() -> None:
        holder, waiter = await _connect(proxy), await _connect(proxy)
        await holder.execute("BEGIN")
        with pytest.raises(asyncpg.TooManyConnectionsError):
            await waiter.fetchval("SELECT 1")
        await holder.execute("COMMIT")
        await holder.close()
        await waiter.close()

    asyncio.run(scenario())
    assert value(scrape(proxy), "pgmux_client_rejections_total", reason="wait_timeout") == 1


def _names_after_one_query(pgmux) -> set[str]:
    """The sample names a live pgmux exports once one client has logged in and queried."""
    proxy = _metrics_pgmux(pgmux)

    async def scenario() -> None:
        conn = await _connect(proxy)
        await conn.fetchval("SELECT 1")
        await conn.close()

    asyncio.run(scenario())
    return {name for name, _, _ in samples(scrape(proxy))}


def test_every_catalogued_metric_is_in_a_live_scrape_and_nothing_else_is(pgmux) -> None:
    names = _names_after_one_query(pgmux)
    expected = {sample for metric in METRICS for sample in exposition_names(metric)}
    assert expected <= names, expected - names
    ours = {name for name in names if name.startswith("pgmux_")}
    assert ours == expected, ours - expected


def test_dashboard_uses_only_metrics_that_a_live_pgmux_exports(pgmux) -> None:
    names = _names_after_one_query(pgmux)
    used = dashboard_metric_names(json.loads(DASHBOARD.read_text()))
    assert used, "the dashboard queries no metric"
    assert used <= names, f"dashboard uses metrics pgmux does not export: {sorted(used - names)}"


def dashboard_metric_names(dashboard: dict) -> set[str]:
    exprs: list[str] = []

    def walk(node: object) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("expr"), str):
                exprs.append(node["expr"])
            for child in node.values():
                walk(child)
        elif isinstance(node, list):
            for child in node:
                walk(child)

    walk(dashboard)
    return {name for expr in exprs for name in re.findall(r"\b(?:pgmux|process|python)_[a-z0-9_]+\b", expr)}


def test_promtool_accepts_the_exposition(pgmux, tmp_path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package `prometheus`)")
    proxy = _metrics_pgmux(pgmux)

    async def scenario() -> None:
        conn = await _connect(proxy)
        await conn.fetchval("SELECT 1")
        await conn.close()

    asyncio.run(scenario())
    result = subprocess.run([promtool, "check", "metrics"], input=scrape(proxy), capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "" and result.stderr.strip() == "", result.stdout + result.stderr


def test_healthz_and_readyz(pgmux, postgres) -> None:
    proxy = _metrics_pgmux(pgmux, shutdown_timeout=10)
    assert _get(proxy, "/healthz") == (200, "ok\n")
    status, body = _get(proxy, "/readyz")
    assert status == 200, body
    assert body.startswith("ready\n") and "database app:" in body and "reachable" in body
    assert "app-secret" not in body
    assert _get(proxy, "/nope")[0] == 404

    async def draining() -> None:
        holder = await _connect(proxy)
        await holder.execute("BEGIN")
        proxy.call(lambda p: p.registry.spawn(p.stop(graceful=True), name="shutdown"))
        deadline = time.monotonic() + 5
        while proxy.call(lambda p: not p.registry.draining) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        status, body = await asyncio.to_thread(_get, proxy, "/readyz")
        assert status == 503 and "draining" in body
        assert (await asyncio.to_thread(_get, proxy, "/healthz"))[0] == 200  # alive while draining
        await holder.execute("COMMIT")
        await holder.close()

    asyncio.run(draining())


def test_readyz_is_503_when_the_upstream_is_unreachable(pgmux, unused_tcp_port) -> None:
    url = f"postgresql://app:secret@127.0.0.1:{unused_tcp_port}/app?sslmode=disable"
    proxy = _metrics_pgmux(pgmux, upstream_url=url)
    deadline = time.monotonic() + 10
    while True:
        status, body = _get(proxy, "/readyz")
        if "not checked yet" not in body or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert status == 503
    assert f"127.0.0.1:{unused_tcp_port}" in body and "unreachable" in body
    assert "secret" not in body.replace("app:***", "")
    assert value(scrape(proxy), "pgmux_ready") == 0


@pytest.fixture
def unused_tcp_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_stats_line_is_logged_every_stats_period(pgmux) -> None:
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("pgmux.app")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        proxy = pgmux(stats_period=0.5)

        async def scenario() -> None:
            conn = await _connect(proxy)
            deadline = time.monotonic() + 1.2
            while time.monotonic() < deadline:
                await conn.fetchval("SELECT 1")
            await conn.close()

        asyncio.run(scenario())
        time.sleep(0.6)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    lines = [line for line in records if line.startswith("stats: ")]
    assert len(lines) >= 2, records
    pattern = re.compile(r"^stats: (\d+) xacts/s, (\d+) queries/s, \d+ client logins/s, in (\d+) B/s, "
                         r"out (\d+) B/s, xact \d+ us, query \d+ us, wait \d+ us$")
    assert all(pattern.match(line) for line in lines), lines
    busy = [pattern.match(line) for line in lines if int(pattern.match(line).group(1)) > 0]
    assert busy, lines
    xacts, queries, received, sent = (int(busy[0].group(i)) for i in range(1, 5))
    assert queries >= xacts > 0 and received > 0 and sent > 0
