"""Metrics: the Prometheus exposition written from live state at scrape time, and /metrics, /healthz, /readyz."""

from __future__ import annotations

import asyncio
import collections
import functools
import platform
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.utils import floatToGoString

from proxy import BUILD, __version__
from proxy.auth.client_auth import FAILURE_KINDS
from proxy.logs import get_logger
from proxy.protocol.sql_words import SESSION_STATE_KINDS
from proxy.registry import TRANSPORTS
from proxy.session_state import PIN_KINDS
from proxy.settings import split_address
from proxy.states import CLIENT_LABELS, CLIENT_NAMES, LOGGING_IN, SERVER_LABELS, SERVER_NAMES
from proxy.tls import TLS_FAILURE_REASONS

if TYPE_CHECKING:
    from proxy.client import ClientConnection
    from proxy.pool import Pool, PoolConfig
    from proxy.registry import Registry
    from proxy.routing import Router
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
    "login_limit", "client_request_timeout", "max_client_buffer", "startup_parameter_refused", "parameter_sync_failed",
    "tls_required", "client_certificate", "auth_rate_limited",
)

# Failed logins (pgmux_auth_failures_total): how authentication failed, or why it was not tried.
AUTH_FAILURE_REASONS = (*FAILURE_KINDS, "unknown_database", "rate_limited")

POOL_LABELS = ("database", "user")

# The statuses POST /sql answers with (exported at 0 from the start, as the rejection reasons are).
HTTP_STATUSES = ("200", "400", "405", "500", "507")

CANCEL_ROUTES = ("peer", "worker")  # where a forwarded CancelRequest went

# The catalogue of pgmux's own metrics: name -> (type, help, labels). The collector emits exactly
# these (plus process_* and python_* from prometheus-client); the dashboard and the tests read it.
METRICS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "pgmux_build_info": ("gauge", "pgmux version, Python version and whether the hot path runs compiled (value 1)",
                         ("version", "python_version", "hot_path")),
    "pgmux_ready": ("gauge", "1 when /readyz says ready: listening, not draining, every upstream reachable", ()),
    "pgmux_draining": ("gauge", "1 once shutdown has begun", ()),
    "pgmux_client_connections": ("gauge", "Client sockets open now, in any state (logging in, pooled, admin)", ()),
    "pgmux_max_client_conn": ("gauge", "The max_client_conn limit", ()),
    "pgmux_login_clients": ("gauge", "Client sockets logging in now, from accept to welcome (SHOW LISTS login_clients)",
                            ()),
    "pgmux_clients": ("gauge", "Pooled clients by state: active (linked to a server), idle, waiting (for a server), "
                      "login (authenticated, not yet welcomed)", ("database", "user", "pool_mode", "state")),
    "pgmux_servers": ("gauge", "Server connections by state: active (linked), idle, used, tested (being reset), "
                      "login, being_canceled (waiting for a cancel to complete), closing", ("database", "user", "state")),
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
    "pgmux_client_connections_accepted_total": ("counter", "Clients accepted, by transport: tcp, websocket (a "
                                                "WebSocket session), http (an HTTP request)", ("transport",)),
    "pgmux_client_connections_by_transport": ("gauge", "Client connections open now, by transport: tcp, websocket",
                                              ("transport",)),
    "pgmux_logins_total": ("counter", "Successful logins, by transport: tcp, websocket, http (each HTTP request "
                                      "whose credentials were accepted)", ("transport",)),
    "pgmux_login_failures_total": ("counter", "Failed or refused logins (pgmux_auth_failures_total's), by transport",
                                   ("transport",)),
    "pgmux_client_rejections_total": ("counter", "Clients refused or cut off by pgmux, by reason", ("reason",)),
    "pgmux_session_state_changes_total": ("counter", "Statements that may change their session's state (transaction "
                                          "mode), by kind: setting, role, temp, advisory_lock, listen...", ("kind",)),
    "pgmux_session_state_refusals_total": ("counter", "Statements refused because they would create session-only "
                                           "state (session_state = refuse), by kind", ("kind",)),
    "pgmux_auth_failures_total": ("counter", "Failed logins by reason: wrong_password, unknown_user, "
                                  "unusable_secret, protocol, channel_binding, unknown_database, and rate_limited "
                                  "(refused for an address's earlier failures)", ("reason",)),
    "pgmux_clients_tls": ("gauge", "Client connections that use TLS", ()),
    "pgmux_tls_handshake_failures_total": ("counter", "Client TLS handshakes (or records) that failed, by reason: "
                                           "not_tls, protocol_version, client_certificate, alpn, handshake, "
                                           "protocol", ("reason",)),
    "pgmux_pinned_clients": ("gauge", "Clients kept on their backend by session-only state, by reason", ("reason",)),
    "pgmux_server_connects_total": ("counter", "Server logins that succeeded", POOL_LABELS),
    "pgmux_server_connect_failures_total": ("counter", "Server connects or logins that failed", POOL_LABELS),
    "pgmux_server_assignments_total": ("counter", "Times a server was linked to a client", POOL_LABELS),
    "pgmux_servers_yielded_total": ("counter", "Servers closed so that another worker, whose clients waited at a "
                                    "shared backend limit, could open one (workers = N)", POOL_LABELS),
    "pgmux_transactions_total": ("counter", "Transactions completed (transaction pooling)", POOL_LABELS),
    "pgmux_queries_total": ("counter", "Requests answered (Query, Sync, FunctionCall)", POOL_LABELS),
    "pgmux_received_bytes_total": ("counter", "Bytes received from clients", POOL_LABELS),
    "pgmux_sent_bytes_total": ("counter", "Bytes sent to clients", POOL_LABELS),
    "pgmux_cancels_forwarded_total": ("counter", "Cancel requests forwarded to a server", POOL_LABELS),
    "pgmux_cancel_requests_forwarded_total": ("counter", "Cancel requests sent on to the pgmux that issued their key, "
                                              "by to: peer ([peers]), worker (a sibling worker)", ("to",)),
    "pgmux_cancel_request_forward_failures_total": ("counter", "Cancel requests that could not be sent on (owner "
                                                    "unreachable, timed out, too many in flight), by to", ("to",)),
    "pgmux_prepared_statement_hits_total": ("counter", "Prepared statements the linked server already had",
                                            POOL_LABELS),
    "pgmux_prepared_statement_misses_total": ("counter", "Prepared statements pgmux had to Parse on the server",
                                              POOL_LABELS),
    "pgmux_prepared_statement_evictions_total": ("counter", "Server prepared statements closed by the LRU",
                                                 POOL_LABELS),
    "pgmux_client_wait_seconds": ("histogram", "Time a client waited for a server (acquire latency)", POOL_LABELS),
    "pgmux_transaction_duration_seconds": ("histogram", "Time a server stayed linked to a client per transaction",
                                           POOL_LABELS),
    "pgmux_http_requests_total": ("counter", "HTTP /sql requests answered, by status (200, 400, 507...)",
                                  ("status",)),
    "pgmux_http_request_duration_seconds": ("histogram", "Time from an HTTP /sql request, read whole, to its "
                                            "answer", ()),
}

