"""Admin console: PgBouncer's SHOW/PAUSE/RESUME/... commands on the virtual database `pgmux` (alias `pgbouncer`)."""

from __future__ import annotations

import asyncio
import collections
import re
import time
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from proxy import __version__
from proxy.fanout import (
    COMMAND,
    KEY,
    MAX,
    MICROS,
    MODE,
    SETTLED,
    SHOW,
    SUM,
    ConsoleAnswer,
    ConsoleRequest,
    Row,
    Rule,
    Siblings,
    Weighted,
    client_owner,
    concatenate,
    connection_label,
    connection_number,
    merge_named_values,
    merge_rows,
)
from proxy.logs import get_logger
from proxy.login import welcome
from proxy.protocol import errors
from proxy.protocol import messages as m
from proxy.protocol.errors import PgError
from proxy.protocol.framing import Frame, FrameScanner, ProtocolViolation
from proxy.settings import SPLIT_LIMITS, Settings, parse_upstream_url
from proxy.states import CLIENT_NAMES, LOGGING_IN, SERVER_NAMES, ClientState
from proxy.stats import StatsWindow, sum_totals

if TYPE_CHECKING:
    from proxy.client import ClientConnection
    from proxy.pool import Pool
    from proxy.registry import Registry
    from proxy.routing import Router
    from proxy.server import ServerConnection

log = get_logger("admin")

ADMIN_PARAMETERS = {
    "server_version": f"1.25.0 (pgmux {__version__})",
    "server_encoding": "UTF8",
    "client_encoding": "UTF8",
    "DateStyle": "ISO, MDY",
    "TimeZone": "UTC",
    "standard_conforming_strings": "on",
    "integer_datetimes": "on",
    "application_name": "",
}

# Column types as PgBouncer's admin.c spells them: s text, i int4, q int8, N numeric, T timestamp as text.
_OIDS = {"s": m.TEXT_OID, "i": m.INT4_OID, "q": m.INT8_OID, "N": m.NUMERIC_OID, "T": m.TEXT_OID}
Columns = list[tuple[str, str]]

# A command: one word, optionally one argument; either may be "quoted" (PgBouncer's grammar, plus . and -).
_WORD = r'(?:"(?:[^"]|"")+"|[0-9A-Za-z_.$-]+)'
_COMMAND = re.compile(rf"^\s*({_WORD})(?:\s+({_WORD}))?\s*(?:;\s*)?$")
_EMPTY = re.compile(r"^[\s;]*$")
_SET = re.compile(r"^\s*set\s", re.IGNORECASE)
_POLL = 0.05  # seconds between checks while PAUSE / WAIT_CLOSE wait for servers
_MAX_QUEUED = 64  # commands held while one waits, before the connection stops being read

# SHOW of a session parameter: some drivers ask at connect time (PgBouncer fakes the same ones).
_FAKE_PARAMETERS = {
    "client_encoding": "UTF8", "default_transaction_isolation": "read committed",
    "standard_conforming_strings": "on", "datestyle": "ISO, MDY", "timezone": "UTC",
    "server_version": ADMIN_PARAMETERS["server_version"],
}

HELP = """\
\tSHOW HELP|CONFIG|DATABASES|POOLS|CLIENTS|SERVERS|USERS|VERSION
\tSHOW LISTS|STATE
\tSHOW STATS|STATS_TOTALS|STATS_AVERAGES|TOTALS
\tPAUSE [<db>]
\tRESUME [<db>]
\tRECONNECT [<db>]
\tKILL [<db>]
\tKILL_CLIENT <client_id>
\tWAIT_CLOSE [<db>]
\tRELOAD
\tSHUTDOWN
\tSHUTDOWN WAIT_FOR_SERVERS|WAIT_FOR_CLIENTS"""

_SOCKET_COLUMNS: Columns = [
    ("type", "s"), ("user", "s"), ("database", "s"), ("replication", "s"), ("state", "s"), ("addr", "s"),
    ("port", "i"), ("local_addr", "s"), ("local_port", "i"), ("connect_time", "T"), ("request_time", "T"),
    ("wait", "i"), ("wait_us", "i"), ("close_needed", "i"), ("ptr", "s"), ("link", "s"), ("remote_pid", "i"),
    ("tls", "s"), ("application_name", "s"), ("prepared_statements", "i"), ("id", "i"),
    ("pinned", "s"),  # pgmux's own: the session-only state that keeps a client on its server (transaction mode)
]
_TOTALS_NAMES = ["server_assignment_count", "xact_count", "query_count", "bytes_received", "bytes_sent",
                 "xact_time", "query_time", "wait_time", "client_parse_count", "server_parse_count", "bind_count",
                 "client_login_count"]
_STATS_COLUMNS = [f"total_{n}" for n in _TOTALS_NAMES[:3]] + ["total_received", "total_sent"] \
    + [f"total_{n}" for n in _TOTALS_NAMES[5:]] \
    + [f"avg_{n}" for n in _TOTALS_NAMES[:3]] + ["avg_recv", "avg_sent"] + [f"avg_{n}" for n in _TOTALS_NAMES[5:]]
