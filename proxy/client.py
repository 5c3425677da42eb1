"""ClientConnection: one application connection's edge: its login handed to a Login, then the relay to a server."""

from __future__ import annotations

import asyncio
import itertools
import logging
import sys
import time
from typing import TYPE_CHECKING, Final, cast

from mypy_extensions import trait

from proxy.cancel import CancelKeys, Cancellable
from proxy.flow import FlowControl
from proxy.log_levels import enabled_for
from proxy.logs import get_logger
from proxy.parameters import SYNCED_PARAMETERS, parameter_sync
from proxy.pool import InLine
from proxy.prepared import ClientStatements, deallocate_sql, needs_whole, resets_all_statements
from proxy.protocol import errors
from proxy.protocol import messages as m
from proxy.protocol.errors import PgError
from proxy.protocol.framing import (
    BatchSkipper,
    BufferLimitExceeded,
    Frame,
    FrameScanner,
    ProtocolViolation,
    Segment,
    is_whole,
)
from proxy.protocol.sql_words import (
    LOAD,
    PREPARED_STATEMENT,
    custom_setting_names,
    mentions_reset,
    mentions_session_state,
    session_effects,
)
from proxy.registry import Console, Registry
from proxy.routing import Router
from proxy.server import ClientPeer, ServerConnection
from proxy.session_state import SessionReport, refuse_session_only
from proxy.settings import ListenerSettings, PoolMode, SessionStatePolicy
from proxy.sockets import BATCH_END, CLIENT_EDGE, NEUTRAL, QUERY, UNNAMED, WORDS, RelayEdge, relay_edge, relay_table
from proxy.states import ClientState, ServerState
from proxy.tls import TlsError, TlsTransport

# A C static when compiled, where time.monotonic is a lookup per call (see pool.py).
_monotonic: Final = time.monotonic
_intern: Final = sys.intern

if TYPE_CHECKING:
    from proxy.pool import Pool, Waiter

log = get_logger("client")
_ids = itertools.count(1)

# Query and Parse: their text may change the session (see _note_session_sql; in session mode only a LOAD
# matters, and RESET/DISCARD); CopyDone/CopyFail (once per COPY): to tell one sent before the server asked.
_RELAY_CAPTURE = frozenset({m.TERMINATE, m.QUERY, m.PARSE, m.COPY_DONE, m.COPY_FAIL})
# With named statements rewritten (transaction mode), the statement-naming messages are looked at too.
_PREPARED_CAPTURE = frozenset({m.TERMINATE, m.PARSE, m.BIND, m.DESCRIBE, m.CLOSE, m.SYNC, m.QUERY, m.FUNCTION_CALL,
                               m.COPY_DONE, m.COPY_FAIL})
_RELAY_COUNTED = frozenset({m.SYNC, m.QUERY, m.FUNCTION_CALL})  # each earns exactly one ReadyForQuery
# Open no request: COPY data, Terminate, and Flush, which only asks for the answers so far (psycopg
# ends every pipeline with one): a Flush behind a Parse leaves its batch open, one behind a Sync opens none.
_RELAY_NEUTRAL = frozenset({m.COPY_DATA, m.COPY_DONE, m.COPY_FAIL, m.TERMINATE, m.FLUSH})
_FLUSH: Final = m.message(m.FLUSH)
_BATCH_ENDS_AND_TERMINATE = _RELAY_COUNTED | {m.TERMINATE}
# What the compiled relay may send on to the server itself (proxy/_relay.c; ClientConnection.relay_request):
# the types pgmux does not capture, and a Query or Parse whose text mentions no session state, which is all
# _note_query and _note_parse would find out about it. Where statements are renamed, the messages that name
# one pass when they name the unnamed statement: ClientStatements.rewrite sends those as they are.
_RELAY_BITS: Final = {**{kind: BATCH_END for kind in _RELAY_COUNTED}, **{kind: NEUTRAL for kind in _RELAY_NEUTRAL},
                      m.QUERY: BATCH_END | WORDS | QUERY, m.PARSE: WORDS}
_RELAY_TABLE: Final = relay_table(frozenset(range(256)) - _RELAY_CAPTURE | {m.QUERY, m.PARSE}, _RELAY_BITS)
_PREPARED_RELAY_TABLE: Final = relay_table(
    frozenset(range(256)) - _PREPARED_CAPTURE | {m.QUERY, m.PARSE, m.BIND, m.DESCRIBE, m.CLOSE, m.SYNC, m.FUNCTION_CALL},
    {**_RELAY_BITS, m.PARSE: WORDS | UNNAMED, m.BIND: UNNAMED, m.DESCRIBE: UNNAMED, m.CLOSE: UNNAMED})
_IDLE: Final = m.TransactionStatus.IDLE
_IN_TRANSACTION: Final = m.TransactionStatus.IN_TRANSACTION
_QUEUE_HIGH_WATER: Final = 1 << 20  # bytes queued while waiting for a server before we stop reading
# A captured message larger than this is not held: its head (enough for every decision pgmux makes
# about it) comes back from the scanner, and its rest streams on to the server as it arrives.
_CAPTURE_HEAD: Final = 1 << 16
# A batch is kept to be sent again (see ClientConnection.replay) only when it arrived in one read smaller
# than this: larger ones are rare enough to answer with the server's 26000. Smaller than _CAPTURE_HEAD,
# so every captured message of it is whole.
_REPLAY_LIMIT: Final = _CAPTURE_HEAD

# The relay's scanner is made once the login has a pool; until then this one stands in, and is never fed.
_BEFORE_SESSION: Final = FrameScanner(frozenset())
# Read by every new connection: as Final, C statics (an enum member is otherwise an attribute lookup on its class).
_TRANSACTION_MODE: Final = PoolMode.TRANSACTION
_NO_PINS: Final[frozenset[str]] = frozenset()
_NO_NAMES: Final[frozenset[str]] = frozenset()
# Every client's parameters until its login sets them (then the pool's shared ones): never changed in place.
_NO_PARAMETERS: Final[dict[str, str]] = {}


class WholeRequest:
    """What the compiled relay counted in a read it walked whole and found passable, kept while the client waits
    for a server and the transport holds those bytes: at the hand-over they go to the server as relay_request
    would have sent them, without a second walk and without becoming a Python object
    (ClientConnection._forward_queued)."""

    __slots__ = ("nbytes", "batch_ends", "queries", "mid_batch", "parses", "binds")

    def __init__(self, nbytes: int, batch_ends: int, queries: int, mid_batch: int, parses: int, binds: int) -> None:
        self.nbytes = nbytes
        self.batch_ends = batch_ends
        self.queries = queries
        self.mid_batch = mid_batch
        self.parses = parses
        self.binds = binds


