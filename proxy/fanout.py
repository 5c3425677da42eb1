"""The admin console of a pgmux with workers, sans IO: what a worker's console asks its siblings, their answers,
and the merge of every worker's rows into one table for the whole pgmux.

A request travels to a sibling's private cancel address (proxy/peering.py) as a startup-style packet: length,
SIBLING_CONSOLE_CODE (beside CancelRequest's code, which the same address takes), then the request as JSON. The
answer is a 4-byte length and JSON: a SHOW's rows (the sibling's own, as its console would list them), or the
outcome of a command, or whether the sibling has settled after one (PAUSE, WAIT_CLOSE: the asking console polls).
"""

from __future__ import annotations

import re
import struct
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

import orjson

# 1234 << 16 | 5678 is CancelRequest's, 5679 SSLRequest's, 5680 GSSENCRequest's; no PostgreSQL request uses this.
SIBLING_CONSOLE_CODE: Final = 1234 << 16 | 5690
MAX_REQUEST_LENGTH: Final = 4096  # a command and its argument: far less
MAX_ANSWER_LENGTH: Final = 1 << 28  # SHOW CLIENTS of a worker with a million clients fits
REQUEST_HEADER: Final = struct.Struct("!ii")  # length (itself included), code
ANSWER_HEADER: Final = struct.Struct("!I")  # length of the JSON that follows

# What a request asks (ConsoleRequest.kind).
SHOW: Final = "show"  # the rows of SHOW <name>
COMMAND: Final = "command"  # run command <name> <argument> in the sibling
SETTLED: Final = "settled"  # has the sibling's <name> <argument> (PAUSE, WAIT_CLOSE) finished waiting?
_KINDS: Final = frozenset({SHOW, COMMAND, SETTLED})

Row = list[Any]


@dataclass(frozen=True)
class ConsoleRequest:
    kind: str
    name: str
    argument: str = ""


@dataclass(frozen=True)
class ConsoleAnswer:
    """A sibling's answer: ``rows`` of a SHOW; ``error`` (SQLSTATE, message) of a command that failed there;
    ``settled`` for a SETTLED request."""

    rows: list[Row] = field(default_factory=list)
    error: tuple[str, str] | None = None
    settled: bool = False


# Each sibling's answer by worker index, or why it gave none (dead, being replaced, too slow).
SiblingAnswers = dict[int, ConsoleAnswer | str]


class Siblings(Protocol):
    """A worker's way to its siblings' consoles (proxy/peering.py: SiblingConsoles), from the composition root."""

    async def ask(self, request: ConsoleRequest, only: Collection[int] | None = None) -> SiblingAnswers:
        """Every sibling's answer (or those of ``only``), asked at once; each within a bounded time."""
        ...


def encode_request(request: ConsoleRequest) -> bytes:
    body = orjson.dumps([request.kind, request.name, request.argument])
    return REQUEST_HEADER.pack(REQUEST_HEADER.size + len(body), SIBLING_CONSOLE_CODE) + body


def decode_request(body: bytes) -> ConsoleRequest:
    """The request from the bytes after its header; ValueError when they are not one."""
    try:
        kind, name, argument = orjson.loads(body)
    except (orjson.JSONDecodeError, TypeError, ValueError) as exc:
        raise ValueError(f"not a console request: {exc}") from None
    if kind not in _KINDS or not isinstance(name, str) or not isinstance(argument, str):
        raise ValueError(f"not a console request: {kind!r} {name!r} {argument!r}")
    return ConsoleRequest(kind, name, argument)


def encode_answer(answer: ConsoleAnswer) -> bytes:
    body = orjson.dumps({"rows": answer.rows, "error": answer.error, "settled": answer.settled})
    return ANSWER_HEADER.pack(len(body)) + body


def answer_length(header: bytes) -> int:
    """The length of the JSON after an answer's 4-byte ``header``; ValueError past MAX_ANSWER_LENGTH."""
    (length,) = ANSWER_HEADER.unpack(header)
    if length > MAX_ANSWER_LENGTH:
        raise ValueError(f"console answer of {length} bytes")
    return int(length)


def decode_answer(body: bytes) -> ConsoleAnswer:
    try:
        decoded = orjson.loads(body)
        rows, error, settled = decoded["rows"], decoded["error"], decoded["settled"]
    except (orjson.JSONDecodeError, TypeError, KeyError) as exc:
        raise ValueError(f"not a console answer: {exc}") from None
    if not isinstance(rows, list) or not all(isinstance(row, list) for row in rows):
        raise ValueError("not a console answer: rows")
    return ConsoleAnswer(rows, (str(error[0]), str(error[1])) if error else None, bool(settled))


# ---- connections of every worker: one id space --------------------------------------------------------------


def connection_label(connection_id: str, worker: int, workers: int) -> str:
    """A connection's ptr/link text in SHOW CLIENTS / SERVERS: its id as the logs name it (``w1 c42`` with
    workers, ``c42`` without)."""
    return f"w{worker} {connection_id}" if workers > 1 and connection_id else connection_id


