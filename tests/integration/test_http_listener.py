"""The HTTP listener with a hand-driven WebSocket client (wsproto over a socket): the PostgreSQL session inside it
(a pipelined cleartext login, SSLRequest answered N, a CancelRequest on a fresh WebSocket, auth_query users), and
bad input, each a clear error that leaves everything else working."""

from __future__ import annotations

import socket
import struct
import threading
import time

import psycopg
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, BytesMessage, CloseConnection, Request, TextMessage

from pgusers import APP, APP_DATABASE
from proxy.protocol import messages as m
from proxy.protocol.startup import build_cancel_request, build_ssl_request, build_startup_message
from test_auth_query import AUTH_QUERY, FIRST, LOOKED_UP, looked_up_role  # noqa: F401  (a fixture)
from test_metrics import scrape, value

HTTP_LISTENER = {"address": "127.0.0.1:0", "protocol": "http"}


class WebSocketClient:
    """A WebSocket to pgmux carrying PostgreSQL bytes, as the Neon driver's shim does."""

    def __init__(self, port: int, target: str = "/v2") -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as ws and browsers: frames go out at once
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.sock.sendall(self.ws.send(Request(host=f"127.0.0.1:{port}", target=target)))
        self.received = bytearray()
        self.closed: CloseConnection | None = None
        while not isinstance(self._next_event(), AcceptConnection):
            pass

    def _next_event(self) -> object:
        while True:
            for event in self.ws.events():
                if isinstance(event, BytesMessage):
                    self.received += event.data
                elif isinstance(event, CloseConnection):
                    self.closed = event
                return event
            data = self.sock.recv(65536)
            self.ws.receive_data(data or None)

    def send(self, data: bytes) -> None:
        self.sock.sendall(self.ws.send(BytesMessage(data=data)))

    def read_until(self, kind: bytes, timeout: float = 10) -> list[tuple[bytes, bytes]]:
        """PostgreSQL messages up to and including the first of ``kind``."""
        self.sock.settimeout(timeout)
        messages: list[tuple[bytes, bytes]] = []
        while True:
            while len(self.received) >= 5:
                length = struct.unpack("!I", self.received[1:5])[0]
                if len(self.received) < 1 + length:
                    break
                message = (bytes(self.received[:1]), bytes(self.received[5:1 + length]))
                del self.received[:1 + length]
                messages.append(message)
                if message[0] == kind:
                    return messages
            if self.closed is not None:
                raise AssertionError(f"closed ({self.closed.code}) before {kind!r}: {messages}")
            self._next_event()

    def wait_closed(self) -> CloseConnection:
        self.sock.settimeout(10)
        while self.closed is None:
            self._next_event()
        return self.closed

    def close(self) -> None:
        self.sock.close()


def _login(port: int, user: str = APP.name, password: str = APP.password, then: bytes = b"",
           target: str = "/v2", database: str = APP_DATABASE) -> tuple[WebSocketClient, list[tuple[bytes, bytes]]]:
    """The Neon driver's pipelined login: StartupMessage, cleartext password and ``then`` in one message."""
    client = WebSocketClient(port, target)
    client.send(build_startup_message({"user": user, "database": database})
                + m.message(m.PASSWORD, password.encode() + b"\x00") + then)
    return client, client.read_until(b"Z")


def _healthy(proxy) -> None:
    """Everything else still works: a WebSocket session and a TCP client."""
    client, _ = _login(proxy.port(1), then=m.query("SELECT 40 + 2"))
    assert [body for kind, body in client.read_until(b"Z") if kind == b"D"] == [b"\x00\x01\x00\x00\x00\x0242"]
    client.close()
    with psycopg.connect(proxy.dsn(APP.name, APP.password, APP_DATABASE), connect_timeout=10) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_a_pipelined_cleartext_login_runs_the_query_sent_with_it(pgmux) -> None:
    proxy = pgmux(listeners=[HTTP_LISTENER], metrics_listen="127.0.0.1:0")
    client, welcome = _login(proxy.port(1), then=m.query("SELECT current_user"))
    assert welcome[0] == (b"R", struct.pack("!I", 3))  # AuthenticationCleartextPassword, which the driver ignores
    assert (b"R", struct.pack("!I", 0)) in welcome and any(kind == b"K" for kind, _ in welcome)
    answer = client.read_until(b"Z")
    assert [body[6:] for kind, body in answer if kind == b"D"] == [APP.name.encode()]
    client.send(m.message(m.TERMINATE))
    assert client.wait_closed().code == 1000
    text = scrape(proxy)
    assert value(text, "pgmux_client_connections_accepted_total", transport="websocket") == 1
    assert value(text, "pgmux_client_connections_accepted_total", transport="tcp") == 0


