"""`POST /sql`: Neon's SQL-over-HTTP endpoint, each request run on a pooled backend and answered as Neon does.

The contract (headers, body, answers, errors, CORS) is Neon's proxy's, read from its source and the serverless
driver's (see the README's "Edge runtimes"): `neon()` tagged templates, `sql.query`, `sql.transaction`,
PrismaNeonHTTP and drizzle-orm/neon-http work unmodified with `neonConfig.fetchEndpoint` pointed here.

A request authenticates with the connection string's password (checked as a cleartext password is, against
the secret a TCP login would be checked against), is admitted under the same client limits, borrows a server
of its (database, user) pool for its statements only, and leaves nothing behind on it: a request whose text
may change the session is followed by server_reset_query, and one that timed out is canceled.
"""

from __future__ import annotations

import asyncio
import dataclasses
import struct
import time
from typing import Any, Final
from urllib.parse import parse_qsl, unquote, urlsplit

import orjson

from proxy.auth.secrets import ScramKeys
from proxy.http.exchange import HttpRequest, HttpResponse
from proxy.http.neon_json import error_json, param_to_text, result_json
from proxy.failed_logins import source_address
from proxy.logs import get_logger
from proxy.parameters import SYNCED_PARAMETERS, parameter_sync, parse_startup_parameters
from proxy.pool import Pool
from proxy.prepared import resets_all_statements
from proxy.protocol import errors
from proxy.protocol import messages as m
from proxy.protocol.errors import PgError, SqlState
from proxy.protocol.messages import TransactionStatus
from proxy.protocol.sql_words import LOAD, session_effects
from proxy.registry import HTTP, Registry
from proxy.results import ResultCollector, StatementResult
from proxy.routing import Router
from proxy.server import InternalQueryFailed, ServerConnection
from proxy.states import ServerState

log = get_logger("http")

_ALLOWED_HEADERS: Final = ("Authorization, Content-Type, Neon-Connection-String, Neon-Raw-Text-Output, "
                           "Neon-Array-Mode, Neon-Pool-Opt-In, Neon-Batch-Read-Only, Neon-Batch-Isolation-Level, "
                           "Neon-Batch-Deferrable")
_ISOLATION_LEVELS: Final = {"Serializable": "SERIALIZABLE", "RepeatableRead": "REPEATABLE READ",
                            "ReadCommitted": "READ COMMITTED", "ReadUncommitted": "READ UNCOMMITTED"}
_BATCH_HEADERS: Final = ("Neon-Batch-Isolation-Level", "Neon-Batch-Read-Only", "Neon-Batch-Deferrable")
# URL parameters only libpq reads (how to connect, not what the session is): a driver's connection string
# carries them (sslmode=require is in every Neon URL), and PostgreSQL would refuse them as settings.
_CLIENT_SIDE_PARAMETERS: Final = frozenset({
    "sslmode", "sslrootcert", "sslcert", "sslkey", "sslpassword", "sslcrl", "sslcrldir", "sslsni",
    "sslnegotiation", "sslcompression", "ssl_min_protocol_version", "ssl_max_protocol_version", "requiressl",
    "channel_binding", "gssencmode", "krbsrvname", "gsslib", "gssdelegation", "connect_timeout", "keepalives",
    "keepalives_idle", "keepalives_interval", "keepalives_count", "tcp_user_timeout", "target_session_attrs",
    "load_balance_hosts", "passfile", "service", "host", "hostaddr", "port", "require_auth", "pgbouncer",
    "connection_limit", "pool_timeout", "schema",
})
# After a timeout the canceled query has this long to end before its backend is dropped instead.
_CANCEL_GRACE: Final = 5.0
# SQLSTATE of a request pgmux cannot read (no connection string, no JSON...): PostgreSQL's protocol violation.
_BAD_REQUEST: Final = SqlState.PROTOCOL_VIOLATION.value
_INT16: Final = struct.Struct("!h")
_NULL: Final = m.INT32.pack(-1)  # a Bind parameter's length for NULL


class BadRequest(Exception):
    """A request that is not Neon's SQL-over-HTTP (answered 400 with its message)."""


class _Query:
    __slots__ = ("sql", "params", "array_mode")

    def __init__(self, sql: str, params: list[str | None], array_mode: bool | None) -> None:
        self.sql = sql
        self.params = params
        self.array_mode = array_mode  # the query's own arrayMode, over the Neon-Array-Mode header


