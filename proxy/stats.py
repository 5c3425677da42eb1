"""Plain counters and histograms the hot path bumps; the totals and averages SHOW STATS and the stats line read."""

from __future__ import annotations

import bisect
import time
from collections.abc import Iterable
from dataclasses import dataclass, fields

# 100 µs to 30 s, roughly ×2.5 per step: resolves pooler overhead and minute-long stalls alike.
LATENCY_BUCKETS: tuple[float, ...] = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)


class Histogram:
    """Cumulative-at-read histogram: ``observe`` is one bisect and two additions, no locks, no labels."""

    __slots__ = ("bounds", "counts", "sum", "count")

    def __init__(self, bounds: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last slot is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, observations at or below it) per bucket, +Inf last, as Prometheus wants."""
        total = 0
        out = []
        for bound, count in zip((*self.bounds, float("inf")), self.counts):
            total += count
            out.append((bound, total))
        return out


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
                 "wait_histogram", "xact_histogram", "prepared", "query_time", "client_logins")

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


# ---- PgBouncer-style totals and per-period averages (SHOW STATS, the "stats:" log line) ----------

@dataclass(slots=True)
class Totals:
    """Running totals of one database (or all), in PgBouncer's units: counts, bytes, microseconds."""

    server_assignment_count: int = 0
    xact_count: int = 0
    query_count: int = 0
    received: int = 0
    sent: int = 0
    xact_time: int = 0
    query_time: int = 0
    wait_time: int = 0
    client_parse_count: int = 0
    server_parse_count: int = 0
    bind_count: int = 0
    client_login_count: int = 0

    @classmethod
    def of_stats(cls, pools: Iterable[PoolStats]) -> Totals:
        """The totals of pools, given their statistics."""
        totals = cls()
        for s in pools:
            totals.server_assignment_count += s.server_assignments
            totals.xact_count += s.xacts
            totals.query_count += s.queries
            totals.received += s.bytes_received
            totals.sent += s.bytes_sent
            totals.xact_time += int(s.xact_time * 1e6)
            totals.query_time += int(s.query_time * 1e6)
            totals.wait_time += int(s.wait_time * 1e6)
            totals.client_parse_count += s.prepared.client_parses
            totals.server_parse_count += s.prepared.server_parses
            totals.bind_count += s.prepared.binds
            totals.client_login_count += s.client_logins
        return totals

    def values(self) -> list[int]:
        return [getattr(self, f.name) for f in fields(self)]

    def averages_since(self, older: Totals, seconds: float) -> Totals:
        """PgBouncer's averages: counts and bytes per second; times per transaction, query or assignment."""
        avg = Totals()
        if seconds <= 0:
            return avg
        for name in ("server_assignment_count", "xact_count", "query_count", "received", "sent",
                     "client_parse_count", "server_parse_count", "bind_count", "client_login_count"):
            setattr(avg, name, int((getattr(self, name) - getattr(older, name)) / seconds))
        xacts = self.xact_count - older.xact_count
        queries = self.query_count - older.query_count
        assignments = self.server_assignment_count - older.server_assignment_count
        avg.xact_time = (self.xact_time - older.xact_time) // xacts if xacts > 0 else 0
        avg.query_time = (self.query_time - older.query_time) // queries if queries > 0 else 0
        avg.wait_time = (self.wait_time - older.wait_time) // assignments if assignments > 0 else 0
        return avg


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


def sum_totals(items: Iterable[Totals]) -> Totals:
    total = Totals()
    for item in items:
        for f in fields(Totals):
            setattr(total, f.name, getattr(total, f.name) + getattr(item, f.name))
    return total


def stats_log_line(avg: Totals) -> str:
    """PgBouncer's periodic line, with pgmux's numbers."""
    return (f"stats: {avg.xact_count} xacts/s, {avg.query_count} queries/s, {avg.client_login_count} client logins/s, "
            f"in {avg.received} B/s, out {avg.sent} B/s, xact {avg.xact_time} us, query {avg.query_time} us, "
            f"wait {avg.wait_time} us")
