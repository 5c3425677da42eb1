"""Counters and histograms the hot path bumps and /metrics reads; the totals and averages of SHOW STATS."""

from __future__ import annotations

import collections
import math
import time
from collections.abc import Iterable
from typing import Final

# 100 µs to 30 s, roughly ×2.5 per step: resolves pooler overhead and minute-long stalls alike.
LATENCY_BUCKETS: tuple[float, ...] = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)

_NATIVE_BUCKETS: Final = 8  # the buckets Histogram counts in fields of its own


class Histogram:
    """Cumulative-at-read histogram: ``observe`` is a few native comparisons and additions, no locks, no labels.

    The first eight buckets (up to 10 ms with the default bounds: transactions and waits, even with clients
    queueing for a busy pool) are native fields; the rest a list. Compiled, a tuple's float is unboxed at each
    comparison, and a list's count past 256 is a new int object at each addition: observing cost about 450
    instructions that way, twice per transaction; with four native buckets (up to 1 ms), pgbench -c 50's
    waits and transactions still paid ~280 per transaction in that slow path.
    """

    __slots__ = ("bounds", "counts", "sum", "count", "_b0", "_b1", "_b2", "_b3", "_b4", "_b5", "_b6", "_b7",
                 "_c0", "_c1", "_c2", "_c3", "_c4", "_c5", "_c6", "_c7")

    def __init__(self, bounds: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last slot is +Inf; the first eight are counted in _c0.._c7
        self.sum = 0.0
        self.count = 0
        # A missing bound (fewer than eight) is -inf: no observation is at or below it.
        padded = (*bounds, *(-math.inf,) * _NATIVE_BUCKETS)
        self._b0, self._b1, self._b2, self._b3 = padded[0], padded[1], padded[2], padded[3]
        self._b4, self._b5, self._b6, self._b7 = padded[4], padded[5], padded[6], padded[7]
        self._c0 = self._c1 = self._c2 = self._c3 = self._c4 = self._c5 = self._c6 = self._c7 = 0

    def observe(self, value: float) -> None:
        self.sum += value
        self.count += 1
        if value <= self._b0:
            self._c0 += 1
        elif value <= self._b1:
            self._c1 += 1
        elif value <= self._b2:
            self._c2 += 1
        elif value <= self._b3:
            self._c3 += 1
        elif value <= self._b4:
            self._c4 += 1
        elif value <= self._b5:
            self._c5 += 1
        elif value <= self._b6:
            self._c6 += 1
        elif value <= self._b7:
            self._c7 += 1
        else:
            self._observe_slow(value)

    def _observe_slow(self, value: float) -> None:
        """Past the native buckets: a walk from the ninth bound (or from the last native one there is)."""
        bounds = self.bounds
        last = len(bounds)
        index = _NATIVE_BUCKETS if last > _NATIVE_BUCKETS else last
        while index < last and bounds[index] < value:
            index += 1
        # Read, add, store: compiled, ``counts[index] += 1`` is a generic in-place add on objects.
        counts = self.counts
        count: int = counts[index]
        counts[index] = count + 1

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, observations at or below it) per bucket, +Inf last, as Prometheus wants."""
        counts = list(self.counts)
        natives = (self._c0, self._c1, self._c2, self._c3, self._c4, self._c5, self._c6, self._c7)
        for index, native in enumerate(natives):
            if index < len(counts) - 1:
                counts[index] += native
        total = 0
        out = []
        for bound, count in zip((*self.bounds, float("inf")), counts):
            total += count
            out.append((bound, total))
        return out


class HttpStats:
    """HTTP /sql requests: how many were answered with each status, and how long each took."""

    __slots__ = ("by_status", "duration")

    def __init__(self) -> None:
        self.by_status: collections.Counter[str] = collections.Counter()
        self.duration = Histogram()

    def observe(self, status: int, seconds: float) -> None:
        self.by_status[str(status)] += 1
        self.duration.observe(seconds)


class PreparedCounters:
    """Named prepared statements in transaction mode, per pool."""

    __slots__ = ("client_parses", "server_parses", "binds", "hits", "misses", "evictions")

    def __init__(self) -> None:
        self.client_parses = 0  # named statements clients prepared (PgBouncer's total_client_parse_count)
        self.server_parses = 0  # Parses of pgmux's statements sent to servers (PgBouncer's total_server_parse_count)
        self.binds = 0  # Binds of named statements passed on (PgBouncer's total_bind_count)
        self.hits = 0  # a Bind/Describe found its statement on the linked server
        self.misses = 0  # pgmux injected a Parse first
        self.evictions = 0  # statements closed on a server to stay within max_prepared_statements


class PoolStats:
    """The running totals of one pool (PgBouncer's SHOW STATS columns and more)."""

    __slots__ = ("xacts", "queries", "bytes_received", "bytes_sent", "wait_time", "xact_time",
                 "server_assignments", "server_connects", "server_connect_failures", "cancels_forwarded",
                 "wait_histogram", "xact_histogram", "prepared", "query_time", "client_logins",
                 "servers_yielded")

    def __init__(self) -> None:
        self.xacts = 0  # transactions completed (transaction mode: server releases)
        self.queries = 0  # requests answered: Query, Sync and FunctionCall messages
        self.bytes_received = 0  # from clients
        self.bytes_sent = 0  # to clients
        self.wait_time = 0.0  # seconds clients spent waiting for a server
        self.xact_time = 0.0  # seconds servers spent linked to a client
        self.server_assignments = 0
        self.server_connects = 0
        self.server_connect_failures = 0
        self.cancels_forwarded = 0
        self.wait_histogram = Histogram()
        self.xact_histogram = Histogram()
        self.prepared = PreparedCounters()
        self.query_time = 0.0  # seconds from a request's send to its ReadyForQuery
        self.client_logins = 0
        self.servers_yielded = 0  # backends closed for another worker's waiting clients (workers = N: Pool.lend)


# ---- PgBouncer-style totals and per-period averages (SHOW STATS, the "stats:" log line) ----------

# The Totals fields, in SHOW STATS_TOTALS' column order.
TOTALS_FIELDS: Final = ("server_assignment_count", "xact_count", "query_count", "received", "sent", "xact_time",
                        "query_time", "wait_time", "client_parse_count", "server_parse_count", "bind_count",
                        "client_login_count")
# Averaged per second; the times are averaged per transaction, query or assignment instead.
_RATES: Final = ("server_assignment_count", "xact_count", "query_count", "received", "sent", "client_parse_count",
                 "server_parse_count", "bind_count", "client_login_count")


class Totals:
    """Running totals of one database (or all), in PgBouncer's units: counts, bytes, microseconds."""

    def __init__(self) -> None:
        self.server_assignment_count = 0
        self.xact_count = 0
        self.query_count = 0
        self.received = 0
        self.sent = 0
        self.xact_time = 0
        self.query_time = 0
        self.wait_time = 0
        self.client_parse_count = 0
        self.server_parse_count = 0
        self.bind_count = 0
        self.client_login_count = 0

    def add_pool(self, s: PoolStats) -> None:
        """Count in one pool's running totals."""
        self.server_assignment_count += s.server_assignments
        self.xact_count += s.xacts
        self.query_count += s.queries
        self.received += s.bytes_received
        self.sent += s.bytes_sent
        self.xact_time += int(s.xact_time * 1e6)
        self.query_time += int(s.query_time * 1e6)
        self.wait_time += int(s.wait_time * 1e6)
        self.client_parse_count += s.prepared.client_parses
        self.server_parse_count += s.prepared.server_parses
        self.bind_count += s.prepared.binds
        self.client_login_count += s.client_logins

    def add(self, other: Totals) -> None:
        for name in TOTALS_FIELDS:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def values(self) -> list[int]:
        """The fields in TOTALS_FIELDS' order."""
        return [getattr(self, name) for name in TOTALS_FIELDS]

    def averages_since(self, older: Totals, seconds: float) -> Totals:
        """PgBouncer's averages: counts and bytes per second; times per transaction, query or assignment."""
        avg = Totals()
        if seconds <= 0:
            return avg
        for name in _RATES:
            setattr(avg, name, int((getattr(self, name) - getattr(older, name)) / seconds))
        xacts = self.xact_count - older.xact_count
        queries = self.query_count - older.query_count
        assignments = self.server_assignment_count - older.server_assignment_count
        avg.xact_time = (self.xact_time - older.xact_time) // xacts if xacts > 0 else 0
        avg.query_time = (self.query_time - older.query_time) // queries if queries > 0 else 0
        avg.wait_time = (self.wait_time - older.wait_time) // assignments if assignments > 0 else 0
        return avg


def sum_totals(items: Iterable[Totals]) -> Totals:
    total = Totals()
    for item in items:
        total.add(item)
    return total


class DatabaseTotals:
    """Each database's running totals since start: its pools' counters, and those of its pools already dropped."""

    def __init__(self) -> None:
        self._retired: dict[str, Totals] = {}  # by database: the counters of pools dropped as unused

    def retire(self, database: str, stats: PoolStats) -> None:
        """A pool of ``database`` is dropped: its counts stay, so that totals and averages never go backwards."""
        retired = self._retired.get(database)
        if retired is None:
            retired = self._retired[database] = Totals()
        retired.add_pool(stats)

    def by_database(self, pools: Iterable[tuple[str, PoolStats]]) -> dict[str, Totals]:
        """Totals per database, by name, from the (database, counters) of every live pool."""
        totals: dict[str, Totals] = {}
        for database, stats in pools:
            current = totals.get(database)
            if current is None:
                current = totals[database] = Totals()
            current.add_pool(stats)
        for database, retired in self._retired.items():
            current = totals.get(database)
            if current is None:
                current = totals[database] = Totals()
            current.add(retired)
        return dict(sorted(totals.items()))


class StatsWindow:
    """The totals at the last two stats_period ticks; the averages are taken between them."""

    def __init__(self) -> None:
        self._older: dict[str, Totals] = {}
        self._newer: dict[str, Totals] = {}
        self._older_at = self._newer_at = time.monotonic()

    def tick(self, current: dict[str, Totals], now: float) -> Totals:
        """Record the totals now; returns the averages over all databases for the period just ended."""
        self._older, self._older_at = self._newer, self._newer_at
        self._newer, self._newer_at = current, now
        return self.averages(None)

    def averages(self, database: str | None) -> Totals:
        """Averages of one database (None: all) over the last complete period."""
        if database is None:
            newer = sum_totals(self._newer.values())
            older = sum_totals(self._older.values())
        else:
            newer = self._newer.get(database, Totals())
            older = self._older.get(database, Totals())
        return newer.averages_since(older, self._newer_at - self._older_at)


def stats_log_line(avg: Totals) -> str:
    """PgBouncer's periodic line, with pgmux's numbers."""
    return (f"stats: {avg.xact_count} xacts/s, {avg.query_count} queries/s, {avg.client_login_count} client logins/s, "
            f"in {avg.received} B/s, out {avg.sent} B/s, xact {avg.xact_time} us, query {avg.query_time} us, "
            f"wait {avg.wait_time} us")
