"""Router: the databases pgmux serves, the secrets logins are checked against, and the pools and budgets behind them."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from proxy.admission import Admission
from proxy.auth.cleartext import CleartextChecks
from proxy.auth.secrets import ScramKeys, UserSecret
from proxy.logs import get_logger
from proxy.pool import BackendLedger, Pool, PoolConfig, PoolKey, ServerBudget
from proxy.prepared import StatementNames
from proxy.protocol import errors
from proxy.protocol import messages as m
from proxy.protocol.messages import TransactionStatus
from proxy.server import Backends, InternalQueryFailed, ServerConnection
from proxy.settings import DatabaseSettings, Settings, Upstream, parse_upstream_url
from proxy.stats import DatabaseTotals, Totals

# A C static when compiled, where time.monotonic is a lookup per call (see pool.py).
_monotonic: Final = time.monotonic

log = get_logger("routing")

# A pool with no client, server or waiter is forgotten after this long. Its servers have already
# idled out (server_idle_timeout) by then, so keeping it saves little; waiting at all keeps an outage's
# login backoff and fail-fast state (server_login_retry, 15 s by default) between clients that come
# seconds apart, and the parameters learned from its first server. Not server_idle_timeout itself:
# that may be 0 (never), and a pool must not be kept forever for a user name seen once.
EMPTY_POOL_TTL: Final = 60.0
_AUTH_CACHE_LIMIT: Final = 10_000  # looked-up users kept at most (the oldest answer goes first)


@dataclass
class _Database:
    name: str
    settings: DatabaseSettings
    upstream: Upstream
    budget: ServerBudget


class Router:
    """Where a login goes: its database, the secret it must prove, the pool that serves it.

    Owns the pools and their server budgets, and the admin console's operations on them (PAUSE,
    RESUME, RECONNECT, WAIT_CLOSE and KILL's half that concerns servers).
    """

    def __init__(self, settings: Settings, admission: Admission,
                 spawn: Callable[..., asyncio.Task[None]], count_rejection: Callable[[str], None],
                 ledger: BackendLedger | None = None) -> None:
        self.settings = settings
        self.max_prepared_statements = self.max_client_buffer = 0
        self.ignore_startup_parameters: frozenset[str] = frozenset()
        self._copy_hot_settings(settings)
        self._ledger = ledger  # the other workers' backends under the same limits, if any (proxy/slots.py)
        self.admission = admission
        self.pools: dict[PoolKey, Pool] = {}
        self.statement_names = StatementNames()
        self.backends = Backends()  # every pool's backends, by upstream address and pid
        self.paused: set[str] = set()  # databases paused by PAUSE db / KILL db
        self.paused_all = False  # PAUSE without a database
        self._spawn = spawn
        self._count_rejection = count_rejection
        self._databases = {
            name: _Database(name, db, parse_upstream_url(db.url.get_secret_value()),
                            ServerBudget(db.max_db_connections if db.max_db_connections is not None
                                         else settings.max_db_connections, ("database", name)))
            for name, db in settings.all_databases().items()
        }
        self._user_budgets: dict[str, ServerBudget] = {}
        # Kept for users with a configured secret only: a name that is not configured must cost nothing.
        self._secrets: dict[tuple[str, str], UserSecret] = {}
        self._login_pools: dict[tuple[str, str], Pool] = {}  # (database, user) -> the pool its logins use
        # auth_query answers: (database, user) -> (valid until, the secret; None: no such user or no password).
        self._looked_up: dict[tuple[str, str], tuple[float, UserSecret | None]] = {}
        self._totals = DatabaseTotals()  # each database's counters, kept across its pools dropped as unused
        # Cleartext passwords (WebSocket logins) checked against secrets, recent successes remembered: one per process.
        self.cleartext = CleartextChecks()

    # ---- routing a login to a pool --------------------------------------------------------------

    def serves_database(self, database: str) -> bool:
        return database in self._databases

    def database_for_server_name(self, server_name: str) -> str | None:
        """The database whose server_names hold the TLS host name a client asked for (SNI), if any."""
        wanted = server_name.lower()
        for db in self._databases.values():
            if any(name.lower() == wanted for name in db.settings.server_names):
                return db.name
        return None

    def login_secret(self, database: str, user: str) -> UserSecret | None:
        """What a login's password is checked against (None: nothing known); creates no state for ``user``.

        None for a database pgmux does not serve too: authentication then runs against a mock secret
        and fails as a wrong password does, so the answer does not tell which databases exist.
        """
        db = self._databases.get(database)
        return None if db is None else self._secret(db, user)

    def login_pool(self, database: str, user: str, scram_keys: ScramKeys | None = None) -> Pool:
        """The pool an authenticated login uses, created on first use; the caller becomes one of its clients.

        Only authenticated clients get here: a pool, its metric series and its user's server budget
        are made for users who proved who they are, never for a name in a StartupMessage. ``scram_keys``:
        what the client's SCRAM login revealed, with which a looked-up user logs in upstream as itself.
        """
        # Every login asks this, so the answer is kept until the pool is dropped or the next reload.
        pool = self._login_pools.get((database, user))
        if pool is None:
            pool = self._login_pools[database, user] = self._find_login_pool(database, user, scram_keys)
        elif (scram_keys is not None and pool.config.upstream.scram_keys != scram_keys
              and (database, user) in self._looked_up):
            # A looked-up user whose password changed since the pool's first login (or who first logged in
            # with md5): its backends log in with the new keys.
            upstream = dataclasses.replace(pool.config.upstream, scram_keys=scram_keys)
            pool.reconfigure(dataclasses.replace(pool.config, upstream=upstream))
        pool.clients += 1  # the client takes itself off again when it ends
        return pool

    # ---- users looked up in the database (auth_query) ---------------------------------------------

    def looks_up(self, database: str, user: str) -> bool:
        """Whether a login of ``user`` (not configured in pgmux) is checked against an auth_query answer."""
        return (self.settings.auth_user is not None and database in self._databases
                and self.login_secret(database, user) is None)

    async def looked_up_secret(self, database: str, user: str) -> UserSecret | None:
        """``user``'s secret as auth_query returns it, kept auth_cache_ttl seconds; None: no such user, or one
        without a password (the login then fails as a wrong password does)."""
        now = _monotonic()
        cached = self._looked_up.get((database, user))
        if cached is not None and cached[0] > now:
            return cached[1]
        settings = self.settings
        assert settings.auth_user is not None
        pool = self._find_login_pool(settings.auth_dbname or database, settings.auth_user)
        server = await pool.acquire()
        try:
            rows = await server.fetch_internal(m.extended_query(settings.auth_query, [user]), "auth_query")
        except InternalQueryFailed as failed:
            if failed.fields is not None and server.tx_status is TransactionStatus.IDLE:
                pool.release(server)  # the query was refused; the backend is as it was
            else:
                pool.abort_server(server, f"auth_query failed: {failed}")
            log.error("auth_query as %s failed: %s", settings.auth_user, failed)
            raise errors.upstream_unavailable("looking up the user with auth_query failed") from None
        except BaseException:
            pool.abort_server(server, "auth_query was interrupted")
            raise
        pool.release(server)
        secret = self._secret_from_row(user, rows[0] if rows else None)
        if len(self._looked_up) >= _AUTH_CACHE_LIMIT:
            del self._looked_up[next(iter(self._looked_up))]
        self._looked_up[database, user] = (_monotonic() + settings.auth_cache_ttl, secret)
        return secret

    @staticmethod
    def _secret_from_row(user: str, row: list[str | None] | None) -> UserSecret | None:
        """An auth_query row (name, password) as a secret; None for no row or no password."""
        if row is None or len(row) < 2 or not row[1]:
            return None
        try:
            return UserSecret.from_config(user, row[1])
        except ValueError as exc:
            log.warning("auth_query returned an unusable password for user %r: %s", user, exc)
            return None

    def _login_database(self, database: str) -> _Database:
        db = self._databases.get(database)
        if db is None:
            self._count_rejection("unknown_database")
            raise errors.unknown_database(database)
        return db

    def _find_login_pool(self, database: str, user: str, scram_keys: ScramKeys | None = None) -> Pool:
        db = self._login_database(database)
        secret = self._secret(db, user)
        upstream = db.upstream
        looked_up = self._looked_up.get((database, user)) if secret is None else None
        if looked_up is not None and looked_up[1] is not None:
            # A user from auth_query logs in upstream as itself, with what its own login revealed (SCRAM) or
            # its md5 hash: pgmux never knows its password.
            upstream = dataclasses.replace(upstream, user=user, password=looked_up[1].password,
                                           scram_keys=scram_keys, md5_hash=looked_up[1].md5_hash)
        elif secret is not None and secret.password is not None:
            upstream = dataclasses.replace(upstream, user=user, password=secret.password)
        elif secret is None:
            # Only a trust listener lets an unknown user this far; the upstream decides about it.
            upstream = dataclasses.replace(upstream, user=user, password=None)
        # A user known only by a hash or verifier logs in upstream as the database's own user.
        return self._pool(db, upstream)

    def admin_role(self, user: str) -> str | None:
        """'admin', 'stats' or None: what ``user`` may do on the admin console."""
        if user in self.settings.admin_users:
            return "admin"
        if user in self.settings.stats_users:
            return "stats"
        return None

    def admin_secret(self, user: str) -> UserSecret | None:
        """The password an admin console user logs in with: a [users] entry or a database URL's user."""
        configured = self.settings.users.get(user)
        if configured is not None:
            return UserSecret.from_config(user, configured.password.get_secret_value())
        for db in self._databases.values():
            if db.upstream.user == user and db.upstream.password is not None:
                return UserSecret(user, password=db.upstream.password)
        return None

    def _secret(self, db: _Database, user: str) -> UserSecret | None:
        key = (db.name, user)
        secret = self._secrets.get(key)
        if secret is None:
            configured = self.settings.users.get(user)
            if configured is not None:
                secret = UserSecret.from_config(user, configured.password.get_secret_value())
            elif user == db.upstream.user and db.upstream.password is not None:
                secret = UserSecret(user, password=db.upstream.password)
            else:
                return None
            self._secrets[key] = secret
        return secret

    def _pool(self, db: _Database, upstream: Upstream) -> Pool:
        key = PoolKey(db.name, upstream.user)
        pool = self.pools.get(key)
        if pool is None:
            pool = Pool(key, self._pool_config(db, upstream), self._budgets(db, upstream.user), self._spawn,
                        self.backends, self._ledger)
            self.pools[key] = pool
        return pool

    def _budgets(self, db: _Database, user: str) -> tuple[ServerBudget, ...]:
        budget = self._user_budgets.get(user)
        if budget is None:
            budget = self._user_budgets[user] = ServerBudget(self.settings.max_user_connections, ("user", user))
        return db.budget, budget

    def _pool_config(self, db: _Database, upstream: Upstream, honour_pause: bool = True) -> PoolConfig:
        s, d = self.settings, db.settings
        config = PoolConfig(
            upstream=upstream,
            pool_size=d.pool_size if d.pool_size is not None else s.default_pool_size,
            min_pool_size=d.min_pool_size if d.min_pool_size is not None else s.min_pool_size,
            reserve_pool_size=d.reserve_pool_size if d.reserve_pool_size is not None else s.reserve_pool_size,
            reserve_pool_timeout=s.reserve_pool_timeout,
            query_wait_timeout=s.query_wait_timeout,
            max_wait_clients=s.max_wait_clients,
            server_idle_timeout=s.server_idle_timeout,
            server_lifetime=s.server_lifetime,
            server_connect_timeout=s.server_connect_timeout,
            server_login_retry=s.server_login_retry,
            server_reset_query=s.server_reset_query,
        )
        if honour_pause and self.is_paused(db.name):
            # A paused pool lends nothing: no idle servers, no new ones, each server closed as it comes back.
            config = dataclasses.replace(config, pool_size=0, min_pool_size=0, reserve_pool_size=0)
        return config

    # ---- upkeep -------------------------------------------------------------------------------

    def drop_unused_pools(self, now: float) -> None:
        """Forget each pool that has had no client, server or waiter for EMPTY_POOL_TTL (janitor work)."""
        dropped: set[Pool] = set()
        for pool in list(self.pools.values()):
            if pool.clients or pool.total or pool.waiters:
                pool.unused_since = 0.0
            elif not pool.unused_since:
                pool.unused_since = now
            elif now - pool.unused_since >= EMPTY_POOL_TTL:
                self._drop_pool(pool)
                dropped.add(pool)
        if dropped:  # one pass over the logins for all of them (several logins may share a pool)
            self._login_pools = {login: pool for login, pool in self._login_pools.items() if pool not in dropped}

    def _drop_pool(self, pool: Pool) -> None:
        log.info("pool %s dropped: unused for %gs", pool.key, EMPTY_POOL_TTL)
        del self.pools[pool.key]
        pool.leave_budgets()
        budget = self._user_budgets.get(pool.key.user)
        if budget is not None and not budget.pools:
            del self._user_budgets[pool.key.user]
        # SHOW STATS totals and the stats line's averages must not go backwards.
        self._totals.retire(pool.key.database, pool.stats)

    def _copy_hot_settings(self, settings: Settings) -> None:
        """Copy the settings compiled code reads per login or per transaction: a Settings attribute is a pydantic
        lookup (its __getattr__ hook: 350-450 instructions, a tenth of pgmux's own work on a transaction)."""
        self.max_prepared_statements = settings.max_prepared_statements
        self.max_client_buffer = settings.max_client_buffer
        self.ignore_startup_parameters = frozenset(settings.ignore_startup_parameters)

    def reload(self, settings: Settings) -> None:
        """Take a new configuration: limits, databases, secrets and pool settings (see Proxy.reload)."""
        self.settings = settings
        self._copy_hot_settings(settings)
        self.admission.max_client_conn = settings.max_client_conn
        self.admission.max_login_clients = settings.max_login_clients
        self.admission.max_db_client_connections = settings.max_db_client_connections
        self.admission.max_user_client_connections = settings.max_user_client_connections
        self.admission.db_overrides = {name: db.max_db_client_connections
                                       for name, db in settings.all_databases().items()
                                       if db.max_db_client_connections is not None}
        new_databases = settings.all_databases()
        for name in list(self._databases):
            if name not in new_databases:
                log.info("reload: database %s removed; its connected clients may finish", name)
                del self._databases[name]
        for name, db_settings in new_databases.items():
            upstream = parse_upstream_url(db_settings.url.get_secret_value())
            limit = (db_settings.max_db_connections if db_settings.max_db_connections is not None
                     else settings.max_db_connections)
            current = self._databases.get(name)
            if current is None:
                self._databases[name] = _Database(name, db_settings, upstream, ServerBudget(limit, ("database", name)))
                log.info("reload: database %s added", name)
                continue
            current.settings = db_settings
            current.budget.limit = limit
            if current.upstream != upstream:
                log.info("reload: database %s now points at %s", name, upstream.redacted())
                current.upstream = upstream
        for budget in self._user_budgets.values():
            budget.limit = settings.max_user_connections
        self._secrets.clear()
        self._login_pools.clear()
        for key, pool in self.pools.items():
            db = self._databases.get(key.database)
            if db is None:
                continue
            upstream = db.upstream
            if key.user != upstream.user:
                # A pool of a [users] entry: same place, that user's own credentials.
                secret = self._secret(db, key.user)
                password = secret.password if secret is not None else None
                upstream = dataclasses.replace(upstream, user=key.user, password=password)
            pool.reconfigure(self._pool_config(db, upstream))

    def totals_by_database(self) -> dict[str, Totals]:
        """Each database's running totals, including those of its pools dropped as unused."""
        return self._totals.by_database((pool.key.database, pool.stats) for pool in self.pools.values())

    # ---- views for the admin console and /metrics ---------------------------------------------------

    def database_names(self) -> list[str]:
        return sorted(self._databases)

    def upstreams(self) -> dict[str, Upstream]:
        return {name: db.upstream for name, db in sorted(self._databases.items())}

    def database_max_connections(self, database: str) -> int:
        db = self._databases.get(database)
        return db.budget.limit if db is not None else 0

    def configured_pool(self, pool: Pool) -> PoolConfig:
        """The pool's settings as configured, whether or not it is paused right now."""
        db = self._databases.get(pool.key.database)
        if db is None:
            return pool.config
        return self._pool_config(db, pool.config.upstream, honour_pause=False)

    def close_needed(self, pool: Pool, server: ServerConnection) -> bool:
        """Whether the server will be closed when released (RECONNECT, PAUSE, an upstream changed by reload)."""
        return pool.will_retire(server) or server.upstream != pool.config.upstream or self.is_paused(pool.key.database)

    # ---- admin console operations: PAUSE, RESUME, RECONNECT, KILL, WAIT_CLOSE -----------------------

    def is_paused(self, database: str) -> bool:
        return self.paused_all or database in self.paused

    def _pools_of(self, database: str | None) -> list[Pool]:
        return [pool for pool in self.pools.values() if database is None or pool.key.database == database]

    def _reconfigure(self, database: str | None) -> None:
        for pool in self._pools_of(database):
            db = self._databases.get(pool.key.database)
            if db is not None:
                pool.reconfigure(self._pool_config(db, pool.config.upstream))

    def pause(self, database: str | None) -> None:
        """Stop lending servers for ``database`` (None: all); lent ones are closed as they come back."""
        if database is None:
            self.paused_all = True
        else:
            self.paused.add(database)
        log.info("PAUSE %s: no servers are lent until RESUME", database or "(all databases)")
        self._reconfigure(database)

    def resume(self, database: str | None) -> None:
        if database is None:
            self.paused_all = False
            self.paused.clear()
        else:
            self.paused.discard(database)
        log.info("RESUME %s", database or "(all databases)")
        self._reconfigure(database)

    def servers_in_use(self, database: str | None) -> int:
        """Servers of ``database`` still lent, being reset, canceled, logging in or closing: what PAUSE waits for.
        A closing server is gone once PostgreSQL has closed its end (ServerConnection.close), not before."""
        return sum(len(pool.active) + len(pool.resetting) + len(pool.login) + len(pool.being_canceled)
                   + len(pool.closing) for pool in self._pools_of(database))

    def reconnect(self, database: str | None) -> None:
        """Close every server of ``database`` (None: all) once it is not in use; new ones connect as needed."""
        log.info("RECONNECT %s", database or "(all databases)")
        for pool in self._pools_of(database):
            pool.retire_servers("RECONNECT on the admin console")

    def servers_to_close(self, database: str | None) -> int:
        """Servers marked to close after use (RECONNECT, reload): what WAIT_CLOSE waits for."""
        return sum(1 for pool in self._pools_of(database)
                   for server in (*pool.active, *pool.idle, *pool.resetting, *pool.login, *pool.being_canceled)
                   if pool.will_retire(server) or server.upstream != pool.config.upstream)

    def kill_servers(self, database: str | None) -> None:
        """KILL's part here: close every server of ``database`` (None: all) now; new logins wait for RESUME.

        The databases it names are already marked paused (see Proxy.kill), so no pool lends again.
        """
        for pool in self._pools_of(database):
            db = self._databases.get(pool.key.database)
            if db is not None:
                pool.reconfigure(self._pool_config(db, pool.config.upstream))
            pool.close_all("KILL on the admin console")
