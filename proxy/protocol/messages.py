"""Message type codes of the PostgreSQL v3 protocol and builders/parsers for the messages pgmux itself speaks."""

from __future__ import annotations

import enum
import functools
import struct
from collections.abc import Iterable, Mapping
from typing import Final

# Frontend (client -> server) message types.
BIND: Final = ord("B")
CLOSE: Final = ord("C")
COPY_DATA: Final = ord("d")
COPY_DONE: Final = ord("c")
COPY_FAIL: Final = ord("f")
DESCRIBE: Final = ord("D")
EXECUTE: Final = ord("E")
FLUSH: Final = ord("H")
FUNCTION_CALL: Final = ord("F")
PARSE: Final = ord("P")
PASSWORD: Final = ord("p")  # also SASLInitialResponse / SASLResponse / GSSResponse
QUERY: Final = ord("Q")
SYNC: Final = ord("S")
TERMINATE: Final = ord("X")

# Backend (server -> client) message types.
AUTHENTICATION: Final = ord("R")
BACKEND_KEY_DATA: Final = ord("K")
BIND_COMPLETE: Final = ord("2")
CLOSE_COMPLETE: Final = ord("3")
COMMAND_COMPLETE: Final = ord("C")
COPY_IN_RESPONSE: Final = ord("G")
COPY_OUT_RESPONSE: Final = ord("H")
COPY_BOTH_RESPONSE: Final = ord("W")
DATA_ROW: Final = ord("D")
EMPTY_QUERY_RESPONSE: Final = ord("I")
ERROR_RESPONSE: Final = ord("E")
FUNCTION_CALL_RESPONSE: Final = ord("V")
NEGOTIATE_PROTOCOL_VERSION: Final = ord("v")
NO_DATA: Final = ord("n")
NOTICE_RESPONSE: Final = ord("N")
NOTIFICATION_RESPONSE: Final = ord("A")
PARAMETER_DESCRIPTION: Final = ord("t")
PARAMETER_STATUS: Final = ord("S")
PARSE_COMPLETE: Final = ord("1")
PORTAL_SUSPENDED: Final = ord("s")
READY_FOR_QUERY: Final = ord("Z")
ROW_DESCRIPTION: Final = ord("T")

# Authentication request codes carried by an AUTHENTICATION message.
AUTH_OK: Final = 0
AUTH_CLEARTEXT_PASSWORD: Final = 3
AUTH_MD5_PASSWORD: Final = 5
AUTH_SASL: Final = 10
AUTH_SASL_CONTINUE: Final = 11
AUTH_SASL_FINAL: Final = 12

INT32 = struct.Struct("!i")
UINT32 = struct.Struct("!I")
HEADER = struct.Struct("!cI")
_TYPED_HEADER = struct.Struct("!BI")
_TWO_INT32 = struct.Struct("!ii")


class TransactionStatus(enum.Enum):
    """The status byte of ReadyForQuery."""

    IDLE = ord("I")
    IN_TRANSACTION = ord("T")
    FAILED = ord("E")


# A dict lookup per ReadyForQuery instead of an Enum call: this runs once per transaction.
TRANSACTION_STATUS_BY_BYTE: dict[int, TransactionStatus] = {status.value: status for status in TransactionStatus}


def message(kind: int, body: bytes = b"") -> bytes:
    """Frame ``body`` as one typed message."""
    return _TYPED_HEADER.pack(kind, len(body) + 4) + body


def cstring(text: str) -> bytes:
    return text.encode() + b"\x00"


def read_cstring(body: bytes | memoryview, offset: int) -> tuple[str, int]:
    """Decode a NUL-terminated string at ``offset``; return it and the offset after the NUL."""
    data = bytes(body)
    end = data.index(b"\x00", offset)
    return data[offset:end].decode("utf-8", "replace"), end + 1


# ---- backend messages pgmux sends to clients -------------------------------------------------

def authentication_ok() -> bytes:
    return _AUTHENTICATION_OK


def authentication_cleartext() -> bytes:
    return message(AUTHENTICATION, INT32.pack(AUTH_CLEARTEXT_PASSWORD))


def authentication_md5(salt: bytes) -> bytes:
    return message(AUTHENTICATION, INT32.pack(AUTH_MD5_PASSWORD) + salt)


def authentication_sasl(mechanisms: Iterable[str]) -> bytes:
    body = INT32.pack(AUTH_SASL) + b"".join(cstring(m) for m in mechanisms) + b"\x00"
    return message(AUTHENTICATION, body)


def authentication_sasl_continue(data: bytes) -> bytes:
    return message(AUTHENTICATION, INT32.pack(AUTH_SASL_CONTINUE) + data)


def authentication_sasl_final(data: bytes) -> bytes:
    return message(AUTHENTICATION, INT32.pack(AUTH_SASL_FINAL) + data)


def parameter_status(name: str, value: str) -> bytes:
    return message(PARAMETER_STATUS, cstring(name) + cstring(value))


def parameter_statuses(params: Mapping[str, str]) -> bytes:
    return _parameter_statuses(tuple(params.items()))


@functools.lru_cache(maxsize=256)
def _parameter_statuses(items: tuple[tuple[str, str], ...]) -> bytes:
    # Every login is welcomed with the same dozen or so parameters: build their messages once.
    return b"".join(parameter_status(k, v) for k, v in items)


