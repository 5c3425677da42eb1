"""Words pgmux looks for in the SQL text of a simple Query or a Parse, without parsing it."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Final

_RESET_OR_DISCARD = re.compile(rb"(?i)\b(?:reset|discard)\b")
# What may change a session's state (see mentions_session_state). SET counts where a statement may begin:
# after the start, a character that is neither a word's nor an identifier quote, or a line break (a
# "-- comment" may end there); so "UPDATE t SET" on one line is not flagged.
_SESSION_STATE_WORDS = re.compile(rb"""(?ix)
    \b(?:reset|discard|listen|unlisten|prepare|deallocate|load|declare|close|temp|temporary)\b
  | \b(?:set_config|pg_temp) | advisory
  | (?:\A|[^\w"\ \t\r\n\f\v]|\n)[\ \t\r\n\f\v]*set\b""")
_DEALLOCATE_OR_DISCARD = re.compile(rb"(?i)\b(?:deallocate|discard)\b")
# What drops_all_statements reads: comments, quoted text, dollar-quoted text (a function's or DO block's body,
# its statements looked into by session_effects), statement ends, words, any other character.
_LEXEMES = re.compile(rb"""
    (?P<comment>--[^\n]*|/\*.*?\*/)
  | (?P<quoted>[Ee]'(?:[^'\\]|\\.|'')*'|'(?:[^']|'')*'|"(?:[^"]|"")*")
  | (?P<dollar>\$(?P<tag>(?:[A-Za-z_]\w*)?)\$(?P<body>.*?)\$(?P=tag)\$)
  | (?P<end>;)
  | (?P<word>[A-Za-z_]\w*)
  | \S""", re.DOTALL | re.VERBOSE)
_DROPPING_EVERY_STATEMENT = frozenset({(b"DISCARD", b"ALL"), (b"DEALLOCATE", b"ALL"),
                                       (b"DEALLOCATE", b"PREPARE", b"ALL")})


def mentions_reset_python(sql: bytes | memoryview) -> bool:
    """Whether the text has the word RESET or DISCARD: it may put session settings back to defaults.

    Over-eager on purpose (a string literal or a comment counts too): a false alarm costs a
    parameter re-sync, a miss would leave a client with settings it did not ask for. The
    reference for (and fallback to) the compiled version in ``_scanner.c``, which runs on every
    simple Query.
    """
    return _RESET_OR_DISCARD.search(sql) is not None


def mentions_session_state_python(message: bytes | memoryview) -> bool:
    """Whether a Query's or Parse's text (``message``: the whole message, header included) may change the
    state of the session: a setting, the role, temporary objects, advisory locks, LISTEN, cursors, SQL
    PREPARE, LOAD.

    The cheap first look, over-eager on purpose (words in literals and comments count, and "UPDATE t\\nSET"
    does): session_effects looks closer at what it flags. Missing one would let state cross clients. The
    reference for (and fallback to) the compiled version in ``_scanner.c``, which runs on every simple Query.
    """
    return _SESSION_STATE_WORDS.search(bytes(message[5:])) is not None


def mentions_statement_drop_python(sql: bytes | memoryview) -> bool:
    """Whether the text has the word DEALLOCATE or DISCARD: it may drop the session's prepared statements.

    Over-eager on purpose, like mentions_reset: a string literal counts (it may be dynamic SQL, as in
    ``DO $$ BEGIN EXECUTE 'DEALLOCATE ALL'; END $$``), and so does DISCARD PLANS or TEMP. A false
    alarm costs re-preparing a backend's statements, a miss fails every client's statements there.
    The reference for (and fallback to) the compiled version in ``_scanner.c``, which runs on every
    simple Query and every Parse (named ones once, when pgmux registers them).
    """
    return _DEALLOCATE_OR_DISCARD.search(sql) is not None


def drops_all_statements(sql: bytes) -> bool:
    """Whether one of the statements in ``sql`` is DISCARD ALL or DEALLOCATE [PREPARE] ALL, in any case.

    The careful check behind mentions_statement_drop: comments are skipped and quoted text is never
    taken for a statement, so a client's own statement names are dropped only when PostgreSQL drops them.
    """
    statement: list[bytes] = []
    for lexeme in _LEXEMES.finditer(sql):
        kind = lexeme.lastgroup
        if kind == "comment":
            continue
        if kind == "end":
            if tuple(statement) in _DROPPING_EVERY_STATEMENT:
                return True
            statement.clear()
        else:
            statement.append(lexeme.group().upper() if kind == "word" else b"")
    return tuple(statement) in _DROPPING_EVERY_STATEMENT


# Session-state kinds, as session_effects names them (and the metric pgmux_session_state_changes_total).
SETTING: Final = "setting"
ROLE: Final = "role"
DISCARD: Final = "discard"
TEMP: Final = "temp"
ADVISORY_LOCK: Final = "advisory_lock"
LISTEN: Final = "listen"
CURSOR: Final = "cursor"
PREPARED_STATEMENT: Final = "prepared_statement"
LOAD: Final = "load"
SESSION_STATE_KINDS: Final = (SETTING, ROLE, DISCARD, TEMP, ADVISORY_LOCK, LISTEN, CURSOR, PREPARED_STATEMENT, LOAD)
_NOT_SESSION_SETS = frozenset({b"LOCAL", b"TRANSACTION", b"CONSTRAINTS"})
_FIRST_WORD_KINDS = {b"DISCARD": DISCARD, b"LISTEN": LISTEN, b"UNLISTEN": LISTEN, b"CLOSE": CURSOR,
                     b"PREPARE": PREPARED_STATEMENT, b"DEALLOCATE": PREPARED_STATEMENT, b"LOAD": LOAD}
_TEMPORARY = frozenset({b"TEMP", b"TEMPORARY"})
# Dotted names a statement may set as custom settings (app.tenant_id), quoted (set_config) or not (SET).
_DOTTED_NAME = re.compile(rb"(?<![\w.$])([A-Za-z_][\w$]*(?:\.[A-Za-z_][\w$]*)+)")


def _statement_kinds(words: list[bytes]) -> set[str]:
    """What one statement (its words upper-cased, quoted text left out) may change in the session."""
    kinds: set[str] = set()
    if not words:
        return kinds
    first, second = words[0], words[1] if len(words) > 1 else b""
    if first == b"SET" and second not in _NOT_SESSION_SETS or first == b"RESET":
        is_role = second == b"ROLE" or second == b"SESSION" and words[2:3] in ([b"AUTHORIZATION"], [b"ROLE"])
        kinds.add(ROLE if is_role else SETTING)
    elif first in _FIRST_WORD_KINDS and not (first == b"PREPARE" and second == b"TRANSACTION"):
        kinds.add(_FIRST_WORD_KINDS[first])
    elif first == b"DECLARE" and b"HOLD" in words:
        kinds.add(CURSOR)
    for index, word in enumerate(words):
        if word == b"SET_CONFIG":
            kinds.add(SETTING)
        elif b"ADVISORY" in word and b"XACT" not in word:
            kinds.add(ADVISORY_LOCK)
        elif b"PG_TEMP" in word or word in _TEMPORARY and (first == b"CREATE" and index < 6
                                                           or words[index - 1] == b"INTO"):
            kinds.add(TEMP)
    return kinds


_SESSION_ADVISORY_LOCKS = frozenset({b"PG_ADVISORY_LOCK", b"PG_ADVISORY_LOCK_SHARED", b"PG_TRY_ADVISORY_LOCK",
                                     b"PG_TRY_ADVISORY_LOCK_SHARED"})
_SESSION_ONLY_FIRST_WORDS = {b"LISTEN": LISTEN, b"PREPARE": PREPARED_STATEMENT, b"LOAD": LOAD}


def _session_only_kind(words: list[bytes]) -> str | None:
    """The session-only state one statement (its words upper-cased, quoted text left out) creates, if any.

    Unlike _statement_kinds, exact enough to refuse a statement for (session_state = refuse): releases
    (UNLISTEN, DEALLOCATE, CLOSE, unlocks) and the transaction-scoped forms create nothing.
    """
    if not words:
        return None
    first, second = words[0], words[1] if len(words) > 1 else b""
    if first in _SESSION_ONLY_FIRST_WORDS and not (first == b"PREPARE" and second == b"TRANSACTION"):
        return _SESSION_ONLY_FIRST_WORDS[first]
    if first == b"DECLARE" and any(word == b"HOLD" and words[index - 1] == b"WITH"
                                   for index, word in enumerate(words)):
        return CURSOR
    for index, word in enumerate(words):
        if word in _SESSION_ADVISORY_LOCKS:
            return ADVISORY_LOCK
        # CREATE [OR REPLACE] [GLOBAL|LOCAL] TEMP ..., CREATE TABLE pg_temp.t, SELECT ... INTO TEMP t
        if (word in _TEMPORARY and (first == b"CREATE" and index < 5 or words[index - 1] == b"INTO")
                or word == b"PG_TEMP" and first == b"CREATE"):
            return TEMP
    return None


def first_session_only_statement(sql: bytes) -> tuple[int, str] | None:
    """Where in ``sql`` the first statement that creates session-only state begins (just after the ``;``
    ending the one before it), and what it creates."""
    statement: list[bytes] = []
    start = 0
    in_body: str | None = None  # what the body of a DO block creates (a function's body runs only when called)
    for lexeme in _LEXEMES.finditer(sql):
        kind = lexeme.lastgroup
        if kind == "word":
            statement.append(lexeme.group().upper())
        elif kind == "dollar" and in_body is None and statement[:1] == [b"DO"]:
            nested = first_session_only_statement(lexeme.group("body"))
            in_body = None if nested is None else nested[1]
        elif kind == "end":
            created = in_body or _session_only_kind(statement)
            if created is not None:
                return start, created
            statement.clear()
            in_body = None
            start = lexeme.end()
    created = in_body or _session_only_kind(statement)
    return None if created is None else (start, created)


def session_effects(sql: bytes) -> set[str]:
    """The kinds of session state the statements in ``sql`` may change: the close look behind
    mentions_session_state, for the texts it flags.

    Word-level, not a parser: it says where to look (pgmux then reads the session's real state from the
    server, see proxy/session_state.py), so it may over-report, and must not miss a statement form.
    SET LOCAL, SET TRANSACTION and the _xact_ advisory locks end with their transaction: nothing to follow.
    """
    kinds: set[str] = set()
    statement: list[bytes] = []
    for lexeme in _LEXEMES.finditer(sql):
        kind = lexeme.lastgroup
        if kind == "word":
            statement.append(lexeme.group().upper())
        elif kind == "dollar":
            kinds |= session_effects(lexeme.group("body"))  # a DO block's body runs; a function's may
        elif kind == "end":
            kinds |= _statement_kinds(statement)
            statement.clear()
    return kinds | _statement_kinds(statement)


def custom_setting_names(sql: bytes) -> set[str]:
    """Dotted names in ``sql`` that may be custom settings it changes (PostgreSQL cannot list those)."""
    return {name.decode("ascii").lower() for name in _DOTTED_NAME.findall(sql)}


try:
    from proxy.protocol._scanner import mentions_reset as mentions_reset_compiled  # type: ignore[import-not-found,import-untyped,unused-ignore]
    from proxy.protocol._scanner import mentions_statement_drop as mentions_statement_drop_compiled  # type: ignore[import-not-found,import-untyped,unused-ignore]
except ImportError:  # not built (no C compiler at install time)
    mentions_reset_compiled = mentions_statement_drop_compiled = None
try:
    from proxy.protocol._scanner import mentions_session_state as mentions_session_state_compiled  # type: ignore[import-not-found,import-untyped,unused-ignore]
except ImportError:  # not built, or built before this function existed
    mentions_session_state_compiled = None

IMPLEMENTATIONS: dict[str, Callable[[bytes | memoryview], bool]] = {
    "python": mentions_reset_python,
    **({"compiled": mentions_reset_compiled} if mentions_reset_compiled is not None else {}),
}
STATEMENT_DROP_IMPLEMENTATIONS: dict[str, Callable[[bytes | memoryview], bool]] = {
    "python": mentions_statement_drop_python,
    **({"compiled": mentions_statement_drop_compiled} if mentions_statement_drop_compiled is not None else {}),
}
mentions_reset: Callable[[bytes | memoryview], bool] = mentions_reset_compiled or mentions_reset_python
mentions_statement_drop: Callable[[bytes | memoryview], bool] = (mentions_statement_drop_compiled
                                                                  or mentions_statement_drop_python)
SESSION_STATE_IMPLEMENTATIONS: dict[str, Callable[[bytes | memoryview], bool]] = {
    "python": mentions_session_state_python,
    **({"compiled": mentions_session_state_compiled} if mentions_session_state_compiled is not None else {}),
}
mentions_session_state: Callable[[bytes | memoryview], bool] = (mentions_session_state_compiled
                                                                 or mentions_session_state_python)
