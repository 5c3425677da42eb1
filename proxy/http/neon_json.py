"""Neon's SQL-over-HTTP JSON, both ways: parameters to PostgreSQL text, answers and errors to JSON (sans-IO).

As Neon's proxy does it (proxy/src/serverless/json.rs and sql_over_http.rs), so that the serverless driver,
PrismaNeonHTTP and drizzle-orm/neon-http read pgmux's answers exactly as they read Neon's.
"""

from __future__ import annotations

import math
from typing import Any, Final

import orjson

from proxy.results import Column, StatementResult

# ---- parameters: JSON -> PostgreSQL text -----------------------------------------------------------


def param_to_text(value: Any) -> str | None:
    """A JSON parameter as the text PostgreSQL gets: null is NULL, a string as it is, an array a PostgreSQL
    array literal, anything else its JSON text."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return _array_literal(value)
    return orjson.dumps(value).decode()


def _array_literal(value: Any) -> str:
    """An array element: inside an array a string is quoted and escaped (its JSON text is a valid PostgreSQL
    array element), an object is quoted JSON text, null is NULL."""
    if value is None:
        return "NULL"
    if isinstance(value, list):
        return "{" + ",".join(_array_literal(item) for item in value) + "}"
    if isinstance(value, dict):
        return _array_literal(orjson.dumps(value).decode())
    return orjson.dumps(value).decode()


# ---- values: PostgreSQL text -> JSON -------------------------------------------------------------

BOOL_OID: Final = 16
INT2_OID: Final = 21
INT4_OID: Final = 23
FLOAT4_OID: Final = 700
FLOAT8_OID: Final = 701
JSON_OID: Final = 114
JSONB_OID: Final = 3802
# Array types of the built-in element types (pg_type.typarray): their elements are converted as the element
# type's values are. Arrays of other types are not known without the catalogue; Neon's proxy has the same list
# for the types it converts, and leaves every other value as its text.
_ARRAY_ELEMENTS: Final = {
    1000: BOOL_OID, 1005: INT2_OID, 1007: INT4_OID, 1021: FLOAT4_OID, 1022: FLOAT8_OID, 199: JSON_OID,
    3807: JSONB_OID,
    1001: 17, 1002: 18, 1003: 19, 1016: 20, 1006: 22, 1009: 25, 1028: 26, 1010: 27, 1011: 28, 1012: 29,
    1014: 1042, 1015: 1043, 1182: 1082, 1183: 1083, 1115: 1114, 1185: 1184, 1187: 1186, 1270: 1266,
    1231: 1700, 2951: 2950, 1040: 829, 1041: 869, 651: 650, 1561: 1560, 1563: 1562, 1017: 600, 1018: 601,
    1019: 602, 1020: 603, 1027: 604, 629: 628, 719: 718, 3643: 3614, 3645: 3615, 3905: 3904, 3907: 3906,
    3909: 3908, 3911: 3910, 3913: 3912, 3927: 3926, 2287: 2249, 1008: 24, 2211: 2206, 12052: 4072, 791: 790,
}


class BadArrayText(ValueError):
    """A value PostgreSQL sent that its type's JSON conversion cannot read."""


def text_to_json(text: str | None, type_id: int) -> Any:
    """A value as Neon's JSON shows it: booleans, int2/int4, floats (NaN and infinities as text), json and jsonb
    parsed, arrays as JSON arrays; everything else (int8, numeric, dates...) as its text, which loses nothing."""
    if text is None:
        return None
    element = _ARRAY_ELEMENTS.get(type_id)
    if element is not None:
        return _parse_array(text, element)
    return _scalar_to_json(text, type_id)


def _scalar_to_json(text: str, type_id: int) -> Any:
    if type_id == BOOL_OID:
        return text == "t"
    if type_id == INT2_OID or type_id == INT4_OID:
        return int(text)
    if type_id == FLOAT4_OID or type_id == FLOAT8_OID:
        number = float(text)
        return number if math.isfinite(number) else text
    if type_id == JSON_OID or type_id == JSONB_OID:
        return orjson.loads(text)
    return text


