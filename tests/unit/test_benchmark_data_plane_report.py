"""The benchmark report's issue-19 goals: each short throughput goal says where each pooler's CPU went."""

from __future__ import annotations

from typing import Any

from benchmarks.report import markdown, ratio_table, targets_check


def _steady_run(mode: str, clients: int, tps: float, cpu_us: float, kernel_us: float) -> dict[str, Any]:
    return {"status": "ok", "mode": mode, "clients": clients, "tps": tps, "pooler_cpu_us_per_txn": cpu_us,
            "pooler_kernel_us_per_txn": kernel_us}


def _results(pgmux_c10_tps: float, pgmux_c10_cpu: float) -> dict[str, Any]:
    def runs(target: str) -> list[dict[str, Any]]:
        if target == "pgmux":
            return [_steady_run("simple", 10, pgmux_c10_tps, pgmux_c10_cpu, 9.5),
                    _steady_run("simple", 50, 30_000.0, 13.0, 10.5)]
        return [_steady_run("simple", 10, 40_000.0, 10.0, 9.0), _steady_run("simple", 50, 32_000.0, 12.0, 10.5)]

    return {"scenarios": {
        "steady": {"params": {"modes": ["simple"], "clients": [10, 50]},
                   "results": {target: {"runs": runs(target)} for target in ("pgmux", "pgbouncer")}},
        "connect_trust": {"results": {
            "direct": {"status": "ok", "tps": 800.0},
            "pgmux": {"status": "ok", "tps": 10_000.0, "pooler_cpu_us_per_txn": 52.0, "pooler_kernel_us_per_txn": 32.0},
            "pgbouncer": {"status": "ok", "tps": 12_000.0, "pooler_cpu_us_per_txn": 34.0,
                          "pooler_kernel_us_per_txn": 30.0}}},
        "latency": {"results": {target: {"placements": {"one_core": {"simple": {"latency_us": {"p50": p50}}}}}
                                for target, p50 in (("direct", 14.0), ("pgmux", 26.0), ("pgbouncer", 23.0))}},
        "idle": {"results": {"pgmux": {"status": "ok", "connected": 10_000, "rss_mb": 60.0,
                                       "memory_per_client_kb": 1.24},
                             "pgbouncer": {"status": "ok", "connected": 10_000, "rss_mb": 16.0,
                                           "memory_per_client_kb": 0.81}}},
    }}


def _goal(results: dict[str, Any], start: str) -> dict[str, Any]:
    return next(check for check in targets_check(results) if check["goal"].startswith(start))


def test_throughput_is_checked_at_ten_and_fifty_clients_against_1_05_times_pgbouncer() -> None:
    assert _goal(_results(42_000.0, 11.0), "pgbench -S -M simple -c 10: pgmux ≥ 1.05×")["met"] is True
    short = _goal(_results(41_000.0, 11.0), "pgbench -S -M simple -c 10: pgmux ≥ 1.05×")
    assert short["met"] is False and short["measured"].startswith("1.025×")
    assert _goal(_results(42_000.0, 11.0), "pgbench -S -M simple -c 50: pgmux ≥ 1.05×")["met"] is False


def test_a_short_throughput_goal_says_each_poolers_cpu_in_user_space_and_in_the_kernel() -> None:
    note = _goal(_results(38_000.0, 11.5), "pgbench -S -M simple -c 10: pgmux ≥ 1.05×")["note"]

    assert note == "pooler CPU 11.50 vs 10.00 µs: user space 2.00 vs 1.00, kernel 9.50 vs 9.00"


def test_pooler_cpu_per_transaction_must_not_exceed_pgbouncers() -> None:
    assert _goal(_results(40_000.0, 10.0), "pgbench -S -M simple -c 10: pooler CPU")["met"] is True
    over = _goal(_results(40_000.0, 11.5), "pgbench -S -M simple -c 10: pooler CPU")
    assert over["met"] is False and over["measured"].startswith("1.15× (pooler CPU 11.50 vs 10.00 µs")


def test_the_trust_login_goal_says_where_each_poolers_cpu_per_login_went() -> None:
    goal = _goal(_results(40_000.0, 10.0), "pgbench -S -C, trust login: pgmux ≥ 1.0× PgBouncer")

    assert goal["met"] is False
    assert "per login, pooler CPU 52.00 vs 34.00 µs: user space 20.00 vs 4.00, kernel 32.00 vs 30.00" in goal["note"]


def test_added_latency_is_held_to_pgbouncers_plus_five_microseconds() -> None:
    goal = _goal(_results(40_000.0, 10.0), "added p50 latency on an open connection (simple, one core): ≤ PgBouncer")

    assert (goal["measured"], goal["met"]) == ("+3.0 µs beyond PgBouncer's", True)


def test_idle_memory_is_held_to_two_kib_per_client_at_ten_thousand_clients() -> None:
    results = _results(40_000.0, 10.0)
    assert _goal(results, "10,000 idle clients: ≤ 2 KiB")["met"] is True
    results["scenarios"]["idle"]["results"]["pgmux"]["memory_per_client_kb"] = 2.5
    assert _goal(results, "10,000 idle clients: ≤ 2 KiB")["met"] is False
    results["scenarios"]["idle"]["results"]["pgmux"]["connected"] = 500
    assert _goal(results, "10,000 idle clients: ≤ 2 KiB")["met"] is None


def test_the_report_lists_cpu_per_transaction_at_both_client_counts_and_the_issue_19_goals() -> None:
    results = _results(38_000.0, 11.5)
    results["ratios"], results["targets_check"] = ratio_table(results), targets_check(results)

    text = markdown(results, None)
    assert "| pooler CPU per txn, -M simple -c 10 (µs) | lower | — | 11.50 | 10.00 | 1.15× | — |" in text
    assert "| pooler CPU per txn in the kernel, -M simple -c 50 (µs) | lower | — | 10.50 | 10.50 | 1.00× | — |" in text
    assert "## Issue targets (issue 7; TLS: issue 17; compiled data plane: issue 19)" in text
    assert ("| pgbench -S -M simple -c 10: pgmux ≥ 1.05× PgBouncer tps (issue 19) | 0.950× (38,000 vs 40,000 tps) "
            "| **no** | pooler CPU 11.50 vs 10.00 µs: user space 2.00 vs 1.00, kernel 9.50 vs 9.00 |") in text