_AVERAGES_NAMES = _TOTALS_NAMES[:8] + [f"avg_{n}" for n in _TOTALS_NAMES[8:]]
_TOTALS_ROW_NAMES = ["server_assignment_count", "xact_count", "query_count", "client_bytes", "server_bytes",
                     "xact_time", "query_time", "wait_time", "ps_client_parse_count", "ps_server_parse_count",
                     "ps_bind_count", "client_login_count"]
# SHOW POOLS' count columns, in order.
_POOL_COUNTS = ("cl_active", "cl_waiting", "cl_active_cancel_req", "cl_waiting_cancel_req", "sv_active",
                "sv_active_cancel", "sv_being_canceled", "sv_idle", "sv_used", "sv_tested", "sv_login")
# Settings a RELOAD cannot change: they are bound at start.
_NOT_RELOADABLE = frozenset({"listen", "listeners", "pool_mode", "auth_type", "metrics_listen", "log_format",
                             "log_level", "workers", "peer_id", "peers"})


def result(columns: Columns, rows: list[list[Any]], tag: str = "SHOW") -> bytes:
    """A whole result set in PgBouncer's column types, then CommandComplete and ReadyForQuery."""
    out = [m.row_description((name, _OIDS[kind]) for name, kind in columns)]
    for row in rows:
        out.append(m.data_row(None if value is None else str(value) for value in row))
    return b"".join(out) + done(tag)


def done(tag: str) -> bytes:
    return m.command_complete(tag) + m.ready_for_query()


def failure(error: PgError) -> bytes:
    return error.to_bytes() + m.ready_for_query()


def _unquote(word: str | None) -> str:
    if not word:
        return ""
    if word.startswith('"'):
        return word[1:-1].replace('""', '"')
    return word


def _wall(monotonic: float) -> str:
    """A monotonic timestamp as PgBouncer prints times: local 'YYYY-MM-DD HH:MM:SS TZ'."""
    if not monotonic:
        return ""
    return time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(time.time() - (time.monotonic() - monotonic)))


def _pins(pins: frozenset[str]) -> str:
    return ",".join(sorted(pins))


def _number(connection_id: str) -> int:
    digits = connection_id.lstrip("cs")
    return int(digits) if digits.isdigit() else 0


def _endpoint(transport: Any, which: str) -> tuple[str, int | None]:
    info = transport.get_extra_info(which) if transport is not None else None
    if isinstance(info, tuple) and len(info) >= 2:
        return str(info[0]), int(info[1])
    if isinstance(info, str) and info:
        return "unix", None
    return "", None


def _tls(transport: Any) -> str:
    ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
    if ssl_object is None:
        return ""
    cipher = ssl_object.cipher()
    return f"{ssl_object.version()}/{cipher[0] if cipher else ''}"


Reply = bytes | Coroutine[Any, Any, bytes]
Table = tuple[Columns, list[Row]]


class Lifecycle:
    """What SHUTDOWN, RELOAD and KILL do to the whole pooler: supplied by the composition root (app.Proxy)."""

    def __init__(self, shutdown: Callable[[bool], None], reload: Callable[[], str | None],
                 kill: Callable[[str | None], None]) -> None:
        self.shutdown = shutdown  # start stopping (graceful or not); returns at once
        self.reload = reload  # reload from the configuration source: why not, or None when done
        self.kill = kill  # drop a database's (None: every database's) clients and servers


