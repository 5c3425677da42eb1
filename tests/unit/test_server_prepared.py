"""ServerPrepared tells ParseCompletes apart by position: the client's are passed on, pgmux's own swallowed.

A client's Parse of the unnamed statement is counted rather than queued while nothing else is in flight
(expect_plain); these check that the order of replies stays the order of Parses whichever way each is held.
"""

from proxy.prepared import ClientStatements, PendingParse, ServerPrepared, StatementNames
from proxy.stats import PreparedCounters


def _injected(batch: int) -> PendingParse:
    return PendingParse(batch, True, None, b"pgmux_s1\x00")


def _client_statements() -> ClientStatements:
    return ClientStatements(StatementNames(), PreparedCounters())


def test_unnamed_parses_before_one_of_pgmuxs_get_the_first_replies() -> None:
    link = ServerPrepared({})
    link.expect_plain(1)
    link.expect_plain(1)
    link.expect(_injected(1))
    assert [link.on_parse_complete() for _ in range(3)] == [True, True, False]
    assert link.injected == 0


def test_an_unnamed_parse_behind_one_of_pgmuxs_gets_the_reply_after_it() -> None:
    link = ServerPrepared({})
    link.expect(_injected(1))
    link.expect_plain(1)
    assert [link.on_parse_complete() for _ in range(2)] == [False, True]


def test_unnamed_parses_of_a_failed_batch_leave_with_its_ready_for_query() -> None:
    link = ServerPrepared({})
    link.expect_plain(1)
    link.expect_plain(1)
    link.on_ready_for_query(_client_statements())  # batch 1 failed before either Parse was answered
    link.expect(_injected(2))
    assert link.on_parse_complete() is False  # pgmux's own, not taken for a leftover of batch 1


def test_unnamed_parses_of_two_batches_keep_their_batches() -> None:
    link = ServerPrepared({})
    link.expect_plain(1)
    link.expect_plain(2)  # a second batch while the first is in flight: queued, each with its batch
    link.expect(_injected(2))
    link.on_ready_for_query(_client_statements())  # batch 1 failed: its Parse is dropped, batch 2's stay
    assert [link.on_parse_complete() for _ in range(2)] == [True, False]


def test_a_new_link_forgets_what_the_last_left_in_flight() -> None:
    link = ServerPrepared({})
    link.expect_plain(1)
    link.start_link()
    link.expect(_injected(1))
    assert link.on_parse_complete() is False
