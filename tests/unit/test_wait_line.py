"""The pool's line of waiters (pool.WaitLine) keeps first-come-first-served order, as a deque would, through
any mix of joins, hand-overs, departures and compactions."""

from __future__ import annotations

from collections import deque

from hypothesis import given
from hypothesis import strategies as st

from proxy.pool import WaitLine


class Waiter:
    """A stand-in for pool.Waiter: the line only keeps its waiters in order."""

    def __init__(self, since: int) -> None:
        self.since = since


def waiter(n: int) -> Waiter:
    return Waiter(n)


# join: a new waiter at the back; serve: the first one out; leave: the waiter at that position (of those in
# line) leaves; back_out: the last one to join leaves at once (a wait refused as it was made)
operations = st.lists(st.one_of(st.just(("join", 0)), st.just(("serve", 0)), st.just(("back_out", 0)),
                                st.tuples(st.just("leave"), st.integers(0, 200))), max_size=400)


@given(operations)
def test_the_line_serves_in_the_order_waiters_joined_whatever_came_between(ops: list[tuple[str, int]]) -> None:
    line, model = WaitLine[Waiter](), deque[Waiter]()
    joined = 0
    for op, position in ops:
        if op == "join":
            w = waiter(joined)
            joined += 1
            line.append(w)
            model.append(w)
        elif op == "serve" and model:
            assert line.popleft() is model.popleft()
        elif op == "back_out" and model:
            assert line.pop() is model.pop()
        elif op == "leave" and model:
            w = model[position % len(model)]
            line.remove(w)
            model.remove(w)
        assert len(line) == len(model)
        assert bool(line) == bool(model)
        assert list(line) == list(model)
        if model:
            assert line.first() is model[0]


def test_a_long_busy_line_keeps_only_a_bounded_number_of_served_waiters() -> None:
    line = WaitLine[Waiter]()
    for n in range(30):
        line.append(waiter(n))
    for n in range(30, 10_000):  # always 30 in line: it never empties
        line.append(waiter(n))
        assert line.popleft().since == n - 30
    assert len(line) == 30
    assert len(line._items) <= 2 * 32 + 30


def test_a_line_rebuilt_from_waiters_keeps_their_order() -> None:
    waiters = [waiter(n) for n in range(5)]
    line = WaitLine(w for w in waiters if w.since != 2)
    assert [w.since for w in line] == [0, 1, 3, 4]
