"""Sans-IO protocol layer: FrameScanner, startup packets and ErrorResponse, fed bytes at every split point and fuzzed."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.protocol import errors
from proxy.protocol import messages as m
from proxy.protocol.errors import PgError, Severity, SqlState, parse_error_fields
from proxy.protocol.framing import MAX_MESSAGE_LENGTH, Frame, FrameScanner, ProtocolViolation
from proxy.protocol.startup import (
    CANCEL_REQUEST_CODE,
    GSSENC_REQUEST_CODE,
    MAX_STARTUP_PACKET_LENGTH,
    SSL_REQUEST_CODE,
    CancelRequest,
    GSSENCRequest,
    SSLRequest,
    StartupMessage,
    build_cancel_request,
    build_ssl_request,
    build_startup_message,
    read_startup_packet,
)

# Property tests share a budget: together they run well over 10,000 generated cases.
FUZZ = settings(max_examples=2500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FUZZ_SMALL = settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---- helpers -------------------------------------------------------------------------------------

def msg(kind: str, body: bytes = b"") -> bytes:
    return m.message(ord(kind), body)


def scan(scanner: FrameScanner, chunks: list[bytes]) -> tuple[bytes, list[tuple[int, bytes]]]:
    """Feed the chunks; return every byte that came out (in order) and the captured frames."""
    out = bytearray()
    frames: list[tuple[int, bytes]] = []
    for chunk in chunks:
        came_out = bytearray()
        for segment in scanner.feed(chunk):
            if type(segment) is Frame:
                data = bytes(segment.data)
                assert segment.kind == data[0]
                assert len(data) == struct.unpack_from("!I", data, 1)[0] + 1
                frames.append((segment.kind, data))
                came_out += data
            else:
                came_out += bytes(segment)
        if scanner.verbatim:
            # The relay's fast path forwards the chunk itself when this holds.
            assert came_out == chunk
        out += came_out
    return bytes(out), frames


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(max(cut, 0), len(data)) for cut in cuts})
    edges = [0, *points, len(data)]
    return [data[a:b] for a, b in zip(edges, edges[1:])]


# A stream a client might send in transaction mode: extended protocol, simple query, COPY, Terminate.
CLIENT_STREAM = b"".join([
    msg("P", b"s1\x00SELECT $1\x00\x00\x00"),
    msg("B", b"\x00s1\x00\x00\x00\x00\x01\x00\x00\x00\x011\x00\x00"),
    msg("E", b"\x00\x00\x00\x00\x00"),
    msg("S"),
    msg("Q", b"SELECT 1; SELECT 2\x00"),
    msg("H"),
    msg("d", b"x" * 300),
    msg("c"),
    msg("S"),
    msg("F", b"\x00\x00\x00\x01"),
    msg("X"),
])
CAPTURE = frozenset({m.TERMINATE, m.QUERY})
COUNTED = frozenset({m.SYNC, m.QUERY, m.FUNCTION_CALL})
EXPECTED_FRAMES = [(m.QUERY, msg("Q", b"SELECT 1; SELECT 2\x00")), (m.TERMINATE, msg("X"))]
EXPECTED_COUNT = 4  # two Syncs, one Query, one FunctionCall


# ---- FrameScanner -------------------------------------------------------------------------------

def test_whole_stream_passes_through_with_the_asked_for_frames() -> None:
    scanner = FrameScanner(CAPTURE, counted=COUNTED)
    out, frames = scan(scanner, [CLIENT_STREAM])
    assert out == CLIENT_STREAM
    assert frames == EXPECTED_FRAMES
    assert scanner.count == EXPECTED_COUNT
    assert scanner.at_boundary


def test_every_single_split_point_gives_the_same_bytes_frames_and_count() -> None:
    for cut in range(len(CLIENT_STREAM) + 1):
        scanner = FrameScanner(CAPTURE, counted=COUNTED)
        out, frames = scan(scanner, [CLIENT_STREAM[:cut], CLIENT_STREAM[cut:]])
        assert out == CLIENT_STREAM, cut
        assert frames == EXPECTED_FRAMES, cut
        assert scanner.count == EXPECTED_COUNT, cut
        assert scanner.at_boundary, cut


def test_every_pair_of_split_points_gives_the_same_result() -> None:
    stream = b"".join([msg("S"), msg("Q", b"SELECT 1\x00"), msg("d", b"abcdefgh"), msg("S"), msg("X")])
    capture = frozenset({m.QUERY, m.TERMINATE, m.SYNC})
    expected_frames = [(d[0], d) for d in (msg("S"), msg("Q", b"SELECT 1\x00"), msg("S"), msg("X"))]
    for first in range(len(stream) + 1):
        for second in range(first, len(stream) + 1):
            scanner = FrameScanner(capture, counted=COUNTED)
            chunks = [stream[:first], stream[first:second], stream[second:]]
            out, frames = scan(scanner, chunks)
            assert out == stream, (first, second)
            assert frames == expected_frames, (first, second)
            assert scanner.count == 3, (first, second)  # Sync, Query, Sync: counted once each


def test_one_byte_at_a_time() -> None:
    scanner = FrameScanner(CAPTURE, counted=COUNTED)
    out, frames = scan(scanner, [CLIENT_STREAM[i:i + 1] for i in range(len(CLIENT_STREAM))])
    assert (out, frames, scanner.count) == (CLIENT_STREAM, EXPECTED_FRAMES, EXPECTED_COUNT)


def test_empty_feeds_change_nothing() -> None:
    scanner = FrameScanner(CAPTURE, counted=COUNTED)
    chunks = []
    for i in range(0, len(CLIENT_STREAM), 7):
        chunks += [b"", CLIENT_STREAM[i:i + 7], b""]
    out, frames = scan(scanner, chunks)
    assert (out, frames, scanner.count) == (CLIENT_STREAM, EXPECTED_FRAMES, EXPECTED_COUNT)


def test_verbatim_is_false_while_bytes_are_held_or_released() -> None:
    query = msg("Q", b"SELECT 1\x00")
    scanner = FrameScanner(frozenset({ord("Q")}))
    scanner.feed(query[:3])
    assert not scanner.verbatim  # a split header is held back
    scanner.feed(query[3:] + query[:7])
    assert not scanner.verbatim  # the held header comes out in front of this chunk's bytes
    scanner.feed(query[7:])
    assert not scanner.verbatim
    scanner.feed(query + query)
    assert scanner.verbatim
    scanner.feed(query)
    assert scanner.verbatim


def test_at_boundary_is_false_inside_a_header_or_body() -> None:
    scanner = FrameScanner(frozenset({m.QUERY}))
    query = msg("Q", b"SELECT 1\x00")
    copy = msg("d", b"abc")
    scanner.feed(query[:3])
    assert not scanner.at_boundary  # inside a header
    scanner.feed(query[3:8])
    assert not scanner.at_boundary  # inside a captured body
    scanner.feed(query[8:] + copy[:6])
    assert not scanner.at_boundary  # inside a streamed body
    scanner.feed(copy[6:])
    assert scanner.at_boundary


def test_uncaptured_messages_come_back_as_one_slice_per_chunk() -> None:
    rows = b"".join(msg("D", b"\x00\x01\x00\x00\x00\x01x") for _ in range(200))
    segments = FrameScanner(frozenset({m.READY_FOR_QUERY})).feed(rows)
    assert len(segments) == 1
    assert bytes(segments[0]) == rows


def test_a_large_body_streams_through_without_being_buffered() -> None:
    body = bytes(range(256)) * 4096  # 1 MiB
    message = msg("d", body)
    scanner = FrameScanner(frozenset({m.QUERY}))
    chunk_size = 65536
    for start in range(0, len(message), chunk_size):
        chunk = message[start:start + chunk_size]
        segments = scanner.feed(chunk)
        # Everything that arrived goes out at once, except a header still incomplete.
        assert b"".join(bytes(s) for s in segments) == chunk
        assert not any(type(s) is Frame for s in segments)
    assert scanner.at_boundary


def test_captured_frame_split_across_chunks_is_reassembled_whole() -> None:
    big = msg("Q", b"SELECT '" + b"z" * 5000 + b"'\x00")
    scanner = FrameScanner(frozenset({m.QUERY}))
    out, frames = scan(scanner, [big[i:i + 1000] for i in range(0, len(big), 1000)])
    assert out == big and frames == [(m.QUERY, big)]


def test_a_type_both_captured_and_counted_is_counted_once() -> None:
    stream = msg("S") * 3 + msg("Q", b"x\x00")
    for cut in range(len(stream) + 1):
        scanner = FrameScanner(frozenset({m.SYNC}), counted=frozenset({m.SYNC, m.QUERY}))
        _, frames = scan(scanner, [stream[:cut], stream[cut:]])
        assert scanner.count == 4
        assert len(frames) == 3


@pytest.mark.parametrize("length", [0, 1, 2, 3, MAX_MESSAGE_LENGTH + 1, 0xFFFFFFFF, 0x80000000])
def test_invalid_length_is_a_protocol_violation(length: int) -> None:
    header = b"Q" + struct.pack("!I", length)
    for capture in (frozenset(), frozenset({m.QUERY})):
        with pytest.raises(ProtocolViolation, match=f"invalid length {length}"):
            FrameScanner(capture).feed(header)
        # The same when the bad header is split, or arrives after a valid message.
        for cut in range(1, len(header)):
            scanner = FrameScanner(capture)
            scanner.feed(msg("S") + header[:cut])
            with pytest.raises(ProtocolViolation):
                scanner.feed(header[cut:])


def test_length_limit_is_inclusive_and_configurable() -> None:
    header = b"d" + struct.pack("!I", MAX_MESSAGE_LENGTH)
    assert bytes(FrameScanner(frozenset()).feed(header)[0]) == header  # exactly 1 GiB is allowed
    scanner = FrameScanner(frozenset(range(256)), max_length=100)
    scanner.feed(msg("p", b"a" * 96))  # length 100
    with pytest.raises(ProtocolViolation):
        scanner.feed(msg("p", b"a" * 97))


def test_minimal_message_of_length_four_is_valid() -> None:
    for kind in (m.SYNC, m.FLUSH, m.TERMINATE):
        scanner = FrameScanner(frozenset({kind}), counted=frozenset({kind}))
        out, frames = scan(scanner, [bytes([kind]) + b"\x00\x00\x00\x04"])
        assert frames == [(kind, bytes([kind]) + b"\x00\x00\x00\x04")] and scanner.count == 1


# ---- FrameScanner properties -------------------------------------------------------------------

_kinds = st.sampled_from(sorted({ord(c) for c in "PBEDSCQHFdcfXpZTNK123A"}))
_messages = st.lists(st.tuples(_kinds, st.binary(max_size=40)), max_size=12)
_capture_sets = st.frozensets(_kinds, max_size=6)
_cuts = st.lists(st.integers(min_value=0, max_value=600), max_size=8)


@FUZZ
@given(items=_messages, capture=_capture_sets, counted=_capture_sets, cuts=_cuts)
def test_property_valid_streams_scan_the_same_at_any_split(items, capture, counted, cuts) -> None:
    stream = b"".join(m.message(kind, body) for kind, body in items)
    scanner = FrameScanner(capture, counted=counted)
    out, frames = scan(scanner, split_at(stream, cuts))
    assert out == stream
    assert frames == [(kind, m.message(kind, body)) for kind, body in items if kind in capture]
    assert scanner.count == sum(1 for kind, _ in items if kind in counted)
    assert scanner.at_boundary


@st.composite
def _noisy_streams(draw) -> bytes:
    """A valid message stream with a few bytes overwritten and maybe cut short: mostly-plausible headers."""
    data = bytearray(b"".join(m.message(kind, body) for kind, body in draw(_messages)))
    for _ in range(draw(st.integers(0, 3))):
        if data:
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return bytes(data[:draw(st.integers(0, len(data)))])


@FUZZ
@given(data=st.one_of(st.binary(max_size=300), _noisy_streams()), capture=_capture_sets, cuts=_cuts,
       max_length=st.sampled_from([MAX_MESSAGE_LENGTH, 1 << 16, 64]))
def test_property_random_bytes_raise_only_protocol_violation(data, capture, cuts, max_length) -> None:
    def run(chunks: list[bytes]):
        scanner = FrameScanner(capture, max_length=max_length, counted=capture)
        try:
            return scan(scanner, chunks), scanner.count, scanner.at_boundary
        except ProtocolViolation:
            return None

    whole = run([data])
    pieces = run(split_at(data, cuts))
    # Splitting never changes the verdict, the bytes, the frames or the count.
    assert whole == pieces
    if whole is not None:
        (out, _frames), _count, at_boundary = whole
        # Bytes come out in order; only an incomplete header or captured message is held back.
        assert data.startswith(out)
        if at_boundary:
            assert out == data


# ---- startup packets ---------------------------------------------------------------------------

def test_startup_message_parses_its_parameters() -> None:
    params = {"user": "app", "database": "shop", "application_name": "psql", "options": "-c geqo=off"}
    packet = build_startup_message(params)
    parsed, used = read_startup_packet(packet + b"Qtrailing")
    assert used == len(packet)
    assert parsed == StartupMessage(3, 0, params)
    assert (parsed.user, parsed.database) == ("app", "shop")


def test_startup_database_defaults_to_the_user() -> None:
    parsed, _ = read_startup_packet(build_startup_message({"user": "alice"}))
    assert parsed.database == "alice"


def test_startup_with_protocol_3_2_reports_its_minor_version() -> None:
    parsed, _ = read_startup_packet(build_startup_message({"user": "app", "_pq_.x": "1"}, minor=2))
    assert (parsed.major, parsed.minor) == (3, 2)
    assert parsed.parameters == {"user": "app", "_pq_.x": "1"}


def test_ssl_gssenc_and_cancel_requests() -> None:
    assert read_startup_packet(build_ssl_request()) == (SSLRequest(), 8)
    assert read_startup_packet(struct.pack("!ii", 8, GSSENC_REQUEST_CODE)) == (GSSENCRequest(), 8)
    cancel = build_cancel_request(4242, b"\x01\x02\x03\x04")
    assert cancel == struct.pack("!iii", 16, CANCEL_REQUEST_CODE, 4242) + b"\x01\x02\x03\x04"
    assert read_startup_packet(cancel) == (CancelRequest(4242, b"\x01\x02\x03\x04"), 16)
    # Protocol 3.2 allows longer cancel keys (up to 256 bytes).
    long_key = bytes(range(32))
    assert read_startup_packet(build_cancel_request(-7, long_key)) == (CancelRequest(-7, long_key), 44)


def test_ssl_request_followed_by_startup_is_read_one_packet_at_a_time() -> None:
    startup = build_startup_message({"user": "app"})
    buffer = bytearray(build_ssl_request() + startup)
    first, used = read_startup_packet(buffer)
    assert isinstance(first, SSLRequest)
    del buffer[:used]
    second, used = read_startup_packet(buffer)
    assert isinstance(second, StartupMessage) and used == len(startup)


def test_incomplete_packets_ask_for_more() -> None:
    for packet in (build_startup_message({"user": "app", "database": "db"}), build_ssl_request(),
                   build_cancel_request(1, b"abcd")):
        for cut in range(len(packet)):
            assert read_startup_packet(packet[:cut]) is None, cut


@pytest.mark.parametrize("length", [-1, 0, 4, 7, MAX_STARTUP_PACKET_LENGTH + 1, 0x7FFFFFFF])
def test_bad_startup_lengths_are_refused_as_soon_as_the_length_is_read(length: int) -> None:
    with pytest.raises(ProtocolViolation, match="invalid length"):
        read_startup_packet(struct.pack("!i", length))
    with pytest.raises(ProtocolViolation, match="invalid length"):
        read_startup_packet(struct.pack("!ii", length, 3 << 16))


def test_longest_allowed_startup_packet_is_accepted() -> None:
    filler = "x" * (MAX_STARTUP_PACKET_LENGTH - 8 - len("user\0app\0application_name\0\0\0"))
    packet = build_startup_message({"user": "app", "application_name": filler})
    assert len(packet) == MAX_STARTUP_PACKET_LENGTH
    assert read_startup_packet(packet[:-1]) is None
    parsed, used = read_startup_packet(packet)
    assert used == MAX_STARTUP_PACKET_LENGTH and parsed.parameters["application_name"] == filler


@pytest.mark.parametrize("code", [2 << 16, 4 << 16, 1234 << 16 | 5000, 0, SSL_REQUEST_CODE + 10])
def test_unsupported_protocol_versions_are_refused(code: int) -> None:
    body = b"user\x00app\x00\x00"
    with pytest.raises(ProtocolViolation):
        read_startup_packet(struct.pack("!ii", 8 + len(body), code) + body)


@pytest.mark.parametrize("code", [SSL_REQUEST_CODE, GSSENC_REQUEST_CODE, CANCEL_REQUEST_CODE])
def test_special_request_codes_with_the_wrong_length_are_refused(code: int) -> None:
    with pytest.raises(ProtocolViolation):
        read_startup_packet(struct.pack("!ii", 12, code) + b"\x00" * 4)


def _startup_with_body(body: bytes) -> bytes:
    return struct.pack("!ii", 8 + len(body), 3 << 16) + body


@pytest.mark.parametrize(("body", "expected"), [
    (b"\x00", {}),
    (b"user\x00app\x00\x00", {"user": "app"}),
    (b"user\x00app\x00application_name\x00\x00\x00", {"user": "app", "application_name": ""}),
    ("user\x00ünïcødé\x00\x00".encode(), {"user": "ünïcødé"}),
])
def test_parameter_lists_that_are_well_formed(body: bytes, expected: dict) -> None:
    parsed, _ = read_startup_packet(_startup_with_body(body))
    assert parsed.parameters == expected


@pytest.mark.parametrize("body", [
    b"",  # no terminator at all
    b"user\x00app\x00",  # list not terminated
    b"user\x00app",  # value not terminated
    b"user\x00\x00",  # a name without a value
    b"user\x00app\x00database\x00\x00",  # the same after a valid pair
    b"\x00\x00",
])
def test_parameter_lists_that_are_malformed(body: bytes) -> None:
    with pytest.raises(ProtocolViolation):
        read_startup_packet(_startup_with_body(body))


def test_non_utf8_parameters_are_a_protocol_violation() -> None:
    with pytest.raises(ProtocolViolation, match="UTF-8"):
        read_startup_packet(_startup_with_body(b"user\x00\xff\xfe\x00\x00"))
    with pytest.raises(ProtocolViolation, match="UTF-8"):
        read_startup_packet(_startup_with_body(b"\xc3\x28\x00app\x00\x00"))


# ---- startup properties -------------------------------------------------------------------------

_param_text = st.text(st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), max_size=20)


@FUZZ
@given(data=st.binary(max_size=200), code=st.sampled_from([
    3 << 16, (3 << 16) | 2, SSL_REQUEST_CODE, GSSENC_REQUEST_CODE, CANCEL_REQUEST_CODE, None]),
    length=st.one_of(st.none(), st.integers(min_value=-10, max_value=400)))
def test_property_startup_parser_raises_only_protocol_violation(data, code, length) -> None:
    # Random bytes, often behind a plausible length and code so the parser gets past the first checks.
    if code is not None:
        size = 8 + len(data) if length is None else length
        data = struct.pack("!iI", size, code) + data
    try:
        result = read_startup_packet(data)
    except ProtocolViolation:
        return
    if result is not None:
        packet, used = result
        assert 8 <= used <= min(len(data), MAX_STARTUP_PACKET_LENGTH)
        assert isinstance(packet, (StartupMessage, SSLRequest, GSSENCRequest, CancelRequest))


@FUZZ_SMALL
@given(data=st.binary(min_size=4, max_size=120), cut=st.integers(min_value=0, max_value=120))
def test_property_a_prefix_never_contradicts_the_whole(data, cut) -> None:
    data = struct.pack("!i", 8 + len(data) - 4) + data[4:]  # a consistent length, random code and body

    def verdict(buffer: bytes):
        try:
            return read_startup_packet(buffer)
        except ProtocolViolation:
            return "violation"

    whole = verdict(data)
    prefix = verdict(data[:cut])
    if cut >= len(data):
        assert prefix == whole
    else:
        # Short of the whole packet the parser can only ask for more, or see the same problem early.
        assert prefix is None or (prefix == "violation" == whole)


@FUZZ_SMALL
@given(params=st.dictionaries(_param_text.filter(bool), _param_text, max_size=6), minor=st.integers(0, 2),
       cut=st.integers(min_value=0, max_value=2000))
def test_property_built_startup_messages_round_trip(params, minor, cut) -> None:
    packet = build_startup_message(params, minor=minor)
    if len(packet) > MAX_STARTUP_PACKET_LENGTH:
        return
    parsed, used = read_startup_packet(packet)
    assert parsed == StartupMessage(3, minor, params) and used == len(packet)
    if cut < len(packet):
        assert read_startup_packet(packet[:cut]) is None


# ---- ErrorResponse -------------------------------------------------------------------------------

def _decode(wire: bytes) -> tuple[str, dict[str, str]]:
    kind, length = struct.unpack_from("!cI", wire, 0)
    assert length == len(wire) - 1
    return kind.decode(), parse_error_fields(wire[5:])


def test_error_response_round_trips_every_field() -> None:
    error = PgError(SqlState.TOO_MANY_CONNECTIONS, "no more connections", hint="raise it",
                    detail="3 of 3 busy", severity=Severity.FATAL)
    kind, fields = _decode(error.to_bytes())
    assert kind == "E"
    assert fields == {"S": "FATAL", "V": "FATAL", "C": "53300", "M": "no more connections",
                      "D": "3 of 3 busy", "H": "raise it"}
    assert str(error) == "FATAL 53300 no more connections"


def test_error_response_without_optional_fields_and_with_non_ascii_text() -> None:
    kind, fields = _decode(errors.error_response(Severity.ERROR, "XX000", "база «данных» — ✓"))
    assert kind == "E"
    assert fields == {"S": "ERROR", "V": "ERROR", "C": "XX000", "M": "база «данных» — ✓"}


def test_notice_response_is_a_notice() -> None:
    kind, fields = _decode(errors.notice_response("pool is busy", hint="wait"))
    assert kind == "N"
    assert fields == {"S": "NOTICE", "V": "NOTICE", "C": "00000", "M": "pool is busy", "H": "wait"}


def test_parse_error_fields_reads_what_postgresql_sends() -> None:
    body = (b"SFATAL\x00VFATAL\x00C28P01\x00Mpassword authentication failed for user \"x\"\x00"
            b"Fauth.c\x00L326\x00Rauth_failed\x00\x00")
    fields = parse_error_fields(body)
    assert fields["C"] == "28P01" and fields["R"] == "auth_failed" and fields["L"] == "326"
    assert parse_error_fields(memoryview(body)) == fields


@pytest.mark.parametrize(("error", "sqlstate", "severity", "words"), [
    (errors.unknown_database("shop"), "3D000", "FATAL", ['"shop"']),
    (errors.password_authentication_failed("bob"), "28P01", "FATAL", ['password authentication failed', '"bob"']),
    (errors.protocol_violation("bad"), "08P01", "FATAL", ["bad"]),
    (errors.unsupported_startup_parameter("foo"), "08P01", "FATAL", ["foo"]),
    (errors.upstream_unavailable("postgresql://app:***@db:5432/app", "Connection refused"), "08006", "ERROR",
     ["postgresql://app:***@db:5432/app", "Connection refused"]),
    (errors.server_connection_lost("postgresql://app:***@db:5432/app"), "08006", "FATAL", ["db:5432"]),
    (errors.too_many_clients(1000), "53300", "FATAL", ["max_client_conn=1000", "no more connections allowed"]),
    (errors.wait_timeout("app/alice", 2.5, 5, 3, 5), "53300", "ERROR",
     ["app/alice", "query_wait_timeout=2.5s", "5 of 5 busy", "3 waiting"]),
    (errors.shutting_down(), "57P01", "FATAL", ["shutting down"]),
])
def test_catalogue_entries_carry_their_sqlstate_severity_and_names(error, sqlstate, severity, words) -> None:
    kind, fields = _decode(error.to_bytes())
    assert kind == "E"
    assert (fields["C"], fields["S"], fields["V"]) == (sqlstate, severity, severity)
    for word in words:
        assert word in fields["M"]


@pytest.mark.parametrize("error", [
    errors.unknown_database("x"), errors.too_many_clients(10), errors.wait_timeout("a/b", 1, 1, 1, 1),
    errors.upstream_unavailable("u", "r"), errors.unsupported_startup_parameter("p"),
])
def test_refusals_carry_a_hint(error) -> None:
    assert parse_error_fields(error.to_bytes()[5:]).get("H")


def test_unknown_user_and_wrong_password_are_indistinguishable() -> None:
    assert errors.unknown_user("eve").to_bytes() == errors.password_authentication_failed("eve").to_bytes()


@settings(max_examples=500, deadline=None)
@given(message=_param_text, hint=st.one_of(st.none(), _param_text.filter(bool)),
       detail=st.one_of(st.none(), _param_text.filter(bool)),
       severity=st.sampled_from(list(Severity)), sqlstate=st.sampled_from(list(SqlState)))
def test_property_error_response_round_trip(message, hint, detail, severity, sqlstate) -> None:
    wire = PgError(sqlstate, message, hint=hint, detail=detail, severity=severity).to_bytes()
    out, frames = scan(FrameScanner(frozenset({m.ERROR_RESPONSE})), [wire])
    assert frames == [(m.ERROR_RESPONSE, wire)]
    fields = parse_error_fields(wire[5:])
    assert fields["C"] == sqlstate.value and fields["S"] == severity.value and fields["M"] == message
    assert fields.get("H") == hint and fields.get("D") == detail