@dataclasses.dataclass
class _Login:
    """What the connection string says: who, where, with which session settings."""

    user: str
    password: str
    database: str
    synced: dict[str, str]  # SYNCED_PARAMETERS from the URL (application_name, search_path...)
    unreported: dict[str, str]  # other settings (options=-c name=value, name=value)


class SqlEndpoint:
    """Answers `/sql` requests (the HTTP listener hands it each one, read whole); one per process."""

    def __init__(self, router: Router, registry: Registry[Any]) -> None:
        self.router = router
        self.registry = registry
        self.checks = router.cleartext  # one per process: WebSocket logins and requests share what was checked

    async def __call__(self, request: HttpRequest) -> HttpResponse:
        started = time.monotonic()
        self.registry.accepted[HTTP] += 1  # each request is a client of its own
        login: list[_Login] = []  # filled once the connection string is read: the log line names who asked
        try:
            response = await self._answer(request, login)
        except BadRequest as exc:
            response = _error(400, {"M": str(exc), "C": _BAD_REQUEST, "S": "ERROR"})
        except Exception:  # a bug: the client gets a 500, the log the traceback
            log.exception("HTTP request to %s failed", request.target)
            response = _error(500, {"M": "internal error in pgmux (see its log)",
                                    "C": SqlState.INTERNAL_ERROR.value, "S": "ERROR"})
        response.headers.extend(self._cors(request))
        elapsed = time.monotonic() - started
        self.registry.http.observe(response.status, elapsed)
        who = f"{login[0].user}@{login[0].database}" if login else "-"
        code = f" ({orjson.loads(response.body).get('code')})" if response.status in (400, 500, 507) else ""
        log.info("%s %s %d%s in %.1f ms: %s from %s", request.method, request.target, response.status, code,
                 elapsed * 1000, who, request.peer)
        return response

    def _cors(self, request: HttpRequest) -> list[tuple[str, str]]:
        allowed = self.router.settings.http_allowed_origins
        if "*" in allowed:
            return [("Access-Control-Allow-Origin", "*")]
        origin = request.headers.get("origin")
        if origin is not None and origin in allowed:
            return [("Access-Control-Allow-Origin", origin), ("Vary", "Origin")]
        return [("Vary", "Origin")]

    async def _answer(self, request: HttpRequest, login: list[_Login]) -> HttpResponse:
        if request.method == "OPTIONS":
            return HttpResponse(200, [("Allow", "OPTIONS, POST"), ("Access-Control-Allow-Methods", "OPTIONS, POST"),
                                      ("Access-Control-Allow-Headers", _ALLOWED_HEADERS),
                                      ("Access-Control-Max-Age", "86400")])
        if request.method != "POST":
            return HttpResponse(405, [("Allow", "OPTIONS, POST"), ("Content-Type", "text/plain")],
                                b"only POST (and OPTIONS) are served on /sql\n")
        headers = request.headers
        login.append(_read_connection_string(headers.get("neon-connection-string"), self.router))
        queries, batch = _read_body(request.body)
        begin = _begin_statement(headers) if batch else None
        try:
            scram_keys = await self._authenticate(login[0], request.peer)
            return await self._run_admitted(login[0], scram_keys, queries, begin, headers)
        except PgError as exc:
            if exc.reason:
                self.registry.count_rejection(exc.reason)
            return _error(400, _pg_error_fields(exc))

    # ---- who is asking -------------------------------------------------------------------------

    async def _authenticate(self, login: _Login, peer: str) -> ScramKeys | None:
        """Check the password as a TCP login's would be (rate limit, auth_query included); the SCRAM keys that
        log a looked-up user in upstream as itself, when its secret is a SCRAM verifier."""
        registry, router = self.registry, self.router
        settings = router.settings
        address = source_address(peer)
        now = time.monotonic()
        if registry.draining:
            raise dataclasses.replace(errors.shutting_down(), reason="shutdown")
        if address:
            retry_in = registry.failed_logins.blocked_for(address, now, settings.auth_failure_limit,
                                                          settings.auth_failure_window)
            if retry_in:
                registry.count_auth_failure("rate_limited", HTTP)
                raise dataclasses.replace(errors.too_many_failed_logins(address, retry_in),
                                          reason="auth_rate_limited")
        refusal = router.admission.refusal(login.database, login.user)
        if refusal is not None:
            raise dataclasses.replace(refusal[0], reason=refusal[1])
        secret = router.login_secret(login.database, login.user)
        if secret is None and router.looks_up(login.database, login.user):
            secret = await router.looked_up_secret(login.database, login.user)
        ok, keys = self.checks.check(secret, login.user, login.password)
        if ok:
            registry.logins[HTTP] += 1
            return keys
        if address:
            registry.failed_logins.failed(address, now, settings.auth_failure_window)
        if not router.serves_database(login.database):
            registry.count_auth_failure("unknown_database", HTTP)
            reason = "unknown_database"
            log.warning("HTTP login refused: database %r does not exist in pgmux (the client is told: wrong "
                        "password)", login.database)
        else:
            registry.count_auth_failure("wrong_password" if secret is not None else "unknown_user", HTTP)
            reason = "auth_failed"
            log.warning("HTTP authentication failed for user %r from %s", login.user, address or "a Unix socket")
        raise dataclasses.replace(errors.password_authentication_failed(login.user), reason=reason)

    async def _run_admitted(self, login: _Login, scram_keys: ScramKeys | None, queries: list[_Query],
                            begin: str | None, headers: dict[str, str]) -> HttpResponse:
        router = self.router
        refusal = router.admission.admit(login.database, login.user)
        if refusal is not None:
            raise dataclasses.replace(refusal[0], reason=refusal[1])
        pool = router.login_pool(login.database, login.user, scram_keys)
        try:
            return await self._run(pool, login, queries, begin, headers)
        finally:
            pool.clients -= 1  # counted in by Router.login_pool
            router.admission.leave(login.database, login.user)

    # ---- running the statements ------------------------------------------------------------------

    async def _run(self, pool: Pool, login: _Login, queries: list[_Query], begin: str | None,
                   headers: dict[str, str]) -> HttpResponse:
        settings = self.router.settings
        timeout = settings.http_request_timeout
        deadline = time.monotonic() + timeout if timeout else None
        request, replies = _request_messages(queries, begin)
        collector = ResultCollector(int(settings.http_max_response_size))
        try:
            async with asyncio.timeout_at(_loop_time(deadline)):
                server = await pool.acquire()
        except TimeoutError:
            return _error(400, _timeout_fields(timeout))
        linked_at = time.monotonic()
        timed_out = False
        done: asyncio.Future[None] | None = None
        try:
            try:
                async with asyncio.timeout_at(_loop_time(deadline)):
                    await self._sync_parameters(pool, server, login)
                    done = server.send_statements(request, replies, collector)
                    await asyncio.shield(done)
            except TimeoutError:
                timed_out = True
                await _cancel(pool, server, done)
        except InternalQueryFailed as failed:
            server.stop_collecting()
            pool.abort_server(server, f"HTTP request failed: {failed}")
            if failed.fields is not None:
                return _error(400, failed.fields)
            raise errors.upstream_unavailable("the server connection was lost") from None
        except BaseException:  # the listener gave up on the request (the client left): stop what runs
            server.stop_collecting()
            pool.cancel(server)
            pool.abort_server(server, "HTTP request abandoned with a query in progress")
            raise
        server.stop_collecting()
        self._give_back(pool, server, queries, linked_at)
        if timed_out:
            return _error(400, _timeout_fields(timeout))
        return _answer_json(collector, queries, begin is not None, headers, int(settings.http_max_response_size))

    async def _sync_parameters(self, pool: Pool, server: ServerConnection, login: _Login) -> None:
        """The backend gets the pool's defaults, with the connection string's settings over them: nothing a
        previous client set reaches the request."""
        wanted = {name: value for name, value in (pool.server_params or {}).items() if name in SYNCED_PARAMETERS}
        wanted.update(login.synced)
        wanted["client_encoding"] = "UTF8"  # the answer is JSON: UTF-8 text
        sync = parameter_sync(wanted, login.unreported, server.params, server.unreported, in_transaction=False)
        if sync is not None:
            await server.apply_parameters(sync)

    def _give_back(self, pool: Pool, server: ServerConnection, queries: list[_Query], linked_at: float) -> None:
        """Back to the pool as the next client must find it: no transaction, no session state of this request."""
        stats = pool.stats
        elapsed = time.monotonic() - linked_at
        stats.server_assignments += 1
        stats.xacts += 1
        stats.queries += len(queries)
        stats.xact_time += elapsed
        stats.xact_histogram.observe(elapsed)
        if server.state is not ServerState.ACTIVE:
            return  # already dropped (a cancel that did not end its query)
        if not server.usable:
            pool.abort_server(server, "the server connection broke during an HTTP request")
            return
        effects: set[str] = set()
        for query in queries:
            effects |= session_effects(query.sql.encode())
        if LOAD in effects:
            pool.close_server(server, "an HTTP request ran LOAD: no reset unloads a library")
            return
        cleanup = []
        if server.tx_status is not TransactionStatus.IDLE:
            cleanup.append("ROLLBACK")
        if effects or server.unclean:
            reset_query = pool.config.server_reset_query
            if not resets_all_statements(reset_query):
                pool.close_server(server, "an HTTP request may have changed session state and server_reset_query "
                                          "does not discard it")
                return
            cleanup.append(reset_query)
            server.prepared.deallocating_all()
            server.forget_unreported()
            server.unclean = False
        if cleanup:
            pool.reset_and_release(server, cleanup, "after an HTTP request")
        else:
            pool.release(server)


