"""CancelKeys: the BackendKeyData pgmux issues to its clients, and CancelRequests routed by them."""

from __future__ import annotations

import hmac
import os
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
    # Indexing, not int.from_bytes(key[:4]): compiled, these are native byte reads and shifts.
    return _FIRST_MADE_UP + (key[0] << 24 | key[1] << 16 | key[2] << 8 | key[3]) % _MADE_UP_COUNT


class CancelKeys:
    """Issues each logged-in client a key and routes a CancelRequest to the client that holds it."""

    def __init__(self) -> None:
        self._clients: dict[int, Cancellable] = {}
        # Random bytes for keys, drawn from os.urandom a batch at a time: one getrandom() call per login was
        # most of what issuing a key cost (the bytes are as random; each is handed out once).
        self._random = b""
        self._random_used = 0
        self._unknown = LogSummary(log, "cancel request with an unknown key ignored", CANCEL_LOG_INTERVAL)

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
        return process_id, key[4:]

    def _random_key(self) -> bytes:
        used = self._random_used
        if used + _KEY_SIZE > len(self._random):
            self._random, used = os.urandom(_RANDOM_BATCH), 0
        self._random_used = used + _KEY_SIZE
        return self._random[used:used + _KEY_SIZE]

    def cancel(self, process_id: int, secret: bytes) -> None:
        """Hand a CancelRequest to the client whose key it carries; drop it silently otherwise."""
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
