"""Startup-phase packets (no type byte): StartupMessage, SSLRequest, GSSENCRequest and CancelRequest."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

from proxy.protocol.framing import ProtocolViolation

PROTOCOL_3_0: Final = 3 << 16
SSL_REQUEST_CODE: Final = 80877103
GSSENC_REQUEST_CODE: Final = 80877104
CANCEL_REQUEST_CODE: Final = 80877102

# PostgreSQL's MAX_STARTUP_PACKET_LENGTH: a longer startup packet is an attack or a bug.
MAX_STARTUP_PACKET_LENGTH: Final = 10000

_LENGTH_AND_CODE: Final = struct.Struct("!ii")


@dataclass(frozen=True)
class SSLRequest:
    pass


@dataclass(frozen=True)
class GSSENCRequest:
    pass


@dataclass(frozen=True)
class CancelRequest:
    process_id: int
    secret_key: bytes  # 4 bytes in protocol 3.0; 3.2 allows up to 256


class StartupMessage:
    """A plain class, not a dataclass: one is made per login, and compiled, a plain class's __init__
    is native code where a dataclass's generated one is interpreted."""

    __slots__ = ("major", "minor", "parameters")

    def __init__(self, major: int, minor: int, parameters: dict[str, str]) -> None:
        self.major = major
        self.minor = minor
        self.parameters = parameters

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, StartupMessage):
            return NotImplemented
        return (self.major, self.minor, self.parameters) == (other.major, other.minor, other.parameters)

    def __repr__(self) -> str:
        return f"StartupMessage(major={self.major}, minor={self.minor}, parameters={self.parameters!r})"

    @property
    def user(self) -> str:
        return self.parameters.get("user", "")

    @property
    def database(self) -> str:
        return self.parameters.get("database") or self.user


StartupPacket = SSLRequest | GSSENCRequest | CancelRequest | StartupMessage

# Immutable and alike: one of each serves every connection (a dataclass's __init__ runs interpreted, and
# libpq sends an SSLRequest first by default, so one would be made per login).
_SSL_REQUEST: Final = SSLRequest()
_GSSENC_REQUEST: Final = GSSENCRequest()


def read_startup_packet(buffer: bytes | bytearray) -> tuple[StartupPacket, int] | None:
    """Parse one startup-phase packet from the front of ``buffer``.

    Returns the packet and how many bytes it used, or None when more bytes are needed.
    """
    return startup_packet_at(buffer if isinstance(buffer, bytes) else bytes(buffer), 0)


def startup_packet_at(data: bytes, start: int) -> tuple[StartupPacket, int] | None:
    """``read_startup_packet`` for the packet at ``start`` in ``data``: as ``data`` is bytes, compiled, every
    length, index and slice here is native code (no struct call, no copy of the bytes before ``start``)."""
    available = len(data) - start
    if available < 8:
        if available >= 4:
            _check_length(_int32(data, start))
        return None
    length = _int32(data, start)
    _check_length(length)
    if available < length:
        return None
    code = _int32(data, start + 4)
    if code == SSL_REQUEST_CODE and length == 8:
        return _SSL_REQUEST, length
    if code == GSSENC_REQUEST_CODE and length == 8:
        return _GSSENC_REQUEST, length
    end = start + length
    if code == CANCEL_REQUEST_CODE and length >= 16:
        return CancelRequest(_int32(data, start + 8), data[start + 12:end]), length
    major, minor = code >> 16, code & 0xFFFF
    if major != 3:
        raise ProtocolViolation(f"unsupported frontend protocol {major}.{minor}: server supports 3.0")
    return StartupMessage(major, minor, _parse_parameters(data, start + 8, end)), length


def _int32(data: bytes, at: int) -> int:
    """The signed big-endian 32-bit integer at ``at``."""
    value = data[at] << 24 | data[at + 1] << 16 | data[at + 2] << 8 | data[at + 3]
    return value - (1 << 32) if value >= 1 << 31 else value


def _check_length(length: int) -> None:
    if length < 8 or length > MAX_STARTUP_PACKET_LENGTH:
        raise ProtocolViolation(f"invalid length of startup packet: {length}")


# Parameter sections parsed lately, by their bytes: an application's connections nearly all send the same one
# (user, database, application_name...), and a copy of the parse costs a tenth of parsing it again.
_PARSED_KEPT: Final = 32
_parsed: Final[dict[bytes, dict[str, str]]] = {}


def _parse_parameters(data: bytes, start: int, end: int) -> dict[str, str]:
    """The parameters in ``data[start:end]``: NUL-terminated names and values, the list ending with an empty name."""
    size = end - start
    if size == 1 and data[start] == 0:
        return {}
    section = data[start:end]
    known = _parsed.get(section)
    if known is not None:
        return dict(known)  # a copy: the caller's to keep
    parameters = _parse_section(data, start, end)
    if len(_parsed) >= _PARSED_KEPT:
        _parsed.clear()  # ever new sections (a new application_name per process...): start again
    _parsed[section] = dict(parameters)
    return parameters


def _parse_section(data: bytes, start: int, end: int) -> dict[str, str]:
    size = end - start
    if size < 2 or data[end - 2] != 0 or data[end - 1] != 0:
        raise ProtocolViolation("startup packet parameters are not NUL-terminated")
    try:
        parts = data[start:end - 2].decode("utf-8").split("\x00")  # NUL is never part of a UTF-8 sequence
    except UnicodeDecodeError as exc:
        raise ProtocolViolation("startup packet is not valid UTF-8") from exc
    count = len(parts)
    if count % 2:
        raise ProtocolViolation("startup packet has a parameter name without a value")
    # An indexed loop, not dict(zip(...)): compiled, it is native code, where the slices and zip are not.
    parameters: dict[str, str] = {}
    for i in range(0, count, 2):
        parameters[parts[i]] = parts[i + 1]
    return parameters


def build_startup_message(parameters: dict[str, str], minor: int = 0) -> bytes:
    body = b"".join(k.encode() + b"\x00" + v.encode() + b"\x00" for k, v in parameters.items()) + b"\x00"
    return _LENGTH_AND_CODE.pack(len(body) + 8, PROTOCOL_3_0 | minor) + body


def build_ssl_request() -> bytes:
    return _LENGTH_AND_CODE.pack(8, SSL_REQUEST_CODE)


def build_cancel_request(process_id: int, secret_key: bytes) -> bytes:
    return _LENGTH_AND_CODE.pack(12 + len(secret_key), CANCEL_REQUEST_CODE) + struct.pack("!i", process_id) + secret_key
