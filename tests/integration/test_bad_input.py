"""Bad input against a live pgmux: random, malformed, oversized, truncated and out-of-order bytes at every phase.

Every connection must end with a FATAL 08P01 (or another error that names what was wrong) or a
closed socket within a bounded time: never a hang, never an unhandled exception in pgmux, and
never an effect on other clients, which are checked every few cases on their own connections.
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
import struct
import time

import asyncpg
import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pgusers import APP, APP_DATABASE
from proxy.protocol import messages as m
from proxy.protocol.startup import (
    CANCEL_REQUEST_CODE,
    GSSENC_REQUEST_CODE,
    PROTOCOL_3_0,
    SSL_REQUEST_CODE,
    build_cancel_request,
    build_ssl_request,
    build_startup_message,
)
from test_admission import RawClient, extended_query

REPLY_TIMEOUT = 10.0  # a verdict (error or close) must come within this (generous: CI machines are busy)
CHECK_EVERY = 20  # cases between checks that other clients are still served
LIVE = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True)
# Errors pgmux or PostgreSQL may end a bad connection with. 08P01 is the protocol violation; the others
# are what a well-formed but wrong request earns (unknown database, failed or missing authentication,
# an unsupported startup parameter), or the backend dying of a message PostgreSQL itself refused (08006).
STARTUP_FATALS = {"08P01", "28P01", "28000", "3D000", "0A000", "53300"}
RELAY_FATALS = {"08P01", "08006"}
# Bytes that complete any startup packet pgmux would still wait for (they are at most 10000 long), after
# which a zero length header is a protocol violation for sure: pgmux must decide, it cannot keep waiting.
STARTUP_FILLER = b"\x00" * 10_008
# The same for the authentication phase, where pgmux accepts messages up to 64 KiB.
AUTH_FILLER = b"\x00" * ((1 << 16) + 8)


# ---- talking to pgmux ---------------------------------------------------------------------------------


def _talk(proxy, payload: bytes, filler: bytes = b"") -> tuple[bytes, bool]:
    """Send ``payload`` (then ``filler``) on a new connection; return what came back and whether pgmux closed."""
    sock = socket.create_connection((proxy.host, proxy.port()), timeout=REPLY_TIMEOUT)
    try:
        try:
            sock.sendall(payload)
            if filler:
                sock.sendall(filler)
        except (BrokenPipeError, ConnectionResetError):
            pass  # pgmux closed already: its verdict is in what it sent before
        return _read_to_close(sock)
    finally:
        sock.close()


def _read_to_close(sock: socket.socket) -> tuple[bytes, bool]:
    reply = bytearray()
    deadline = time.monotonic() + REPLY_TIMEOUT
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return bytes(reply), False
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            return bytes(reply), False
        except ConnectionResetError:
            return bytes(reply), True
        if not chunk:
            return bytes(reply), True
        reply += chunk


def _frames(data: bytes) -> list[tuple[int, bytes]] | None:
    """Split into whole typed messages; None when the bytes are not a clean message stream."""
    out, pos = [], 0
    while pos < len(data):
        if len(data) - pos < 5:
            return None
        kind, length = struct.unpack_from("!BI", data, pos)
        if length < 4 or pos + 1 + length > len(data):
            return None
        out.append((kind, data[pos + 5:pos + 1 + length]))
        pos += 1 + length
    return out


def _error_fields(body: bytes) -> dict[str, str]:
    return {chunk[:1].decode(): chunk[1:].decode(errors="replace") for chunk in body.split(b"\x00") if chunk}


def _startup_requests_in_front(payload: bytes) -> int:
    """How many SSLRequest/GSSENCRequest packets open ``payload``: pgmux answers each with one 'N' byte."""
    count, pos = 0, 0
    while payload[pos:pos + 8] in (build_ssl_request(), struct.pack("!ii", 8, GSSENC_REQUEST_CODE)):
        count += 1
        pos += 8
    return count


def _check_startup_verdict(payload: bytes, reply: bytes, closed: bool) -> None:
    assert closed, f"pgmux neither refused nor closed within {REPLY_TIMEOUT}s; it sent {reply[:200]!r}"
    for skipped in range(_startup_requests_in_front(payload) + 1):
        if reply[:skipped] != b"N" * skipped:
            break
        frames = _frames(reply[skipped:])
        if frames is not None:
            break
    else:
        frames = None
    if frames is None:
        return  # a reset can cut the reply short; there is nothing to judge but the close
    for kind, body in frames:
        assert kind in (m.ERROR_RESPONSE, m.AUTHENTICATION, m.NEGOTIATE_PROTOCOL_VERSION), (kind, body)
        if kind == m.AUTHENTICATION:
            assert struct.unpack_from("!i", body)[0] != m.AUTH_OK, "bad input was let in without a password"
        if kind == m.ERROR_RESPONSE:
            fields = _error_fields(body)
            assert fields.get("S") == "FATAL" and fields.get("C") in STARTUP_FATALS, fields


# ---- watching pgmux and the other clients -------------------------------------------------------------


class _Watch:
    """Counts live cases, checks every CHECK_EVERY that other clients are served, and collects pgmux errors."""

    def __init__(self, proxy, password: str = APP.password) -> None:
        self.proxy = proxy
        self.password = password
        self.cases = 0
        self.loop = asyncio.new_event_loop()
        self.errors: list[logging.LogRecord] = []
        self._handler = logging.Handler(logging.ERROR)
        self._handler.emit = self.errors.append  # type: ignore[method-assign]
        for name in ("pgmux", "asyncio"):
            logging.getLogger(name).addHandler(self._handler)
        # A client that stays connected through all the abuse, and must keep working.
        self.bystander = self.loop.run_until_complete(self._connect())

    async def _connect(self) -> asyncpg.Connection:
        return await asyncpg.connect(host=self.proxy.host, port=self.proxy.port(), user=APP.name,
                                     password=self.password, database=APP_DATABASE, statement_cache_size=0)

    def case_done(self) -> None:
        self.cases += 1
        assert not self.errors, [record.getMessage() for record in self.errors]
        if self.cases % CHECK_EVERY == 0:
            self.check_others()

    def check_others(self) -> None:
        async def check() -> None:
            assert await self.bystander.fetchval("SELECT $1::int", self.cases) == self.cases
            fresh = await self._connect()
            assert await fresh.fetchval("SELECT 1") == 1
            await fresh.close()

        self.loop.run_until_complete(asyncio.wait_for(check(), 20))

    def finish(self, label: str) -> None:
        try:
            self.check_others()
            self.loop.run_until_complete(self.bystander.close())
            print(f"\n{label}: {self.cases} live cases")
            assert not self.errors, [record.getMessage() for record in self.errors]
        finally:
            for name in ("pgmux", "asyncio"):
                logging.getLogger(name).removeHandler(self._handler)
            self.loop.close()


# ---- strategies ---------------------------------------------------------------------------------------

_codes = st.one_of(
    st.sampled_from([PROTOCOL_3_0, PROTOCOL_3_0 | 1, PROTOCOL_3_0 | 2, 2 << 16, SSL_REQUEST_CODE,
                     GSSENC_REQUEST_CODE, CANCEL_REQUEST_CODE]),
    st.integers(0, 2**32 - 1),
)
_lengths = st.one_of(st.integers(-(2**31), 2**31 - 1), st.integers(0, 64), st.sampled_from([8, 12, 16, 10000, 10001]))
_names = st.one_of(st.sampled_from(["user", "database", "options", "application_name", "replication",
                                    "_pq_.x", "client_encoding"]), st.text(max_size=8))
_values = st.one_of(st.sampled_from([APP.name, APP_DATABASE, "-c x=1", "--y=2", "true", ""]), st.text(max_size=8))

_startup_packets = st.one_of(
    st.binary(min_size=1, max_size=64),
    st.builds(lambda length, code, body: struct.pack("!iI", length, code) + body, _lengths, _codes,
              st.binary(max_size=48)),
    st.builds(lambda params, minor: build_startup_message(params, minor),
              st.dictionaries(_names, _values, max_size=4), st.integers(0, 3)),
    st.builds(lambda count, rest: build_ssl_request() * count + rest, st.integers(1, 3), st.binary(max_size=24)),
)

_frontend_kinds = st.one_of(st.sampled_from(b"BCdcfDEHFPpQSX"), st.integers(0, 255))


def _typed(kind: int, body: bytes) -> bytes:
    return m.message(kind, body)


_typed_messages = st.builds(_typed, _frontend_kinds, st.binary(max_size=40))
_wrong_order = st.sampled_from([
    build_startup_message({"user": APP.name, "database": APP_DATABASE}),  # a second startup packet
    build_ssl_request(),
    m.password_message(b"app-secret"),  # a password nobody asked for
    m.message(m.COPY_DATA, b"1\n") + m.message(m.COPY_DONE),  # COPY data outside a COPY
    m.message(m.EXECUTE, b"no_such_portal\x00\x00\x00\x00\x00"),  # Execute before any Bind
    m.message(m.BIND, b"\x00no_such_statement\x00\x00\x00\x00\x00\x00\x00"),
])
_junk = st.one_of(st.binary(min_size=1, max_size=64), _typed_messages, _wrong_order)


# ---- the tests ----------------------------------------------------------------------------------------


def test_random_first_packets_are_refused_or_closed_never_hang(pgmux) -> None:
    proxy = pgmux()
    watch = _Watch(proxy)

    @settings(LIVE, max_examples=400)
    @given(packet=_startup_packets)
    def case(packet: bytes) -> None:
        reply, closed = _talk(proxy, packet, STARTUP_FILLER)
        _check_startup_verdict(packet, reply, closed)
        watch.case_done()

    case()
    watch.finish("random first packets")


def test_valid_startup_then_random_bytes_are_refused_or_closed_never_let_in(pgmux) -> None:
    proxy = pgmux()  # SCRAM: nothing but a correct proof may log in
    watch = _Watch(proxy)
    startup = build_startup_message({"user": APP.name, "database": APP_DATABASE})

    @settings(LIVE, max_examples=300)
    @given(junk=st.lists(_junk, min_size=1, max_size=4).map(b"".join))
    def case(junk: bytes) -> None:
        reply, closed = _talk(proxy, startup + junk, AUTH_FILLER)
        _check_startup_verdict(startup, reply, closed)
        watch.case_done()

    case()
    watch.finish("startup then random bytes")


def test_logged_in_client_sending_random_messages_gets_answers_errors_or_a_close(pgmux) -> None:
    proxy = pgmux(auth_type="trust", default_pool_size=3)
    watch = _Watch(proxy)
    probe = m.message(m.SYNC) + m.query("SELECT 4242")

    @settings(LIVE, max_examples=500)
    @given(messages=st.lists(st.one_of(_typed_messages, _wrong_order), min_size=1, max_size=5))
    def case(messages: list[bytes]) -> None:
        client = RawClient(proxy.host, proxy.port())
        try:
            # Whatever came before, a Sync and a Query must be answered, or the connection closed.
            client.sock.sendall(b"".join(messages) + probe)
            outcome = _answer_to_probe(client)
            assert outcome in ("answered", "closed"), outcome
            if outcome == "answered":
                client.send(m.terminate())
        finally:
            client.close()
        watch.case_done()

    case()
    watch.finish("random messages after login")


def _answer_to_probe(client: RawClient) -> str:
    client.sock.settimeout(REPLY_TIMEOUT)
    answered = False
    try:
        while True:
            kind, body = client.read_message()
            if kind == m.ERROR_RESPONSE:
                fields = _error_fields(body)
                if fields.get("S") == "FATAL":
                    assert fields.get("C") in RELAY_FATALS, fields
            elif kind == m.DATA_ROW and body.endswith(b"4242"):
                answered = True
            elif kind == m.READY_FOR_QUERY and answered:
                return "answered"
    except TimeoutError:
        return f"no answer and no close within {REPLY_TIMEOUT}s"
    except (ConnectionError, OSError):
        return "closed"


@pytest.mark.parametrize("phase", ["startup", "authentication", "after login"])
def test_length_fields_over_1gib_get_08p01_at_once(pgmux, phase) -> None:
    proxy = pgmux(auth_type="trust" if phase == "after login" else "scram-sha-256")
    watch = _Watch(proxy)
    startup = build_startup_message({"user": APP.name, "database": APP_DATABASE})

    @settings(LIVE, max_examples=60)
    @given(length=st.integers((1 << 30) + 1, (1 << 32) - 1), kind=_frontend_kinds.filter(lambda k: k != m.TERMINATE),
           tail=st.binary(max_size=16))
    def case(length: int, kind: int, tail: bytes) -> None:
        header = struct.pack("!BI", kind, length) + tail
        if phase == "startup":
            reply, closed = _talk(proxy, struct.pack("!I", length) + tail)
        elif phase == "authentication":
            reply, closed = _talk(proxy, startup + header)
        else:
            client = RawClient(proxy.host, proxy.port())
            client.send(header)  # no more bytes follow: pgmux must not wait for a gigabyte
            reply, closed = _read_to_close(client.sock)
            client.close()
        assert closed, f"pgmux did not close within {REPLY_TIMEOUT}s after a {length}-byte length field"
        frames = _frames(reply[reply.find(b"E"):]) if b"E" in reply else None
        assert frames, f"no ErrorResponse before the close: {reply[:200]!r}"
        fields = _error_fields(frames[-1][1])
        assert (frames[-1][0], fields.get("S"), fields.get("C")) == (m.ERROR_RESPONSE, "FATAL", "08P01"), fields
        watch.case_done()

    case()
    watch.finish(f"oversized length fields ({phase})")


def test_truncated_messages_then_a_close_leave_no_busy_or_dirty_server(pgmux, postgres) -> None:
    proxy = pgmux(auth_type="trust", default_pool_size=1)
    watch = _Watch(proxy)
    conversation = (extended_query("SELECT 1") + m.query("BEGIN") + m.query("SELECT 2")
                    + extended_query("SELECT 3") + m.query("COMMIT"))
    observer = psycopg.connect(postgres.dsn(database=APP_DATABASE), autocommit=True)

    def leftovers() -> list[tuple]:
        return observer.execute(
            "SELECT pid, state FROM pg_stat_activity WHERE usename = %s AND backend_type = 'client backend' "
            "AND state <> 'idle'", (APP.name,)).fetchall()

    @settings(LIVE, max_examples=250)
    @given(cut=st.integers(1, len(conversation) - 1), reset=st.booleans())
    def case(cut: int, reset: bool) -> None:
        client = RawClient(proxy.host, proxy.port())
        client.send(conversation[:cut])
        if reset:
            client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()
        deadline = time.monotonic() + 3
        while (left := leftovers()) or proxy.call(lambda p: sum(len(pool.active) for pool in p.router.pools.values())):
            assert time.monotonic() < deadline, f"cut at {cut}: still busy or in a transaction: {left}"
            time.sleep(0.02)
        watch.case_done()

    try:
        case()
    finally:
        observer.close()
    watch.finish("truncated conversations")


def test_valid_messages_split_at_any_byte_are_relayed_intact(pgmux, postgres) -> None:
    """The other side of truncation: a conversation cut into pieces that arrive one by one means the same."""
    postgres.psql(f"DROP TABLE IF EXISTS split_copy; CREATE TABLE split_copy (line text); "
                  f"ALTER TABLE split_copy OWNER TO {APP.name}", database=APP_DATABASE)
    proxy = pgmux(auth_type="trust", default_pool_size=1)
    watch = _Watch(proxy)
    rows = [f"row {i}".encode() for i in range(3)]
    conversation = (m.query("SELECT 1") + extended_query("SELECT 2")
                    + m.query("COPY split_copy FROM STDIN")
                    + b"".join(m.message(m.COPY_DATA, row + b"\n") for row in rows) + m.message(m.COPY_DONE)
                    + m.query("BEGIN") + extended_query("SELECT 3") + m.query("ROLLBACK"))
    answers = 6  # ReadyForQuery count: SELECT 1, its Sync, the COPY, BEGIN, the second Sync, ROLLBACK

    @settings(LIVE, max_examples=60)
    @given(cuts=st.lists(st.integers(1, len(conversation) - 1), min_size=1, max_size=4, unique=True).map(sorted))
    def case(cuts: list[int]) -> None:
        client = RawClient(proxy.host, proxy.port())
        client.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client.sock.settimeout(REPLY_TIMEOUT)
        for start, end in zip([0, *cuts], [*cuts, len(conversation)]):
            client.send(conversation[start:end])
            time.sleep(0.02)  # each piece is its own read for pgmux
        seen: list[bytes] = []
        try:
            while seen.count(b"Z") < answers:
                kind, body = client.read_message()
                assert kind != m.ERROR_RESPONSE, (cuts, _error_fields(body))
                seen.append(bytes([kind]))
                if kind == m.DATA_ROW:
                    seen.append(body[-1:])
        except TimeoutError:
            raise AssertionError(f"cut at {cuts}: no full answer within {REPLY_TIMEOUT}s, got {b''.join(seen)!r}") from None
        finally:
            client.close()
        assert [value for kind, value in zip(seen, seen[1:]) if kind == b"D"] == [b"1", b"2", b"3"], (cuts, seen)
        watch.case_done()

    try:
        case()
    finally:
        postgres.psql("DROP TABLE IF EXISTS split_copy", database=APP_DATABASE)
    watch.finish("valid conversations split at random bytes")


def test_malformed_message_sent_while_waiting_in_line_gets_08p01_and_frees_the_server(pgmux) -> None:
    proxy = pgmux(auth_type="trust", default_pool_size=1, query_wait_timeout=5)
    holder = RawClient(proxy.host, proxy.port())
    holder.send(m.query("BEGIN"))
    holder.read_until_ready()  # the only server is taken
    waiting = RawClient(proxy.host, proxy.port())
    waiting.send(b"Q\x00\x00\x00\x02")  # a length below 4, queued while in line
    time.sleep(0.2)
    holder.send(m.query("COMMIT"))
    holder.read_until_ready()  # the server goes to the waiting client, and its bytes are looked at now
    reply, closed = _read_to_close(waiting.sock)
    waiting.close()
    frames = _frames(reply)
    assert closed and frames, f"no verdict for the malformed message: {reply!r}, closed={closed}"
    assert _error_fields(frames[-1][1]).get("C") == "08P01"
    holder.send(m.query("SELECT 1"))  # and the server was not kept by the refused client
    assert m.DATA_ROW in holder.read_until_ready()
    holder.close()


@pytest.mark.parametrize("in_line", [False, True], ids=["linked", "queued"])
@pytest.mark.parametrize("kind", [m.QUERY, m.PARSE, m.BIND, m.DESCRIBE, m.CLOSE])
def test_message_with_an_empty_body_is_answered_and_the_session_goes_on(pgmux, kind, in_line) -> None:
    # Transaction mode with named statements: pgmux reads these messages' first body bytes itself,
    # either as they arrive or, for a client that waited in line, when a server is handed over.
    proxy = pgmux(auth_type="trust", default_pool_size=1)
    holder = RawClient(proxy.host, proxy.port())
    holder.send(m.query("BEGIN"))
    holder.read_until_ready()
    if not in_line:
        holder.send(m.query("COMMIT"))
        holder.read_until_ready()
    client = RawClient(proxy.host, proxy.port())
    client.sock.settimeout(REPLY_TIMEOUT)
    client.send(m.message(kind) + (b"" if kind == m.QUERY else m.message(m.SYNC)))  # each earns one ReadyForQuery
    if in_line:
        time.sleep(0.2)
        holder.send(m.query("COMMIT"))
        holder.read_until_ready()
    answer = []
    try:
        while not answer or answer[-1][0] != m.READY_FOR_QUERY:
            answer.append(client.read_message())
    except TimeoutError:
        pytest.fail(f"no answer and no close within {REPLY_TIMEOUT}s: {answer}")
    except (ConnectionError, OSError):
        # Closed: only as a protocol violation, said first (pgmux refuses what it cannot read).
        assert answer and answer[-1][0] == m.ERROR_RESPONSE, answer
        assert _error_fields(answer[-1][1]).get("C") == "08P01", answer
    else:
        assert m.ERROR_RESPONSE in [kind for kind, _ in answer], answer  # PostgreSQL's own verdict
        client.send(m.query("SELECT 4242"))
        assert m.DATA_ROW in client.read_until_ready()
    client.close()
    holder.send(m.query("SELECT 1"))  # the server was not kept in an unknown state
    assert m.DATA_ROW in holder.read_until_ready()
    holder.close()


# ---- floods -------------------------------------------------------------------------------------------


def test_a_flood_of_cancel_requests_with_made_up_keys_logs_a_handful_of_lines(pgmux, caplog) -> None:
    """Anyone can send CancelRequests without logging in: a thousand must not write a thousand log lines."""
    proxy = pgmux()
    caplog.set_level(logging.INFO, logger="pgmux")
    rng = random.Random(11)
    for _ in range(1000):
        with socket.create_connection((proxy.host, proxy.port()), timeout=REPLY_TIMEOUT) as sock:
            sock.sendall(build_cancel_request(rng.randrange(1, 1 << 31), rng.randbytes(4)))
            assert sock.recv(1) == b""  # answered by a close, as PostgreSQL does
    proxy.call(lambda p: None)  # every request has been handled by now
    lines = [record.getMessage() for record in caplog.records if record.name.startswith("pgmux")]
    cancel_lines = [line for line in lines if "cancel" in line.lower()]
    assert cancel_lines and "unknown key" in cancel_lines[0], lines[:5]  # the flood is still visible
    assert len(lines) <= 5, f"{len(lines)} log lines for 1000 cancel requests: {lines[:5]}"
