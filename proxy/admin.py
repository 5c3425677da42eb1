"""Admin console: PgBouncer's SHOW/PAUSE/RESUME/... commands on the virtual database `pgmux` (alias `pgbouncer`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from proxy import __version__
from proxy.protocol import messages as m
from proxy.protocol.errors import PgError, SqlState
from proxy.protocol.framing import Frame, FrameScanner, ProtocolViolation

if TYPE_CHECKING:
    from proxy.app import Proxy
    from proxy.client import ClientConnection

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


class AdminSession:
    """One admin console connection: simple-query commands in, result sets out."""

    def __init__(self, proxy: Proxy, client: ClientConnection, can_modify: bool) -> None:
        self.proxy = proxy
        self.client = client
        self.can_modify = can_modify
        self._scanner = FrameScanner(frozenset(range(256)), max_length=1 << 20)

    def feed(self, data: bytes) -> None:
        try:
            segments = self._scanner.feed(data)
        except ProtocolViolation as exc:
            self.client.close(f"admin console: {exc}")
            return
        for segment in segments:
            if type(segment) is not Frame:
                continue
            if segment.kind == m.TERMINATE:
                self.client.close("client sent Terminate")
                return
            if segment.kind == m.QUERY:
                self.client.write(self.execute(bytes(segment.data[5:-1]).decode("utf-8", "replace")))
            elif segment.kind == m.SYNC:
                self.client.write(PgError(SqlState.FEATURE_NOT_SUPPORTED,
                                          "the admin console supports the simple query protocol only").to_bytes()
                                  + m.ready_for_query())

    def execute(self, sql: str) -> bytes:
        return PgError(SqlState.FEATURE_NOT_SUPPORTED, f"admin command not implemented yet: {sql.strip()}").to_bytes() \
            + m.ready_for_query()
