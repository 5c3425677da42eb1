"""The admin console across workers, without sockets: the request/answer codec, the merge of every worker's rows,
and the ids that name one connection in the whole pgmux."""

from __future__ import annotations

import pytest

from proxy.admin import _WHOLE, _POOLS_COLUMNS, _STATS_TABLE_COLUMNS
from proxy.fanout import (
    ANSWER_HEADER,
    COMMAND,
    KEY,
    MAX,
    MICROS,
    MODE,
    REQUEST_HEADER,
    SETTLED,
    SHOW,
    SIBLING_CONSOLE_CODE,
    SUM,
    ConsoleAnswer,
    ConsoleRequest,
    Weighted,
    answer_length,
    client_owner,
    concatenate,
    connection_label,
    connection_number,
    decode_answer,
    decode_request,
    encode_answer,
    encode_request,
    merge_named_values,
    merge_rows,
)
from proxy.protocol.startup import CANCEL_REQUEST_CODE


@pytest.mark.parametrize("request_", [ConsoleRequest(SHOW, "pools"), ConsoleRequest(COMMAND, "pause", "app"),
                                      ConsoleRequest(SETTLED, "wait_close", 'odd "name" é')])
def test_a_request_round_trips_behind_a_startup_style_header(request_: ConsoleRequest) -> None:
    packet = encode_request(request_)
    length, code = REQUEST_HEADER.unpack(packet[:REQUEST_HEADER.size])
    assert (length, code) == (len(packet), SIBLING_CONSOLE_CODE)
    assert code != CANCEL_REQUEST_CODE  # the same private address takes both
    assert decode_request(packet[REQUEST_HEADER.size:]) == request_


@pytest.mark.parametrize("body", [b"", b"{", b"[1, 2, 3]", b'["drop", "pools", ""]', b'["show", "pools"]',
                                  b'["show", 1, ""]', b"null"])
def test_bytes_that_are_no_request_are_refused_with_value_error(body: bytes) -> None:
    with pytest.raises(ValueError):
        decode_request(body)


def test_an_answer_round_trips_with_its_rows_error_and_settled_flag() -> None:
    for answer in (ConsoleAnswer(rows=[["app", "u", 3, None, "transaction"]]),
                   ConsoleAnswer(error=("55000", "already suspended/paused")), ConsoleAnswer(settled=True)):
        packet = encode_answer(answer)
        length = answer_length(packet[:ANSWER_HEADER.size])
        assert length == len(packet) - ANSWER_HEADER.size
        assert decode_answer(packet[ANSWER_HEADER.size:]) == answer


def test_an_answer_longer_than_the_bound_or_malformed_is_refused() -> None:
    with pytest.raises(ValueError):
        answer_length(ANSWER_HEADER.pack(1 << 30))
    for body in (b"[]", b'{"rows": 1, "error": null, "settled": false}', b'{"rows": [1]}', b"x"):
        with pytest.raises(ValueError):
            decode_answer(body)


# ---- ids ----------------------------------------------------------------------------------------------------


def test_with_one_worker_ids_and_labels_are_as_before() -> None:
    assert connection_label("c42", 0, 1) == "c42"
    assert connection_number(42, 0, 1) == 42
    assert client_owner("42", 1) == (0, "c42")
    assert client_owner("c42", 1) == (0, "c42")


def test_with_workers_every_connection_has_its_own_id_and_its_label_names_the_worker_as_the_logs_do() -> None:
    ids = {connection_number(number, worker, 3) for number in range(1, 50) for worker in range(3)}
    assert len(ids) == 49 * 3
    assert connection_label("c42", 1, 3) == "w1 c42"
    assert connection_label("", 1, 3) == ""  # no link
    for worker in range(3):
        assert client_owner(str(connection_number(42, worker, 3)), 3) == (worker, "c42")
    assert client_owner("w2 c7", 3) == (2, "c7")
    assert client_owner("w2c7", 3) == (2, "c7")


def test_kill_client_arguments_that_name_no_client_of_this_pgmux_are_none() -> None:
    assert client_owner("w3 c7", 3) is None  # no worker 3
    assert client_owner("c7", 2) is None  # which worker's c7?
    assert client_owner("x", 2) is None


# ---- merging ------------------------------------------------------------------------------------------------


