"""ServerConnection: one backend connection and its lifecycle — connect, TLS, login, relay to a client, reset."""

from __future__ import annotations

import asyncio
import enum
import functools
import itertools
import ssl
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Final, cast

from proxy.auth.server_auth import ServerAuthenticator, ServerAuthError
from proxy.logs import get_logger
from proxy.protocol import messages as m
from proxy.protocol.errors import parse_error_fields
from proxy.protocol.framing import Frame, FrameScanner, ProtocolViolation
from proxy.prepared import ServerPrepared
from proxy.protocol.startup import build_cancel_request, build_ssl_request, build_startup_message
from proxy.settings import SslMode, Upstream

if TYPE_CHECKING:
    from proxy.client import ClientConnection

log = get_logger("server")
_ids = itertools.count(1)

# What the relay must look at in server traffic; everything else streams through undecoded.
# CopyInResponse (once per COPY FROM STDIN): the Syncs the client sends during it go unanswered.
_RELAY_CAPTURE = frozenset({m.READY_FOR_QUERY, m.PARAMETER_STATUS, m.ERROR_RESPONSE, m.PARSE_COMPLETE,
                            m.COPY_IN_RESPONSE})
_LOGIN_CAPTURE = frozenset(range(256))
_TX_STATUS: Final = m.TRANSACTION_STATUS_BY_BYTE


def _ends_at_last_ready(segments: list) -> bool:
    """True unless a ReadyForQuery is followed by more bytes in the same read."""
    for segment in segments[:-1]:
        if isinstance(segment, Frame) and segment.kind == m.READY_FOR_QUERY:
            return False
    return True


class ServerState(enum.Enum):
    LOGIN = "login"
    IDLE = "idle"
    ACTIVE = "active"  # linked to a client
    RESETTING = "resetting"  # running pgmux's own cleanup before it may be reused
    CLOSING = "closing"  # asked to close; still counts against the limits until the socket is gone
    CLOSED = "closed"

    # Members are singletons: identity hashing is as correct as Enum's name hashing and runs in C
    # (the pool keys its per-state sets by state on every transaction).
    __hash__ = object.__hash__


