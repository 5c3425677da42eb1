"""CancelKeys: the BackendKeyData pgmux issues to its clients, and CancelRequests routed by them.

The key layout (KeyLayout). A client's BackendKeyData is (process id, secret), 32 bits each. The process id
cannot carry a route: in session mode it is the backend's real pid, so that pg_backend_pid() agrees. So the
route to the pgmux that issued a key lives in the low bits of its secret, big-endian, lowest first:

    bit 0                       forwarded: 0 as issued; set on a request one peer forwards to another
    bits 1 .. P                 peer_id of the issuing pgmux (P = bit length of the largest peer id)
    bits 1+P .. P+W             worker index within that pgmux (W = bit length of workers - 1)
    the rest                    random

The forwarded bit and the peer field exist only with peering on (peer_id set), the worker field only with
more than one worker: a single pgmux without peers keeps all 32 random bits, as before. Each routing bit is
a bit an attacker need not guess: 2 peers and 4 workers leave 32 - (1 + 2 + 2) = 27 random bits. (PgBouncer
puts a 16-bit peer id and a 2-bit hop count in its 64-bit key and keeps 45 random bits; pgmux cannot use the
process id's bits, so it spends only the bits the configured fleet needs.) The secret is still compared in
constant time (hmac.compare_digest); the routing bits are the same in every key a pgmux issues, so which
path a request takes tells nothing about the secret.

Every peer must decode the peer field alike, hence: the same largest peer id everywhere (list the same
[peers] on every peer). The worker field is read only by the peer that owns it, so workers may differ.
A request is forwarded at most twice and never in a loop: once from peer to peer (setting the forwarded
bit, after which no peer forwards it to another peer: one that finds a forwarded key naming another peer
drops it), and once from a worker to a sibling's private cancel address, where requests are only ever
delivered (cancel_here), never forwarded.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Callable
from typing import Final

from mypy_extensions import trait

from proxy.logs import LogSummary, get_logger

log = get_logger("cancel")

CANCEL_LOG_INTERVAL: Final = 10.0  # CancelRequests with unknown keys: one log line (with a count) per this many seconds
# Process ids pgmux makes up are drawn from [2^22, 2^31): Linux's pid_max is at most 2^22, so a made-up id
# never equals a real backend's pid, which session-mode clients are given (see CancelKeys.register).
_FIRST_MADE_UP: Final = 1 << 22
_MADE_UP_COUNT: Final = (1 << 31) - _FIRST_MADE_UP
_KEY_SIZE: Final = 8  # four bytes for a made-up process id, four for the secret
_RANDOM_BATCH: Final = 512 * _KEY_SIZE  # one getrandom() call per this many bytes of keys
ANY_WORKER: Final = -1  # a route to a peer as a whole: whichever of its workers answers finds the owner
# Where a request goes that names another pgmux: (peer id, worker or ANY_WORKER, process id, secret as sent
# on). False when there is no route to it.
Forward = Callable[[int, int, int, bytes], bool]


class KeyLayout:
    """Which bits of a secret name the pgmux (peer, worker) that issued it; see the module's docstring."""

    def __init__(self, peer_id: int = 0, largest_peer_id: int = 0, worker: int = 0, workers: int = 1) -> None:
        if not 0 <= peer_id <= largest_peer_id or not 0 <= worker < workers:
            raise ValueError(f"peer {peer_id} of 0..{largest_peer_id}, worker {worker} of {workers}: out of range")
        self.peer_id = peer_id
        self.worker = worker
        peer_bits = largest_peer_id.bit_length() if peer_id else 0
        self._forwarded_bit = 1 if peer_id else 0
        self._peer_shift = self._forwarded_bit
        self._peer_mask = (1 << peer_bits) - 1
        self._worker_shift = self._forwarded_bit + peer_bits
        self._worker_mask = (1 << (workers - 1).bit_length()) - 1
        self.routing_bits = self._worker_shift + (workers - 1).bit_length()
        self._own = worker << self._worker_shift | peer_id << self._peer_shift

    @property
    def random_bits(self) -> int:
        """What is left for an attacker to guess of a secret (and of the process id, in session mode)."""
        return 32 - self.routing_bits

    def issue(self, secret: bytes) -> bytes:
        """A random 4-byte ``secret`` with this pgmux's route in its low bits."""
        if not self.routing_bits:
            return secret
        mask = (1 << self.routing_bits) - 1
        return ((_number(secret) & ~mask) | self._own).to_bytes(4, "big")

    def peer_of(self, value: int) -> int:
        return (value >> self._peer_shift) & self._peer_mask

    def worker_of(self, value: int) -> int:
        return (value >> self._worker_shift) & self._worker_mask

    def forwarded(self, value: int) -> bool:
        return bool(value & self._forwarded_bit)

    def mark_forwarded(self, value: int) -> bytes:
        return (value | self._forwarded_bit).to_bytes(4, "big")

    def as_issued(self, value: int) -> bytes:
        """The secret as this pgmux issued it: the forwarded bit cleared."""
        return (value & ~self._forwarded_bit).to_bytes(4, "big")