class WorkerConsole:
    """What the console shows and changes in one worker: the rows of each SHOW, each command's effect here, and
    whether a PAUSE or WAIT_CLOSE has settled here. Its own console connections use it (AdminSession), and so do
    its sibling workers' (``answer``, over its private address: proxy/peering.py)."""

    def __init__(self, registry: Registry[ClientConnection], router: Router, stats_window: StatsWindow,
                 lifecycle: Lifecycle, worker: int = 0, workers: int = 1) -> None:
        self.registry = registry
        self.router = router
        self.stats_window = stats_window
        self.lifecycle = lifecycle
        self.worker = worker
        self.workers = workers

    def answer(self, request: ConsoleRequest) -> ConsoleAnswer:
        """A sibling's console asks this worker (its checks, such as admin rights, done there)."""
        if request.kind == SHOW:
            table = self.table(request.name)
            return ConsoleAnswer(rows=table[1] if table is not None else [])
        if request.kind == SETTLED:
            return ConsoleAnswer(settled=self.settled(request.name, request.argument))
        try:
            self.run(request.name, request.argument)
        except PgError as exc:
            code = exc.sqlstate.value if isinstance(exc.sqlstate, errors.SqlState) else exc.sqlstate
            return ConsoleAnswer(error=(code, exc.message))
        return ConsoleAnswer()

    def table(self, what: str) -> Table | None:
        """SHOW ``what``'s columns and this worker's rows; None for no such SHOW (HELP is no table)."""
        handler = _SHOW.get(what)
        return handler(self) if handler is not None else None

    def run(self, command: str, argument: str, caller: ClientConnection | None = None) -> None:
        """Command ``command`` in this worker (``caller``: the console connection running it here, if any)."""
        if command == "kill_client":
            self.kill_client(argument, caller)
            return
        handler = _COMMANDS.get(command)
        if handler is None:
            raise errors.admin_unknown_command(command)
        handler(self, argument)

    def settled(self, command: str, argument: str) -> bool:
        """Whether what ``command`` (PAUSE, WAIT_CLOSE) waits for is over in this worker."""
        database = argument or None
        if command == "pause":
            return self.router.servers_in_use(database) == 0
        if command == "wait_close":
            return self.router.servers_to_close(database) == 0
        return True

    # ---- SHOW ---------------------------------------------------------------------------------------

    def show_version(self) -> Table:
        return [("version", "s")], [[f"pgmux {__version__}"]]

    def show_state(self) -> Table:
        paused = self.router.paused_all
        return [("key", "s"), ("value", "s")], [["active", "no" if paused else "yes"],
                                                ["paused", "yes" if paused else "no"], ["suspended", "no"]]

    def _client_counts(self) -> collections.Counter[tuple[Pool, str]]:
        """Clients per (pool, SHOW POOLS column)."""
        counts: collections.Counter[tuple[Pool, str]] = collections.Counter()
        for client in self.registry.clients:
            column = CLIENT_NAMES[client.state].column
            if client.pool is not None and column is not None:
                counts[(client.pool, column)] += 1
        return counts

    def _pools(self) -> list[Pool]:
        return sorted(self.router.pools.values(), key=lambda p: (p.key.database, p.key.user))

    def show_pools(self) -> Table:
        counts = self._client_counts()
        modes = self._pool_modes()
        now = time.monotonic()
        rows = []
        for pool in self._pools():
            for state, names in SERVER_NAMES.items():
                if names.column is not None:
                    counts[(pool, names.column)] += len(pool.in_state(state))
            wait = pool.oldest_wait(now)
            # A column no state maps to (a cancel request in flight, sv_used) is PgBouncer's and reads 0.
            rows.append([pool.key.database, pool.key.user, *(counts[(pool, column)] for column in _POOL_COUNTS),
                         int(wait), int(wait * 1e6) % 1_000_000, modes.get(pool, self._default_mode()), None])
        return _POOLS_COLUMNS, rows

    def _default_mode(self) -> str:
        modes = {listener.pool_mode.value for listener in self.router.settings.all_listeners()}
        return modes.pop() if len(modes) == 1 else "mixed"

    def _pool_modes(self) -> dict[Pool, str]:
        """The pool mode of each pool's clients; "mixed" when clients of both listeners share it."""
        seen: dict[Pool, set[str]] = collections.defaultdict(set)
        for client in self.registry.clients:
            if client.pool is not None:
                seen[client.pool].add(client.listener.pool_mode.value)
        return {pool: modes.pop() if len(modes) == 1 else "mixed" for pool, modes in seen.items()}

    def show_stats(self) -> Table:
        window = self.stats_window
        rows = []
        for database, totals in self.router.totals_by_database().items():
            values = totals.values()
            averages = window.averages(database).values()
            # total_requests: PgBouncer 1.7's name for total_query_count, still read by the Debian
            # prometheus-pgbouncer-exporter (1.7); newer consumers ignore the extra column.
            rows.append([database, *values, *averages, totals.query_count])
        return _STATS_TABLE_COLUMNS, rows

    def show_stats_totals(self) -> Table:
        rows = [[database, *totals.values()] for database, totals in self.router.totals_by_database().items()]
        return _STATS_TOTALS_COLUMNS, rows

    def show_stats_averages(self) -> Table:
        window = self.stats_window
        rows = [[database, *window.averages(database).values()] for database in self.router.totals_by_database()]
        return _STATS_AVERAGES_COLUMNS, rows

    def show_totals(self) -> Table:
        totals = sum_totals(self.router.totals_by_database().values()).values()
        averages = self.stats_window.averages(None).values()
        rows = [[f"total_{name}", value] for name, value in zip(_TOTALS_ROW_NAMES, totals)]
        rows += [[f"avg_{name}", value] for name, value in zip(_TOTALS_ROW_NAMES, averages)]
        return [("name", "s"), ("value", "N")], rows

    def show_databases(self) -> Table:
        router = self.router
        settings = router.settings
        server_counts: collections.Counter[str] = collections.Counter()
        for pool in router.pools.values():
            server_counts[pool.key.database] += pool.total
        rows = []
        for name, db in sorted(settings.all_databases().items()):
            upstream = parse_upstream_url(db.url.get_secret_value())
            max_clients = (db.max_db_client_connections if db.max_db_client_connections is not None
                           else settings.max_db_client_connections)
            rows.append([
                name, upstream.host, upstream.port, upstream.database, upstream.user,
                db.pool_size if db.pool_size is not None else settings.default_pool_size,
                db.min_pool_size if db.min_pool_size is not None else settings.min_pool_size,
                db.reserve_pool_size if db.reserve_pool_size is not None else settings.reserve_pool_size,
                int(settings.server_lifetime), None, None, router.database_max_connections(name),
                server_counts[name], max_clients, router.admission.per_database.get(name, 0),
                1 if router.is_paused(name) else 0, 0,
            ])
        return _DATABASES_COLUMNS, rows

    def _users(self) -> list[str]:
        settings = self.router.settings
        names = set(settings.users)
        names.update(parse_upstream_url(db.url.get_secret_value()).user for db in settings.all_databases().values())
        names.update(pool.key.user for pool in self.router.pools.values())
        return sorted(names)

    def show_users(self) -> Table:
        router = self.router
        server_counts: collections.Counter[str] = collections.Counter()
        for pool in router.pools.values():
            server_counts[pool.key.user] += pool.total
        rows = [[user, None, None, None, router.settings.max_user_connections, server_counts[user],
                 router.settings.max_user_client_connections, router.admission.per_user.get(user, 0)]
                for user in self._users()]
        return _USERS_COLUMNS, rows

    def show_lists(self) -> Table:
        router, clients = self.router, self.registry.clients
        logging_in = sum(1 for client in clients if client.state in LOGGING_IN)
        items = [("databases", len(router.settings.all_databases())), ("users", len(self._users())), ("peers", 0),
                 ("pools", len(router.pools)), ("peer_pools", 0), ("free_clients", 0),
                 ("used_clients", len(clients)), ("login_clients", logging_in), ("free_servers", 0),
                 ("used_servers", sum(pool.total for pool in router.pools.values())), ("dns_names", 0),
                 ("dns_zones", 0), ("dns_queries", 0), ("dns_pending", 0)]
        return [("list", "s"), ("items", "i")], [list(item) for item in items]

    def show_config(self) -> Table:
        settings = self.router.settings
        shown = settings.redacted()
        rows: list[Row] = []
        for name, field in Settings.model_fields.items():
            if name in ("databases", "users"):
                continue  # SHOW DATABASES / SHOW USERS; never passwords
            value = shown.get(name)
            default = field.default if not field.is_required() else None
            rows.append([name, _config_text(value), _config_text(default),
                         "no" if name in _NOT_RELOADABLE else "yes"])
        return [("key", "s"), ("value", "s"), ("default", "s"), ("changeable", "s")], rows

    def show_clients(self) -> Table:
        rows = []
        for client in sorted(self.registry.clients, key=lambda c: _number(c.id)):
            row = self._client_row(client)
            if row is not None:
                rows.append(row)
        return _SOCKET_COLUMNS, rows

    def _label(self, connection_id: str) -> str:
        return connection_label(connection_id, self.worker, self.workers)

    def _id(self, connection_id: str) -> int:
        return connection_number(_number(connection_id), self.worker, self.workers)

    def _client_row(self, client: ClientConnection) -> list[Any] | None:
        state = CLIENT_NAMES[client.state].shown
        if state is None:
            return None  # still logging in (PgBouncer lists those only in SHOW SOCKETS), or gone
        addr, port = _endpoint(client.transport, "peername")
        local_addr, local_port = _endpoint(client.transport, "sockname")
        waited = time.monotonic() - client.last_active if client.state is ClientState.WAITING else 0.0
        server = client.server
        return ["C", client.user, client.database, "none", state, addr, port, local_addr, local_port,
                _wall(client.connected_at), _wall(client.last_active), int(waited), int(waited * 1e6) % 1_000_000,
                0, self._label(client.id), self._label(server.id) if server is not None else "", 0,
                _tls(client.transport), client.params.get("application_name", ""), 0, self._id(client.id),
                _pins(client.pins)]

    def show_servers(self) -> Table:
        rows = []
        for pool in self._pools():
            listed = [server for state, names in SERVER_NAMES.items() if names.shown is not None
                      for server in pool.in_state(state)]
            for server in sorted(listed, key=lambda s: _number(s.id)):
                rows.append(self._server_row(pool, server))
        return _SOCKET_COLUMNS, rows

    def _server_row(self, pool: Pool, server: ServerConnection) -> list[Any]:
        state = SERVER_NAMES[server.state].shown
        addr, port = _endpoint(server.transport, "peername")
        local_addr, local_port = _endpoint(server.transport, "sockname")
        client = server.client
        backend_pid = server.backend_key[0] if server.backend_key else 0
        return ["S", pool.key.user, pool.key.database, "none", state, addr, port, local_addr, local_port,
                _wall(server.created_at), _wall(server.idle_since), 0, 0,
                1 if self.router.close_needed(pool, server) else 0, self._label(server.id),
                self._label(client.id) if client is not None else "", backend_pid, _tls(server.transport),
                server.params.get("application_name", ""), 0, self._id(server.id),
                _pins(client.pins) if client is not None else ""]

    # ---- commands (admin_users only), as each changes this worker -------------------------------------------

    def _database(self, name: str) -> str:
        if name in ("pgmux", "pgbouncer"):
            raise errors.admin_wrong_state(f"cannot do that to the admin console database: {name}")
        if name not in self.router.database_names():
            raise errors.admin_no_such_database(name)
        return name

    def pause(self, argument: str) -> None:
        router = self.router
        if router.paused_all:
            raise errors.admin_wrong_state("already suspended/paused")
        database = self._database(argument) if argument else None
        if database is not None and router.is_paused(database):
            raise errors.admin_wrong_state(f"database {database} is already paused")
        router.pause(database)

    def resume(self, argument: str) -> None:
        router = self.router
        if self.registry.draining:
            raise errors.admin_wrong_state("pooler is shutting down")
        if argument:
            database = self._database(argument)
            if database not in router.paused:
                raise errors.admin_wrong_state(f"database {database} is not paused")
            router.resume(database)
        else:
            if not router.paused_all and not router.paused:
                raise errors.admin_wrong_state("pooler is not paused/suspended")
            router.resume(None)

    def reconnect(self, argument: str) -> None:
        self.router.reconnect(self._database(argument) if argument else None)

    def kill(self, argument: str) -> None:
        if self.router.paused_all:
            raise errors.admin_wrong_state("already suspended/paused")
        self.lifecycle.kill(self._database(argument) if argument else None)

    def kill_client(self, argument: str, caller: ClientConnection | None = None) -> None:
        """``argument``: this worker's own id of the client (``c42``)."""
        for client in list(self.registry.clients):
            if client.id == argument and client is not caller:
                client.fail(PgError(errors.SqlState.ADMIN_SHUTDOWN,
                                    "terminating connection due to administrator command (KILL_CLIENT)",
                                    severity=errors.Severity.FATAL))
                return
        raise errors.admin_wrong_state("client not found")

    def wait_close(self, argument: str) -> None:
        if argument:
            self._database(argument)

    def reload(self, argument: str) -> None:
        if argument:
            raise errors.admin_unknown_command(f"RELOAD {argument}")
        problem = self.lifecycle.reload()
        if problem is not None:
            raise errors.admin_reload_failed(problem)


