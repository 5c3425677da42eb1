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
    if len(buffer) < 8:
        if len(buffer) >= 4:
            _check_length(struct.unpack_from("!i", buffer, 0)[0])
        return None
    length: int  # declared: compiled, the comparisons and shifts below are then native
    code: int
    length, code = _LENGTH_AND_CODE.unpack_from(buffer, 0)
    _check_length(length)
    if len(buffer) < length:
        return None
    if code == SSL_REQUEST_CODE and length == 8:
        return _SSL_REQUEST, length
    if code == GSSENC_REQUEST_CODE and length == 8:
        return _GSSENC_REQUEST, length
    body = bytes(buffer[8:length])
    if code == CANCEL_REQUEST_CODE and length >= 16:
        (process_id,) = struct.unpack_from("!i", body, 0)
        return CancelRequest(process_id, body[4:]), length
    major, minor = code >> 16, code & 0xFFFF
    if major != 3:
        raise ProtocolViolation(f"unsupported frontend protocol {major}.{minor}: server supports 3.0")
    return StartupMessage(major, minor, _parse_parameters(body)), length


def _check_length(length: int) -> None:
    if length < 8 or length > MAX_STARTUP_PACKET_LENGTH:
        raise ProtocolViolation(f"invalid length of startup packet: {length}")


def _parse_parameters(body: bytes) -> dict[str, str]:
    # name\0value\0 ... \0: the list ends with an empty name.
    if body == b"\x00":
        return {}
    if not body.endswith(b"\x00\x00"):
        raise ProtocolViolation("startup packet parameters are not NUL-terminated")
    try:
        parts = body[:-2].decode("utf-8").split("\x00")  # NUL is never part of a UTF-8 sequence
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
