"""serverless: N asyncpg workers, each request = connect -> one query -> disconnect, for a fixed time."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from typing import Any

from benchmarks.pgwire import percentiles
from benchmarks.procs import CpuMeter
from benchmarks.scenarios.common import (
    BackendSampler, Result, RunConfig, Scenario, cdf_points, check_pooler, classify, measured, per_unit_us,
)
from benchmarks.targets import BenchEnv, Target

QUERY = "SELECT abalance FROM pgbench_accounts WHERE aid = $1"


async def _workers(target: Target, workers: int, duration: float, accounts: int) -> tuple[list[float], Counter[str], float]:
    import asyncpg

    latencies: list[float] = []
    errors: Counter[str] = Counter()
    start = time.perf_counter()
    deadline = start + duration

    async def worker(seed: int) -> None:
        rng = random.Random(seed)
        while time.perf_counter() < deadline:
            began = time.perf_counter()
            try:
                # statement_cache_size=0: poolers in transaction mode cannot keep asyncpg's named statements;
                # the same setting for direct keeps the work per request identical.
                conn = await asyncpg.connect(host=target.host, port=target.port, user=target.user,
                                             password=target.password, database=target.database, ssl=False,
                                             statement_cache_size=0, timeout=10)
                try:
                    await conn.fetchval(QUERY, rng.randint(1, accounts))
                finally:
                    await conn.close(timeout=5)
            except Exception as exc:
                errors[classify(exc)] += 1
                await asyncio.sleep(0.01)  # do not spin on a refusing server
                continue
            latencies.append((time.perf_counter() - began) * 1000.0)

    tasks = [asyncio.ensure_future(worker(index)) for index in range(workers)]
    try:
        await asyncio.wait_for(asyncio.gather(*tasks), duration + 30)
    except asyncio.TimeoutError:
        errors["harness_timeout"] += 1
    return latencies, errors, time.perf_counter() - start


class Serverless(Scenario):
    name = "serverless"
    title = "Serverless: connect -> one query -> disconnect"
    description = ("N concurrent asyncpg workers; each request connects, runs one indexed SELECT and disconnects, "
                   "for a fixed time. Latency is the whole request (connect + login + query + close).")

    def params(self, cfg: RunConfig, env: BenchEnv) -> dict[str, Any]:
        return {"workers": cfg.extra.get("serverless_workers", 8 if cfg.quick else 50),
                "duration_s": max(1.0, cfg.duration), "query": QUERY}

    def run(self, cfg: RunConfig, env: BenchEnv, target: Target, params: dict[str, Any]) -> Result:
        cfg.log(f"  {target.name}: {params['workers']} workers for {params['duration_s']:g}s")
        meter = measured(env, target)
        with BackendSampler(env, target.pid) as sampler:
            before = meter.snapshot()
            latencies, errors, elapsed = asyncio.run(
                _workers(target, params["workers"], params["duration_s"], 100_000 * env.scale))
            after = meter.snapshot()
        cpu = CpuMeter.delta(before, after)
        stats = percentiles(latencies, (50, 95, 99, 99.9))
        result: Result = {
            "status": "ok" if latencies and not errors else ("error" if not latencies else "partial"),
            "requests": len(latencies),
            "errors": dict(errors),
            "throughput_rps": round(len(latencies) / elapsed, 1) if elapsed > 0 else None,
            "latency_ms": {key: round(value, 3) for key, value in stats.items()},
            "latency_cdf_ms": cdf_points(latencies),
            "cpu": cpu,
            "pooler_cpu_us_per_request": per_unit_us(cpu.get("pooler_s"), len(latencies)),
            **sampler.result(),
        }
        return check_pooler(target, result)