NO_ROUTES: Final = KeyLayout()  # one pgmux, one worker, no peers: every bit of the secret random


def _number(secret: bytes) -> int:
    # Indexing, not int.from_bytes: compiled, these are native byte reads and shifts.
    return secret[0] << 24 | secret[1] << 16 | secret[2] << 8 | secret[3]


def _no_route(peer_id: int, worker: int, process_id: int, secret: bytes) -> bool:
    return False


@trait
class Cancellable:
    """A connection a CancelRequest can reach: the client edge implements it."""

    __slots__ = ()  # interpreted, a base without slots would give every client a __dict__

    cancel_key: tuple[int, bytes]  # (process id, secret) given to the client; (0, b"") before its welcome

    def cancel_query(self) -> None:
        """A CancelRequest with this connection's key arrived: stop what it runs, if anything."""
        raise NotImplementedError


def _made_up(key: bytes) -> int:
    """A process id from the first four random bytes of ``key``, in the range no real pid reaches."""
    return _FIRST_MADE_UP + _number(key) % _MADE_UP_COUNT


class CancelKeys:
    """Issues each logged-in client a key and routes a CancelRequest to the client that holds it: here, or,
    for a key another worker or peer issued, on to that one (``forward``, from the composition root)."""

    def __init__(self, layout: KeyLayout = NO_ROUTES, forward: Forward = _no_route) -> None:
        self.layout = layout
        self._forward = forward
        self._clients: dict[int, Cancellable] = {}
        # Random bytes for keys, drawn from os.urandom a batch at a time: one getrandom() call per login was
        # most of what issuing a key cost (the bytes are as random; each is handed out once).
        self._random = b""
        self._random_used = 0
        self._unknown = LogSummary(log, "cancel request with an unknown key ignored", CANCEL_LOG_INTERVAL)
        self._misrouted = LogSummary(log, "cancel request forwarded here for another pgmux dropped (do the peers "
                                     "agree on peer_id and [peers]?)", CANCEL_LOG_INTERVAL)

    def register(self, client: Cancellable, backend_pid: int = 0) -> tuple[int, bytes]:
        """A (process id, secret) for ``client``, its process id unique among the live ones; the secret is
        pgmux's own, so a CancelRequest is checked here before pgmux sends the backend's own key.

        ``backend_pid``: the real pid of the backend serving the client for its whole session, which
        the client is then told (pg_backend_pid() and pg_terminate_backend() agree with it), unless a
        live client holds it already (two upstream hosts can both have a backend 1234): then, as for
        everyone else, a made-up id, from a range no real pid reaches.
        """
        # One key's bytes for both halves: this runs on every login.
        key = self._random_key()
        process_id = backend_pid if backend_pid and backend_pid not in self._clients else _made_up(key)
        while process_id in self._clients:
            key = self._random_key()
            process_id = _made_up(key)
        self._clients[process_id] = client
        return process_id, self.layout.issue(key[4:])

    def _random_key(self) -> bytes:
        used = self._random_used
        if used + _KEY_SIZE > len(self._random):
            self._random, used = os.urandom(_RANDOM_BATCH), 0
        self._random_used = used + _KEY_SIZE
        return self._random[used:used + _KEY_SIZE]

    def cancel(self, process_id: int, secret: bytes) -> None:
        """Hand a CancelRequest to the client whose key it carries, here or where the key was issued; drop it
        silently otherwise."""
        layout = self.layout
        if not layout.routing_bits:
            self._deliver(process_id, secret)
            return
        if len(secret) != 4:  # no key pgmux issued
            self._unknown.event()
            return
        value = _number(secret)
        peer_id = layout.peer_of(value)
        if peer_id != layout.peer_id:
            if layout.forwarded(value):
                self._misrouted.event()  # a peer sent it here for another: never forward it again
            elif not self._forward(peer_id, ANY_WORKER, process_id, layout.mark_forwarded(value)):
                self._unknown.event()
            return
        worker = layout.worker_of(value)
        if worker != layout.worker:
            if not self._forward(peer_id, worker, process_id, secret):
                self._unknown.event()
            return
        self._deliver(process_id, layout.as_issued(value))

    def cancel_here(self, process_id: int, secret: bytes) -> None:
        """A CancelRequest a sibling worker forwarded to this worker's private cancel address: delivered here or
        dropped, never forwarded again."""
        layout = self.layout
        if len(secret) != 4:
            self._unknown.event()
            return
        value = _number(secret)
        if layout.peer_of(value) != layout.peer_id or layout.worker_of(value) != layout.worker:
            self._misrouted.event()
            return
        self._deliver(process_id, layout.as_issued(value))

    def _deliver(self, process_id: int, secret: bytes) -> None:
        client = self._clients.get(process_id)
        if client is None or not hmac.compare_digest(client.cancel_key[1], secret):
            self._unknown.event()  # sent without a login: anyone can flood it
            return
        client.cancel_query()

    def forget(self, client: Cancellable) -> None:
        """The client is gone: its key routes nowhere any more."""
        process_id = client.cancel_key[0]
        if self._clients.get(process_id) is client:
            del self._clients[process_id]