def connection_number(number: int, worker: int, workers: int) -> int:
    """A connection's ``id`` column, unique in the whole pgmux: its own number times the workers, plus its
    worker's index (the number itself with one worker), so that KILL_CLIENT <id> finds its worker."""
    return number * workers + worker


_NAMED_CLIENT = re.compile(r"^w(\d+)\s*c(\d+)$")


def client_owner(argument: str, workers: int) -> tuple[int, str] | None:
    """(worker, its client id ``c<n>``) that KILL_CLIENT's argument names: SHOW CLIENTS' ``id`` column, or its
    ``ptr`` (``w1 c42``, ``w1c42``; ``c42`` or ``42`` with one worker). None when it names no client."""
    argument = argument.strip()
    named = _NAMED_CLIENT.match(argument)
    if named is not None:
        worker = int(named.group(1))
        return (worker, f"c{int(named.group(2))}") if worker < workers else None
    if argument.isdigit():
        number = int(argument)
        return number % workers, f"c{number // workers}"
    if workers == 1 and argument.startswith("c") and argument[1:].isdigit():
        return 0, f"c{int(argument[1:])}"
    return None


# ---- merging the rows of every worker -------------------------------------------------------------------------

# How one column merges across workers (rules by column name; a column without one is SAME).
KEY: Final = "key"  # part of the row's identity: rows with equal keys merge into one
SUM: Final = "sum"  # a count or a total of each worker's own (a number, or a number as text)
MAX: Final = "max"
MICROS: Final = "micros"  # the microseconds of the MAX column before it: the pair is one maximum
SAME: Final = "same"  # the same in every worker (a whole-pgmux setting, such as a backend limit): the local one
MODE: Final = "mode"  # the same in every worker, or "mixed"


@dataclass(frozen=True)
class Weighted:
    """An average per event (a transaction's time): each worker's weighted by its count of those events (the
    column ``by``: its rate over the same stats_period), so the merge is the average over all the events."""

    by: str


Rule = str | Weighted


def merge_rows(columns: Sequence[str], rules: Mapping[str, Rule], tables: Sequence[list[Row]]) -> list[Row]:
    """One table from each worker's (the local one first): rows with equal KEY columns merged column by column
    by ``rules``; ordered by key."""
    keys = [index for index, name in enumerate(columns) if rules.get(name) == KEY]
    groups: dict[tuple[Any, ...], list[Row]] = {}
    for rows in tables:
        for row in rows:
            groups.setdefault(tuple(row[index] for index in keys), []).append(row)
    merged = [_merge_group(columns, rules, group) for group in groups.values()]
    return sorted(merged, key=lambda row: tuple(str(row[index]) for index in keys))


def _merge_group(columns: Sequence[str], rules: Mapping[str, Rule], rows: list[Row]) -> Row:
    merged = list(rows[0])
    for index, name in enumerate(columns):
        rule = rules.get(name, SAME)
        values = [row[index] for row in rows]
        if rule == SUM:
            total = sum(_number(value) for value in values)
            merged[index] = str(total) if isinstance(values[0], str) else total
        elif rule == MAX:
            paired = index + 1 < len(columns) and rules.get(columns[index + 1]) == MICROS
            top = max(rows, key=lambda row: (row[index] or 0, (row[index + 1] or 0) if paired else 0))
            merged[index] = top[index]
            if paired:
                merged[index + 1] = top[index + 1]
        elif rule == MODE:
            merged[index] = values[0] if len(set(values)) == 1 else "mixed"
        elif isinstance(rule, Weighted):
            weights = [_number(row[columns.index(rule.by)]) for row in rows]
            total = sum(weights)
            merged[index] = sum(_number(value) * weight for value, weight in zip(values, weights)) // total \
                if total else max(_number(value) for value in values)
    return merged


def merge_named_values(rules: Mapping[str, Rule], tables: Sequence[list[Row]]) -> list[Row]:
    """Tables of (name, value, ...) rows (SHOW TOTALS, SHOW CONFIG): each name's value merged by its rule, as
    if the names were columns of one row (a name without a rule: the local value); in the local order."""
    names = [str(row[0]) for row in tables[0]] if tables else []
    wide = [[{str(row[0]): row[1] for row in rows}.get(name) for name in names] for rows in tables]
    values = _merge_group(names, rules, wide)
    return [[row[0], value, *row[2:]] for row, value in zip(tables[0], values)] if tables else []


def _number(value: Any) -> int:
    if isinstance(value, int):
        return value
    return int(value) if isinstance(value, str) and value.isdigit() else 0


def concatenate(tables: Sequence[list[Row]]) -> list[Row]:
    """Lists of connections (SHOW CLIENTS, SERVERS): every worker's rows, the local worker's first."""
    return [row for rows in tables for row in rows]
