"""Totals and averages in PgBouncer's units, kept per database across dropped pools; no counter read as a silent 0."""

from __future__ import annotations

import pytest

from proxy.metrics import _POOL_COUNTERS, stat
from proxy.stats import TOTALS_FIELDS, DatabaseTotals, PoolStats, StatsWindow, Totals, sum_totals


def _stats(xacts: int = 0, queries: int = 0, xact_time: float = 0.0, binds: int = 0) -> PoolStats:
    stats = PoolStats()
    stats.xacts = xacts
    stats.queries = queries
    stats.xact_time = xact_time
    stats.prepared.binds = binds
    return stats


def test_totals_count_pool_counters_in_pgbouncers_units() -> None:
    totals = Totals()
    totals.add_pool(_stats(xacts=3, queries=5, xact_time=0.25, binds=7))
    assert (totals.xact_count, totals.query_count, totals.xact_time, totals.bind_count) == (3, 5, 250_000, 7)
    assert len(totals.values()) == len(TOTALS_FIELDS)
    assert totals.values()[TOTALS_FIELDS.index("bind_count")] == 7


def test_a_dropped_pools_counts_stay_in_its_databases_totals() -> None:
    ledger = DatabaseTotals()
    ledger.retire("b", _stats(xacts=10))
    live = ledger.by_database([("a", _stats(xacts=1)), ("b", _stats(xacts=2)), ("a", _stats(xacts=4))])
    assert list(live) == ["a", "b"]  # by name
    assert (live["a"].xact_count, live["b"].xact_count) == (5, 12)
    # A database whose every pool was dropped keeps its totals too; reading them changes nothing.
    assert ledger.by_database([])["b"].xact_count == 10
    assert ledger.by_database([])["b"].xact_count == 10


def test_averages_are_rates_per_second_and_times_per_transaction() -> None:
    window = StatsWindow()
    older = Totals()
    older.add_pool(_stats(xacts=10, queries=20, xact_time=1.0))
    newer = Totals()
    newer.add_pool(_stats(xacts=30, queries=60, xact_time=3.0))
    window.tick({"a": older}, now=100.0)
    overall = window.tick({"a": newer}, now=110.0)
    assert (overall.xact_count, overall.query_count) == (2, 4)  # per second
    assert overall.xact_time == 100_000  # 2 s over 20 transactions, in microseconds
    assert window.averages("a").xact_count == 2 and window.averages("gone").xact_count == 0
    assert sum_totals([newer, older]).xact_count == 40


def test_every_exported_counter_reads_a_field_that_exists() -> None:
    stats = PoolStats()
    for path in _POOL_COUNTERS.values():
        assert stat(stats, path) == 0


def test_a_counter_missing_from_the_pool_stats_is_an_error_not_a_zero() -> None:
    with pytest.raises(AttributeError):
        stat(PoolStats(), "prepared.no_such_counter")