def test_rows_with_the_same_key_sum_counts_keep_whole_pgmux_limits_and_take_the_longest_wait() -> None:
    columns = ["database", "user", "cl_active", "pool_size", "maxwait", "maxwait_us", "pool_mode"]
    rules = {"database": KEY, "user": KEY, "cl_active": SUM, "maxwait": MAX, "maxwait_us": MICROS,
             "pool_mode": MODE}
    local = [["app", "u", 3, 20, 1, 900_000, "transaction"], ["other", "u", 1, 5, 0, 0, "session"]]
    sibling = [["app", "u", 4, 20, 1, 950_000, "transaction"], ["app", "v", 2, 20, 0, 10, "session"],
               ["other", "u", 0, 5, 2, 5, "transaction"]]
    assert merge_rows(columns, rules, [local, sibling]) == [
        ["app", "u", 7, 20, 1, 950_000, "transaction"],
        ["app", "v", 2, 20, 0, 10, "session"],
        ["other", "u", 1, 5, 2, 5, "mixed"],
    ]


def test_averages_per_event_are_weighted_by_each_workers_rate_of_those_events() -> None:
    columns = ["database", "avg_xact_count", "avg_xact_time"]
    rules = {"database": KEY, "avg_xact_count": SUM, "avg_xact_time": Weighted("avg_xact_count")}
    merged = merge_rows(columns, rules, [[["app", 30, 1000]], [["app", 10, 5000]], [["app", 0, 0]]])
    assert merged == [["app", 40, (30 * 1000 + 10 * 5000) // 40]]
    # No events anywhere: nothing to weigh by; no worker's average is lost either.
    assert merge_rows(columns, rules, [[["app", 0, 0]], [["app", 0, 7]]]) == [["app", 0, 7]]


def test_named_values_merge_by_name_in_the_local_order_and_numbers_as_text_stay_text() -> None:
    rules = {"max_client_conn": SUM, "paused": MODE}
    local = [["max_client_conn", "500", "1000", "yes"], ["pool_mode", "transaction", "session", "no"],
             ["paused", "no", "", "no"]]
    sibling = [["paused", "yes", "", "no"], ["max_client_conn", "500", "1000", "yes"],
               ["pool_mode", "transaction", "session", "no"]]
    assert merge_named_values(rules, [local, sibling]) == [
        ["max_client_conn", "1000", "1000", "yes"], ["pool_mode", "transaction", "session", "no"],
        ["paused", "mixed", "", "no"]]


def test_connection_lists_are_concatenated_local_first() -> None:
    assert concatenate([[["C", 1]], [], [["C", 2], ["C", 3]]]) == [["C", 1], ["C", 2], ["C", 3]]


def test_show_pools_for_the_whole_sums_clients_and_servers_per_pool_but_not_the_pool_mode() -> None:
    columns = [name for name, _ in _POOLS_COLUMNS]

    def row(database: str, active: int, idle: int, wait: tuple[int, int]) -> list:
        values = dict.fromkeys(columns, 0)
        values.update(database=database, user="u", cl_active=active, sv_idle=idle, maxwait=wait[0],
                      maxwait_us=wait[1], pool_mode="transaction", load_balance_hosts=None)
        return [values[name] for name in columns]

    merged = _WHOLE["pools"](columns, [[row("app", 2, 1, (0, 5))], [row("app", 3, 2, (1, 0))]])
    assert [dict(zip(columns, r)) for r in merged] == [dict(zip(columns, row("app", 5, 3, (1, 0))))]


def test_show_stats_for_the_whole_sums_totals_and_rates_and_weighs_average_times() -> None:
    columns = [name for name, _ in _STATS_TABLE_COLUMNS]

    def row(xacts: int, rate: int, xact_time: int) -> list:
        values = dict.fromkeys(columns, 0)
        values.update(database="app", total_xact_count=xacts, avg_xact_count=rate, avg_xact_time=xact_time,
                      total_requests=xacts)
        return [values[name] for name in columns]

    merged = dict(zip(columns, _WHOLE["stats"](columns, [[row(100, 10, 200)], [row(50, 30, 600)]])[0]))
    assert (merged["total_xact_count"], merged["avg_xact_count"], merged["avg_xact_time"],
            merged["total_requests"]) == (150, 40, (10 * 200 + 30 * 600) // 40, 150)
