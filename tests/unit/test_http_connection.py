"""The HTTP listener's connection driven without a socket: routing, body limits, keep-alive, the WebSocket
upgrade and its frames (the PostgreSQL session behind it is a recording stand-in here)."""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h11
import pytest
import trustme
from wsproto.connection import Connection, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Ping, Pong, TextMessage

from proxy.http.exchange import HttpRequest, HttpResponse
from proxy.http.listener import HttpConnection, HttpRoutes
from proxy.http.websocket import WebSocketTransport
from proxy.settings import SslMode
from proxy.tls import NO_TLS, ClientTlsOptions, load_client_tls

LIMIT = 1000
UPGRADE = (b"GET /v2?address=db.internal:5432 HTTP/1.1\r\nHost: edge.example.com:4444\r\nUpgrade: websocket\r\n"
           b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")


class FakeSocket(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.sent = bytearray()
        self.closed = False
        self.reading = True

    def write(self, data: Any) -> None:
        self.sent += data

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 5555) if name == "peername" else default

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def is_reading(self) -> bool:
        return self.reading

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass


def _run(test: Callable[[HttpConnection, FakeSocket, list[Any]], Any]) -> None:
    async def main() -> None:
        sessions: list[Any] = []
        requests: list[HttpRequest] = []

        async def sql(request: HttpRequest) -> HttpResponse:
            requests.append(request)
            return HttpResponse(200, [("content-type", "application/json")], b'{"ok":true}')

        def open_session(server_name: str | None) -> Any:
            sessions.append(Session(server_name))
            return sessions[-1]

        routes = HttpRoutes(sql=sql, open_session=open_session, max_request_size=lambda: LIMIT,
                            count_tls_failure=lambda reason: None, connections=set())
        connection = HttpConnection(routes, NO_TLS)
        socket = FakeSocket()
        connection.connection_made(socket)
        result = test(connection, socket, [sessions, requests])
        if asyncio.iscoroutine(result):
            await result
        connection.connection_lost(None)

    asyncio.run(main())


class Session:
    """Stands in for the ClientConnection a WebSocket session gets, with its method names."""

    def __init__(self, server_name: str | None) -> None:
        self.server_name = server_name
        self.chunks: list[bytes] = []
        self.transport: WebSocketTransport | None = None
        self.lost = False

    def connection_made(self, transport: WebSocketTransport) -> None:
        self.transport = transport

    def received(self, data: bytes) -> None:
        self.chunks.append(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True

    def pause_writing(self) -> None:
        pass

    def resume_writing(self) -> None:
        pass


def _responses(sent: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    client = h11.Connection(h11.CLIENT)
    responses = []
    client.send(h11.Request(method="GET", target="/", headers=[("host", "x")]))
    client.send(h11.EndOfMessage())
    client.receive_data(bytes(sent))
    status, headers, body = 0, {}, b""
    while True:
        event = client.next_event()
        if isinstance(event, h11.Response):
            status = event.status_code
            headers = {k.decode(): v.decode() for k, v in event.headers}
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            responses.append((status, headers, body))
            body = b""
            if client.our_state is h11.MUST_CLOSE or client.their_state is h11.MUST_CLOSE:
                return responses
            client.start_next_cycle()
            client.send(h11.Request(method="GET", target="/", headers=[("host", "x")]))
            client.send(h11.EndOfMessage())
        else:
            return responses


def test_an_unknown_path_gets_404_and_the_connection_serves_the_next_request() -> None:
    def test(connection: HttpConnection, socket: FakeSocket, _: Any) -> None:
        connection.data_received(b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\nGET /other HTTP/1.1\r\nHost: x\r\n\r\n")
        responses = _responses(socket.sent)
        assert [status for status, _, _ in responses] == [404, 404]
        assert "message" in json.loads(responses[0][2])
        assert not socket.closed
    _run(test)


def test_sql_requests_reach_the_endpoint_whole_and_keep_the_connection() -> None:
    async def test(connection: HttpConnection, socket: FakeSocket, parts: list[Any]) -> None:
        body = b'{"query":"SELECT 1","params":[]}'
        request = (b"POST /sql HTTP/1.1\r\nHost: x\r\nNeon-Connection-String: postgresql://u:p@h/db\r\n"
                   b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        connection.data_received(request + request)
        for _ in range(10):
            await asyncio.sleep(0)
        responses = _responses(socket.sent)
        assert [(status, payload) for status, _, payload in responses] == [(200, b'{"ok":true}')] * 2
        requests = parts[1]
        assert [(r.method, r.target, r.body) for r in requests] == [("POST", "/sql", body)] * 2
        assert requests[0].headers["neon-connection-string"] == "postgresql://u:p@h/db"
        assert socket.reading and not socket.closed
    _run(test)


def test_a_client_that_expects_100_continue_is_told_to_send_its_body() -> None:
    async def test(connection: HttpConnection, socket: FakeSocket, parts: list[Any]) -> None:
        connection.data_received(b"POST /sql HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n")
        assert bytes(socket.sent).startswith(b"HTTP/1.1 100 ")
        connection.data_received(b"{}")
        for _ in range(10):
            await asyncio.sleep(0)
        assert parts[1][0].body == b"{}"
    _run(test)


def test_a_body_over_the_limit_gets_413_without_being_read() -> None:
    def declared(connection: HttpConnection, socket: FakeSocket, parts: list[Any]) -> None:
        connection.data_received(b"POST /sql HTTP/1.1\r\nHost: x\r\nContent-Length: 100000000\r\n\r\n" + b"x" * 500)
        connection.data_received(b"x" * 100_000)  # dropped unread
        [(status, headers, body)] = _responses(socket.sent)
        assert status == 413 and headers["connection"] == "close" and b"http_max_request_size" in body
        assert connection._body == [] and parts[1] == []

    def chunked(connection: HttpConnection, socket: FakeSocket, parts: list[Any]) -> None:
        connection.data_received(b"POST /sql HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(3):
            connection.data_received(b"190\r\n" + b"y" * 400 + b"\r\n")
        [(status, _, _)] = _responses(socket.sent)
        assert status == 413 and parts[1] == []

    _run(declared)
    _run(chunked)


def test_a_malformed_request_gets_400_and_the_connection_closes() -> None:
    def test(connection: HttpConnection, socket: FakeSocket, _: Any) -> None:
        connection.data_received(b"NOT HTTP AT ALL\r\n\r\n")
        [(status, headers, _)] = _responses(socket.sent)
        assert status == 400 and headers["connection"] == "close"
    _run(test)


def test_an_upgrade_without_a_key_gets_400() -> None:
    def test(connection: HttpConnection, socket: FakeSocket, parts: list[Any]) -> None:
        connection.data_received(UPGRADE.replace(b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n", b""))
        [(status, _, body)] = _responses(socket.sent)
        assert status == 400 and b"Sec-WebSocket-Key" in body and parts[0] == []
    _run(test)


def _upgraded(connection: HttpConnection, socket: FakeSocket, sessions: list[Any],
              first: bytes = b"") -> tuple[Connection, Any]:
    """Upgrade (with ``first`` pipelined behind the request); the client's wsproto and the session."""
    connection.data_received(UPGRADE + first)
    head, _, rest = bytes(socket.sent).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101 Switching Protocols")
    assert b"sec-websocket-accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=" in head
    socket.sent = bytearray(rest)
    return Connection(ConnectionType.CLIENT), sessions[0]


def _frames(client: Connection, *events: Any) -> bytes:
    return b"".join(client.send(event) for event in events)


def _server_events(client: Connection, socket: FakeSocket) -> list[Any]:
    client.receive_data(bytes(socket.sent))
    socket.sent.clear()
    return list(client.events())


def test_a_websocket_session_gets_binary_payloads_as_bytes_and_answers_in_binary_frames() -> None:
    def test(connection: HttpConnection, socket: FakeSocket, parts: list[Any]) -> None:
        sender = Connection(ConnectionType.CLIENT)
        client, session = _upgraded(connection, socket, parts[0],
                                    _frames(sender, BytesMessage(data=b"startup"), BytesMessage(data=b"+password")))
        # The host name is only a hint for a configured database, and never dialled.
        assert session.server_name == "db.internal"
        assert session.chunks == [b"startup+password"]  # one read's payloads arrive together
        connection.data_received(_frames(sender, Ping(payload=b"hi"), BytesMessage(data=b"Q")))
        assert session.chunks[-1] == b"Q"
        session.transport.write(b"answer")
        events = _server_events(client, socket)
        assert isinstance(events[0], Pong) and events[0].payload == b"hi"
        assert isinstance(events[1], BytesMessage) and events[1].data == b"answer"
        session.transport.close()  # the PostgreSQL session ended
        [close] = _server_events(client, socket)
        assert isinstance(close, CloseConnection) and close.code == 1000 and socket.closed
    _run(test)


def test_a_text_frame_ends_the_session_with_1003() -> None:
    def test(connection: HttpConnection, socket: FakeSocket, parts: list[Any]) -> None:
        client, session = _upgraded(connection, socket, parts[0])
        connection.data_received(_frames(client, TextMessage(data="SELECT 1")))
        [close] = _server_events(client, socket)
        assert isinstance(close, CloseConnection) and close.code == 1003
        assert socket.closed and session.chunks == []
    _run(test)


def test_a_malformed_frame_ends_the_session_with_1002() -> None:
    def test(connection: HttpConnection, socket: FakeSocket, parts: list[Any]) -> None:
        client, session = _upgraded(connection, socket, parts[0])
        connection.data_received(b"\x82\x03abc")  # unmasked: a client's frames must be masked
        [close] = _server_events(client, socket)
        assert isinstance(close, CloseConnection) and close.code == 1002 and socket.closed
    _run(test)


def test_the_client_closing_its_websocket_is_answered_and_ends_the_session() -> None:
    def test(connection: HttpConnection, socket: FakeSocket, parts: list[Any]) -> None:
        client, session = _upgraded(connection, socket, parts[0])
        connection.data_received(_frames(client, CloseConnection(code=1000)))
        [close] = _server_events(client, socket)
        assert isinstance(close, CloseConnection) and socket.closed
    _run(test)


def test_flow_control_through_the_websocket_reaches_the_socket() -> None:
    def test(connection: HttpConnection, socket: FakeSocket, parts: list[Any]) -> None:
        _, session = _upgraded(connection, socket, parts[0])
        session.transport.pause_reading()
        assert not socket.reading and not session.transport.is_reading()
        session.transport.resume_reading()
        assert socket.reading
    _run(test)


def test_each_request_is_logged_with_method_path_status_and_duration_never_headers_or_query(
        caplog: pytest.LogCaptureFixture) -> None:
    async def test(connection: HttpConnection, socket: FakeSocket, _: Any) -> None:
        body = b"{}"
        connection.data_received(b"POST /sql?secret=1 HTTP/1.1\r\nHost: x\r\nNeon-Connection-String: "
                                 b"postgresql://u:hunter2@h/db\r\nContent-Length: 2\r\n\r\n" + body)
        for _ in range(10):
            await asyncio.sleep(0)

    with caplog.at_level(logging.INFO, logger="pgmux.http"):
        _run(test)
    [line] = [record.getMessage() for record in caplog.records if record.name == "pgmux.http"]
    assert line.startswith("HTTP POST /sql 200 ") and " ms from 127.0.0.1:5555" in line
    assert "hunter2" not in line and "secret" not in line


def _handshake(tls: Any, client: ssl.SSLObject, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO,
               socket: FakeSocket) -> None:
    for _ in range(10):
        try:
            client.do_handshake()
            tls.receive(outgoing.read())  # the client's Finished
            return
        except ssl.SSLWantReadError:
            tls.receive(outgoing.read())
            incoming.write(bytes(socket.sent))
            socket.sent.clear()
    raise AssertionError("no handshake")


def test_an_http_listener_tls_offers_alpn_http_1_1_and_requires_none(tmp_path: Path) -> None:
    ca = trustme.CA()
    issued = ca.issue_cert("localhost")
    cert, key = tmp_path / "server.crt", tmp_path / "server.key"
    issued.cert_chain_pems[0].write_to_path(str(cert))
    issued.private_key_pem.write_to_path(str(key))
    options = ClientTlsOptions(SslMode.REQUIRE, str(cert), str(key), None, "secure", "default")
    offer = load_client_tls(options, http=True)
    for alpn in (["http/1.1"], None):
        context = ssl.create_default_context()
        ca.configure_trust(context)
        if alpn:
            context.set_alpn_protocols(alpn)
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        client = context.wrap_bio(incoming, outgoing, server_hostname="localhost")
        socket = FakeSocket()
        tls = offer.wrap(socket, direct=True)
        _handshake(tls, client, incoming, outgoing, socket)
        assert client.selected_alpn_protocol() == (alpn[0] if alpn else None)
    # A PostgreSQL listener keeps requiring ALPN postgresql for direct TLS.
    assert load_client_tls(options).required_alpn == "postgresql" and offer.required_alpn is None
