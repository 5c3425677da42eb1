"""HttpConnection: one connection to an HTTP listener (protocol = "http"), for edge runtimes.

HTTP/1.1 is parsed by h11 and WebSocket frames by wsproto, both sans-IO: this module only moves bytes between
them, the socket (through TLS when the listener has a certificate: wss/https) and what serves a request:
- a request with ``Upgrade: websocket``, on any path (the Neon driver asks for /v2 by default, wsproxy's users
  for /v1), becomes a WebSocket session: a ClientConnection, the TCP client logic itself, reading the binary
  messages' payloads as PostgreSQL protocol bytes (see websocket.py);
- ``/sql`` goes to the endpoint the composition root gives, as a whole request (exchange.py);
- anything else gets 404. Bodies are read up to http_max_request_size, never more (413 past it).
Connections stay open between requests (keep-alive). Each request is logged with its method, path, status and
duration; never its headers (Neon-Connection-String holds a password) nor its query string.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, cast

import h11
from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Ping, TextMessage
from wsproto.utilities import generate_accept_token

from proxy.http.exchange import Endpoint, HttpRequest, HttpResponse
from proxy.http.websocket import PROTOCOL_ERROR, UNSUPPORTED_DATA, WebSocketTransport
from proxy.logs import get_logger
from proxy.tls import ClientTls, TlsError, TlsTransport

if TYPE_CHECKING:
    from proxy.client import ClientConnection

log = get_logger("http")

SQL_PATH: Final = "/sql"
_IDLE_TIMEOUT: Final = 60.0  # a connection with no request under way is closed after this long
_LINGER: Final = 2.0  # after refusing a body, read (and drop) the rest this long so the client sees the answer
_MAX_HEAD: Final = 16 * 1024  # request line and headers


@dataclass(frozen=True)
class HttpRoutes:
    """What an HTTP listener serves, as the composition root (app.py) wires it."""

    sql: Endpoint  # /sql
    # A WebSocket session's client, given the host name its request named (it may select a database, as SNI).
    open_session: Callable[[str | None], ClientConnection]
    max_request_size: Callable[[], int]  # http_max_request_size, as configured now
    count_tls_failure: Callable[[str], None]
    connections: set[HttpConnection]  # the open ones, closed when pgmux stops


def json_error(status: int, message: str, headers: list[tuple[str, str]] | None = None) -> HttpResponse:
    """An error answered as the Neon driver reads one: a JSON object with a message."""
    return HttpResponse(status, [("content-type", "application/json"), *(headers or [])],
                        json.dumps({"message": message}).encode())


def _host_name(headers: dict[str, str], target: str) -> str | None:
    """The host a WebSocket session names: ``?address=`` (wsProxy's string form) else the Host header, port
    stripped. Never dialled: it may only select a configured database (Router.database_for_server_name)."""
    _, _, query = target.partition("?")
    for pair in query.split("&"):
        name, _, value = pair.partition("=")
        if name == "address" and value:
            return _without_port(value)
    host = headers.get("host")
    return _without_port(host) if host else None


def _without_port(address: str) -> str:
    if address.startswith("["):  # an IPv6 address
        return address[1:address.find("]")]
    return address.rpartition(":")[0] if ":" in address else address


class HttpConnection:
    """One HTTP listener connection: requests one after another, until one becomes a WebSocket session.

    An asyncio protocol by its methods (as ClientConnection is).
    """

    def __init__(self, routes: HttpRoutes, tls: ClientTls) -> None:
        self.routes = routes
        self._tls_offer = tls
        self.raw: asyncio.Transport | None = None
        self.transport: asyncio.Transport | None = None  # the raw socket, or TLS over it
        self.tls: TlsTransport | None = None
        self.http = h11.Connection(h11.SERVER, max_incomplete_event_size=_MAX_HEAD)
        self.peer = ""
        self._request: Any = None  # the h11.Request being read
        self._body: list[bytes] = []
        self._body_size = 0
        self._started = 0.0
        self._task: asyncio.Task[None] | None = None  # the endpoint answering a request
        self._timer: asyncio.TimerHandle | None = None
        self._discarding = False  # a refused body's rest is dropped until the connection closes
        self.websocket: Connection | None = None
        self.session: ClientConnection | None = None  # the WebSocket session's client

    # ---- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.raw = self.transport = cast(asyncio.Transport, transport)
        self.routes.connections.add(self)
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "unix"
        if self._tls_offer.offered:
            # Always direct: an HTTP client's first bytes are its ClientHello.
            self.tls = self.transport = self._tls_offer.wrap(self.raw, direct=True)
        self._arm_timer(_IDLE_TIMEOUT)

    def data_received(self, data: bytes) -> None:
        if self._discarding:
            return
        if self.tls is not None:
            try:
                data = self.tls.receive(data)
            except TlsError as failure:
                self.routes.count_tls_failure(failure.reason)
                log.warning("HTTP client %s: TLS failed: %s", self.peer, failure)
                self._close()
                return
            if not data:
                return
        if self.websocket is not None:
            self._websocket_received(data)
            return
        self.http.receive_data(data)
        self._next_events()

    def eof_received(self) -> bool | None:
        if self.websocket is None:
            self.http.receive_data(b"")
            self._next_events()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.routes.connections.discard(self)
        if self._timer is not None:
            self._timer.cancel()
        if self._task is not None:
            self._task.cancel()
        if self.session is not None:
            self.session.connection_lost(exc)

    def pause_writing(self) -> None:
        if self.session is not None:
            self.session.pause_writing()

    def resume_writing(self) -> None:
        if self.session is not None:
            self.session.resume_writing()

    # ---- HTTP requests ----------------------------------------------------------------------------

    def _next_events(self) -> None:
        """Act on what h11 has parsed, one request at a time (the next waits while an endpoint answers)."""
        http = self.http
        while self._task is None and self.websocket is None and not self._discarding:
            try:
                event = http.next_event()
            except h11.RemoteProtocolError as exc:
                self._refuse(json_error(exc.error_status_hint, f"malformed HTTP request: {exc}"))
                return
            if event is h11.NEED_DATA:
                return
            if event is h11.PAUSED:
                if http.their_state is h11.MIGHT_SWITCH_PROTOCOL:
                    self._upgrade()
                elif http.our_state is h11.DONE and http.their_state is h11.DONE:
                    self._next_cycle()
                    continue
                return
            if isinstance(event, h11.Request):
                self._begin(event)
            elif isinstance(event, h11.Data):
                self._read_body(event.data)
            elif isinstance(event, h11.EndOfMessage):
                if self._request is not None and not self._is_upgrade():
                    self._dispatch()
            elif isinstance(event, h11.ConnectionClosed):
                self._close()
                return

    def _begin(self, request: h11.Request) -> None:
        self._request = request
        self._body, self._body_size = [], 0
        self._started = time.monotonic()
        if self._is_upgrade():
            return  # answered once the whole request is in (h11 then pauses)
        length = _header(request, b"content-length")
        limit = self.routes.max_request_size()
        if length is not None and length.isdigit() and int(length) > limit:
            self._refuse(_too_large(limit))
        elif self.http.they_are_waiting_for_100_continue:  # curl, for bodies over 1 kB
            assert self.transport is not None
            self.transport.write(self.http.send(h11.InformationalResponse(status_code=100, headers=[])))

    def _is_upgrade(self) -> bool:
        upgrade = _header(self._request, b"upgrade")
        return upgrade is not None and "websocket" in upgrade.lower()

    def _read_body(self, data: bytes) -> None:
        self._body_size += len(data)
        limit = self.routes.max_request_size()
        if self._body_size > limit:
            self._refuse(_too_large(limit))
            return
        self._body.append(data)

    def _dispatch(self) -> None:
        """The whole request is in: to its endpoint, or 404."""
        request = self._request
        target = request.target.decode("latin-1")
        path = target.partition("?")[0]
        if path != SQL_PATH:
            self._respond(json_error(404, f"no such path {path!r}: pgmux serves {SQL_PATH} and WebSocket "
                                          "upgrades"))
            return
        exchange = HttpRequest(method=request.method.decode("latin-1"), target=target,
                               headers=_headers(request), body=b"".join(self._body), peer=self.peer)
        self._body = []
        self._cancel_timer()
        assert self.transport is not None
        self.transport.pause_reading()  # the next request waits in the socket while this one is answered
        self._task = asyncio.get_running_loop().create_task(self._answer(exchange))

    async def _answer(self, request: HttpRequest) -> None:
        try:
            response = await self.routes.sql(request)
        except Exception:
            log.exception("HTTP %s %s failed", request.method, SQL_PATH)
            response = json_error(500, "internal error in pgmux")
        self._task = None
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        transport.resume_reading()
        self._respond(response)
        self._next_events()

    def _respond(self, response: HttpResponse, closing: bool = False) -> None:
        """Send ``response`` to the request being read; the connection then serves the next, or closes."""
        http = self.http
        assert self.transport is not None
        headers = [(name, value) for name, value in response.headers if name.lower() != "content-length"]
        headers.append(("content-length", str(len(response.body))))
        if closing:
            headers.append(("connection", "close"))
        try:
            out = http.send(h11.Response(status_code=response.status, headers=headers))
            out += http.send(h11.Data(data=response.body)) if response.body else b""
            out += http.send(h11.EndOfMessage())
        except h11.LocalProtocolError:
            self._close()  # no response can be sent in this state: nothing to tell the client
            return
        self.transport.write(out)
        self._log(response.status)
        if http.our_state is h11.MUST_CLOSE or closing:
            self._close()
        elif http.their_state is h11.DONE:
            self._next_cycle()
        else:
            # Answered before the request's body was read (refused): the rest of it is nobody's.
            self._close()

    def _next_cycle(self) -> None:
        self.http.start_next_cycle()
        self._request = None
        self._arm_timer(_IDLE_TIMEOUT)

    def _refuse(self, response: HttpResponse) -> None:
        """Answer ``response`` and end the connection, reading no more of what the client sends."""
        if self.http.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            assert self.transport is not None
            http = self.http
            headers = [*response.headers, ("content-length", str(len(response.body))), ("connection", "close")]
            try:
                self.transport.write(http.send(h11.Response(status_code=response.status, headers=headers))
                                     + http.send(h11.Data(data=response.body)) + http.send(h11.EndOfMessage()))
            except h11.LocalProtocolError:
                pass
            self._log(response.status)
        # Closing at once could reset the connection before the client read the answer (it is still sending):
        # drop what it sends for a moment first.
        self._discarding = True
        self._body = []
        self._arm_timer(_LINGER)

    def _log(self, status: int) -> None:
        request = self._request
        if request is None:
            log.info("HTTP %s: %d (malformed request)", self.peer, status)
            return
        path = request.target.decode("latin-1").partition("?")[0]
        log.info("HTTP %s %s %d %.1f ms from %s", request.method.decode("latin-1"), path, status,
                 (time.monotonic() - self._started) * 1000, self.peer)

    # ---- WebSocket sessions -----------------------------------------------------------------------

    def _upgrade(self) -> None:
        """The request asked for a WebSocket (RFC 6455): accept it, and start the PostgreSQL session."""
        request = self._request
        key = _header(request, b"sec-websocket-key")
        if request.method != b"GET" or not key:
            self._refuse(json_error(400, "a WebSocket upgrade needs GET and a Sec-WebSocket-Key header"))
            return
        self._cancel_timer()  # the session's own timeouts apply from now on
        accept = generate_accept_token(key.encode("latin-1")).decode("latin-1")
        assert self.transport is not None
        self.transport.write(self.http.send(h11.InformationalResponse(
            status_code=101, reason="Switching Protocols",
            headers=[("upgrade", "websocket"), ("connection", "Upgrade"), ("sec-websocket-accept", accept)])))
        self._log(101)
        trailing, _ = self.http.trailing_data
        self.websocket = Connection(ConnectionType.SERVER)
        session = self.routes.open_session(_host_name(_headers(request), request.target.decode("latin-1")))
        self.session = session
        session.connection_made(WebSocketTransport(self.transport, self.websocket))
        if trailing:
            self._websocket_received(trailing)

    def _websocket_received(self, data: bytes) -> None:
        """Binary payloads to the session as one piece (a pipelined login then arrives together); text frames,
        malformed frames and Close end it."""
        websocket, session = self.websocket, self.session
        assert websocket is not None and session is not None and self.transport is not None
        websocket.receive_data(data)
        payload: list[bytes] = []
        for event in websocket.events():
            if isinstance(event, BytesMessage):
                payload.append(bytes(event.data))
            elif isinstance(event, Ping):
                self.transport.write(websocket.send(event.response()))
            elif isinstance(event, TextMessage):
                self._deliver(payload)
                log.warning("WebSocket client %s sent a text frame: PostgreSQL's protocol goes in binary frames",
                            self.peer)
                self._end_session(UNSUPPORTED_DATA, "text frames are not accepted: send binary frames")
                return
            elif isinstance(event, CloseConnection):
                self._deliver(payload)
                if websocket.state is ConnectionState.REMOTE_CLOSING:
                    self.transport.write(websocket.send(event.response()))
                    self._close()
                else:  # a malformed frame: wsproto tells it as a Close to send
                    log.warning("WebSocket client %s: %s", self.peer, event.reason)
                    self._end_session(event.code or PROTOCOL_ERROR, event.reason or "protocol error")
                return
        self._deliver(payload)

    def _deliver(self, payload: list[bytes]) -> None:
        if payload and self.session is not None:
            self.session.received(payload[0] if len(payload) == 1 else b"".join(payload))
            payload.clear()

    def _end_session(self, code: int, reason: str) -> None:
        """Close the WebSocket with ``code``; the session ends with the socket (connection_lost)."""
        transport = self.session.transport if self.session is not None else None
        if isinstance(transport, WebSocketTransport):
            transport.close(code, reason)
        else:
            self._close()

    # ---- closing ------------------------------------------------------------------------------

    def _arm_timer(self, delay: float) -> None:
        self._cancel_timer()
        self._timer = asyncio.get_running_loop().call_later(delay, self._close)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def close(self) -> None:
        """pgmux stops: end the connection (a WebSocket session has been told already, as every client is)."""
        self._close()

    def _close(self) -> None:
        self._cancel_timer()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()


def _header(request: h11.Request, name: bytes) -> str | None:
    values = [value for key, value in request.headers if key == name]
    return b", ".join(values).decode("latin-1") if values else None


def _headers(request: h11.Request) -> dict[str, str]:
    """Names lower-cased (h11 does that), a repeated header's values joined with ", "."""
    headers: dict[str, str] = {}
    for name, value in request.headers:
        key, text = name.decode("latin-1"), value.decode("latin-1")
        headers[key] = f"{headers[key]}, {text}" if key in headers else text
    return headers


def _too_large(limit: int) -> HttpResponse:
    return json_error(413, f"request body larger than http_max_request_size ({limit} bytes)")
