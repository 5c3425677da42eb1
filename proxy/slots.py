"""The slot table: how many backends each worker holds, and how many of its clients wait, under each limit.

With ``workers = N`` a pool's size, ``max_db_connections`` and ``max_user_connections`` hold for the whole
pgmux, not per worker: a worker opens a backend only while the whole pgmux is under every limit the backend
counts against, and a worker whose clients wait at a limit that other workers fill gets backends from them
(their idle ones close at once, busy ones as they come back). While clients of several workers wait under a
limit, each worker grows only up to its fair share of it (``share``), so no worker's clients starve.

The supervisor makes the table before forking the workers: an anonymous shared memory map, a lock file
(``fcntl.lockf``: the kernel drops a lock with the process holding it, so a crash cannot leave the table
locked) and a doorbell pipe per worker, which others ring when something changed that it may be waiting for.
When a worker dies, the supervisor zeroes its column (its backends died with it) before starting the next.

The table is read and written only as backends open and end and as clients start or stop waiting at a limit,
never per transaction. Its rows are found by a hash of their scope (a pool's database and user, a database, a
user) among a fixed number of rows; a row whose cells are all zero is free, so whatever a dead worker was
writing is gone once its column is zeroed.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import mmap
import os
import tempfile
from array import array
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any, Final

from proxy.logs import get_logger

if TYPE_CHECKING:
    from proxy.pool import Pool

log = get_logger("slots")

ROWS: Final = 16384  # scopes with backends or waiting clients at once: pools, databases and users
_PROBES: Final = 32  # rows a scope may sit in, from the one its hash names: past them the table is full for it
_KEY_INTS: Final = 4  # a row's scope, as 16 bytes of its hash
_HEADER_INTS: Final = 4  # [0]: how many cells say that clients wait (a hint read without the lock)

Scope = tuple[str, ...]


def share(limit: int, workers: int, worker: int) -> int:
    """Worker ``worker``'s part of ``limit`` (0: unlimited stays unlimited); the parts add up to ``limit``."""
    if not limit:
        return 0
    return limit // workers + (1 if worker < limit % workers else 0)


def may_open(limit: int, total: int, mine: int, others_waiting: int, fair_share: int) -> bool:
    """Whether a worker holding ``mine`` of the ``total`` backends under ``limit`` (0: none) may open one more:
    the whole pgmux is under the limit and, while other workers' clients wait under it, this worker is under
    its fair share."""
    if not limit:
        return True
    return total < limit and (not others_waiting or mine < fair_share)


def to_give(limit: int, total: int, mine: int, others_waiting: int, waiting: bool, fair_share: int) -> int:
    """How many of its ``mine`` backends a worker lets go under ``limit``, the whole pgmux holding ``total``
    (neither counting the backends it is already closing).

    While other workers' clients wait at the full limit: what it holds over its fair share, or everything when
    none of its own clients wait, up to what they wait for. Over the limit (lowered by a reload): what it holds
    over its fair share, up to the excess.
    """
    if not limit:
        return 0
    give = 0
    if others_waiting and total >= limit:
        give = min(mine - (fair_share if waiting else 0), others_waiting)
    if total > limit:
        give = max(give, min(mine - fair_share, total - limit))
    return max(give, 0)


def _key(scope: Scope) -> bytes:
    return hashlib.blake2b("\0".join(scope).encode(), digest_size=4 * _KEY_INTS).digest()


