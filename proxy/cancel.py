"""CancelKeys: the BackendKeyData pgmux issues to its clients, and CancelRequests routed by them."""

from __future__ import annotations

import hmac
import os
from typing import Final

from mypy_extensions import trait

from proxy.logs import LogSummary, get_logger

log = get_logger("cancel")

CANCEL_LOG_INTERVAL: Final = 10.0  # CancelRequests with unknown keys: one log line (with a count) per this many seconds


@trait
class Cancellable:
    """A connection a CancelRequest can reach: the client edge implements it."""

    __slots__ = ()  # interpreted, a base without slots would give every client a __dict__

    cancel_key: tuple[int, bytes]  # (process id, secret) given to the client; (0, b"") before its welcome

    def cancel_query(self) -> None:
        """A CancelRequest with this connection's key arrived: stop what it runs, if anything."""
        raise NotImplementedError


class CancelKeys:
    """Issues each logged-in client a key and routes a CancelRequest to the client that holds it."""

    def __init__(self) -> None:
        self._clients: dict[int, Cancellable] = {}
        self._unknown = LogSummary(log, "cancel request with an unknown key ignored", CANCEL_LOG_INTERVAL)

    def register(self, client: Cancellable) -> tuple[int, bytes]:
        """A fresh (process id, secret) for ``client``, unique among the live ones."""
        while True:
            # One getrandom() for both halves: this runs on every login.
            key = os.urandom(8)
            process_id = int.from_bytes(key[:4], "big") & 0x7FFFFFFF
            if process_id and process_id not in self._clients:
                break
        self._clients[process_id] = client
        return process_id, key[4:]

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
