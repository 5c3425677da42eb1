"""WebSocketTransport: a WebSocket session seen by a ClientConnection as the byte transport TCP would be.

The Neon serverless driver (and any WebSocket-to-TCP relay's client) sends PostgreSQL protocol bytes in binary
messages whose boundaries mean nothing; pgmux answers the same way. So the client logic is the TCP one: the
HTTP connection hands the payloads it reads to ``ClientConnection.received``, and what the client writes leaves
as binary frames through this transport. Reading and flow control stay the socket's (as with TlsTransport).
"""

from __future__ import annotations

import asyncio
from typing import Any, Final

from wsproto.connection import Connection, ConnectionState
from wsproto.events import BytesMessage, CloseConnection

from proxy.layered import LayeredTransport

NORMAL_CLOSURE: Final = 1000  # the PostgreSQL session ended: Terminate, FATAL, or its server lost
PROTOCOL_ERROR: Final = 1002
UNSUPPORTED_DATA: Final = 1003  # a text frame: PostgreSQL's protocol is binary
_CLOSABLE: Final = frozenset({ConnectionState.OPEN, ConnectionState.REMOTE_CLOSING})


class WebSocketTransport(LayeredTransport):
    """Bytes written leave as binary WebSocket messages over ``raw`` (the socket's transport, or its TLS)."""

    def __init__(self, raw: asyncio.Transport, websocket: Connection) -> None:
        super().__init__(raw)
        self.websocket = websocket
        self._closing = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not self.is_closing():
            self.raw.write(self.websocket.send(BytesMessage(data=bytes(data))))

    def close(self, code: int = NORMAL_CLOSURE, reason: str = "") -> None:
        """End the session: a Close frame (``code``, 1000 unless a protocol error ends it), then the socket."""
        if self._closing:
            return
        self._closing = True
        if self.websocket.state in _CLOSABLE and not self.raw.is_closing():
            self.raw.write(self.websocket.send(CloseConnection(code=code, reason=reason)))
        self.raw.close()

    def abort(self) -> None:
        self._closing = True
        self.raw.abort()

    def is_closing(self) -> bool:
        return self._closing or self.raw.is_closing()