async def _cancel(pool: Pool, server: ServerConnection, done: asyncio.Future[None] | None) -> None:
    """The request timed out: have PostgreSQL cancel what runs, and wait a little for its answer to end;
    a backend whose answer does not end is dropped."""
    pool.cancel(server)
    if done is None:  # timed out in the parameter sync: its reply, still to come, must reach nobody
        pool.abort_server(server, "an HTTP request timed out while its parameters were being applied")
        return
    try:
        async with asyncio.timeout(_CANCEL_GRACE):
            await asyncio.shield(done)
    except TimeoutError:
        server.stop_collecting()
        pool.abort_server(server, f"its query did not end within {_CANCEL_GRACE:g}s of a cancel")


def _loop_time(deadline: float | None) -> float | None:
    """A time.monotonic() deadline on the loop's clock (the same clock, as asyncio's default loop and uvloop
    use it; converted anyway so that neither needs to)."""
    if deadline is None:
        return None
    return asyncio.get_running_loop().time() + (deadline - time.monotonic())


def _timeout_fields(timeout: float) -> dict[str, str]:
    return {"C": SqlState.QUERY_CANCELED.value, "S": "ERROR",
            "M": f"canceling statement due to http_request_timeout={timeout:g}s",
            "H": "Shorten the query, or raise http_request_timeout in the pgmux config."}