class AdminSession:
    """One admin console connection: simple-query commands in, result sets out.

    PAUSE and WAIT_CLOSE answer only once the servers they wait for are gone; queries that arrive
    meanwhile are answered in order after them. With sibling workers (``siblings``), a SHOW answers for the
    whole pgmux (every worker's rows merged: _WHOLE) and a command is run in every worker; a sibling that does
    not answer in time is named in a NOTICE and left out.
    """

    def __init__(self, console: WorkerConsole, client: ClientConnection, can_modify: bool,
                 siblings: Siblings | None = None) -> None:
        self.console = console
        self.registry = console.registry
        self.client = client
        self.can_modify = can_modify
        self.siblings = siblings
        self._scanner = FrameScanner(frozenset(range(256)), max_length=1 << 20)
        self._queue: collections.deque[tuple[int, str]] = collections.deque()  # (message type, query text)
        self._skipping = False  # an extended-protocol message was refused: ignore the rest up to Sync
        self._waiting: asyncio.Task[None] | None = None

    def welcome(self) -> bytes:
        return welcome(ADMIN_PARAMETERS, 0, b"")

    def feed(self, data: bytes) -> None:
        try:
            segments = self._scanner.feed(data)
        except ProtocolViolation as exc:
            self.client.fail(errors.protocol_violation(str(exc)), reason="protocol_error")
            return
        for segment in segments:
            if not isinstance(segment, Frame):
                continue
            if segment.kind == m.TERMINATE:
                self._stop_waiting()
                self.client.close("client sent Terminate")
                return
            if segment.kind == m.QUERY and not self._skipping:
                self._queue.append((m.QUERY, bytes(segment.data[5:-1]).decode("utf-8", "replace")))
            elif segment.kind == m.SYNC:
                self._queue.append((m.SYNC, ""))
                self._skipping = False
            elif not self._skipping:
                # Parse, Bind, Describe, Execute, Flush...: one error, then skip to Sync as a server does.
                self._queue.append((m.PARSE, ""))
                self._skipping = True
        if len(self._queue) > _MAX_QUEUED:
            self.client.flow.pause_for_queue()  # commands pile up behind a PAUSE: stop reading until they are answered
        self._answer_queued()

    def _answer_queued(self) -> None:
        while self._queue and self._waiting is None and self.client.state is ClientState.ADMIN:
            kind, sql = self._queue.popleft()
            if kind == m.SYNC:
                self.client.write(m.ready_for_query())
                continue
            if kind == m.PARSE:
                self.client.write(errors.admin_extended_protocol().to_bytes())
                continue
            reply = self.execute(sql)
            if isinstance(reply, bytes):
                self.client.write(reply)
            else:
                self._waiting = self.registry.spawn(self._answer_later(reply), name=f"admin {self.client.id}")
        if not self._queue:
            self.client.flow.resume_for_queue()

    async def _answer_later(self, reply: Coroutine[Any, Any, bytes]) -> None:
        try:
            self.client.write(await reply)
        finally:
            self._waiting = None
        self._answer_queued()

    def _stop_waiting(self) -> None:
        if self._waiting is not None:
            self._waiting.cancel()
            self._waiting = None

    # ---- dispatch ---------------------------------------------------------------------------------

    def execute(self, sql: str) -> Reply:
        if _EMPTY.match(sql):
            return m.empty_query_response() + m.ready_for_query()
        if _SET.match(sql):
            return failure(PgError(errors.SqlState.FEATURE_NOT_SUPPORTED,
                                   "SET is not supported by the pgmux admin console",
                                   hint="Change the config file (or PGMUX_* environment) and run RELOAD."))
        match = _COMMAND.match(sql)
        if match is None:
            return failure(errors.admin_unknown_command(sql.strip()))
        command = _unquote(match.group(1)).lower()
        argument = _unquote(match.group(2))
        if command in ("show", "select"):
            return self.show(argument.lower(), sql.strip())
        if command not in _COMMANDS and command not in ("kill_client", "shutdown"):
            return failure(errors.admin_unknown_command(sql.strip()))
        if not self.can_modify:
            return failure(errors.admin_access_needed(command.upper()))
        log.info("admin command: %s", sql.strip(), extra={"conn": self.client.id})
        if command == "shutdown":
            return self.shutdown(argument)
        if command == "kill_client":
            return self.kill_client(argument)
        return self.everywhere(command, argument)

    def show(self, what: str, sql: str) -> Reply:
        if what in _FAKE_PARAMETERS:
            return result([(what, "s")], [[_FAKE_PARAMETERS[what]]])
        if what == "help":
            # A NoticeResponse whose detail lists the commands, as PgBouncer answers it.
            notice = b"SNOTICE\x00C00000\x00MConsole usage\x00D\n" + HELP.encode() + b"\x00\x00"
            return m.message(m.NOTICE_RESPONSE, notice) + done("SHOW")
        table = self.console.table(what)
        if table is None:
            return failure(errors.admin_unknown_command(sql))
        merge = _WHOLE.get(what)
        if self.siblings is None or merge is None:
            return result(*table)
        return self._show_whole(self.siblings, what, table, merge)

    async def _show_whole(self, siblings: Siblings, what: str, table: Table, merge: _Merge) -> bytes:
        columns, rows = table
        tables, notices = [rows], []
        for index, answer in sorted((await siblings.ask(ConsoleRequest(SHOW, what))).items()):
            if isinstance(answer, str):
                notices.append(_missing(index, answer))
            else:
                tables.append(answer.rows)
        return b"".join(notices) + result(columns, merge([name for name, _ in columns], tables))

    # ---- commands: in every worker --------------------------------------------------------------------

    def everywhere(self, command: str, argument: str) -> Reply:
        """Run ``command`` in this worker and in every sibling; PAUSE and WAIT_CLOSE then wait until each has
        settled. It fails only where it failed in every worker (as in this one); a sibling where it failed
        while it worked elsewhere, or that did not answer, is named in a NOTICE."""
        tag = command.upper()
        try:
            self.console.run(command, argument, self.client)
            failed: PgError | None = None
        except PgError as exc:
            failed = exc
        if self.siblings is None:
            if failed is not None:
                return failure(failed)
            return self._when(lambda: self.console.settled(command, argument), tag)
        return self._everywhere(self.siblings, command, argument, failed)

    async def _everywhere(self, siblings: Siblings, command: str, argument: str, failed: PgError | None) -> bytes:
        answers = await siblings.ask(ConsoleRequest(COMMAND, command, argument))
        notices: list[bytes] = []
        failed_in: list[bytes] = []  # where it failed: named only if it worked somewhere else
        unsettled: list[int] = []  # the siblings a PAUSE or WAIT_CLOSE waits for: every one that answered
        if failed is not None:
            failed_in.append(errors.notice_response(f"worker {self.console.worker}: {failed.message}"))
        for index, answer in sorted(answers.items()):
            if isinstance(answer, str):
                notices.append(_missing(index, answer))
                continue
            if command in _SETTLING:
                unsettled.append(index)
            if answer.error is not None:
                failed_in.append(errors.notice_response(f"worker {index}: {answer.error[1]}",
                                                        sqlstate=answer.error[0]))
        if failed is not None and \
                all(isinstance(answer, str) or answer.error is not None for answer in answers.values()):
            return b"".join(notices) + failure(failed)
        notices += failed_in
        # The siblings are asked only once this worker has settled: while it has not, there is no answer to give.
        while not self.console.settled(command, argument) or unsettled:
            if self.client.state is ClientState.CLOSED:
                return b""  # the admin left; what it started (a PAUSE) stays in force in every worker
            if self.console.settled(command, argument):
                settled = await siblings.ask(ConsoleRequest(SETTLED, command, argument), unsettled)
                for index, answer in sorted(settled.items()):
                    if isinstance(answer, str):
                        notices.append(_missing(index, answer))  # a dead worker holds no servers: nothing to wait for
                        unsettled.remove(index)
                    elif answer.settled:
                        unsettled.remove(index)
                if not unsettled:
                    break
            await asyncio.sleep(_POLL)
        return b"".join(notices) + done(command.upper())

    def kill_client(self, argument: str) -> Reply:
        """KILL_CLIENT: in the worker the id names (SHOW CLIENTS' id or ptr)."""
        console = self.console
        owner = client_owner(argument, console.workers)
        if owner is None:
            return failure(errors.admin_wrong_state("client not found"))
        worker, client_id = owner
        if worker == console.worker:
            try:
                console.kill_client(client_id, self.client)
            except PgError as exc:
                return failure(exc)
            return done("KILL_CLIENT")
        if self.siblings is None:
            return failure(errors.admin_wrong_state("client not found"))
        return self._kill_elsewhere(self.siblings, worker, client_id)

    async def _kill_elsewhere(self, siblings: Siblings, worker: int, client_id: str) -> bytes:
        answer = (await siblings.ask(ConsoleRequest(COMMAND, "kill_client", client_id), [worker])).get(worker)
        if isinstance(answer, ConsoleAnswer) and answer.error is None:
            return done("KILL_CLIENT")
        why = answer.error[1] if isinstance(answer, ConsoleAnswer) and answer.error else f"{answer}"
        return failure(errors.admin_wrong_state(f"worker {worker}: {why}"))

    def shutdown(self, argument: str) -> Reply:
        """SHUTDOWN: of the whole pgmux (with workers, the Lifecycle asks the supervisor, which stops them all)."""
        mode = argument.lower()
        if mode not in ("", "wait_for_clients", "wait_for_servers"):
            return failure(errors.admin_unknown_command(f"SHUTDOWN {argument}"))
        graceful = bool(mode)
        log.info("SHUTDOWN%s requested on the admin console", f" {mode.upper()}" if mode else "")
        self.console.lifecycle.shutdown(graceful)
        # An immediate SHUTDOWN is answered by the connection closing (PgBouncer does the same).
        return done("SHUTDOWN") if graceful else b""

    def _when(self, condition: Callable[[], bool], tag: str) -> Reply:
        if condition():
            return done(tag)

        async def wait() -> bytes:
            while not condition():
                if self.client.state is ClientState.CLOSED:
                    return b""  # the admin left; what it started (a PAUSE) stays in force
                await asyncio.sleep(_POLL)
            return done(tag)

        return wait()


