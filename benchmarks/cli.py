"""`python -m benchmarks`: start PostgreSQL, run every scenario against direct / pgmux / PgBouncer, write the report."""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import platform
import signal
import sys
import time
from pathlib import Path
from typing import Any

import psutil

from benchmarks.procs import raise_nofile_limit
from benchmarks.report import latest_name, update_readme, write_outputs
from benchmarks.scenarios import SCENARIOS, RunConfig, Scenario
from benchmarks.scenarios.common import BackendSampler, wait_until
from benchmarks.targets import ROOT, TARGETS, BenchEnv, PoolerSettings, Target, git_state, redact

DEFAULT_OUT = ROOT / "benchmarks" / "results"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Benchmark direct PostgreSQL vs pgmux vs PgBouncer in one run and write a JSON + Markdown + PNG "
                    "report. Starts an embedded PostgreSQL (or uses --direct-url), pgmux, and PgBouncer when "
                    "installed; stops everything it started.")
    parser.add_argument("--quick", action="store_true",
                        help="small, ~1 s runs of every scenario (proves the harness works; < 60 s)")
    parser.add_argument("--direct-url", default=None,
                        help="use this PostgreSQL (postgresql://user:password@host:port/db) instead of an embedded "
                             "one; pgbench tables are (re)created in that database unless --skip-init")
    parser.add_argument("--skip-init", action="store_true", help="do not run pgbench -i (tables already there)")
    parser.add_argument("--pool-size", type=int, default=20, help="default_pool_size of both poolers (default 20)")
    parser.add_argument("--pool-mode", choices=("transaction", "session"), default="transaction")
    parser.add_argument("--duration", type=float, default=None,
                        help="seconds per timed run (default 10; 1 with --quick)")
    parser.add_argument("--query-wait-timeout", type=float, default=None,
                        help="query_wait_timeout of both poolers in seconds (default 30; 10 with --quick)")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS),
                        help=f"comma-separated subset of: {', '.join(SCENARIOS)} (default: all)")
    parser.add_argument("--targets", default=",".join(TARGETS),
                        help="comma-separated subset of: direct, pgmux, pgbouncer (default: all)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory (default benchmarks/results)")
    parser.add_argument("--pg-max-connections", type=int, default=100,
                        help="max_connections of the embedded PostgreSQL (default 100, PostgreSQL's default)")
    parser.add_argument("--scale", type=int, default=1, help="pgbench -i scale (default 1)")
    parser.add_argument("--time-budget", type=float, default=None,
                        help="skip what is left once this many seconds have passed (default 2400; 150 with --quick)")
    parser.add_argument("--pgbouncer", default=None, metavar="PATH",
                        help="the pgbouncer binary (default: from PATH or /usr/sbin); 'none' leaves PgBouncer out")
    parser.add_argument("--pgmux-arg", action="append", default=[], metavar="ARG",
                        help="extra argument for `python -m proxy serve` (repeatable), e.g. --pgmux-arg=--x=1")
    parser.add_argument("--workers", type=int, default=1,
                        help="pgmux's worker processes (default 1; connect_workers compares 1 and 2 whatever this is)")
    parser.add_argument("--steady-clients", default=None, help="override steady client counts, e.g. 10,50")
    parser.add_argument("--steady-repeats", type=int, default=None,
                        help="times each pgbench configuration runs per target; the median-tps run is reported "
                             "(default 3; 1 with --quick)")
    parser.add_argument("--storm-clients", type=int, default=None, help="override the storm's client count")
    parser.add_argument("--idle-clients", type=int, default=None, help="override the idle fleet's client count")
    parser.add_argument("--serverless-workers", type=int, default=None, help="override serverless workers")
    return parser


def _split(text: str, allowed: Any, what: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in allowed]
    if unknown:
        raise SystemExit(f"unknown {what}: {', '.join(unknown)} (choose from {', '.join(allowed)})")
    return [name for name in allowed if name in names]  # canonical order


