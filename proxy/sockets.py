"""The plaintext socket edge: listening, accepting, connecting, and the transport over each socket.

With the compiled build a socket is driven by ``proxy._relay.SocketTransport`` (see ``_relay.c``): asyncio's
transport interface, plus the relay's steady state in C, where a read of whole messages that need no
decision goes from one socket to the other without a Python object being made. Without it (the pure-Python
build), asyncio's own transports do the same job and every read goes through the protocol's
``data_received``: the relay's decisions are the same Python code either way.

TLS connections to PostgreSQL keep asyncio's TLS transport; TLS and WebSocket clients are layered over the
socket transport (proxy/layered.py) and never take the compiled relay's shortcut.
"""

from __future__ import annotations

import _socket
import asyncio
import errno
import socket
import weakref
from collections.abc import Callable
from typing import Any, Final, Protocol

from proxy.logs import get_logger

log = get_logger("sockets")


def _compiled(name: str) -> Any:
    try:
        from proxy import _relay  # type: ignore[attr-defined,unused-ignore]
    except ImportError:  # the pure-Python build (proxy/compiled.py): asyncio's transports instead
        return None
    return getattr(_relay, name)


SocketTransport: Final[Any] = _compiled("SocketTransport")
_accept_socket: Final[Any] = _compiled("accept_socket")
_Poller: Final[Any] = _compiled("Poller")
# Each event loop's Poller (see _relay.c): the epoll set its SocketTransports share, watched as one reader.
_pollers: Final[weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Any]] = weakref.WeakKeyDictionary()


def _poller(loop: asyncio.AbstractEventLoop) -> Any:
    poller = _pollers.get(loop)
    if poller is None:
        poller = _pollers[loop] = _Poller(loop)
        loop.add_reader(poller.fileno(), poller._ready)
    return poller
CLIENT_EDGE: Final = 1
SERVER_EDGE: Final = 2

# Bits of a relay table (one byte per message type; keep in step with _relay.c).
PASS: Final = 1  # may be relayed in the steady state
BATCH_END: Final = 2  # Sync, Query, FunctionCall: each earns one ReadyForQuery
NEUTRAL: Final = 4  # neither begins nor ends a batch
WORDS: Final = 8  # passes only when its text mentions no session state (Query, Parse)
QUERY: Final = 16  # a simple Query
READY: Final = 32  # ReadyForQuery: only as a read's last message
PARSE_COMPLETE: Final = 64
UNNAMED: Final = 128  # passes only when the statement it names is the unnamed one (or a portal)

_ACCEPTS_PER_WAKE: Final = 64  # connections accepted per readiness: a storm does not starve the relay
_LISTEN_BACKLOG: Final = 4096
_ACCEPT_RETRY_DELAY: Final = 1.0


def relay_table(passing: frozenset[int], bits: dict[int, int]) -> bytes:
    """A 256-byte relay table: PASS for the types in ``passing``, plus the extra ``bits`` per type."""
    return bytes((PASS if kind in passing else 0) | bits.get(kind, 0) for kind in range(256))


class RelayEdge(Protocol):
    """A compiled transport that is a relay edge (relay_edge): what Python asks of it beyond asyncio's interface."""

    def send_held(self, peer: object) -> None:
        """Write the read it holds for a waiting client (see _relay.c) to ``peer``, the server's transport."""

    def take_held(self) -> bytes:
        """The read it holds, as bytes (b"" when none): no longer held."""

    def close_quietly(self) -> None:
        """close(), for a protocol that has ended the connection itself: within the poller's wake (where every
        relayed read is handled) no connection_lost follows, and with it no call_soon per connection."""


def relay_edge(transport: object, role: int, table: bytes) -> RelayEdge | None:
    """Make ``transport`` a relay edge (CLIENT_EDGE or SERVER_EDGE; ``table``: relay_table's) when it is the
    compiled one, which then relays the steady state itself: return it; None for any other transport."""
    if SocketTransport is None or type(transport) is not SocketTransport:
        return None
    relaying: Any = transport
    relaying.relay(role, table)
    edge: RelayEdge = relaying
    return edge


def _tune(sock: _socket.socket) -> None:
    sock.setblocking(False)
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as asyncio's transports do


def adopt(loop: asyncio.AbstractEventLoop, sock: _socket.socket, protocol: Any, poller: Any = None) -> Any:
    """Drive a connected non-blocking socket with the compiled transport: the protocol's connection_made, then
    reading."""
    assert SocketTransport is not None
    transport = SocketTransport(loop, poller if poller is not None else _poller(loop), sock, protocol)
    protocol.connection_made(transport)
    transport.start()
    return transport


async def connect(loop: asyncio.AbstractEventLoop, host: str, port: int, unix_socket: str | None) -> socket.socket:
    """A connected non-blocking socket to ``host``:``port`` (each address in turn), or to ``unix_socket``."""
    if unix_socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, unix_socket)
        except BaseException:
            sock.close()
            raise
        return sock
    failure: OSError | None = None
    for family, kind, proto, _, address in await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM):
        sock = socket.socket(family, kind, proto)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, address)
        except OSError as exc:
            sock.close()
            failure = exc
            continue
        except BaseException:
            sock.close()
            raise
        return sock
    raise failure or OSError(errno.EHOSTUNREACH, f"no address for {host}")