def _parse_array(text: str, element: int) -> Any:
    """A PostgreSQL array literal (``{1,2}``, ``{{"a b",NULL}}``, ``[0:1]={x,y}``) as nested JSON arrays."""
    if text.startswith("["):  # explicit bounds: the values are after the '='
        text = text[text.index("=") + 1:]
    parsed, end = _parse_array_at(text, 0, element)
    if end != len(text):
        raise BadArrayText(f"unexpected text after an array: {text[end:]!r}")
    return parsed


def _parse_array_at(text: str, pos: int, element: int) -> tuple[list[Any], int]:
    if text[pos:pos + 1] != "{":
        raise BadArrayText(f"an array must begin with '{{': {text!r}")
    pos += 1
    items: list[Any] = []
    if text[pos:pos + 1] == "}":
        return items, pos + 1
    while True:
        if text[pos:pos + 1] == "{":
            nested, pos = _parse_array_at(text, pos, element)
            items.append(nested)
        elif text[pos:pos + 1] == '"':
            value, pos = _quoted_element(text, pos + 1)
            items.append(_scalar_to_json(value, element))
        else:
            end = pos
            while end < len(text) and text[end] not in ",}":
                end += 1
            raw = text[pos:end]
            items.append(None if raw == "NULL" else _scalar_to_json(raw, element))
            pos = end
        if pos >= len(text):
            raise BadArrayText(f"unterminated array: {text!r}")
        if text[pos] == "}":
            return items, pos + 1
        if text[pos] != ",":  # box[] uses ';', which no type converted here has
            raise BadArrayText(f"unexpected {text[pos]!r} in an array: {text!r}")
        pos += 1


def _quoted_element(text: str, pos: int) -> tuple[str, int]:
    out: list[str] = []
    while pos < len(text):
        char = text[pos]
        if char == "\\":
            out.append(text[pos + 1:pos + 2])
            pos += 2
        elif char == '"':
            return "".join(out), pos + 1
        else:
            out.append(char)
            pos += 1
    raise BadArrayText(f"unterminated quoted array element: {text!r}")


# ---- answers ---------------------------------------------------------------------------------------


def _command(tag: str | None) -> tuple[str, int | None]:
    """The command word of a CommandComplete tag and its row count (INSERT's is its third word), if any."""
    words = (tag or "").split(" ")
    count_at = 2 if words[0] == "INSERT" else 1
    count = words[count_at] if len(words) > count_at else ""
    return words[0], int(count) if count.isdigit() else None


def _field(column: Column) -> dict[str, Any]:
    return {"name": column.name, "dataTypeID": column.type_id, "tableID": column.table_id,
            "columnID": column.column_id, "dataTypeSize": column.type_size,
            "dataTypeModifier": column.type_modifier, "format": "text"}


def result_json(result: StatementResult, array_mode: bool, raw_text: bool) -> dict[str, Any]:
    """One statement's answer: {fields, rows, command, rowCount, rowAsArray} (raises ValueError for a value
    its type's conversion cannot read)."""
    columns = result.columns
    rows: list[Any]
    if raw_text:
        converted = result.rows
    else:
        types = [column.type_id for column in columns]
        converted = [[text_to_json(value, type_id) for value, type_id in zip(row, types)] for row in result.rows]
    if array_mode:
        rows = converted
    else:
        names = [column.name for column in columns]
        rows = [dict(zip(names, row)) for row in converted]  # a repeated name keeps its last value, as in Neon
    command, row_count = _command(result.tag)
    return {"fields": [_field(column) for column in columns], "rows": rows, "command": command,
            "rowCount": row_count, "rowAsArray": array_mode}


# The ErrorResponse fields by the names Neon's error JSON gives them, in its order.
_ERROR_FIELDS: Final = (("message", "M"), ("code", "C"), ("detail", "D"), ("hint", "H"), ("position", "P"),
                        ("internalPosition", "p"), ("internalQuery", "q"), ("severity", "S"), ("where", "W"),
                        ("table", "t"), ("column", "c"), ("schema", "s"), ("dataType", "d"),
                        ("constraint", "n"), ("file", "F"), ("line", "L"), ("routine", "R"))


def error_json(fields: dict[str, str]) -> bytes:
    """Neon's error body for an ErrorResponse's fields; the driver makes each key a property of its error."""
    return orjson.dumps({name: fields.get(code) for name, code in _ERROR_FIELDS})
