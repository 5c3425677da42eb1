"""A relayed NotificationResponse carries the pid its sender's client was given: no socket, no PostgreSQL."""

from __future__ import annotations

import struct

from proxy.admission import Admission
from proxy.cancel import CancelKeys
from proxy.client import ClientConnection
from proxy.protocol import messages as m
from proxy.protocol.framing import FrameScanner
from proxy.registry import Console, Registry
from proxy.routing import Router
from proxy.server import _RELAY_CAPTURE, Backends, ServerConnection
from proxy.settings import Settings, parse_upstream_url
from proxy.stats import PoolStats

_SETTINGS = Settings(upstream_url="postgresql://app:secret@127.0.0.1:1/app", listen="127.0.0.1:0")
UPSTREAM = parse_upstream_url("postgresql://app:secret@127.0.0.1:5432/app")
OTHER_HOST = parse_upstream_url("postgresql://app:secret@127.0.0.2:5432/app")


class _Transport:
    def __init__(self) -> None:
        self.written = bytearray()

    def write(self, data: bytes | memoryview) -> None:
        self.written += data

    def is_closing(self) -> bool:
        return False


def _no_console(client: ClientConnection, can_modify: bool) -> Console:
    raise AssertionError("no console in these tests")


def _listening_client() -> tuple[ClientConnection, _Transport]:
    registry: Registry[ClientConnection] = Registry(Admission(100, 0, 0), _no_console)
    router = Router(_SETTINGS, registry.admission, registry.spawn, registry.count_rejection)
    client = ClientConnection(router, registry, CancelKeys(), _SETTINGS.all_listeners()[0])
    transport = _Transport()
    client.transport = transport  # type: ignore[assignment]
    return client, transport


def _backend(backends: Backends, pid: int, upstream=UPSTREAM) -> ServerConnection:
    """A logged-in backend with process id ``pid``, known to ``backends`` as a login leaves it."""
    server = ServerConnection(upstream, on_lost=lambda _server: None, stats=PoolStats(), backends=backends)
    server.transport = _Transport()  # type: ignore[assignment]
    server._login_frames = None
    server._scanner = FrameScanner(_RELAY_CAPTURE)
    server.backend_key = (pid, 99)
    backends.add(server)
    return server


def _notification(pid: int, payload: bytes = b"hello") -> bytes:
    return m.message(m.NOTIFICATION_RESPONSE, struct.pack("!i", pid) + b"chan\x00" + payload + b"\x00")


def test_a_notification_carries_the_pid_given_to_the_client_its_sender_serves_or_served() -> None:
    backends = Backends()
    listener_backend = _backend(backends, 1001)
    sender = _backend(backends, 1234)
    client, transport = _listening_client()
    listener_backend.client = client
    sender.client_pid = 4_500_000  # the id its (last) client was given
    rows = m.command_complete("SELECT 1")
    listener_backend.data_received(_notification(1234))
    listener_backend.data_received(rows + _notification(1234, b"again") + rows)  # amid an answer
    assert bytes(transport.written) == _notification(4_500_000) + rows + _notification(4_500_000, b"again") + rows


def test_a_notification_from_a_sender_pgmux_does_not_know_keeps_its_pid() -> None:
    backends = Backends()
    listener_backend = _backend(backends, 1001)
    same_pid_elsewhere = _backend(backends, 1234, OTHER_HOST)  # another PostgreSQL server's backend 1234
    same_pid_elsewhere.client_pid = 4_500_000
    never_linked = _backend(backends, 1235)
    client, transport = _listening_client()
    listener_backend.client = client
    listener_backend.data_received(_notification(1234) + _notification(1235) + _notification(77))
    assert bytes(transport.written) == _notification(1234) + _notification(1235) + _notification(77)
    assert never_linked.client_pid == 0


def test_a_closed_backends_pid_is_forgotten() -> None:
    backends = Backends()
    listener_backend = _backend(backends, 1001)
    sender = _backend(backends, 1234)
    sender.client_pid = 4_500_000
    sender.connection_lost(None)  # PostgreSQL may give 1234 to a backend that is not pgmux's
    client, transport = _listening_client()
    listener_backend.client = client
    listener_backend.data_received(_notification(1234))
    assert bytes(transport.written) == _notification(1234)


def test_a_notification_arriving_during_pgmuxs_own_query_still_reaches_the_client() -> None:
    backends = Backends()
    listener_backend = _backend(backends, 1001)
    client, transport = _listening_client()
    listener_backend.client = client
    listener_backend.send_internal("SELECT 1")
    listener_backend.data_received(m.command_complete("SELECT 1") + _notification(77) + m.ready_for_query())
    assert bytes(transport.written) == _notification(77)  # pgmux's own replies are not the client's
    assert not listener_backend.swallow