async def deliver_cancel_request(loop: asyncio.AbstractEventLoop, host: str, port: int, unix_socket: str | None,
                                 request: bytes, timeout: float) -> None:
    """Send a CancelRequest over a connection of its own and wait until the other end closes it, as libpq does:
    PostgreSQL closes it once the backend is signalled, a pgmux once it has handed the request on. Raises
    TimeoutError past ``timeout``, OSError when the other end cannot be reached."""
    async with asyncio.timeout(timeout):
        sock = await connect(loop, host, port, unix_socket)
        try:
            await loop.sock_sendall(sock, request)
            while await loop.sock_recv(sock, 256):
                pass  # nothing is answered; read to the close
        finally:
            sock.close()


def bytes_waiting(sock: socket.socket) -> bool:
    """Whether bytes are waiting on ``sock`` (read without taking them)."""
    try:
        return bool(sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
    except (BlockingIOError, InterruptedError):
        return False


async def open_transport(loop: asyncio.AbstractEventLoop, sock: socket.socket,
                         protocol_factory: Callable[[], Any]) -> Any:
    """The transport for a connected plaintext socket: the compiled one, or asyncio's."""
    if SocketTransport is not None:
        _tune(sock)
        return adopt(loop, sock, protocol_factory())
    transport, _ = await loop.create_connection(protocol_factory, sock=sock)
    return transport


class Listening:
    """One listener's bound sockets, accepted by pgmux itself (compiled) or by an asyncio server."""

    def __init__(self, sockets: list[socket.socket], server: asyncio.Server | None,
                 loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.sockets = sockets
        self._server = server
        self._loop = loop  # the loop pgmux's own accepting is registered with (no asyncio server)

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
            return
        # Any: typeshed says remove_reader returns bool, and uvloop's returns None; compiled code checks.
        loop: Any = self._loop
        for sock in self.sockets:
            if loop is not None and sock.fileno() >= 0:
                loop.remove_reader(sock.fileno())
            sock.close()

    async def wait_closed(self) -> None:
        if self._server is not None:
            await self._server.wait_closed()


async def listen(loop: asyncio.AbstractEventLoop, host: str, port: int,
                 protocol_factory: Callable[[], Any], compiled: bool, reuse_port: bool = False) -> Listening:
    """Listen on ``host``:``port``; each connection gets a protocol from ``protocol_factory``.

    ``compiled``: accept with pgmux's own loop and drive sockets with the compiled transport (only where
    it is built); otherwise an asyncio server does both. ``reuse_port``: share the port with other
    processes' sockets (SO_REUSEPORT: the kernel spreads new connections over them).
    """
    if not compiled or SocketTransport is None:
        server = await loop.create_server(protocol_factory, host, port, reuse_address=True, reuse_port=reuse_port,
                                          backlog=_LISTEN_BACKLOG)
        return Listening(list(getattr(server, "sockets")), server)
    bound: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in await loop.getaddrinfo(
                host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE):
            sock = socket.socket(family, kind, proto)
            bound.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)  # as asyncio: one socket per family
            sock.bind(address)
            sock.listen(_LISTEN_BACKLOG)
            sock.setblocking(False)
            if port == 0:
                port = sock.getsockname()[1]  # every address on the port the first one was given
    except BaseException:
        for sock in bound:
            sock.close()
        raise
    poller = _poller(loop)
    for sock in bound:
        _accept_on(loop, poller, sock, protocol_factory)
    return Listening(bound, None, loop)


def _accept_ready(loop: asyncio.AbstractEventLoop, poller: Any, listening: socket.socket, fd: int, family: int,
                  protocol_factory: Callable[[], Any]) -> None:
    for _unused in range(_ACCEPTS_PER_WAKE):
        try:
            sock = _accept_socket(fd, family)  # see _relay.c: what socket.accept() costs a login more
        except OSError as exc:
            # Out of file descriptors and the like: the connection waits in the backlog, and the listener
            # rests a moment (as asyncio's does) rather than spin on a socket that stays readable.
            if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                log.warning("cannot accept a connection: %s; retrying in %gs", exc, _ACCEPT_RETRY_DELAY)
                any_loop: Any = loop  # see Listening.close
                any_loop.remove_reader(fd)
                loop.call_later(_ACCEPT_RETRY_DELAY, _accept_on, loop, poller, listening, protocol_factory)
                return
            raise
        if sock is None:  # the backlog is empty
            return
        try:
            adopt(loop, sock, protocol_factory(), poller)
        except Exception:
            log.exception("a new connection could not be set up")
            sock.close()


def _accept_on(loop: asyncio.AbstractEventLoop, poller: Any, listening: socket.socket,
               protocol_factory: Callable[[], Any]) -> None:
    """Accept connections on ``listening`` as it becomes readable (again, after a rest)."""
    fd = listening.fileno()
    if fd >= 0:  # not closed meanwhile
        # The family asked once here: socket.family is a Python property that builds an enum member.
        loop.add_reader(fd, _accept_ready, loop, poller, listening, fd, int(listening.family), protocol_factory)