def _missing(worker: int, why: str) -> bytes:
    """The NOTICE naming a sibling left out of an answer (and the log line saying why)."""
    log.warning("admin console: worker %d left out: %s", worker, why)
    return errors.notice_response(f"worker {worker} did not answer ({why}): left out")


def _config_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, list):
        return ",".join(_config_text(item) if not isinstance(item, dict) else item.get("address", "")
                        for item in value)
    if hasattr(value, "value"):  # an enum default
        return str(value.value)
    return str(value)


_POOLS_COLUMNS: Columns = [("database", "s"), ("user", "s"), *((column, "i") for column in _POOL_COUNTS),
                           ("maxwait", "i"), ("maxwait_us", "i"), ("pool_mode", "s"), ("load_balance_hosts", "s")]
_STATS_TABLE_COLUMNS: Columns = [("database", "s")] + [(name, "N") for name in _STATS_COLUMNS] \
    + [("total_requests", "N")]
_STATS_TOTALS_COLUMNS: Columns = [("database", "s")] + [(name, "N") for name in _TOTALS_NAMES]
_STATS_AVERAGES_COLUMNS: Columns = [("database", "s")] + [(name, "N") for name in _AVERAGES_NAMES]
_DATABASES_COLUMNS: Columns = [
    ("name", "s"), ("host", "s"), ("port", "i"), ("database", "s"), ("force_user", "s"),
    # reserve_pool: PgBouncer's name before 1.24 (reserve_pool_size after). The Debian exporter reads only the
    # old one; the prometheus-community exporter reads either, but both at once would make it export the
    # metric twice.
    ("pool_size", "i"), ("min_pool_size", "i"), ("reserve_pool", "i"), ("server_lifetime", "i"), ("pool_mode", "s"),
    ("load_balance_hosts", "s"), ("max_connections", "i"), ("current_connections", "i"),
    ("max_client_connections", "i"), ("current_client_connections", "i"), ("paused", "i"), ("disabled", "i")]
