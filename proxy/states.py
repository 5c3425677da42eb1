"""Client and server connection states, and the one table of their PgBouncer names that admin and metrics read."""

from __future__ import annotations

import enum
from typing import Final


class ClientState(enum.Enum):
    STARTUP = "startup"
    AUTH = "auth"
    LOGIN = "login"  # authenticated, being welcomed
    ADMIN = "admin"  # talking to the admin console (virtual database pgmux / pgbouncer)
    IDLE = "idle"  # between transactions, no server
    WAITING = "waiting"  # in line for a server
    ACTIVE = "active"  # linked to a server
    CLOSED = "closed"


class ServerState(enum.Enum):
    LOGIN = "login"
    IDLE = "idle"
    ACTIVE = "active"  # linked to a client
    RESETTING = "resetting"  # running pgmux's own cleanup before it may be reused
    BEING_CANCELED = "being_canceled"  # released while a cancel for its last client is in flight: lent to nobody
    CLOSING = "closing"  # asked to close; still counts against the limits until the socket is gone
    CLOSED = "closed"

    # Members are singletons: identity hashing is as correct as Enum's name hashing and runs in C
    # (the pool keys its per-state sets by state on every transaction).
    __hash__ = object.__hash__


class StateNames:
    """How one state shows up: in SHOW CLIENTS / SHOW SERVERS, in SHOW POOLS, and as a /metrics label.

    ``shown``: the ``state`` column of SHOW CLIENTS / SHOW SERVERS, None when that list leaves the
    connection out. ``column``: the SHOW POOLS column that counts it, None when none does.
    ``label``: the ``state`` label of pgmux_clients / pgmux_servers, None when not counted there.
    """

    __slots__ = ("shown", "column", "label")

    def __init__(self, shown: str | None, column: str | None, label: str | None) -> None:
        self.shown = shown
        self.column = column
        self.label = label


# A client is logging in from its accept to its welcome (PgBouncer's CL_LOGIN, its login_client_list):
# SHOW LISTS login_clients and pgmux_login_clients count all of these; client_login_timeout applies to
# them. PgBouncer's SHOW CLIENTS lists only clients of a pool's active and waiting lists, so a login is
# not listed there, nor counted by SHOW POOLS. pgmux_clients counts a login under state="login" in its
# pool once it has one: once authenticated (before that, the names it gave are unproven, and a label
# value taken from them would let anyone create series).
LOGGING_IN: Final = frozenset({ClientState.STARTUP, ClientState.AUTH, ClientState.LOGIN})

CLIENT_NAMES: Final[dict[ClientState, StateNames]] = {
    ClientState.STARTUP: StateNames(None, None, "login"),
    ClientState.AUTH: StateNames(None, None, "login"),
    ClientState.LOGIN: StateNames(None, None, "login"),
    # The console is a client of PgBouncer's admin pool; it belongs to no pool of pgmux's, so no metric counts it.
    ClientState.ADMIN: StateNames("active", "cl_active", None),
    # PgBouncer's cl_active: "linked to a server or idle with no queries waiting".
    ClientState.IDLE: StateNames("idle", "cl_active", "idle"),
    ClientState.WAITING: StateNames("waiting", "cl_waiting", "waiting"),
    ClientState.ACTIVE: StateNames("active", "cl_active", "active"),
    ClientState.CLOSED: StateNames(None, None, None),
}

SERVER_NAMES: Final[dict[ServerState, StateNames]] = {
    ServerState.LOGIN: StateNames("new", "sv_login", "login"),
    ServerState.IDLE: StateNames("idle", "sv_idle", "idle"),
    ServerState.ACTIVE: StateNames("active", "sv_active", "active"),
    ServerState.RESETTING: StateNames("tested", "sv_tested", "tested"),
    ServerState.BEING_CANCELED: StateNames("being_canceled", "sv_being_canceled", "being_canceled"),
    # Closing: already gone for PgBouncer's lists, still held (and counted against the limits) by pgmux.
    ServerState.CLOSING: StateNames(None, None, "closing"),
    ServerState.CLOSED: StateNames(None, None, None),
}

# Every label value each gauge exports, in the order it exports them (a state with no connection
# in it reads 0). "used" is PgBouncer's idle server due for server_check_query, which pgmux never has.
CLIENT_LABELS: Final = ("active", "idle", "waiting", "login")
SERVER_LABELS: Final = ("active", "idle", "used", "tested", "login", "being_canceled", "closing")
