"""The benchmark report's TLS row (issue 17): poolers compared, direct marked as having no TLS, the ratio checked."""

from __future__ import annotations

from typing import Any

from benchmarks.report import markdown, ratio_table, targets_check
from benchmarks.targets import DIRECT_NO_TLS


def _connect_run(tps: float, cpu_us: float) -> dict[str, Any]:
    return {"status": "ok", "tps": tps, "pooler_cpu_us_per_txn": cpu_us, "pooler_kernel_us_per_txn": cpu_us / 3}


def _results(pgmux_tls_tps: float) -> dict[str, Any]:
    return {"scenarios": {
        "connect_trust": {"title": "trust", "results": {
            "direct": {"status": "ok", "tps": 500.0},
            "pgmux": _connect_run(7000.0, 90.0), "pgbouncer": _connect_run(11000.0, 40.0)}},
        "connect_tls": {"title": "tls", "results": {
            "direct": {"status": "unavailable", "reason": DIRECT_NO_TLS},
            "pgmux": _connect_run(pgmux_tls_tps, 250.0), "pgbouncer": _connect_run(2000.0, 160.0)}},
    }}


def _tps_goal(results: dict[str, Any]) -> dict[str, Any]:
    return next(check for check in targets_check(results) if check["goal"].startswith("pgbench -S -C over TLS"))


def _row(results: dict[str, Any], metric: str) -> dict[str, Any]:
    return next(row for row in ratio_table(results) if row["metric"] == metric)


def test_tls_row_compares_the_poolers_and_says_direct_has_no_tls() -> None:
    row = _row(_results(1700.0), "connect_tls.tps")

    assert row["direct"] == "no TLS"
    assert (row["pgmux"], row["pgbouncer"], row["pgmux/pgbouncer"]) == (1700.0, 2000.0, 0.85)
    assert row["pgmux/direct"] is None


def test_tls_cpu_rows_give_cpu_per_connection_and_what_tls_adds_to_a_plain_connection() -> None:
    results = _results(1700.0)

    assert _row(results, "cpu.connect_tls")["pgmux"] == 250.0
    extra = _row(results, "cpu.tls_handshake")
    assert (extra["pgmux"], extra["pgbouncer"], extra["direct"]) == (160.0, 120.0, None)


def test_issue_17_goal_is_met_at_0_8_of_pgbouncer_tps_and_not_below() -> None:
    assert _tps_goal(_results(1600.0))["met"] is True
    assert _tps_goal(_results(1590.0))["met"] is False
    assert "0.795×" in _tps_goal(_results(1590.0))["measured"]


def test_issue_17_goal_is_unknown_when_a_pooler_failed() -> None:
    results = _results(1700.0)
    results["scenarios"]["connect_tls"]["results"]["pgbouncer"] = {"status": "error", "error": "handshake"}

    checks = [check for check in targets_check(results) if "issue 17" in check["goal"]]
    assert len(checks) == 2 and all(check["met"] is None for check in checks)


def test_issue_17_handshake_rate_per_pooler_cpu_second_is_checked_as_well_as_tps() -> None:
    # pgmux 250 µs of CPU per TLS connection vs PgBouncer's 160: 0.64x the connections per CPU-second.
    check = next(check for check in targets_check(_results(1700.0)) if check["goal"].startswith("TLS connections"))

    assert check["met"] is False
    assert check["measured"].startswith("0.640×")


def test_tls_goal_says_when_pgbench_used_most_of_the_machine() -> None:
    results = _results(1700.0)
    results["scenarios"]["connect_tls"]["results"]["pgmux"]["cpu"] = {"client_programs_s": 7.2, "wall_s": 8.0}

    note = _tps_goal(results)["note"]
    assert "0.9 CPU-seconds per second (libpq's own TLS handshake on every connection): client-bound" in note


def test_markdown_report_shows_the_tls_row_and_its_goal() -> None:
    results = _results(1700.0)
    results["ratios"], results["targets_check"] = ratio_table(results), targets_check(results)

    text = markdown(results, None)
    assert "| pgbench -S -C over TLS, trust login (tps) | higher | no TLS | 1,700 | 2,000 | 0.85× | — |" in text
    assert "pgmux ≥ 0.8× PgBouncer (issue 17) | 0.850× (1,700 vs 2,000 tps) | yes |" in text
