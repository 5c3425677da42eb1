"""steady: `pgbench -S` at several client counts and query modes; connect: `pgbench -S -C`."""

from __future__ import annotations

import re
from typing import Any

from benchmarks.procs import CpuMeter, run_bounded
from benchmarks.scenarios.common import (
    BackendSampler, Result, RunConfig, Scenario, check_pooler, measured, per_unit_us, sqlstate_from_message,
)
from benchmarks.targets import TLS_CERTIFICATE, BenchEnv, Target, clean_env, version_line

# "(without initial connection time)" normally; "(including reconnection times)" with -C.
_TPS = re.compile(r"^tps = ([\d.]+) \(([^)]*)\)", re.M)
_LATENCY = re.compile(r"^latency average = ([\d.]+) ms", re.M)
_INITIAL = re.compile(r"^initial connection time = ([\d.]+) ms", re.M)
_AVG_CONNECT = re.compile(r"^average connection time = ([\d.]+) ms", re.M)
_PROCESSED = re.compile(r"^number of transactions actually processed: (\d+)", re.M)
_FAILED = re.compile(r"^number of failed transactions: (\d+)", re.M)
_ERROR_LINE = re.compile(r"^.*(?:error|fatal|FATAL|ERROR).*$", re.M)
# Slack for pgbench beyond -T: opening up to 200 connections (each a SCRAM login) and tearing down.
_SLACK_S = 60


def run_pgbench(env: BenchEnv, target: Target, args: list[str], duration: float) -> Result:
    """One bounded pgbench run against ``target``; its numbers, or its error as the result."""
    seconds = max(1, int(round(duration)))
    argv = [env.pgbench_for(target), "-n", *args, "-T", str(seconds), "-h", target.host, "-p", str(target.port),
            "-U", target.user, target.database]
    meter = measured(env, target)
    with BackendSampler(env, target.pid) as sampler:
        before = meter.snapshot()
        code, out, err, timed_out = run_bounded(argv, env=clean_env(target.password, target.sslmode),
                                               timeout=seconds + _SLACK_S)
        sampler.settle()
        after = meter.snapshot()
    text = out + "\n" + err
    result: Result = {"exit_code": code, "cpu": CpuMeter.delta(before, after), **sampler.result()}
    if (match := _TPS.search(text)) is not None:
        result["tps"] = float(match.group(1))
        result["tps_note"] = match.group(2)
    if (match := _LATENCY.search(text)) is not None:
        result["latency_avg_ms"] = float(match.group(1))
    if (match := _INITIAL.search(text)) is not None:
        result["initial_connection_ms"] = float(match.group(1))
    if (match := _AVG_CONNECT.search(text)) is not None:
        result["avg_connection_ms"] = float(match.group(1))
    if (match := _PROCESSED.search(text)) is not None:
        result["transactions"] = int(match.group(1))
    if (match := _FAILED.search(text)) is not None:
        result["failed_transactions"] = int(match.group(1))
    errors = [line.strip() for line in _ERROR_LINE.findall(err) if "failed transactions" not in line]
    if timed_out:
        result.update(status="timeout", error=f"pgbench did not finish within {seconds + _SLACK_S}s (killed)")
    elif code != 0 or errors or "tps" not in result:
        message = errors[0] if errors else (err.strip().splitlines() or ["pgbench failed without a message"])[-1]
        result.update(status="error", error=message[:400], error_lines=len(errors),
                      sqlstate=sqlstate_from_message(message))
    else:
        result["status"] = "ok"
    result["pooler_cpu_us_per_txn"] = per_unit_us(result["cpu"].get("pooler_s"), result.get("transactions"))
    result["pooler_kernel_us_per_txn"] = per_unit_us(result["cpu"].get("pooler_kernel_s"), result.get("transactions"))
    return check_pooler(target, result)


def _status_of(runs: list[Result]) -> str:
    if runs and all(run.get("status") == "ok" for run in runs):
        return "ok"
    return "error" if all(run.get("status") != "ok" for run in runs) else "partial"


