"""Metrics: the Prometheus collector that reads live state at scrape time, PgBouncer-style totals and averages, and /metrics, /healthz, /readyz."""

from __future__ import annotations

import asyncio
import collections
import platform
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from proxy import BUILD, __version__
from proxy.client import ClientState
from proxy.logs import get_logger
from proxy.server import ServerState
from proxy.settings import split_address

if TYPE_CHECKING:
    from proxy.app import Proxy
    from proxy.pool import Pool
    from proxy.settings import Upstream

log = get_logger("metrics")

READINESS_PERIOD = 5.0  # seconds between upstream reachability checks
READINESS_TIMEOUT = 3.0  # a TCP connect slower than this counts as unreachable
READINESS_STALE = 3 * READINESS_PERIOD  # an older result no longer proves anything
_MAX_REQUEST_HEAD = 16 * 1024
_REQUEST_TIMEOUT = 10.0

# Every reason a client can be refused or cut off for; each is exported from the start (at 0) so
# that rate() and alerts see the first one. Reasons counted elsewhere appear once they happen.
REJECTION_REASONS = (
    "max_client_conn", "db_client_limit", "user_client_limit", "wait_timeout", "queue_full", "auth_failed",
    "unknown_database", "protocol_error", "shutdown", "upstream_unavailable", "admin_not_allowed",
    "login_timeout", "client_idle_timeout", "idle_transaction_timeout", "server_lost", "internal_error",
    "startup_parameter_refused", "parameter_sync_failed",
)
CLIENT_STATES = ("active", "idle", "waiting", "login")
SERVER_STATES = ("active", "idle", "used", "tested", "login", "closing")
_CLIENT_STATE_NAMES = {ClientState.ACTIVE: "active", ClientState.IDLE: "idle", ClientState.WAITING: "waiting",
                       ClientState.AUTH: "login", ClientState.LOGIN: "login"}
_SERVER_STATE_NAMES = {ServerState.ACTIVE: "active", ServerState.IDLE: "idle", ServerState.LOGIN: "login",
                       ServerState.RESETTING: "tested", ServerState.CLOSING: "closing"}

POOL_LABELS = ("database", "user")

# The catalogue of pgmux's own metrics: name -> (type, help, labels). The collector emits exactly
# these (plus process_* and python_* from prometheus-client); the dashboard and the tests read it.
METRICS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "pgmux_build_info": ("gauge", "pgmux version, Python version and whether the hot path runs compiled (value 1)",
                         ("version", "python_version", "hot_path")),
    "pgmux_ready": ("gauge", "1 when /readyz says ready: listening, not draining, every upstream reachable", ()),
    "pgmux_draining": ("gauge", "1 once shutdown has begun", ()),
    "pgmux_client_connections": ("gauge", "Client sockets open now, in any state (logging in, pooled, admin)", ()),
    "pgmux_max_client_conn": ("gauge", "The max_client_conn limit", ()),
    "pgmux_clients": ("gauge", "Pooled clients by state: active (linked to a server), idle, waiting (for a server), "
                      "login", ("database", "user", "pool_mode", "state")),
    "pgmux_servers": ("gauge", "Server connections by state: active (linked), idle, used, tested (being reset), "
                      "login, closing", ("database", "user", "state")),
    "pgmux_pool_size": ("gauge", "Configured pool_size: servers the pool may hold", POOL_LABELS),
    "pgmux_pool_min_size": ("gauge", "Configured min_pool_size", POOL_LABELS),
    "pgmux_pool_reserve_size": ("gauge", "Configured reserve_pool_size (extra servers after reserve_pool_timeout)",
                                POOL_LABELS),
    "pgmux_pool_maxwait_seconds": ("gauge", "Age of the oldest client waiting for a server (0 when none waits)",
                                   POOL_LABELS),
    "pgmux_database_paused": ("gauge", "1 while the database is paused (admin console PAUSE or KILL)",
                              ("database",)),
    "pgmux_database_max_connections": ("gauge", "max_db_connections for the database (0 = no limit)",
                                       ("database",)),
    "pgmux_database_server_connections": ("gauge", "Server connections the database's pools hold now",
                                          ("database",)),
    "pgmux_client_connections_accepted_total": ("counter", "Client sockets accepted", ()),
    "pgmux_client_rejections_total": ("counter", "Clients refused or cut off by pgmux, by reason", ("reason",)),
    "pgmux_server_connects_total": ("counter", "Server logins that succeeded", POOL_LABELS),
    "pgmux_server_connect_failures_total": ("counter", "Server connects or logins that failed", POOL_LABELS),
    "pgmux_server_assignments_total": ("counter", "Times a server was linked to a client", POOL_LABELS),
    "pgmux_transactions_total": ("counter", "Transactions completed (transaction pooling)", POOL_LABELS),
    "pgmux_queries_total": ("counter", "Requests answered (Query, Sync, FunctionCall)", POOL_LABELS),
    "pgmux_received_bytes_total": ("counter", "Bytes received from clients", POOL_LABELS),
    "pgmux_sent_bytes_total": ("counter", "Bytes sent to clients", POOL_LABELS),
    "pgmux_cancels_forwarded_total": ("counter", "Cancel requests forwarded to a server", POOL_LABELS),
    "pgmux_prepared_statement_hits_total": ("counter", "Prepared statements the linked server already had",
                                            POOL_LABELS),
    "pgmux_prepared_statement_misses_total": ("counter", "Prepared statements pgmux had to Parse on the server",
                                              POOL_LABELS),
    "pgmux_prepared_statement_evictions_total": ("counter", "Server prepared statements closed by the LRU",
                                                 POOL_LABELS),
    "pgmux_client_wait_seconds": ("histogram", "Time a client waited for a server (acquire latency)", POOL_LABELS),
    "pgmux_transaction_duration_seconds": ("histogram", "Time a server stayed linked to a client per transaction",
                                           POOL_LABELS),
}

