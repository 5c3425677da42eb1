"""Sans-IO protocol layer: startup packets and ErrorResponse, fed bytes at every split point and fuzzed."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.protocol import errors
from proxy.protocol import messages as m
from proxy.protocol.errors import PgError, Severity, SqlState, parse_error_fields
from proxy.protocol.framing import Frame, FrameScanner, ProtocolViolation
from proxy.protocol.sql_words import drops_all_statements
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
    startup_packet_at,
)

# Property tests share a budget: together they run well over 10,000 generated cases.
FUZZ = settings(max_examples=2500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FUZZ_SMALL = settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ---- startup packets ---------------------------------------------------------------------------

def test_startup_message_parses_its_parameters() -> None:
    params = {"user": "app", "database": "shop", "application_name": "psql", "options": "-c geqo=off"}
    packet = build_startup_message(params)
    parsed, used = read_startup_packet(packet + b"Qtrailing")
    assert used == len(packet)
    assert parsed == StartupMessage(3, 0, params)
    assert (parsed.user, parsed.database) == ("app", "shop")


def test_the_same_startup_packet_again_parses_to_its_own_equal_parameters() -> None:
    """Parameter sections are remembered (most connections repeat one): each login still gets a dict of its own."""
    params = {"user": "app", "database": "shop", "application_name": "worker-7"}
    packet = build_startup_message(params)
    first, _ = read_startup_packet(packet)
    first.parameters["application_name"] = "changed by its holder"
    second, _ = read_startup_packet(packet)
    assert second.parameters == params
    second.parameters["application_name"] = "changed by its holder"
    third, _ = read_startup_packet(packet)
    assert third.parameters == params
    other, _ = read_startup_packet(build_startup_message({**params, "application_name": "worker-8"}))
    assert other.parameters["application_name"] == "worker-8"


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


def test_a_startup_packet_is_read_at_an_offset_as_from_the_front() -> None:
    startup = build_startup_message({"user": "app", "application_name": "x"}, minor=2)
    data = build_ssl_request() + startup + b"Q"
    expected = (StartupMessage(3, 2, {"user": "app", "application_name": "x"}), len(startup))
    assert startup_packet_at(data, 8) == read_startup_packet(startup) == expected
    assert startup_packet_at(data, 0) == (SSLRequest(), 8)
    assert startup_packet_at(data[:-2], 8) is None  # incomplete


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
    (errors.upstream_unavailable("Connection refused"), "08006", "ERROR", ["upstream server", "Connection refused"]),
    (errors.server_connection_lost(), "08006", "FATAL", ["server connection was lost"]),
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
    errors.upstream_unavailable("r"), errors.unsupported_startup_parameter("p"),
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
    [frame] = FrameScanner(frozenset({m.ERROR_RESPONSE})).feed(wire)
    assert type(frame) is Frame and frame.kind == m.ERROR_RESPONSE and bytes(frame.data) == wire
    fields = parse_error_fields(wire[5:])
    assert fields["C"] == sqlstate.value and fields["S"] == severity.value and fields["M"] == message
    assert fields.get("H") == hint and fields.get("D") == detail


@pytest.mark.parametrize(("sql", "drops"), [
    (b"DEALLOCATE ALL", True), (b"deallocate prepare all;", True), (b"/* c */ DISCARD ALL", True),
    (b"SELECT 1; DEALLOCATE ALL", True), (b"select 1;\n-- tidy up\n  Discard  All ;  ", True),
    (b"SELECT ';'; DISCARD ALL", True), (b"$q$;$q$; DISCARD ALL", True), (b"DISCARD ALL -- done", True),
    (b"DISCARD PLANS", False), (b"DEALLOCATE s1", False), (b"SELECT 'x; DISCARD ALL'", False),
    (b"SELECT E'\\'; DISCARD ALL'", False), (b'SELECT "a;DISCARD ALL"', False),
    (b"DO $$BEGIN EXECUTE 'DEALLOCATE ALL'; END$$", False), (b"-- DISCARD ALL", False), (b"", False),
])
def test_drops_all_statements_reads_statements_not_comments_or_quoted_text(sql, drops) -> None:
    # A client's own statement names are forgotten only when PostgreSQL surely forgets them.
    assert drops_all_statements(sql) is drops