class ServerLoginError(Exception):
    """The backend could not be reached or refused the login; ``reason`` is safe to show (no password)."""

    def __init__(self, reason: str, sqlstate: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.sqlstate = sqlstate


class InternalQueryFailed(Exception):
    """A query pgmux ran for itself (reset, rollback) failed: the server is in an unknown state."""


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

    def __init__(self, upstream: Upstream, on_lost: Callable[["ServerConnection"], None]) -> None:
        self.id = f"s{next(_ids)}"
        self.upstream = upstream
        self.state = ServerState.LOGIN
        self.transport: asyncio.Transport | None = None
        self.client: ClientConnection | None = None
        self.params: dict[str, str] = {}  # what the server reported with ParameterStatus
        self.unreported: dict[str, str] = {}  # parameters pgmux SET that the server does not report
        self.backend_key: tuple[int, int] | None = None
        self.tx_status = m.TransactionStatus.IDLE
        self.swallow = 0
        self.created_at = time.monotonic()
        self.idle_since = self.created_at
        self.close_reason: str | None = None
        self._on_lost = on_lost
        self._scanner = FrameScanner(_LOGIN_CAPTURE, max_length=1 << 20)
        self._login_frames: asyncio.Queue[Frame | None] | None = asyncio.Queue()
        self._ssl_reply: asyncio.Future[bytes] | None = None
        self._internal_done: asyncio.Future[None] | None = None
        self._internal_error: str | None = None
        self.prepared = ServerPrepared()  # named statements this backend holds (transaction mode)
        self.discard_statements = False  # a plan went stale: drop every statement before reuse

    def __repr__(self) -> str:
        return f"<ServerConnection {self.id} {self.state.value} {self.upstream.redacted()}>"

    # ---- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self._ssl_reply is not None and not self._ssl_reply.done():
            self._ssl_reply.set_result(data)
            return
        try:
            segments = self._scanner.feed(data)
        except ProtocolViolation as exc:
            self.close(f"server sent an invalid message: {exc}")
            return
        if self._login_frames is not None:
            for segment in segments:
                self._login_frames.put_nowait(segment)  # type: ignore[arg-type]
            return
        client = self.client
        if (client is not None and not self.swallow and not self.prepared.injected and self._scanner.verbatim
                and (len(segments) == 1 or _ends_at_last_ready(segments))):
            # The common case: every byte goes to the client as it is; only a few frames are looked at.
            client.write(data)
            pool = client.pool
            assert pool is not None  # narrowed, not ignored: compiled code then reads its stats natively
            pool.stats.bytes_sent += len(data)
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
                if self.swallow:
                    self._swallow_frame(segment)
                elif client is not None:
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
                out.append(segment)
        if self.client is not None:
            self._flush(out, self.client)

    @staticmethod
    def _flush(out: list[bytes | memoryview], client: ClientConnection) -> None:
        if out:
            joined = b"".join(out)
            out.clear()
            client.write(joined)
            if client.pool is not None:
                client.pool.stats.bytes_sent += len(joined)

    def _relay_frame(self, frame: Frame, client: ClientConnection) -> None:
        kind = frame.kind
        if kind == m.READY_FOR_QUERY:
            self.tx_status = status = _TX_STATUS[frame.data[5]]
            statements = client.statements
            if statements is not None:
                self.prepared.on_ready_for_query(statements.names)
            client.on_ready_for_query(status)
        elif kind == m.PARSE_COMPLETE:
            # Only reached when none of pgmux's own Parses is in flight: every one is the client's.
            self.prepared.on_parse_complete()
        elif kind == m.PARAMETER_STATUS:
            name, value = self._take_parameter(frame.data[5:])
            client.on_parameter_status(name, value)
        elif kind == m.ERROR_RESPONSE:
            fields = parse_error_fields(frame.data[5:])
            if fields.get("C") == "0A000" and "cached plan" in fields.get("M", ""):
                # A schema change made a prepared plan's result type wrong: the client gets the error
                # as PostgreSQL sent it; the statement must be prepared afresh everywhere.
                client.on_stale_plan()
                self.discard_statements = True
        elif kind == m.COPY_IN_RESPONSE:
            client.on_copy_in()

    def _swallow_frame(self, frame: Frame) -> None:
        kind = frame.kind
        if kind == m.READY_FOR_QUERY:
            self.tx_status = _TX_STATUS[frame.data[5]]
            self.swallow -= 1
            if not self.swallow and self._internal_done is not None and not self._internal_done.done():
                self._internal_done.set_result(None)
        elif kind == m.PARAMETER_STATUS:
            self._take_parameter(frame.data[5:])
        elif kind == m.ERROR_RESPONSE:
            fields = parse_error_fields(frame.data[5:])
            self._internal_error = f"{fields.get('C', '')} {fields.get('M', '')}"
            log.warning("pgmux's own query failed on the server: %s", self._internal_error, extra={"conn": self.id})

    def _take_parameter(self, body: bytes | memoryview) -> tuple[str, str]:
        """Record a ParameterStatus the backend sent: what it now has, whoever asked for it."""
        name, value = m.parse_parameter_status(body)
        self.params[name] = value
        return name, value

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
        if self._ssl_reply is not None and not self._ssl_reply.done():
            self._ssl_reply.set_result(b"")
        if self._internal_done is not None and not self._internal_done.done():
            self._internal_done.set_exception(InternalQueryFailed("server connection lost"))
        if self.close_reason is None:
            self.close_reason = f"server closed the connection{f': {exc}' if exc else ''}"
        previous = self.state
        self.state = ServerState.CLOSED
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
        if self.transport is not None and self.transport.is_reading():
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and not self.transport.is_reading():
            self.transport.resume_reading()

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
                # type: ignore: a protocol by its methods, not by class (see the class docstring).
                if upstream.unix_socket:
                    await loop.create_unix_connection(lambda: self, upstream.unix_socket)  # type: ignore[type-var]
                else:
                    await loop.create_connection(lambda: self, upstream.host, upstream.port)  # type: ignore[type-var]
                if upstream.sslmode is not SslMode.DISABLE and not upstream.unix_socket:
                    await self._negotiate_tls(loop)
                self.write(build_startup_message({"user": upstream.user, "database": upstream.database}))
                await self._authenticate()
        except TimeoutError:
            self.close("login timed out")
            raise ServerLoginError(f"timed out after server_connect_timeout={timeout:g}s") from None
        except ssl.SSLError as tls_error:
            self.close("TLS failed")
            raise ServerLoginError(f"TLS handshake failed: {tls_error.reason or tls_error}") from None
        except OSError as os_error:
            self.close("connect failed")
            raise ServerLoginError(os_error.strerror or str(os_error)) from None
        except ServerLoginError:
            self.close("login failed")
            raise
        except ServerAuthError as auth_error:
            self.close("login failed")
            raise ServerLoginError(str(auth_error)) from None
        self._login_frames = None
        self._scanner = FrameScanner(_RELAY_CAPTURE)

    async def _negotiate_tls(self, loop: asyncio.AbstractEventLoop) -> None:
        upstream = self.upstream
        self._ssl_reply = loop.create_future()
        self.write(build_ssl_request())
        reply = await self._ssl_reply
        self._ssl_reply = None
        if reply[:1] == b"S":
            if len(reply) > 1:
                # Bytes after 'S' before the handshake could be injected by a man in the middle (CVE-2021-23222).
                raise ServerLoginError("server sent unencrypted data after accepting TLS")
            assert self.transport is not None
            self.transport = await loop.start_tls(  # type: ignore[assignment]
                self.transport, self,  # type: ignore[arg-type]
                _ssl_context(upstream.sslmode, upstream.sslrootcert),
                server_hostname=upstream.host)
        elif reply[:1] == b"N":
            if upstream.sslmode not in (SslMode.ALLOW, SslMode.PREFER):
                raise ServerLoginError(f"server does not support TLS, but sslmode={upstream.sslmode.value}")
        else:
            raise ServerLoginError("server sent an unexpected reply to SSLRequest" if reply else "server closed the connection")

    async def _next_login_frame(self) -> Frame:
        assert self._login_frames is not None
        frame = await self._login_frames.get()
        if frame is None:
            raise ServerLoginError(self.close_reason or "server closed the connection during login")
        return frame

    async def _authenticate(self) -> None:
        authenticator = ServerAuthenticator(self.upstream.user, self.upstream.password)
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
                raise ServerLoginError(f"{fields.get('M', 'login refused')}", fields.get("C"))
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

    async def run_internal(self, sql: str, timeout: float = 10.0) -> None:
        """Run a query for pgmux itself and wait for it; raises InternalQueryFailed on any error."""
        if self.state is ServerState.CLOSED:
            raise InternalQueryFailed("server is closed")
        self._internal_error = None
        self._internal_done = asyncio.get_running_loop().create_future()
        self.send_internal(sql)
        try:
            async with asyncio.timeout(timeout):
                await self._internal_done
        except TimeoutError:
            raise InternalQueryFailed(f"{sql!r} timed out") from None
        finally:
            self._internal_done = None
        if self._internal_error is not None:
            raise InternalQueryFailed(self._internal_error)

    # ---- ending ---------------------------------------------------------------------------------

    def close(self, reason: str) -> None:
        """Close the connection (Terminate first when it is logged in); idempotent."""
        if self.close_reason is None:
            self.close_reason = reason
        transport = self.transport
        if transport is not None and not transport.is_closing():
            if self._login_frames is None:
                transport.write(m.terminate())
            transport.close()
        elif transport is None and self.state is not ServerState.CLOSED:
            self.connection_lost(None)

    async def send_cancel(self, connect_timeout: float = 5.0) -> None:
        """Ask the backend to cancel what it runs now, over a separate connection as the protocol wants."""
        if self.backend_key is None:
            return
        process_id, secret = self.backend_key
        await send_cancel_request(self.upstream, process_id, secret.to_bytes(4, "big", signed=True), connect_timeout)


async def send_cancel_request(upstream: Upstream, process_id: int, secret: bytes, timeout: float) -> None:
    try:
        async with asyncio.timeout(timeout):
            if upstream.unix_socket:
                _, writer = await asyncio.open_unix_connection(upstream.unix_socket)
            else:
                _, writer = await asyncio.open_connection(upstream.host, upstream.port)
            writer.write(build_cancel_request(process_id, secret))
            await writer.drain()
            writer.close()
            await writer.wait_closed()
    except (OSError, TimeoutError) as exc:
        log.warning("could not send a cancel request to %s: %s", upstream.redacted(), exc)