# The PoolStats field (dotted: an attribute of an attribute) each per-pool counter reads; a field
# that does not exist reads as 0, so a counter is exported before the feature behind it lands.
_POOL_COUNTERS = {
    "pgmux_server_connects_total": "server_connects",
    "pgmux_server_connect_failures_total": "server_connect_failures",
    "pgmux_server_assignments_total": "server_assignments",
    "pgmux_transactions_total": "xacts",
    "pgmux_queries_total": "queries",
    "pgmux_received_bytes_total": "bytes_received",
    "pgmux_sent_bytes_total": "bytes_sent",
    "pgmux_cancels_forwarded_total": "cancels_forwarded",
    "pgmux_prepared_statement_hits_total": "prepared.hits",
    "pgmux_prepared_statement_misses_total": "prepared.misses",
    "pgmux_prepared_statement_evictions_total": "prepared.evictions",
}
_POOL_HISTOGRAMS = {
    "pgmux_client_wait_seconds": "wait_histogram",
    "pgmux_transaction_duration_seconds": "xact_histogram",
}


def exposition_names(name: str) -> tuple[str, ...]:
    """The sample names a catalogue metric shows up as in the text exposition."""
    kind = METRICS[name][0]
    if kind == "histogram":
        return (f"{name}_bucket", f"{name}_sum", f"{name}_count")
    return (name,)


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
    def of_pools(cls, pools: Iterable[Pool]) -> Totals:
        totals = cls()
        for pool in pools:
            s = pool.stats
            totals.server_assignment_count += s.server_assignments
            totals.xact_count += s.xacts
            totals.query_count += s.queries
            totals.received += s.bytes_received
            totals.sent += s.bytes_sent
            totals.xact_time += int(s.xact_time * 1e6)
            totals.query_time += int(stat(s, "query_time") * 1e6)
            totals.wait_time += int(s.wait_time * 1e6)
            totals.client_parse_count += int(stat(s, "client_parses"))
            totals.server_parse_count += int(stat(s, "prepared.misses"))  # Parses pgmux sent to servers
            totals.bind_count += int(stat(s, "binds"))
            totals.client_login_count += int(stat(s, "client_logins"))
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
            newer = _sum(self._newer.values())
            older = _sum(self._older.values())
        else:
            newer = self._newer.get(database, Totals())
            older = self._older.get(database, Totals())
        return newer.averages_since(older, self._newer_at - self._older_at)


def _sum(items: Iterable[Totals]) -> Totals:
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


# ---- the Prometheus collector ------------------------------------------------------------------

def _family(name: str) -> Metric:
    kind, text, labels = METRICS[name]
    if kind == "counter":
        return CounterMetricFamily(name.removesuffix("_total"), text, labels=labels)
    if kind == "histogram":
        return HistogramMetricFamily(name, text, labels=labels)
    return GaugeMetricFamily(name, text, labels=labels)


