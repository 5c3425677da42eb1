"""Pool: the backend connections of one (database, user) — idle LIFO, active set, FIFO waiters, limits, upkeep."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass
from typing import Final, Generic, Protocol, TypeVar

from mypy_extensions import trait

from proxy.login import Welcome
from proxy.logs import get_logger
from proxy.parameters import SYNCED_PARAMETERS, ParameterSets, check_sql
from proxy.protocol import errors
from proxy.protocol.errors import PgError
from proxy.protocol.messages import TransactionStatus
from proxy.server import Backends, InternalQueryFailed, ServerConnection, ServerLoginError
from proxy.settings import Upstream
from proxy.states import ServerState
from proxy.stats import PoolStats

# Final, so that compiled code reads it as a C static: time.monotonic is a module attribute lookup per call
# (about a third of a microsecond, and a transaction reads the clock five to eight times).
_monotonic: Final = time.monotonic

log = get_logger("pool")

_MAX_LOGIN_BACKOFF = 2.0  # seconds between failed logins at most
# A graceful close (Terminate, then the write buffer drained) takes one round trip to a healthy
# backend; one still pending after this long never ends by itself, and the janitor aborts it.
SERVER_CLOSE_DEADLINE: Final = 5.0
_MAX_ACCEPTED_SETTINGS = 1024  # (name, value) pairs remembered per pool; clients choose them, so bounded


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

    def __init__(self, limit: int, scope: tuple[str, ...]) -> None:
        self.limit = limit  # 0 means unlimited
        self.scope = scope  # what the limit is on, e.g. ("database", "shop"): its name in a BackendLedger
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


class BackendLedger(Protocol):
    """The backends other processes open under the same limits (``workers = N``: proxy/slots.py).

    A pool asks it before opening a backend and tells it when one ends, never per transaction; it may ask
    the pool to let backends go (``Pool.lend``) for another process's waiting clients, and calls ``Pool.grow``
    again when room appears after a refusal.
    """

    def claim(self, pool: "Pool") -> bool:
        """Count one more backend of ``pool`` against each of its limits (``Pool.limits``) if every one has
        room for the whole pgmux; False: not now."""

    def unclaim(self, pool: "Pool") -> None:
        """One of ``pool``'s backends has ended."""

    def reconfigured(self, pool: "Pool") -> None:
        """``pool``'s limits may have changed (reload, PAUSE)."""


@trait
class InLine:
    """What waits in a pool's line (a client's transaction, a session-mode login, pgmux's own ``acquire``).

    A trait, not a pair of callbacks: compiled, the calls stay native, and a wait makes no bound methods
    (at 50 clients on a pool of 20 most transactions wait).
    """

    def server_ready(self, server: ServerConnection, now: float = 0.0) -> None:
        """``server`` is now this one's (``now``: the monotonic clock as the pool read it, 0 when it did not)."""
        raise NotImplementedError

    def server_refused(self, error: PgError) -> None:
        """No server came: ``error`` is query_wait_timeout's 53300, or the upstream is down (login failures)."""
        raise NotImplementedError


class Waiter:
    """A place in line for a server. The pool settles it exactly once: a server, or a refusal.

    Settled by calls, not through a future and a task: a task per wait was a large share of pgmux's CPU per
    transaction.
    """

    __slots__ = ("in_line", "since", "deadline", "settled")

    def __init__(self, in_line: InLine, since: float, deadline: float) -> None:
        self.in_line = in_line
        self.since = since
        self.deadline = deadline  # monotonic time of the wait timeout; inf when there is none
        self.settled = False


_Item = TypeVar("_Item")


