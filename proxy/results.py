"""What a backend answers pgmux's own extended-protocol statements with, per Sync: sans-IO collection.

The HTTP /sql endpoint runs its clients' statements as pgmux's own (ServerConnection.send_statements) and
answers with their columns, rows, command tags or errors; this module turns the replies into those.
"""

from __future__ import annotations

import struct
from typing import Final

from proxy.protocol import messages as m
from proxy.protocol.errors import parse_error_fields
from proxy.protocol.messages import read_cstring
from proxy.session_state import parse_data_row

_FIELD: Final = struct.Struct("!IhIhih")  # table oid, column number, type oid, typlen, typmod, format
_INT16: Final = struct.Struct("!h")


class Column:
    """One RowDescription field, as Neon's JSON names it."""

    __slots__ = ("name", "table_id", "column_id", "type_id", "type_size", "type_modifier")

    def __init__(self, name: str, table_id: int, column_id: int, type_id: int, type_size: int,
                 type_modifier: int) -> None:
        self.name = name
        self.table_id = table_id
        self.column_id = column_id
        self.type_id = type_id
        self.type_size = type_size
        self.type_modifier = type_modifier


def parse_row_description(body: bytes | memoryview) -> list[Column]:
    data = bytes(body)
    (count,) = _INT16.unpack_from(data)
    pos = 2
    columns = []
    for _ in range(count):
        name, pos = read_cstring(data, pos)
        table_id, column_id, type_id, type_size, type_modifier, _format = _FIELD.unpack_from(data, pos)
        pos += _FIELD.size
        columns.append(Column(name, table_id, column_id, type_id, type_size, type_modifier))
    return columns


class StatementResult:
    """The answer up to one ReadyForQuery: columns, text rows, the CommandComplete tag, or an error's fields."""

    __slots__ = ("columns", "rows", "tag", "error")

    def __init__(self) -> None:
        self.columns: list[Column] = []
        self.rows: list[list[str | None]] = []
        self.tag: str | None = None  # None: no CommandComplete (an error, or an empty query)
        self.error: dict[str, str] | None = None  # the ErrorResponse fields, by their one-letter codes


# The replies a collector needs to see (ServerConnection captures them while it collects).
COLLECTED_KINDS: Final = frozenset({m.ROW_DESCRIPTION, m.DATA_ROW, m.COMMAND_COMPLETE, m.ERROR_RESPONSE,
                                    m.READY_FOR_QUERY})


class ResultCollector:
    """Feeds on the replies to a request of several Syncs (or simple Queries): one StatementResult each.

    Rows beyond ``max_bytes`` of DataRow bytes are not kept (``overflow`` says so): the answer is then
    refused as too large, and pgmux's memory stays bounded however many rows a query returns.
    """

    __slots__ = ("results", "max_bytes", "row_bytes", "overflow", "_current")

    def __init__(self, max_bytes: int) -> None:
        self.results: list[StatementResult] = []
        self.max_bytes = max_bytes
        self.row_bytes = 0
        self.overflow = False
        self._current = StatementResult()

    def take(self, kind: int, body: bytes | memoryview) -> None:
        current = self._current
        if kind == m.DATA_ROW:
            self.row_bytes += len(body)
            if self.row_bytes > self.max_bytes:
                self.overflow = True
            if not self.overflow:
                current.rows.append(parse_data_row(body))
        elif kind == m.ROW_DESCRIPTION:
            current.columns = parse_row_description(body)
        elif kind == m.COMMAND_COMPLETE:
            current.tag = bytes(body).rstrip(b"\x00").decode("utf-8", "replace")
        elif kind == m.ERROR_RESPONSE:
            current.error = parse_error_fields(body)
        elif kind == m.READY_FOR_QUERY:
            self.results.append(current)
            self._current = StatementResult()