def machine_facts() -> dict[str, Any]:
    model = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        model = platform.processor() or "?"
    pretty = platform.platform()
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                pretty = line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    return {
        "cpu_model": model,
        "cpus": psutil.cpu_count(logical=True),
        "physical_cores": psutil.cpu_count(logical=False),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "os": pretty,
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


def _install_uvloop() -> str:
    try:
        import asyncio

        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
        return "uvloop"
    except ImportError:
        return "asyncio"


def _settle(env: BenchEnv, log: Any) -> None:
    """Wait (up to 10 s) until PostgreSQL shows no client backends of ours: a stopped pooler's are going away."""
    try:
        sampler = BackendSampler(env, None)
    except Exception as exc:  # a failure here must not lose the run's results
        log(f"  (could not check leftover backends: {exc})")
        return
    sql = sampler._sql
    conn = sampler._conn
    try:
        if not wait_until(lambda: int(conn.scalar(sql)) == 0, 10.0, 0.1):
            log("  (backends from the previous target are still open after 10 s)")
    finally:
        conn.close()


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    quick = args.quick
    duration = args.duration if args.duration is not None else (1.0 if quick else 10.0)
    wait_timeout = args.query_wait_timeout if args.query_wait_timeout is not None else (10.0 if quick else 30.0)
    budget = args.time_budget if args.time_budget is not None else (150.0 if quick else 2400.0)
    extra: dict[str, Any] = {}
    if args.steady_clients:
        extra["steady_clients"] = [int(x) for x in args.steady_clients.split(",") if x.strip()]
    if args.steady_repeats is not None:
        extra["steady_repeats"] = max(1, args.steady_repeats)
    for key in ("storm_clients", "idle_clients", "serverless_workers"):
        if getattr(args, key) is not None:
            extra[key] = getattr(args, key)

    def log(message: str) -> None:
        print(f"[{time.monotonic() - t0:6.1f}s] {message}", file=sys.stderr, flush=True)

    cfg = RunConfig(quick=quick, duration=duration, pool_size=args.pool_size, pool_mode=args.pool_mode,
                    query_wait_timeout=wait_timeout, targets=_split(args.targets, TARGETS, "targets"),
                    scenarios=_split(args.scenarios, list(SCENARIOS), "scenarios"), out=args.out, log=log,
                    extra=extra)

    # SIGTERM/SIGHUP unwind like Ctrl-C, so every `finally` stops what it started.
    def interrupt(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGHUP, interrupt)

    t0 = time.monotonic()
    started = dt.datetime.now(dt.timezone.utc)
    stamp = started.strftime("%Y%m%dT%H%M%SZ") + ("-quick" if quick else "")
    nofile = raise_nofile_limit()
    loop_impl = _install_uvloop()
    results: dict[str, Any] = {
        "schema_version": 1,
        "kind": "quick" if quick else "full",
        "started_at": started.strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine_facts(),
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
        "git": git_state(),
        "config": {"quick": quick, "duration": duration, "pool_size": args.pool_size, "pool_mode": args.pool_mode,
                   "query_wait_timeout": wait_timeout, "scenarios": cfg.scenarios, "targets": cfg.targets,
                   "scale": args.scale, "time_budget_s": budget, "pgmux_args": args.pgmux_arg,
                   "workers": args.workers,
                   "partial": (cfg.scenarios != list(SCENARIOS) or cfg.targets != list(TARGETS) or bool(extra)
                               or args.direct_url is not None),
                   "harness_nofile": list(nofile), "harness_loop": loop_impl, "overrides": extra},
        "targets": {},
        "scenarios": {},
    }
    settings = PoolerSettings(pool_size=args.pool_size, pool_mode=args.pool_mode, query_wait_timeout=wait_timeout,
                              pgmux_args=list(args.pgmux_arg), workers=args.workers)
    interrupted = False
    started_processes: list[dict[str, Any]] = []
    try:
        with BenchEnv(direct_url=args.direct_url, pg_max_connections=args.pg_max_connections, scale=args.scale,
                      settings=settings, skip_init=args.skip_init, log=log, pgbouncer=args.pgbouncer) as env:
            started_processes = env.started
            results["versions"] = env.versions()
            results["postgres_max_connections"] = env.max_connections
            results["pgbouncer_auth"] = "SCRAM secret from pg_authid" if env.scram_secret else "plaintext password"
            for name in cfg.targets:
                available, reason = env.available(name)
                results["targets"][name] = {"available": available, "reason": reason}
            results["targets"]["direct"] = {**results["targets"].get("direct", {"available": True, "reason": None}),
                                            "url": redact(env.upstream_url())}
            results["pgmux_command"] = " ".join(env.pgmux_argv(0, workers=args.workers)[1:]).replace(":0 ", ":PORT ")
            for scenario_name in cfg.scenarios:
                scenario = SCENARIOS[scenario_name]
                params = scenario.params(cfg, env)
                entry: dict[str, Any] = {"title": scenario.title, "description": scenario.description,
                                         "params": params, "results": {}}
                results["scenarios"][scenario_name] = entry
                log(f"scenario {scenario_name}: {scenario.title}")
                runner = _run_interleaved if scenario.interleaved else _run_one_by_one
                runner(scenario, cfg, env, params, entry["results"], lambda: time.monotonic() - t0 > budget, budget)
                entry["results"] = {name: entry["results"][name] for name in cfg.targets if name in entry["results"]}
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted: everything started was stopped; writing what was measured")
    results["elapsed_s"] = round(time.monotonic() - t0, 1)
    results["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    results["interrupted"] = interrupted
    results["started_processes"] = started_processes  # all stopped by pid before this point
    paths = write_outputs(results, cfg.out, stamp)
    log(f"wrote {', '.join(paths.values())}")
    if latest_name(results) == "latest" and cfg.out.resolve() == DEFAULT_OUT.resolve():
        if update_readme(results, ROOT / "benchmarks" / "README.md"):
            log("refreshed the latest-run tables in benchmarks/README.md")
    for line in _summary(results):
        print(line)
    return 130 if interrupted else 0


def _availability(scenario: Scenario, env: BenchEnv, target_name: str) -> tuple[bool, str | None]:
    """Whether ``target_name`` can take part in ``scenario`` here, and if not why (the report says it)."""
    available, reason = env.available(target_name, scenario.auth, scenario.client_tls, scenario.http_listener)
    if available and scenario.pgmux_only and target_name != "pgmux":
        return False, scenario.pgmux_only
    if available:
        reason = scenario.missing(env)
    return reason is None, reason


def _run_one_by_one(scenario: Scenario, cfg: RunConfig, env: BenchEnv, params: dict[str, Any],
                    out: dict[str, Any], over_budget: Any, budget: float) -> None:
    """Each target started alone, measured, stopped (by pid), and its backends gone before the next."""
    for target_name in cfg.targets:
        available, reason = _availability(scenario, env, target_name)
        if not available:
            out[target_name] = {"status": "unavailable", "reason": reason}
            continue
        if over_budget():
            out[target_name] = {"status": "skipped", "reason": f"time budget {budget:g}s"}
            continue
        began = time.monotonic()
        try:
            with env.target(target_name, scenario.auth, scenario.client_tls, scenario.http_listener) as target:
                out[target_name] = scenario.run(cfg, env, target, params)
        except KeyboardInterrupt:
            raise
        except Exception as exc:
            cfg.log(f"  {target_name}: {type(exc).__name__}: {exc}")
            out[target_name] = {"status": "error", "error": f"{type(exc).__name__}: {exc}"}
        out[target_name]["elapsed_s"] = round(time.monotonic() - began, 1)
        _settle(env, cfg.log)


def _run_interleaved(scenario: Scenario, cfg: RunConfig, env: BenchEnv, params: dict[str, Any],
                     out: dict[str, Any], over_budget: Any, budget: float) -> None:
    """All targets up at once; each unit measured on every target, the order rotating from unit to unit."""
    measured: dict[str, list[tuple[Any, dict[str, Any]]]] = {}
    running: dict[str, Target] = {}
    began = time.monotonic()
    with contextlib.ExitStack() as stack:
        for target_name in cfg.targets:
            available, reason = _availability(scenario, env, target_name)
            if not available:
                out[target_name] = {"status": "unavailable", "reason": reason}
                continue
            try:
                running[target_name] = stack.enter_context(env.target(target_name, scenario.auth,
                                                                      scenario.client_tls, scenario.http_listener))
                measured[target_name] = []
            except Exception as exc:
                cfg.log(f"  {target_name}: {type(exc).__name__}: {exc}")
                out[target_name] = {"status": "error", "error": f"{type(exc).__name__}: {exc}"}
        names = list(running)
        for index, unit in enumerate(scenario.units(params)):
            shift = index % len(names) if names else 0
            for target_name in names[shift:] + names[:shift]:
                if over_budget():
                    result: dict[str, Any] = {"status": "skipped", "reason": f"time budget {budget:g}s"}
                else:
                    try:
                        result = scenario.run_unit(cfg, env, running[target_name], params, unit)
                    except KeyboardInterrupt:
                        raise
                    except Exception as exc:
                        cfg.log(f"  {target_name}: {type(exc).__name__}: {exc}")
                        result = {"status": "error", "error": f"{type(exc).__name__}: {exc}"}
                measured[target_name].append((unit, result))
        for target_name, units in measured.items():
            out[target_name] = scenario.combine(running[target_name], units, params)
            out[target_name]["elapsed_s"] = round(time.monotonic() - began, 1)
    _settle(env, cfg.log)


def _summary(results: dict[str, Any]) -> list[str]:
    lines = ["", "metric | direct | pgmux | PgBouncer | pgmux/PgBouncer | pgmux/direct"]
    for row in results.get("ratios", []):
        def show(value: Any) -> str:
            return "-" if value is None else (f"{value:.4g}" if isinstance(value, float) else str(value))

        lines.append(f"{row['label']} | {show(row.get('direct'))} | {show(row.get('pgmux'))} | "
                     f"{show(row.get('pgbouncer'))} | {show(row.get('pgmux/pgbouncer'))} | "
                     f"{show(row.get('pgmux/direct'))}")
    for check in results.get("targets_check", []):
        met = {True: "MET", False: "NOT MET", None: "n/a"}[check["met"]]
        lines.append(f"[{met}] {check['goal']}: {check['measured']}")
    return lines
