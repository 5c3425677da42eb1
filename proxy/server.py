"""ServerConnection: one backend connection and its lifecycle — connect, TLS, login, relay to a client, reset."""

from __future__ import annotations

import asyncio
import functools
import itertools
import os
import socket
import ssl
import time
from collections.abc import Callable
from typing import Final, cast

from mypy_extensions import trait

from proxy.auth.server_auth import ServerAuthenticator, ServerAuthError
from proxy.flow import FlowControl
from proxy.logs import get_logger
from proxy.parameters import SYNCED_PARAMETERS, UNKNOWN_VALUE, ParameterSync, set_search_path_sql
from proxy.protocol import messages as m
from proxy.protocol.errors import parse_error_fields
from proxy.protocol.framing import Frame, FrameScanner, ProtocolViolation, Segment, kind_flags
from proxy.prepared import ClientStatements, ServerPrepared, Statement
from proxy.results import COLLECTED_KINDS, ResultCollector
from proxy.session_state import SessionReport, inspection_sql, parse_data_row, read_report
from proxy.protocol.startup import build_cancel_request, build_ssl_request, build_startup_message
from proxy.settings import SslMode, Upstream
from proxy.sockets import (
    PARSE_COMPLETE,
    READY,
    SERVER_EDGE,
    RelayEdge,
    bytes_waiting,
    connect,
    deliver_cancel_request,
    open_transport,
    relay_edge,
    relay_table,
)
from proxy.states import ServerState
from proxy.stats import PoolStats

# A C static when compiled, where time.monotonic is a lookup per call (see pool.py).
_monotonic: Final = time.monotonic

log = get_logger("server")
_ids = itertools.count(1)

# What the relay must look at in server traffic; everything else streams through undecoded.
# CopyInResponse (once per COPY FROM STDIN): the Syncs the client sends during it go unanswered.
# ParameterDescription (once per Describe of a statement): held, like ParseComplete, while a batch may be re-sent.
# NotificationResponse (once per NOTIFY heard): its sender pid becomes the one the sender's client was given.
_RELAY_CAPTURE = frozenset({m.READY_FOR_QUERY, m.PARAMETER_STATUS, m.ERROR_RESPONSE, m.PARSE_COMPLETE,
                            m.COPY_IN_RESPONSE, m.PARAMETER_DESCRIPTION, m.NOTIFICATION_RESPONSE})
_LOGIN_CAPTURE = frozenset(range(256))
_RELAY_FLAGS: Final = kind_flags(_RELAY_CAPTURE, frozenset(), frozenset())
# What the compiled relay may send on to the client itself (proxy/_relay.c): all but what pgmux looks at,
# and of that the ReadyForQuery ending a read and ParseComplete, which it reports (ServerConnection.relayed).
_RELAY_TABLE: Final = relay_table(frozenset(range(256)) - _RELAY_CAPTURE | {m.READY_FOR_QUERY, m.PARSE_COMPLETE},
                                  {m.READY_FOR_QUERY: READY, m.PARSE_COMPLETE: PARSE_COMPLETE})
# While pgmux reads what a session holds (inspect_session), the rows of its answer are looked at too.
_INSPECTING_FLAGS: Final = kind_flags(_RELAY_CAPTURE | {m.DATA_ROW}, frozenset(), frozenset())
# While statements run for the HTTP endpoint (send_statements), their whole answer is looked at.
_COLLECTING_FLAGS: Final = kind_flags(_RELAY_CAPTURE | COLLECTED_KINDS, frozenset(), frozenset())
# A COPY FROM STDIN in a statement run for the HTTP endpoint: there is no client to send the data.
_COPY_FAIL: Final = m.message(m.COPY_FAIL, m.cstring("COPY FROM STDIN is not supported over HTTP"))
_TX_STATUS: Final = m.TRANSACTION_STATUS_BY_BYTE
_IDLE_BYTE: Final = m.TransactionStatus.IDLE.value
_IDLE_STATUS: Final = m.TransactionStatus.IDLE
_SYNC: Final = m.message(m.SYNC)
_FETCHED_LIMIT: Final = 1 << 20  # row bytes kept of fetch_internal's answer (pgmux's own small queries)


def _relayed_as_read(segments: list) -> bool:
    """True unless a ReadyForQuery is followed by more bytes in the same read (the link may end there), or
    a NotificationResponse is in it (its sender pid may change): then the read is relayed segment by segment."""
    last = len(segments) - 1
    for index in range(last + 1):
        segment = segments[index]
        if isinstance(segment, Frame):
            kind = segment.kind
            if kind == m.NOTIFICATION_RESPONSE or (kind == m.READY_FOR_QUERY and index != last):
                return False
    return True


class Backends:
    """pgmux's logged-in backends by upstream address and process id: whose NOTIFY a notification relays.

    Kept as backends log in and go (never per transaction). Shared by all pools: a sender may belong to
    any pool with the same upstream server.
    """

    __slots__ = ("_servers",)

    def __init__(self) -> None:
        self._servers: dict[tuple[str, int, int], ServerConnection] = {}

    def add(self, server: ServerConnection) -> None:
        if server.backend_key is not None:
            self._servers[_address(server.upstream, server.backend_key[0])] = server

    def remove(self, server: ServerConnection) -> None:
        if server.backend_key is not None:
            key = _address(server.upstream, server.backend_key[0])
            if self._servers.get(key) is server:
                del self._servers[key]

    def client_pid(self, upstream: Upstream, backend_pid: int) -> int:
        """The process id given to the client that backend ``backend_pid`` of ``upstream`` serves or last
        served; ``backend_pid`` itself when it is not pgmux's or has served nobody yet."""
        server = self._servers.get(_address(upstream, backend_pid))
        if server is None or not server.client_pid:
            return backend_pid
        return server.client_pid