class SlotTable:
    """Per row (a scope) and worker: backends open or opening, and clients waiting; plus the doorbells.

    The row methods expect the caller to hold the lock (``locked``); ``any_waiting`` is a hint read without it,
    ``forget_worker`` takes it itself. A row is an index into the table's ints, as ``row`` returns it.
    """

    def __init__(self, workers: int, rows: int = ROWS) -> None:
        self.workers = workers
        self.rows = rows
        self._stride = _KEY_INTS + 2 * workers  # key, then (open, waiting) for each worker
        self._memory = mmap.mmap(-1, 4 * (_HEADER_INTS + rows * self._stride))  # shared with forked workers
        self._bytes = memoryview(self._memory)
        self._ints = self._bytes.cast("i")
        self._lock = tempfile.TemporaryFile()  # nameless: only the processes that inherit it can reach it
        self._doorbells = [os.pipe() for _ in range(workers)]
        for pipe in self._doorbells:
            for end in pipe:
                os.set_blocking(end, False)

    def close(self) -> None:
        self._ints.release()
        self._bytes.release()
        self._memory.close()
        self._lock.close()
        for pipe in self._doorbells:
            for end in pipe:
                os.close(end)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        fcntl.lockf(self._lock.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.lockf(self._lock.fileno(), fcntl.LOCK_UN)

    # ---- rows ----------------------------------------------------------------------------------

    def _in_use(self, row: int) -> bool:
        return any(self._ints[row + _KEY_INTS:row + self._stride])

    def row(self, scope: Scope, create: bool = False) -> int | None:
        """``scope``'s row; None when it has none (all its counts are 0) and ``create`` is false, or when the
        table is full for it. A row made here is free again until one of its cells is set."""
        key = _key(scope)
        start = int.from_bytes(key[:8], "little")
        free = None
        for probe in range(_PROBES):
            row = _HEADER_INTS + (start + probe) % self.rows * self._stride
            if self._in_use(row):
                if self._bytes[4 * row:4 * (row + _KEY_INTS)] == key:
                    return row
            elif free is None:
                free = row
        if free is None or not create:
            return None
        self._bytes[4 * free:4 * (free + _KEY_INTS)] = key
        return free

    def total(self, row: int) -> int:
        """Backends every worker holds under the row's limit."""
        return sum(self._ints[row + _KEY_INTS:row + self._stride:2])

    def opened(self, row: int, worker: int) -> int:
        return self._ints[row + _KEY_INTS + 2 * worker]

    def waiting(self, row: int, worker: int) -> int:
        return self._ints[row + _KEY_INTS + 2 * worker + 1]

    def waiting_elsewhere(self, row: int, worker: int) -> int:
        """Clients of the other workers waiting under the row's limit."""
        return sum(self._ints[row + _KEY_INTS + 1:row + self._stride:2]) - self.waiting(row, worker)

    def others(self, row: int, worker: int, waiting_only: bool = False) -> list[int]:
        """The other workers with backends or waiting clients in the row (only waiting ones: ``waiting_only``)."""
        return [other for other in range(self.workers) if other != worker and (
            self.waiting(row, other) or (not waiting_only and self.opened(row, other)))]

    def add_opened(self, row: int, worker: int, change: int) -> None:
        self._ints[row + _KEY_INTS + 2 * worker] += change

    def set_waiting(self, row: int, worker: int, count: int) -> None:
        cell = row + _KEY_INTS + 2 * worker + 1
        if bool(self._ints[cell]) != bool(count):
            self._ints[0] += 1 if count else -1
        self._ints[cell] = count

    def any_waiting(self) -> bool:
        """Whether clients of some worker wait under some limit: a hint, read without the lock."""
        return self._ints[0] > 0

    def forget_worker(self, worker: int) -> None:
        """Zero a dead worker's column (takes the lock): its backends died with it, its clients are gone."""
        first = _HEADER_INTS + _KEY_INTS + 2 * worker
        with self.locked():
            for cell in (first, first + 1):
                self._ints[cell::self._stride] = array("i", bytes(4 * self.rows))
            # Its death may have cut an update of the count short: count again.
            self._ints[0] = sum(
                sum(1 for count in self._ints[_HEADER_INTS + _KEY_INTS + 2 * other + 1::self._stride] if count)
                for other in range(self.workers))

    # ---- doorbells -----------------------------------------------------------------------------

    def doorbell(self, worker: int) -> int:
        """The file descriptor that is readable when ``worker`` has been rung."""
        return self._doorbells[worker][0]

    def ring(self, workers: Iterable[int]) -> None:
        for worker in workers:
            try:
                os.write(self._doorbells[worker][1], b"!")
            except BlockingIOError:
                pass  # the pipe is full of rings it has not read yet: one more says nothing new

    def drain(self, worker: int) -> None:
        try:
            while os.read(self._doorbells[worker][0], 4096):
                pass
        except BlockingIOError:
            pass


class WorkerLedger:
    """One worker's side of the slot table: the ``BackendLedger`` its pools count their backends in.

    A pool refused a backend publishes how many of its clients wait and is not asked again until the worker's
    doorbell rings (another worker let a backend go, or changed what it waits for) or the janitor's next pass:
    the per-transaction path never takes the lock.
    """

    def __init__(self, table: SlotTable, worker: int) -> None:
        self._table = table
        self._worker = worker
        self._holding: dict[Pool, int] = {}  # pools with backends counted in the table, and how many
        self._waiting: dict[Pool, int] = {}  # pools with clients waiting at a limit: how many, as published
        self._refused: dict[Pool, int] = {}  # pools refused (with their size then) since the doorbell last rang
        self._owing: set[Pool] = set()  # pools lending backends (Pool.lend)
        self._recheck = False  # a limit may have been lowered: look for rows over theirs
        self._table_full_logged = False
        self._loop: Any = None  # uvloop's remove_reader returns None, typeshed's a bool

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._table.doorbell(self._worker), self._on_doorbell)

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.remove_reader(self._table.doorbell(self._worker))
            self._loop = None

    # ---- BackendLedger -------------------------------------------------------------------------

    def claim(self, pool: Pool) -> bool:
        if self._refused.get(pool) == pool.limit:
            return False  # nothing changed since the refusal: asking again would only take the lock
        table, me = self._table, self._worker
        limits = pool.limits()
        waiting = len(pool.waiters) - len(pool.login)
        with table.locked():
            rows = [table.row(scope) for scope, _ in limits]
            claimed = all(
                row is None or may_open(limit, table.total(row), table.opened(row, me),
                                        table.waiting_elsewhere(row, me), share(limit, table.workers, me))
                for row, (_, limit) in zip(rows, limits))
            if claimed:
                claimed = self._count(limits)
            ring = self._publish(pool, max(waiting - 1 if claimed else waiting, 0))
        if claimed:
            self._holding[pool] = self._holding.get(pool, 0) + 1
            self._refused.pop(pool, None)
        elif waiting > 0:
            self._refused[pool] = pool.limit
        table.ring(ring)
        return claimed

    def _count(self, limits: list[tuple[Scope, int]]) -> bool:
        """One more backend in each scope's row, made as needed; False (nothing counted) if the table is full."""
        table, me = self._table, self._worker
        counted: list[int] = []
        for scope, _ in limits:
            row = table.row(scope, create=True)  # each row is in use before the next is looked for
            if row is None:
                for done in counted:
                    table.add_opened(done, me, -1)
                self._log_table_full()
                return False
            table.add_opened(row, me, 1)
            counted.append(row)
        return True

    def unclaim(self, pool: Pool) -> None:
        table, me = self._table, self._worker
        ring: set[int] = set()
        with table.locked():
            for scope, _ in pool.limits():
                row = table.row(scope)
                assert row is not None, "a backend's own count keeps its rows in use"
                table.add_opened(row, me, -1)
                ring.update(table.others(row, me, waiting_only=True))
        holding = self._holding.pop(pool) - 1
        if holding:
            self._holding[pool] = holding
        # This worker's pools under the same limits may open one now (the pool's own grows next).
        for other in list(self._refused):
            if other.key.database == pool.key.database or other.key.user == pool.key.user:
                del self._refused[other]
        table.ring(ring)

    def reconfigured(self, pool: Pool) -> None:
        self._refused.pop(pool, None)
        self._recheck = True

    # ---- waiting clients -----------------------------------------------------------------------

    def _publish(self, pool: Pool, waiting: int) -> set[int]:
        """Record ``waiting`` clients of ``pool`` in each of its rows (under the lock); returns the workers to
        ring: those with backends there (they may lend some) or clients waiting there too (fair shares)."""
        if waiting == self._waiting.get(pool, 0):
            return set()
        if waiting:
            self._waiting[pool] = waiting
        else:
            del self._waiting[pool]
        table, me = self._table, self._worker
        ring: set[int] = set()
        for scope, _ in pool.limits():
            # Every pool of this worker under the scope's limit counts in its cell.
            count = sum(number for other, number in self._waiting.items()
                        if any(scope == theirs for theirs, _ in other.limits()))
            row = table.row(scope, create=count > 0)
            if row is None:
                continue  # no row and nothing to record, or the table is full
            table.set_waiting(row, me, count)
            ring.update(table.others(row, me))
        return ring

    def _retry_refused(self) -> None:
        refused = list(self._refused)
        self._refused.clear()
        for pool in refused:
            pool.grow()  # claims again; a refusal publishes how many wait now

    def maintain(self) -> None:
        """The janitor's pass: pools refused ask again, those whose clients no longer wait say so, and this
        worker lends what others wait for (in case a doorbell was missed) or what is over a lowered limit."""
        self._retry_refused()
        done = [pool for pool in self._waiting if pool not in self._refused and len(pool.waiters) <= len(pool.login)]
        for pool in done:
            with self._table.locked():
                ring = self._publish(pool, 0)
            self._table.ring(ring)
        if self._recheck or self._owing or self._table.any_waiting():
            self._lend()

    def _on_doorbell(self) -> None:
        self._table.drain(self._worker)
        self._retry_refused()
        self._lend()

    def _lend(self) -> None:
        """Have this worker's pools let go of what other workers' clients wait for (see ``to_give``)."""
        self._recheck = False
        pools = list(self._holding)
        limits = {pool: pool.limits() for pool in pools}
        rows: dict[Scope, tuple[int, int, int]] = {}  # scope -> its limit, the pgmux's total, others' waiting
        table, me = self._table, self._worker
        with table.locked():
            for pool in pools:
                for scope, limit in limits[pool]:
                    if scope not in rows:
                        row = table.row(scope)
                        rows[scope] = (limit, 0, 0) if row is None else (
                            limit, table.total(row), table.waiting_elsewhere(row, me))
        owed: dict[Pool, int] = {}
        for scope, (limit, total, others_waiting) in rows.items():
            members = [pool for pool in pools if any(scope == theirs for theirs, _ in limits[pool])]
            closing = sum(len(pool.closing) for pool in members)  # let go already: they are on their way
            # Its own clients waiting now, not as last published: a backend opened for one must not go.
            give = to_give(limit, total - closing, sum(pool.total for pool in members) - closing,
                           max(others_waiting - closing, 0), any(pool.waiters for pool in members),
                           share(limit, table.workers, me))
            for pool in sorted(members, key=lambda pool: len(pool.waiters)):  # pools nobody waits for first
                if give <= 0:
                    break
                lent = min(give, pool.total - len(pool.closing))
                owed[pool] = max(owed.get(pool, 0), lent)
                give -= lent
        for pool in {*pools, *self._owing}:
            pool.lend(owed.get(pool, 0))
        self._owing = {pool for pool in pools if pool.owed}

    def _log_table_full(self) -> None:
        if not self._table_full_logged:
            self._table_full_logged = True
            log.error("the slot table is full (%d rows): a pool without a row opens no backend until rows free up",
                      self._table.rows)
