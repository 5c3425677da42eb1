"""Turn one run's results into ratios, an issue-targets check, a Markdown report and PNG plots."""

from __future__ import annotations

import math
import shutil
import statistics
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

POOLERS = ("pgmux", "pgbouncer")
COLORS = {"direct": "#7f7f7f", "pgmux": "#1f77b4", "pgbouncer": "#ff7f0e"}
LABELS = {"direct": "direct", "pgmux": "pgmux", "pgbouncer": "PgBouncer"}

Results = dict[str, Any]


# --------------------------------------------------------------------------- lookups


def _scenario(results: Results, name: str) -> dict[str, Any]:
    return results.get("scenarios", {}).get(name, {}).get("results", {})


def _steady_run(results: Results, target: str, mode: str, clients: int) -> dict[str, Any] | None:
    for run in _scenario(results, "steady").get(target, {}).get("runs", []):
        if run["mode"] == mode and run["clients"] == clients:
            return run
    return None


def _dig(data: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(data, dict):
            return None
        data = data.get(key)
    return data


def _failure(result: dict[str, Any] | None) -> str | None:
    """Why a target has no number: 'unavailable', 'error (53300)'... or None when it has one."""
    if result is None:
        return "not run"
    status = result.get("status")
    if status == "unavailable":
        reason = str(result.get("reason") or "")
        if reason.startswith("no pgbouncer binary"):
            return "not installed"
        if reason.startswith("no TLS"):
            return "no TLS"
        return "disabled" if reason.startswith("disabled") else "n/a"
    if status == "skipped":
        return "skipped"
    if status in ("error", "timeout"):
        sqlstate = result.get("sqlstate")
        return f"{status} ({sqlstate})" if sqlstate else status
    return None


# --------------------------------------------------------------------------- ratio rows


class Metric:
    def __init__(self, key: str, label: str, better: str, unit: str,
                 value: Callable[[Results, str], tuple[float | None, str | None]], poolers_only: bool = False) -> None:
        self.key, self.label, self.better, self.unit = key, label, better, unit
        self.value = value
        self.poolers_only = poolers_only


def _steady_metric(mode: str, clients: int) -> Metric:
    def value(results: Results, target: str) -> tuple[float | None, str | None]:
        run = _steady_run(results, target, mode, clients)
        if run is None:
            unavailable = _failure(_scenario(results, "steady").get(target))
            return None, unavailable or "not run"
        failure = _failure(run)
        return (None, failure) if failure else (run.get("tps"), None)

    return Metric(f"steady.{mode}.c{clients}.tps", f"pgbench -S -M {mode} -c {clients} (tps)", "higher", "tps", value)


def _plain(scenario: str, *path: str, scale: float = 1.0) -> Callable[[Results, str], tuple[float | None, str | None]]:
    def value(results: Results, target: str) -> tuple[float | None, str | None]:
        result = _scenario(results, scenario).get(target)
        failure = _failure(result)
        if failure:
            return None, failure
        number = _dig(result, *path)
        if not isinstance(number, (int, float)):
            return None, None
        return (number * scale if scale != 1.0 else number), None

    return value


def _steady_cpu(mode: str, clients: int, key: str = "pooler_cpu_us_per_txn",
                ) -> Callable[[Results, str], tuple[float | None, str | None]]:
    def value(results: Results, target: str) -> tuple[float | None, str | None]:
        run = _steady_run(results, target, mode, clients)
        if run is None or _failure(run):
            return None, _failure(run) if run else "not run"
        return run.get(key), None

    return value


def metrics(results: Results) -> list[Metric]:
    rows: list[Metric] = []
    steady_params = results.get("scenarios", {}).get("steady", {}).get("params", {})
    for mode in steady_params.get("modes", []):
        for clients in steady_params.get("clients", []):
            rows.append(_steady_metric(mode, clients))
    scenarios = results.get("scenarios", {})
    if "connect" in scenarios:
        rows.append(Metric("connect.tps", "pgbench -S -C, SCRAM login (tps)", "higher", "tps",
                           _plain("connect", "tps")))
    if "connect_trust" in scenarios:
        rows.append(Metric("connect_trust.tps", "pgbench -S -C, trust login (tps)", "higher", "tps",
                           _plain("connect_trust", "tps")))
    if "connect_workers" in scenarios:
        for workers in ("1", "2"):
            rows.append(Metric(f"connect_workers.tps.{workers}", f"pgbench -S -C, trust, pgmux with {workers} "
                               f"worker{'s' if workers != '1' else ''} (tps)", "higher", "tps",
                               _plain("connect_workers", "workers", workers, "tps")))
    if "connect_tls" in scenarios:
        rows.append(Metric("connect_tls.tps", "pgbench -S -C over TLS, trust login (tps)", "higher", "tps",
                           _plain("connect_tls", "tps")))
    for name, login in (("serverless", ""), ("serverless_trust", ", trust login")):
        if name not in scenarios:
            continue
        rows.append(Metric(f"{name}.closed.rps", f"serverless closed loop{login}: throughput (req/s)", "higher",
                           "req/s", _plain(name, "closed", "throughput_rps")))
        for point in ("p50", "p99"):
            rows.append(Metric(f"{name}.closed.{point}", f"serverless closed loop{login}: request {point} (ms)",
                               "lower", "ms", _plain(name, "closed", "latency_ms", point)))
        for point in ("p50", "p95", "p99"):
            rows.append(Metric(f"{name}.fixed_rate.{point}", f"serverless fixed rate{login}: request {point} (ms)",
                               "lower", "ms", _plain(name, "fixed_rate", "latency_ms", point)))
    if "latency" in scenarios:
        for placement, label in (("one_core", "one core"), ("free", "free")):
            for mode in ("simple", "extended"):
                for point in ("p50", "p99"):
                    rows.append(Metric(f"latency.{placement}.{mode}.{point}",
                                       f"SELECT 1 {mode}, {label}: {point} (µs)", "lower", "µs",
                                       _plain("latency", "placements", placement, mode, "latency_us", point)))
    if "storm" in results.get("scenarios", {}):
        rows += [
            Metric("storm.all_done", "storm: time until all served/refused (s)", "lower", "s",
                   _plain("storm", "all_done_s")),
            Metric("storm.served", "storm: clients served", "higher", "", _plain("storm", "served")),
            Metric("storm.max_backends", "storm: max backends seen", "lower", "", _plain("storm", "max_backends")),
            Metric("storm.hung", "storm: clients hung past wait timeout", "lower", "", _plain("storm", "hung")),
        ]
    if "idle" in results.get("scenarios", {}):
        rows += [
            Metric("idle.connected", "idle fleet: clients connected", "higher", "", _plain("idle", "connected")),
            Metric("idle.per_client", "idle fleet: memory per client (KB)", "lower", "KB",
                   _plain("idle", "memory_per_client_kb")),
            Metric("idle.rss", "idle fleet: pooler RSS with fleet (MB)", "lower", "MB", _plain("idle", "rss_mb"),
                   poolers_only=True),
        ]
    # The efficiency figures: pooler CPU per unit of work (direct has no pooler).
    if "steady" in results.get("scenarios", {}):
        measured_clients = [c for c in (10, 50) if c in steady_params.get("clients", [])] or (
            steady_params.get("clients") or [0])[:1]
        for mode in (mode for mode in ("simple", "extended") if mode in steady_params.get("modes", [])):
            for clients in measured_clients:
                rows.append(Metric(f"cpu.steady.{mode}.c{clients}", f"pooler CPU per txn, -M {mode} -c {clients} (µs)",
                                   "lower", "µs", _steady_cpu(mode, clients), poolers_only=True))
                rows.append(Metric(f"cpu_kernel.steady.{mode}.c{clients}",
                                   f"pooler CPU per txn in the kernel, -M {mode} -c {clients} (µs)", "lower", "µs",
                                   _steady_cpu(mode, clients, "pooler_kernel_us_per_txn"), poolers_only=True))
    if "connect" in scenarios:
        rows.append(Metric("cpu.connect", "pooler CPU per txn, -C SCRAM (µs)", "lower", "µs",
                           _plain("connect", "pooler_cpu_us_per_txn"), poolers_only=True))
    if "connect_trust" in scenarios:
        rows.append(Metric("cpu.connect_trust", "pooler CPU per txn, -C trust (µs)", "lower", "µs",
                           _plain("connect_trust", "pooler_cpu_us_per_txn"), poolers_only=True))
        rows.append(Metric("cpu_kernel.connect_trust", "pooler CPU per txn in the kernel, -C trust (µs)", "lower", "µs",
                           _plain("connect_trust", "pooler_kernel_us_per_txn"), poolers_only=True))
    if "connect_tls" in scenarios:
        rows.append(Metric("cpu.connect_tls", "pooler CPU per txn, -C TLS trust (µs)", "lower", "µs",
                           _plain("connect_tls", "pooler_cpu_us_per_txn"), poolers_only=True))
        rows.append(Metric("cpu_kernel.connect_tls", "pooler CPU per txn in the kernel, -C TLS trust (µs)", "lower",
                           "µs", _plain("connect_tls", "pooler_kernel_us_per_txn"), poolers_only=True))
        if "connect_trust" in scenarios:
            rows.append(Metric("cpu.tls_handshake", "pooler CPU per TLS connection beyond a plain one "
                               "(-C TLS minus -C trust, µs)", "lower", "µs", _tls_extra_cpu, poolers_only=True))
    for name, login in (("serverless", ""), ("serverless_trust", ", trust login")):
        if name in scenarios:
            rows.append(Metric(f"cpu.{name}", f"pooler CPU per serverless request{login} (µs)", "lower", "µs",
                               _plain(name, "closed", "pooler_cpu_us_per_request"), poolers_only=True))
    if "latency" in scenarios:
        rows.append(Metric("cpu.latency", "pooler CPU per SELECT 1, simple, one core (µs)", "lower", "µs",
                           _plain("latency", "placements", "one_core", "simple", "pooler_cpu_us_per_request"),
                           poolers_only=True))
    return rows


def _tls_extra_cpu(results: Results, target: str) -> tuple[float | None, str | None]:
    """What TLS adds to a pooler's CPU per connection: its -C TLS figure minus its -C plaintext (both trust)."""
    tls, failure = _plain("connect_tls", "pooler_cpu_us_per_txn")(results, target)
    plain, plain_failure = _plain("connect_trust", "pooler_cpu_us_per_txn")(results, target)
    if tls is None or plain is None:
        return None, failure or plain_failure
    return round(tls - plain, 2), None


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator == 0:
        return None
    return round(numerator / denominator, 3)


def ratio_table(results: Results) -> list[dict[str, Any]]:
    table = []
    for metric in metrics(results):
        row: dict[str, Any] = {"metric": metric.key, "label": metric.label, "better": metric.better}
        values: dict[str, float | None] = {}
        for target in ("direct", "pgmux", "pgbouncer"):
            if metric.poolers_only and target == "direct":
                row["direct"] = None
                values["direct"] = None
                continue
            number, failure = metric.value(results, target)
            values[target] = number
            row[target] = number if number is not None else failure
        row["pgmux/pgbouncer"] = _ratio(values["pgmux"], values["pgbouncer"])
        row["pgmux/direct"] = _ratio(values["pgmux"], values["direct"])
        table.append(row)
    return table


# --------------------------------------------------------------------------- edge runtimes (pgmux only)

# The edge scenario's modes, each with its label (in the order of the report's table).
EDGE_ROWS = (
    ("tcp_connect", "TCP: connect + SELECT 1 + close (node-postgres, SCRAM)"),
    ("http", "HTTP: POST /sql, SELECT 1 (neon())"),
    ("ws_connect", "WebSocket: connect + SELECT 1 + close (driver Client)"),
    ("tcp_query", "TCP: SELECT 1 on an open connection (node-postgres)"),
    ("ws_query", "WebSocket: SELECT 1 on an open session (driver Client)"),
    ("ws_connect_uncoalesced", "WebSocket: connect + SELECT 1 + close, coalesceWrites off (diagnostic)"),
    ("ws_query_uncoalesced", "WebSocket: SELECT 1 on an open session, coalesceWrites off (diagnostic)"),
)


def edge_table(results: Results) -> list[dict[str, Any]]:
    """pgmux's edge rows: p50/p99 (ms) of each mode and their ratios to the two TCP baselines of the same run."""
    modes = _dig(_scenario(results, "edge").get("pgmux"), "modes") or {}
    if not modes:
        return []

    def point(mode: str, key: str) -> float | None:
        value = _dig(modes.get(mode), "latency_ms", key)
        return value if isinstance(value, (int, float)) else None

    table = []
    for mode, label in EDGE_ROWS:
        if mode not in modes:
            continue
        row: dict[str, Any] = {"mode": mode, "label": label, "status": modes[mode].get("status"),
                               "requests": modes[mode].get("requests"),
                               "pooler_cpu_us_per_request": modes[mode].get("pooler_cpu_us_per_request"),
                               "client_cpu_us_per_request": modes[mode].get("client_cpu_us_per_request")}
        for key in ("p50", "p99"):
            row[f"{key}_ms"] = point(mode, key)
            for baseline in ("tcp_connect", "tcp_query"):
                row[f"{key}/{baseline}"] = _ratio(point(mode, key), point(baseline, key))
        table.append(row)
    return table


def _edge_markdown(results: Results) -> list[str]:
    entry = _scenario(results, "edge")
    if not entry:
        return []
    lines = ["", "## Edge runtimes (issue 18; pgmux only)", ""]
    pgmux = entry.get("pgmux", {})
    if pgmux.get("status") in ("unavailable", "skipped", "error") and not results.get("edge"):
        return lines + [f"Not measured: {pgmux.get('reason') or pgmux.get('error') or pgmux.get('status')}."]
    client = results.get("scenarios", {}).get("edge", {}).get("params", {}).get("client")
    lines += [f"One request at a time, `SELECT 1`, through one pgmux (its TCP and HTTP listeners); client: {client}. "
              "Ratios divide by the TCP row of the same run: connect + query + close, and a query on an open "
              "connection. Logins: SCRAM over TCP, the driver's cleartext password over the WebSocket and HTTP "
              "(what users of each path get).", "",
              "| path | p50 (ms) | p99 (ms) | p50 × TCP connect | p99 × TCP connect | p50 × TCP open | "
              "p99 × TCP open | pooler CPU µs/req | client CPU µs/req | requests |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in results.get("edge", []):
        lines.append(f"| {row['label']} | {_cell(row['p50_ms'])} | {_cell(row['p99_ms'])} | "
                     f"{_ratio_cell(row['p50/tcp_connect'])} | {_ratio_cell(row['p99/tcp_connect'])} | "
                     f"{_ratio_cell(row['p50/tcp_query'])} | {_ratio_cell(row['p99/tcp_query'])} | "
                     f"{_cell(row['pooler_cpu_us_per_request'])} | {_cell(row['client_cpu_us_per_request'])} | "
                     f"{_cell(row['requests'])} |")
    return lines


# --------------------------------------------------------------------------- issue targets


def _goal(goal: str, measured: str, met: bool | None, note: str = "") -> dict[str, Any]:
    return {"goal": goal, "measured": measured, "met": met, "note": note}


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value):
            return "—"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        if abs(value) >= 100:
            return f"{value:.1f}"
        return f"{value:.{digits}f}"
    return str(value)


def _signed(value: float | None) -> str:
    return "—" if value is None else f"{value:+.1f}"


def _cpu_split(run: dict[str, Any] | None) -> tuple[float | None, float | None, float | None]:
    """A pooler's CPU per transaction (or login): total, in user space, in the kernel; None where not measured."""
    if run is None or _failure(run):
        return None, None, None
    total, kernel = run.get("pooler_cpu_us_per_txn"), run.get("pooler_kernel_us_per_txn")
    user = round(total - kernel, 2) if total is not None and kernel is not None else None
    return total, user, kernel


def _cpu_comparison(mux: dict[str, Any] | None, bouncer: dict[str, Any] | None) -> str:
    """Where the two poolers' CPU goes, side by side: the measured reason a throughput goal is short or met."""
    (total, user, kernel), (b_total, b_user, b_kernel) = _cpu_split(mux), _cpu_split(bouncer)
    if total is None or b_total is None:
        return ""
    if user is None or b_user is None:
        return f"pooler CPU {_fmt(total)} vs {_fmt(b_total)} µs"
    return (f"pooler CPU {_fmt(total)} vs {_fmt(b_total)} µs: user space {_fmt(user)} vs {_fmt(b_user)}, "
            f"kernel {_fmt(kernel)} vs {_fmt(b_kernel)}")


def _steady_goals(results: Results) -> list[dict[str, Any]]:
    """pgbench -S on open connections: tps against PgBouncer (issue 7 at -c 50; issue 19 at -c 10 and -c 50)
    and, for issue 19, pooler CPU per transaction no more than PgBouncer's. Each says where the CPU went."""
    checks: list[dict[str, Any]] = []
    steady_clients = results.get("scenarios", {}).get("steady", {}).get("params", {}).get("clients", [])
    for c in (clients for clients in (10, 50) if clients in steady_clients):
        issues = "issues 7 and 19" if c == 50 else "issue 19"
        for mode in ("simple", "extended"):
            mux, bouncer = _steady_run(results, "pgmux", mode, c), _steady_run(results, "pgbouncer", mode, c)
            if mux is None or bouncer is None:
                continue
            ratio = _ratio(mux.get("tps") if not _failure(mux) else None,
                           bouncer.get("tps") if not _failure(bouncer) else None)
            split = _cpu_comparison(mux, bouncer)
            checks.append(_goal(f"pgbench -S -M {mode} -c {c}: pgmux ≥ 1.05× PgBouncer tps ({issues})",
                                f"{_fmt(ratio, 3)}× ({_fmt(mux.get('tps'))} vs {_fmt(bouncer.get('tps'))} tps)",
                                None if ratio is None else ratio >= 1.05,
                                _failure(mux) or _failure(bouncer) or split))
            total, b_total = _cpu_split(mux)[0], _cpu_split(bouncer)[0]
            checks.append(_goal(f"pgbench -S -M {mode} -c {c}: pooler CPU per transaction ≤ PgBouncer's (issue 19)",
                                f"{_ratio_cell(_ratio(total, b_total))} ({split or 'not measured'})",
                                None if total is None or b_total is None else total <= b_total))
    return checks


def targets_check(results: Results) -> list[dict[str, Any]]:
    checks: list[dict[str, Any]] = _steady_goals(results)
    pool_size = results.get("config", {}).get("pool_size")
    steady_clients = results.get("scenarios", {}).get("steady", {}).get("params", {}).get("clients", [])
    c = 50 if 50 in steady_clients else None
    if c is not None:
        mux, bouncer = _steady_run(results, "pgmux", "prepared", c), _steady_run(results, "pgbouncer", "prepared", c)
        if mux is not None and bouncer is not None:
            if _failure(bouncer):
                met: bool | None = True
                measured = f"PgBouncer: {bouncer.get('error', _failure(bouncer))}; pgmux: " + (
                    f"{_fmt(mux.get('tps'))} tps" if not _failure(mux) else f"{mux.get('error', _failure(mux))}")
                note = "PgBouncer fails, so its error is the bar" + (
                    "; pgmux fails as well" if _failure(mux) else "; pgmux works")
            else:
                ratio = _ratio(mux.get("tps") if not _failure(mux) else None, bouncer.get("tps"))
                met = ratio is not None and ratio >= 1.0
                measured = f"{_fmt(ratio, 3)}×" if ratio is not None else f"pgmux: {mux.get('error')}"
                note = ""
            checks.append(_goal("pgbench -S -M prepared -c 50: ≥ 1.0× PgBouncer (or PgBouncer's error)",
                                measured, met, note))
    connect = _scenario(results, "connect")
    if connect:
        tps = {target: (connect.get(target) or {}).get("tps") if not _failure(connect.get(target)) else None
               for target in ("direct", "pgmux", "pgbouncer")}
        vs_bouncer, vs_direct = _ratio(tps["pgmux"], tps["pgbouncer"]), _ratio(tps["pgmux"], tps["direct"])
        checks.append(_goal("pgbench -S -C: pgmux ≥ 1.0× PgBouncer", f"{_fmt(vs_bouncer, 3)}×",
                            None if vs_bouncer is None else vs_bouncer >= 1.0))
        checks.append(_goal("pgbench -S -C: pgmux ≥ 15× direct", f"{_fmt(vs_direct, 3)}×",
                            None if vs_direct is None else vs_direct >= 15,
                            _client_bound_note(connect, "SCRAM's PBKDF2 in libpq on every connection")))
    trust = _scenario(results, "connect_trust")
    if trust:
        tps = {target: (trust.get(target) or {}).get("tps") if not _failure(trust.get(target)) else None
               for target in ("direct", "pgmux", "pgbouncer")}
        vs_bouncer, vs_direct = _ratio(tps["pgmux"], tps["pgbouncer"]), _ratio(tps["pgmux"], tps["direct"])
        split = _cpu_comparison(trust.get("pgmux"), trust.get("pgbouncer"))
        checks.append(_goal("pgbench -S -C, trust login: pgmux ≥ 1.0× PgBouncer (issues 7 and 19)",
                            f"{_fmt(vs_bouncer, 3)}×", None if vs_bouncer is None else vs_bouncer >= 1.0,
                            "; ".join(filter(None, ["same goal without libpq's PBKDF2",
                                                    split and f"per login, {split}"]))))
        checks.append(_goal("pgbench -S -C, trust login: pgmux ≥ 15× direct", f"{_fmt(vs_direct, 3)}×",
                            None if vs_direct is None else vs_direct >= 15, "same goal without libpq's PBKDF2"))
    tls = _scenario(results, "connect_tls")
    if tls:
        tps = {target: (tls.get(target) or {}).get("tps") if not _failure(tls.get(target)) else None
               for target in POOLERS}
        ratio = _ratio(tps["pgmux"], tps["pgbouncer"])
        bound = _client_bound_note(tls, "libpq's own TLS handshake on every connection")
        checks.append(_goal("pgbench -S -C over TLS (sslmode=require): pgmux ≥ 0.8× PgBouncer (issue 17)",
                            f"{_fmt(ratio, 3)}× ({_fmt(tps['pgmux'])} vs {_fmt(tps['pgbouncer'])} tps)",
                            None if ratio is None else ratio >= 0.8,
                            "; ".join(filter(None, ["both hand the handshake to OpenSSL; direct: no TLS in the "
                                                    "embedded PostgreSQL", bound]))))
        # The pooler's own handshake rate, which a client-bound tps hides: connections per CPU-second.
        cpu = {target: (tls.get(target) or {}).get("pooler_cpu_us_per_txn") if not _failure(tls.get(target))
               else None for target in POOLERS}
        rate = _ratio(cpu["pgbouncer"], cpu["pgmux"])
        checks.append(_goal("TLS connections per pooler CPU-second: pgmux ≥ 0.8× PgBouncer (issue 17)",
                            f"{_fmt(rate, 3)}× ({_fmt(cpu['pgmux'])} vs {_fmt(cpu['pgbouncer'])} µs of pooler CPU "
                            "per connection)", None if rate is None else rate >= 0.8,
                            "the handshake rate each pooler could reach with the CPU to itself"))
    for name, login in (("serverless", ""), ("serverless_trust", ", trust login")):
        serverless = _scenario(results, name)
        if not serverless:
            continue
        for load, label in (("fixed_rate", "fixed rate"), ("closed", "closed loop")):
            p99 = {t: _dig(serverless.get(t), load, "latency_ms", "p99") for t in ("direct", "pgmux", "pgbouncer")}
            ratio = _ratio(p99["pgmux"], p99["direct"])
            note = "client-bound: the harness's asyncpg loop saturates" if load == "closed" else (
                "same goal without asyncpg's PBKDF2" if login else "")
            checks.append(_goal(f"serverless p99 ({label}{login}): pooled ≤ 1/5 of direct",
                                f"{_fmt(ratio, 3)}× ({_fmt(p99['pgmux'])} vs {_fmt(p99['direct'])} ms; "
                                f"PgBouncer {_fmt(p99['pgbouncer'])} ms)",
                                None if ratio is None else ratio <= 0.2, note))
    latency = _scenario(results, "latency")
    if latency:
        for placement, label in (("one_core", "one core"), ("free", "free placement")):
            for mode in ("simple", "extended"):
                p50 = {t: _dig(latency.get(t), "placements", placement, mode, "latency_us", "p50")
                       for t in ("direct", "pgmux", "pgbouncer")}
                added = None if p50["direct"] is None or p50["pgmux"] is None else round(p50["pgmux"] - p50["direct"], 1)
                added_bouncer = (None if p50["direct"] is None or p50["pgbouncer"] is None
                                 else round(p50["pgbouncer"] - p50["direct"], 1))
                checks.append(_goal(f"added p50 latency on an open connection ({mode}, {label}): ≤ 40 µs",
                                    f"{_signed(added)} µs (PgBouncer {_signed(added_bouncer)} µs)",
                                    None if added is None else added <= 40,
                                    "" if placement == "one_core" else "varies with CPU placement run to run"))
                if placement == "one_core":  # issue 19's bar is PgBouncer's own, where placement cannot blur it
                    beyond = None if added is None or added_bouncer is None else round(added - added_bouncer, 1)
                    checks.append(_goal(f"added p50 latency on an open connection ({mode}, one core): ≤ PgBouncer's "
                                        "+ 5 µs (issue 19)", f"{_signed(beyond)} µs beyond PgBouncer's",
                                        None if beyond is None else beyond <= 5))
    idle = _scenario(results, "idle").get("pgmux")
    if idle and not _failure(idle):
        clients, rss = idle.get("connected"), idle.get("rss_mb")
        bouncer = _scenario(results, "idle").get("pgbouncer") or {}
        if rss is None:
            met = None
        elif rss > 100:
            met = False
        else:
            met = True if (clients or 0) >= 10_000 else None  # not measured at the target's size
        checks.append(_goal("10,000 idle clients: ≤ 100 MB RSS",
                            f"{_fmt(rss, 1)} MB with {clients} clients (PgBouncer {_fmt(bouncer.get('rss_mb'), 1)} MB)",
                            met, "" if (clients or 0) >= 10_000 else f"only {clients} clients in this run"))
        per_client = idle.get("memory_per_client_kb")  # KiB: the RSS growth / 1024 / clients
        checks.append(_goal("10,000 idle clients: ≤ 2 KiB per client (issue 19)",
                            f"{_fmt(per_client)} KiB (PgBouncer {_fmt(bouncer.get('memory_per_client_kb'))} KiB)",
                            None if per_client is None or (clients or 0) < 10_000 else per_client <= 2,
                            "" if (clients or 0) >= 10_000 else f"only {clients} clients in this run"))
    storm = _scenario(results, "storm").get("pgmux")
    if storm and not _failure(storm):
        max_backends, hung = storm.get("max_backends"), storm.get("hung")
        ok = max_backends is not None and pool_size is not None and max_backends <= pool_size and hung == 0
        checks.append(_goal(f"storm: never more than {pool_size} backends; no client hangs past its wait timeout",
                            f"max {max_backends} backends, {hung} hung, {storm.get('served')} served, "
                            f"refused {storm.get('refused_by_sqlstate')}", ok))
    return checks


def _client_bound_note(per_target: dict[str, Any], cause: str) -> str:
    """Say so when pgbench used most of the machine: then -C measures the client's ``cause``, not the target."""
    shares = []
    for result in per_target.values():
        cpu = (result or {}).get("cpu") or {}
        if cpu.get("client_programs_s") is not None and cpu.get("wall_s"):
            shares.append(cpu["client_programs_s"] / cpu["wall_s"])
    if shares and max(shares) > 0.8:
        return f"pgbench itself used up to {max(shares):.1f} CPU-seconds per second ({cause}): client-bound"
    return ""


# --------------------------------------------------------------------------- noise


def _cpu_dicts(data: Any) -> Iterator[dict[str, Any]]:
    if isinstance(data, dict):
        for key, value in data.items():
            if key in ("cpu", "login_cpu") and isinstance(value, dict) and "other_share" in value:
                yield value
            else:
                yield from _cpu_dicts(value)
    elif isinstance(data, list):
        for item in data:
            yield from _cpu_dicts(item)


def noise_summary(results: Results) -> dict[str, Any]:
    shares = [d["other_share"] for d in _cpu_dicts(results.get("scenarios", {})) if d.get("other_share") is not None]
    if not shares:
        return {"measured_runs": 0}
    median = statistics.median(shares)
    return {
        "measured_runs": len(shares),
        "other_cpu_share_median": round(median, 3),
        "other_cpu_share_max": round(max(shares), 3),
        "noisy": median > 0.10 or max(shares) > 0.35,
    }


# --------------------------------------------------------------------------- markdown


def _cell(value: Any, unit: str = "") -> str:
    if value is None:
        return "—"
    if isinstance(value, str):
        return value
    return _fmt(value)


def _ratio_cell(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}×"


def _machine_line(results: Results) -> str:
    m = results.get("machine", {})
    return (f"{m.get('cpu_model', '?')}, {m.get('cpus', '?')} CPUs, {m.get('memory_gb', '?')} GB RAM, "
            f"{m.get('os', '?')} (kernel {m.get('kernel', '?')}), Python {m.get('python', '?')}")


def markdown(results: Results, image: str | None) -> str:
    cfg = results.get("config", {})
    versions = results.get("versions", {})
    noise = results.get("noise", {})
    git = results.get("git", {})
    lines = [
        f"# pgmux benchmark: direct vs pgmux vs PgBouncer ({'quick' if cfg.get('quick') else 'full'} run)",
        "",
        f"- **Date**: {results.get('started_at', '?')} (took {results.get('elapsed_s', 0):.0f} s"
        f"{'; interrupted, so incomplete' if results.get('interrupted') else ''})",
        f"- **Machine**: {_machine_line(results)}",
        f"- **Software**: PostgreSQL {versions.get('postgres', '?')} ({versions.get('postgres_source', '?')}, "
        f"max_connections={results.get('postgres_max_connections', '?')}), pgmux {versions.get('pgmux', '?')} "
        f"(git {git.get('commit', '?')}{', proxy/ has uncommitted changes' if git.get('proxy_dirty') else ''}), "
        f"{versions.get('pgbouncer') or 'PgBouncer: not installed'}, {versions.get('pgbench', 'pgbench ?')}",
        f"- **Pools**: pool_size={cfg.get('pool_size')}, pool_mode={cfg.get('pool_mode')}, "
        f"query_wait_timeout={cfg.get('query_wait_timeout', 0):g} s, max_client_conn=20000 (both poolers); "
        f"{cfg.get('duration', 0):g} s per timed run",
    ]
    unavailable = {name: info.get("reason") for name, info in results.get("targets", {}).items()
                   if not info.get("available")}
    for name, reason in unavailable.items():
        lines.append(f"- **{LABELS.get(name, name)} not measured**: {reason}")
    if noise.get("measured_runs"):
        verdict = "**noisy: other processes were using the CPU; treat small ratios with care**" if noise.get(
            "noisy") else "quiet"
        lines.append(f"- **Noise**: CPU used by other processes during measured runs: median "
                     f"{noise['other_cpu_share_median'] * 100:.0f}% / max {noise['other_cpu_share_max'] * 100:.0f}% "
                     f"of the machine ({verdict}); load average at start {results.get('loadavg_start')}")
    lines += ["", "## Ratios", "",
              "Ratios are pgmux's value divided by the other's. For *higher is better* rows a ratio above 1 favours "
              "pgmux; for *lower is better* rows a ratio below 1 does.", "",
              "| metric | better | direct | pgmux | PgBouncer | pgmux/PgBouncer | pgmux/direct |",
              "|---|---|---:|---:|---:|---:|---:|"]
    for row in results.get("ratios", []):
        lines.append(f"| {row['label']} | {row['better']} | {_cell(row.get('direct'))} | {_cell(row.get('pgmux'))} | "
                     f"{_cell(row.get('pgbouncer'))} | {_ratio_cell(row.get('pgmux/pgbouncer'))} | "
                     f"{_ratio_cell(row.get('pgmux/direct'))} |")
    lines += _edge_markdown(results)
    checks = results.get("targets_check", [])
    if checks:
        lines += ["", "## Issue targets (issue 7; TLS: issue 17; compiled data plane: issue 19)", "",
                  "| goal | measured | met | note |", "|---|---|---|---|"]
        for check in checks:
            met = {True: "yes", False: "**no**", None: "n/a"}[check["met"]]
            lines.append(f"| {check['goal']} | {check['measured']} | {met} | {check.get('note', '')} |")
    if image:
        lines += ["", f"![latency distributions and tps by clients]({image})"]
    lines += ["", "## Details", ""]
    lines += _details(results)
    return "\n".join(lines) + "\n"


def _details(results: Results) -> list[str]:
    out: list[str] = []
    scenarios = results.get("scenarios", {})
    for name, entry in scenarios.items():
        out += [f"### {entry.get('title', name)}", "", entry.get("description", ""), "",
                f"Parameters: `{entry.get('params', {})}`", ""]
        per_target = entry.get("results", {})
        if name == "steady":
            out += ["| target | mode | clients | status | tps | latency avg (ms) | max backends | pooler CPU µs/txn |"
                    " error |", "|---|---|---:|---|---:|---:|---:|---:|---|"]
            for target, result in per_target.items():
                if not result.get("runs"):
                    out.append(f"| {target} | | | {result.get('status')} | | | | | {result.get('reason') or result.get('error', '')} |")
                for run in result.get("runs", []):
                    out.append(f"| {target} | {run['mode']} | {run['clients']} | {run['status']} | "
                               f"{_cell(run.get('tps'))} | {_cell(run.get('latency_avg_ms'))} | "
                               f"{_cell(run.get('max_backends'))} | {_cell(run.get('pooler_cpu_us_per_txn'))} | "
                               f"{(run.get('error') or '').replace('|', '/')} |")
        else:
            out += ["| target | status | key figures |", "|---|---|---|"]
            for target, result in per_target.items():
                out.append(f"| {target} | {result.get('status')} | {_key_figures(name, result)} |")
        out.append("")
    return out


def _key_figures(name: str, result: dict[str, Any]) -> str:
    if result.get("status") == "unavailable":
        return str(result.get("reason"))
    if result.get("error") and result.get("status") in ("error", "timeout"):
        return str(result["error"]).replace("|", "/")[:300]
    pick: dict[str, Any] = {}
    if name in ("serverless", "serverless_trust"):
        pick = {load: {"req/s": data.get("throughput_rps"), "requests": data.get("requests"),
                       "latency ms": {k: v for k, v in data.get("latency_ms", {}).items() if k in ("p50", "p95", "p99")},
                       "errors": data.get("errors") or None, "max backends": data.get("max_backends"),
                       "pooler CPU µs/req": data.get("pooler_cpu_us_per_request")}
                for load, data in result.items() if isinstance(data, dict) and "latency_ms" in data}
    elif name in ("connect", "connect_trust", "connect_tls"):
        pick = {"tps": result.get("tps"), "avg connection ms": result.get("avg_connection_ms"),
                "max backends": result.get("max_backends"),
                "pooler CPU µs/txn": result.get("pooler_cpu_us_per_txn"),
                "pgbench CPU s": _dig(result, "cpu", "client_programs_s"), "wall s": _dig(result, "cpu", "wall_s")}
    elif name == "connect_workers":
        pick = {f"{workers} worker(s)": {"tps": run.get("tps"), "max backends": run.get("max_backends"),
                                         "pooler CPU µs/txn": run.get("pooler_cpu_us_per_txn")}
                for workers, run in result.get("workers", {}).items()}
    elif name == "latency":
        pick = {f"{placement} {mode}": {
                    "µs": {k: v for k, v in data.get("latency_us", {}).items() if k in ("p50", "p99", "p99.9")},
                    "pooler CPU µs/req": data.get("pooler_cpu_us_per_request")}
                for placement, modes in result.get("placements", {}).items() for mode, data in modes.items()}
    elif name == "edge":
        pick = {mode: {"ms": {k: v for k, v in data.get("latency_ms", {}).items() if k in ("p50", "p99", "p99.9")},
                       "requests": data.get("requests"), "errors": data.get("errors") or None,
                       "pooler CPU µs/req": data.get("pooler_cpu_us_per_request")}
                for mode, data in result.get("modes", {}).items()}
    elif name == "storm":
        pick = {k: result.get(k) for k in ("clients", "served", "refused_by_sqlstate", "other_failures", "hung",
                                           "all_done_s", "max_backends", "pooler_max_rss_mb",
                                           "pooler_cpu_us_per_client")}
    elif name == "idle":
        pick = {k: result.get(k) for k in ("clients", "connected", "errors", "connect_s", "logins_per_s",
                                           "rss_base_mb", "rss_mb", "memory_per_client_kb", "direct_backends",
                                           "pooler_cpu_us_per_login", "alive_checked", "note") if result.get(k) is not None}
    text = "; ".join(f"{k}: {v}" for k, v in pick.items() if v not in (None, {}, ""))
    return text.replace("|", "/")


# --------------------------------------------------------------------------- plots


def plot(results: Results, path: Path) -> str | None:
    """Draw the 3x3 overview figure; return None on success or why no plot was drawn."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib)"
    fig, axes = plt.subplots(3, 3, figsize=(18, 14))
    latency = _scenario(results, "latency")
    for ax, mode in zip(axes[0][:2], ("simple", "extended")):
        _cdf(ax, {t: _dig(r, "placements", "one_core", mode, "latency_cdf_us") for t, r in latency.items()},
             f"SELECT 1 on an open connection ({mode}); dashed: free placement", "round trip (µs)",
             dashed={t: _dig(r, "placements", "free", mode, "latency_cdf_us") for t, r in latency.items()})
    serverless = _scenario(results, "serverless")
    rate = results.get("scenarios", {}).get("serverless", {}).get("params", {}).get("rate_per_s", "?")
    _cdf(axes[0][2], {t: _dig(r, "fixed_rate", "latency_cdf_ms") for t, r in serverless.items()},
         f"serverless connect+query+close: {rate}/s; dashed: closed loop", "request latency (ms)",
         dashed={t: _dig(r, "closed", "latency_cdf_ms") for t, r in serverless.items()})
    steady_params = results.get("scenarios", {}).get("steady", {}).get("params", {})
    for ax, mode in zip(axes[1], ("simple", "extended", "prepared")):
        _tps_by_clients(ax, results, mode, steady_params.get("clients", []))
    _grouped_bars(axes[2][0], {
        "SCRAM": {t: (r.get("tps") if not _failure(r) else None) for t, r in _scenario(results, "connect").items()},
        "trust": {t: (r.get("tps") if not _failure(r) else None)
                  for t, r in _scenario(results, "connect_trust").items()},
        "TLS, trust": {t: (r.get("tps") if not _failure(r) else None)
                       for t, r in _scenario(results, "connect_tls").items()},
    }, "pgbench -S -C (connection per transaction)", "tps")
    _cdf(axes[2][1], {t: r.get("served_cdf_ms") for t, r in _scenario(results, "storm").items()},
         f"storm: {results.get('scenarios', {}).get('storm', {}).get('params', {}).get('clients', '?')} clients "
         "at once (served)", "time until served (ms)")
    _bars(axes[2][2], {t: r.get("memory_per_client_kb") for t, r in _scenario(results, "idle").items()},
          "idle fleet: memory per connected client", "KB per client", log=True)
    cfg = results.get("config", {})
    fig.suptitle(f"pgmux vs PgBouncer vs direct — {results.get('started_at', '')} — pool {cfg.get('pool_size')} "
                 f"{cfg.get('pool_mode')} — {results.get('machine', {}).get('cpus', '?')} CPUs", fontsize=14)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return None


def _cdf(ax: Any, series: dict[str, Any], title: str, xlabel: str, dashed: dict[str, Any] | None = None) -> None:
    drawn = False
    for style, group in (("-", series), ("--", dashed or {})):
        for target, points in group.items():
            if not points:
                continue
            xs = [max(p[1], 1e-3) for p in points]
            ys = [p[0] for p in points]
            ax.plot(xs, ys, style, label=LABELS.get(target, target) if style == "-" else None,
                    color=COLORS.get(target), alpha=1.0 if style == "-" else 0.6)
            drawn = True
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("percentile")
    if drawn:
        from matplotlib.ticker import NullFormatter, ScalarFormatter

        ax.set_xscale("log")
        formatter = ScalarFormatter()
        formatter.set_scientific(False)
        ax.xaxis.set_major_formatter(formatter)
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
    ax.grid(True, alpha=0.3)


def _tps_by_clients(ax: Any, results: Results, mode: str, clients: list[int]) -> None:
    for target in ("direct", "pgmux", "pgbouncer"):
        xs, ys, failed = [], [], []
        for count in clients:
            run = _steady_run(results, target, mode, count)
            if run is None:
                continue
            if _failure(run) or run.get("tps") is None:
                failed.append(count)
            else:
                xs.append(count)
                ys.append(run["tps"])
        if xs:
            ax.plot(xs, ys, marker="o", label=LABELS[target], color=COLORS[target])
        if failed:
            ax.plot(failed, [0] * len(failed), marker="x", linestyle="none", markersize=10, color=COLORS[target],
                    label=f"{LABELS[target]} failed")
    ax.set_ylim(bottom=0)
    ax.set_title(f"pgbench -S -M {mode}: tps by clients", fontsize=10)
    ax.set_xlabel("clients (-c)")
    ax.set_ylabel("tps")
    if clients:
        ax.set_xticks(clients)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
    ax.grid(True, alpha=0.3)


def _bars(ax: Any, values: dict[str, float | None], title: str, ylabel: str, log: bool = False) -> None:
    names = [t for t in ("direct", "pgmux", "pgbouncer") if t in values]
    heights = [values[t] or 0 for t in names]
    bars = ax.bar([LABELS[t] for t in names], heights, color=[COLORS[t] for t in names])
    for bar, name in zip(bars, names):
        label = _fmt(values[name], 1) if values[name] is not None else "n/a"
        ax.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                    fontsize=8)
    ax.set_title(title, fontsize=10)
    ax.set_ylabel(ylabel)
    if log and any(heights):
        ax.set_yscale("log")
    ax.grid(True, axis="y", alpha=0.3)


def _grouped_bars(ax: Any, groups: dict[str, dict[str, float | None]], title: str, ylabel: str) -> None:
    groups = {name: values for name, values in groups.items() if values}
    targets = [t for t in ("direct", "pgmux", "pgbouncer") if any(t in values for values in groups.values())]
    width = 0.8 / max(1, len(targets))
    for offset, target in enumerate(targets):
        xs = [index + (offset - (len(targets) - 1) / 2) * width for index in range(len(groups))]
        heights = [(values.get(target) or 0) for values in groups.values()]
        bars = ax.bar(xs, heights, width, label=LABELS[target], color=COLORS[target])
        for bar, values in zip(bars, groups.values()):
            value = values.get(target)
            ax.annotate(_fmt(value, 0) if value is not None else "n/a",
                        (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(list(groups))
    ax.set_title(title, fontsize=10)
    ax.set_ylabel(ylabel)
    if targets:
        ax.legend(fontsize=8)
    ax.grid(True, axis="y", alpha=0.3)


# --------------------------------------------------------------------------- files

README_START, README_END = "<!-- latest-table -->", "<!-- /latest-table -->"


def readme_section(results: Results) -> str:
    """The machine/date header, ratio table and issue-targets table of the report, for benchmarks/README.md."""
    text = markdown(results, None)
    head, _, rest = text.partition("## Ratios")
    body = rest.split("## Details", 1)[0]
    header = "\n".join(line for line in head.splitlines() if line.startswith("- **"))
    body = body.replace("## Issue targets", "#### Issue targets").replace("## Edge runtimes", "#### Edge runtimes")
    return f"{header}\n\n#### Ratios{body.rstrip()}\n\n![plots](results/latest.png)\n"


def update_readme(results: Results, readme: Path) -> bool:
    """Replace the text between the latest-table markers of ``readme`` with this run's tables."""
    try:
        text = readme.read_text()
    except OSError:
        return False
    start, end = text.find(README_START), text.find(README_END)
    if start < 0 or end < start:
        return False
    readme.write_text(text[:start + len(README_START)] + "\n" + readme_section(results) + text[end:])
    return True


def latest_name(results: Results) -> str:
    """'latest' for a complete full run; quick and partial runs refresh their own, so they never replace it."""
    cfg = results.get("config", {})
    if cfg.get("quick"):
        return "latest-quick"
    if cfg.get("partial") or results.get("interrupted"):
        return "latest-partial"
    return "latest"


def write_outputs(results: Results, out_dir: Path, stamp: str) -> dict[str, str]:
    """<stamp>.json/.md/.png under out_dir, and <latest>.json/.md/.png refreshed (see latest_name); returns the paths."""
    import json

    out_dir.mkdir(parents=True, exist_ok=True)
    results["ratios"] = ratio_table(results)
    results["targets_check"] = targets_check(results)
    results["edge"] = edge_table(results)
    results["noise"] = noise_summary(results)
    png = out_dir / f"{stamp}.png"
    plot_problem = plot(results, png)
    if plot_problem:
        results["plot_error"] = plot_problem
    json_path = out_dir / f"{stamp}.json"
    json_path.write_text(json.dumps(results, indent=1, default=str) + "\n")
    md_path = out_dir / f"{stamp}.md"
    md_path.write_text(markdown(results, png.name if not plot_problem else None))
    paths = {"json": str(json_path), "markdown": str(md_path)}
    latest = latest_name(results)
    if not plot_problem:
        paths["png"] = str(png)
        shutil.copyfile(png, out_dir / f"{latest}.png")
    (out_dir / f"{latest}.md").write_text(markdown(results, f"{latest}.png" if not plot_problem else None))
    shutil.copyfile(json_path, out_dir / f"{latest}.json")
    paths["latest"] = str(out_dir / f"{latest}.md")
    return paths