def backend_key_data(process_id: int, secret_key: int) -> bytes:
    return message(BACKEND_KEY_DATA, _TWO_INT32.pack(process_id, secret_key))


def ready_for_query(status: TransactionStatus = TransactionStatus.IDLE) -> bytes:
    return _READY_FOR_QUERY[status]


def negotiate_protocol_version(newest_minor: int, unsupported_options: Iterable[str]) -> bytes:
    options = list(unsupported_options)
    body = INT32.pack(newest_minor) + INT32.pack(len(options)) + b"".join(cstring(o) for o in options)
    return message(NEGOTIATE_PROTOCOL_VERSION, body)


def command_complete(tag: str) -> bytes:
    return message(COMMAND_COMPLETE, cstring(tag))


def close_complete() -> bytes:
    return message(CLOSE_COMPLETE)


# ---- frontend messages pgmux sends to servers ------------------------------------------------

def query(sql: str) -> bytes:
    return message(QUERY, cstring(sql))


def extended_query(sql: str, parameters: Iterable[str]) -> bytes:
    """Parse, Bind, Execute and Sync of ``sql`` as the unnamed statement, its parameters sent as text."""
    values = list(parameters)
    parse = message(PARSE, b"\x00" + cstring(sql) + b"\x00\x00")
    bound = b"".join(struct.pack("!i", len(encoded)) + encoded for encoded in (v.encode() for v in values))
    bind = message(BIND, b"\x00\x00" + b"\x00\x00" + struct.pack("!h", len(values)) + bound + b"\x00\x00")
    return parse + bind + message(EXECUTE, b"\x00\x00\x00\x00\x00") + message(SYNC)


def terminate() -> bytes:
    return message(TERMINATE)


def password_message(password: bytes) -> bytes:
    return message(PASSWORD, password + b"\x00")


def sasl_initial_response(mechanism: str, data: bytes) -> bytes:
    return message(PASSWORD, cstring(mechanism) + INT32.pack(len(data)) + data)


def sasl_response(data: bytes) -> bytes:
    return message(PASSWORD, data)


# ---- parsers for message bodies (body = the bytes after the 5-byte header) ------------------

def parse_parameter_status(body: bytes | memoryview) -> tuple[str, str]:
    name, offset = read_cstring(body, 0)
    value, _ = read_cstring(body, offset)
    return name, value


def parse_backend_key_data(body: bytes | memoryview) -> tuple[int, int]:
    # Protocol 3.2 allows longer secrets; pgmux negotiates 3.0, where the secret is 4 bytes.
    return _TWO_INT32.unpack_from(body, 0)


def parse_authentication(body: bytes | memoryview) -> tuple[int, bytes]:
    """Return the authentication request code and its payload."""
    (code,) = INT32.unpack_from(body, 0)
    return code, bytes(body[4:])


def parse_sasl_mechanisms(payload: bytes) -> list[str]:
    return [m.decode() for m in payload.split(b"\x00") if m]


def parse_sasl_initial_response(body: bytes | memoryview) -> tuple[str, bytes]:
    """Return the chosen mechanism and the client-first-message of a SASLInitialResponse."""
    mechanism, offset = read_cstring(body, 0)
    (length,) = INT32.unpack_from(body, offset)
    data = bytes(body[offset + 4:])
    if length != -1 and length != len(data):
        raise ValueError("SASLInitialResponse length does not match its data")
    return mechanism, data


def parse_password(body: bytes | memoryview) -> bytes:
    """The payload of a PasswordMessage: the password (cleartext or md5 hash) without its NUL."""
    data = bytes(body)
    return data[:-1] if data.endswith(b"\x00") else data


# ---- result sets pgmux answers itself (the admin console) ------------------------------------

# Type OIDs of the columns pgmux sends, with their typlen as RowDescription carries it.
TEXT_OID: Final = 25
INT4_OID: Final = 23
INT8_OID: Final = 20
NUMERIC_OID: Final = 1700
_TYPE_SIZES = {TEXT_OID: -1, INT4_OID: 4, INT8_OID: 8, NUMERIC_OID: -1}
_FIELD = struct.Struct("!IhIhih")  # table oid, column number, type oid, typlen, typmod, format (text)
_INT16 = struct.Struct("!h")


def row_description(columns: Iterable[tuple[str, int]]) -> bytes:
    """RowDescription for text-format columns given as (name, type oid)."""
    columns = list(columns)
    body = [_INT16.pack(len(columns))]
    for name, oid in columns:
        body.append(cstring(name) + _FIELD.pack(0, 0, oid, _TYPE_SIZES.get(oid, -1), -1, 0))
    return message(ROW_DESCRIPTION, b"".join(body))


def data_row(values: Iterable[str | None]) -> bytes:
    """DataRow of text values; None is SQL NULL."""
    values = list(values)
    body = [_INT16.pack(len(values))]
    for value in values:
        if value is None:
            body.append(INT32.pack(-1))
        else:
            encoded = value.encode()
            body.append(INT32.pack(len(encoded)) + encoded)
    return message(DATA_ROW, b"".join(body))


def empty_query_response() -> bytes:
    return message(EMPTY_QUERY_RESPONSE)


# Sent on every login: built once.
_AUTHENTICATION_OK = message(AUTHENTICATION, INT32.pack(AUTH_OK))
_READY_FOR_QUERY = {status: message(READY_FOR_QUERY, bytes((status.value,))) for status in TransactionStatus}