_USERS_COLUMNS: Columns = [("name", "s"), ("pool_size", "s"), ("reserve_pool_size", "s"), ("pool_mode", "s"),
                           ("max_user_connections", "i"), ("current_connections", "i"),
                           ("max_user_client_connections", "i"), ("current_client_connections", "i")]

_SHOW: dict[str, Callable[[WorkerConsole], Table]] = {
    "version": WorkerConsole.show_version,
    "state": WorkerConsole.show_state,
    "pools": WorkerConsole.show_pools,
    "stats": WorkerConsole.show_stats,
    "stats_totals": WorkerConsole.show_stats_totals,
    "stats_averages": WorkerConsole.show_stats_averages,
    "totals": WorkerConsole.show_totals,
    "databases": WorkerConsole.show_databases,
    "users": WorkerConsole.show_users,
    "lists": WorkerConsole.show_lists,
    "config": WorkerConsole.show_config,
    "clients": WorkerConsole.show_clients,
    "servers": WorkerConsole.show_servers,
}

_SETTLING = frozenset({"pause", "wait_close"})  # the commands answered once every worker has settled (settled())
# The commands every worker runs (KILL_CLIENT runs in the one its id names; SHUTDOWN stops the whole at once).
_COMMANDS: dict[str, Callable[[WorkerConsole, str], None]] = {
    "pause": WorkerConsole.pause,
    "resume": WorkerConsole.resume,
    "reconnect": WorkerConsole.reconnect,
    "kill": WorkerConsole.kill,
    "wait_close": WorkerConsole.wait_close,
    "reload": WorkerConsole.reload,
}

