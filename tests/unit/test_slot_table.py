"""The workers' slot table: rows per scope, counts per worker, a dead worker's column reclaimed, a full table,
the fair-share rules, and the lock and doorbells across fork."""

from __future__ import annotations

import os
import select
import signal
import threading

import pytest

from proxy.slots import Scope, SlotTable, may_open, to_give

POOL = ("pool", "shop", "alice")
DATABASE = ("database", "shop")


def _new_row(table: SlotTable, scope: Scope) -> int:
    """The row for ``scope``, made if need be (the table holds its lock)."""
    row = table.row(scope, create=True)
    assert row is not None
    return row


@pytest.fixture
def table():
    slots = SlotTable(2, rows=64)
    yield slots
    slots.close()


def test_every_worker_counts_in_one_row_per_scope_and_the_row_adds_them_up(table: SlotTable) -> None:
    with table.locked():
        assert table.row(POOL) is None  # nobody counts anything under it yet
        row = _new_row(table, POOL)
        table.add_opened(row, 0, 3)
        assert table.row(POOL) == row  # the other worker finds the same row
        table.add_opened(table.row(POOL) or 0, 1, 1)
        assert (table.total(row), table.opened(row, 0), table.opened(row, 1)) == (4, 3, 1)
        other = table.row(DATABASE, create=True)
        assert other is not None and other != row
        table.add_opened(other, 1, 1)
        assert table.total(row) == 4 and table.total(other) == 1


def test_a_row_whose_counts_all_return_to_zero_is_free_again(table: SlotTable) -> None:
    with table.locked():
        row = _new_row(table, POOL)
        table.add_opened(row, 0, 1)
        table.set_waiting(row, 1, 2)
        table.add_opened(row, 0, -1)
        assert table.row(POOL) == row  # worker 1's waiting clients keep it
        table.set_waiting(row, 1, 0)
        assert table.row(POOL) is None


def test_clients_waiting_are_counted_per_worker_and_flagged_for_everyone(table: SlotTable) -> None:
    assert not table.any_waiting()
    with table.locked():
        row = _new_row(table, POOL)
        table.set_waiting(row, 1, 3)
        table.add_opened(row, 0, 2)
        assert table.any_waiting()
        assert (table.waiting_elsewhere(row, 0), table.waiting_elsewhere(row, 1)) == (3, 0)
        assert table.others(row, 0) == [1] and table.others(row, 1) == [0]
        assert table.others(row, 1, waiting_only=True) == []
        table.set_waiting(row, 1, 1)
        assert table.any_waiting()
        table.set_waiting(row, 1, 0)
    assert not table.any_waiting()


def test_a_dead_workers_column_is_zeroed_and_the_rest_kept(table: SlotTable) -> None:
    with table.locked():
        pool = _new_row(table, POOL)
        table.add_opened(pool, 0, 2)
        table.add_opened(pool, 1, 2)
        table.set_waiting(pool, 1, 5)
        database = _new_row(table, DATABASE)
        table.add_opened(database, 1, 4)
    table.forget_worker(1)
    with table.locked():
        assert (table.total(pool), table.opened(pool, 0), table.waiting_elsewhere(pool, 0)) == (2, 2, 0)
        assert table.row(DATABASE) is None  # only the dead worker held it: free
    assert not table.any_waiting()  # its waiting clients were the only ones


def test_a_full_table_finds_no_row_for_a_new_scope_until_one_frees_up() -> None:
    table = SlotTable(2, rows=4)
    try:
        with table.locked():
            rows = []
            for user in "abcd":
                row = _new_row(table, ("user", user))
                table.add_opened(row, 0, 1)
                rows.append(row)
            assert len(set(rows)) == 4
            assert table.row(("user", "e"), create=True) is None
            assert table.row(("user", "a")) == rows[0]  # the rows in use are still found
            table.add_opened(rows[2], 0, -1)
            row = table.row(("user", "e"), create=True)
            assert row == rows[2]
            table.add_opened(row, 0, 1)
            assert table.row(("user", "c")) is None
    finally:
        table.close()


def test_a_backend_opens_under_the_whole_limit_and_only_up_to_a_fair_share_while_others_wait() -> None:
    assert may_open(4, 3, 3, 0, 2)  # nobody else waits: one worker may take the whole pool
    assert not may_open(4, 4, 4, 0, 2)  # the whole pgmux is at the limit
    assert not may_open(4, 3, 2, 1, 2)  # room, but another worker's clients wait and this one has its share
    assert may_open(4, 3, 1, 1, 2)  # under its share: it may grow to it
    assert may_open(0, 1000, 1000, 5, 0)  # 0: no limit


def test_a_worker_lets_go_what_others_wait_for_keeping_its_fair_share_only_when_its_own_clients_wait() -> None:
    assert to_give(4, 4, 4, 1, False, 2) == 1  # idle worker: what they wait for
    assert to_give(4, 4, 4, 9, False, 2) == 4  # ... up to everything it holds
    assert to_give(4, 4, 3, 2, True, 2) == 1  # both wait: it keeps its share
    assert to_give(4, 4, 2, 2, True, 2) == 0
    assert to_give(4, 3, 3, 2, False, 2) == 0  # room left: the waiting worker opens its own
    assert to_give(4, 6, 4, 0, False, 2) == 2  # over a lowered limit: down to its share
    assert to_give(0, 9, 9, 9, False, 0) == 0


def test_the_lock_holds_across_fork_and_a_killed_holder_does_not_keep_it(table: SlotTable) -> None:
    ready_read, ready_write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: counts a backend, then dies holding the lock
        try:
            with table.locked():
                row = _new_row(table, POOL)
                table.add_opened(row, 1, 1)
                os.write(ready_write, b"!")
                signal.pause()
        finally:
            os._exit(1)
    try:
        assert os.read(ready_read, 1) == b"!"
        taken = threading.Event()

        def take() -> None:
            with table.locked():
                taken.set()

        waiting = threading.Thread(target=take, daemon=True)
        waiting.start()
        assert not taken.wait(0.3)  # the child holds it
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        pid = 0
        assert taken.wait(5)  # the kernel released it with the child
        waiting.join(5)  # out of its own ``with`` too: the fixture closes the table's lock file next
        with table.locked():
            row = table.row(POOL)
            assert row is not None and table.opened(row, 1) == 1  # the child's count is in the shared memory
    finally:
        if pid:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        os.close(ready_read)
        os.close(ready_write)


def test_a_ring_makes_the_workers_doorbell_readable_until_drained(table: SlotTable) -> None:
    def rung(worker: int) -> bool:
        return bool(select.select([table.doorbell(worker)], [], [], 0)[0])

    assert not rung(0) and not rung(1)
    table.ring([1])
    table.ring([1])
    assert rung(1) and not rung(0)
    table.drain(1)
    assert not rung(1)