@trait
class Login:
    """A login under way, as the connection sees it (proxy/reception.py drives one for the pooler).

    A trait, not a Protocol: compiled, the calls stay native.
    """

    def connection_made(self) -> None:
        raise NotImplementedError

    def data_received(self, data: bytes) -> bytes:
        """Take client bytes; return those pipelined behind the login, which belong to the session."""
        raise NotImplementedError

    def check_timeout(self, now: float) -> None:
        """Janitor work: end the login if it has taken longer than client_login_timeout."""
        raise NotImplementedError

    def close(self) -> None:
        """The connection ends: stop whatever the login still waits for."""
        raise NotImplementedError


class ClientConnection(ClientPeer, Cancellable, InLine):
    """An application connection, relayed to a pooled server one transaction (or session) at a time.

    An asyncio protocol by its methods, not by inheriting asyncio.Protocol: a class with a Python
    base would not compile to a native mypyc class (attribute access through a dict, not a slot).
    """

    # Slots, not a __dict__: ten thousand idle clients must stay small.
    __slots__ = (
        "_admin", "admitted", "_cancel_sent", "_linked_at", "_queued",
        "_copy_done_early", "_copy_ignored", "_copy_in", "_query_mark", "_held_for_sync",
        "_queued_bytes", "_reset_seen", "_resync", "_scanner", "_skipper", "cancel_keys", "registry", "router",
        "startup_params", "_waiter", "cancel_key",
        "connected_at", "database", "flow", "id", "last_active", "listener", "login", "params", "_peer", "pending",
        "pool", "query_started", "replay", "server", "state", "statements", "transaction_mode", "transport",
        "unreported", "startup_unreported", "pins", "_session_touched", "_custom_names", "_inspecting", "_loaded",
        "user", "wait_started",
        "_stall_mark", "_stalled_since", "tls", "relay_transport", "_relay_table", "_held",
    )

    def __init__(self, router: Router, registry: Registry[ClientConnection], cancel_keys: CancelKeys,
                 listener: ListenerSettings) -> None:
        self.id = f"c{next(_ids)}"
        self.router = router
        self.registry = registry
        self.cancel_keys = cancel_keys
        self.listener = listener
        self.state = ClientState.STARTUP
        self.transport: asyncio.Transport | None = None
        self.tls: TlsTransport | None = None  # the client's TLS, once begun (then also its ``transport``)
        self.relay_transport: RelayEdge | None = None  # the transport, once logged in, if the compiled relay drives it
        self._relay_table = _RELAY_TABLE  # what that relay may send on itself
        self.flow = FlowControl()
        self._peer: str | None = None  # "ip:port" or "unix", asked of the transport when first needed (peer)
        self._peer_transport: asyncio.BaseTransport | None = None
        self.user = ""
        self.database = ""
        self.pool: Pool | None = None
        self.server: ServerConnection | None = None
        # The parameter dicts below are shared with other clients of the pool from the welcome on
        # (Pool.parameter_sets): a change replaces the dict, never changes it in place.
        self.params: dict[str, str] = _NO_PARAMETERS  # the reported parameters as this client believes them
        self.unreported: dict[str, str] = _NO_PARAMETERS  # other startup parameters, SET on each server
        self.startup_params: dict[str, str] = _NO_PARAMETERS  # synced parameters the client set at startup
        self.startup_unreported: dict[str, str] = _NO_PARAMETERS  # other settings the client set at startup
        self.pending = 0  # Sync/Query/FunctionCall sent to the server and not yet answered
        self._query_mark = 0  # the scanner's count at the end of the read that held the last Query
        self._copy_ignored = 0  # Syncs counted in ``pending`` that the server ignores during that COPY
        self.cancel_key = (0, b"")
        self.connected_at = _monotonic()
        self.login: Login | None = None  # set by whoever accepts the connection; None once logged in
        self._scanner = _BEFORE_SESSION
        self._queued: list[bytes] | None = None  # requests waiting for a server; None when none wait
        self._queued_bytes = 0  # held and queued
        # A read relay_request found passable but had no server for: its counts, while the compiled transport
        # holds its bytes (see _hold). Held bytes come before anything queued, so a second read takes them back
        # into the queue first (_queue): while one is held, nothing is queued.
        self._held: WholeRequest | None = None
        self._skipper: BatchSkipper | None = None  # answering a refused request: skipping to its batch end
        self._admin: Console | None = None
        self.statements: ClientStatements | None = None  # named statements, when pgmux rewrites them
        # The batch in flight, kept while its answer may yet show that the server lost pgmux's statements:
        # then nothing of it has run, and it is sent again (resend_batch). Only a batch that relied on
        # statements the server held, sent with nothing else in flight outside a transaction.
        self.replay: list[Segment] | None = None
        # Transaction mode: the session-only state this client holds on its server (it keeps that server).
        self.pins = _NO_PINS
        self._custom_names = _NO_NAMES  # custom settings the statements since the last inspection may have set
        self.last_active = self.connected_at  # the last time a request or an answer passed
        self.query_started = 0.0  # when the oldest unanswered request was sent, 0 when none
        self._linked_at = 0.0
        self.wait_started = 0.0  # when the client last joined the line for a server
        self._waiter: Waiter | None = None  # our place in the pool's line
        self._stall_mark = 0  # the scanner's progress when the janitor last saw a message unfinished
        self._stalled_since = 0.0  # since when that progress has not changed (0: no unfinished message)
        # The flags last and together: compiled, each is one byte, and a byte between two pointers takes eight.
        self.transaction_mode = listener.pool_mode is _TRANSACTION_MODE
        self._copy_in = False  # the server began a COPY FROM STDIN whose ReadyForQuery has not come
        self._held_for_sync = False  # the linked server is taking this client's parameters: requests wait
        self._copy_done_early = False  # a CopyDone/CopyFail went out while no COPY IN was known to run
        self.admitted = False  # counted by Admission until the connection ends
        self._session_touched = False  # the linked server's session may have changed: ask it before release
        self._inspecting = False  # the linked server is being asked what its session holds: requests wait
        self._loaded = False  # the client ran LOAD: no reset unloads a library, so its backend is closed after it
        self._reset_seen = False  # the current request batch contains RESET or DISCARD
        self._resync = False  # the linked server must get this client's parameters again
        self._cancel_sent = False

    def __repr__(self) -> str:
        return f"<ClientConnection {self.id} {self.state.value} {self.user}@{self.database}>"

    # ---- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = self.flow.transport = cast(asyncio.Transport, transport)
        if self.state is ClientState.CLOSED:  # crowded out by newer logins before the loop got to it
            transport.close()
            return
        self._peer_transport = transport  # the connection's own, even once TLS runs over it
        self.transport.set_write_buffer_limits(high=256 * 1024)
        assert self.login is not None
        self.login.connection_made()

    @property
    def peer(self) -> str:
        """The client's address, "ip:port" ("unix" for a Unix socket). Asked of the socket the first time it is
        needed (a failed login, a log line at INFO), not at every connection: getpeername and the formatting
        cost about 4% of a trust login's CPU."""
        if self._peer is None:
            transport = self._peer_transport
            if transport is None:
                return ""  # not connected yet
            address = transport.get_extra_info("peername")
            self._peer = f"{address[0]}:{address[1]}" if isinstance(address, tuple) else "unix"
        return self._peer

    def data_received(self, data: bytes) -> None:
        if self.tls is not None:
            data = self._decrypt(data)
            if not data:
                return
        self.received(data)

    def received(self, data: bytes) -> None:
        """Plaintext from the client (decrypted, when it speaks TLS): to its login, the relay or the console."""
        if not data:
            return
        try:
            self._route(data)
        except ProtocolViolation as violation:
            self.fail(errors.protocol_violation(str(violation)), reason="protocol_error")
        except PgError as error:
            self.fail(error)

    def _route(self, data: bytes) -> None:
        state = self.state
        if state is ClientState.ACTIVE or state is ClientState.IDLE or state is ClientState.WAITING:
            self._relay(data)
        elif state is ClientState.STARTUP or state is ClientState.AUTH:
            assert self.login is not None
            rest = self.login.data_received(data)
            if rest and self.state is not ClientState.CLOSED:
                self._route(rest)
        elif state is ClientState.LOGIN:
            self._queue(data)
        elif state is ClientState.ADMIN:
            self._admin.feed(data)  # type: ignore[union-attr]

    def start_tls(self, tls: TlsTransport, initial: bytes) -> bytes:
        """From now on the client speaks through ``tls``; returns what ``initial`` decrypts to."""
        self.tls = tls
        self.transport = self.flow.transport = tls
        return self._decrypt(initial) if initial else b""

    def _decrypt(self, data: bytes) -> bytes:
        tls = self.tls
        assert tls is not None
        try:
            return tls.receive(data)
        except TlsError as failure:
            self.registry.count_tls_failure(failure.reason)
            log.warning("client TLS failed: %s", failure, extra={"conn": self.id})
            self._close_quietly(f"TLS failed: {failure}")
            return b""

    def connection_lost(self, exc: Exception | None) -> None:
        if self.state is ClientState.CLOSED:
            return
        self._finish(f"client disconnected{f': {exc}' if exc else ''}")

    def eof_received(self) -> None:
        return None  # the transport closes; connection_lost follows

    def pause_writing(self) -> None:
        # The app reads slower than the server sends: stop reading the server until it catches up.
        self.flow.write_paused = True
        if self.server is not None:
            self.server.pause_reading()

    def resume_writing(self) -> None:
        self.flow.write_paused = False
        if self.server is not None:
            self.server.resume_reading()

    # ---- used by the linked server -------------------------------------------------------------

    def write(self, data: bytes | memoryview) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(data)

    def pause_reading(self) -> None:
        """The linked server's write buffer is full: stop reading this client until it drains."""
        self.flow.pause_for_peer()

    def resume_reading(self) -> None:
        self.flow.resume_for_peer()

    def on_ready_for_query(self, status: m.TransactionStatus) -> None:
        if self._copy_in:
            self._end_copy_in()
        if self.pending > 1:
            self.pending -= 1
            return
        self.pending = 0
        now = self.last_active = _monotonic()
        if self.query_started:
            pool = self.pool
            assert pool is not None  # narrowed, not ignored: compiled code then reads its stats natively
            pool.stats.query_time += now - self.query_started
            self.query_started = 0.0
        self._cancel_sent = False
        self._reset_seen = False
        # Release only at a true boundary: every request answered and no part of the next one sent.
        if status is _IDLE and self.transaction_mode and self._scanner.at_rest:
            if self._session_touched:
                self._inspect_session()
            elif not self.pins:
                self._unlink_and_release(now)
        elif self._resync and self.server is not None:
            # RESET put the server back to its own defaults: restore this client's (its startup values).
            self._resync = False
            # Mid-batch the backend may be inside the batch's implicit transaction: no COMMIT of pgmux's there.
            self._sync_parameters(self.server, in_transaction=status is not _IDLE or not self._scanner.at_rest)
        elif (status is _IN_TRANSACTION and self.server is not None and self.server.prepared.discard_all
              and self._scanner.at_rest):
            # Mid-transaction, after something that may have dropped statements: make sure they are
            # gone before the client's next use prepares one again (a survivor would fail it with 42P05).
            self._discard_statements(self.server)

    def on_copy_in(self) -> None:
        """The server sent CopyInResponse: until this COPY ends it reads Syncs and ignores them.

        libpq sends Parse/Bind/Describe/Execute/Sync in one write, before the server has said the
        statement is a COPY, and one more Sync after CopyDone: one ReadyForQuery answers both. The
        Syncs ignored are those sent after the Execute (or the Query) that began the COPY and before
        its CopyDone. Every request sent before that Execute has been answered by now, so the ones
        already sent are those counted since the later of the last answer and the last Query. They
        leave ``pending`` when the COPY's ReadyForQuery comes, so the backend counts as busy until
        then. (Syncs sent after this reply and before CopyDone, which no driver sends, stay counted:
        the backend would stay linked too long, never too short.)
        """
        if self._copy_done_early:
            # The client sent its CopyDone before the server asked for data: which Syncs came before
            # it is unknown. Discount none: the backend may stay linked too long, never too short.
            self._copy_done_early = False
            ignored = 0
        else:
            # Not yet ignored by an earlier COPY of the same Query, hence the difference.
            ignored = min(self.pending, self._scanner.count - self._query_mark) - self._copy_ignored
        self._copy_in = True
        if ignored > 0:
            self._copy_ignored += ignored
            if self.statements is not None and self.server is not None:
                self.server.prepared.batches_sent -= ignored  # numbers the batches the server will answer

    def _end_copy_in(self) -> None:
        """The ReadyForQuery after a COPY IN: the Syncs the server ignored during it get no answer."""
        self._copy_in = False
        ignored = self._copy_ignored
        if ignored:
            self._copy_ignored = 0
            self.pending -= ignored
            if self.pool is not None:
                self.pool.stats.queries -= ignored

    def on_parameter_status(self, name: str, value: str) -> None:
        if name not in SYNCED_PARAMETERS:
            return
        if (self._reset_seen and name in self.startup_params and self.pool is not None
                and (self.pool.server_params or {}).get(name) == value):
            # RESET returns a setting to the session default, which for this client is its startup
            # value, not the default of the backend it happens to use: keep the client's view.
            self._resync = True
            return
        if self.params.get(name) != value:
            self.params = {**self.params, name: value}  # a copy: the dict may be shared (see __init__)

    def _inspect_session(self) -> None:
        """Ask the linked server what the session holds now: the client keeps it until the answer is in."""
        server = self.server
        assert server is not None
        self._session_touched = False
        self._inspecting = True
        names, self._custom_names = self._custom_names, _NO_NAMES
        server.inspect_session(names | {name for name in self.unreported if "." in name})

    def on_session_inspected(self, report: SessionReport | None) -> None:
        """The linked server said what its session holds: settings become this client's, session-only state
        keeps the server here (session_state = pin), and a server holding nothing of it is released."""
        self._inspecting = False
        server = self.server
        if server is None:
            return
        if report is not None:
            self.unreported = {**self.startup_unreported, **report.settings}
            # Under refuse too: state made where pgmux could not see it (inside a function) must not leak.
            pins = (frozenset() if self.router.settings.session_state is SessionStatePolicy.IGNORE
                    else report.pins | {LOAD} if self._loaded else report.pins)
            if pins != self.pins:
                if pins:
                    log.info("client pinned to server %s: it holds %s", server.id, ", ".join(sorted(pins)),
                             extra={"conn": self.id})
                else:
                    log.info("client unpinned from server %s", server.id, extra={"conn": self.id})
                self.pins = pins
        if not self.pins and not self._has_queued() and server.tx_status is _IDLE:
            self._unlink_and_release(_monotonic())
            return
        # Staying (pinned, or requests came meanwhile): this client's values first where the session lost
        # them (a RESET ALL), then what waited.
        self._resync = False
        if (self.statements is not None and server.prepared.discard_all and server.tx_status is _IDLE
                and PREPARED_STATEMENT not in self.pins):
            # A DEALLOCATE/DISCARD ran: what waited may prepare statements again, which a survivor of a false
            # alarm would fail with 42P05 (the release that would have dropped them all does not come). Not
            # while the client holds SQL-level prepared statements of its own: DEALLOCATE ALL would drop them.
            self._discard_statements(server)
        self._held_for_sync = self._sync_parameters(server, in_transaction=server.tx_status is not _IDLE)
        self._forward_queued()

    def _note_session_sql(self, sql: bytes) -> None:
        """A Query's or Parse's text that mentions session state: what it may change, to ask about later."""
        kinds = session_effects(sql)
        if LOAD in kinds:
            self._loaded = True  # in every mode
        if kinds and self.transaction_mode:
            self._session_touched = True
            self._custom_names = self._custom_names | custom_setting_names(sql)
            for kind in kinds:
                self.registry.count_session_change(kind)

    def on_parameter_sync_failed(self, error: dict[str, str]) -> None:
        """PostgreSQL refused this client's parameters on the linked server (``error``: its ErrorResponse fields).

        The request sent behind the sync was refused by the aborted block (see parameter_sync), or, in a
        transaction, aborted it: the client gets PostgreSQL's error as FATAL, the backend is closed, and
        logins check their settings with the server again.
        """
        server, self.server = self.server, None
        pool = self.pool
        if server is not None and pool is not None:
            server.client = None
            pool.close_server(server, f"parameter sync for client {self.id} failed")
            pool.accepted_settings.clear()
        self.fail(errors.parameter_refused_by_server(error, "parameter_sync_failed"), reason="parameter_sync_failed")

    def cancel_query(self) -> None:
        """A CancelRequest with this client's key: forward it to the server running its query, if any."""
        server = self.server
        if server is None or not self.pending:
            log.info("cancel request ignored: no query running", extra={"conn": self.id})
            return
        log.info("forwarding cancel request to %s", server.id, extra={"conn": self.id})
        if self.pool is not None:
            self.pool.stats.cancels_forwarded += 1
            self.pool.cancel(server)

    def on_server_lost(self, server: ServerConnection) -> None:
        self.server = None
        if self._inspecting and not self.pending and not self.pins:
            # Only pgmux's own question was in flight: the client has all its answers and holds nothing
            # there; its next request gets another server (what this transaction SET is lost with it).
            self._inspecting = False
            self.state = ClientState.IDLE
            log.warning("server %s lost while pgmux read its session state: %s", server.id, server.close_reason,
                        extra={"conn": self.id})
            if self._has_queued():
                self._wait_for_server()
            return
        log.warning("server %s at %s lost while it served this client: %s", server.id, server.upstream.redacted(),
                    server.close_reason, extra={"conn": self.id})
        if server.fatal_relayed:
            # The client has the backend's own FATAL already: one error per failure, then the close.
            self.registry.count_rejection("server_lost")
            self._close_quietly("the server ended the session with a FATAL")
        else:
            self.fail(errors.server_connection_lost(), reason="server_lost")

    # ---- called by the login ---------------------------------------------------------------------

    def begin_session(self, pool: Pool) -> None:
        """Logged in to ``pool``, about to be welcomed: set up the relay's scanner and statement names."""
        self.pool = pool
        self.state = ClientState.LOGIN
        # One copy of each name for all the pool's clients, not one per client. Only now: interned before
        # authentication, any name a StartupMessage sends would be kept.
        self.user, self.database = _intern(self.user), _intern(self.database)
        capture = _RELAY_CAPTURE
        keep_whole = None  # a simple Query's head is enough: a huge one counts as mentioning RESET
        if self.transaction_mode and self.router.max_prepared_statements:
            self.statements = ClientStatements(self.router.statement_names, pool.stats.prepared)
            capture = _PREPARED_CAPTURE
            keep_whole = needs_whole
            self._relay_table = _PREPARED_RELAY_TABLE
        self._scanner = FrameScanner(capture, counted=_RELAY_COUNTED, neutral=_RELAY_NEUTRAL,
                                     head_limit=_CAPTURE_HEAD, keep_whole=keep_whole,
                                     max_whole=self.router.max_client_buffer)

    def logged_in(self) -> None:
        """The welcome is sent: requests go to the pool (session mode: to the server linked at login) from
        now on, those that came meanwhile first."""
        if self.server is None:
            self.state = ClientState.IDLE
        self.login = None
        if self.tls is None:
            self.relay_transport = relay_edge(self.transport, CLIENT_EDGE, self._relay_table)
        if self._has_queued():
            self._relay(b"".join(self._take_queued()))

    def open_console(self, console: Console) -> None:
        """From now on this connection talks to the admin console."""
        self.state = ClientState.ADMIN
        self.login = None
        self._admin = console

    # ---- relay ------------------------------------------------------------------------------------

    def _relay(self, data: bytes) -> None:
        """Client bytes after login: to the linked server, or queued until the pool lends one."""
        if self.server is not None:
            if self._held_for_sync or self._inspecting:
                self._queue(data)
            else:
                self._forward(data)
            return
        if self._skipper is not None:
            self._skip_rejected_batch(data)
            return
        if self.state is ClientState.IDLE and not self._has_queued():
            if data[0] == m.TERMINATE:
                # Saying goodbye between transactions needs no server (and must not wait for one).
                self._close_quietly("client sent Terminate")
                return
            if data == _FLUSH:
                # Nothing is in flight, so there is nothing to flush; a server taken for it would stay
                # linked with no answer to come (psycopg's Flush can arrive after the last ReadyForQuery).
                return
            server = self._link_idle_server()
            if server is not None:  # the fast path: a warm server and nobody in line
                if self._held_for_sync:
                    self._queue(data)
                else:
                    self._forward(data)
                return
        self._queue(data)
        if self.state is ClientState.IDLE:
            self._wait_for_server()

    def _forward(self, data: bytes) -> None:
        """Client bytes to the linked server: counted, looked at where needed, rewritten where needed."""
        scanner = self._scanner
        before = scanner.count
        # These bytes begin a batch, with nothing in flight: kept to re-send if small (see _replayable).
        fresh = not self.pending and scanner.at_rest and len(data) < _REPLAY_LIMIT
        self.replay = None  # a kept batch is not sent again once anything follows it
        try:
            segments = scanner.feed(data)
            self._count_requests(len(data), scanner.count - before)
            server = self.server
            assert server is not None
            if scanner.verbatim and len(segments) == 1:
                # The common cases: bytes with nothing to look at, or one whole simple Query.
                segment = segments[0]
                if not isinstance(segment, Frame):
                    server.write(data)
                    return
                if segment.kind == m.QUERY:
                    refused = self._note_query(segment.data, server)
                    server.write(data if refused is None else refused)
                    return
            self._forward_segments(segments, server, fresh)
        except ProtocolViolation as exc:
            self.fail(errors.protocol_violation(str(exc)), reason="protocol_error")
        except BufferLimitExceeded as too_large:  # not "exc": compiled, one name keeps the first clause's type
            error = errors.client_buffer_exceeded(chr(too_large.kind), too_large.size, too_large.limit)
            self.fail(error, reason=error.reason)

    def _link_idle_server(self, now: float = 0.0) -> ServerConnection | None:
        """Link an idle server at once when one is warm and nobody is ahead in line (Pool.take_idle)."""
        pool = self.pool
        assert pool is not None
        server = pool.take_idle()
        if server is not None:
            self.link(server, now)
        return server

    def _count_requests(self, nbytes: int, batch_ends: int, now: float = 0.0) -> None:
        """``nbytes`` of requests go to the linked server, ending ``batch_ends`` batches (each earns a ReadyForQuery).
        ``now``: the monotonic clock, when the caller has just read it."""
        pool = self.pool
        assert pool is not None
        stats = pool.stats
        stats.bytes_received += nbytes
        if batch_ends:
            if not self.pending:
                self.query_started = now or _monotonic()
            self.pending += batch_ends
            stats.queries += batch_ends

    def relay_request(self, nbytes: int, batch_ends: int, queries: int, mid_batch: int, parses: int,
                      binds: int) -> object | None:
        """The compiled relay read ``nbytes`` of whole messages that need no decision (proxy/_relay.c): the
        server transport they may go to as they are, counted here as _forward counts them; None when they must
        go through data_received, which then decides (a server to wait for, a parameter sync first...).

        ``batch_ends``: Syncs, Queries and FunctionCalls among them; ``queries``: Queries; ``mid_batch``: as
        FrameScanner.passed takes it; ``parses``, ``binds``: Parses and Binds of the unnamed statement (only
        where statements are renamed, see ClientStatements.relayed). A client between transactions is lent an
        idle server here, as _relay lends one, when the bytes begin a request.
        """
        server = self.server
        now = 0.0  # read once where a transaction begins: the link and the request's start share it
        if server is None:
            if (self.state is not ClientState.IDLE or self._has_queued() or self._skipper is not None
                    or (not batch_ends and mid_batch <= 0)):
                return None
            now = _monotonic()
            server = self._link_idle_server(now)
            if server is None:
                return self._hold(WholeRequest(nbytes, batch_ends, queries, mid_batch, parses, binds), now)
        target = server.relay_transport
        if target is None or self._held_for_sync or self._inspecting:
            return None
        if not self._pass_whole(server, nbytes, batch_ends, queries, mid_batch, parses, binds, now):
            return None
        return target

    def _hold(self, request: WholeRequest, now: float) -> RelayEdge | None:
        """No server is free for a request the compiled relay walked whole: the client joins the line and its
        transport keeps the bytes (returning it says so) until the hand-over sends them on (_forward_queued).
        None when the line refuses the client at once: the bytes then come to data_received, which skips them
        up to their batch end as _reject_batch set up."""
        self._wait_for_server(now)
        if self.state is not ClientState.WAITING:
            return None
        self._held = request
        self._count_queued(request.nbytes)
        return self.relay_transport

    def _pass_whole(self, server: ServerConnection, nbytes: int, batch_ends: int, queries: int, mid_batch: int,
                    parses: int, binds: int, now: float = 0.0) -> bool:
        """Whether a request the compiled relay walked whole may go to ``server`` as it is; if so, counted here as
        _forward counts what it sends (the caller sends the bytes)."""
        scanner = self._scanner
        statements = self.statements
        if not scanner.at_boundary or (statements is not None and not statements.can_relay(binds, server.prepared)):
            return False
        scanner.passed(batch_ends, mid_batch)
        self.replay = None
        self._count_requests(nbytes, batch_ends, now)
        if queries:
            self._query_mark = scanner.count  # see _note_query
        if statements is not None:
            statements.relayed(parses, batch_ends, server.prepared)
        return True

    def _forward_segments(self, segments: list[Segment], server: ServerConnection, fresh: bool) -> None:
        out: list[bytes | memoryview] = []
        statements = self.statements
        trusted = server.prepared.trusted
        if statements is not None:
            for statement in statements.made_under_other_paths(segments, server.prepared):
                server.prepare_under(statement)
        for segment in segments:
            if not isinstance(segment, Frame):
                out.append(segment)
                continue
            kind = segment.kind
            if kind == m.TERMINATE:
                if out:
                    server.write(b"".join(out))
                self._close_quietly("client sent Terminate")
                return
            if kind == m.QUERY:
                refused = self._note_query(segment.data, server)
                out.append(segment.data if refused is None else refused)
            elif kind == m.COPY_DONE or kind == m.COPY_FAIL:
                if self.pending and not self._copy_in:
                    self._copy_done_early = True  # pipelined behind the COPY, before its CopyInResponse
                out.append(segment.data)
            else:
                data = segment.data
                if kind == m.PARSE:
                    data = self._note_parse(data)
                out.append(statements.rewrite(kind, data, server.prepared) if statements else data)
                if kind == m.BIND and statements is not None and statements.bound_session_sql is not None:
                    self._note_session_sql(statements.bound_session_sql)
                    statements.bound_session_sql = None
        server.write(out[0] if len(out) == 1 else b"".join(out))
        if statements is not None:
            relied = server.prepared.trusted != trusted
            self.replay = segments if fresh and relied and self._replayable(server) else None

    def _replayable(self, server: ServerConnection) -> bool:
        """Whether a batch just sent, small and in one read, which relied on the server's statements, can be
        sent again unseen.

        It must be one batch, ended (its Sync sent) or not yet ended (asyncpg prepares with Parse, Describe
        and Flush), with nothing pipelined behind it (the answers would no longer be told apart); sent
        outside a transaction (where a 26000 leaves nothing run) and behind none of pgmux's own queries.
        """
        scanner = self._scanner
        ended = self.pending == 1 and scanner.at_rest
        return ((ended or (not self.pending and scanner.at_boundary)) and not server.swallow
                and server.tx_status is _IDLE)

    def forget_replay(self) -> None:
        self.replay = None

    def resend_batch(self, reason: str) -> None:
        """The linked server had lost pgmux's statements, or held one prepared with a parameter type since
        dropped, and the kept batch failed for it before anything of it ran or reached the client: send it
        again, the statements prepared afresh.

        Which statements are lost or stale is unknown (something pgmux could not see, a function running
        DEALLOCATE, dropped them), so all go (DEALLOCATE ALL first: re-preparing a survivor would fail with 42P05).
        """
        batch, self.replay = self.replay, None
        server, statements = self.server, self.statements
        assert batch is not None and server is not None and statements is not None
        log.info("%s: preparing the statements again and re-sending the request", reason, extra={"conn": self.id})
        server.skip_failed_batch(send_sync=not self.pending)
        server.prepared.start_link()  # the failed batch's answer is over: nothing is in flight
        statements.forget_parsed_names([segment for segment in batch if isinstance(segment, Frame)])
        self._discard_statements(server)
        self._forward_segments(batch, server, fresh=False)  # rewritten afresh: each statement Parsed again

    def _note_query(self, data: bytes | memoryview, server: ServerConnection) -> bytes | None:
        """Look at a Query on its way: what it may change; the Query to send instead when it is refused."""
        self._query_mark = self._scanner.count  # where a COPY this Query may begin starts ignoring Syncs
        refused = None
        # The compiled word test first: it runs for every Query. A Query too large to hold whole is not
        # searched: it counts as changing the session (over-detecting costs a look at the session).
        whole = is_whole(data)
        if not whole or mentions_session_state(data):
            if whole:
                refused = self._refused(bytes(data[5:-1]))
                if refused is not None:
                    data = refused = m.message(m.QUERY, refused + b"\x00")
            if not whole or mentions_reset(data):
                self._reset_seen = True
                server.forget_unreported()
            if whole:
                self._note_session_sql(bytes(data[5:]))
            elif self.transaction_mode:
                self._session_touched = True
        if self.statements is not None:
            self.statements.note_query(data, server.prepared)
        return refused

    def _note_parse(self, data: bytes | memoryview) -> bytes | memoryview:
        """Look at a Parse on its way: what it may change; the Parse to send (another when it is refused)."""
        whole = is_whole(data)
        if whole and not mentions_session_state(data):
            return data
        if not whole:
            if self.transaction_mode:
                self._session_touched = True  # too large to look at: counts as changing the session
            return data
        body = bytes(data[5:])
        name_end = body.find(b"\x00") + 1
        text_end = body.find(b"\x00", name_end)
        refused = self._refused(body[name_end:text_end])
        if refused is not None:
            # Its parameter types stay: the client's Bind must still match the statement.
            return m.message(m.PARSE, body[:name_end] + refused + body[text_end:])
        if self.statements is not None and name_end > 1:
            return data  # a named statement pgmux rewrites: each of its Binds counts (Statement.session_sql)
        self._note_session_sql(body[name_end:])
        return data

    def _refused(self, sql: bytes) -> bytes | None:
        """Under session_state = refuse (transaction mode): ``sql`` with the statement that would create
        session-only state replaced by one that fails with 0A000 (session_state.refusal_sql)."""
        if not self.transaction_mode or self.router.settings.session_state is not SessionStatePolicy.REFUSE:
            return None
        found = refuse_session_only(sql)
        if found is None:
            return None
        refused, kind = found
        self.registry.count_session_refusal(kind)
        log.info("statement refused: it would create %s (session_state = refuse)", kind, extra={"conn": self.id})
        return refused

    def _forward_queued(self, now: float = 0.0) -> None:
        if self._held_for_sync or self._inspecting:
            return  # sent once the server has confirmed this client's parameters, or said what it holds
        held = self._held
        server = self.server
        target = server.relay_transport if server is not None else None
        if (held is not None and server is not None and target is not None
                and self._pass_whole(server, held.nbytes, held.batch_ends, held.queries, held.mid_batch,
                                     held.parses, held.binds, now)):
            # A waiting client's request, from its transport to the server's as the relay would have sent it.
            self._held = None
            self._queued_bytes = 0
            self.flow.resume_for_queue()
            transport = self.relay_transport
            assert transport is not None
            transport.send_held(target)
            return
        for chunk in self._take_queued():
            if self.server is None:
                return
            self._forward(chunk)

    def _has_queued(self) -> bool:
        """Whether requests wait for a server (held by the transport or queued here)."""
        return self._queued is not None or self._held is not None

    def _queue(self, data: bytes) -> None:
        self._unhold()
        if self._queued is None:
            self._queued = [data]
        else:
            self._queued.append(data)
        self._count_queued(len(data))

    def _count_queued(self, nbytes: int) -> None:
        self._queued_bytes += nbytes
        if self._queued_bytes > min(_QUEUE_HIGH_WATER, self.router.max_client_buffer):
            self.flow.pause_for_queue()

    def _unhold(self) -> None:
        """The held read's bytes, back from the transport to the head of the queue, where they belong: they came
        first, and nothing is queued while a read is held. Its counts are forgotten: it is walked again."""
        if self._held is None:
            return
        self._held = None
        transport = self.relay_transport
        self._queued = [transport.take_held() if transport is not None else b""]

    def _take_queued(self) -> list[bytes]:
        """Everything waiting for a server, in order: no longer waiting."""
        self._unhold()
        queued, self._queued, self._queued_bytes = self._queued, None, 0
        self.flow.resume_for_queue()
        return queued if queued is not None else []

    def _wait_for_server(self, now: float = 0.0) -> None:
        assert self.pool is not None
        self.wait_started = now = now or _monotonic()
        try:
            self._waiter = self.pool.wait(self, now)
        except PgError as exc:
            self._reject_batch(exc)
            return
        self.state = ClientState.WAITING

    def server_ready(self, server: ServerConnection, now: float = 0.0) -> None:
        assert self.pool is not None
        self._waiter = None
        if self.state is not ClientState.WAITING:
            self.pool.release(server, now)
            return
        if not server.usable:
            # It died between being promised to us and now (a FATAL arrived): line up again.
            self.pool.close_server(server, "died before its next client used it")
            self.state = ClientState.IDLE
            self._wait_for_server()
            return
        try:
            self.link(server, now)
            self._forward_queued(now)
        except Exception as exc:
            # Called by the loop, not by the transport: nothing else would end this client, which
            # would hang holding a server in an unknown state.
            log.exception("relaying the queued request failed", extra={"conn": self.id})
            self.fail(errors.internal_error(f"the request could not be relayed ({type(exc).__name__})"),
                      reason="internal_error")

    def server_refused(self, error: PgError) -> None:
        self._waiter = None
        if self.state is ClientState.WAITING:
            self.state = ClientState.IDLE
            self._reject_batch(error)

    def _reject_batch(self, error: PgError) -> None:
        """No server came: fail the waiting request as PostgreSQL fails one, keeping the session usable.

        The client gets the ErrorResponse now; everything up to its next Sync (or the Query itself)
        is discarded and answered with one ReadyForQuery, and what it pipelined after that is served.
        """
        self.registry.count_rejection(error.reason or "upstream_unavailable")
        log.warning("request refused: %s", error, extra={"conn": self.id})
        self.write(error.to_bytes())
        self._skipper = BatchSkipper(_BATCH_ENDS_AND_TERMINATE)
        self._skip_rejected_batch(b"".join(self._take_queued()))

    def _skip_rejected_batch(self, data: bytes) -> None:
        """Drop a refused request's bytes as they arrive, up to its batch end: none are kept, and reading
        goes on however large the request, so the batch end is always read and answered."""
        skipper = self._skipper
        assert skipper is not None
        try:
            end = skipper.feed(data)
        except ProtocolViolation as exc:
            self.fail(errors.protocol_violation(str(exc)), reason="protocol_error")
            return
        if end is None:
            return  # the batch's end has not arrived yet
        self._skipper = None
        if skipper.kind == m.TERMINATE:
            self._close_quietly("client sent Terminate")
            return
        self.write(m.ready_for_query())
        if end < len(data):
            self._relay(data[end:])

    def link(self, server: ServerConnection, now: float = 0.0) -> None:
        """Make ``server`` this client's: for a transaction, or (session mode, from the login on) for good.
        ``now``: the monotonic clock, when the caller has just read it."""
        self._linked_at = now or _monotonic()
        pool = self.pool
        assert pool is not None
        pool.stats.server_assignments += 1
        server.prepared.start_link()
        self.server = server
        server.client = self
        server.client_pid = self.cancel_key[0]  # a NOTIFY sent through it is this client's
        self.state = ClientState.ACTIVE
        if self.flow.write_paused:
            server.pause_reading()  # the app has not read the last answer yet: no more until it does
        # The request waits for the sync's answer (one round trip, only when the values differ): sent
        # right behind it, a request beginning with ROLLBACK could end the block a failed sync leaves
        # and run the rest under the previous client's parameters.
        self._held_for_sync = self._sync_parameters(server, in_transaction=server.tx_status is not _IDLE)

    def _sync_parameters(self, server: ServerConnection, in_transaction: bool) -> bool:
        """Send the server this client's parameters where they differ; True when a sync was sent."""
        params, unreported = self.params, self.unreported
        if server.holds(params, unreported):
            return False  # the usual case: clients of a pool share their parameter dicts (ParameterSets)
        sync = parameter_sync(params, unreported, server.params, server.unreported, in_transaction)
        if sync is None:
            server.found_holding(params, unreported)
            return False
        server.send_parameter_sync(sync)
        return True

    def on_parameter_sync_done(self) -> None:
        """PostgreSQL applied this client's parameters on the linked server: what waited for that goes now."""
        if self._held_for_sync:
            self._held_for_sync = False
            self._forward_queued()

    def _unlink_and_release(self, now: float) -> None:
        server = self.server
        assert server is not None and self.pool is not None
        self.server = None
        self.state = ClientState.IDLE
        server.resume_reading()
        stats = self.pool.stats
        stats.xacts += 1
        elapsed = now - self._linked_at
        stats.xact_time += elapsed
        stats.xact_histogram.observe(elapsed)
        if server.unclean:
            # PostgreSQL did not say what the session holds: nobody else may inherit it.
            self.pool.close_server(server, f"the session state client {self.id} left could not be read")
            return
        if self.statements is not None:
            self._trim_statements(server)
        self.pool.release(server, now)

    def _trim_statements(self, server: ServerConnection) -> None:
        """Between transactions: keep the server within max_prepared_statements, or drop every statement
        when pgmux's record of them may be wrong (a stale plan, a statement drop)."""
        held = server.prepared.statements
        limit = self.router.max_prepared_statements
        if not server.prepared.discard_all and len(held) <= limit:
            return  # the common case: nothing to drop
        if server.prepared.discard_all:
            self._discard_statements(server)
            return
        evicted = held.evict_over(limit)
        if evicted:
            self.pool.stats.prepared.evictions += len(evicted)  # type: ignore[union-attr]
            server.send_internal(deallocate_sql(evicted))

    @staticmethod
    def _discard_statements(server: ServerConnection) -> None:
        """DEALLOCATE ALL on the server, so that pgmux knows again what it holds: nothing."""
        server.prepared.deallocating_all()
        server.send_internal("DEALLOCATE ALL")

    def on_stale_plan(self) -> None:
        self.router.statement_names.invalidate_all()

    def at_transaction_boundary(self) -> bool:
        """True when closing now loses nothing: no request in flight and no transaction open."""
        # A session-mode login in line for its server (its Login still set) has nothing under way either.
        if (self.state in (ClientState.STARTUP, ClientState.AUTH, ClientState.IDLE)
                or (self.state is ClientState.WAITING and self.login is not None)):
            return not self._has_queued() and self._skipper is None
        if self.state is ClientState.ACTIVE and self.server is not None:
            return not self.pending and not self._has_queued() and self.server.tx_status is m.TransactionStatus.IDLE
        return False

    # ---- timeouts (checked by the janitor) --------------------------------------------------------

    def check_timeouts(self, now: float) -> None:
        settings = self.router.settings
        server = self.server
        if server is not None and settings.client_request_timeout and self._request_stalled(now):
            self.registry.count_rejection("client_request_timeout")
            self.fail(errors.client_request_timeout(settings.client_request_timeout))
            return
        if self.pending:
            if (settings.query_timeout and server is not None and not self._cancel_sent
                    and now - self.query_started > settings.query_timeout):
                self._cancel_sent = True
                log.info("query_timeout=%gs reached: cancelling the query", settings.query_timeout,
                         extra={"conn": self.id})
                assert self.pool is not None  # a client linked to a server is in its pool
                self.pool.cancel(server)
            return
        if self.state not in (ClientState.IDLE, ClientState.ACTIVE):
            if self.login is not None:
                self.login.check_timeout(now)  # by the janitor, so that no login pays for a timer of its own
            return
        idle_for = now - self.last_active
        in_transaction = server is not None and server.tx_status is not m.TransactionStatus.IDLE
        if in_transaction and settings.idle_transaction_timeout and idle_for > settings.idle_transaction_timeout:
            self.registry.count_rejection("idle_transaction_timeout")
            self.fail(errors.idle_transaction_timeout(settings.idle_transaction_timeout))
        elif not in_transaction and settings.client_idle_timeout and idle_for > settings.client_idle_timeout:
            self.registry.count_rejection("client_idle_timeout")
            self.fail(errors.client_idle_timeout(settings.client_idle_timeout))

    def _request_stalled(self, now: float) -> bool:
        """Part of a message arrived, then nothing more of it for client_request_timeout.

        Its server waits for the rest and serves nobody else meanwhile. Progress is read from the
        scanner here, every janitor pass, so the relay keeps no clock. A client whose reading pgmux
        paused (backpressure) is not stalling.
        """
        scanner = self._scanner
        transport = self.transport
        if scanner.at_boundary or transport is None or not transport.is_reading():
            self._stalled_since = 0.0
            return False
        progress = scanner.progress
        if not self._stalled_since or progress != self._stall_mark:
            self._stall_mark, self._stalled_since = progress, now
            return False
        return now - self._stalled_since > self.router.settings.client_request_timeout

    # ---- ending -----------------------------------------------------------------------------------

    def fail(self, error: PgError, reason: str | None = None) -> None:
        """Send the error; a FATAL one also ends the connection."""
        if reason:
            self.registry.count_rejection(reason)
        if self.state is ClientState.CLOSED:
            return
        self.write(error.to_bytes())
        if error.severity is errors.Severity.FATAL:
            log.info("closing client: %s", error, extra={"conn": self.id})
            self._finish(str(error))
            if self.transport is not None:
                self.transport.close()

    def close(self, reason: str) -> None:
        """End this connection without an error message (Terminate received, admin KILL, ...)."""
        self._close_quietly(reason)

    def _close_quietly(self, reason: str) -> None:
        self._finish(reason)
        if self.relay_transport is not None:
            # Finished already, the connection needs no connection_lost: the compiled transport skips it (a
            # call_soon and its handle: ~3,300 of the ~60,000 instructions of a pgbench -C login).
            self.relay_transport.close_quietly()
        elif self.transport is not None:
            self.transport.close()

    def _finish(self, reason: str) -> None:
        """Leave the pool: return or clean the linked server, drop out of line, forget the cancel key."""
        if self.state is ClientState.CLOSED:
            return
        was_logged_in = self.state not in (ClientState.STARTUP, ClientState.AUTH)
        self.state = ClientState.CLOSED
        login, self.login = self.login, None
        if login is not None:
            login.close()
        if self._waiter is not None:
            self.pool.cancel_wait(self._waiter)  # type: ignore[union-attr]
            self._waiter = None
        self.registry.forget_client(self)
        self.cancel_keys.forget(self)
        if self.statements is not None:
            self.statements.forget_all()  # statements no client holds now stay until evicted (least recently used)
        if self.pool is not None:
            self.pool.clients -= 1  # counted in by Router.login_pool
        if self.admitted:
            self.admitted = False
            self.router.admission.leave(self.database, self.user)
        server, self.server = self.server, None
        if server is not None and self.pool is not None:
            self._return_server(server, self.pool)
        # Asked first: with INFO off (the usual setting under load) the call and its ``extra`` dict would
        # still cost ~0.15 µs, paid by every connection (pgbench -C: every transaction); asked through
        # enabled_for, as isEnabledFor itself is an interpreted call.
        if was_logged_in and enabled_for(log, logging.INFO) and self.router.settings.log_disconnections:
            log.info("client gone: %s", reason, extra={"conn": self.id})

    def _return_server(self, server: ServerConnection, pool: Pool) -> None:
        """Never put back a server in an unknown state: release it clean, clean it, or close it."""
        if server.state is not ServerState.ACTIVE:
            return
        server.client = None
        server.resume_reading()
        if self.pending or self._scanner.mid_batch:
            # Mid-query, mid-COPY, with unread results, or part of a request sent without its Sync:
            # its state cannot be known. Stop whatever runs and abort it (a graceful close could wait
            # forever behind results nobody reads).
            pool.cancel(server)
            pool.abort_server(server, f"client {self.id} left with a query in progress")
            return
        if self._held_for_sync:
            # Its parameter sync is still on its way: whether the backend took the values is unknown, and
            # the next client's own sync would overlap it (its replies would settle the wrong one).
            pool.close_server(server, f"client {self.id} left while its parameters were being applied")
            return
        if self._loaded:
            pool.close_server(server, f"client {self.id} ran LOAD: no reset unloads a library")
            return
        cleanup = []
        if server.tx_status is not m.TransactionStatus.IDLE:
            cleanup.append("ROLLBACK")
        # In transaction mode too when the session may hold this client's state that pgmux has not read
        # (or could not): session-only state must not reach the next client.
        reset = (not self.transaction_mode or bool(self.pins) or self._session_touched or server.inspecting
                 or server.unclean)
        if reset:
            if not resets_all_statements(pool.config.server_reset_query) and self.transaction_mode:
                pool.close_server(server, f"client {self.id} left session state and server_reset_query "
                                          "does not discard it")
                return
            if pool.config.server_reset_query:
                cleanup.append(pool.config.server_reset_query)
            if not resets_all_statements(pool.config.server_reset_query):
                # The session may have prepared names that transaction-mode clients would collide with.
                cleanup.append("DEALLOCATE ALL")
            server.prepared.deallocating_all()  # the reset drops them all
            server.forget_unreported()  # the next client's sync sets or resets each of them again
            server.unclean = False
        elif self.statements is not None and server.prepared.discard_all:
            # pgmux's record of the statements there may be wrong, and only now can it be made right.
            server.prepared.deallocating_all()
            cleanup.append("DEALLOCATE ALL")
        if cleanup:
            pool.reset_and_release(server, cleanup, f"client {self.id} left")
        else:
            pool.release(server)