# ---- one SHOW for the whole pgmux: how every worker's rows merge (fanout.merge_rows) -----------------------------
#
# Counts and totals are each worker's own: summed. A limit the workers split into shares (proxy/workers.py:
# min_pool_size, the client limits) is summed too, which gives the configured value back; a backend limit
# (pool_size, max_connections, max_user_connections) holds for the whole pgmux already (proxy/slots.py): taken
# once. The longest wait is the longest of any worker's. Averages per second (transactions, queries, bytes) add
# up; averages per event (a transaction's, a query's time, a wait) are weighted by each worker's rate of those
# events, which makes them the average over every worker's events of the period.

_Merge = Callable[[list[str], list[list[Row]]], list[Row]]
_AVERAGE_TIMES: dict[str, Weighted] = {"xact_time": Weighted("xact_count"), "query_time": Weighted("query_count"),
                                   "wait_time": Weighted("server_assignment_count")}


def _by_rules(rules: dict[str, Rule]) -> _Merge:
    return lambda columns, tables: merge_rows(columns, rules, tables)


def _sum_others(keys: tuple[str, ...], others: dict[str, Rule]) -> _Merge:
    """Rows keyed by ``keys``: ``others``' columns by their rules, every other column summed."""
    def merge(columns: list[str], tables: list[list[Row]]) -> list[Row]:
        rules = {name: KEY if name in keys else others.get(name, SUM) for name in columns}
        return merge_rows(columns, rules, tables)

    return merge