# The PoolStats field (dotted: an attribute of an attribute) each per-pool counter reads.
_POOL_COUNTERS = {
    "pgmux_server_connects_total": "server_connects",
    "pgmux_server_connect_failures_total": "server_connect_failures",
    "pgmux_server_assignments_total": "server_assignments",
    "pgmux_servers_yielded_total": "servers_yielded",
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


# ---- the Prometheus exposition of pgmux_* ------------------------------------------------------

# Pools (and, for the client tally, clients/32) formatted between two returns to the event loop:
# a slice takes well under a millisecond, so a scrape of thousands of pools never stalls the relay.
_SLICE = 32


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _value(value: float) -> str:
    return str(value) if type(value) is int else floatToGoString(value)


def _labels(**labels: str) -> str:
    return ",".join(f'{name}="{_escape(value)}"' for name, value in labels.items())


def _sample(name: str, labels: str, value: float) -> str:
    return f"{name}{{{labels}}} {_value(value)}\n" if labels else f"{name} {_value(value)}\n"


def _header(name: str) -> str:
    kind, text, _ = METRICS[name]  # a counter's HELP and TYPE name its _total samples, as prometheus-client's do
    help_text = text.replace("\\", "\\\\").replace("\n", "\\n")
    return f"# HELP {name} {help_text}\n# TYPE {name} {kind}\n"


def _by_label(name: str, label: str, counts: Mapping[str, int], known: Iterable[str]) -> list[str]:
    """A labelled family: every known label value (0 when nothing was counted under it), then any other."""
    totals = collections.Counter(dict.fromkeys(known, 0))
    totals.update(counts)
    return [_header(name), *(_sample(name, _labels(**{label: key}), count) for key, count in sorted(totals.items()))]


class _PoolRow:
    """What one scrape reads of one pool besides its live counters: its label text and configured sizes."""

    __slots__ = ("pool", "labels", "configured")

    def __init__(self, pool: Pool, labels: str, configured: PoolConfig) -> None:
        self.pool = pool
        self.labels = labels
        self.configured = configured


class PgmuxExposition:
    """Writes every pgmux_* metric in the Prometheus text format from the registry and the router at scrape time.

    Values are read from the live pools and connections; nothing is kept between scrapes. The text
    comes in parts, per-pool families a slice of pools at a time, so that the caller can let the
    event loop run between parts: one scrape of many pools never holds the relay for long.
    """

    def __init__(self, registry: Registry[ClientConnection], router: Router, readiness: Readiness) -> None:
        self.registry = registry
        self.router = router
        self.readiness = readiness

    def parts(self) -> Iterator[str]:
        router = self.router
        now = time.monotonic()
        yield self._process_wide()
        pools = list(router.pools.values())  # in creation order: sorting thousands would be one long step
        rows: list[_PoolRow] = []
        server_counts: collections.Counter[str] = collections.Counter()
        for start in range(0, len(pools), _SLICE):
            for pool in pools[start:start + _SLICE]:
                rows.append(_PoolRow(pool, _labels(database=pool.key.database, user=pool.key.user),
                                     router.configured_pool(pool)))
                server_counts[pool.key.database] += pool.total
            yield ""
        clients: collections.Counter[tuple[Pool, str, str]] = collections.Counter()
        everyone = list(self.registry.clients)
        logging_in = 0
        for start in range(0, len(everyone), _SLICE * 32):
            for client in everyone[start:start + _SLICE * 32]:
                if client.state in LOGGING_IN:
                    logging_in += 1
                label = CLIENT_NAMES[client.state].label
                if label is not None and client.pool is not None:
                    clients[(client.pool, client.listener.pool_mode.value, label)] += 1
            yield ""
        yield _header("pgmux_login_clients") + _sample("pgmux_login_clients", "", logging_in)
        modes = sorted({listener.pool_mode.value for listener in router.settings.all_listeners()})

        def client_lines(row: _PoolRow) -> str:
            return "".join(_sample("pgmux_clients", f'{row.labels},pool_mode="{mode}",state="{state}"',
                                   clients[(row.pool, mode, state)])
                           for mode in modes for state in CLIENT_LABELS)

        def server_lines(row: _PoolRow) -> str:
            by_label = dict.fromkeys(SERVER_LABELS, 0)
            for state, names in SERVER_NAMES.items():
                if names.label is not None:
                    by_label[names.label] += len(row.pool.in_state(state))
            return "".join(_sample("pgmux_servers", f'{row.labels},state="{label}"', count)
                           for label, count in by_label.items())

        yield from self._per_pool("pgmux_clients", rows, client_lines)
        yield from self._per_pool("pgmux_servers", rows, server_lines)
        yield from self._per_pool("pgmux_pool_size", rows,
                                  lambda row: _sample("pgmux_pool_size", row.labels, row.configured.pool_size))
        yield from self._per_pool("pgmux_pool_min_size", rows,
                                  lambda row: _sample("pgmux_pool_min_size", row.labels,
                                                      row.configured.min_pool_size))
        yield from self._per_pool("pgmux_pool_reserve_size", rows,
                                  lambda row: _sample("pgmux_pool_reserve_size", row.labels,
                                                      row.configured.reserve_pool_size))
        yield from self._per_pool("pgmux_pool_maxwait_seconds", rows,
                                  lambda row: _sample("pgmux_pool_maxwait_seconds", row.labels,
                                                      row.pool.oldest_wait(now)))
        for name, path in _POOL_COUNTERS.items():
            yield from self._per_pool(name, rows, functools.partial(_counter_line, name, path))
        for name, attribute in _POOL_HISTOGRAMS.items():
            yield from self._per_pool(name, rows, functools.partial(_histogram_lines, name, attribute))
        yield self._per_database(server_counts)
        yield self._http_requests()

    @staticmethod
    def _per_pool(name: str, rows: list[_PoolRow], lines: Callable[[_PoolRow], str]) -> Iterator[str]:
        yield _header(name)
        for start in range(0, len(rows), _SLICE):
            yield "".join(lines(row) for row in rows[start:start + _SLICE])

    def _process_wide(self) -> str:
        registry = self.registry
        rejections = collections.Counter({reason: 0 for reason in REJECTION_REASONS})
        rejections.update(registry.rejections)
        build = _labels(version=__version__, python_version=platform.python_version(),
                        hot_path="compiled" if BUILD.compiled else "python")
        out = [
            _header("pgmux_build_info"), _sample("pgmux_build_info", build, 1),
            _header("pgmux_ready"), _sample("pgmux_ready", "", 1 if self.readiness.ready()[0] else 0),
            _header("pgmux_draining"), _sample("pgmux_draining", "", 1 if registry.draining else 0),
            _header("pgmux_client_connections"), _sample("pgmux_client_connections", "", len(registry.clients)),
            _header("pgmux_max_client_conn"),
            _sample("pgmux_max_client_conn", "", self.router.settings.max_client_conn),
        ]
        out.extend(_by_label("pgmux_client_connections_accepted_total", "transport", registry.accepted, TRANSPORTS))
        out.extend(_by_label("pgmux_client_connections_by_transport", "transport",
                             collections.Counter(registry.connected_by_transport()), TRANSPORTS))
        out.extend(_by_label("pgmux_logins_total", "transport", registry.logins, TRANSPORTS))
        out.extend(_by_label("pgmux_login_failures_total", "transport", registry.failed_logins_by_transport,
                             TRANSPORTS))
        out.append(_header("pgmux_client_rejections_total"))
        out.extend(_sample("pgmux_client_rejections_total", _labels(reason=reason), count)
                   for reason, count in sorted(rejections.items()))
        out.extend(_by_label("pgmux_session_state_changes_total", "kind", registry.session_changes,
                             SESSION_STATE_KINDS))
        out.extend(_by_label("pgmux_session_state_refusals_total", "kind", registry.session_refusals, PIN_KINDS))
        out.extend(_by_label("pgmux_pinned_clients", "reason",
                             collections.Counter(reason for client in registry.clients for reason in client.pins),
                             PIN_KINDS))
        out.extend(_by_label("pgmux_auth_failures_total", "reason", registry.auth_failures, AUTH_FAILURE_REASONS))
        out.append(_header("pgmux_clients_tls"))
        out.append(_sample("pgmux_clients_tls", "", sum(1 for client in registry.clients if client.tls is not None)))
        out.extend(_by_label("pgmux_tls_handshake_failures_total", "reason", registry.tls_failures,
                             TLS_FAILURE_REASONS))
        out.extend(_by_label("pgmux_cancel_requests_forwarded_total", "to", registry.cancels_forwarded,
                             CANCEL_ROUTES))
        out.extend(_by_label("pgmux_cancel_request_forward_failures_total", "to", registry.cancel_forward_failures,
                             CANCEL_ROUTES))
        return "".join(out)

    def _http_requests(self) -> str:
        http = self.registry.http
        name = "pgmux_http_request_duration_seconds"
        out = _by_label("pgmux_http_requests_total", "status", http.by_status, HTTP_STATUSES)
        out.append(_header(name))
        out.extend(f'{name}_bucket{{le="{floatToGoString(bound)}"}} {count}\n'
                   for bound, count in http.duration.cumulative())
        out.append(f"{name}_count {http.duration.count}\n")
        out.append(_sample(f"{name}_sum", "", http.duration.sum))
        return "".join(out)

    def _per_database(self, server_counts: collections.Counter[str]) -> str:
        router = self.router
        names = router.database_names()
        out = []
        for name, value_of in (("pgmux_database_paused", lambda db: 1 if router.is_paused(db) else 0),
                               ("pgmux_database_max_connections", router.database_max_connections),
                               ("pgmux_database_server_connections", lambda db: server_counts[db])):
            out.append(_header(name))
            out.extend(_sample(name, _labels(database=database), value_of(database)) for database in names)
        return "".join(out)


def _counter_line(name: str, path: str, row: _PoolRow) -> str:
    return _sample(name, row.labels, stat(row.pool.stats, path))


def _histogram_lines(name: str, attribute: str, row: _PoolRow) -> str:
    histogram = getattr(row.pool.stats, attribute)
    labels = row.labels
    out = [f'{name}_bucket{{{labels},le="{floatToGoString(bound)}"}} {count}\n'
           for bound, count in histogram.cumulative()]
    out.append(f"{name}_count{{{labels}}} {histogram.count}\n")
    out.append(_sample(f"{name}_sum", labels, histogram.sum))
    return "".join(out)


def stat(stats: object, path: str) -> float:
    """``stats.a.b`` for path "a.b"; a missing field raises: a silent 0 would hide a counter never kept."""
    value: object = stats
    for part in path.split("."):
        value = getattr(value, part)
    assert isinstance(value, (int, float)), path
    return value


def process_registry() -> CollectorRegistry:
    """prometheus-client's process_* and python_* metrics (pgmux_* are written by PgmuxExposition)."""
    registry = CollectorRegistry(auto_describe=False)
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

    def __init__(self, registry: Registry[ClientConnection], router: Router, addresses: list[tuple[str, int]]) -> None:
        self.registry = registry
        self.router = router
        self.addresses = addresses  # where the listeners are bound: the composition root fills it in at start
        self.checks: dict[str, _Check] = {}

    async def run(self) -> None:
        while True:
            await self.check_once()
            await asyncio.sleep(READINESS_PERIOD)

    async def check_once(self) -> None:
        upstreams = self.router.upstreams()
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
        problems: list[str] = []
        if not self.addresses:
            problems.append("not listening yet")
        if self.registry.draining:
            problems.append("draining: shutting down")
        now = time.monotonic()
        notes = []
        for name in self.router.upstreams():
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

    def __init__(self, registry: Registry[ClientConnection], router: Router, readiness: Readiness) -> None:
        self.registry = registry
        self.router = router
        self.readiness = readiness
        self.process_metrics = process_registry()
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

    async def respond(self, method: str, path: str) -> tuple[int, str, list[bytes]]:
        """(status, content type, body in parts) for one request."""
        if method not in ("GET", "HEAD"):
            return 405, "text/plain; charset=utf-8", [b"only GET and HEAD\n"]
        if path == "/metrics":
            return 200, CONTENT_TYPE_LATEST, await self.scrape()
        if path == "/healthz":
            return 200, "text/plain; charset=utf-8", [b"ok\n"]
        if path == "/readyz":
            ready, reasons = self.readiness.ready()
            body = ("ready\n" if ready else "not ready\n") + "".join(f"{reason}\n" for reason in reasons)
            return (200 if ready else 503), "text/plain; charset=utf-8", [body.encode()]
        if path == "/":
            return 200, "text/plain; charset=utf-8", [b"pgmux: /metrics /healthz /readyz\n"]
        return 404, "text/plain; charset=utf-8", [b"not found\n"]

    async def scrape(self) -> list[bytes]:
        """The /metrics text in parts, never joined: the event loop runs between them (about a millisecond each)."""
        parts = []
        for part in PgmuxExposition(self.registry, self.router, self.readiness).parts():
            parts.append(part.encode())  # part by part: encoding megabytes at the end would be one long step
            await asyncio.sleep(0)
        parts.append(generate_latest(self.process_metrics))
        return parts


_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            431: "Request Header Fields Too Large", 503: "Service Unavailable"}


