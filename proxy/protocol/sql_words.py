"""Words pgmux looks for in the SQL text of a simple Query or a Parse, without parsing it."""

from __future__ import annotations

import re
from collections.abc import Callable

_RESET_OR_DISCARD = re.compile(rb"(?i)\b(?:reset|discard)\b")
_DEALLOCATE_OR_DISCARD = re.compile(rb"(?i)\b(?:deallocate|discard)\b")
# What drops_all_statements reads: comments, quoted text, statement ends, words, any other character.
_LEXEMES = re.compile(rb"""
    (?P<comment>--[^\n]*|/\*.*?\*/)
  | (?P<quoted>[Ee]'(?:[^'\\]|\\.|'')*'|'(?:[^']|'')*'|"(?:[^"]|"")*"|\$(?P<tag>[A-Za-z_]\w*)?\$.*?\$(?P=tag)\$)
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


try:
    from proxy.protocol._scanner import mentions_reset as mentions_reset_compiled  # type: ignore[import-not-found,import-untyped,unused-ignore]
    from proxy.protocol._scanner import mentions_statement_drop as mentions_statement_drop_compiled  # type: ignore[import-not-found,import-untyped,unused-ignore]
except ImportError:  # not built (no C compiler at install time)
    mentions_reset_compiled = mentions_statement_drop_compiled = None

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