# ---- reading the request -----------------------------------------------------------------------------


def _read_connection_string(value: str | None, router: Router) -> _Login:
    if not value:
        raise BadRequest("missing Neon-Connection-String header: it must hold the postgres:// URL to connect with")
    try:
        url = urlsplit(value)
        host = url.hostname
    except ValueError:
        raise BadRequest("Neon-Connection-String is not a URL") from None
    if url.scheme not in ("postgres", "postgresql"):
        raise BadRequest("Neon-Connection-String must be a postgres:// or postgresql:// URL")
    user = unquote(url.username or "")
    database = unquote(url.path.lstrip("/"))
    if not user or not database:
        raise BadRequest("Neon-Connection-String must name a user and a database")
    if host:  # like a TLS host name (SNI): it may select a configured database, and is never dialled
        database = router.database_for_server_name(host) or database
    ignored = set(router.settings.ignore_startup_parameters) | _CLIENT_SIDE_PARAMETERS
    try:
        parsed = parse_startup_parameters(dict(parse_qsl(url.query)), ignored)
    except PgError as exc:
        raise BadRequest(f"Neon-Connection-String: {exc.message}") from None
    return _Login(user, unquote(url.password or ""), database, parsed.synced, parsed.unreported)


def _read_body(body: bytes) -> tuple[list[_Query], bool]:
    """The queries and whether they are a batch (one transaction)."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"the request body is not JSON: {exc}") from None
    if isinstance(data, dict) and "queries" in data:
        items = data["queries"]
        if not isinstance(items, list):
            raise BadRequest('"queries" must be a list of {"query": ..., "params": [...]}')
        return [_read_query(item) for item in items], True
    return [_read_query(data)], False


def _read_query(item: Any) -> _Query:
    if not isinstance(item, dict) or not isinstance(item.get("query"), str):
        raise BadRequest('a query must be {"query": "SELECT ...", "params": [...]}')
    sql = item["query"]
    params = item.get("params", [])
    if not isinstance(params, list):
        raise BadRequest('"params" must be a list')
    if "\x00" in sql:
        raise BadRequest("a query cannot contain a NUL character")
    array_mode = item.get("arrayMode")
    return _Query(sql, [param_to_text(value) for value in params],
                  array_mode if isinstance(array_mode, bool) else None)


def _flag(headers: dict[str, str], name: str) -> bool | None:
    value = headers.get(name.lower())
    return None if value is None else value.strip().lower() == "true"


def _begin_statement(headers: dict[str, str]) -> str:
    """BEGIN with the batch's isolation level, read-only and deferrable modes (Neon-Batch-* headers)."""
    parts = ["BEGIN"]
    level = headers.get("neon-batch-isolation-level")
    if level is not None:
        if level not in _ISOLATION_LEVELS:
            raise BadRequest(f"Neon-Batch-Isolation-Level must be one of {', '.join(_ISOLATION_LEVELS)}")
        parts.append(f"ISOLATION LEVEL {_ISOLATION_LEVELS[level]}")
    read_only = _flag(headers, "Neon-Batch-Read-Only")
    if read_only is not None:
        parts.append("READ ONLY" if read_only else "READ WRITE")
    deferrable = _flag(headers, "Neon-Batch-Deferrable")
    if deferrable is not None:
        parts.append("DEFERRABLE" if deferrable else "NOT DEFERRABLE")
    return " ".join(parts)