def test_connections_logins_and_failed_logins_are_counted_by_transport(pgmux) -> None:
    proxy = pgmux(listeners=[HTTP_LISTENER], metrics_listen="127.0.0.1:0")
    websocket, _welcome = _login(proxy.port(1))
    refused = WebSocketClient(proxy.port(1))
    refused.send(build_startup_message({"user": APP.name, "database": APP_DATABASE})
                 + m.message(m.PASSWORD, b"wrong\x00"))
    assert refused.read_until(b"E")[-1][0] == b"E"
    refused.wait_closed()
    with psycopg.connect(host=proxy.host, port=proxy.port(), user=APP.name, password=APP.password,
                         dbname=APP_DATABASE, connect_timeout=10) as tcp:
        tcp.execute("SELECT 1")
        text = scrape(proxy)
    assert value(text, "pgmux_client_connections_by_transport", transport="websocket") == 1
    assert value(text, "pgmux_client_connections_by_transport", transport="tcp") == 1
    assert value(text, "pgmux_logins_total", transport="websocket") == 1
    assert value(text, "pgmux_logins_total", transport="tcp") == 1
    assert value(text, "pgmux_login_failures_total", transport="websocket") == 1
    assert value(text, "pgmux_login_failures_total", transport="tcp") == 0
    websocket.close()


def test_a_password_sent_unasked_in_a_later_frame_is_still_taken_in_cleartext(pgmux) -> None:
    proxy = pgmux(listeners=[HTTP_LISTENER])
    client = WebSocketClient(proxy.port(1))
    client.send(build_startup_message({"user": APP.name, "database": APP_DATABASE}))
    time.sleep(0.005)  # the Neon driver without coalesceWrites: each write a frame, node may send them apart
    client.send(m.message(m.PASSWORD, APP.password.encode() + b"\x00") + m.query("SELECT 1"))
    welcome = client.read_until(b"Z")
    assert welcome[0] == (b"R", struct.pack("!I", 3)) and (b"R", struct.pack("!I", 0)) in welcome
    assert [body[6:] for kind, body in client.read_until(b"Z") if kind == b"D"] == [b"1"]
    client.close()


def test_a_client_that_waits_is_asked_for_scram_and_ssl_requests_are_answered_n(pgmux) -> None:
    proxy = pgmux(listeners=[HTTP_LISTENER])
    client = WebSocketClient(proxy.port(1), "/")
    client.send(build_ssl_request())
    client.sock.settimeout(10)
    while not client.received:
        client._next_event()
    assert bytes(client.received) == b"N"
    client.received.clear()
    client.send(build_startup_message({"user": APP.name, "database": APP_DATABASE}))
    [(kind, body)] = client.read_until(b"R")
    assert kind == b"R" and struct.unpack("!I", body[:4])[0] == 10  # AuthenticationSASL
    client.close()


def test_a_cancel_request_on_a_fresh_websocket_cancels_the_running_query(pgmux) -> None:
    proxy = pgmux(listeners=[HTTP_LISTENER])
    client, welcome = _login(proxy.port(1))
    [key] = [body for kind, body in welcome if kind == b"K"]
    client.send(m.query("SELECT pg_sleep(30)"))
    time.sleep(0.3)
    canceller = WebSocketClient(proxy.port(1), "/v1")
    canceller.send(build_cancel_request(struct.unpack("!i", key[:4])[0], key[4:8]))
    assert canceller.wait_closed().code == 1000
    started = time.monotonic()
    answer = client.read_until(b"Z")
    assert time.monotonic() - started < 10
    [error] = [body for kind, body in answer if kind == b"E"]
    assert b"C57014" in error


def test_a_looked_up_user_logs_in_over_a_websocket_with_its_password_pipelined(pgmux, looked_up_role) -> None:
    proxy = pgmux(listeners=[HTTP_LISTENER], auth_user=APP.name, auth_query=AUTH_QUERY)
    client, welcome = _login(proxy.port(1), user=LOOKED_UP, password=FIRST, then=m.query("SELECT current_user"))
    assert (b"R", struct.pack("!I", 0)) in welcome
    assert [body[6:] for kind, body in client.read_until(b"Z") if kind == b"D"] == [LOOKED_UP.encode()]
    upstreams = proxy.call(lambda p: [pool.config.upstream.scram_keys is not None
                                      for key, pool in p.router.pools.items() if key.user == LOOKED_UP])
    assert upstreams == [True]  # SCRAM pass-through with the keys its cleartext password gave
    client.close()
    wrong = WebSocketClient(proxy.port(1))
    wrong.send(build_startup_message({"user": LOOKED_UP, "database": APP_DATABASE})
               + m.message(m.PASSWORD, b"wrong\x00"))
    assert b"C28P01" in wrong.read_until(b"E")[-1][1]


