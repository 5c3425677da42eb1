"""edge: one query over HTTP (POST /sql) and over a WebSocket session, by the Neon serverless driver run in node,
against a TCP connect + query + close through the same pgmux (node-postgres)."""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

import psutil

from benchmarks.pgwire import percentiles
from benchmarks.procs import CpuMeter
from benchmarks.scenarios.common import (
    Result, RunConfig, Scenario, cdf_points, check_pooler, measured, per_unit_us, summarize_units,
)
from benchmarks.targets import BenchEnv, Target, clean_env

SCRIPT = Path(__file__).resolve().parent.parent / "js" / "edge_latency.js"
# Measured in this order in every round (the rounds interleave them, so a burst of someone else's load does not
# land on one mode only). The TCP rows are the baselines the others are compared with.
MODES = ("tcp_connect", "http", "ws_connect", "tcp_query", "ws_query", "ws_connect_uncoalesced", "ws_query_uncoalesced")
# npm packages and where they are looked for: the caches the node client tests install into (the same
# environment variables and defaults as tests/clients/npmcache.py and test_neon_websocket.py).
PACKAGES = {"@neondatabase/serverless": "neon", "ws": "neon", "pg": "node"}
_STARTUP_TIMEOUT_S = 60.0


def _cache_dirs() -> dict[str, Path]:
    node = Path(os.environ.get("PGMUX_NODE_CACHE") or Path.home() / ".cache" / "pgmux-tests" / "node").expanduser()
    neon = Path(os.environ.get("PGMUX_NEON_CACHE") or node.parent / "neon").expanduser()
    return {"node": node / "node_modules", "neon": neon / "node_modules"}


@functools.cache
def node_client() -> tuple[dict[str, Any] | None, str | None]:
    """(node, NODE_PATH and package versions) for the measuring script, or None and why it cannot run here."""
    node = shutil.which("node")
    if node is None:
        return None, "no node on PATH: the Neon serverless driver is measured as users run it, in node"
    caches = _cache_dirs()
    versions: dict[str, str] = {}
    missing = []
    for package, cache in PACKAGES.items():
        manifest = caches[cache] / package / "package.json"
        try:
            versions[package] = json.loads(manifest.read_text())["version"]
        except (OSError, ValueError, KeyError):
            missing.append(f"{package} in {caches[cache]}")
    if missing:
        return None, ("npm packages not installed: " + ", ".join(missing) + " (running tests/clients/"
                      "test_neon_websocket.py and test_node_postgres.py once installs them there)")
    node_path = os.pathsep.join(dict.fromkeys(str(caches[cache]) for cache in PACKAGES.values()))
    return {"node": node, "node_version": _node_version(node), "node_path": node_path, "packages": versions}, None


def _node_version(node: str) -> str | None:
    try:
        return subprocess.run([node, "--version"], capture_output=True, text=True, timeout=20,
                              check=False).stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        return None


class EdgeUnit:
    """One node process running one mode: warm up, wait for the harness's CPU snapshot, measure, report."""

    def __init__(self, client: dict[str, Any], target: Target, mode: str, params: dict[str, Any]) -> None:
        assert target.http_port is not None, "the edge scenario needs pgmux's HTTP listener"
        seconds = params["seconds_per_unit"]
        env = clean_env(target.password)
        env.update(NODE_PATH=client["node_path"], MODE=mode, HTTP_PORT=str(target.http_port),
                   TCP_PORT=str(target.port), PGUSER=target.user, PGDATABASE=target.database,
                   SECONDS=f"{seconds:g}", WARMUP=str(params["warmup_requests"]),
                   MAX_REQUESTS=str(params["max_requests"]),
                   HARD_TIMEOUT_MS=str(int((_STARTUP_TIMEOUT_S + seconds + 30) * 1000)))
        self.process = subprocess.Popen([client["node"], str(SCRIPT)], env=env, cwd=SCRIPT.parent,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True)
        self.reported = False

    def _line(self) -> str:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()  # bounded: the script exits by itself after HARD_TIMEOUT_MS
        if not line:
            raise RuntimeError(f"node exited ({self.process.wait(10)}): {self._stderr()}")
        return line.strip()

    def _stderr(self) -> str:
        assert self.process.stderr is not None
        return self.process.stderr.read()[-1500:].strip()

    def wait_warm(self) -> None:
        line = self._line()
        if line != "warm":
            raise RuntimeError(f"unexpected output from node: {line[:200]}")

    def measure(self) -> dict[str, Any]:
        assert self.process.stdin is not None
        self.process.stdin.write("go\n")
        self.process.stdin.close()
        output = dict(json.loads(self._line()))
        self.reported = True
        return output

    def cpu_seconds(self) -> float | None:
        try:
            times = psutil.Process(self.process.pid).cpu_times()
        except psutil.Error:
            return None
        return times.user + times.system

    def close(self) -> None:
        """Let a script that reported exit by itself (it ends its sessions); stop one that failed now."""
        try:
            self.process.wait(10 if self.reported else 0.1)
        except subprocess.TimeoutExpired:
            self.process.kill()  # by pid: only the process this unit started
            self.process.wait(10)
        for stream in (self.process.stdin, self.process.stdout, self.process.stderr):
            if stream is not None:
                stream.close()


def _charge_client(cpu: dict[str, Any], client_s: float | None) -> None:
    """Count the node client's CPU as a client program's, not as someone else's (it is not reaped yet)."""
    if client_s is None:
        return
    cpu["client_programs_s"] = round((cpu.get("client_programs_s") or 0.0) + client_s, 4)
    cpu["other_s"] = round(max(0.0, (cpu.get("other_s") or 0.0) - client_s), 4)
    if cpu.get("other_share") is not None and cpu.get("wall_s"):
        cpu["other_share"] = round(cpu["other_s"] / (cpu["wall_s"] * (psutil.cpu_count() or 1)), 4)


