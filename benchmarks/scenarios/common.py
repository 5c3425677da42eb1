"""What every scenario shares: the run configuration, the backend sampler, error classification."""

from __future__ import annotations

import asyncio
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from benchmarks.pgwire import BlockingConnection, PgError
from benchmarks.procs import CpuMeter, rss_bytes
from benchmarks.targets import ADMIN_APP, BenchEnv, Target

Result = dict[str, Any]


@dataclass
class RunConfig:
    quick: bool
    duration: float
    pool_size: int
    pool_mode: str
    query_wait_timeout: float
    targets: list[str]
    scenarios: list[str]
    out: Path
    log: Callable[[str], None] = print
    extra: dict[str, Any] = field(default_factory=dict)


class Scenario:
    """One scenario: ``params`` says what it will do; then either

    * ``interleaved = False``: ``run`` measures one running target; targets run one after another, each
      started alone (storm and idle fleet, where another pooler's backends would change the result); or
    * ``interleaved = True``: all targets run at once and the scenario's ``units`` (e.g. one pgbench
      configuration each) are measured target after target, rotating the order per unit, so a burst of
      load from something else on the machine does not land on one target only. ``combine`` folds a
      target's unit results into its result.
    """

    name = ""
    title = ""
    description = ""
    interleaved = False
    auth = "scram"  # how clients log in: "scram" (everyone's default) or "trust" (see BenchEnv.target)
    client_tls = False  # clients connect with sslmode=require (the poolers terminate TLS; direct cannot)
    http_listener = False  # the target also serves HTTP/WebSocket (pgmux only: the others are unavailable)
    pgmux_only = ""  # why only pgmux takes part (the others are reported unavailable with it); "": everyone does

    def missing(self, env: BenchEnv) -> str | None:
        """Why this scenario cannot run on this machine at all (e.g. a client program not installed), or None."""
        return None

    def params(self, cfg: RunConfig, env: BenchEnv) -> dict[str, Any]:
        raise NotImplementedError

    def run(self, cfg: RunConfig, env: BenchEnv, target: Target, params: dict[str, Any]) -> Result:
        raise NotImplementedError

    def units(self, params: dict[str, Any]) -> list[Any]:
        raise NotImplementedError

    def run_unit(self, cfg: RunConfig, env: BenchEnv, target: Target, params: dict[str, Any], unit: Any) -> Result:
        raise NotImplementedError

    def combine(self, target: Target | None, measured: list[tuple[Any, Result]], params: dict[str, Any]) -> Result:
        raise NotImplementedError


class BackendSampler:
    """Samples, in a thread, how many client backends PostgreSQL shows in the benchmark database
    (excluding the harness's own monitoring connection) and the pooler's RSS."""

    def __init__(self, env: BenchEnv, pooler_pid: int | None, interval: float = 0.05) -> None:
        self.env = env
        self.pooler_pid = pooler_pid
        self.interval = interval
        self.max_backends = 0
        self.samples = 0
        self.max_rss = 0
        self.error: str | None = None
        self._done = threading.Event()
        self._conn = BlockingConnection(env.admin_endpoint, application_name=ADMIN_APP)
        database = env.database.replace("'", "''")
        self._sql = ("SELECT count(*) FROM pg_stat_activity WHERE datname = '" + database + "' "
                     "AND backend_type = 'client backend' AND pid <> pg_backend_pid() "
                     f"AND coalesce(application_name, '') <> '{ADMIN_APP}'")
        self._thread = threading.Thread(target=self._run, name="backend-sampler", daemon=True)

    def _run(self) -> None:
        try:
            while not self._done.is_set():
                self.max_backends = max(self.max_backends, int(self._conn.scalar(self._sql)))
                self.samples += 1
                rss = rss_bytes(self.pooler_pid)
                if rss:
                    self.max_rss = max(self.max_rss, rss)
                self._done.wait(self.interval)
        except Exception as exc:  # reported in the result, never silently
            self.error = f"{type(exc).__name__}: {exc}"

    def __enter__(self) -> BackendSampler:
        self.baseline = int(self._conn.scalar(self._sql))
        self.others = self._others_at_start()
        self._thread.start()
        return self

    def _others_at_start(self) -> int:
        """Backends already open that are not this target's: another pooler's idle pool (interleaved scenarios).

        They stay constant during a run (idle, far from server_idle_timeout), so the target's own peak is the
        sampled peak minus these. A pooler's own backends are told apart by their client port: pg_stat_activity's
        client_port is the local port of one of the pooler's sockets to PostgreSQL.
        """
        ports = self._conn.scalar(self._sql.replace("SELECT count(*)", "SELECT string_agg(client_port::text, ',')"))
        backend_ports = [int(port) for port in ports.split(",") if port]
        if self.pooler_pid is None:
            return len(backend_ports)  # direct: whatever is open before the load is someone else's
        try:
            process = psutil.Process(self.pooler_pid)
            sockets = process.net_connections(kind="tcp")
        except (psutil.Error, OSError):
            return 0
        own = {conn.laddr.port for conn in sockets if conn.raddr and conn.raddr.port == self.env.port}
        return sum(1 for port in backend_ports if port not in own)

    def settle(self, timeout: float = 5.0) -> bool:
        """Stop sampling and wait until the backends the load opened are gone (back to the count at the start).

        A backend's CPU time reaches the postmaster's children times only once it has exited and been reaped;
        taking the "after" CPU snapshot earlier would lose the CPU of every backend that was still closing.
        """
        self._done.set()
        self._thread.join(15)
        if self.pooler_pid is not None:
            return True  # a pooler's backends stay open (and their CPU is read live): nothing to wait for
        try:
            settled = wait_until(lambda: int(self._conn.scalar(self._sql)) <= self.baseline, timeout, 0.02)
        except Exception:
            return False
        time.sleep(0.05)  # the postmaster reaps an exited backend on SIGCHLD; give it a moment
        return settled

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join(15)
        self._conn.close()

    def result(self) -> Result:
        out: Result = {"max_backends": max(0, self.max_backends - self.others) if self.samples else None,
                       "backend_samples": self.samples}
        if self.others:
            out["other_targets_backends"] = self.others
        if self.max_rss:
            out["pooler_max_rss_mb"] = round(self.max_rss / 2**20, 1)
        if self.error:
            out["sampler_error"] = self.error
        return out


