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
    BackendSampler, Result, RunConfig, Scenario, cdf_points, check_pooler, classify, measured, overall_status,
    per_unit_us,
)
from benchmarks.targets import BenchEnv, Target

QUERY = "SELECT abalance FROM pgbench_accounts WHERE aid = $1"


async def _request(target: Target, aid: int) -> None:
    import asyncpg

    # statement_cache_size=0: poolers in transaction mode cannot keep asyncpg's named statements;
    # the same setting for direct keeps the work per request identical.
    conn = await asyncpg.connect(host=target.host, port=target.port, user=target.user, password=target.password,
                                 database=target.database, ssl=False, statement_cache_size=0, timeout=10)
    try:
        await conn.fetchval(QUERY, aid)
    finally:
        await conn.close(timeout=5)


async def _closed_loop(target: Target, workers: int, duration: float,
                       accounts: int) -> tuple[list[float], Counter[str], float]:
    """``workers`` loops, each issuing its next request as soon as the last one is done."""
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    start = time.perf_counter()
    deadline = start + duration

    async def worker(seed: int) -> None:
        rng = random.Random(seed)
        while time.perf_counter() < deadline:
            began = time.perf_counter()
            try:
                await _request(target, rng.randint(1, accounts))
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


async def _open_loop(target: Target, rate: float, duration: float,
                     accounts: int) -> tuple[list[float], Counter[str], float]:
    """Requests start on a fixed schedule (``rate`` per second) whatever the previous ones are doing; latency is
    measured from the scheduled start, so a slow target cannot hide its queueing (no coordinated omission)."""
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    rng = random.Random(7)
    count = max(1, int(rate * duration))
    start = time.perf_counter() + 0.05

    async def one(scheduled: float, aid: int) -> None:
        try:
            await _request(target, aid)
        except Exception as exc:
            errors[classify(exc)] += 1
            return
        latencies.append((time.perf_counter() - scheduled) * 1000.0)

    tasks = []
    for index in range(count):
        scheduled = start + index / rate
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(one(scheduled, rng.randint(1, accounts))))
    try:
        await asyncio.wait_for(asyncio.gather(*tasks), 30)
    except asyncio.TimeoutError:
        errors["harness_timeout"] += 1
    return latencies, errors, time.perf_counter() - start


class Serverless(Scenario):
    name = "serverless"
    title = "Serverless: connect -> one query -> disconnect"
    description = ("Each request is what a serverless function does: asyncpg connects (SCRAM login), runs one indexed "
                   "SELECT and disconnects; latency is the whole request. Two loads: *closed loop* - N workers, "
                   "each starting its next request when the last is done (throughput at saturation; on a small "
                   "machine the Python client itself saturates, so its latency is mostly queueing in the client); "
                   "*fixed rate* - requests start on a schedule below every target's capacity, latency measured "
                   "from the scheduled start (the latency a function sees when nothing is saturated).")
    interleaved = True

    def params(self, cfg: RunConfig, env: BenchEnv) -> dict[str, Any]:
        return {"workers": cfg.extra.get("serverless_workers", 8 if cfg.quick else 50),
                "rate_per_s": cfg.extra.get("serverless_rate", 50 if cfg.quick else 100),
                "duration_s": max(1.0, cfg.duration), "query": QUERY}

    def units(self, params: dict[str, Any]) -> list[Any]:
        return ["closed", "fixed_rate"]

    def run_unit(self, cfg: RunConfig, env: BenchEnv, target: Target, params: dict[str, Any], unit: Any) -> Result:
        accounts = 100_000 * env.scale
        if unit == "closed":
            cfg.log(f"  {target.name}: {params['workers']} workers for {params['duration_s']:g}s")
            load = _closed_loop(target, params["workers"], params["duration_s"], accounts)
        else:
            cfg.log(f"  {target.name}: {params['rate_per_s']} requests/s for {params['duration_s']:g}s")
            load = _open_loop(target, params["rate_per_s"], params["duration_s"], accounts)
        meter = measured(env, target)
        with BackendSampler(env, target.pid) as sampler:
            before = meter.snapshot()
            latencies, errors, elapsed = asyncio.run(load)
            sampler.settle()
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

    def combine(self, target: Target | None, measured_units: list[tuple[Any, Result]],
                params: dict[str, Any]) -> Result:
        out: Result = {unit: result for unit, result in measured_units}
        out["status"] = overall_status(list(out.values()))
        return out


class ServerlessTrust(Serverless):
    name = "serverless_trust"
    title = "Serverless: connect -> one query -> disconnect (trust)"
    description = ("The same requests, but every hop logs in with trust (as in the -C trust variant). With SCRAM, "
                   "asyncpg's PBKDF2 (4096 iterations, ~1-2 ms of client CPU) is in every request whatever the "
                   "target; without it the request time is what the target adds: a forked backend for direct "
                   "PostgreSQL, a socket and a pooled backend for a pooler.")
    auth = "trust"
