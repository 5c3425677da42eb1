"""storm: thousands of clients connect at the same instant, each runs one short query and leaves."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any

from benchmarks.pgwire import AsyncConnection, Endpoint, percentiles
from benchmarks.procs import CpuMeter
from benchmarks.scenarios.common import (
    BackendSampler, Result, RunConfig, Scenario, cdf_points, check_pooler, classify, measured, per_unit_us,
)
from benchmarks.targets import BenchEnv, Target

# Long enough that 20 backends are a real bottleneck (>= clients * 10 ms / 20 of pure query time).
QUERY = "SELECT pg_sleep(0.01)"
# A client still waiting this long after the pooler's query_wait_timeout counts as hung.
_GRACE_S = 15.0


async def _storm(endpoint: Endpoint, clients: int, client_timeout: float) -> tuple[list[tuple[str, float]], float]:
    go = asyncio.Event()
    outcomes: list[tuple[str, float]] = []
    start = 0.0

    async def one() -> None:
        await go.wait()

        async def body() -> None:
            conn = await AsyncConnection.connect(endpoint)
            try:
                await conn.query(QUERY)
            finally:
                await conn.close(wait=False)

        try:
            await asyncio.wait_for(body(), client_timeout)
            outcome = "served"
        except asyncio.TimeoutError:
            outcome = "hung"
        except Exception as exc:
            outcome = classify(exc)
        outcomes.append((outcome, time.perf_counter() - start))

    tasks = [asyncio.ensure_future(one()) for _ in range(clients)]
    await asyncio.sleep(0.05)  # every task is parked on the event
    start = time.perf_counter()
    go.set()
    await asyncio.gather(*tasks)
    return outcomes, time.perf_counter() - start


class Storm(Scenario):
    name = "storm"
    title = "Connection storm"
    description = (f"N clients connect at the same instant (a raw wire-protocol client, SCRAM login), each runs "
                   f"`{QUERY}` and disconnects. Measures the time until every client is served or refused, "
                   "refusals by SQLSTATE, clients still waiting past the wait timeout (hung), and the most backends "
                   "PostgreSQL showed (pg_stat_activity sampled every 10 ms).")

    def params(self, cfg: RunConfig, env: BenchEnv) -> dict[str, Any]:
        return {"clients": cfg.extra.get("storm_clients", 300 if cfg.quick else 5000), "query": QUERY,
                "pool_size": cfg.pool_size, "query_wait_timeout_s": cfg.query_wait_timeout,
                "hung_after_s": cfg.query_wait_timeout + _GRACE_S}

    def run(self, cfg: RunConfig, env: BenchEnv, target: Target, params: dict[str, Any]) -> Result:
        cfg.log(f"  {target.name}: {params['clients']} clients at once")
        meter = measured(env, target)
        with BackendSampler(env, target.pid, interval=0.01) as sampler:
            before = meter.snapshot()
            outcomes, elapsed = asyncio.run(_storm(target.endpoint, params["clients"], params["hung_after_s"]))
            sampler.settle(10.0)
            after = meter.snapshot()
        cpu = CpuMeter.delta(before, after)
        counts = Counter(outcome for outcome, _ in outcomes)
        served = counts.pop("served", 0)
        hung = counts.pop("hung", 0)
        served_times = [seconds * 1000 for outcome, seconds in outcomes if outcome == "served"]
        finished = [seconds for outcome, seconds in outcomes if outcome != "hung"]
        result: Result = {
            "status": "ok",
            "clients": len(outcomes),
            "served": served,
            "hung": hung,
            "refused_by_sqlstate": {key: value for key, value in counts.items() if key[:1].isdigit()},
            "other_failures": {key: value for key, value in counts.items() if not key[:1].isdigit()},
            "all_done_s": round(max(finished), 3) if finished else None,
            "wall_s": round(elapsed, 3),
            "served_latency_ms": {k: round(v, 1) for k, v in percentiles(served_times, (50, 99)).items()},
            "served_cdf_ms": cdf_points(served_times),
            "cpu": cpu,
            "pooler_cpu_us_per_client": per_unit_us(cpu.get("pooler_s"), len(outcomes)),
            **sampler.result(),
        }
        return check_pooler(target, result)