def measured(env: BenchEnv, target: Target) -> CpuMeter:
    return CpuMeter(target.pid, env.postgres_pid)


def per_unit_us(seconds: float | None, units: float | None) -> float | None:
    if seconds is None or not units:
        return None
    return round(seconds / units * 1e6, 2)


def classify(exc: BaseException) -> str:
    """A stable key for an error: the SQLSTATE when the server sent one, else the exception class."""
    sqlstate = getattr(exc, "sqlstate", None)
    if isinstance(exc, PgError) and exc.sqlstate:
        return exc.sqlstate
    if isinstance(sqlstate, str) and sqlstate:
        return sqlstate
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return "timeout"
    return type(exc).__name__


_SQLSTATE_BY_MESSAGE = [
    (re.compile(r"too many clients|remaining connection slots|no more connections allowed", re.I), "53300"),
    (re.compile(r"prepared statement .* does not exist", re.I), "26000"),
    (re.compile(r"prepared statement .* already exists", re.I), "42P05"),
    (re.compile(r"password authentication failed|SASL authentication failed", re.I), "28P01"),
    (re.compile(r"query_wait_timeout|query wait timeout", re.I), "08P01"),
    (re.compile(r"server closed the connection|connection refused|could not connect", re.I), "08006"),
]


def sqlstate_from_message(message: str) -> str | None:
    """pgbench prints messages, not SQLSTATEs: infer the SQLSTATE for the common cases (None if unknown)."""
    for pattern, sqlstate in _SQLSTATE_BY_MESSAGE:
        if pattern.search(message):
            return sqlstate
    return None


def cdf_points(samples: list[float]) -> list[list[float]]:
    """[[percentile, value], ...] at 101 points, enough to draw a distribution without storing every sample."""
    if not samples:
        return []
    ordered = sorted(samples)
    points = [0.0, 0.1, 0.5, *range(1, 100), 99.5, 99.9, 99.99, 100.0]
    out = []
    for point in points:
        index = min(len(ordered) - 1, max(0, int(round(point / 100 * (len(ordered) - 1)))))
        out.append([float(point), round(ordered[index], 3)])
    return out


def overall_status(results: list[Result]) -> str:
    """A target's status over its measured units: ok when all are, error when all failed, else partial."""
    statuses = [result.get("status") for result in results]
    if statuses and all(status == "ok" for status in statuses):
        return "ok"
    return "error" if all(status == "error" for status in statuses) else "partial"


def summarize_units(out: Result, measured_units: list[tuple[Any, Result]]) -> Result:
    """``out`` with the status over ``measured_units`` and the first error any of them had."""
    results = [result for _unit, result in measured_units]
    out["status"] = overall_status(results)
    errors = [result["error"] for result in results if result.get("error")]
    if errors:
        out["error"] = errors[0]
    return out


def check_pooler(target: Target, result: Result) -> Result:
    """Note in ``result`` if the pooler process died during the run (with its log tail)."""
    if target.process is not None and not target.process.alive():
        result["status"] = "error"
        result["pooler_exit_code"] = target.process.process.returncode
        result["pooler_log_tail"] = target.process.log_tail()
        result.setdefault("error", f"{target.name} exited with code {target.process.process.returncode}")
    return result


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()
