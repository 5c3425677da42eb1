"""idle: thousands of logged-in clients that send nothing; what each costs the pooler in memory."""

from __future__ import annotations

import asyncio
import random
import resource
import time
from collections import Counter
from typing import Any

from benchmarks.pgwire import AsyncConnection, BlockingConnection, Endpoint, query_message
from benchmarks.procs import CpuMeter, memory_detail
from benchmarks.scenarios.common import Result, RunConfig, Scenario, check_pooler, classify, measured, per_unit_us
from benchmarks.targets import ADMIN_APP, BenchEnv, Target

_CONCURRENCY = 200          # logins in flight at once
_CONNECT_TIMEOUT_S = 30.0   # per login
_ALIVE_CHECKS = 20          # idle clients that run SELECT 1 after the measurement
# Each client needs one fd here and one in the pooler; leave room for everything else.
_FD_RESERVE = 200
# Direct: PostgreSQL's slots minus superuser_reserved_connections and some margin for the harness.
_DIRECT_MARGIN = 10


async def _fleet(endpoint: Endpoint, clients: int, deadline_s: float) -> tuple[list[AsyncConnection], Counter[str], float]:
    conns: list[AsyncConnection] = []
    errors: Counter[str] = Counter()
    gate = asyncio.Semaphore(_CONCURRENCY)

    async def one() -> None:
        async with gate:
            try:
                conns.append(await asyncio.wait_for(AsyncConnection.connect(endpoint), _CONNECT_TIMEOUT_S))
            except Exception as exc:
                errors[classify(exc)] += 1

    start = time.perf_counter()
    tasks = [asyncio.ensure_future(one()) for _ in range(clients)]
    done, pending = await asyncio.wait(tasks, timeout=deadline_s)
    for task in pending:
        task.cancel()
    if pending:
        errors["not_started_before_deadline"] += len(pending)
        await asyncio.gather(*pending, return_exceptions=True)
    return conns, errors, time.perf_counter() - start


async def _alive(conns: list[AsyncConnection]) -> int:
    alive = 0
    for conn in random.sample(conns, min(_ALIVE_CHECKS, len(conns))):
        try:
            await asyncio.wait_for(conn.query("SELECT 1"), 10)
            alive += 1
        except Exception:
            pass
    return alive


async def _close_all(conns: list[AsyncConnection]) -> None:
    for index, conn in enumerate(conns):
        await conn.close(wait=False)
        if index % 500 == 499:
            await asyncio.sleep(0)  # let the loop flush the Terminates


def _direct_backend_memory(env: BenchEnv) -> dict[str, Any]:
    """Sum of USS/PSS of the backends serving our idle clients (PostgreSQL is one process per client)."""
    conn = BlockingConnection(env.admin_endpoint, application_name=ADMIN_APP)
    try:
        pids = conn.scalar("SELECT string_agg(pid::text, ',') FROM pg_stat_activity WHERE datname = '"
                           + env.database.replace("'", "''") + "' AND application_name = 'pgmux-bench'")
    finally:
        conn.close()
    totals = {"uss": 0, "pss": 0, "rss": 0}
    counted = 0
    for pid in filter(None, pids.split(",")):
        detail = memory_detail(int(pid))
        if detail:
            counted += 1
            for key in totals:
                totals[key] += detail[key]
    return {"backends_measured": counted, **{f"sum_{key}_mb": round(value / 2**20, 1) for key, value in totals.items()}}


class IdleFleet(Scenario):
    name = "idle"
    title = "Idle fleet"
    description = ("N clients log in (SCRAM) and stay connected without sending anything. Pooler memory is its RSS "
                   "(psutil) with the fleet connected minus its RSS after one warm-up client; per client is that "
                   "difference / N. Direct PostgreSQL holds a process per client, so direct is limited by "
                   "max_connections and its figure is the USS (private memory) of those backends.")

    def params(self, cfg: RunConfig, env: BenchEnv) -> dict[str, Any]:
        soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        wanted = cfg.extra.get("idle_clients", 300 if cfg.quick else 10_000)
        possible = max(0, soft - _FD_RESERVE)
        return {
            "clients_wanted": wanted,
            "clients": min(wanted, possible),
            "fd_limit_harness": soft,
            "limited_by": f"RLIMIT_NOFILE={soft} in the harness" if possible < wanted else None,
            "direct_clients": max(0, min(wanted, env.max_connections - _DIRECT_MARGIN)),
            "connect_deadline_s": 30.0 if cfg.quick else 240.0,
            "login_concurrency": _CONCURRENCY,
        }

    def run(self, cfg: RunConfig, env: BenchEnv, target: Target, params: dict[str, Any]) -> Result:
        clients = params["direct_clients"] if target.name == "direct" else params["clients"]
        cfg.log(f"  {target.name}: {clients} idle clients")
        # Warm up: one client logs in and runs a query, so the pooler has opened its first backend.
        warm = BlockingConnection(target.endpoint)
        warm.roundtrip(query_message("SELECT 1"))
        warm.close()
        time.sleep(0.5)
        base = memory_detail(target.pid) if target.pid else None
        meter = measured(env, target)
        before = meter.snapshot()

        async def scenario() -> tuple[Result, dict[str, Any] | None]:
            conns, errors, connect_s = await _fleet(target.endpoint, clients, params["connect_deadline_s"])
            after_connect = meter.snapshot()
            try:
                await asyncio.sleep(1.0)
                full = memory_detail(target.pid) if target.pid else None
                direct = _direct_backend_memory(env) if target.pid is None and env.postgres_pid else None
                alive = await _alive(conns)
            finally:
                await _close_all(conns)
            out: Result = {
                "clients": clients,
                "connected": len(conns),
                "errors": dict(errors),
                "connect_s": round(connect_s, 2),
                "logins_per_s": round(len(conns) / connect_s, 1) if connect_s > 0 else None,
                "alive_checked": f"{alive}/{min(_ALIVE_CHECKS, len(conns))}",
                "login_cpu": CpuMeter.delta(before, after_connect),
            }
            if direct is not None:
                out["direct_backends"] = direct
                if len(conns):
                    out["memory_per_client_kb"] = round(direct["sum_uss_mb"] * 1024 / len(conns), 1)
            return out, full

        result, full = asyncio.run(scenario())
        login_cpu = result["login_cpu"]
        result["pooler_cpu_us_per_login"] = per_unit_us(login_cpu.get("pooler_s"), result["connected"])
        if base and full:
            grown = full["rss"] - base["rss"]
            result.update(
                rss_base_mb=round(base["rss"] / 2**20, 1),
                rss_mb=round(full["rss"] / 2**20, 1),
                uss_mb=round(full["uss"] / 2**20, 1),
                memory_per_client_kb=round(grown / 1024 / result["connected"], 2) if result["connected"] else None,
            )
        if target.name == "direct" and params["direct_clients"] < params["clients_wanted"]:
            result["note"] = (f"direct limited to {params['direct_clients']} clients by max_connections="
                              f"{env.max_connections}; PostgreSQL forks a backend per client")
        result["status"] = "ok" if result["connected"] == clients else "partial"
        return check_pooler(target, result)