class WaitLine(Generic[_Item]):
    """A pool's waiters, first come first served: a list and the index of its first live entry.

    Not a deque: compiled, a deque's append and popleft are method calls by name (about 220 instructions
    each, and a waiting transaction makes both), where a list's are native. What was taken from the head is
    dropped when the line empties, or once it is half the list (amortised O(1), and a bounded number of
    served waiters kept meanwhile).
    """

    __slots__ = ("_items", "_head")

    def __init__(self, waiters: Iterable[_Item] = ()) -> None:
        self._items: list[_Item] = list(waiters)
        self._head = 0

    def __len__(self) -> int:
        return len(self._items) - self._head

    def __bool__(self) -> bool:
        return len(self._items) > self._head

    def __iter__(self) -> Iterator[_Item]:
        return iter(self._items[self._head:])

    def first(self) -> _Item:
        """The waiter that came first (the line must not be empty)."""
        return self._items[self._head]

    def append(self, waiter: _Item) -> None:
        self._items.append(waiter)

    def pop(self) -> _Item:
        """The waiter that came last, out of the line."""
        waiter = self._items.pop()
        self._compact()
        return waiter

    def popleft(self) -> _Item:
        """The waiter that came first, out of the line."""
        waiter = self._items[self._head]
        self._head += 1
        self._compact()
        return waiter

    def remove(self, waiter: _Item) -> None:
        del self._items[self._items.index(waiter, self._head)]
        self._compact()

    def _compact(self) -> None:
        head = self._head
        if not head:
            return
        items = self._items
        if head == len(items):
            items.clear()
            self._head = 0
        elif head >= 32 and 2 * head >= len(items):
            del items[:head]
            self._head = 0


class _Acquisition(InLine):
    """pgmux's own wait for a server, as a future (Pool.acquire)."""

    def __init__(self, pool: Pool, future: asyncio.Future[ServerConnection]) -> None:
        self.pool = pool
        self.future = future

    def server_ready(self, server: ServerConnection, now: float = 0.0) -> None:
        if self.future.done():
            self.pool.release(server)  # cancelled while the server was on its way
        else:
            self.future.set_result(server)

    def server_refused(self, error: PgError) -> None:
        if not self.future.done():
            self.future.set_exception(error)