class PgmuxCollector:
    """Builds every pgmux_* metric from the proxy's objects when Prometheus scrapes; nothing is kept between scrapes."""

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy

    def describe(self) -> Iterator[Metric]:
        return iter(())  # names are dynamic per pool; registering must not run a collection

    def collect(self) -> Iterator[Metric]:
        proxy = self.proxy
        now = time.monotonic()
        # Any: each family kind has its own add_metric signature, chosen by METRICS[name].
        families: dict[str, Any] = {name: _family(name) for name in METRICS}

        def gauge(name: str, value: float, *labels: str) -> None:
            families[name].add_metric(labels, value)

        gauge("pgmux_build_info", 1, __version__, platform.python_version(), "compiled" if BUILD.compiled else "python")
        gauge("pgmux_ready", 1 if proxy.readiness.ready()[0] else 0)
        gauge("pgmux_draining", 1 if proxy.draining else 0)
        gauge("pgmux_client_connections", len(proxy.clients))
        gauge("pgmux_max_client_conn", proxy.settings.max_client_conn)
        families["pgmux_client_connections_accepted_total"].add_metric((), proxy.accepted)
        rejections = collections.Counter({reason: 0 for reason in REJECTION_REASONS})
        rejections.update(proxy.rejections)
        for reason, count in sorted(rejections.items()):
            families["pgmux_client_rejections_total"].add_metric((reason,), count)

        modes = sorted({listener.pool_mode.value for listener in proxy.settings.all_listeners()})
        clients: collections.Counter[tuple[str, str, str, str]] = collections.Counter()
        for pool in proxy.pools.values():
            for mode in modes:
                for state in CLIENT_STATES:
                    clients[(pool.key.database, pool.key.user, mode, state)] = 0
        for client in proxy.clients:
            client_state = _CLIENT_STATE_NAMES.get(client.state)
            if client_state is None or client.pool is None:
                continue
            key = client.pool.key
            clients[(key.database, key.user, client.listener.pool_mode.value, client_state)] += 1
        for client_labels, count in sorted(clients.items()):
            gauge("pgmux_clients", count, *client_labels)

        server_counts: collections.Counter[str] = collections.Counter()
        for pool in sorted(proxy.pools.values(), key=lambda p: (p.key.database, p.key.user)):
            labels = (pool.key.database, pool.key.user)
            by_state = {"active": len(pool.active), "idle": len(pool.idle), "used": 0,
                        "tested": len(pool.resetting), "login": len(pool.login), "closing": len(pool.closing)}
            for state in SERVER_STATES:
                gauge("pgmux_servers", by_state[state], *labels, state)
            server_counts[pool.key.database] += pool.total
            configured = proxy.configured_pool(pool)
            gauge("pgmux_pool_size", configured.pool_size, *labels)
            gauge("pgmux_pool_min_size", configured.min_pool_size, *labels)
            gauge("pgmux_pool_reserve_size", configured.reserve_pool_size, *labels)
            gauge("pgmux_pool_maxwait_seconds", oldest_wait(pool, now), *labels)
            stats = pool.stats
            for name, path in _POOL_COUNTERS.items():
                families[name].add_metric(labels, stat(stats, path))
            for name, attribute in _POOL_HISTOGRAMS.items():
                histogram = getattr(stats, attribute)
                buckets = [(_bound(bound), count) for bound, count in histogram.cumulative()]
                families[name].add_metric(labels, buckets, histogram.sum)

        for database in proxy.database_names():
            gauge("pgmux_database_paused", 1 if proxy.is_paused(database) else 0, database)
            gauge("pgmux_database_max_connections", proxy.database_max_connections(database), database)
            gauge("pgmux_database_server_connections", server_counts[database], database)
        return iter(families.values())


def stat(stats: object, path: str) -> float:
    """``stats.a.b`` for path "a.b"; 0 when any part is missing."""
    value: object = stats
    for part in path.split("."):
        value = getattr(value, part, None)
        if value is None:
            return 0
    return value  # type: ignore[return-value]


def _bound(value: float) -> str:
    return "+Inf" if value == float("inf") else repr(value)


def oldest_wait(pool: Pool, now: float) -> float:
    """Seconds the first client in the pool's line has waited (PgBouncer's maxwait)."""
    return max(0.0, now - pool.waiters[0].since) if pool.waiters else 0.0


def build_registry(proxy: Proxy) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(PgmuxCollector(proxy))
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


# ---- readiness -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Check:
    ok: bool
    detail: str
    at: float


