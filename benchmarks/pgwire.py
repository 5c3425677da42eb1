"""A minimal PostgreSQL wire-protocol client for the benchmarks: log in, run a query, stay idle, leave.

Why not asyncpg/psycopg here: the storm and idle-fleet scenarios open 5,000-10,000 connections from
one Python process on a 2-core machine, and the latency scenario wants the client's own cost per
round trip as small and as constant as possible. This client does only what those scenarios need:

* StartupMessage, trust / cleartext / md5 / SCRAM-SHA-256 login (no channel binding, no TLS);
* a simple Query or an unnamed extended-protocol Parse/Bind/Execute/Sync, read to ReadyForQuery;
* Terminate.

SCRAM's PBKDF2 result is cached per (password, salt, iterations), so a server that keeps one salt per
user (PostgreSQL, PgBouncer with a SCRAM secret) costs the client a few HMACs per login.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import hmac
import os
import socket
import struct
import time
from dataclasses import dataclass

PROTOCOL_3_0 = 196608
_HEADER = struct.Struct("!cI")

AUTH_OK = 0
AUTH_CLEARTEXT = 3
AUTH_MD5 = 5
AUTH_SASL = 10
AUTH_SASL_CONTINUE = 11
AUTH_SASL_FINAL = 12


class PgError(Exception):
    """An ErrorResponse from the server (or a protocol surprise): ``sqlstate`` is '' for the latter."""

    def __init__(self, sqlstate: str, message: str) -> None:
        super().__init__(f"{sqlstate or 'protocol'}: {message}")
        self.sqlstate = sqlstate
        self.message = message


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int
    user: str
    password: str
    database: str


def parse_error_fields(body: bytes) -> tuple[str, str]:
    """(SQLSTATE, message) from an ErrorResponse/NoticeResponse body."""
    sqlstate = message = ""
    for field in body.split(b"\0"):
        if not field:
            continue
        code, value = field[:1], field[1:].decode("utf-8", "replace")
        if code == b"C":
            sqlstate = value
        elif code == b"M":
            message = value
    return sqlstate, message


def startup_message(user: str, database: str, application_name: str = "pgmux-bench") -> bytes:
    params = b"".join(
        key.encode() + b"\0" + value.encode() + b"\0"
        for key, value in (("user", user), ("database", database), ("application_name", application_name))
    ) + b"\0"
    return struct.pack("!II", 8 + len(params), PROTOCOL_3_0) + params


def _message(kind: bytes, body: bytes) -> bytes:
    return kind + struct.pack("!I", len(body) + 4) + body


def query_message(sql: str) -> bytes:
    return _message(b"Q", sql.encode() + b"\0")


def extended_query_messages(sql: str) -> bytes:
    """Parse (unnamed, no parameter types) + Bind (no params, text results) + Execute + Sync."""
    parse = _message(b"P", b"\0" + sql.encode() + b"\0" + struct.pack("!H", 0))
    bind = _message(b"B", b"\0\0" + struct.pack("!HHH", 0, 0, 0))
    execute = _message(b"E", b"\0" + struct.pack("!I", 0))
    return parse + bind + execute + _message(b"S", b"")


TERMINATE = _message(b"X", b"")


@functools.lru_cache(maxsize=64)
def _salted_password(password: str, salt: bytes, iterations: int) -> bytes:
    return hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)


class _Scram:
    """Client side of SCRAM-SHA-256 without channel binding."""

    def __init__(self, password: str) -> None:
        self.password = password
        self.nonce = base64.b64encode(os.urandom(18)).decode()
        self.first_bare = f"n=,r={self.nonce}"
        self.server_signature = b""

    def initial(self) -> bytes:
        data = ("n,," + self.first_bare).encode()
        return _message(b"p", b"SCRAM-SHA-256\0" + struct.pack("!I", len(data)) + data)

    def final(self, server_first: bytes) -> bytes:
        text = server_first.decode()
        attrs = dict(part.split("=", 1) for part in text.split(","))
        if not attrs["r"].startswith(self.nonce):
            raise PgError("", "SCRAM server nonce does not extend ours")
        salted = _salted_password(self.password, base64.b64decode(attrs["s"]), int(attrs["i"]))
        client_key = hmac.digest(salted, b"Client Key", "sha256")
        stored_key = hashlib.sha256(client_key).digest()
        without_proof = f"c=biws,r={attrs['r']}"
        auth_message = f"{self.first_bare},{text},{without_proof}".encode()
        signature = hmac.digest(stored_key, auth_message, "sha256")
        proof = bytes(a ^ b for a, b in zip(client_key, signature))
        server_key = hmac.digest(salted, b"Server Key", "sha256")
        self.server_signature = hmac.digest(server_key, auth_message, "sha256")
        return _message(b"p", f"{without_proof},p={base64.b64encode(proof).decode()}".encode())

    def verify(self, server_final: bytes) -> None:
        attrs = dict(part.split("=", 1) for part in server_final.decode().split(","))
        if "e" in attrs:
            raise PgError("28P01", f"SCRAM error from server: {attrs['e']}")
        if base64.b64decode(attrs.get("v", "")) != self.server_signature:
            raise PgError("", "SCRAM server signature does not match")


def _md5_response(user: str, password: str, salt: bytes) -> bytes:
    inner = hashlib.md5(password.encode() + user.encode()).hexdigest()
    outer = hashlib.md5(inner.encode() + salt).hexdigest()
    return _message(b"p", b"md5" + outer.encode() + b"\0")


class _Login:
    """The login conversation as a state machine over (type, body) pairs; shared by both clients."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self.scram: _Scram | None = None
        self.ready = False

    def feed(self, kind: bytes, body: bytes) -> bytes:
        """Consume one server message; return bytes to send (b"" for none)."""
        if kind == b"R":
            (code,) = struct.unpack_from("!I", body)
            if code == AUTH_OK:
                return b""
            if code == AUTH_CLEARTEXT:
                return _message(b"p", self.endpoint.password.encode() + b"\0")
            if code == AUTH_MD5:
                return _md5_response(self.endpoint.user, self.endpoint.password, body[4:8])
            if code == AUTH_SASL:
                mechanisms = body[4:].split(b"\0")
                if b"SCRAM-SHA-256" not in mechanisms:
                    raise PgError("", f"no supported SASL mechanism in {mechanisms!r}")
                self.scram = _Scram(self.endpoint.password)
                return self.scram.initial()
            if code == AUTH_SASL_CONTINUE and self.scram is not None:
                return self.scram.final(body[4:])
            if code == AUTH_SASL_FINAL and self.scram is not None:
                self.scram.verify(body[4:])
                return b""
            raise PgError("", f"unsupported authentication request {code}")
        if kind == b"E":
            raise PgError(*parse_error_fields(body))
        if kind == b"Z":
            self.ready = True
        return b""  # S (ParameterStatus), K (BackendKeyData), N (notice)


