"""`python -m benchmarks --quick` runs end to end and writes a report that parses (no timing assertions).

The harness starts its own embedded PostgreSQL, pgmux and (when installed) PgBouncer; this test only checks
that it finishes in bounded time, stops every process it started, and that its JSON, Markdown and PNG
outputs have the expected structure. A missing PgBouncer must be reported as unavailable, not faked.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[2]
SCENARIOS = ["serverless", "serverless_trust", "steady", "connect", "connect_trust", "connect_tls", "connect_workers",
             "latency", "edge", "storm", "idle"]
# Scenarios direct PostgreSQL cannot take part in: the embedded build has no OpenSSL.
TLS_SCENARIOS = {"connect_tls"}
# Only pgmux has an HTTP/WebSocket front end; the scenario needs node and the driver's npm packages.
EDGE_SCENARIOS = {"edge"}
# Scenarios that compare pgmux with itself (1 and 2 workers): the other targets are left out, and say why.
PGMUX_ONLY_SCENARIOS = {"connect_workers"}
TARGETS = ["direct", "pgmux", "pgbouncer"]
STATUSES = {"ok", "partial", "error", "timeout", "unavailable", "skipped"}
HARNESS_TIMEOUT_S = 240  # --quick takes ~30 s on 2 cores; generous for a loaded CI machine


def _run_quick(out: Path, *extra: str) -> tuple[subprocess.CompletedProcess[str], dict]:
    env = {key: value for key, value in os.environ.items() if not key.startswith(("PG", "PGMUX_"))}
    try:
        result = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--out", str(out), *extra],
                                cwd=ROOT, env=env, capture_output=True, text=True, timeout=HARNESS_TIMEOUT_S)
    except subprocess.TimeoutExpired as expired:  # subprocess.run has killed it (by pid)
        pytest.fail(f"python -m benchmarks --quick did not finish within {HARNESS_TIMEOUT_S} s\n"
                    f"stderr:\n{expired.stderr}")
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    stamped = [path for path in out.glob("*.json") if not path.name.startswith("latest")]
    assert len(stamped) == 1, sorted(path.name for path in out.iterdir())
    report = json.loads(stamped[0].read_text())
    # A quick run refreshes latest-quick.*, never the full run's latest.*.
    assert not (out / "latest.json").exists()
    assert json.loads((out / "latest-quick.json").read_text()) == report
    return result, report


def _assert_stopped(report: dict) -> None:
    started = report["started_processes"]
    assert {entry["name"] for entry in started} >= {"postgres", "pgmux"}, started
    for entry in started:
        pid = entry["pid"]
        if not psutil.pid_exists(pid):
            continue
        try:
            process = psutil.Process(pid)
            leftover = process.status() != psutil.STATUS_ZOMBIE and entry["name"] in " ".join(process.cmdline())
        except psutil.NoSuchProcess:
            continue
        assert not leftover, f"{entry['name']} (pid {pid}) is still running after the harness exited"


def _assert_edge_rows(report: dict, markdown: str) -> None:
    """With node and the driver's packages, every edge path was measured and compared with the TCP baselines."""
    pgmux = report["scenarios"]["edge"]["results"]["pgmux"]
    assert "## Edge runtimes" in markdown
    if pgmux["status"] == "unavailable":
        assert report["edge"] == [] and pgmux["reason"] in markdown
        return
    assert pgmux["status"] == "ok", pgmux
    assert set(pgmux["modes"]) == {"tcp_connect", "http", "ws_connect", "tcp_query", "ws_query",
                                   "ws_connect_uncoalesced", "ws_query_uncoalesced"}
    for mode, data in pgmux["modes"].items():
        assert data["requests"] > 0 and {"p50", "p99"} <= set(data["latency_ms"]), (mode, data)
    rows = {row["mode"]: row for row in report["edge"]}
    assert set(rows) == set(pgmux["modes"])
    assert rows["tcp_connect"]["p50/tcp_connect"] == 1.0 and rows["tcp_query"]["p99/tcp_query"] == 1.0
    for row in rows.values():
        assert row["p50_ms"] > 0 and row["p99_ms"] >= row["p50_ms"], row
        assert row["p50/tcp_connect"] > 0 and row["p99/tcp_query"] > 0, row
        assert row["label"] in markdown


