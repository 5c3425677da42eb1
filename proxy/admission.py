"""Admission: the global, per-database and per-user client limits, decided before any authentication work."""

from __future__ import annotations

from proxy.protocol import errors
from proxy.protocol.errors import PgError


class Admission:
    """Counts logged-in clients per database and per user; refuses the one over a limit with 53300.

    A login is checked against the limits at its StartupMessage, so one over a limit costs no
    authentication work, and counted only once it has authenticated, until it disconnects: a name
    in a StartupMessage alone creates no per-user entry, and cannot use up a real user's share.
    """

    def __init__(self, max_client_conn: int, max_db_client_connections: int, max_user_client_connections: int,
                 db_overrides: dict[str, int] | None = None, max_login_clients: int = 0) -> None:
        self.max_client_conn = max_client_conn
        self.max_login_clients = max_login_clients  # 0: max_client_conn
        self.max_db_client_connections = max_db_client_connections
        self.max_user_client_connections = max_user_client_connections
        self.db_overrides = db_overrides or {}
        # Plain dicts, not Counters: compiled, their lookups are native calls (each login adds and removes one).
        self.per_database: dict[str, int] = {}
        self.per_user: dict[str, int] = {}

    def login_limit(self) -> int:
        """How many connections may be logging in at once (the oldest gives way to a newer one past it)."""
        return self.max_login_clients or self.max_client_conn

    def check_connection(self, connected: int) -> PgError | None:
        """For a login, ``connected`` logged-in clients counting it: the max_client_conn refusal, if any."""
        if connected > self.max_client_conn:
            return errors.too_many_clients(self.max_client_conn)
        return None

    def refusal(self, database: str, user: str) -> tuple[PgError, str] | None:
        """The refusal and its reason if (database, user) is at a limit now; counts and stores nothing."""
        db_limit = self.db_overrides.get(database, self.max_db_client_connections)
        if db_limit and self.per_database.get(database, 0) >= db_limit:
            return errors.too_many_database_clients(database, db_limit), "db_client_limit"
        user_limit = self.max_user_client_connections
        if user_limit and self.per_user.get(user, 0) >= user_limit:
            return errors.too_many_user_clients(user, user_limit), "user_client_limit"
        return None

    def admit(self, database: str, user: str) -> tuple[PgError, str] | None:
        """Count an authenticated login for (database, user), or return the refusal without counting it."""
        refused = self.refusal(database, user)
        if refused is not None:
            return refused
        _add(self.per_database, database, 1)
        _add(self.per_user, user, 1)
        return None

    def leave(self, database: str, user: str) -> None:
        _add(self.per_database, database, -1)
        _add(self.per_user, user, -1)


def _add(counts: dict[str, int], key: str, change: int) -> None:
    """Change ``key``'s count; a count that reaches 0 is removed (names alone must leave no state behind)."""
    count = counts.get(key, 0) + change
    if count > 0:
        counts[key] = count
    else:
        counts.pop(key, None)
