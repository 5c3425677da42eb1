"""latency: one client, `SELECT 1` in a loop on an open connection; what a pooler adds per round trip."""

from __future__ import annotations

import gc
import time
from typing import Any

from benchmarks.pgwire import BlockingConnection, extended_query_messages, percentiles, query_message
from benchmarks.procs import CpuMeter
from benchmarks.scenarios.common import Result, RunConfig, Scenario, cdf_points, check_pooler, measured, per_unit_us
from benchmarks.targets import BenchEnv, Target

REQUESTS = {"simple": query_message("SELECT 1"), "extended": extended_query_messages("SELECT 1")}
_WARMUP = 300


class Latency(Scenario):
    name = "latency"
    title = "Latency overhead: one client, SELECT 1 on an open connection"
    description = ("One blocking client (a minimal wire-protocol client, TCP_NODELAY) sends `SELECT 1` and reads to "
                   "ReadyForQuery, in a loop, on one open connection: simple protocol (Q) and extended "
                   "(unnamed Parse/Bind/Execute/Sync). The pooler's cost is its latency minus direct's.")

    def params(self, cfg: RunConfig, env: BenchEnv) -> dict[str, Any]:
        return {"modes": list(REQUESTS), "seconds_per_mode": 0.5 if cfg.quick else max(2.0, cfg.duration / 2),
                "warmup_requests": _WARMUP}

    def run(self, cfg: RunConfig, env: BenchEnv, target: Target, params: dict[str, Any]) -> Result:
        result: Result = {"status": "ok", "modes": {}}
        conn = BlockingConnection(target.endpoint)
        try:
            for mode in params["modes"]:
                cfg.log(f"  {target.name}: SELECT 1 ({mode}) for {params['seconds_per_mode']:g}s")
                request = REQUESTS[mode]
                for _ in range(params["warmup_requests"]):
                    conn.roundtrip(request)
                samples: list[float] = []
                meter = measured(env, target)
                gc.disable()  # a collection in the loop would be the client's latency, not the pooler's
                try:
                    before = meter.snapshot()
                    deadline = time.perf_counter() + params["seconds_per_mode"]
                    clock = time.perf_counter_ns
                    roundtrip = conn.roundtrip
                    while True:
                        began = clock()
                        roundtrip(request)
                        ended = clock()
                        samples.append((ended - began) / 1000.0)
                        if ended / 1e9 > deadline:
                            break
                    after = meter.snapshot()
                finally:
                    gc.enable()
                cpu = CpuMeter.delta(before, after)
                stats = percentiles(samples, (50, 90, 99, 99.9))
                result["modes"][mode] = {
                    "requests": len(samples),
                    "latency_us": {key: round(value, 2) for key, value in stats.items()},
                    "latency_cdf_us": cdf_points(samples),
                    "cpu": cpu,
                    "pooler_cpu_us_per_request": per_unit_us(cpu.get("pooler_s"), len(samples)),
                }
        except Exception as exc:
            result.update(status="error", error=f"{type(exc).__name__}: {exc}")
        finally:
            conn.close()
        return check_pooler(target, result)
