"""Neon's SQL-over-HTTP JSON conversions (proxy/http/neon_json.py), as Neon's json.rs does them."""

from __future__ import annotations

import struct

import orjson
import pytest

from proxy.http.neon_json import error_json, param_to_text, result_json, text_to_json
from proxy.protocol import messages as m
from proxy.results import ResultCollector


@pytest.mark.parametrize(("value", "text"), [
    (None, None),
    ("plain 'text' \\ ü", "plain 'text' \\ ü"),
    (42, "42"),
    (1.5, "1.5"),
    (True, "true"),
    ({"a": [1, "x"]}, '{"a":[1,"x"]}'),
    ([1, 2, None], "{1,2,NULL}"),
    (["a b", 'q"uote', "back\\slash"], '{"a b","q\\"uote","back\\\\slash"}'),
    ([[1, 2], [3, 4]], "{{1,2},{3,4}}"),
    ([{"k": "v"}], '{"{\\"k\\":\\"v\\"}"}'),
])
def test_params_become_postgresql_text_as_neon_sends_them(value: object, text: str | None) -> None:
    assert param_to_text(value) == text


@pytest.mark.parametrize(("text", "type_id", "value"), [
    (None, 23, None),
    ("t", 16, True),
    ("f", 16, False),
    ("-7", 21, -7),
    ("2147483647", 23, 2147483647),
    ("9007199254740993", 20, "9007199254740993"),  # int8 stays text: JSON numbers would lose digits
    ("1.25", 1700, "1.25"),
    ("1.5", 701, 1.5),
    ("NaN", 701, "NaN"),
    ("-Infinity", 700, "-Infinity"),
    ('{"a": [1, null]}', 3802, {"a": [1, None]}),
    ("2024-01-02 03:04:05+00", 1184, "2024-01-02 03:04:05+00"),
    ("{1,NULL,3}", 1007, [1, None, 3]),
    ('{{"a b","c\\"d"},{NULL,e}}', 1009, [["a b", 'c"d'], [None, "e"]]),
    ("{}", 1009, []),
    ("[0:1]={t,f}", 1000, [True, False]),
    ('{"{\\"x\\": 1}"}', 3807, [{"x": 1}]),
])
def test_values_become_json_as_neon_shows_them(text: str | None, type_id: int, value: object) -> None:
    assert text_to_json(text, type_id) == value


def _row_description(*columns: tuple[str, int]) -> bytes:
    body = struct.pack("!h", len(columns))
    for name, type_id in columns:
        body += m.cstring(name) + struct.pack("!IhIhih", 16384, 1, type_id, 4, -1, 0)
    return body


def _data_row(*values: str | None) -> bytes:
    body = struct.pack("!h", len(values))
    for value in values:
        body += struct.pack("!i", -1) if value is None else struct.pack("!i", len(value.encode())) + value.encode()
    return body


def _collect(tag: bytes) -> ResultCollector:
    collector = ResultCollector(1 << 20)
    collector.take(m.ROW_DESCRIPTION, _row_description(("n", 23), ("s", 25)))
    collector.take(m.DATA_ROW, _data_row("1", "ü"))
    collector.take(m.DATA_ROW, _data_row(None, "x"))
    collector.take(m.COMMAND_COMPLETE, tag)
    collector.take(m.READY_FOR_QUERY, b"I")
    return collector


def test_an_answer_has_neons_fields_rows_command_and_row_count() -> None:
    result = _collect(b"SELECT 2\x00").results[0]
    assert result_json(result, array_mode=False, raw_text=False) == {
        "fields": [{"name": "n", "dataTypeID": 23, "tableID": 16384, "columnID": 1, "dataTypeSize": 4,
                    "dataTypeModifier": -1, "format": "text"},
                   {"name": "s", "dataTypeID": 25, "tableID": 16384, "columnID": 1, "dataTypeSize": 4,
                    "dataTypeModifier": -1, "format": "text"}],
        "rows": [{"n": 1, "s": "ü"}, {"n": None, "s": "x"}],
        "command": "SELECT", "rowCount": 2, "rowAsArray": False,
    }
    assert result_json(result, array_mode=True, raw_text=True)["rows"] == [["1", "ü"], [None, "x"]]


def test_an_inserts_row_count_is_its_third_word() -> None:
    result = _collect(b"INSERT 0 5\x00").results[0]
    assert result_json(result, array_mode=True, raw_text=False)["rowCount"] == 5
    assert result_json(_collect(b"CREATE TABLE\x00").results[0], True, False)["rowCount"] is None


def test_rows_beyond_the_limit_are_not_kept() -> None:
    collector = ResultCollector(25)  # each row's body is 11 bytes: two fit
    for _ in range(5):
        collector.take(m.DATA_ROW, _data_row("12345"))
    assert collector.overflow and len(collector.results) == 0
    collector.take(m.READY_FOR_QUERY, b"I")
    assert len(collector.results[0].rows) == 2


def test_an_error_has_every_field_neon_names() -> None:
    body = orjson.loads(error_json({"M": "division by zero", "C": "22012", "S": "ERROR", "F": "int.c", "L": "841"}))
    assert body["message"] == "division by zero" and body["code"] == "22012" and body["line"] == "841"
    assert list(body) == ["message", "code", "detail", "hint", "position", "internalPosition", "internalQuery",
                          "severity", "where", "table", "column", "schema", "dataType", "constraint", "file",
                          "line", "routine"]