class Steady(Scenario):
    name = "steady"
    title = "Steady load: pgbench -S"
    description = ("`pgbench -S` (select-only) for a fixed time on open connections, with -M simple, extended and "
                   "prepared at several client counts. tps is pgbench's 'without initial connection time' figure. "
                   "Configurations are interleaved across targets (rotating order), and the whole set is repeated: "
                   "each configuration reports its median-tps run (all repeats' tps and CPU are kept in the JSON), "
                   "because on a shared 2-core machine one run can swing by a third.")
    interleaved = True

    def params(self, cfg: RunConfig, env: BenchEnv) -> dict[str, Any]:
        return {
            "modes": cfg.extra.get("steady_modes", ["simple", "extended", "prepared"]),
            "clients": cfg.extra.get("steady_clients", [10] if cfg.quick else [10, 50, 200]),
            "duration_s": max(1, int(round(cfg.duration))),
            "threads": 2,
            "repeats": cfg.extra.get("steady_repeats", 1 if cfg.quick else 3),
        }

    def units(self, params: dict[str, Any]) -> list[Any]:
        # Whole rounds, so that the repeats of one configuration are minutes apart, not back to back.
        return [(mode, clients, round_) for round_ in range(params["repeats"])
                for mode in params["modes"] for clients in params["clients"]]

    def run_unit(self, cfg: RunConfig, env: BenchEnv, target: Target, params: dict[str, Any], unit: Any) -> Result:
        mode, clients, round_ = unit
        cfg.log(f"  {target.name}: pgbench -S -M {mode} -c {clients}"
                + (f" (round {round_ + 1}/{params['repeats']})" if params["repeats"] > 1 else ""))
        run = run_pgbench(env, target, ["-S", "-M", mode, "-c", str(clients),
                                        "-j", str(min(params["threads"], clients))], params["duration_s"])
        return {"mode": mode, "clients": clients, **run}

    def combine(self, target: Target | None, measured: list[tuple[Any, Result]], params: dict[str, Any]) -> Result:
        by_config: dict[tuple[str, int], list[Result]] = {}
        for _unit, run in measured:
            by_config.setdefault((run["mode"], run["clients"]), []).append(run)
        runs = [_median_run(repeats) for repeats in by_config.values()]
        return {"status": _status_of(runs), "runs": runs}