class Readiness:
    """Whether this pgmux should get traffic: listening, not draining, and each upstream took a TCP connect recently.

    The upstream check is a bare TCP (or unix socket) connect every READINESS_PERIOD seconds: no
    login, no query, nothing in PostgreSQL's log. It runs only while the metrics port is served.
    """

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        self.checks: dict[str, _Check] = {}

    async def run(self) -> None:
        while True:
            await self.check_once()
            await asyncio.sleep(READINESS_PERIOD)

    async def check_once(self) -> None:
        upstreams = self.proxy.upstreams()
        results = await asyncio.gather(*(self._probe(upstream) for upstream in upstreams.values()))
        now = time.monotonic()
        self.checks = {name: _Check(ok, detail, now) for name, (ok, detail) in zip(upstreams, results)}

    async def _probe(self, upstream: Upstream) -> tuple[bool, str]:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(READINESS_TIMEOUT):
                if upstream.unix_socket:
                    transport, _ = await loop.create_unix_connection(asyncio.Protocol, upstream.unix_socket)
                else:
                    transport, _ = await loop.create_connection(asyncio.Protocol, upstream.host, upstream.port)
        except TimeoutError:
            return False, f"{upstream.redacted()} did not accept a connection within {READINESS_TIMEOUT:g}s"
        except OSError as exc:
            return False, f"{upstream.redacted()} unreachable: {exc.strerror or exc}"
        transport.close()
        return True, f"{upstream.redacted()} reachable"

    def ready(self) -> tuple[bool, list[str]]:
        """(ready, reasons): the reasons say what is wrong, or what was checked when all is well."""
        proxy = self.proxy
        problems: list[str] = []
        if not proxy.addresses:
            problems.append("not listening yet")
        if proxy.draining:
            problems.append("draining: shutting down")
        now = time.monotonic()
        notes = []
        for name in proxy.upstreams():
            check = self.checks.get(name)
            if check is None:
                problems.append(f"database {name}: upstream not checked yet")
            elif not check.ok:
                problems.append(f"database {name}: {check.detail}")
            elif now - check.at > READINESS_STALE:
                problems.append(f"database {name}: last upstream check is {now - check.at:.0f}s old")
            else:
                notes.append(f"database {name}: {check.detail}")
        return (not problems, problems or notes)


# ---- the HTTP endpoints -------------------------------------------------------------------------

class MetricsServer:
    """/metrics, /healthz and /readyz on metrics_listen, served from pgmux's own event loop (no threads)."""

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        self.registry = build_registry(proxy)
        self.address: tuple[str, int] | None = None
        self._server: asyncio.Server | None = None

    async def start(self, address: str) -> None:
        host, port = split_address(address)
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _HttpConnection(self), host, port, reuse_address=True)
        bound = self._server.sockets[0].getsockname()
        self.address = (bound[0], bound[1])
        log.info("metrics on http://%s:%d/metrics (also /healthz, /readyz)", bound[0], bound[1])

    def close(self) -> None:
        if self._server is not None:
            self._server.close()

    def respond(self, method: str, path: str) -> tuple[int, str, bytes]:
        """(status, content type, body) for one request."""
        if method not in ("GET", "HEAD"):
            return 405, "text/plain; charset=utf-8", b"only GET and HEAD\n"
        if path == "/metrics":
            return 200, CONTENT_TYPE_LATEST, generate_latest(self.registry)
        if path == "/healthz":
            return 200, "text/plain; charset=utf-8", b"ok\n"
        if path == "/readyz":
            ready, reasons = self.proxy.readiness.ready()
            body = ("ready\n" if ready else "not ready\n") + "".join(f"{reason}\n" for reason in reasons)
            return (200 if ready else 503), "text/plain; charset=utf-8", body.encode()
        if path == "/":
            return 200, "text/plain; charset=utf-8", b"pgmux: /metrics /healthz /readyz\n"
        return 404, "text/plain; charset=utf-8", b"not found\n"


_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            431: "Request Header Fields Too Large", 503: "Service Unavailable"}


class _HttpConnection(asyncio.Protocol):
    """One HTTP/1.x request and its answer, then close: all Prometheus and health probes need."""

    def __init__(self, server: MetricsServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.timer = asyncio.get_running_loop().call_later(_REQUEST_TIMEOUT, transport.close)

    def data_received(self, data: bytes) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buffer) > _MAX_REQUEST_HEAD:
                self._send(431, "text/plain; charset=utf-8", b"request head too large\n", head_only=False)
            return
        request_line = bytes(self.buffer[:self.buffer.find(b"\r\n")]).decode("latin-1")
        parts = request_line.split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            self._send(400, "text/plain; charset=utf-8", b"bad request\n", head_only=False)
            return
        method, target = parts[0], parts[1]
        status, content_type, body = self.server.respond(method, target.split("?", 1)[0])
        self._send(status, content_type, body, head_only=method == "HEAD")

    def _send(self, status: int, content_type: str, body: bytes, head_only: bool) -> None:
        assert self.transport is not None
        head = (f"HTTP/1.1 {status} {_REASONS.get(status, '')}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode("latin-1")
        self.transport.write(head if head_only else head + body)
        self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