def _request_messages(queries: list[_Query], begin: str | None) -> tuple[bytes, int]:
    """The extended-protocol messages of the queries (each its own Sync), a batch inside BEGIN ... COMMIT,
    sent in one write; and how many ReadyForQuery answer them.

    A batch is pipelined: after a failure PostgreSQL refuses the rest (25P02) and turns COMMIT into ROLLBACK,
    so nothing after the first error runs, as when Neon sends them one by one.
    """
    parts = [m.query(begin)] if begin is not None else []
    parts.extend(_statement(query) for query in queries)
    if begin is not None:
        parts.append(m.query("COMMIT"))
    return b"".join(parts), len(parts)


def _statement(query: _Query) -> bytes:
    """Parse (unnamed, no parameter types), Describe, Bind (text parameters), Execute, Sync."""
    values = [_NULL if value is None else _sized(value.encode()) for value in query.params]
    return b"".join((
        m.message(m.PARSE, b"\x00" + m.cstring(query.sql) + b"\x00\x00"),
        m.message(m.DESCRIBE, b"S\x00"),
        m.message(m.BIND, b"\x00\x00\x00\x00" + _INT16.pack(len(values)) + b"".join(values) + b"\x00\x00"),
        m.message(m.EXECUTE, b"\x00\x00\x00\x00\x00"),
        m.message(m.SYNC),
    ))


def _sized(value: bytes) -> bytes:
    return m.INT32.pack(len(value)) + value


# ---- the answer ----------------------------------------------------------------------------------


def _answer_json(collector: ResultCollector, queries: list[_Query], batch: bool, headers: dict[str, str],
                 limit: int) -> HttpResponse:
    results = collector.results
    failed = next((result for result in results if result.error is not None), None)
    if failed is not None:
        assert failed.error is not None
        return _error(400, failed.error)
    if collector.overflow:
        return _too_large(limit)
    raw_text = _flag(headers, "Neon-Raw-Text-Output") is True
    default_array_mode = _flag(headers, "Neon-Array-Mode") is True
    statements: list[StatementResult] = results[1:-1] if batch else results
    try:
        answers = [result_json(result, default_array_mode if query.array_mode is None else query.array_mode,
                               raw_text) for result, query in zip(statements, queries)]
    except ValueError as exc:
        return _error(400, {"C": SqlState.INTERNAL_ERROR.value, "S": "ERROR",
                            "M": f"a value could not be converted to JSON: {exc}"})
    body = orjson.dumps({"results": answers} if batch else answers[0])
    if len(body) > limit:
        return _too_large(limit)
    response = HttpResponse(200, [("Content-Type", "application/json")], body)
    if batch:  # Neon echoes the batch's transaction modes
        response.headers.extend((name, headers[name.lower()]) for name in _BATCH_HEADERS if name.lower() in headers)
    return response


def _too_large(limit: int) -> HttpResponse:
    return _error(507, {"M": f"response is too large (max is {limit} bytes): http_max_response_size",
                        "C": SqlState.PROGRAM_LIMIT_EXCEEDED.value, "S": "ERROR"})


def _pg_error_fields(error: PgError) -> dict[str, str]:
    code = error.sqlstate.value if isinstance(error.sqlstate, SqlState) else error.sqlstate
    # A login's refusals are FATAL on a connection; a request has no connection to end.
    fields = {"M": error.message, "C": code, "S": errors.Severity.ERROR.value}
    if error.detail:
        fields["D"] = error.detail
    if error.hint:
        fields["H"] = error.hint
    return fields


def _error(status: int, fields: dict[str, str]) -> HttpResponse:
    return HttpResponse(status, [("Content-Type", "application/json")], error_json(fields))