def _median_run(repeats: list[Result]) -> Result:
    """The run with the median tps among the successful repeats (the first failure if none succeeded),
    carrying every repeat's tps and pooler CPU per transaction."""
    ok = sorted((run for run in repeats if run.get("status") == "ok"), key=lambda run: run["tps"])
    chosen = dict(ok[(len(ok) - 1) // 2] if ok else repeats[0])
    if len(repeats) > 1:
        chosen["repeat_tps"] = [run.get("tps") for run in repeats]
        chosen["repeat_pooler_cpu_us_per_txn"] = [run.get("pooler_cpu_us_per_txn") for run in repeats]
    return chosen


class ConnectPerTransaction(Scenario):
    name = "connect"
    title = "Connection per transaction: pgbench -S -C (SCRAM)"
    description = ("`pgbench -S -C`: every transaction opens a new connection (startup + SCRAM-SHA-256 login), runs "
                   "one SELECT and disconnects. tps includes the connection time. Note: libpq computes PBKDF2 "
                   "(4096 iterations) on every SCRAM login, so the pgbench process itself can be the bottleneck; "
                   "see client_programs_s in the CPU figures and the trust-auth variant.")
    interleaved = True

    def params(self, cfg: RunConfig, env: BenchEnv) -> dict[str, Any]:
        return {"mode": "simple", "clients": 4 if cfg.quick else 10, "duration_s": max(1, int(round(cfg.duration))),
                "auth": self.auth}

    def units(self, params: dict[str, Any]) -> list[Any]:
        return ["-C"]

    def run_unit(self, cfg: RunConfig, env: BenchEnv, target: Target, params: dict[str, Any], unit: Any) -> Result:
        clients = params["clients"]
        cfg.log(f"  {target.name}: pgbench -S -C -c {clients} ({self.auth} login"
                + (", sslmode=require)" if self.client_tls else ")"))
        return run_pgbench(env, target, ["-S", "-C", "-M", params["mode"], "-c", str(clients),
                                         "-j", str(min(2, clients))], params["duration_s"])

    def combine(self, target: Target | None, measured: list[tuple[Any, Result]], params: dict[str, Any]) -> Result:
        return measured[0][1] if measured else {"status": "skipped"}


class ConnectPerTransactionTrust(ConnectPerTransaction):
    name = "connect_trust"
    title = "Connection per transaction: pgbench -S -C (trust)"
    description = ("The same `pgbench -S -C`, but every hop logs in with trust (no password): a role with an hba "
                   "`trust` line for direct, `auth_type = trust` in both poolers. Without libpq's PBKDF2 on every "
                   "connection this shows what accepting a connection costs: a forked backend for PostgreSQL, a "
                   "socket and a pool lookup for a pooler.")
    auth = "trust"


class ConnectPerTransactionTls(ConnectPerTransactionTrust):
    name = "connect_tls"
    title = "Connection per transaction over TLS: pgbench -S -C, sslmode=require (trust)"
    description = ("`pgbench -S -C` with `sslmode=require`: every transaction opens a connection, does a full TLS "
                   "handshake with the pooler (libpq makes a new SSL context per connection, so nothing is "
                   "resumed), logs in, runs one SELECT and disconnects. Both poolers terminate client TLS with the "
                   "same certificate and key (their `client_tls_*` settings) and talk plaintext to PostgreSQL. "
                   "Logins are trust, as in `connect_trust`, so the handshake is the main cost per connection, not "
                   "libpq's PBKDF2; `connect_tls` minus `connect_trust` pooler CPU is what a handshake costs each "
                   "pooler. pgbench's own side of the handshake makes this client-bound on 2 cores: compare the "
                   "pooler CPU per transaction. Direct is not measured: the embedded PostgreSQL has no OpenSSL. "
                   "pgbench is one linked with an OpenSSL libpq (the distribution's), since the wheel's has none.")
    client_tls = True

    def params(self, cfg: RunConfig, env: BenchEnv) -> dict[str, Any]:
        pgbench = env.tls_pgbench()
        return {**super().params(cfg, env), "sslmode": "require", "certificate": TLS_CERTIFICATE,
                "pgbench": version_line([pgbench, "--version"]) if pgbench else None}


class ConnectPerTransactionWorkers(ConnectPerTransactionTrust):
    name = "connect_workers"
    title = "Connection per transaction with 1 and 2 pgmux workers: pgbench -S -C (trust)"
    description = ("`connect_trust` against pgmux started with `workers = 1`, then with `workers = 2` (the pool size "
                   "shared by both: PostgreSQL sees at most pool_size backends either way). Logins are what one "
                   "process's core limits, so this is the scenario where a second worker can help. **pgmux only.** "
                   "On a 2-core machine pgbench and PostgreSQL's forked backends share the same two cores, so the "
                   "second worker mostly competes with them: the row shows whether it costs or gains anything here, "
                   "not how pgmux scales on a machine with cores to spare.")
    interleaved = False
    pgmux_only = "compares pgmux's worker counts: pgmux only"
    WORKERS = (1, 2)

    def run(self, cfg: RunConfig, env: BenchEnv, target: Target, params: dict[str, Any]) -> Result:
        if target.process is not None:
            target.process.stop()  # each worker count gets a pgmux of its own
        runs: dict[str, Result] = {}
        for workers in self.WORKERS:
            with env.target("pgmux", self.auth, workers=workers) as started:
                cfg.log(f"  pgmux, {workers} worker(s):")
                runs[str(workers)] = self.run_unit(cfg, env, started, params, "-C")
        return {"status": _status_of(list(runs.values())), "workers": runs}
