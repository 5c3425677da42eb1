"""Words pgmux looks for in a simple Query's SQL text, without parsing it."""

from __future__ import annotations

import re
from collections.abc import Callable

_RESET_OR_DISCARD = re.compile(rb"(?i)\b(?:reset|discard)\b")


def mentions_reset_python(sql: bytes | memoryview) -> bool:
    """Whether the text has the word RESET or DISCARD: it may put session settings back to defaults.

    Over-eager on purpose (a string literal or a comment counts too): a false alarm costs a
    parameter re-sync, a miss would leave a client with settings it did not ask for. The
    reference for (and fallback to) the compiled version in ``_scanner.c``, which runs on every
    simple Query.
    """
    return _RESET_OR_DISCARD.search(sql) is not None


try:
    from proxy.protocol._scanner import mentions_reset as mentions_reset_compiled  # type: ignore[import-not-found,import-untyped,unused-ignore]
except ImportError:  # not built (no C compiler at install time)
    mentions_reset_compiled = None

IMPLEMENTATIONS: dict[str, Callable[[bytes | memoryview], bool]] = {
    "python": mentions_reset_python,
    **({"compiled": mentions_reset_compiled} if mentions_reset_compiled is not None else {}),
}
mentions_reset: Callable[[bytes | memoryview], bool] = mentions_reset_compiled or mentions_reset_python
