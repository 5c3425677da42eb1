"""FailedLogins: failed logins counted per source address, so that one address guessing passwords is cut off
cheaply while logins from everywhere else go on untouched."""

from __future__ import annotations

from typing import Final

_MAX_ADDRESSES: Final = 65536  # the table's bound: the oldest address is forgotten to make room


def source_address(peer: str) -> str:
    """The address failures are counted by, from a client's "ip:port" ('' for a Unix socket: not limited)."""
    return "" if peer == "unix" else peer.rpartition(":")[0]


class FailedLogins:
    """Per address: failures within the current window. An address that reached the limit is refused before
    any authentication work until its window ends (auth_failure_limit, auth_failure_window)."""

    __slots__ = ("_windows",)

    def __init__(self) -> None:
        self._windows: dict[str, tuple[float, int]] = {}  # address -> (window start, failures in it)

    def __bool__(self) -> bool:
        """Whether any address has failures on record (a login's first, cheapest question)."""
        return bool(self._windows)

    def blocked_for(self, address: str, now: float, limit: int, window: float) -> float:
        """Seconds until ``address`` may try again; 0 when it may now (or limits are off: limit 0)."""
        entry = self._windows.get(address)
        if not limit or entry is None:
            return 0.0
        started, failures = entry
        left = started + window - now
        if left <= 0:
            del self._windows[address]
            return 0.0
        return left if failures >= limit else 0.0

    def failed(self, address: str, now: float, window: float) -> None:
        """A login from ``address`` failed."""
        entry = self._windows.pop(address, None)  # re-inserted last: the dict's order is the eviction order
        if entry is None or now - entry[0] >= window:
            entry = (now, 0)
        self._windows[address] = (entry[0], entry[1] + 1)
        if len(self._windows) > _MAX_ADDRESSES:
            del self._windows[next(iter(self._windows))]