class _HttpConnection(asyncio.Protocol):
    """One HTTP/1.x request and its answer, then close: all Prometheus and health probes need."""

    def __init__(self, server: MetricsServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.timer: asyncio.TimerHandle | None = None
        self.answering = False  # the request is complete; anything after it is ignored

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.timer = asyncio.get_running_loop().call_later(_REQUEST_TIMEOUT, transport.close)

    def data_received(self, data: bytes) -> None:
        if self.answering or self.transport is None or self.transport.is_closing():
            return
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buffer) > _MAX_REQUEST_HEAD:
                self._send(431, "text/plain; charset=utf-8", [b"request head too large\n"], head_only=False)
            return
        request_line = bytes(self.buffer[:self.buffer.find(b"\r\n")]).decode("latin-1")
        parts = request_line.split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            self._send(400, "text/plain; charset=utf-8", [b"bad request\n"], head_only=False)
            return
        method, target = parts[0], parts[1]
        self.answering = True
        self.server.registry.spawn(self._answer(method, target.split("?", 1)[0]), name="metrics request")

    async def _answer(self, method: str, path: str) -> None:
        status, content_type, body = await self.server.respond(method, path)
        if self.transport is not None and not self.transport.is_closing():
            self._send(status, content_type, body, head_only=method == "HEAD")

    def _send(self, status: int, content_type: str, body: list[bytes], head_only: bool) -> None:
        assert self.transport is not None
        head = (f"HTTP/1.1 {status} {_REASONS.get(status, '')}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {sum(map(len, body))}\r\nConnection: close\r\n\r\n").encode("latin-1")
        self.transport.write(head)
        if not head_only:
            self.transport.writelines(body)  # not joined: that copies a large scrape once more
        self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
