"""Cancel forwarding: the routes to other workers and peers, and a worker's private cancel address (which also
takes its siblings' admin console requests: SiblingConsoles asks, proxy/fanout.py encodes and merges).

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
from collections.abc import Callable, Collection, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from proxy.cancel import ANY_WORKER, CANCEL_LOG_INTERVAL, CancelKeys
from proxy.fanout import (
    ANSWER_HEADER,
    MAX_REQUEST_LENGTH,
    REQUEST_HEADER,
    SIBLING_CONSOLE_CODE,
    ConsoleAnswer,
    ConsoleRequest,
    SiblingAnswers,
    answer_length,
    decode_answer,
    decode_request,
    encode_answer,
    encode_request,
)
from proxy.logs import LogSummary, get_logger
from proxy.protocol.framing import ProtocolViolation
from proxy.protocol.startup import CANCEL_REQUEST_CODE, CancelRequest, build_cancel_request, startup_packet_at
from proxy.settings import PeerAddress
from proxy.sockets import deliver_cancel_request

log = get_logger("cancel")

FORWARD_TIMEOUT: Final = 5.0  # seconds a forwarded CancelRequest may take to be handed over and closed
MAX_FORWARDS_IN_FLIGHT: Final = 1000  # past this, a forward is dropped (and counted failed): a flood stays bounded
_READ_TIMEOUT: Final = 5.0  # a connection to the private cancel address must send its request within this
_MAX_CANCEL_REQUEST: Final = 272  # a CancelRequest: 16 bytes (protocol 3.2: up to 12 + 256)
CONSOLE_TIMEOUT: Final = 1.5  # seconds a sibling's console has to answer (connect, ask, read the answer)


@dataclass(frozen=True)
class WorkerRole:
    """This process's place among the workers of one pgmux: its index, how many there are, where it takes its
    siblings' forwarded CancelRequests and console requests, where each sibling takes them, and the supervisor
    that stops them all (its pid; 0: none). The default: the only worker."""

    index: int = 0
    count: int = 1
    cancel_address: PeerAddress | None = None
    siblings: Mapping[int, PeerAddress] = field(default_factory=dict)
    supervisor: int = 0


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


async def listen_for_siblings(address: PeerAddress, cancel_keys: CancelKeys,
                              answer_console: Callable[[ConsoleRequest], ConsoleAnswer] | None = None
                              ) -> asyncio.AbstractServer:
    """Take what sibling workers send this worker (Unix socket: mode 0600): the CancelRequests they forward, and
    their admin consoles' requests (proxy/fanout.py), answered by ``answer_console``."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(_READ_TIMEOUT):
                header = await reader.readexactly(REQUEST_HEADER.size)
                length, code = REQUEST_HEADER.unpack(header)
                if code == CANCEL_REQUEST_CODE and 16 <= length <= _MAX_CANCEL_REQUEST:
                    found = startup_packet_at(header + await reader.readexactly(length - len(header)), 0)
                    if found is not None and isinstance(found[0], CancelRequest):
                        cancel_keys.cancel_here(found[0].process_id, found[0].secret_key)
                elif code == SIBLING_CONSOLE_CODE and answer_console is not None and \
                        len(header) < length <= MAX_REQUEST_LENGTH:
                    request = decode_request(await reader.readexactly(length - len(header)))
                    writer.write(encode_answer(answer_console(request)))
                    await writer.drain()
        except (TimeoutError, OSError, ProtocolViolation, ValueError, asyncio.IncompleteReadError):
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


class SiblingConsoles:
    """A worker's way to its siblings' consoles (fanout.Siblings): each request on a connection of its own to
    the sibling's private address, every sibling at once, each answer within CONSOLE_TIMEOUT."""

    def __init__(self, siblings: Mapping[int, PeerAddress]) -> None:
        self.siblings = dict(siblings)  # worker index -> its private address: the others', not this worker's

    async def ask(self, request: ConsoleRequest, only: Collection[int] | None = None) -> SiblingAnswers:
        indexes = sorted(self.siblings if only is None else only)
        outcomes = await asyncio.gather(*(self._ask(self.siblings[index], request) for index in indexes),
                                        return_exceptions=True)
        answers: SiblingAnswers = {}
        for index, outcome in zip(indexes, outcomes):
            if isinstance(outcome, ConsoleAnswer):
                answers[index] = outcome
            elif isinstance(outcome, (TimeoutError, OSError, ValueError, asyncio.IncompleteReadError)):
                answers[index] = "no answer within the timeout" if isinstance(outcome, TimeoutError) else \
                    f"{type(outcome).__name__}: {outcome}"
            else:
                raise outcome
        return answers

    async def _ask(self, address: PeerAddress, request: ConsoleRequest) -> ConsoleAnswer:
        async with asyncio.timeout(CONSOLE_TIMEOUT):
            if address.unix_socket:
                reader, writer = await asyncio.open_unix_connection(address.unix_socket)
            else:
                reader, writer = await asyncio.open_connection(address.host, address.port)
            try:
                writer.write(encode_request(request))
                length = answer_length(await reader.readexactly(ANSWER_HEADER.size))
                return decode_answer(await reader.readexactly(length))
            finally:
                writer.close()