def _result_of(kind: bytes, body: bytes, error: PgError | None) -> PgError | None:
    if kind == b"E" and error is None:
        return PgError(*parse_error_fields(body))
    return error


# --------------------------------------------------------------------------- blocking client


class BlockingConnection:
    """One logged-in connection over a blocking socket; ``roundtrip`` sends bytes and reads to ReadyForQuery."""

    def __init__(self, endpoint: Endpoint, timeout: float = 10.0, application_name: str = "pgmux-bench") -> None:
        self.sock = socket.create_connection((endpoint.host, endpoint.port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._buffer = bytearray()
        try:
            self.sock.sendall(startup_message(endpoint.user, endpoint.database, application_name))
            login = _Login(endpoint)
            while not login.ready:
                kind, body = self._read_message()
                reply = login.feed(kind, body)
                if reply:
                    self.sock.sendall(reply)
        except BaseException:
            self.sock.close()
            raise

    def _read_message(self) -> tuple[bytes, bytes]:
        buffer = self._buffer
        while True:
            if len(buffer) >= 5:
                kind, length = _HEADER.unpack_from(buffer)
                end = 1 + length
                if len(buffer) >= end:
                    body = bytes(buffer[5:end])
                    del buffer[:end]
                    return kind, body
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionResetError("server closed the connection")
            buffer += chunk

    def roundtrip(self, request: bytes) -> None:
        """Send ``request`` and read until ReadyForQuery; raise PgError on an ErrorResponse."""
        self.sock.sendall(request)
        error: PgError | None = None
        while True:
            kind, body = self._read_message()
            if kind == b"Z":
                break
            error = _result_of(kind, body, error)
        if error is not None:
            raise error

    def scalar(self, sql: str) -> str:
        """Run a simple query; return the first column of the first row as text ('' for NULL/no row)."""
        self.sock.sendall(query_message(sql))
        error: PgError | None = None
        value: str | None = None
        while True:
            kind, body = self._read_message()
            if kind == b"Z":
                break
            if kind == b"D" and value is None:
                (columns,) = struct.unpack_from("!H", body)
                value = ""
                if columns:
                    (length,) = struct.unpack_from("!i", body, 2)
                    value = body[6:6 + length].decode() if length >= 0 else ""
            error = _result_of(kind, body, error)
        if error is not None:
            raise error
        return value or ""

    def close(self) -> None:
        try:
            self.sock.sendall(TERMINATE)
        except OSError:
            pass
        self.sock.close()


# --------------------------------------------------------------------------- asyncio client


class AsyncConnection:
    """One connection over asyncio streams (the storm and idle-fleet clients)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, endpoint: Endpoint) -> AsyncConnection:
        reader, writer = await asyncio.open_connection(endpoint.host, endpoint.port, limit=65536)
        conn = cls(reader, writer)
        try:
            writer.write(startup_message(endpoint.user, endpoint.database))
            login = _Login(endpoint)
            while not login.ready:
                kind, body = await conn._read_message()
                reply = login.feed(kind, body)
                if reply:
                    writer.write(reply)
        except BaseException:
            conn.abort()
            raise
        return conn

    async def _read_message(self) -> tuple[bytes, bytes]:
        header = await self.reader.readexactly(5)
        kind, length = _HEADER.unpack(header)
        body = await self.reader.readexactly(length - 4) if length > 4 else b""
        return kind, body

    async def query(self, sql: str) -> None:
        self.writer.write(query_message(sql))
        error: PgError | None = None
        while True:
            kind, body = await self._read_message()
            if kind == b"Z":
                break
            error = _result_of(kind, body, error)
        if error is not None:
            raise error

    async def close(self, wait: bool = True) -> None:
        """Send Terminate and close; with ``wait`` also wait (up to 5 s) for the socket to be closed."""
        try:
            self.writer.write(TERMINATE)
            self.writer.close()
            if wait:
                await asyncio.wait_for(self.writer.wait_closed(), 5)
        except (OSError, asyncio.TimeoutError):
            pass

    def abort(self) -> None:
        transport = self.writer.transport
        if transport is not None:
            transport.abort()


def percentiles(samples: list[float], points: tuple[float, ...] = (50, 90, 95, 99, 99.9)) -> dict[str, float]:
    """Nearest-rank percentiles of ``samples`` (any unit), keyed 'p50', 'p99', 'p99.9'..."""
    if not samples:
        return {}
    ordered = sorted(samples)
    result: dict[str, float] = {}
    for point in points:
        rank = max(0, min(len(ordered) - 1, int(round(point / 100 * len(ordered) + 0.5)) - 1))
        result[f"p{point:g}"] = ordered[rank]
    result["mean"] = sum(ordered) / len(ordered)
    result["max"] = ordered[-1]
    result["min"] = ordered[0]
    return result


def monotonic_us() -> float:
    return time.perf_counter_ns() / 1000.0