@pytest.mark.slow
@pytest.mark.timeout(HARNESS_TIMEOUT_S + 60)
def test_quick_benchmark_writes_a_report_with_every_scenario_and_target(tmp_path: Path) -> None:
    _result, report = _run_quick(tmp_path)

    assert report["schema_version"] == 1
    assert report["config"]["quick"] is True
    assert report["interrupted"] is False
    for key in ("cpu_model", "cpus", "memory_gb", "kernel", "python"):
        assert key in report["machine"]
    assert report["versions"]["postgres"]
    _assert_stopped(report)

    assert list(report["scenarios"]) == SCENARIOS
    for name, entry in report["scenarios"].items():
        assert entry["title"] and entry["description"] and isinstance(entry["params"], dict), name
        assert list(entry["results"]) == TARGETS, name
        for target, result in entry["results"].items():
            assert result["status"] in STATUSES, (name, target, result)
        direct = entry["results"]["direct"]
        if name in TLS_SCENARIOS:  # left out, and the report says why
            assert direct["status"] == "unavailable" and "no TLS" in direct["reason"], (name, direct)
        elif name in EDGE_SCENARIOS:  # left out with PgBouncer, and the report says why
            for other in ("direct", "pgbouncer"):
                other_result = entry["results"][other]
                assert other_result["status"] == "unavailable", (name, other, other_result)
                assert "no HTTP/WebSocket front end" in other_result["reason"], (name, other, other_result)
        elif name in PGMUX_ONLY_SCENARIOS:
            assert direct["status"] == "unavailable" and "pgmux only" in direct["reason"], (name, direct)
            assert set(entry["results"]["pgmux"]["workers"]) == {"1", "2"}, entry["results"]["pgmux"]
        else:  # the harness itself works: every other scenario measures PostgreSQL directly
            assert direct["status"] in {"ok", "partial"}, (name, direct)
        pgmux = entry["results"]["pgmux"]
        if name in EDGE_SCENARIOS and pgmux["status"] == "unavailable":  # no node here: said so, not faked
            assert "node" in pgmux["reason"] or "npm" in pgmux["reason"], pgmux
        else:
            assert pgmux["status"] != "unavailable", name

    bouncer = report["targets"]["pgbouncer"]
    if bouncer["available"]:
        assert report["versions"]["pgbouncer"]
    else:  # reported, not faked
        assert bouncer["reason"]
        for entry in report["scenarios"].values():
            assert entry["results"]["pgbouncer"]["status"] == "unavailable"

    steady = report["scenarios"]["steady"]
    for result in steady["results"].values():
        for run in result.get("runs", []):
            assert run["mode"] in ("simple", "extended", "prepared") and run["clients"] in steady["params"]["clients"]
            assert run["status"] in STATUSES
            assert run["status"] != "ok" or run["tps"] > 0
            if run.get("pooler_cpu_us_per_txn") is not None:  # a pooler's CPU, split into its kernel share
                assert 0 <= run["pooler_kernel_us_per_txn"] <= run["pooler_cpu_us_per_txn"]
    direct_latency = report["scenarios"]["latency"]["results"]["direct"]["placements"]
    assert set(direct_latency) == {"free", "one_core"}
    for modes in direct_latency.values():
        assert set(modes) == {"simple", "extended"}
        assert {"p50", "p99"} <= set(modes["simple"]["latency_us"])
    direct_serverless = report["scenarios"]["serverless"]["results"]["direct"]
    for load in ("closed", "fixed_rate"):
        assert direct_serverless[load]["requests"] > 0 and "p99" in direct_serverless[load]["latency_ms"]
    # Both poolers terminate TLS: pgbench with sslmode=require connects through them.
    tls = report["scenarios"]["connect_tls"]
    assert tls["params"]["sslmode"] == "require" and tls["params"]["pgbench"], tls["params"]
    for target in ("pgmux", "pgbouncer") if bouncer["available"] else ("pgmux",):
        assert tls["results"][target]["status"] == "ok" and tls["results"][target]["tps"] > 0, tls["results"][target]
    storm = report["scenarios"]["storm"]["results"]["direct"]
    assert storm["served"] + storm["hung"] + sum(storm["refused_by_sqlstate"].values()) \
        + sum(storm["other_failures"].values()) == storm["clients"]

    _assert_edge_rows(report, (tmp_path / "latest-quick.md").read_text())

    assert report["ratios"], "no ratio rows"
    for row in report["ratios"]:
        assert {"metric", "label", "better", "direct", "pgmux", "pgbouncer", "pgmux/pgbouncer",
                "pgmux/direct"} <= set(row)
        assert row["better"] in ("higher", "lower")
        for key in ("pgmux/pgbouncer", "pgmux/direct"):
            assert row[key] is None or isinstance(row[key], (int, float))
    assert all(check["met"] in (True, False, None) for check in report["targets_check"])

    markdown = (tmp_path / "latest-quick.md").read_text()
    assert "| metric | better | direct | pgmux | PgBouncer | pgmux/PgBouncer | pgmux/direct |" in markdown
    assert "## Issue targets" in markdown
    if "plot_error" not in report:
        assert (tmp_path / "latest-quick.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert "](latest-quick.png)" in markdown


@pytest.mark.timeout(HARNESS_TIMEOUT_S + 60)
def test_missing_pgbouncer_is_reported_as_unavailable_not_faked(tmp_path: Path) -> None:
    _result, report = _run_quick(tmp_path, "--pgbouncer", "none", "--scenarios", "latency")

    assert report["targets"]["pgbouncer"] == {"available": False, "reason": "disabled with --pgbouncer none"}
    assert list(report["scenarios"]) == ["latency"]
    assert report["scenarios"]["latency"]["results"]["pgbouncer"]["status"] == "unavailable"
    assert report["scenarios"]["latency"]["results"]["direct"]["status"] == "ok"
    assert all(not isinstance(row["pgbouncer"], (int, float)) for row in report["ratios"])
    assert "PgBouncer not measured" in (tmp_path / "latest-quick.md").read_text()
    _assert_stopped(report)