def test_the_address_host_only_selects_a_configured_database(pgmux, postgres) -> None:
    url = postgres.dsn(APP.name, APP.password, APP_DATABASE, sslmode="disable")
    proxy = pgmux(databases={"tenant": {"url": url, "server_names": ["tenant.db.example"]}},
                  listeners=[HTTP_LISTENER])
    client, _ = _login(proxy.port(1), target="/v1?address=tenant.db.example:5432", database="anything",
                       then=m.query("SELECT current_database()"))
    assert [body[6:] for kind, body in client.read_until(b"Z") if kind == b"D"] == [APP_DATABASE.encode()]
    assert proxy.call(lambda p: [key.database for key in p.router.pools]) == ["tenant"]
    client.close()
    # A host name that selects nothing is not dialled: the StartupMessage's database (unknown here) decides.
    refused = WebSocketClient(proxy.port(1), "/v2?address=evil.example:5432")
    refused.send(build_startup_message({"user": APP.name, "database": "anything"})
                 + m.message(m.PASSWORD, APP.password.encode() + b"\x00"))
    assert b"C28P01" in refused.read_until(b"E")[-1][1]


def test_a_text_frame_and_a_malformed_frame_end_only_their_own_session(pgmux) -> None:
    proxy = pgmux(listeners=[HTTP_LISTENER])
    texting = WebSocketClient(proxy.port(1))
    texting.sock.sendall(texting.ws.send(TextMessage(data="SELECT 1")))
    assert texting.wait_closed().code == 1003
    malformed = WebSocketClient(proxy.port(1))
    malformed.sock.sendall(b"\x82\x05hello")  # not masked, as every client frame must be
    assert malformed.wait_closed().code == 1002
    _healthy(proxy)


def _http(port: int, request: bytes) -> tuple[int, bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        response = b""
        while b"\r\n\r\n" not in response:
            response += sock.recv(65536)
        head, _, body = response.partition(b"\r\n\r\n")
        return int(head.split()[1]), body


def test_an_upgrade_without_a_key_gets_400_and_an_unknown_path_404(pgmux) -> None:
    proxy = pgmux(listeners=[HTTP_LISTENER])
    status, body = _http(proxy.port(1), b"GET /v2 HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                                        b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\r\n")
    assert status == 400 and b"Sec-WebSocket-Key" in body
    status, body = _http(proxy.port(1), b"GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 404 and b"message" in body
    _healthy(proxy)


def test_a_100_mb_body_to_sql_gets_413_without_being_read(pgmux) -> None:
    proxy = pgmux(listeners=[HTTP_LISTENER])
    size = 100 * 1024 * 1024
    with socket.create_connection(("127.0.0.1", proxy.port(1)), timeout=10) as sock:
        sock.sendall(b"POST /sql HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % size)
        chunk = b"x" * (1 << 20)
        sent = 0

        def send_body() -> None:
            nonlocal sent
            try:
                while sent < size:
                    sock.sendall(chunk)
                    sent += len(chunk)
            except OSError:
                pass  # pgmux closed the connection: what it was meant to do

        sender = threading.Thread(target=send_body, daemon=True)
        sender.start()
        response = b""
        while b"\r\n\r\n" not in response:
            response += sock.recv(65536)
        assert response.startswith(b"HTTP/1.1 413 ")
        assert b"connection: close" in response.lower()
        sock.settimeout(10)
        try:
            while sock.recv(65536):
                pass
        except ConnectionResetError:
            pass
        sender.join(15)
    _healthy(proxy)


def test_a_websocket_client_that_stops_reading_pauses_its_server_and_pgmux_holds_no_flood(pgmux) -> None:
    proxy = pgmux(listeners=[HTTP_LISTENER])
    client, _ = _login(proxy.port(1))
    client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    client.send(m.query("SELECT repeat('x', 200000) FROM generate_series(1, 300)"))  # 60 MB of rows

    def state(p) -> tuple[bool, bool, int] | None:
        linked = [c for c in p.registry.clients if c.server is not None]
        if not linked:
            return None
        server = linked[0].server
        return linked[0].flow.write_paused, server.transport.is_reading(), linked[0].transport.get_write_buffer_size()

    deadline = time.monotonic() + 10
    while (paused := proxy.call(state)) is None or paused[1]:
        assert time.monotonic() < deadline, f"the server was never paused: {paused}"
        time.sleep(0.05)
    time.sleep(0.5)
    write_paused, server_reading, buffered = proxy.call(state)
    assert write_paused and not server_reading and buffered < 16 * 1024 * 1024
    rows = 0
    for kind, _ in client.read_until(b"Z", timeout=60):  # reading again resumes the server: every row arrives
        rows += kind == b"D"
    assert rows == 300