class Edge(Scenario):
    name = "edge"
    title = "Edge runtimes: the Neon serverless driver over HTTP and WebSocket vs TCP through pgmux"
    description = ("pgmux only (direct PostgreSQL and PgBouncer have no HTTP/WebSocket front end): pgmux with a "
                   "plain-HTTP listener on loopback beside its TCP one. One node process per mode sends `SELECT 1` "
                   "back to back, one request at a time, timing each: *HTTP* - the Neon serverless driver's "
                   "`neon()` (one POST /sql per query; node's fetch keeps its connection), *WebSocket session* - "
                   "the driver's `Client` connected once, *WebSocket connect* - a new `Client` per request "
                   "(connect, login, query, end), against node-postgres over TCP: connect + query + close (the "
                   "baseline) and a query on an open connection. Two diagnostic rows repeat the WebSocket paths with "
                   "the driver's `coalesceWrites` off: by default it sends each burst of writes after a "
                   "`setTimeout(0)`, at least 1 ms in node, so the difference is the client's timer, not pgmux. The same user and password everywhere: over TCP "
                   "pgmux asks for SCRAM (PBKDF2 in the client on every login), the driver sends its password in "
                   "cleartext unasked (pipelineConnect), and POST /sql checks it once per 60 s: what users of each "
                   "path get. Ratios divide by the TCP rows of the same run.")
    interleaved = True
    http_listener = True

    def missing(self, env: BenchEnv) -> str | None:
        return node_client()[1]

    def params(self, cfg: RunConfig, env: BenchEnv) -> dict[str, Any]:
        rounds = 1 if cfg.quick else 3
        client, reason = node_client()
        return {"modes": list(MODES), "query": "SELECT 1", "rounds": rounds,
                "seconds_per_unit": 0.5 if cfg.quick else max(0.5, cfg.duration / rounds),
                "warmup_requests": 10 if cfg.quick else 50, "max_requests": 200_000,
                "client": ({"node": client["node_version"], **client["packages"]} if client else reason)}

    def units(self, params: dict[str, Any]) -> list[Any]:
        return [(round_, mode) for round_ in range(params["rounds"]) for mode in params["modes"]]

    def run_unit(self, cfg: RunConfig, env: BenchEnv, target: Target, params: dict[str, Any], unit: Any) -> Result:
        _round, mode = unit
        client, reason = node_client()
        if client is None:
            raise RuntimeError(reason)
        cfg.log(f"  {target.name}: {mode} for {params['seconds_per_unit']:g}s")
        meter = measured(env, target)
        runner = EdgeUnit(client, target, mode, params)
        try:
            runner.wait_warm()
            node_before, before = runner.cpu_seconds(), meter.snapshot()
            output = runner.measure()
            after, node_after = meter.snapshot(), runner.cpu_seconds()
        finally:
            runner.close()
        cpu: dict[str, Any] = dict(CpuMeter.delta(before, after))
        client_s = None if node_before is None or node_after is None else node_after - node_before
        _charge_client(cpu, client_s)
        samples: list[float] = output["samples_ms"]
        errors: dict[str, int] = output["errors"]
        result: Result = {
            "status": "ok" if samples and not errors else ("error" if not samples else "partial"),
            "requests": len(samples), "errors": errors, "samples_ms": samples, "cpu": cpu,
        }
        if not samples:
            result["error"] = f"no request succeeded: {errors}"
        return check_pooler(target, result)

    def combine(self, target: Target | None, measured_units: list[tuple[Any, Result]],
                params: dict[str, Any]) -> Result:
        grouped: dict[str, list[Result]] = {}
        for (_round, mode), result in measured_units:
            grouped.setdefault(mode, []).append(result)
        return summarize_units({"modes": {mode: _merge(results) for mode, results in grouped.items()}},
                               measured_units)


def _merge(results: list[Result]) -> Result:
    """One mode's rounds: percentiles over all their samples (more samples than one round: a steadier p99)."""
    rounds = [result.pop("samples_ms", []) for result in results]
    samples = [sample for round_samples in rounds for sample in round_samples]
    good = [result for result in results if result.get("status") in ("ok", "partial")]
    errors: Counter[str] = Counter()
    for result in results:
        errors.update(result.get("errors") or {})
    cpu: dict[str, Any] = {}
    for result in good:
        for key, value in result["cpu"].items():
            if key == "other_share":
                shares = [v for v in (cpu.get(key), value) if v is not None]
                cpu[key] = max(shares) if shares else None
            else:
                cpu[key] = None if value is None or (key in cpu and cpu[key] is None) else round(
                    (cpu.get(key) or 0.0) + value, 4)
    stats = percentiles(samples, (50, 90, 99, 99.9))
    merged: Result = {
        "status": "ok" if samples and len(good) == len(results) and not errors else (
            "partial" if samples else "error"),
        "requests": len(samples),
        "rounds": len(good),
        "errors": dict(errors),
        "latency_ms": {key: round(value, 3) for key, value in stats.items()},
        "round_p50s_ms": [round(percentiles(round_samples, (50,))["p50"], 3) for round_samples in rounds
                          if round_samples],
        "latency_cdf_ms": cdf_points(samples),
        "cpu": cpu,
        "pooler_cpu_us_per_request": per_unit_us(cpu.get("pooler_s"), len(samples)),
        "client_cpu_us_per_request": per_unit_us(cpu.get("client_programs_s"), len(samples)),
    }
    if not samples:
        merged["error"] = next((r.get("error") for r in results if r.get("error")), "no samples")
    return merged
