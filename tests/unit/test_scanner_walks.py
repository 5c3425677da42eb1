"""The compiled scanner (proxy/protocol/_scanner.c) against its pure-Python references."""

from __future__ import annotations

import os
import shutil

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import proxy
from proxy.compiled import PURE_PYTHON_ENV
from proxy.protocol import framing, sql_words
from proxy.protocol.framing import MAX_MESSAGE_LENGTH, Frame
from test_framing import _capture_sets as _kind_sets
from test_framing import _noisy_streams

FUZZ = settings(max_examples=2500, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler here, so no compiled walk was built")
@pytest.mark.skipif(not proxy.BUILD.compiled and PURE_PYTHON_ENV in os.environ,
                    reason=f"{PURE_PYTHON_ENV} is set: the pure-Python build is under test")
def test_the_compiled_walk_is_built_where_a_compiler_exists() -> None:
    # `pip install -e .` builds it (setup.py, optional): without this test a failed build would
    # silently leave only the pure-Python walk tested and used.
    assert "compiled" in framing.WALKS



@FUZZ
@given(data=st.one_of(st.binary(max_size=300), _noisy_streams()),
       kinds=st.tuples(_kind_sets, _kind_sets, _kind_sets),
       start=st.integers(0, 40), max_length=st.sampled_from([MAX_MESSAGE_LENGTH, 64, 5]))
def test_property_compiled_and_python_walks_agree(data, kinds, start, max_length) -> None:
    flags = framing.kind_flags(*kinds)  # captured, counted, neutral
    if len(framing.WALKS) < 2:
        pytest.skip("no compiled walk on this machine (see the test above)")
    pos = min(start, len(data))
    results = {}
    for name, walk_impl in framing.WALKS.items():
        out: list = []
        result = walk_impl(data, memoryview(data), pos, pos, flags, max_length, Frame, out)
        results[name] = (result, [(type(s).__name__, s.kind if type(s) is Frame else None, bytes(s.data if type(s) is Frame else s))
                                  for s in out])
    assert len(set(map(repr, results.values()))) == 1, results


_SQL_PIECES = st.sampled_from([b"reset", b"RESET", b"ReSeT", b"discard", b"DISCARD", b"Discard", b"rese", b"discar",
                               b"deallocate", b"DEALLOCATE", b"DeAlLoCaTe", b"dealloc", b"deallocated", b"D",
                               b"_", b"x", b"9", b" ", b";", b"\n", b"(", b"'", b"\xc3\xa9", b"\x00", b"r", b"d", b"all"])


@pytest.mark.parametrize("implementations", [sql_words.IMPLEMENTATIONS, sql_words.STATEMENT_DROP_IMPLEMENTATIONS],
                         ids=["reset", "statement_drop"])
@FUZZ
@given(sql=st.one_of(st.binary(max_size=80), st.lists(_SQL_PIECES, max_size=12).map(b"".join)))
def test_property_compiled_and_python_word_tests_agree(implementations, sql) -> None:
    if len(implementations) < 2:
        pytest.skip("no compiled scanner on this machine")
    answers = {name: test(sql) for name, test in implementations.items()}
    assert len(set(answers.values())) == 1, answers
    assert answers["compiled"] == implementations["compiled"](memoryview(sql))


@pytest.mark.parametrize("implementation", sorted(sql_words.IMPLEMENTATIONS))
@pytest.mark.parametrize(("sql", "mentions"), [
    (b"RESET ALL", True), (b"discard all;", True), (b"SELECT 1; reset search_path", True), (b"DISCARD", True),
    (b"SELECT reset_val FROM pg_settings", False), (b"SELECT 1 AS preset", False), (b"discarded", False),
    (b"SELECT abalance FROM pgbench_accounts WHERE aid = 1;", False), (b"", False),
])
def test_reset_word_test_finds_whole_words_in_any_case(implementation, sql, mentions) -> None:
    assert sql_words.IMPLEMENTATIONS[implementation](sql) is mentions




@pytest.mark.parametrize("implementation", sorted(sql_words.STATEMENT_DROP_IMPLEMENTATIONS))
@pytest.mark.parametrize(("sql", "mentions"), [
    (b"DEALLOCATE ALL", True), (b"SELECT 1; deallocate all", True), (b"/* c */ DISCARD ALL", True),
    (b"discard plans", True), (b"DEALLOCATE pgmux_0123", True), (b"DO $$BEGIN EXECUTE 'DEALLOCATE ALL'; END$$", True),
    (b"\x00DEALLOCATE ALL\x00\x00\x00", True),  # a Parse body: unnamed, the text, no parameter types
    (b"SELECT deallocated FROM t", False), (b"SELECT my_discard()", False), (b"RESET ALL", False),
    (b"SELECT abalance FROM pgbench_accounts WHERE aid = 1;", False), (b"", False),
])
def test_statement_drop_word_test_finds_whole_words_in_any_case(implementation, sql, mentions) -> None:
    assert sql_words.STATEMENT_DROP_IMPLEMENTATIONS[implementation](sql) is mentions


_SESSION_PIECES = st.sampled_from([b"set", b"SET", b"sEt", b"set_config", b"SET_CONFIG", b"reset", b"advisory",
                                   b"pg_advisory_lock", b"listen", b"unlisten", b"temp", b"pg_temp", b"temporary",
                                   b"prepare", b"load", b"close", b"declare", b"discard", b"deallocate", b"update",
                                   b"t", b"_", b"x", b"9", b" ", b"\t", b"\n", b"\x0c", b";", b"(", b'"', b"/",
                                   b"'", b"\xc3\xa9", b"\x00", b"-- c\n"])


@FUZZ
@given(sql=st.one_of(st.binary(max_size=80), st.lists(_SESSION_PIECES, max_size=12).map(b"".join)))
def test_property_compiled_and_python_session_state_tests_agree(sql) -> None:
    implementations = sql_words.SESSION_STATE_IMPLEMENTATIONS
    if len(implementations) < 2:
        pytest.skip("no compiled scanner on this machine")
    message = b"Q\x00\x00\x00A" + sql  # a length byte that reads as a word character must not count
    answers = {name: test(message) for name, test in implementations.items()}
    assert len(set(answers.values())) == 1, answers


@FUZZ
@given(sql=st.lists(_SESSION_PIECES, max_size=60).map(b"".join))
def test_property_compiled_and_python_session_state_tests_agree_on_long_texts(sql) -> None:
    """Long enough for the compiled test's 16-byte blocks, with words across their boundaries."""
    implementations = sql_words.SESSION_STATE_IMPLEMENTATIONS
    if len(implementations) < 2:
        pytest.skip("no compiled scanner on this machine")
    message = b"Q\x00\x00\x00A" + sql
    answers = {name: test(message) for name, test in implementations.items()}
    assert len(set(answers.values())) == 1, answers


@pytest.mark.parametrize("implementation", sorted(sql_words.SESSION_STATE_IMPLEMENTATIONS))
@pytest.mark.parametrize("offset", range(40))
def test_a_session_state_word_counts_at_every_offset_and_not_inside_a_longer_word(implementation, offset) -> None:
    test = sql_words.SESSION_STATE_IMPLEMENTATIONS[implementation]
    padding = b" " * offset
    assert test(b"Q\x00\x00\x00A" + padding + b"SET x = 1; SELECT 1 FROM t") is True
    assert test(b"Q\x00\x00\x00A" + padding + b"SELECT pg_advisory_lock(1)") is True
    assert test(b"Q\x00\x00\x00A" + padding + b"SELECT 1 FROM t WHERE x = 2 -- LISTEN") is True
    # The word's first letter right after a word character (in the byte before, across a block's edge too).
    assert test(b"Q\x00\x00\x00A" + b"x" * offset + b"listen c") is (offset == 0)
    assert test(b"Q\x00\x00\x00A" + padding + b"SELECT offset, settings, xreset FROM t") is False


@pytest.mark.parametrize("implementation", sorted(sql_words.SESSION_STATE_IMPLEMENTATIONS))
@pytest.mark.parametrize(("sql", "mentions"), [
    (b"SET work_mem = '8MB'", True), (b"select 1;set role x", True), (b"/* c */ SET x = 1", True),
    (b"-- c\nSET x = 1", True), (b"SELECT pg_catalog.set_config('a.b', '1', false)", True),
    (b"SELECT pg_advisory_lock(1)", True), (b"CREATE TEMP TABLE t ()", True), (b"create table pg_temp.t ()", True),
    (b"LISTEN c", True), (b"unlisten *", True), (b"DECLARE c CURSOR WITH HOLD FOR SELECT 1", True),
    (b"PREPARE p AS SELECT 1", True), (b"LOAD 'auto_explain'", True), (b"RESET ALL", True), (b"CLOSE ALL", True),
    (b"UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid = 1", False),
    (b'UPDATE "t" SET x = 1', False), (b"INSERT INTO t VALUES (1) ON CONFLICT (id) DO UPDATE SET x = 1", False),
    (b"SELECT abalance FROM pgbench_accounts WHERE aid = 1;", False), (b"SELECT offset, settings FROM t", False),
    (b"", False),
])
def test_session_state_word_test_flags_statements_that_may_change_the_session(implementation, sql, mentions) -> None:
    assert sql_words.SESSION_STATE_IMPLEMENTATIONS[implementation](b"Q\x00\x00\x00A" + sql) is mentions


@pytest.mark.parametrize(("sql", "kinds"), [
    (b"SET work_mem = 1", {"setting"}), (b"SET SESSION work_mem = 1", {"setting"}), (b"RESET ALL", {"setting"}),
    (b"SET ROLE r", {"role"}), (b"RESET ROLE", {"role"}), (b"SET SESSION AUTHORIZATION u", {"role"}),
    (b"SET LOCAL work_mem = 1", set()), (b"SET TRANSACTION READ ONLY", set()), (b"SET CONSTRAINTS ALL DEFERRED", set()),
    (b"SELECT set_config('app.t', '1', false)", {"setting"}), (b"select 1; set lock_timeout = 1; select 2", {"setting"}),
    (b"SELECT pg_advisory_lock(1)", {"advisory_lock"}), (b"SELECT pg_advisory_xact_lock(1)", set()),
    (b"CREATE TEMPORARY TABLE t ()", {"temp"}), (b"SELECT 1 INTO TEMP t", {"temp"}), (b"SELECT temp FROM w", set()),
    (b"LISTEN c", {"listen"}), (b"DECLARE c CURSOR WITH HOLD FOR SELECT 1", {"cursor"}),
    (b"DECLARE c CURSOR FOR SELECT 1", set()), (b"PREPARE TRANSACTION 'x'", set()),
    (b"UPDATE t\nSET x = 1", set()), (b"SELECT 'SET work_mem = 1'", set()), (b"DISCARD ALL", {"discard"}),
])
def test_session_effects_names_what_a_statement_may_change(sql, kinds) -> None:
    assert sql_words.session_effects(sql) == kinds


@pytest.mark.parametrize(("sql", "found"), [
    (b"CREATE TEMP TABLE t (id int)", (0, "temp")),
    (b"CREATE OR REPLACE TEMPORARY VIEW v AS SELECT 1", (0, "temp")),
    (b"CREATE GLOBAL TEMPORARY TABLE t (id int)", (0, "temp")),
    (b"CREATE TABLE pg_temp.t (id int)", (0, "temp")),
    (b"SELECT 1 INTO TEMPORARY t", (0, "temp")),
    (b"SELECT 1; SELECT pg_advisory_lock(1)", (9, "advisory_lock")),
    (b"select pg_catalog.pg_try_advisory_lock_shared(1, 2)", (0, "advisory_lock")),
    (b"BEGIN; LISTEN c; COMMIT", (6, "listen")),
    (b"DECLARE c CURSOR WITH HOLD FOR SELECT 1", (0, "cursor")),
    (b"PREPARE p AS SELECT 1", (0, "prepared_statement")),
    (b"/* why */ LOAD 'auto_explain'", (0, "load")),
    # Creating nothing that outlives the transaction, releasing, or only mentioning: nothing to refuse.
    (b"SELECT pg_advisory_xact_lock(1)", None), (b"SELECT pg_advisory_unlock_all()", None),
    (b"UNLISTEN *", None), (b"CLOSE ALL", None), (b"DEALLOCATE ALL", None), (b"DISCARD TEMP", None),
    (b"DECLARE c CURSOR WITHOUT HOLD FOR SELECT 1", None), (b"PREPARE TRANSACTION 'x'", None),
    (b"SELECT advisory_notes, temp FROM t", None), (b"SELECT * FROM pg_temp.t", None),
    (b"SELECT 'LISTEN x' /* LOAD 'y' */", None), (b"SELECT $$LISTEN x$$, $q$PREPARE p$q$", None),
    # A DO block's body runs: what it creates is refused with the whole DO. A function's body runs only when called.
    (b"SELECT 1; DO $$BEGIN PERFORM 1; PERFORM pg_advisory_lock(1); END$$; SELECT 2", (9, "advisory_lock")),
    (b"CREATE FUNCTION f() RETURNS void LANGUAGE sql AS $$LISTEN x$$", None),
])
def test_first_session_only_statement_finds_what_refuse_refuses(sql, found) -> None:
    assert sql_words.first_session_only_statement(sql) == found
