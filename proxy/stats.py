"""Plain counters and fixed-bucket histograms that the hot path bumps and /metrics and SHOW STATS read."""

from __future__ import annotations

import bisect

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
