"""The client edge over a transport that is only a byte stream: no socket, no PostgreSQL.

A transport here has nothing but the calls ClientConnection may make (write, pause/resume_reading,
close, get_extra_info, and the three flow-control queries the relay still uses), so a login and the
admin console working over it show the edge needs nothing a TLS stream, a WebSocket or an HTTP
request could not give it.
"""

from __future__ import annotations

import asyncio
from typing import Any

from proxy.app import Proxy
from proxy.protocol import messages as m
from proxy.protocol.startup import build_ssl_request, build_startup_message
from proxy.settings import Settings


class ByteStream:
    """The whole transport interface the client edge may use."""

    def __init__(self) -> None:
        self.written = bytearray()
        self.closed = False
        self.reading = True

    def write(self, data: bytes | memoryview) -> None:
        self.written += data

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("203.0.113.7", 50000) if name == "peername" else default

    # Still used by the relay's flow control (see ClientConnection.write/pause_reading/resume_reading).
    def is_closing(self) -> bool:
        return self.closed

    def is_reading(self) -> bool:
        return self.reading

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass


SERVER_PARAMETERS = {"server_version": "16.4", "client_encoding": "UTF8", "TimeZone": "UTC"}


def pgmux() -> Proxy:
    settings = Settings(upstream_url="postgresql://app:secret@127.0.0.1:1/shop", listen="127.0.0.1:0",
                        auth_type="trust", admin_users=["app"])
    proxy = Proxy(settings)
    # As if the pool's first server had reported its parameters: the welcome needs no backend.
    pool = proxy.router.login_pool("shop", "app")
    pool.clients -= 1
    pool.server_params = dict(SERVER_PARAMETERS)
    return proxy


def test_a_trust_login_is_welcomed_and_a_terminate_closes_over_a_bare_byte_stream() -> None:
    async def scenario() -> None:
        proxy = pgmux()
        client = proxy._accept(proxy.settings.all_listeners()[0], 0)
        stream = ByteStream()
        client.connection_made(stream)  # type: ignore[arg-type]
        client.data_received(build_ssl_request())
        assert stream.written == b"N"
        client.data_received(build_startup_message({"user": "app", "database": "shop"}))
        process_id, secret = client.cancel_key
        assert stream.written == b"N" + (
            m.authentication_ok() + m.parameter_statuses(SERVER_PARAMETERS)
            + m.backend_key_data(process_id, int.from_bytes(secret, "big", signed=True)) + m.ready_for_query())
        assert client.state.value == "idle" and client.login is None
        client.data_received(m.terminate())
        assert stream.closed
    asyncio.run(scenario())


def test_the_admin_console_is_welcomed_over_a_bare_byte_stream() -> None:
    async def scenario() -> None:
        proxy = pgmux()
        client = proxy._accept(proxy.settings.all_listeners()[0], 0)
        stream = ByteStream()
        client.connection_made(stream)  # type: ignore[arg-type]
        client.data_received(build_startup_message({"user": "app", "database": "pgbouncer"}) + m.query("SHOW VERSION"))
        assert stream.written.startswith(m.authentication_ok())
        assert m.backend_key_data(0, 0) + m.ready_for_query() in stream.written
        # SHOW VERSION, pipelined behind the login, is answered: a second ReadyForQuery.
        assert stream.written.count(m.ready_for_query()) == 2 and stream.written.endswith(m.ready_for_query())
        assert client.state.value == "admin" and client.login is None
    asyncio.run(scenario())