def _address(upstream: Upstream, backend_pid: int) -> tuple[str, int, int]:
    """One backend of one PostgreSQL server (the pools of two users share the server, and its pids)."""
    return upstream.host, upstream.port, backend_pid


@trait
class ClientPeer:
    """What a server calls on the client it is linked to (client.ClientConnection implements it).

    A mypyc trait, not a typing.Protocol: compiled, each call stays a native vtable call.
    """

    __slots__ = ()  # interpreted, a base without slots would give every client a __dict__

    id: str
    statements: ClientStatements | None  # the client's named statements, when pgmux rewrites them
    replay: list[Segment] | None  # the batch in flight, while it may be re-sent (see _hold_for_replay)
    pins: frozenset[str]  # the session-only state that keeps the client on this server (transaction mode)
    relay_transport: RelayEdge | None  # its compiled transport, when the relay may write to it itself

    def write(self, data: bytes | memoryview) -> None:
        raise NotImplementedError

    def pause_reading(self) -> None:
        """The server's write buffer is full: stop reading the client until it drains."""
        raise NotImplementedError

    def resume_reading(self) -> None:
        raise NotImplementedError

    def on_ready_for_query(self, status: m.TransactionStatus) -> None:
        raise NotImplementedError

    def on_parameter_status(self, name: str, value: str) -> None:
        raise NotImplementedError

    def on_parameter_sync_done(self) -> None:
        raise NotImplementedError

    def on_parameter_sync_failed(self, error: dict[str, str]) -> None:
        raise NotImplementedError

    def on_session_inspected(self, report: SessionReport | None) -> None:
        """What the session holds now (inspect_session), or None when PostgreSQL did not say."""
        raise NotImplementedError

    def on_copy_in(self) -> None:
        raise NotImplementedError

    def on_stale_plan(self) -> None:
        raise NotImplementedError

    def resend_batch(self, reason: str) -> None:
        """The kept batch failed because the server lost pgmux's statements (``reason``, for the log), or
        held a stale one: send it again."""
        raise NotImplementedError

    def forget_replay(self) -> None:
        """The answer to the kept batch has begun: it will not be sent again."""
        raise NotImplementedError

    def on_server_lost(self, server: ServerConnection) -> None:
        """The server died while linked to this client (called by its pool)."""
        raise NotImplementedError


def _names_a_lost_statement(fields: dict[str, str]) -> bool:
    """An ErrorResponse saying one of pgmux's own statements does not exist (quotes differ by lc_messages)."""
    return fields.get("C") == "26000" and "pgmux_" in fields.get("M", "")


def _names_a_vanished_type(fields: dict[str, str]) -> bool:
    """An ErrorResponse of a statement whose parameter types, fixed when it was prepared, no longer exist.

    PostgreSQL re-analyses a statement after a schema change with the parameter types it was prepared with;
    after DROP TYPE one of them is gone. A fresh Parse of the same text infers them afresh and succeeds.
    """
    return fields.get("C") == "XX000" and "cache lookup failed for type" in fields.get("M", "")


