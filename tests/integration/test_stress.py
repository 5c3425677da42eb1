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
                            PGMUX_MAX_CLIENT_CONN="5000")
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

        failures: list[BaseException] = []

        async def retry(conn: asyncpg.Connection) -> object:
            async with retry_gate:
                if failures:
                    return "skipped after a failed retry"  # fail in seconds, not 1,000 wait timeouts later
                try:
                    return await conn.fetchval("SELECT 7")
                except (asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                    failures.append(exc)
                    return exc

        retried = await asyncio.wait_for(
            asyncio.gather(*(retry(conn) for conn in refused), return_exceptions=True), 60)
        await asyncio.gather(*(conn.close() for conn in conns))

        async def afterwards() -> int:
            fresh = await connect(asyncio.Semaphore(1))
            try:
                return await fresh.fetchval("SELECT 42")
            finally:
                await fresh.close()

        after = (await asyncio.wait_for(asyncio.gather(afterwards(), return_exceptions=True), 10))[0]
        return {"outcomes": outcomes, "retried": retried, "after": after, "connect_s": connected - started,
                "burst_s": burst_took}

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
        f"refused then retried: {sum(r == 7 for r in result['retried'])} of {len(refused)} served | "
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
    # A 53300 leaves the session usable, and pgmux keeps serving: no server was lost in the burst.
    failed_retries = sorted({repr(r) for r in result["retried"] if r != 7})
    assert not failed_retries, f"refused clients not served on retry: {failed_retries[:3]}; {figures}"
    assert result["after"] == 42, f"a new client after the burst: {result['after']!r}"


def test_server_handed_over_as_the_wait_timeout_strikes_is_not_lost(pgmux) -> None:
    """The release that hands a server to a waiter and that waiter's deadline fall due in the same loop turn.

    Whichever wins, the server must end up serving someone or back in the pool, never held by nobody:
    a pool that loses servers this way ends up refusing every client with 53300 after a burst.
    """
    from proxy.protocol import messages as m
    from test_admission import RawClient

    proxy = pgmux(default_pool_size=1, auth_type="trust", query_wait_timeout=0.5)
    holder = RawClient(proxy.host, proxy.port())
    waiter = RawClient(proxy.host, proxy.port())
    holder.send(m.query("BEGIN"))
    holder.read_until_ready()
    waiter.send(m.query("SELECT 1"))  # in line for the only server; gives up at +0.5 s
    holder.send(m.query("SELECT pg_sleep(0.4); COMMIT"))  # frees it at about +0.45 s
    time.sleep(0.2)
    proxy.call(lambda p: time.sleep(0.6))  # pgmux busy meanwhile: the release and the deadline fall due together
    assert waiter.read_until_ready()[-1] == m.READY_FOR_QUERY  # served or refused: either is fair
    holder.read_until_ready()
    state = proxy.call(lambda p: [(len(pool.idle), len(pool.active)) for pool in p.router.pools.values()])
    assert state == [(1, 0)], f"(idle, active) = {state}: the server was handed to a waiter that had given up"
    holder.send(m.query("SELECT 2"))
    assert m.DATA_ROW in holder.read_until_ready()
    holder.close()
    waiter.close()
