"""One HTTP request and its response, as the HTTP listener (proxy/http/listener.py) hands them to an endpoint.

The listener owns the connection (h11 or the WebSocket upgrade, TLS, limits); an endpoint sees only whole
requests and answers whole responses, so it can be driven without a socket.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class HttpRequest:
    method: str  # "POST", "OPTIONS", ...
    target: str  # the request target as sent: path and query, e.g. "/sql"
    headers: dict[str, str]  # names lower-cased; a repeated header's values joined with ", "
    body: bytes
    peer: str  # the client's address, "ip:port" ("unix" for a Unix socket)


@dataclass
class HttpResponse:
    status: int
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""


Endpoint = Callable[[HttpRequest], Awaitable[HttpResponse]]
