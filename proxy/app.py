"""Proxy: the listeners, the pool registry, the cancel-key registry, the janitor and the process lifecycle."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import functools
import hmac
import os
import signal
import socket
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, Final

from proxy import BUILD, __version__
from proxy.admission import Admission
from proxy.auth.secrets import UserSecret
from proxy.client import ClientConnection
from proxy.logs import LogSummary, get_logger
from proxy.metrics import MetricsServer, Readiness
from proxy.pool import Pool, PoolConfig, PoolKey, ServerBudget
from proxy.prepared import StatementNames
from proxy.protocol import errors
from proxy.reception import Reception
from proxy.server import ServerConnection
from proxy.settings import DatabaseSettings, Settings, Upstream, parse_upstream_url, split_address
from proxy.states import ClientState
from proxy.stats import DatabaseTotals, StatsWindow, Totals, stats_log_line

log = get_logger("app")

JANITOR_PERIOD = 0.25  # how often timeouts are checked: their resolution
CANCEL_LOG_INTERVAL = 10.0  # CancelRequests with unknown keys: one log line (with a count) per this many seconds
# A pool with no client, server or waiter is forgotten after this long. Its servers have already
# idled out (server_idle_timeout) by then, so keeping it saves little; waiting at all keeps an outage's
# login backoff and fail-fast state (server_login_retry, 15 s by default) between clients that come
# seconds apart, and the parameters learned from its first server. Not server_idle_timeout itself:
# that may be 0 (never), and a pool must not be kept forever for a user name seen once.
EMPTY_POOL_TTL: Final = 60.0


@dataclass
class _Database:
    name: str
    settings: DatabaseSettings
    upstream: Upstream
    budget: ServerBudget


class Proxy:
    """One running pgmux: owns every connection, pool and task it starts."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.pools: dict[PoolKey, Pool] = {}
        self.clients: set[ClientConnection] = set()
        # The clients that have not authenticated yet, oldest first (a dict keeps arrival order).
        self._logging_in: dict[ClientConnection, None] = {}
        self.rejections: collections.Counter[str] = collections.Counter()
        self.addresses: list[tuple[str, int]] = []  # where the listeners are bound, in listener order
        self.draining = False
        self._databases = {
            name: _Database(name, db, parse_upstream_url(db.url.get_secret_value()),
                            ServerBudget(db.max_db_connections if db.max_db_connections is not None
                                         else settings.max_db_connections))
            for name, db in settings.all_databases().items()
        }
        self.admission = Admission(
            settings.max_client_conn, settings.max_db_client_connections, settings.max_user_client_connections,
            {name: db.max_db_client_connections for name, db in settings.all_databases().items()
             if db.max_db_client_connections is not None})
        self._user_budgets: dict[str, ServerBudget] = {}
        # Kept for users with a configured secret only: a name that is not configured must cost nothing.
        self._secrets: dict[tuple[str, str], UserSecret] = {}
        self._login_pools: dict[tuple[str, str], Pool] = {}  # (database, user) -> the pool its logins use
        self.database_totals = DatabaseTotals()
        self._cancel_keys: dict[int, ClientConnection] = {}
        self._unknown_cancel_keys = LogSummary(log, "cancel request with an unknown key ignored", CANCEL_LOG_INTERVAL)
        self.statement_names = StatementNames()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._servers: list[asyncio.Server] = []
        self._janitor: asyncio.Task[None] | None = None
        self._stopped = asyncio.Event()
        # Observability and the admin console (metrics.py, admin.py).
        self.accepted = 0  # client sockets accepted since start
        self.paused: set[str] = set()  # databases paused by PAUSE db / KILL db
        self.paused_all = False  # PAUSE without a database
        self.reload_settings: Callable[[], Settings] | None = None  # where RELOAD / SIGHUP read settings from
        self.stats_window = StatsWindow()
        self.readiness = Readiness(self)
        self.metrics: MetricsServer | None = None

    # ---- tasks ------------------------------------------------------------------------------------

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        """Start a task that the proxy owns: it is tracked until done, and its failure is logged."""
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("task %s failed", task.get_name(), exc_info=task.exception())

    # ---- listening ----------------------------------------------------------------------------

    async def start(self) -> None:
        log.info("pgmux %s, %s", __version__, BUILD.describe())
        loop = asyncio.get_running_loop()
        for listener in self.settings.all_listeners():
            host, port = split_address(listener.address)
            server = await loop.create_server(functools.partial(self._accept, listener),  # type: ignore[arg-type]
                                              host, port, reuse_address=True, backlog=4096)
            self._servers.append(server)
            # getattr: uvloop's Server.sockets is a list where the stub says tuple, and compiled code
            # checks declared types.
            sockets: Sequence[socket.socket] = getattr(server, "sockets")
            bound = sockets[0].getsockname()
            self.addresses.append((bound[0], bound[1]))
            log.info("listening on %s:%d (%s pooling, %s auth)", bound[0], bound[1], listener.pool_mode.value,
                     listener.auth_type.value)
        self._janitor = self.spawn(self._run_janitor(), name="janitor")
        self.spawn(self._run_stats(), name="stats")
        if self.settings.metrics_listen:
            self.metrics = MetricsServer(self)
            await self.metrics.start(self.settings.metrics_listen)
            self.spawn(self.readiness.run(), name="readiness")

    def _accept(self, listener: Any) -> ClientConnection:
        self.accepted += 1
        client = ClientConnection(self, listener)
        client.login = Reception(self, client)
        limit = self.settings.max_login_clients or self.settings.max_client_conn
        if len(self._logging_in) >= limit:
            # Refusing the newcomer would let sockets that never log in lock everyone out.
            oldest = next(iter(self._logging_in))
            oldest.fail(errors.login_crowded_out(limit), reason="login_limit")
        self.clients.add(client)
        self._logging_in[client] = None
        return client

    def client_limit_error(self) -> errors.PgError | None:
        """The refusal for a client still logging in: at connect (before any authentication work) and again
        once it has authenticated. max_client_conn counts logged-in clients, this one included."""
        if self.draining:
            self.count_rejection("shutdown")
            return errors.shutting_down()
        refusal = self.admission.check_connection(len(self.clients) - len(self._logging_in) + 1)
        if refusal is not None:
            self.count_rejection("max_client_conn")
        return refusal

    def login_finished(self, client: ClientConnection) -> None:
        """The client has authenticated: it no longer counts against max_login_clients."""
        self._logging_in.pop(client, None)

    # ---- routing a login to a pool --------------------------------------------------------------

    def serves_database(self, database: str) -> bool:
        return database in self._databases

    def login_secret(self, database: str, user: str) -> UserSecret | None:
        """What a login's password is checked against (None: nothing known); creates no state for ``user``.

        None for a database pgmux does not serve too: authentication then runs against a mock secret
        and fails as a wrong password does, so the answer does not tell which databases exist.
        """
        db = self._databases.get(database)
        return None if db is None else self._secret(db, user)

    def login_pool(self, database: str, user: str) -> Pool:
        """The pool an authenticated login uses, created on first use; the caller becomes one of its clients.

        Only authenticated clients get here: a pool, its metric series and its user's server budget
        are made for users who proved who they are, never for a name in a StartupMessage.
        """
        # Every login asks this, so the answer is kept until the pool is dropped or the next reload.
        pool = self._login_pools.get((database, user))
        if pool is None:
            pool = self._login_pools[database, user] = self._find_login_pool(database, user)
        pool.clients += 1  # forget_client takes it off again
        return pool

    def _login_database(self, database: str) -> _Database:
        db = self._databases.get(database)
        if db is None:
            self.count_rejection("unknown_database")
            raise errors.unknown_database(database)
        return db

    def _find_login_pool(self, database: str, user: str) -> Pool:
        db = self._login_database(database)
        secret = self._secret(db, user)
        upstream = db.upstream
        if secret is not None and secret.password is not None:
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
            pool = Pool(key, self._pool_config(db, upstream), self._budgets(db, upstream.user), self.spawn)
            self.pools[key] = pool
        return pool

    def _budgets(self, db: _Database, user: str) -> tuple[ServerBudget, ...]:
        budget = self._user_budgets.get(user)
        if budget is None:
            budget = self._user_budgets[user] = ServerBudget(self.settings.max_user_connections)
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

    # ---- cancel requests ----------------------------------------------------------------------

    def register_cancel_key(self, client: ClientConnection) -> tuple[int, bytes]:
        while True:
            # One getrandom() for both halves: this runs on every login.
            key = os.urandom(8)
            process_id = int.from_bytes(key[:4], "big") & 0x7FFFFFFF
            if process_id and process_id not in self._cancel_keys:
                break
        self._cancel_keys[process_id] = client
        return process_id, key[4:]

    def cancel(self, process_id: int, secret: bytes) -> None:
        """Forward a CancelRequest to the server the client uses now; drop it silently otherwise."""
        client = self._cancel_keys.get(process_id)
        if client is None or not hmac.compare_digest(client.cancel_key[1], secret):
            self._unknown_cancel_keys.event()  # sent without a login: anyone can flood it
            return
        server = client.server
        if server is None or not client.pending:
            log.info("cancel request ignored: no query running", extra={"conn": client.id})
            return
        log.info("forwarding cancel request to %s", server.id, extra={"conn": client.id})
        if client.pool is not None:
            client.pool.stats.cancels_forwarded += 1
            client.pool.cancel(server)

    def forget_client(self, client: ClientConnection) -> None:
        self.clients.discard(client)
        self._logging_in.pop(client, None)
        if client.pool is not None:
            client.pool.clients -= 1
        process_id = client.cancel_key[0]
        if self._cancel_keys.get(process_id) is client:
            del self._cancel_keys[process_id]

    # ---- counters -----------------------------------------------------------------------------

    def count_rejection(self, reason: str) -> None:
        self.rejections[reason] += 1

    # ---- upkeep and shutdown ------------------------------------------------------------------

    async def _run_janitor(self) -> None:
        while True:
            await asyncio.sleep(JANITOR_PERIOD)
            now = time.monotonic()
            for pool in list(self.pools.values()):
                pool.maintain(now)
            for client in list(self.clients):
                client.check_timeouts(now)
            self.drop_unused_pools(now)

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
        self.database_totals.retire(pool.key.database, pool.stats)

    async def stop(self, graceful: bool = True) -> None:
        """Stop listening; let transactions finish (up to shutdown_timeout) if graceful; close everything."""
        if self.draining:
            graceful = False
        self.draining = True
        for server in self._servers:
            server.close()
        if graceful:
            deadline = time.monotonic() + self.settings.shutdown_timeout
            while time.monotonic() < deadline:
                for client in list(self.clients):
                    if client.state is ClientState.ADMIN or client.at_transaction_boundary():
                        client.fail(errors.shutting_down())
                if not self.clients:
                    break
                await asyncio.sleep(0.05)
        for client in list(self.clients):
            client.fail(errors.shutting_down())
        for pool in self.pools.values():
            pool.close_all("pgmux is shutting down")
        if self._janitor is not None:
            self._janitor.cancel()
        current = asyncio.current_task()
        for task in list(self._tasks):
            if task is not current:
                task.cancel()
        await asyncio.sleep(0)
        if self.metrics is not None:
            self.metrics.close()
        self._stopped.set()

    def reload(self, settings: Settings) -> None:
        """Apply a new configuration without dropping connected clients.

        Pool sizes, limits and timeouts take effect at once (surplus idle servers close at the next
        janitor pass); added databases accept logins; removed ones refuse new logins while their
        connected clients finish; a changed upstream gets fresh servers as the old ones come back.
        Listeners are bound at start and need a restart to change.
        """
        if [l.model_dump() for l in settings.all_listeners()] != [l.model_dump() for l in self.settings.all_listeners()]:
            log.warning("reload: listener changes need a restart; keeping the current listeners")
        self.settings = settings
        self.admission.max_client_conn = settings.max_client_conn
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
                self._databases[name] = _Database(name, db_settings, upstream, ServerBudget(limit))
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
        log.info("configuration reloaded")

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    def reload_from_source(self) -> str | None:
        """Reload from where the settings came from (SIGHUP, admin RELOAD); returns why not, or None."""
        if self.reload_settings is None:
            return "pgmux was started without a configuration source to reload from"
        try:
            new_settings = self.reload_settings()
        except Exception as exc:  # an invalid file must never take the running pooler down
            log.error("reload refused, keeping the current configuration: %s", exc)
            return str(exc)
        self.reload(new_settings)
        return None

    # ---- the periodic stats line (PgBouncer's "stats: ...") ---------------------------------------

    async def _run_stats(self) -> None:
        """Every stats_period: record totals for SHOW STATS averages and log the line (off when 0)."""
        while True:
            await asyncio.sleep(self.settings.stats_period or 60.0)
            averages = self.stats_window.tick(self.totals_by_database(), time.monotonic())
            if self.settings.stats_period:
                log.info("%s", stats_log_line(averages))

    def totals_by_database(self) -> dict[str, Totals]:
        """Each database's running totals, including those of its pools dropped as unused."""
        return self.database_totals.by_database((pool.key.database, pool.stats) for pool in self.pools.values())

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
        """Servers of ``database`` still lent, being reset, canceled or logging in: what PAUSE waits for."""
        return sum(len(pool.active) + len(pool.resetting) + len(pool.login) + len(pool.being_canceled)
                   for pool in self._pools_of(database))

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

    def kill(self, database: str | None) -> None:
        """Drop every client and server of ``database`` (None: all) now; new clients wait for RESUME."""
        names = [database] if database is not None else self.database_names()
        log.info("KILL %s: closing its clients and servers", database or "(all databases)")
        self.paused.update(names)
        for client in list(self.clients):
            if client.state is not ClientState.ADMIN and client.database in names:
                client.fail(errors.killed_by_admin(client.database))
        for pool in self._pools_of(database):
            db = self._databases.get(pool.key.database)
            if db is not None:
                pool.reconfigure(self._pool_config(db, pool.config.upstream))
            pool.close_all("KILL on the admin console")


async def run(settings: Settings, on_ready: Any = None, reload_settings: Callable[[], Settings] | None = None) -> None:
    """Serve until SIGTERM (drain) or SIGINT (fast stop); SIGHUP reloads via ``reload_settings``."""
    proxy = Proxy(settings)
    proxy.reload_settings = reload_settings
    await proxy.start()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, lambda: proxy.spawn(proxy.stop(graceful=True), name="shutdown"))
    loop.add_signal_handler(signal.SIGINT, lambda: proxy.spawn(proxy.stop(graceful=False), name="shutdown"))
    if reload_settings is not None:
        def on_hangup() -> None:
            log.info("SIGHUP: reloading the configuration")
            proxy.reload_from_source()

        loop.add_signal_handler(signal.SIGHUP, on_hangup)
    if on_ready is not None:
        on_ready(proxy)
    await proxy.wait_stopped()
    log.info("pgmux stopped")
