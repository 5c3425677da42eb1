"""latency: one client, `SELECT 1` in a loop on an open connection; what a pooler adds per round trip."""

from __future__ import annotations

import contextlib
import gc
import os
import statistics
import time
from collections.abc import Iterator
from typing import Any

import psutil

from benchmarks.pgwire import BlockingConnection, extended_query_messages, percentiles, query_message
from benchmarks.procs import CpuMeter
from benchmarks.scenarios.common import (
    Result, RunConfig, Scenario, cdf_points, check_pooler, measured, per_unit_us, summarize_units,
)
from benchmarks.targets import ADMIN_APP, BenchEnv, Target

REQUESTS = {"simple": query_message("SELECT 1"), "extended": extended_query_messages("SELECT 1")}
# free first: once pinned, processes tend to stay where they were put.
PLACEMENTS = ("free", "one_core")
_WARMUP = 300


def _backend_pids(env: BenchEnv) -> list[int]:
    conn = BlockingConnection(env.admin_endpoint, application_name=ADMIN_APP)
    try:
        text = conn.scalar("SELECT string_agg(pid::text, ',') FROM pg_stat_activity WHERE datname = '"
                           + env.database.replace("'", "''") + f"' AND backend_type = 'client backend' "
                           f"AND coalesce(application_name, '') <> '{ADMIN_APP}'")
    finally:
        conn.close()
    return [int(pid) for pid in text.split(",") if pid]


def _set_affinity(pid: int, cpus: list[int]) -> bool:
    try:
        psutil.Process(pid).cpu_affinity(cpus)
        return True
    except (psutil.NoSuchProcess, psutil.AccessDenied, OSError, ValueError):
        return False


@contextlib.contextmanager
def one_core(env: BenchEnv, target: Target) -> Iterator[dict[str, Any]]:
    """Pin this thread, the pooler and the benchmark database's backends to one CPU; undo afterwards.

    On a small VM a wake-up on another CPU costs tens of µs and the scheduler places the 2-3 processes of a
    round trip differently from run to run: pinned, the figure is the work done per round trip.
    """
    all_cpus = sorted(os.sched_getaffinity(0))
    cpu = all_cpus[-1]
    pids = _backend_pids(env) + ([target.pid] if target.pid else [])
    pinned = [pid for pid in pids if _set_affinity(pid, [cpu])]
    os.sched_setaffinity(0, {cpu})
    try:
        yield {"cpu": cpu, "pinned_processes": len(pinned) + 1, "pin_failures": len(pids) - len(pinned)}
    finally:
        os.sched_setaffinity(0, set(all_cpus))
        for pid in pinned:
            _set_affinity(pid, all_cpus)