class Pool:
    """Lends servers to clients; never holds more than pool_size (+ reserve) backends."""

    def __init__(self, key: PoolKey, config: PoolConfig, budgets: tuple[ServerBudget, ...],
                 spawn: Callable[..., asyncio.Task[None]], backends: Backends,
                 ledger: BackendLedger | None = None) -> None:
        self.key = key
        self.config = config
        self._backends = backends  # every pool's, by upstream address and pid (NOTIFY senders)
        # Oldest first; taken from the end (LIFO). A list: its append and pop are compiled operations, a deque's
        # are method calls by name, and a pool's idle servers are few.
        self.idle: list[ServerConnection] = []
        self.active: set[ServerConnection] = set()
        self.login: set[ServerConnection] = set()
        self.resetting: set[ServerConnection] = set()
        self.closing: set[ServerConnection] = set()
        self.being_canceled: set[ServerConnection] = set()  # back from their client, waiting for its cancels
        self.waiters: WaitLine[Waiter] = WaitLine()
        self.server_params: dict[str, str] | None = None  # what a fresh server reports; clients start from these
        self._synced_of: dict[str, str] | None = None  # the server_params _synced_defaults was made from
        self._synced_defaults: dict[str, str] = {}
        # Startup settings PostgreSQL accepted here, each with the value as PostgreSQL reports it: a login
        # using only these needs no check. Cleared whenever a sync fails or the upstream changes, so it is
        # never trusted across a failure.
        self.accepted_settings: dict[tuple[str, str], str] = {}
        self.welcome = Welcome()  # what ends its clients' logins, prebuilt
        self.parameter_sets = ParameterSets()  # its clients' parameter dicts, shared
        self._budgets = budgets
        for budget in budgets:
            budget.pools.append(self)
        self._ledger = ledger  # None: this process's backends are all there are
        # Backends to let go as they come back, for another process's waiting clients (see lend).
        self.owed = 0
        self._spawn = spawn
        self._loop = asyncio.get_running_loop()  # pools are made inside the loop; looking it up costs a getpid()
        self._reserve_open = False
        self._wait_timer: asyncio.TimerHandle | None = None
        self._deadlines_unordered = False  # a reload changed query_wait_timeout while clients waited
        self._retry_at = 0.0  # no new logins before this (monotonic) time after a failed one
        self._failures = 0  # consecutive failed logins
        self._down_since = 0.0  # when the current run of failed logins began
        self._permanent_failure = False  # the last failure will not heal by itself (auth, no such database)
        self._generation_started = 0.0  # servers created before this are retired when they come back
        self.last_connect_error: str | None = None
        self.stats = PoolStats()
        self.clients = 0  # authenticated clients using this pool (the proxy counts them in and out)
        self.unused_since = 0.0  # when the janitor first saw it without clients, servers or waiters

    def __repr__(self) -> str:
        return f"<Pool {self.key} idle={len(self.idle)} active={len(self.active)} login={len(self.login)} waiting={len(self.waiters)}>"

    @property
    def total(self) -> int:
        return (len(self.idle) + len(self.active) + len(self.login) + len(self.resetting) + len(self.closing)
                + len(self.being_canceled))

    def in_state(self, state: ServerState) -> Collection[ServerConnection]:
        """The servers in ``state`` now (CLOSED: none, the pool has let go of them)."""
        if state is ServerState.IDLE:
            return self.idle
        found = self._set_of(state)
        return found if found is not None else ()

    def _set_of(self, state: ServerState) -> set[ServerConnection] | None:
        """The set that holds the servers in ``state``; None for IDLE (a list) and CLOSED (none). Compared, not
        looked up in a dict: that costs two dict operations per transaction."""
        if state is ServerState.ACTIVE:
            return self.active
        if state is ServerState.LOGIN:
            return self.login
        if state is ServerState.RESETTING:
            return self.resetting
        if state is ServerState.CLOSING:
            return self.closing
        if state is ServerState.BEING_CANCELED:
            return self.being_canceled
        return None

    def oldest_wait(self, now: float) -> float:
        """Seconds the first client in line has waited (PgBouncer's maxwait)."""
        return max(0.0, now - self.waiters.first().since) if self.waiters else 0.0

    @property
    def limit(self) -> int:
        return self.config.pool_size + (self.config.reserve_pool_size if self._reserve_open else 0)

    def limits(self) -> list[tuple[tuple[str, ...], int]]:
        """Every limit its backends count against, by scope: the pool's own size, then its budgets' (0: none)."""
        own: tuple[str, ...] = ("pool", self.key.database, self.key.user)
        return [(own, self.limit), *((budget.scope, budget.limit) for budget in self._budgets)]

    # ---- the one place server states change --------------------------------------------------

    def _move(self, server: ServerConnection, state: ServerState, now: float = 0.0) -> None:
        old = server.state
        if old is ServerState.IDLE:
            self.idle.remove(server)
        else:
            before = self._set_of(old)
            if before is not None:
                before.discard(server)
        server.state = state
        if state is ServerState.IDLE:
            server.idle_since = now or _monotonic()
            self.idle.append(server)
        else:
            after = self._set_of(state)
            if after is not None:
                after.add(server)

    # ---- acquire / release ----------------------------------------------------------------------

    def take_idle(self) -> ServerConnection | None:
        """The fast path: a ready server now, if one is idle and nobody is ahead in line."""
        if self.waiters or not self.idle:
            return None
        self.stats.wait_histogram.observe(0.0)
        server = self.idle.pop()  # LIFO keeps the hottest server busy and lets the rest time out
        # _move would search the list for it again; it is already out.
        server.state = ServerState.ACTIVE
        self.active.add(server)
        return server

    def wait(self, in_line: InLine, now: float = 0.0) -> Waiter:
        """Join the line (FIFO) for a server; raises PgError 53300 when the line is full or the upstream down.

        Exactly one of ``in_line``'s methods runs later, never inside this call: ``server_ready`` with a server
        that is now its own, or ``server_refused`` with a 53300 after query_wait_timeout. Both come from the
        event loop, except that ``server_ready`` may run inside the ``release`` of a server whose last read the
        compiled relay delivered whole (see _hand_over).
        """
        config = self.config
        if config.max_wait_clients and len(self.waiters) >= config.max_wait_clients:
            raise errors.wait_queue_full(str(self.key), len(self.waiters), config.max_wait_clients,
                                         len(self.active), config.pool_size)
        now = now or _monotonic()
        deadline = now + config.query_wait_timeout if config.query_wait_timeout else math.inf
        waiter = Waiter(in_line, now, deadline)
        self.waiters.append(waiter)
        if self._wait_timer is None:
            self._arm_wait_timer()
        if len(self.waiters) > len(self.login) and self.total < self.limit:
            self.grow()  # below the limit with more waiting than logging in: worth a new server
        if self._failing_fast():
            self.waiters.pop()
            raise errors.upstream_unavailable(self.last_connect_error or "")
        return waiter

    def cancel_wait(self, waiter: Waiter) -> None:
        """The client left the line (it disconnected): it gets neither callback."""
        if waiter.settled:
            return
        self._settle(waiter)
        self.waiters.remove(waiter)

    async def acquire(self) -> ServerConnection:
        """Wait for a server as a coroutine (pgmux's own use; clients use ``wait``)."""
        server = self.take_idle()
        if server is not None:
            return server
        future: asyncio.Future[ServerConnection] = self._loop.create_future()
        waiter = self.wait(_Acquisition(self, future))
        try:
            return await future
        except asyncio.CancelledError:
            self.cancel_wait(waiter)
            raise

    def _settle(self, waiter: Waiter, now: float = 0.0) -> None:
        waiter.settled = True
        waited = (now or _monotonic()) - waiter.since
        self.stats.wait_time += waited
        self.stats.wait_histogram.observe(waited)

    def _hand_over(self, waiter: Waiter, server: ServerConnection, now: float) -> None:
        self._settle(waiter, now)
        if server.read_delivered:
            # The compiled relay delivered the whole read that freed the server: the next client may send
            # its request now, from the same wake-up, rather than one loop turn later (at -c 50 on a pool
            # of 20 most transactions pass through here). Once per read: if that client passes the server
            # on, the next hand-over goes through the loop.
            server.read_delivered = False
            waiter.in_line.server_ready(server, now)
        else:
            # Called soon, not now: release() runs inside the previous client's read handler, and bytes
            # behind the ReadyForQuery in that read are still to be delivered to the previous client.
            self._loop.call_soon(waiter.in_line.server_ready, server)

    def _refuse(self, waiter: Waiter, error: PgError) -> None:
        self._settle(waiter)
        self._loop.call_soon(waiter.in_line.server_refused, error)

    # One timer per pool, aimed at the oldest waiter's next event (its wait timeout, or the
    # reserve pool opening): a timer per waiter would cost every queued transaction a heap push.

    def _arm_wait_timer(self) -> None:
        if self._wait_timer is not None:
            self._wait_timer.cancel()
            self._wait_timer = None
        if not self.waiters:
            return
        due = min(waiter.deadline for waiter in self.waiters) if self._deadlines_unordered else self.waiters.first().deadline
        if self.config.reserve_pool_size and not self._reserve_open:
            due = min(due, self.waiters.first().since + self.config.reserve_pool_timeout)
        if due != math.inf:
            self._wait_timer = self._loop.call_at(due, self._on_wait_timer)

    def _on_wait_timer(self) -> None:
        self._wait_timer = None
        now = _monotonic()
        self._expire_waiters(now)
        if (self.waiters and self.config.reserve_pool_size and not self._reserve_open
                and now - self.waiters.first().since >= self.config.reserve_pool_timeout):
            self._open_reserve()
        self._arm_wait_timer()

    def _expire_waiters(self, now: float) -> None:
        """Refuse everyone whose query_wait_timeout has passed; the rest keep their places."""
        expired = [waiter for waiter in self.waiters if waiter.deadline <= now]
        if not expired:
            return
        others = len(self.waiters) - 1
        self.waiters = WaitLine(waiter for waiter in self.waiters if waiter.deadline > now)
        if not self.waiters:
            self._deadlines_unordered = False
        for waiter in expired:
            # Each with the timeout it joined with (a reload may have changed the setting since).
            self._refuse(waiter, errors.wait_timeout(str(self.key), waiter.deadline - waiter.since,
                                                     len(self.active), others, self.config.pool_size))

    def release(self, server: ServerConnection, now: float = 0.0) -> None:
        """Take back a server that is known clean (idle, no transaction, nothing pending). ``now``: the monotonic
        clock, when the caller has just read it (a transaction reads it once at its end, not once per step)."""
        state = server.state
        if state is ServerState.CLOSING or state is ServerState.CLOSED:
            return
        server.client = None
        if server.being_canceled:
            # A cancel for the client it served is still on its way: lent now, it could stop the next
            # client's query. It comes back through _cancel_done.
            self._move(server, ServerState.BEING_CANCELED)
            return
        if server.cancel_failed:
            self.close_server(server, "a cancel request to it was not confirmed: it could stop a later query")
            return
        config = self.config
        now = now or _monotonic()
        if config.server_lifetime and now - server.created_at > config.server_lifetime:
            self.close_server(server, "server_lifetime reached")
            return
        if self.will_retire(server):
            self.close_server(server, "retired (RECONNECT or a changed upstream)")
            return
        if self.total - len(self.closing) > self.limit:
            self.close_server(server, "pool is over its size (lowered by reload)")
            return
        if self.owed:
            self.owed -= 1
            self._yield_to_another_worker(server)
            return
        if self.waiters:
            if server.state is not ServerState.ACTIVE:
                self._move(server, ServerState.ACTIVE)  # before the hand-over: the next client may act on it at once
            self._hand_over(self.waiters.popleft(), server, now)
            return
        if self._budgets and self._budget_wanted_elsewhere():
            self.close_server(server, "another pool of the database needs the connection")
            return
        self._move(server, ServerState.IDLE, now)
        if not self.waiters:
            self._reserve_open = False

    def _budget_wanted_elsewhere(self) -> bool:
        for budget in self._budgets:
            if not budget.has_room() and any(p.waiters for p in budget.pools if p is not self):
                return True
        return False

    def cancel(self, server: ServerConnection) -> None:
        """Have PostgreSQL cancel what ``server`` runs now; until that is done the server is lent to nobody else.

        Done means PostgreSQL closed the cancel connection, after signalling the backend: a query
        the signal then finds is the one it was meant for, or none (an idle backend ignores it).
        """
        server.being_canceled += 1
        self._spawn(self._cancel(server), name=f"cancel {server.id}")

    async def _cancel(self, server: ServerConnection) -> None:
        confirmed = False
        try:
            confirmed = await server.send_cancel(self.config.server_connect_timeout)
        finally:
            self._cancel_done(server, confirmed)

    def _cancel_done(self, server: ServerConnection, confirmed: bool) -> None:
        server.being_canceled -= 1
        if not confirmed:
            server.cancel_failed = True
        if not server.being_canceled and server.state is ServerState.BEING_CANCELED:
            self.release(server)  # idle, to a waiter, or closed if a cancel failed

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
                self.abort_server(server, f"{reason}: reset failed: {exc}")
                return
            self.release(server)

        self._spawn(reset(), name=f"reset {server.id}")

    def close_server(self, server: ServerConnection, reason: str) -> None:
        """Retire a server in a known, clean state: Terminate, then close; it leaves the counts in server_lost."""
        if server.state in (ServerState.CLOSING, ServerState.CLOSED):
            return
        log.info("closing server: %s", reason, extra={"conn": server.id})
        self._start_closing(server)
        server.close(reason)

    def abort_server(self, server: ServerConnection, reason: str) -> None:
        """Drop a server in an unknown state (left mid-query, failed reset, KILL) without a goodbye.

        A graceful close waits for pgmux's queued bytes to reach the backend, which never happens
        while the backend is blocked writing to pgmux. Also ends a graceful close still pending.
        """
        if server.state is ServerState.CLOSED:
            return
        log.info("aborting server: %s", reason, extra={"conn": server.id})
        if server.state is not ServerState.CLOSING:
            self._start_closing(server)
        server.abort(reason)

    def _start_closing(self, server: ServerConnection) -> None:
        server.closing_since = _monotonic()
        self._move(server, ServerState.CLOSING)

    def server_lost(self, server: ServerConnection) -> None:
        """Called by the server itself once its connection is gone, whatever the cause."""
        for collection in (self.active, self.login, self.resetting, self.closing, self.being_canceled):
            collection.discard(server)
        try:
            self.idle.remove(server)
        except ValueError:
            pass
        if self._ledger is not None:
            self._ledger.unclaim(self)  # first: the budgets' freed() grows pools, which claim
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

    def lend(self, count: int) -> None:
        """Let ``count`` backends go for another process's waiting clients: idle ones close now, the rest as
        they come back (instead of going to this pool's next client)."""
        while count and self.idle:
            self._yield_to_another_worker(self.idle[0])
            count -= 1
        self.owed = count

    def _yield_to_another_worker(self, server: ServerConnection) -> None:
        """Close ``server`` so that another worker, whose clients wait at a shared limit, opens one."""
        self.stats.servers_yielded += 1
        self.close_server(server, "another worker's clients need the connection")

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
        """Whether a backend may open now; with a ledger, True has counted it there (the caller opens it)."""
        return (self.total < self.limit and all(budget.has_room() for budget in self._budgets)
                and not self._in_login_backoff() and (self._ledger is None or self._ledger.claim(self)))

    def _in_login_backoff(self) -> bool:
        return _monotonic() < self._retry_at

    def _backoff_over(self, retry_at: float) -> None:
        # The timer itself ends the backoff: uvloop's millisecond timers can fire a little before
        # _monotonic() reaches retry_at, and a grow() that still saw the backoff would leave the
        # clients in line waiting for their timeout. A later failure's longer backoff stays.
        if self._retry_at == retry_at:
            self._retry_at = 0.0
        self.grow()

    def _failing_fast(self) -> bool:
        """Whether clients should be told now that the upstream is unavailable, rather than wait.

        A restart or failover takes seconds: while a pool that has worked before sees its upstream
        refuse for less than server_login_retry, clients keep waiting and logins are retried with a
        short backoff. A pool that never logged in, a refusal that will not heal by itself (wrong
        password, missing database), or an outage older than server_login_retry fails them at once.
        """
        if not self._failures or self.idle or self.active or self.resetting or self.being_canceled:
            return False
        if any(server.transport is None or not server.transport.is_closing() for server in self.login):
            return False  # a login is still under way: its outcome decides
        outage = _monotonic() - self._down_since
        return self._permanent_failure or self.server_params is None or outage >= self.config.server_login_retry

    def _start_connect(self) -> None:
        server = ServerConnection(self.config.upstream, self.server_lost, self.stats, self._backends)
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
        self.last_connect_error = exc.shown
        now = _monotonic()
        if not self._failures:
            self._down_since = now
        self._failures += 1
        self._permanent_failure = exc.sqlstate is not None and exc.sqlstate[:2] in ("28", "3D", "42")
        log.warning("pool %s: could not log in to %s: %s", self.key, self.config.upstream.redacted(),
                    exc.reason)
        # Retry soon, then less often: 0.25 s doubling up to 2 s, so a returning upstream is noticed fast.
        backoff = min(0.25 * 2 ** (self._failures - 1), _MAX_LOGIN_BACKOFF)
        self._retry_at = now + backoff
        self._loop.call_later(backoff, self._backoff_over, self._retry_at)
        if self._failing_fast():
            error = errors.upstream_unavailable(exc.shown)
            while self.waiters:
                self._refuse(self.waiters.popleft(), error)

    def retire_servers(self, reason: str) -> None:
        """Close every server as it is next released (admin RECONNECT, changed upstream); idle ones now.

        Servers already closing are aborted: a close still pending must not outlive a RECONNECT.
        """
        self._generation_started = _monotonic()
        self.accepted_settings.clear()  # the new upstream may not accept what the old one did
        for server in list(self.closing):
            self.abort_server(server, reason)
        for server in list(self.idle):
            self.close_server(server, reason)

    def will_retire(self, server: ServerConnection) -> bool:
        return server.created_at < self._generation_started

    async def check_settings(self, settings: dict[str, str]) -> None:
        """Ask PostgreSQL on one of this pool's backends whether it accepts these settings; raises its refusal."""
        server = await self.acquire()
        reported = self.server_params or {}
        try:
            await server.run_internal(check_sql(settings, reported))
        except InternalQueryFailed as failed:
            if failed.fields is not None and server.tx_status is TransactionStatus.IDLE:
                self.release(server)  # the refused statement was rolled back: the backend is as it was
                raise errors.parameter_refused_by_server(failed.fields, "startup_parameter_refused") from None
            # The log names what failed; the client is told no more than for any other upstream failure.
            self.abort_server(server, f"checking startup parameters failed: {failed}")
            raise errors.upstream_unavailable("checking the startup parameters on the server failed") from None
        except BaseException:
            self.abort_server(server, "checking startup parameters was interrupted")
            raise
        # A reported setting was set for the session: the backend's value is now PostgreSQL's spelling of it
        # (unreported if it was already that value: the backend's value was then the same already).
        spelled = {(name, value): server.params.get(name, value) if name in reported else value
                   for name, value in settings.items()}
        self.release(server)
        if len(self.accepted_settings) + len(settings) > _MAX_ACCEPTED_SETTINGS:
            self.accepted_settings.clear()
        self.accepted_settings.update(spelled)

    def synced_defaults(self) -> dict[str, str]:
        """The server's parameters that clients are kept in step with (SYNCED_PARAMETERS): where each client's
        own start. Picked out once per server_params (replaced, never changed in place), not per login."""
        server_params = self.server_params
        if server_params is not self._synced_of:
            self._synced_of = server_params
            self._synced_defaults = {k: v for k, v in (server_params or {}).items() if k in SYNCED_PARAMETERS}
        return self._synced_defaults

    def spelled(self, name: str, value: str) -> str:
        """A startup setting's value as PostgreSQL reports it (``utf8``: ``UTF8``), once checked here."""
        return self.accepted_settings.get((name, value), value)

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
        if config.query_wait_timeout != self.config.query_wait_timeout and self.waiters:
            self._deadlines_unordered = True  # those waiting keep the timeout they joined with
        self.config = config
        if self._ledger is not None:
            self._ledger.reconfigured(self)
        self._trim()
        self._arm_wait_timer()
        self.grow()

    def _trim(self) -> None:
        """Close idle servers beyond the pool's limit (after pool_size was lowered)."""
        while self.idle and self.total - len(self.closing) > self.limit:
            self.close_server(self.idle[0], "pool_size lowered")

    def maintain(self, now: float) -> None:
        """Janitor work: drop servers idle or alive too long, end overdue closes, keep min_pool_size warm."""
        config = self.config
        keep = config.min_pool_size
        self._trim()
        for server in list(self.closing):
            if now - server.closing_since > SERVER_CLOSE_DEADLINE:
                self.abort_server(server, f"still closing after {SERVER_CLOSE_DEADLINE:g}s")
        for server in list(self.idle):
            if config.server_lifetime and now - server.created_at > config.server_lifetime:
                self.close_server(server, "server_lifetime reached")
            elif (config.server_idle_timeout and now - server.idle_since > config.server_idle_timeout
                  and self.total > keep):
                self.close_server(server, "server_idle_timeout reached")
        while self.total < keep and self._has_room():
            self._start_connect()

    def leave_budgets(self) -> None:
        """The pool is being dropped: the budgets it shared stop counting it among their pools."""
        for budget in self._budgets:
            budget.pools.remove(self)

    def close_all(self, reason: str) -> None:
        """Close every server now (shutdown, KILL): idle ones gracefully; the rest, and pending closes, aborted."""
        unknown_state = [*self.active, *self.login, *self.resetting, *self.being_canceled, *self.closing]
        for server in list(self.idle):
            self.close_server(server, reason)
        for server in unknown_state:
            self.abort_server(server, reason)