def _named_values(rules: dict[str, Rule]) -> _Merge:
    return lambda columns, tables: merge_named_values(rules, tables)


_WHOLE: dict[str, _Merge] = {
    "pools": _by_rules({"database": KEY, "user": KEY, **{column: SUM for column in _POOL_COUNTS},
                        "maxwait": MAX, "maxwait_us": MICROS, "pool_mode": MODE}),
    "stats": _sum_others(("database",), {f"avg_{name}": Weighted(f"avg_{weight.by}")
                                         for name, weight in _AVERAGE_TIMES.items()}),
    "stats_totals": _sum_others(("database",), {}),
    "stats_averages": _sum_others(("database",), dict(_AVERAGE_TIMES)),
    "totals": _named_values({**{f"total_{name}": SUM for name in _TOTALS_ROW_NAMES},
                             **{f"avg_{name}": SUM for name in _TOTALS_ROW_NAMES},
                             **{f"avg_{name}": Weighted(f"avg_{weight.by}") for name, weight in
                                _AVERAGE_TIMES.items()}}),
    "databases": _by_rules({"name": KEY, "min_pool_size": SUM, "current_connections": SUM,
                            "max_client_connections": SUM, "current_client_connections": SUM, "paused": MAX,
                            "disabled": MAX}),
    "users": _by_rules({"name": KEY, "current_connections": SUM, "max_user_client_connections": SUM,
                        "current_client_connections": SUM}),
    # Connections add up; databases, users and pools are the most any worker knows of (each has its own pools,
    # most of them for the same (database, user)).
    "lists": _named_values({"databases": MAX, "users": MAX, "pools": MAX, "free_clients": SUM,
                            "used_clients": SUM, "login_clients": SUM, "free_servers": SUM, "used_servers": SUM}),
    "config": _named_values({name: SUM for name in SPLIT_LIMITS}),
    "state": _named_values({"active": MODE, "paused": MODE, "suspended": MODE}),
    "clients": lambda columns, tables: concatenate(tables),
    "servers": lambda columns, tables: concatenate(tables),
}
