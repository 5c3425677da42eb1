"""Stress: 2,000 clients against a pool of 10 — each is served or told 53300, PostgreSQL never sees more than 10.

pgmux runs as its own process (`python -m proxy serve`, uvloop) so that the 2,000 asyncpg clients in
this process do not share its interpreter lock: the waits measured are pgmux's, not the test's.
"""

from __future__ import annotations

import asyncio
import resource
import threading
import time

import asyncpg
import psycopg
import pytest

from pgusers import APP, APP_DATABASE

CLIENTS = 2000
POOL_SIZE = 10
WAIT_TIMEOUT = 2.0
# Each transaction holds its backend ~20 ms, so 10 backends serve ~500/s and a 2,000-client burst must
# shed load. A simple query (no parameters) is one trip through the wait line; asyncpg's extended
# protocol would be two (prepare, then execute), each waiting its turn.
WORK = "SELECT pg_sleep(0.02), {index}"


def _raise_fd_limit(wanted: int) -> None:
    # Client and pgmux sides of every connection live in this process: two descriptors each.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        if target < wanted:
            pytest.skip(f"needs {wanted} file descriptors, the hard limit is {hard}")


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] if ordered else 0.0


@pytest.mark.slow
def test_2000_clients_on_a_pool_of_10_are_served_or_get_53300_and_backends_stay_bounded(
        pgmux_process, postgres) -> None:
    _raise_fd_limit(4 * CLIENTS + 1024)  # before the pgmux process starts: it inherits the limit
    process = pgmux_process(PGMUX_DEFAULT_POOL_SIZE=str(POOL_SIZE), PGMUX_QUERY_WAIT_TIMEOUT=str(WAIT_TIMEOUT),
                            PGMUX_MAX_CLIENT_CONN="5000", PGMUX_LOG_LEVEL="warning")
    port = process.ports()[0]
    started = time.monotonic()

    # PostgreSQL's own view, sampled from another thread: backends of the app role started by this test.
    observer = psycopg.connect(postgres.dsn(database=APP_DATABASE), autocommit=True)
    since = observer.execute("SELECT now()").fetchone()[0]
    samples: list[int] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            count = observer.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE usename = %s AND datname = %s "
                "AND backend_type = 'client backend' AND backend_start >= %s", (APP.name, APP_DATABASE, since),
            ).fetchone()[0]
            samples.append(count)
            time.sleep(0.01)

    sampler = threading.Thread(target=sample, name="backend-sampler")
    sampler.start()

    async def connect(gate: asyncio.Semaphore) -> asyncpg.Connection:
        async with gate:
            return await asyncpg.connect(host="127.0.0.1", port=port, user=APP.name, password=APP.password,
                                         database=APP_DATABASE, statement_cache_size=0, timeout=60)

    async def ask(conn: asyncpg.Connection, index: int, go: asyncio.Event) -> tuple[str, float]:
        await go.wait()
        sent = time.monotonic()
        try:
            assert await conn.execute(WORK.format(index=index)) == "SELECT 1"
            return "ok", time.monotonic() - sent
        except asyncpg.PostgresError as exc:
            return exc.sqlstate, time.monotonic() - sent

    async def scenario() -> dict[str, object]:
        gate = asyncio.Semaphore(200)
        conns = await asyncio.gather(*(connect(gate) for _ in range(CLIENTS)))
        connected = time.monotonic()
        go = asyncio.Event()
        asks = [asyncio.ensure_future(ask(conn, i, go)) for i, conn in enumerate(conns)]
        await asyncio.sleep(0.1)
        burst = time.monotonic()
        go.set()  # all 2,000 at once
        outcomes = await asyncio.wait_for(asyncio.gather(*asks), 60)
        burst_took = time.monotonic() - burst

        # A 53300 wait timeout leaves the session usable: every refused client is served on retry.
        refused = [conns[i] for i, (outcome, _) in enumerate(outcomes) if outcome == "53300"]
        retry_gate = asyncio.Semaphore(POOL_SIZE * 2)

        async def retry(conn: asyncpg.Connection) -> int:
            async with retry_gate:
                return await conn.fetchval("SELECT 7")

        retried = await asyncio.wait_for(asyncio.gather(*(retry(conn) for conn in refused)), 60)
        await asyncio.gather(*(conn.close() for conn in conns))

        fresh = await asyncio.wait_for(connect(asyncio.Semaphore(1)), 10)
        assert await fresh.fetchval("SELECT 42") == 42  # and pgmux keeps serving afterwards
        await fresh.close()
        return {"outcomes": outcomes, "retried": retried, "connect_s": connected - started, "burst_s": burst_took}

    try:
        result = asyncio.run(scenario())
    finally:
        done.set()
        sampler.join()
        observer.close()

    outcomes: list[tuple[str, float]] = result["outcomes"]  # type: ignore[assignment]
    served = [latency for outcome, latency in outcomes if outcome == "ok"]
    refused = [latency for outcome, latency in outcomes if outcome == "53300"]
    others = sorted({outcome for outcome, _ in outcomes} - {"ok", "53300"})
    figures = (
        f"\nstress: {CLIENTS} clients, pool_size={POOL_SIZE}, query_wait_timeout={WAIT_TIMEOUT:g}s | "
        f"max backends seen by PostgreSQL {max(samples)} ({len(samples)} samples) | "
        f"served {len(served)}, 53300 {len(refused)}, other {len(outcomes) - len(served) - len(refused)} | "
        f"wait p50 {_percentile(served, 0.5):.3f}s p99 {_percentile(served, 0.99):.3f}s max {max(served, default=0):.3f}s; "
        f"53300 after p50 {_percentile(refused, 0.5):.3f}s max {max(refused, default=0):.3f}s | "
        f"connect {result['connect_s']:.1f}s, burst {result['burst_s']:.1f}s, total {time.monotonic() - started:.1f}s"
    )
    print(figures)
    assert not others, f"clients got something other than an answer or 53300: {others}"
    assert len(served) + len(refused) == CLIENTS
    assert served, "nobody was served"
    assert max(samples) <= POOL_SIZE, figures
    assert process.process.poll() is None, "pgmux exited"
    # Nobody waits past the timeout (plus the janitor's and the event loop's slack) for either verdict.
    assert max(served) < WAIT_TIMEOUT + 2 and max(refused, default=0) < WAIT_TIMEOUT + 2, figures
    assert result["retried"] == [7] * len(refused)
