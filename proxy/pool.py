"""Pool: the backend connections of one (database, user) — idle LIFO, active set, FIFO waiters, limits, upkeep."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from proxy.logs import get_logger
from proxy.protocol import errors
from proxy.protocol.errors import PgError
from proxy.protocol.messages import TransactionStatus
from proxy.server import InternalQueryFailed, ServerConnection, ServerLoginError, ServerState
from proxy.settings import Upstream
from proxy.stats import PoolStats

log = get_logger("pool")

_MAX_LOGIN_BACKOFF = 2.0  # seconds between failed logins at most


@dataclass(frozen=True)
class PoolKey:
    database: str
    user: str

    def __str__(self) -> str:
        return f"{self.database}/{self.user}"


@dataclass(frozen=True)
class PoolConfig:
    """The settings one pool runs by, resolved from the global settings and its database's overrides."""

    upstream: Upstream
    pool_size: int
    min_pool_size: int
    reserve_pool_size: int
    reserve_pool_timeout: float
    query_wait_timeout: float
    max_wait_clients: int
    server_idle_timeout: float
    server_lifetime: float
    server_connect_timeout: float
    server_login_retry: float
    server_reset_query: str


class ServerBudget:
    """Counts backends across the pools that share a limit (max_db_connections / max_user_connections)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit  # 0 means unlimited
        self.used = 0
        self.pools: list[Pool] = []

    def has_room(self) -> bool:
        return not self.limit or self.used < self.limit

    def make_room_for(self, requester: "Pool", wanted: int) -> None:
        """At the limit with clients waiting in ``requester``: close idle servers of the other pools.

        Servers already closing will free their slots soon, so only the shortfall is evicted; the
        slot reaches the requester through freed() once the socket is gone.
        """
        closing = sum(len(pool.closing) for pool in self.pools)
        for pool in self.pools:
            while pool is not requester and pool.idle and closing < wanted:
                pool.close_server(pool.idle[0], f"max connections reached: room needed for pool {requester.key}")
                closing += 1

    def freed(self) -> None:
        self.used -= 1
        for pool in self.pools:
            if pool.waiters:
                pool.grow()
                if not self.has_room():
                    return


class Waiter:
    """A client waiting in line for a server; handing a server to one that gave up is impossible."""

    __slots__ = ("future", "since")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.future: asyncio.Future[ServerConnection] = loop.create_future()
        self.since = time.monotonic()

    def give(self, server: ServerConnection) -> bool:
        if self.future.done():
            return False
        self.future.set_result(server)
        return True

    def handed_over(self) -> ServerConnection | None:
        """The server given to this waiter, if one was, even though it stopped waiting."""
        future = self.future
        if future.done() and not future.cancelled() and future.exception() is None:
            return future.result()
        return None

    def fail(self, error: PgError) -> None:
        if not self.future.done():
            self.future.set_exception(error)


class Pool:
    """Lends servers to clients; never holds more than pool_size (+ reserve) backends."""

    def __init__(self, key: PoolKey, config: PoolConfig, budgets: tuple[ServerBudget, ...],
                 spawn: Callable[..., asyncio.Task[None]]) -> None:
        self.key = key
        self.config = config
        self.idle: deque[ServerConnection] = deque()
        self.active: set[ServerConnection] = set()
        self.login: set[ServerConnection] = set()
        self.resetting: set[ServerConnection] = set()
        self.closing: set[ServerConnection] = set()
        self._sets = {ServerState.ACTIVE: self.active, ServerState.LOGIN: self.login,
                      ServerState.RESETTING: self.resetting, ServerState.CLOSING: self.closing}
        self.waiters: deque[Waiter] = deque()
        self.server_params: dict[str, str] | None = None  # what a fresh server reports; clients start from these
        self._budgets = budgets
        for budget in budgets:
            budget.pools.append(self)
        self._spawn = spawn
        self._reserve_open = False
        self._retry_at = 0.0  # no new logins before this (monotonic) time after a failed one
        self._failures = 0  # consecutive failed logins
        self._down_since = 0.0  # when the current run of failed logins began
        self._permanent_failure = False  # the last failure will not heal by itself (auth, no such database)
        self._generation_started = 0.0  # servers created before this are retired when they come back
        self.last_connect_error: str | None = None
        self.stats = PoolStats()

    def __repr__(self) -> str:
        return f"<Pool {self.key} idle={len(self.idle)} active={len(self.active)} login={len(self.login)} waiting={len(self.waiters)}>"

    @property
    def total(self) -> int:
        return len(self.idle) + len(self.active) + len(self.login) + len(self.resetting) + len(self.closing)

    @property
    def limit(self) -> int:
        return self.config.pool_size + (self.config.reserve_pool_size if self._reserve_open else 0)

    # ---- the one place server states change --------------------------------------------------

    def _move(self, server: ServerConnection, state: ServerState) -> None:
        old = server.state
        if old is ServerState.IDLE:
            self.idle.remove(server)
        elif old in self._sets:
            self._sets[old].discard(server)
        server.state = state
        if state is ServerState.IDLE:
            server.idle_since = time.monotonic()
            self.idle.append(server)  # a deque: LIFO order matters for idle servers only
        elif state in self._sets:
            self._sets[state].add(server)

    # ---- acquire / release ----------------------------------------------------------------------

    def take_idle(self) -> ServerConnection | None:
        """The fast path: a ready server now, if one is idle and nobody is ahead in line."""
        if self.waiters or not self.idle:
            return None
        self.stats.wait_histogram.observe(0.0)
        server = self.idle.pop()  # LIFO keeps the hottest server busy and lets the rest time out
        # _move would search the deque for it again; it is already out.
        server.state = ServerState.ACTIVE
        self.active.add(server)
        return server

    async def acquire(self) -> ServerConnection:
        """Wait in line (FIFO) for a server; raises PgError 53300 after query_wait_timeout."""
        server = self.take_idle()
        if server is not None:
            return server
        if self.config.max_wait_clients and len(self.waiters) >= self.config.max_wait_clients:
            raise errors.wait_queue_full(str(self.key), len(self.waiters), self.config.max_wait_clients,
                                         len(self.active), self.config.pool_size)
        loop = asyncio.get_running_loop()
        waiter = Waiter(loop)
        self.waiters.append(waiter)
        reserve_timer = None
        if self.config.reserve_pool_size:
            reserve_timer = loop.call_later(self.config.reserve_pool_timeout, self._open_reserve)
        self.grow()
        if self._failing_fast():
            self.waiters.remove(waiter)
            raise errors.upstream_unavailable(self.config.upstream.redacted(), self.last_connect_error or "")
        timeout = self.config.query_wait_timeout
        try:
            async with asyncio.timeout(timeout or None):
                return await waiter.future
        except TimeoutError:
            server = waiter.handed_over()
            if server is not None:
                return server  # handed over in the very tick the timeout struck: use it
            raise errors.wait_timeout(str(self.key), timeout, len(self.active), len(self.waiters) - 1,
                                      self.config.pool_size) from None
        except asyncio.CancelledError:
            # Cancelled just as a server was handed over: give it back rather than lose it.
            server = waiter.handed_over()
            if server is not None:
                self.release(server)
            raise
        finally:
            waited = time.monotonic() - waiter.since
            self.stats.wait_time += waited
            self.stats.wait_histogram.observe(waited)
            if reserve_timer is not None:
                reserve_timer.cancel()
            try:
                self.waiters.remove(waiter)
            except ValueError:
                pass

    def release(self, server: ServerConnection) -> None:
        """Take back a server that is known clean (idle, no transaction, nothing pending)."""
        if server.state in (ServerState.CLOSING, ServerState.CLOSED):
            return
        server.client = None
        if self.config.server_lifetime and time.monotonic() - server.created_at > self.config.server_lifetime:
            self.close_server(server, "server_lifetime reached")
            return
        if self.will_retire(server):
            self.close_server(server, "retired (RECONNECT or a changed upstream)")
            return
        if self.total - len(self.closing) > self.limit:
            self.close_server(server, "pool is over its size (lowered by reload)")
            return
        while self.waiters:
            waiter = self.waiters.popleft()
            if waiter.give(server):
                if server.state is not ServerState.ACTIVE:
                    self._move(server, ServerState.ACTIVE)
                return
        if self._budget_wanted_elsewhere():
            self.close_server(server, "another pool of the database needs the connection")
            return
        self._move(server, ServerState.IDLE)
        if not self.waiters:
            self._reserve_open = False

    def _budget_wanted_elsewhere(self) -> bool:
        for budget in self._budgets:
            if not budget.has_room() and any(p.waiters for p in budget.pools if p is not self):
                return True
        return False

    def reset_and_release(self, server: ServerConnection, statements: list[str], reason: str) -> None:
        """Clean a server (ROLLBACK, then DISCARD ALL) in the background; close it if that fails."""
        server.client = None
        self._move(server, ServerState.RESETTING)

        async def reset() -> None:
            try:
                # One query each: DISCARD ALL refuses to run inside the implicit block of a multi-statement query.
                for sql in statements:
                    await server.run_internal(sql)
                if server.tx_status is not TransactionStatus.IDLE:
                    raise InternalQueryFailed(f"server still in a transaction after {statements}")
            except InternalQueryFailed as exc:
                self.close_server(server, f"{reason}: reset failed: {exc}")
                return
            self.release(server)

        self._spawn(reset(), name=f"reset {server.id}")

    def close_server(self, server: ServerConnection, reason: str) -> None:
        """Start closing a server; it leaves the pool's counts only once its socket is gone (server_lost)."""
        if server.state in (ServerState.CLOSING, ServerState.CLOSED):
            return
        log.info("closing server: %s", reason, extra={"conn": server.id})
        self._move(server, ServerState.CLOSING)
        server.close(reason)

    def server_lost(self, server: ServerConnection) -> None:
        """Called by the server itself once its connection is gone, whatever the cause."""
        for collection in self._sets.values():
            collection.discard(server)
        try:
            self.idle.remove(server)
        except ValueError:
            pass
        for budget in self._budgets:
            budget.freed()
        if server.client is not None:
            server.client.on_server_lost(server)
            server.client = None
        log.info("server connection ended: %s", server.close_reason, extra={"conn": server.id})
        if self.waiters:
            self.grow()

    # ---- growing ---------------------------------------------------------------------------------

    def _open_reserve(self) -> None:
        if self.waiters and self.config.reserve_pool_size:
            self._reserve_open = True
            log.info("pool %s: opening the reserve pool (%d waiting)", self.key, len(self.waiters))
            self.grow()

    def grow(self) -> None:
        """Open servers for the clients in line, within every limit."""
        while len(self.waiters) > len(self.login) and self._has_room():
            self._start_connect()
        wanted = len(self.waiters) - len(self.login)
        if wanted > 0 and self.total < self.limit and not self._in_login_backoff():
            for budget in self._budgets:
                if not budget.has_room():
                    budget.make_room_for(self, wanted)

    def _has_room(self) -> bool:
        return (self.total < self.limit and all(budget.has_room() for budget in self._budgets)
                and not self._in_login_backoff())

    def _in_login_backoff(self) -> bool:
        return time.monotonic() < self._retry_at

    def _failing_fast(self) -> bool:
        """Whether clients should be told now that the upstream is unavailable, rather than wait.

        A restart or failover takes seconds: while a pool that has worked before sees its upstream
        refuse for less than server_login_retry, clients keep waiting and logins are retried with a
        short backoff. A pool that never logged in, a refusal that will not heal by itself (wrong
        password, missing database), or an outage older than server_login_retry fails them at once.
        """
        if not self._failures or self.idle or self.active or self.resetting:
            return False
        if any(server.transport is None or not server.transport.is_closing() for server in self.login):
            return False  # a login is still under way: its outcome decides
        outage = time.monotonic() - self._down_since
        return self._permanent_failure or self.server_params is None or outage >= self.config.server_login_retry

    def _start_connect(self) -> None:
        server = ServerConnection(self.config.upstream, self.server_lost)
        self._move(server, ServerState.LOGIN)
        for budget in self._budgets:
            budget.used += 1
        self._spawn(self._connect(server), name=f"connect {server.id}")

    async def _connect(self, server: ServerConnection) -> None:
        try:
            await server.login(self.config.server_connect_timeout)
        except ServerLoginError as exc:
            self._login_failed(exc)
            return
        if server.state is not ServerState.LOGIN:
            return  # lost or closed while logging in; server_lost has done the bookkeeping
        self.stats.server_connects += 1
        self._failures = 0
        if self.server_params is None:
            self.server_params = dict(server.params)
        log.info("server connected to %s", self.config.upstream.redacted(), extra={"conn": server.id})
        self._move(server, ServerState.ACTIVE)  # release() files it as idle or hands it to a waiter
        self.release(server)

    def _login_failed(self, exc: ServerLoginError) -> None:
        self.stats.server_connect_failures += 1
        self.last_connect_error = exc.reason
        now = time.monotonic()
        if not self._failures:
            self._down_since = now
        self._failures += 1
        self._permanent_failure = bool(exc.sqlstate) and exc.sqlstate[:2] in ("28", "3D", "42")
        log.warning("pool %s: could not log in to %s: %s", self.key, self.config.upstream.redacted(),
                    exc.reason)
        # Retry soon, then less often: 0.25 s doubling up to 2 s, so a returning upstream is noticed fast.
        backoff = min(0.25 * 2 ** (self._failures - 1), _MAX_LOGIN_BACKOFF)
        self._retry_at = now + backoff
        asyncio.get_running_loop().call_later(backoff, self.grow)
        if self._failing_fast():
            error = errors.upstream_unavailable(self.config.upstream.redacted(), exc.reason)
            while self.waiters:
                self.waiters.popleft().fail(error)

    def retire_servers(self, reason: str) -> None:
        """Close every server as it is next released (admin RECONNECT, changed upstream); idle ones now."""
        self._generation_started = time.monotonic()
        for server in list(self.idle):
            self.close_server(server, reason)

    def will_retire(self, server: ServerConnection) -> bool:
        return server.created_at < self._generation_started

    async def warm_up(self) -> None:
        """Make sure the pool knows the server's parameters (needed for a client's welcome)."""
        if self.server_params is not None:
            return
        server = await self.acquire()
        self.release(server)

    # ---- upkeep ------------------------------------------------------------------------------------

    def reconfigure(self, config: PoolConfig) -> None:
        """Take new settings; servers of a changed upstream are replaced as they come back idle."""
        if config.upstream != self.config.upstream:
            self.retire_servers("upstream changed by reload")
        self.config = config
        self._trim()
        self.grow()

    def _trim(self) -> None:
        """Close idle servers beyond the pool's limit (after pool_size was lowered)."""
        while self.idle and self.total - len(self.closing) > self.limit:
            self.close_server(self.idle[0], "pool_size lowered")

    def maintain(self, now: float) -> None:
        """Janitor work: drop servers idle or alive too long, keep min_pool_size warm."""
        config = self.config
        keep = config.min_pool_size
        self._trim()
        for server in list(self.idle):
            if config.server_lifetime and now - server.created_at > config.server_lifetime:
                self.close_server(server, "server_lifetime reached")
            elif (config.server_idle_timeout and now - server.idle_since > config.server_idle_timeout
                  and self.total > keep):
                self.close_server(server, "server_idle_timeout reached")
        while self.total < keep and self._has_room():
            self._start_connect()

    def close_all(self, reason: str) -> None:
        for server in [*self.idle, *self.active, *self.login, *self.resetting]:
            self.close_server(server, reason)