class Latency(Scenario):
    name = "latency"
    title = "Latency overhead: one client, SELECT 1 on an open connection"
    description = ("One blocking client (a minimal wire-protocol client, TCP_NODELAY) sends `SELECT 1` and reads to "
                   "ReadyForQuery, in a loop, on one open connection: simple protocol (Q) and extended "
                   "(unnamed Parse/Bind/Execute/Sync). A pooler's cost is its latency minus direct's. Measured "
                   "twice: *one core* (client, pooler and backend pinned to one CPU: the work per round trip, "
                   "stable run to run) and *free* (wherever the scheduler puts them: includes cross-CPU wake-ups, "
                   "which on a small VM cost tens of µs each and vary between runs).")
    interleaved = True

    def params(self, cfg: RunConfig, env: BenchEnv) -> dict[str, Any]:
        rounds = 1 if cfg.quick else 4
        return {"modes": list(REQUESTS), "placements": list(PLACEMENTS), "rounds": rounds,
                "seconds_per_mode": 0.5 if cfg.quick else max(0.5, cfg.duration / 4 / rounds),
                "warmup_requests": _WARMUP}

    def units(self, params: dict[str, Any]) -> list[Any]:
        # Several short rounds, interleaved across targets: the reported figures are the median over rounds,
        # so a burst of someone else's load during one round does not decide the result.
        return [(round_, placement, mode) for round_ in range(params["rounds"])
                for placement in params["placements"] for mode in params["modes"]]

    def run_unit(self, cfg: RunConfig, env: BenchEnv, target: Target, params: dict[str, Any], unit: Any) -> Result:
        _round, placement, mode = unit
        cfg.log(f"  {target.name}: SELECT 1 ({mode}, {placement.replace('_', ' ')}) for "
                f"{params['seconds_per_mode']:g}s")
        request = REQUESTS[mode]
        conn = BlockingConnection(target.endpoint)
        try:
            for _ in range(params["warmup_requests"]):
                conn.roundtrip(request)
            pinning = one_core(env, target) if placement == "one_core" else contextlib.nullcontext({})
            with pinning as pinned:
                for _ in range(params["warmup_requests"]):
                    conn.roundtrip(request)
                samples, cpu = self._loop(env, target, conn, request, params["seconds_per_mode"])
        except Exception as exc:
            return check_pooler(target, {"status": "error", "error": f"{type(exc).__name__}: {exc}"})
        finally:
            conn.close()
        stats = percentiles(samples, (50, 90, 99, 99.9))
        result: Result = {
            "status": "ok",
            "requests": len(samples),
            "latency_us": {key: round(value, 2) for key, value in stats.items()},
            "latency_cdf_us": cdf_points(samples),
            "cpu": cpu,
            "pooler_cpu_us_per_request": per_unit_us(cpu.get("pooler_s"), len(samples)),
        }
        if pinned:
            result["pinning"] = pinned
        return check_pooler(target, result)

    @staticmethod
    def _loop(env: BenchEnv, target: Target, conn: BlockingConnection, request: bytes,
              seconds: float) -> tuple[list[float], dict[str, Any]]:
        samples: list[float] = []
        meter = measured(env, target)
        gc.disable()  # a collection in the loop would be the client's latency, not the pooler's
        try:
            before = meter.snapshot()
            clock = time.perf_counter_ns
            deadline = clock() + int(seconds * 1e9)
            roundtrip = conn.roundtrip
            while True:
                began = clock()
                roundtrip(request)
                ended = clock()
                samples.append((ended - began) / 1000.0)
                if ended > deadline:
                    break
            after = meter.snapshot()
        finally:
            gc.enable()
        return samples, CpuMeter.delta(before, after)

    def combine(self, target: Target | None, measured_units: list[tuple[Any, Result]],
                params: dict[str, Any]) -> Result:
        grouped: dict[tuple[str, str], list[Result]] = {}
        for (_round, placement, mode), result in measured_units:
            grouped.setdefault((placement, mode), []).append(result)
        out: Result = {"placements": {}}
        for (placement, mode), results in grouped.items():
            out["placements"].setdefault(placement, {})[mode] = _median_of_rounds(results)
        return summarize_units(out, measured_units)


def _median_of_rounds(results: list[Result]) -> Result:
    """One figure per (placement, mode): each percentile is the median of that percentile over the rounds."""
    good = [result for result in results if result.get("status") == "ok"]
    if not good:
        return results[0]
    if len(good) == 1:
        return good[0]
    keys = good[0]["latency_us"].keys()
    cdf = [[point[0], round(statistics.median(r["latency_cdf_us"][i][1] for r in good), 3)]
           for i, point in enumerate(good[0]["latency_cdf_us"])]
    cpu: dict[str, Any] = {}
    for field in good[0]["cpu"]:
        values = [r["cpu"].get(field) for r in good]
        if field == "other_share":
            shares = [v for v in values if v is not None]
            cpu[field] = round(max(shares), 4) if shares else None
        else:
            cpu[field] = None if any(v is None for v in values) else round(sum(values), 4)
    requests = sum(r["requests"] for r in good)
    merged: Result = {
        "status": "ok" if len(good) == len(results) else "partial",
        "requests": requests,
        "rounds": len(good),
        "latency_us": {key: round(statistics.median(r["latency_us"][key] for r in good), 2) for key in keys},
        "round_p50s_us": [r["latency_us"]["p50"] for r in good],
        "latency_cdf_us": cdf,
        "cpu": cpu,
        "pooler_cpu_us_per_request": per_unit_us(cpu.get("pooler_s"), requests),
    }
    if good[0].get("pinning"):
        merged["pinning"] = good[0]["pinning"]
    return merged