class ServerLoginError(Exception):
    """The backend could not be reached or refused the login.

    ``reason`` is for the log (no password, but PostgreSQL's own text may name users, databases and
    hosts); ``shown`` is what a client may be told: no upstream host, port or user.
    """

    def __init__(self, reason: str, sqlstate: str | None = None, shown: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.sqlstate = sqlstate
        self.shown = reason if shown is None else shown


class InternalQueryFailed(Exception):
    """A query pgmux ran for itself (reset, rollback) failed: the server is in an unknown state.

    ``fields`` are the server's ErrorResponse fields when it refused the query, None when no answer came.
    """

    def __init__(self, reason: str, fields: dict[str, str] | None = None) -> None:
        super().__init__(reason)
        self.fields = fields


@functools.lru_cache(maxsize=64)
def _ssl_context(sslmode: SslMode, sslrootcert: str | None) -> ssl.SSLContext:
    if sslmode in (SslMode.VERIFY_CA, SslMode.VERIFY_FULL) or (sslmode is SslMode.REQUIRE and sslrootcert):
        context = ssl.create_default_context(cafile=sslrootcert)
        # verify-ca checks the chain only; like libpq, the host name is checked for verify-full alone.
        context.check_hostname = sslmode is SslMode.VERIFY_FULL
        return context
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


class ServerConnection:
    """A backend connection: logs in once, then relays to whichever client the pool links it to.

    An asyncio protocol by its methods (see ClientConnection for why it does not inherit one).

    While ``swallow`` is positive the server is answering queries pgmux sent itself (parameter
    sync, reset, rollback): those replies are consumed here, up to that many ReadyForQuery.
    """

    def __init__(self, upstream: Upstream, on_lost: Callable[["ServerConnection"], None], stats: PoolStats,
                 backends: Backends) -> None:
        self.id = f"s{next(_ids)}"
        self.upstream = upstream
        self.backends = backends
        self.stats = stats  # its pool's: what it sends to clients is counted there
        self.state = ServerState.LOGIN
        self.transport: asyncio.Transport | None = None
        self.relay_transport: RelayEdge | None = None  # the transport, once logged in, if the compiled relay drives it
        self.flow = FlowControl()
        self.client: ClientPeer | None = None
        self.params: dict[str, str] = {}  # what the server reported with ParameterStatus
        self.unreported: dict[str, str] = {}  # settings of the session beyond those it reports (pgmux's and clients')
        self.reported: frozenset[str] = frozenset()  # what the backend reported at login: it reports their changes
        # A client's parameter dicts (replaced, never changed in place) this backend was last found to hold:
        # the next link with the same dicts is one identity check, not a comparison of every value. Forgotten
        # whenever params or unreported change (_parameters_changed).
        self._held_params: dict[str, str] | None = None
        self._held_unreported: dict[str, str] | None = None
        self.backend_key: tuple[int, int] | None = None
        # The process id the client it serves, or last served, was given (0: none yet): a NOTIFY sent
        # through this backend reaches listeners with it (Backends.client_pid). Set on each link.
        self.client_pid = 0
        self.tx_status = m.TransactionStatus.IDLE
        self.swallow = 0
        self.created_at = _monotonic()
        self.idle_since = self.created_at
        self.closing_since = 0.0  # when the pool began closing it (the janitor enforces a deadline)
        self.close_reason: str | None = None
        self._terminated = False  # Terminate sent: the backend's own close ends the connection
        self._on_lost = on_lost
        self._scanner = FrameScanner(_LOGIN_CAPTURE, max_length=1 << 20)
        self._login_frames: asyncio.Queue[Frame | None] | None = asyncio.Queue()
        self._internal_done: asyncio.Future[None] | None = None
        self._internal_error: dict[str, str] | None = None  # ErrorResponse fields of pgmux's own query
        self._collector: ResultCollector | None = None  # the answer to send_statements' request, while it runs
        self._sync: ParameterSync | None = None  # a parameter sync sent and not yet answered
        self._sync_replies_left = 0  # pgmux's own ReadyForQuery still to come, the sync's the last of them
        self._sync_error: dict[str, str] | None = None  # the sync's ErrorResponse fields, if it failed
        self.prepared = ServerPrepared(self.params)  # named statements this backend holds (transaction mode)
        self.fatal_relayed = False  # the backend sent its client a FATAL: the client needs no other error
        self.being_canceled = 0  # cancels sent to this backend whose connection PostgreSQL has not closed yet
        self.cancel_failed = False  # a cancel was not confirmed: its signal may still come, so never lend it again
        # True while the compiled relay reports a read that ended with a ReadyForQuery: nothing of that read
        # is left to deliver, so a waiting client may be given this server at once (Pool._hand_over).
        self.read_delivered = False
        # While the client keeps its batch to re-send (ClientConnection.replay): the answer's first replies,
        # held until they show whether the statements were lost (then they never reach the client).
        self._held_answer: list[bytes | memoryview] = []
        self._inspection: list[list[str | None]] | None = None  # the rows of a session inspection under way
        self._inspection_replies_left = 0  # pgmux's own ReadyForQuery still to come, the inspection's the last
        self._inspection_error: dict[str, str] | None = None
        # What the session holds is unknown (an inspection failed): reset it before anyone else uses it.
        self.unclean = False

    def __repr__(self) -> str:
        return f"<ServerConnection {self.id} {self.state.value} {self.upstream.redacted()}>"

    # ---- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = self.flow.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        try:
            segments = self._scanner.feed(data)
        except ProtocolViolation as exc:
            self.abort(f"server sent an invalid message: {exc}")
            return
        if self._login_frames is not None:
            for segment in segments:
                self._login_frames.put_nowait(segment)  # type: ignore[arg-type]
            return
        client = self.client
        if (client is not None and client.replay is not None and segments and not isinstance(segments[0], Frame)
                and not self.swallow and not self._held_answer):
            client.forget_replay()  # the answer begins with a reply to it: the statements were there
        if (client is not None and not self.swallow and not self.prepared.injected and client.replay is None
                and self._scanner.verbatim and _relayed_as_read(segments)):
            # The common case: every byte goes to the client as it is; only a few frames are looked at.
            client.write(data)
            self.stats.bytes_sent += len(data)
            for segment in segments:
                if isinstance(segment, Frame):
                    self._relay_frame(segment, client)
            return
        # Slow path: some bytes are pgmux's own, or the link may end inside this read (then what
        # follows the last ReadyForQuery belongs to no client).
        out: list[bytes | memoryview] = []
        for segment in segments:
            client = self.client
            if isinstance(segment, Frame):
                if segment.kind == m.NOTIFICATION_RESPONSE:
                    # The client's even while pgmux's own query runs: it answers no request.
                    if client is not None:
                        out.append(self._with_client_pid(segment.data))
                elif self.swallow:
                    self._swallow_frame(segment)
                elif client is not None:
                    if client.replay is not None and self._hold_for_replay(segment, client, out):
                        continue
                    if segment.kind == m.PARSE_COMPLETE:
                        if self.prepared.on_parse_complete():
                            out.append(segment.data)
                        continue
                    out.append(segment.data)
                    if segment.kind == m.READY_FOR_QUERY:
                        self._flush(out, client)  # the client must have its answer before a release
                    self._relay_frame(segment, client)
                else:
                    self._unsolicited(segment)
            elif client is not None and not self.swallow:
                if client.replay is not None:
                    self._release_held(out, client)
                out.append(segment)
        if self.client is not None:
            self._flush(out, self.client)

    def _hold_for_replay(self, frame: Frame, client: ClientPeer, out: list[bytes | memoryview]) -> bool:
        """Look at a frame of the answer to a batch the client may re-send; True when it is consumed here.

        ParseCompletes and ParameterDescriptions are held (a Parse or Describe runs nothing). A 26000 naming
        one of pgmux's statements, or a parameter type gone since one was prepared, means the batch failed
        before anything of it ran: what was held is dropped and the client sends the batch again, its
        statements prepared afresh. Any other reply shows the statements were there and sound: what was
        held goes on to the client.
        """
        kind = frame.kind
        if kind == m.PARSE_COMPLETE:
            if self.prepared.on_parse_complete():
                self._held_answer.append(frame.data)
            return True
        if kind == m.PARAMETER_DESCRIPTION:
            self._held_answer.append(frame.data)
            return True
        if kind == m.ERROR_RESPONSE:
            fields = parse_error_fields(frame.data[5:])
            if _names_a_lost_statement(fields):
                self._held_answer.clear()
                client.resend_batch("the server had lost pgmux's prepared statements (something it ran "
                                    "deallocated them)")
                return True
            if _names_a_vanished_type(fields):
                self._held_answer.clear()
                client.on_stale_plan()
                client.resend_batch("a prepared statement's parameter type was dropped")
                return True
        self._release_held(out, client)
        return False

    def skip_failed_batch(self, send_sync: bool) -> None:
        """The rest of the answer to a failed batch, up to its ReadyForQuery, is pgmux's to consume.

        ``send_sync``: the client has not ended the batch yet (it sent Flush and waits), so pgmux ends it.
        """
        if send_sync:
            self.write(_SYNC)
        self.swallow += 1

    def _release_held(self, out: list[bytes | memoryview], client: ClientPeer) -> None:
        """The answer to the kept batch is the client's after all: nothing will be re-sent."""
        client.forget_replay()
        out.extend(self._held_answer)
        self._held_answer.clear()

    def _with_client_pid(self, notification: bytes | memoryview) -> bytes | memoryview:
        """A NotificationResponse with the sender's pid as the sender's client was told it, when the
        sender is one of pgmux's backends (in session mode that is the backend's own pid)."""
        sender = int.from_bytes(notification[5:9], "big")
        told = self.backends.client_pid(self.upstream, sender)
        if told == sender:
            return notification
        return b"".join((notification[:5], told.to_bytes(4, "big"), notification[9:]))

    def _flush(self, out: list[bytes | memoryview], client: ClientPeer) -> None:
        if out:
            joined = b"".join(out)
            out.clear()
            client.write(joined)
            self.stats.bytes_sent += len(joined)

    def relay_target(self) -> object | None:
        """The linked client's compiled transport, when a read of whole messages none of which pgmux needs to
        look at may go to it as it is (see proxy/_relay.c): exactly when data_received's common case would
        send it so. None: the read comes to data_received."""
        client = self.client
        if (client is None or self.swallow or self.prepared.injected or client.replay is not None
                or self._login_frames is not None or not self._scanner.at_boundary):
            return None
        return client.relay_transport

    def relayed(self, nbytes: int, status: int, parse_completes: int) -> None:
        """The compiled relay sent the client ``nbytes`` since it last said, holding ``parse_completes``
        ParseCompletes and ending in a ReadyForQuery with transaction status byte ``status`` (-1: none)."""
        self.stats.bytes_sent += nbytes
        for _unused in range(parse_completes):
            self.prepared.on_parse_complete()
        client = self.client
        if status >= 0 and client is not None:
            self.read_delivered = True
            try:
                self._ready(status, client)
            finally:
                self.read_delivered = False

    def _ready(self, status_byte: int, client: ClientPeer) -> None:
        """A ReadyForQuery reached the client: the transaction status, and the client's turn to decide."""
        # Idle, the usual answer, without a dict lookup (an int boxed and hashed per transaction).
        self.tx_status = status = _IDLE_STATUS if status_byte == _IDLE_BYTE else _TX_STATUS[status_byte]
        statements = client.statements
        if statements is not None:
            self.prepared.on_ready_for_query(statements)
        client.on_ready_for_query(status)

    def _relay_frame(self, frame: Frame, client: ClientPeer) -> None:
        kind = frame.kind
        if kind == m.READY_FOR_QUERY:
            self._ready(frame.data[5], client)
        elif kind == m.PARSE_COMPLETE:
            # Only reached when none of pgmux's own Parses is in flight: every one is the client's.
            self.prepared.on_parse_complete()
        elif kind == m.PARAMETER_STATUS:
            name, value = self._take_parameter(frame.data[5:])
            client.on_parameter_status(name, value)
        elif kind == m.ERROR_RESPONSE:
            fields = parse_error_fields(frame.data[5:])
            code = fields.get("C")
            if fields.get("V", fields.get("S")) in ("FATAL", "PANIC"):
                # The backend says goodbye to the client itself: when the socket closes, pgmux adds no error.
                self.fatal_relayed = True
                self.close_reason = f"server said {fields.get('V', '')} {code or ''} {fields.get('M', '')}"
            elif (code == "0A000" and "cached plan" in fields.get("M", "")) or _names_a_vanished_type(fields):
                # A schema change made a prepared plan's result type wrong, or dropped a parameter type
                # (a batch that could not be re-sent): the client gets the error as PostgreSQL sent it;
                # the statement must be prepared afresh everywhere.
                client.on_stale_plan()
                self.prepared.discard_all = True
            elif _names_a_lost_statement(fields):
                # One of pgmux's own statements is gone: something pgmux could not see (a function
                # running DEALLOCATE ALL, say) emptied this backend, and the request could not be re-sent
                # (see _hold_for_replay): this client gets the error; the statements are prepared again
                # before their next use, here and for everyone.
                self.prepared.forget_all()
        elif kind == m.COPY_IN_RESPONSE:
            client.on_copy_in()

    def _swallow_frame(self, frame: Frame) -> None:
        kind = frame.kind
        collector = self._collector
        if collector is not None:
            if kind == m.COPY_IN_RESPONSE:
                self.write(_COPY_FAIL)  # the COPY fails; the Sync behind it then ends the statement
            elif kind != m.PARAMETER_STATUS:
                collector.take(kind, frame.data[5:])  # errors included: they are the request's answer
                if kind != m.READY_FOR_QUERY:
                    return
        if kind == m.READY_FOR_QUERY:
            self.tx_status = _TX_STATUS[frame.data[5]]
            self.swallow -= 1
            if self._sync is not None:
                self._sync_replies_left -= 1
                if not self._sync_replies_left:
                    self._settle_sync()
            if self._inspection is not None:
                self._inspection_replies_left -= 1
                if not self._inspection_replies_left:
                    self._settle_inspection()
            if not self.swallow and self._internal_done is not None and not self._internal_done.done():
                self._internal_done.set_result(None)
        elif kind == m.DATA_ROW:
            if self._inspection is not None and self._inspection_replies_left == 1:
                self._inspection.append(parse_data_row(frame.data[5:]))
        elif kind == m.PARAMETER_STATUS:
            self._take_parameter(frame.data[5:])
        elif kind == m.ERROR_RESPONSE:
            fields = parse_error_fields(frame.data[5:])
            log.warning("pgmux's own query failed on the server: %s %s", fields.get("C", ""), fields.get("M", ""),
                        extra={"conn": self.id})
            if self._sync is not None and self._sync_replies_left == 1:
                self._sync_error = fields  # replies come in order: this one answers the sync
            elif self._inspection is not None and self._inspection_replies_left == 1:
                self._inspection_error = fields
            else:
                self._internal_error = fields

    def _settle_sync(self) -> None:
        """The sync's ReadyForQuery came: record its values if PostgreSQL applied them, else give up the backend."""
        sync, self._sync = self._sync, None
        error, self._sync_error = self._sync_error, None
        assert sync is not None
        if error is None:
            self.params.update(sync.params)
            if sync.unreported is not None:
                self.unreported = sync.unreported
            self._parameters_changed()
            if self.client is not None:
                self.client.on_parameter_sync_done()
            return
        # PostgreSQL rolled the sync back: the backend kept its previous values, and (outside a transaction)
        # it refuses whatever the client sent behind the sync until that aborted block ends. Nobody may be
        # lent it as if synced: the client is told why and the backend closed.
        self._internal_error = error  # a reset waiting behind the sync must not release the backend either
        if self.client is not None:
            self.client.on_parameter_sync_failed(error)
        self.close(f"parameter sync failed: {error.get('C', '')} {error.get('M', '')}")

    def inspect_session(self, custom_names: frozenset[str]) -> None:
        """Ask the backend what its session holds now (see proxy/session_state.py); the answer is consumed
        here and given to the linked client (on_session_inspected). ``custom_names``: custom settings to read.
        """
        assert self._inspection is None
        self.send_internal(inspection_sql(custom_names | {name for name in self.unreported if "." in name}))
        self._inspection = []
        self._inspection_replies_left = self.swallow
        self._scanner.set_flags(_INSPECTING_FLAGS)

    @property
    def inspecting(self) -> bool:
        return self._inspection is not None

    def _settle_inspection(self) -> None:
        """The inspection's ReadyForQuery came: record what the session holds, and tell the client."""
        rows, self._inspection = self._inspection, None
        error, self._inspection_error = self._inspection_error, None
        self._scanner.set_flags(_RELAY_FLAGS)
        assert rows is not None
        report: SessionReport | None = None
        if error is None:
            report = read_report(rows, self.upstream.user, self.reported & SYNCED_PARAMETERS)
            self.unreported = dict(report.settings)
            self._parameters_changed()
        else:
            self.unclean = True
        if self.client is not None:
            self.client.on_session_inspected(report)

    def _take_parameter(self, body: bytes | memoryview) -> tuple[str, str]:
        """Record a ParameterStatus the backend sent: what it now has, whoever asked for it."""
        name, value = m.parse_parameter_status(body)
        self.params[name] = value
        self._parameters_changed()
        return name, value

    def holds(self, params: dict[str, str], unreported: dict[str, str]) -> bool:
        """Whether this backend was found holding these very dicts (a client's) and nothing changed since."""
        return params is self._held_params and unreported is self._held_unreported

    def found_holding(self, params: dict[str, str], unreported: dict[str, str]) -> None:
        """The backend has ``params`` and ``unreported`` (compared): the next ``holds`` of them is true."""
        self._held_params, self._held_unreported = params, unreported

    def _parameters_changed(self) -> None:
        self._held_params = self._held_unreported = None

    def _unsolicited(self, frame: Frame) -> None:
        if frame.kind == m.PARAMETER_STATUS:
            self._take_parameter(frame.data[5:])
        elif frame.kind == m.ERROR_RESPONSE:
            # Between clients only a dying backend speaks up (idle_session_timeout, terminate):
            # make sure nobody is handed it, even if it was just promised to a waiter.
            fields = parse_error_fields(frame.data[5:])
            self.close_reason = f"server said {fields.get('S', '')} {fields.get('C', '')} {fields.get('M', '')}"
            self.close(self.close_reason)

    def eof_received(self) -> None:
        return None  # the transport closes; connection_lost follows

    def pause_writing(self) -> None:
        if self.client is not None:
            self.client.pause_reading()

    def resume_writing(self) -> None:
        if self.client is not None:
            self.client.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._login_frames is not None:
            self._login_frames.put_nowait(None)
        if self._internal_done is not None and not self._internal_done.done():
            self._internal_done.set_exception(InternalQueryFailed("server connection lost"))
        if self.close_reason is None:
            self.close_reason = f"server closed the connection{f': {exc}' if exc else ''}"
        previous = self.state
        self.state = ServerState.CLOSED
        self.backends.remove(self)
        if previous is not ServerState.CLOSED:
            self._on_lost(self)

    @property
    def usable(self) -> bool:
        """Lent and alive: not closed, not closing, and the backend has not said goodbye."""
        transport = self.transport
        return (self.state is ServerState.ACTIVE and transport is not None and not transport.is_closing()
                and self.close_reason is None)

    # ---- flow control from the client side ----------------------------------------------------

    def pause_reading(self) -> None:
        """The linked client's write buffer is full: stop reading this server until it drains."""
        self.flow.pause_for_peer()

    def resume_reading(self) -> None:
        """The client caught up, or the server left it: read it again (an idle server must notice its own death)."""
        self.flow.resume_for_peer()

    def write(self, data: bytes | memoryview) -> None:
        assert self.transport is not None
        self.transport.write(data)

    # ---- login ---------------------------------------------------------------------------------

    async def login(self, timeout: float) -> None:
        """Connect, negotiate TLS per sslmode, authenticate; raises ServerLoginError with a safe reason."""
        upstream = self.upstream
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout or None):
                sock = await connect(loop, upstream.host, upstream.port, upstream.unix_socket)
                # With TLS, _start_tls made asyncio's TLS transport; plaintext gets the compiled one (if built).
                tls = (upstream.sslmode is not SslMode.DISABLE and not upstream.unix_socket
                       and await self._start_tls(loop, sock))
                if not tls:
                    await open_transport(loop, sock, lambda: self)
                self.write(build_startup_message({"user": upstream.user, "database": upstream.database}))
                await self._authenticate()
        except TimeoutError:
            # A login that went wrong leaves the backend in an unknown state: no goodbye, no flush to wait for.
            self.abort("login timed out")
            raise ServerLoginError(f"timed out after server_connect_timeout={timeout:g}s") from None
        except ssl.SSLError as tls_error:
            self.abort("TLS failed")
            raise ServerLoginError(f"TLS handshake failed: {tls_error.reason or tls_error}") from None
        except OSError as os_error:
            self.abort("connect failed")
            # The errno's own text: asyncio's strerror names the address ("Connect call failed (host, port)").
            code = os_error.errno
            raise ServerLoginError(os.strerror(code) if code and code > 0 else os_error.strerror or str(os_error)) from None
        except ServerLoginError:
            self.abort("login failed")
            raise
        except ServerAuthError as auth_error:
            self.abort("login failed")
            raise ServerLoginError(str(auth_error), shown="authentication with the server failed") from None
        self._login_frames = None
        self._scanner = FrameScanner(_RELAY_CAPTURE)
        self.relay_transport = relay_edge(self.transport, SERVER_EDGE, _RELAY_TABLE)
        self.reported = frozenset(self.params)
        self.backends.add(self)

    async def _start_tls(self, loop: asyncio.AbstractEventLoop, sock: socket.socket) -> bool:
        """Ask for TLS on the connected ``sock`` (per sslmode); True when the connection now speaks it."""
        upstream = self.upstream
        try:
            await loop.sock_sendall(sock, build_ssl_request())
            reply = await loop.sock_recv(sock, 1)
        except BaseException:
            sock.close()
            raise
        if reply == b"S":
            if bytes_waiting(sock):
                # Bytes after 'S' before the handshake could be injected by a man in the middle (CVE-2021-23222).
                sock.close()
                raise ServerLoginError("server sent unencrypted data after accepting TLS")
            # type: ignore: a protocol by its methods, not by class (see the class docstring).
            await loop.create_connection(lambda: self, sock=sock,  # type: ignore[type-var]
                                         ssl=_ssl_context(upstream.sslmode, upstream.sslrootcert),
                                         server_hostname=upstream.host)
            return True
        if reply == b"N":
            if upstream.sslmode not in (SslMode.ALLOW, SslMode.PREFER):
                sock.close()
                raise ServerLoginError(f"server does not support TLS, but sslmode={upstream.sslmode.value}")
            return False
        sock.close()
        raise ServerLoginError("server sent an unexpected reply to SSLRequest" if reply else "server closed the connection")

    async def _next_login_frame(self) -> Frame:
        assert self._login_frames is not None
        frame = await self._login_frames.get()
        if frame is None:
            raise ServerLoginError(self.close_reason or "server closed the connection during login")
        return frame

    async def _authenticate(self) -> None:
        upstream = self.upstream
        authenticator = ServerAuthenticator(upstream.user, upstream.password, upstream.scram_keys, upstream.md5_hash)
        while True:
            frame = await self._next_login_frame()
            body = bytes(frame.data[5:])
            if frame.kind == m.AUTHENTICATION:
                code, payload = m.parse_authentication(body)
                reply = authenticator.respond(code, payload)
                if reply:
                    self.write(reply)
            elif frame.kind == m.ERROR_RESPONSE:
                fields = parse_error_fields(body)
                sqlstate = fields.get("C")
                raise ServerLoginError(f"{fields.get('M', 'login refused')}", sqlstate,
                                       shown=f"the server refused the login (SQLSTATE {sqlstate})")
            elif frame.kind == m.PARAMETER_STATUS:
                self._take_parameter(body)
            elif frame.kind == m.BACKEND_KEY_DATA:
                self.backend_key = m.parse_backend_key_data(body)
            elif frame.kind == m.READY_FOR_QUERY:
                self.tx_status = m.TransactionStatus(body[0])
                return
            elif frame.kind in (m.NOTICE_RESPONSE, m.NEGOTIATE_PROTOCOL_VERSION):
                continue
            else:
                raise ServerLoginError(f"server sent unexpected message {chr(frame.kind)!r} during login")

    # ---- pgmux's own queries ------------------------------------------------------------------

    def send_internal(self, sql: str) -> None:
        """Queue a query whose replies pgmux consumes; the client's bytes may follow right behind it."""
        self.swallow += 1
        self.write(m.query(sql))

    def prepare_under(self, statement: Statement) -> None:
        """Prepare a client's statement as pgmux's own under the search_path the client first prepared it under
        (which decides its result shape), then set the session's own back; the client's request follows right
        behind. Inside a transaction both are set transaction-locally, so nothing outlives it."""
        search_path = statement.search_path
        if self.tx_status is m.TransactionStatus.FAILED:
            return  # nothing runs until the client's ROLLBACK: its next batch is looked at again
        current = self.params.get("search_path", "")
        local = self.tx_status is not m.TransactionStatus.IDLE
        self.swallow += 3
        self.write(m.query(set_search_path_sql(search_path, local)) + statement.parse + _SYNC
                   + m.query(set_search_path_sql(current, local)))
        self.prepared.statements.add(statement.server_name)

    def send_parameter_sync(self, sync: ParameterSync) -> None:
        """Send a client's parameters; they are recorded here only once PostgreSQL confirms them (_settle_sync)."""
        # One at a time: a sync is built against confirmed values, and the next one is only built once the
        # client's request behind this one is answered, after this sync's own reply.
        assert self._sync is None
        self.send_internal(sync.sql)
        self._sync = sync
        self._sync_replies_left = self.swallow

    def forget_unreported(self) -> None:
        """The client sent RESET/DISCARD: what pgmux set (or is setting) may or may not be there once it runs.

        Unknown, not gone: the next sync sets or resets each of them again. Recording them as gone would
        let the next client inherit whatever the RESET left (a role, a work_mem).
        """
        self.unreported = dict.fromkeys(self.unreported, UNKNOWN_VALUE)
        self._parameters_changed()
        sync = self._sync
        if sync is not None and sync.unreported is not None:
            sync.unreported = dict.fromkeys(sync.unreported, UNKNOWN_VALUE)

    async def run_internal(self, sql: str, timeout: float = 10.0) -> None:
        """Run a query for pgmux itself and wait for it; raises InternalQueryFailed on any error."""
        await self._run_internal(m.query(sql), repr(sql), timeout)

    async def fetch_internal(self, request: bytes, what: str, timeout: float = 10.0) -> list[list[str | None]]:
        """Send ``request`` (messages ending in one Sync or Query) for pgmux itself and return the rows it is
        answered with (text format); raises InternalQueryFailed on any error. ``what`` names it in errors."""
        collector = ResultCollector(_FETCHED_LIMIT)
        done = self.send_statements(request, 1, collector)
        try:
            async with asyncio.timeout(timeout):
                await done
        except TimeoutError:
            raise InternalQueryFailed(f"{what} timed out") from None
        finally:
            self.stop_collecting()
        result = collector.results[0]
        if collector.overflow:
            raise InternalQueryFailed(f"{what} answered more than {_FETCHED_LIMIT} bytes of rows")
        if result.error is not None:
            raise InternalQueryFailed(f"{result.error.get('C', '')} {result.error.get('M', '')}", result.error)
        return result.rows

    async def apply_parameters(self, sync: ParameterSync, timeout: float = 10.0) -> None:
        """Give the backend ``sync``'s values for pgmux's own use (no client is linked) and wait for them; raises
        InternalQueryFailed with PostgreSQL's refusal (the backend is then closed, see _settle_sync)."""
        await self._run_internal(m.query(sync.sql), "parameter sync", timeout, sync)

    def send_statements(self, request: bytes, replies: int, collector: ResultCollector) -> asyncio.Future[None]:
        """Send ``request`` (messages ending in ``replies`` Syncs or Queries) as pgmux's own, its answer fed to
        ``collector``. The future is done at the last ReadyForQuery, or fails with InternalQueryFailed if the
        connection is lost; call ``stop_collecting`` once done with it, whatever happened."""
        if self.state is ServerState.CLOSED:
            raise InternalQueryFailed("server is closed")
        self._collector = collector
        self._scanner.set_flags(_COLLECTING_FLAGS)
        self._internal_done = done = asyncio.get_running_loop().create_future()
        self.swallow += replies
        self.write(request)
        return done

    def stop_collecting(self) -> None:
        self._collector = None
        self._internal_done = None
        if self.state is not ServerState.CLOSED:
            self._scanner.set_flags(_RELAY_FLAGS)

    async def _run_internal(self, request: bytes, what: str, timeout: float, sync: ParameterSync | None = None) -> None:
        if self.state is ServerState.CLOSED:
            raise InternalQueryFailed("server is closed")
        self._take_internal_error()  # an error of an earlier query is not this one's
        self._internal_done = asyncio.get_running_loop().create_future()
        self.swallow += 1
        if sync is not None:  # its reply settles the sync: recorded on success, the backend closed on failure
            assert self._sync is None
            self._sync = sync
            self._sync_replies_left = self.swallow
        self.write(request)
        try:
            async with asyncio.timeout(timeout):
                await self._internal_done
        except TimeoutError:
            raise InternalQueryFailed(f"{what} timed out") from None
        finally:
            self._internal_done = None
        fields = self._take_internal_error()
        if fields is not None:
            raise InternalQueryFailed(f"{fields.get('C', '')} {fields.get('M', '')}", fields)

    def _take_internal_error(self) -> dict[str, str] | None:
        """The ErrorResponse fields pgmux's own query failed with, if it did, and clear them.

        A method, not a read of the attribute beside its reset: compiled, an attribute read after
        ``self._internal_error = None`` in the same function is checked as None, however it changed.
        """
        error, self._internal_error = self._internal_error, None
        return error

    # ---- ending ---------------------------------------------------------------------------------

    def close(self, reason: str) -> None:
        """Say goodbye to a healthy backend: Terminate, and the backend's own close ends the connection; idempotent.
        (During its login, before any Terminate could be read: pgmux closes.)

        Only for a server in a known state: the close waits for pgmux's queued bytes to reach the
        backend, which never happens while the backend is itself blocked writing to pgmux.
        """
        if self.close_reason is None:
            self.close_reason = reason
        transport = self.transport
        if transport is not None and not transport.is_closing():
            if self._login_frames is not None:
                transport.close()
            elif not self._terminated:
                # Then wait for PostgreSQL to close its end (eof_received), rather than close ours now: the backend
                # counts against the pool's bound until its process is gone, as PostgreSQL counts it. Closed at
                # once, its slot could let another worker's new backend in while this one still exits. A backend
                # that never closes is aborted by the janitor (pool.SERVER_CLOSE_DEADLINE).
                self._terminated = True
                transport.write(m.terminate())
                transport.resume_reading()  # a paused read would never see the close
        elif transport is None and self.state is not ServerState.CLOSED:
            self.connection_lost(None)

    def abort(self, reason: str) -> None:
        """Drop the connection now, unsent bytes and all: for a backend in an unknown state; idempotent.

        Also ends a graceful close that is still waiting for its write buffer to drain.
        """
        if self.close_reason is None:
            self.close_reason = reason
        transport = self.transport
        if transport is not None:
            transport.abort()
        elif self.state is not ServerState.CLOSED:
            self.connection_lost(None)

    async def send_cancel(self, timeout: float) -> bool:
        """Ask the backend to cancel what it runs now, over a separate connection as the protocol wants.

        True once PostgreSQL has closed that connection, which it does after signalling the backend;
        False when that was not seen (the signal may still be on its way).
        """
        if self.backend_key is None:
            return True
        process_id, secret = self.backend_key
        return await send_cancel_request(self.upstream, process_id, secret.to_bytes(4, "big", signed=True), timeout)


async def send_cancel_request(upstream: Upstream, process_id: int, secret: bytes, timeout: float) -> bool:
    try:
        await deliver_cancel_request(asyncio.get_running_loop(), upstream.host, upstream.port, upstream.unix_socket,
                                     build_cancel_request(process_id, secret), timeout)
    except TimeoutError:
        log.warning("cancel request to %s not completed within %gs", upstream.redacted(), timeout)
        return False
    except OSError as exc:
        log.warning("could not send a cancel request to %s: %s", upstream.redacted(), exc)
        return False
    return True
