"""Cancel forwarding: the routes to other workers and peers, and a worker's private cancel address.

A CancelRequest whose key another pgmux issued (see proxy/cancel.py's KeyLayout) is sent on over a
connection of its own to that pgmux's address, as the 16 bytes the client sent (the forwarded bit set when it
crosses to another peer); the owner checks the secret. Routes are (peer id, worker) -> address: [peers] gives
(peer, ANY_WORKER) for every other peer, and the composition root adds (own peer id, worker) for sibling
workers, whose private cancel addresses only ever deliver (CancelKeys.cancel_here).
"""

from __future__ import annotations

import asyncio
import collections
import os
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from proxy.cancel import ANY_WORKER, CANCEL_LOG_INTERVAL, CancelKeys
from proxy.logs import LogSummary, get_logger
from proxy.protocol.framing import ProtocolViolation
from proxy.protocol.startup import CancelRequest, build_cancel_request, startup_packet_at
from proxy.settings import PeerAddress
from proxy.sockets import deliver_cancel_request

log = get_logger("cancel")

FORWARD_TIMEOUT: Final = 5.0  # seconds a forwarded CancelRequest may take to be handed over and closed
MAX_FORWARDS_IN_FLIGHT: Final = 1000  # past this, a forward is dropped (and counted failed): a flood stays bounded
_READ_TIMEOUT: Final = 5.0  # a connection to the private cancel address must send its request within this


@dataclass(frozen=True)
class WorkerRole:
    """This process's place among the workers of one pgmux: its index, how many there are, where it takes its
    siblings' forwarded CancelRequests, and where each sibling takes them. The default: the only worker."""

    index: int = 0
    count: int = 1
    cancel_address: PeerAddress | None = None
    siblings: Mapping[int, PeerAddress] = field(default_factory=dict)


class CancelForwarder:
    """Sends CancelRequests on to the pgmux that issued their key; counts what it forwarded and what failed."""

    def __init__(self, spawn: Callable[[Coroutine[Any, Any, Any], str], Any], forwarded: collections.Counter[str],
                 failed: collections.Counter[str]) -> None:
        self._spawn = spawn
        self.routes: dict[tuple[int, int], PeerAddress] = {}
        self.forwarded = forwarded  # by "peer" / "worker" (the registry's, for /metrics)
        self.failed = failed
        self._in_flight = 0
        self._failures = LogSummary(log, "could not forward a cancel request", CANCEL_LOG_INTERVAL)

    def add_route(self, peer_id: int, worker: int, address: PeerAddress) -> None:
        """Requests for keys of (peer_id, worker) go to ``address`` (worker ANY_WORKER: any of that peer's)."""
        self.routes[(peer_id, worker)] = address

    def forward(self, peer_id: int, worker: int, process_id: int, secret: bytes) -> bool:
        address = self.routes.get((peer_id, worker)) or self.routes.get((peer_id, ANY_WORKER))
        if address is None:
            return False
        to = "peer" if worker == ANY_WORKER else "worker"
        if self._in_flight >= MAX_FORWARDS_IN_FLIGHT:
            self.failed[to] += 1
            self._failures.event()
            return True
        self._in_flight += 1
        self._spawn(self._send(to, address, build_cancel_request(process_id, secret)), f"forward cancel to {address}")
        return True

    async def _send(self, to: str, address: PeerAddress, request: bytes) -> None:
        try:
            await deliver_cancel_request(asyncio.get_running_loop(), address.host, address.port,
                                         address.unix_socket, request, FORWARD_TIMEOUT)
        except (TimeoutError, OSError) as exc:
            self.failed[to] += 1
            log.debug("forwarding a cancel request to %s failed: %r", address, exc)
            self._failures.event()
        else:
            self.forwarded[to] += 1
        finally:
            self._in_flight -= 1


async def listen_for_siblings(address: PeerAddress, cancel_keys: CancelKeys) -> asyncio.AbstractServer:
    """Take the CancelRequests sibling workers forward to this worker (Unix socket: mode 0600)."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(_READ_TIMEOUT):
                data = await reader.read(272)  # a CancelRequest: 16 bytes (protocol 3.2: up to 12 + 256)
            found = startup_packet_at(data, 0)
            if found is not None and isinstance(found[0], CancelRequest):
                cancel_keys.cancel_here(found[0].process_id, found[0].secret_key)
        except (TimeoutError, OSError, ProtocolViolation):
            pass
        finally:
            writer.close()

    if address.unix_socket:
        server = await asyncio.start_unix_server(serve, address.unix_socket)
        os.chmod(address.unix_socket, 0o600)
    else:
        server = await asyncio.start_server(serve, address.host, address.port)
    log.info("taking forwarded cancel requests on %s", address)
    return server
