"""Sans-IO tests of proxy.login: whole login conversations fed as bytes, split at every byte boundary.

No socket and no event loop: a client is a generator of "flights" (what it sends before it waits for
an answer), each flight is fed to the LoginMachine whole, in two pieces at every split point, and
byte by byte, and every way of feeding it must give the same events, replies and session bytes.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator
from typing import Any

import pytest
import scramp

from proxy.auth import AuthMethod, UserSecret
from proxy.auth.client_auth import WRONG_PASSWORD
from proxy.auth.secrets import md5_password_hash, md5_salted_response
from proxy.login import (
    AuthFailed,
    Authenticated,
    CancelRequested,
    ClientLeft,
    Identified,
    LoginEvent,
    LoginMachine,
    Refused,
    Reply,
    StartTls,
    Welcome,
    welcome,
)
from proxy.protocol import errors
from proxy.protocol import messages as m
from proxy.protocol.startup import build_cancel_request, build_ssl_request, build_startup_message

USER = "alice"
DATABASE = "shop"
PASSWORD = "correct horse battery staple"
QUERY = m.query("SELECT 1")  # pipelined behind the login: belongs to the session
STARTUP = build_startup_message({"user": USER, "database": DATABASE, "application_name": "tests"})
GSSENC_REQUEST = b"\x00\x00\x00\x08\x04\xd2\x16\x30"  # length 8, code 80877104

Flights = Generator[bytes, bytes, None]  # yields what the client sends, is sent what pgmux replied
Feeding = Callable[[int, bytes], list[bytes]]  # (flight number, flight) -> the pieces to feed


# ---- the driver --------------------------------------------------------------------------------

def summary(event: LoginEvent) -> tuple[Any, ...]:
    """An event as comparable values (PgErrors by their bytes on the wire)."""
    if isinstance(event, Identified):
        parameters = event.parameters
        return ("identified", event.user, event.database, event.minor, parameters.synced, parameters.unreported,
                parameters.unsupported_options)
    if isinstance(event, Authenticated):
        return ("authenticated",)  # the leftover goes to the session bytes
    if isinstance(event, Refused):
        return ("refused", event.error.to_bytes(), event.reason)
    if isinstance(event, AuthFailed):
        return ("auth failed", event.error.to_bytes(), event.log_reason)
    if isinstance(event, CancelRequested):
        return ("cancel", event.process_id, event.secret_key)
    assert isinstance(event, ClientLeft)
    return ("left",)


class LoginRun:
    """One login as the edge runs it: replies collected, Identified answered at once, and every byte
    after Authenticated (its leftover, then later reads) collected as the session's."""

    def __init__(self, method: AuthMethod, secret: UserSecret | None, refusal: errors.PgError | None) -> None:
        self.machine = LoginMachine(ignored_parameters=())
        if refusal is not None:
            self.machine.refuse(refusal)
        self.method = method
        self.secret = secret
        self.replies = bytearray()
        self.events: list[tuple[Any, ...]] = []
        self.session = bytearray()
        self.flight_lengths: list[int] = []
        self._logged_in = False

    def read(self, piece: bytes) -> None:
        if self._logged_in:
            self.session += piece
        else:
            self._take(self.machine.feed(piece))

    def _take(self, events: list[LoginEvent]) -> None:
        for event in events:
            if isinstance(event, Reply):
                self.replies += event.data
                continue
            self.events.append(summary(event))
            if isinstance(event, Identified):
                self._take(self.machine.authenticate(self.method, self.secret))
            elif isinstance(event, Authenticated):
                self._logged_in = True
                self.session += event.leftover


def converse(client: Callable[[], Flights], feeding: Feeding, method: AuthMethod = AuthMethod.TRUST,
             secret: UserSecret | None = None, refusal: errors.PgError | None = None) -> LoginRun:
    login = LoginRun(method, secret, refusal)
    flights = client()
    flight = next(flights)
    number = seen = 0
    while True:
        login.flight_lengths.append(len(flight))
        for piece in feeding(number, flight):
            login.read(piece)
        replied, seen = bytes(login.replies[seen:]), len(login.replies)
        try:
            flight = flights.send(replied)
        except StopIteration:
            return login
        number += 1


def whole(number: int, flight: bytes) -> list[bytes]:
    return [flight]


def byte_by_byte(number: int, flight: bytes) -> list[bytes]:
    return [flight[i:i + 1] for i in range(len(flight))]


def split_at(wanted: int, at: int) -> Feeding:
    """Flight ``wanted`` in two pieces, cut ``at`` bytes in; the others whole."""
    def feeding(number: int, flight: bytes) -> list[bytes]:
        return [flight[:at], flight[at:]] if number == wanted else [flight]
    return feeding


def every_feeding(client: Callable[[], Flights], **login: Any) -> Iterator[tuple[str, LoginRun]]:
    """The conversation fed whole, byte by byte, and split at every byte boundary of every flight."""
    first = converse(client, whole, **login)
    yield "whole", first
    yield "byte by byte", converse(client, byte_by_byte, **login)
    for number, length in enumerate(first.flight_lengths):
        for at in range(1, length):
            yield f"flight {number} split at {at}", converse(client, split_at(number, at), **login)


def assert_same_however_split(client: Callable[[], Flights], compare_replies: bool = True, **login: Any) -> LoginRun:
    runs = every_feeding(client, **login)
    _, expected = next(runs)
    for how, run in runs:
        assert run.events == expected.events, how
        assert run.session == expected.session, how
        if compare_replies:  # md5 salts and SCRAM nonces are random: those clients check the replies themselves
            assert run.replies == expected.replies, how
    return expected


# ---- clients -----------------------------------------------------------------------------------

def auth_request(reply: bytes) -> tuple[int, bytes]:
    assert reply[0] == m.AUTHENTICATION
    return m.parse_authentication(reply[5:])


def trust_client(*before: bytes, startup: bytes = STARTUP, pipelined: bytes = QUERY) -> Callable[[], Flights]:
    """Sends each of ``before`` (answered by one byte each), then its StartupMessage with a Query behind it."""
    def flights() -> Flights:
        for request in before:
            assert (yield request) == b"N"
        yield startup + pipelined
    return flights


def md5_client(password: str) -> Callable[[], Flights]:
    def flights() -> Flights:
        code, salt = auth_request((yield STARTUP))
        assert code == m.AUTH_MD5_PASSWORD
        yield m.password_message(md5_salted_response(md5_password_hash(USER, password), salt)) + QUERY
    return flights


def scram_client(password: str = PASSWORD, first_with_startup: bool = False) -> Callable[[], Flights]:
    """scramp's reference client; it checks pgmux's server signature. With ``first_with_startup`` its
    client-first goes in the StartupMessage's read (it does not depend on pgmux's answer)."""
    def flights() -> Flights:
        client = scramp.ScramClient(["SCRAM-SHA-256"], "ignored", password)
        first = m.sasl_initial_response("SCRAM-SHA-256", client.get_client_first().encode())
        if first_with_startup:
            replied = yield STARTUP + first
            assert replied[0] == m.AUTHENTICATION and replied[1:5] == b"\x00\x00\x00\x17"
            server_first_reply = replied[24:]  # behind AuthenticationSASL (24 bytes)
        else:
            code, mechanisms = auth_request((yield STARTUP))
            assert code == m.AUTH_SASL and m.parse_sasl_mechanisms(mechanisms) == ["SCRAM-SHA-256"]
            server_first_reply = yield first
        code, server_first = auth_request(server_first_reply)
        assert code == m.AUTH_SASL_CONTINUE
        client.set_server_first(server_first.decode())
        replied = yield m.sasl_response(client.get_client_final().encode()) + QUERY
        if password != PASSWORD:
            assert replied == b""  # no server-final: the edge sends the failure
            return
        code, server_final = auth_request(replied)
        assert code == m.AUTH_SASL_FINAL
        client.set_server_final(server_final.decode())  # raises unless pgmux proved it knows the verifier
    return flights


def one_flight(data: bytes) -> Callable[[], Flights]:
    def flights() -> Flights:
        yield data
    return flights


IDENTIFIED: tuple[Any, ...] = ("identified", USER, DATABASE, 0, {"application_name": "tests"}, {}, [])
SECRET = UserSecret(USER, password=PASSWORD)


# ---- logins that succeed -----------------------------------------------------------------------

def test_trust_login_identifies_authenticates_and_hands_the_pipelined_query_to_the_session() -> None:
    login = assert_same_however_split(trust_client())
    assert login.events == [IDENTIFIED, ("authenticated",)]
    assert login.replies == b""  # AuthenticationOk is part of the welcome
    assert login.session == QUERY


@pytest.mark.parametrize("request_", [build_ssl_request(), GSSENC_REQUEST], ids=["SSLRequest", "GSSENCRequest"])
def test_ssl_and_gssenc_requests_are_answered_n_and_the_login_continues_in_plaintext(request_: bytes) -> None:
    login = assert_same_however_split(trust_client(request_, request_))
    assert login.replies == b"NN"
    assert login.events == [IDENTIFIED, ("authenticated",)]
    assert login.session == QUERY


def test_md5_login_checks_the_salted_hash_and_keeps_the_pipelined_query() -> None:
    login = assert_same_however_split(md5_client(PASSWORD), compare_replies=False, method=AuthMethod.MD5,
                                      secret=SECRET)
    assert login.events == [IDENTIFIED, ("authenticated",)]
    assert login.session == QUERY


def test_scram_login_after_an_ssl_request_proves_both_sides_and_keeps_the_pipelined_query() -> None:
    def client() -> Flights:
        assert (yield build_ssl_request()) == b"N"
        yield from scram_client()()
    login = assert_same_however_split(client, compare_replies=False, method=AuthMethod.SCRAM_SHA_256,
                                      secret=SECRET)
    assert login.events == [IDENTIFIED, ("authenticated",)]
    assert login.session == QUERY


def test_auth_bytes_read_before_authenticate_is_called_are_read_once_it_is() -> None:
    login = assert_same_however_split(scram_client(first_with_startup=True), compare_replies=False,
                                      method=AuthMethod.SCRAM_SHA_256, secret=SECRET)
    assert login.events == [IDENTIFIED, ("authenticated",)]
    assert login.session == QUERY


def test_negotiate_protocol_version_answers_a_newer_minor_and_lists_the_unsupported_options() -> None:
    startup = build_startup_message({"user": USER, "_pq_.compression": "on", "search_path": "app"}, minor=2)
    login = assert_same_however_split(trust_client(startup=startup))
    assert login.replies == m.negotiate_protocol_version(0, ["_pq_.compression"])
    assert login.events == [("identified", USER, USER, 2, {"search_path": "app"}, {}, ["_pq_.compression"]),
                            ("authenticated",)]
    assert login.session == QUERY


def test_an_unsupported_option_alone_gets_negotiate_protocol_version_too() -> None:
    startup = build_startup_message({"user": USER, "_pq_.x": "1"})
    login = assert_same_however_split(trust_client(startup=startup))
    assert login.replies == m.negotiate_protocol_version(0, ["_pq_.x"])


def test_startup_options_are_sorted_into_synced_and_unreported_parameters() -> None:
    startup = build_startup_message({"user": USER, "options": "-c search_path=app --work-mem=64MB"})
    login = assert_same_however_split(trust_client(startup=startup))
    assert login.events[0] == ("identified", USER, USER, 0, {"search_path": "app"}, {"work_mem": "64MB"}, [])


def test_ignored_startup_parameters_are_dropped() -> None:
    machine = LoginMachine(ignored_parameters={"extra_float_digits"})
    [event] = machine.feed(build_startup_message({"user": USER, "extra_float_digits": "3"}))
    assert isinstance(event, Identified)
    assert event.parameters.synced == {} and event.parameters.unreported == {}


# ---- cancel requests ---------------------------------------------------------------------------

def test_cancel_request_is_reported_with_its_key_and_nothing_is_replied() -> None:
    login = assert_same_however_split(one_flight(build_cancel_request(1234, b"\x01\x02\x03\x04")))
    assert login.events == [("cancel", 1234, b"\x01\x02\x03\x04")]
    assert login.replies == b""


def test_a_refused_connection_still_gets_its_cancel_request_through() -> None:
    login = assert_same_however_split(one_flight(build_cancel_request(7, b"abcd")),
                                      refusal=errors.shutting_down())
    assert login.events == [("cancel", 7, b"abcd")]


def test_nothing_is_read_after_a_cancel_request() -> None:
    machine = LoginMachine(ignored_parameters=())
    assert len(machine.feed(build_cancel_request(7, b"abcd"))) == 1
    assert machine.feed(STARTUP) == []


# ---- refusals ----------------------------------------------------------------------------------

def refused(error: errors.PgError, reason: str | None) -> tuple[Any, ...]:
    return ("refused", error.to_bytes(), reason)


def test_the_connect_time_refusal_is_told_after_the_startup_message() -> None:
    login = assert_same_however_split(trust_client(build_ssl_request()), refusal=errors.shutting_down())
    assert login.replies == b"N"
    assert login.events == [refused(errors.shutting_down(), None)]  # counted when it was decided
    assert login.session == b""


def test_data_behind_an_ssl_request_in_the_same_read_is_a_protocol_violation() -> None:
    flight = build_ssl_request() + STARTUP
    violation = refused(errors.protocol_violation("data after SSLRequest/GSSENCRequest before the reply"),
                        "protocol_error")
    for at in range(1, len(flight)):
        login = converse(one_flight(flight), split_at(0, at))
        if at == len(build_ssl_request()):  # the SSLRequest read alone: the client waited after all
            assert login.events == [IDENTIFIED, ("authenticated",)], at
        else:
            assert login.events == [violation], at
            assert login.replies == b"", at


@pytest.mark.parametrize(("packet", "error", "reason"), [
    (b"\x00\x00\x00\x04\x00\x03\x00\x00", errors.protocol_violation("invalid length of startup packet: 4"),
     "protocol_error"),
    (b"\x00\x01\x00\x00" + b"\x00" * 12, errors.protocol_violation("invalid length of startup packet: 65536"),
     "protocol_error"),
    (b"\x00\x00\x00\x09\x00\x02\x00\x00\x00",
     errors.protocol_violation("unsupported frontend protocol 2.0: server supports 3.0"), "protocol_error"),
    (build_startup_message({"database": DATABASE}),
     errors.protocol_violation("no PostgreSQL user name specified in startup packet"), None),
    (build_startup_message({"user": USER, "replication": "true"}),
     errors.unsupported_startup_parameter("replication"), None),
    (build_startup_message({"user": USER})[:-1] + b"x",
     errors.protocol_violation("startup packet parameters are not NUL-terminated"), "protocol_error"),
], ids=["too short", "too long", "protocol 2", "no user", "replication", "unterminated"])
def test_bad_startup_packets_are_refused_with_postgresql_errors(packet: bytes, error: errors.PgError,
                                                                reason: str | None) -> None:
    login = assert_same_however_split(one_flight(packet))
    assert login.events == [refused(error, reason)]
    assert login.replies == b""


def test_a_wrong_md5_password_fails_with_one_error_and_the_reason_for_the_logs() -> None:
    login = assert_same_however_split(md5_client("guess"), compare_replies=False, method=AuthMethod.MD5,
                                      secret=SECRET)
    assert login.events == [IDENTIFIED, ("auth failed", errors.password_authentication_failed(USER).to_bytes(),
                                         WRONG_PASSWORD)]
    assert login.session == b""


def test_a_wrong_scram_password_fails_after_the_whole_exchange() -> None:
    login = assert_same_however_split(scram_client("guess"), compare_replies=False,
                                      method=AuthMethod.SCRAM_SHA_256, secret=SECRET)
    assert login.events == [IDENTIFIED, ("auth failed", errors.password_authentication_failed(USER).to_bytes(),
                                         WRONG_PASSWORD)]
    assert login.session == b""


def test_an_unknown_user_runs_the_whole_exchange_then_fails_as_a_wrong_password() -> None:
    machine = LoginMachine(ignored_parameters=())
    machine.feed(STARTUP)
    [challenge] = machine.authenticate(AuthMethod.MD5, None)
    assert isinstance(challenge, Reply) and auth_request(challenge.data)[0] == m.AUTH_MD5_PASSWORD
    [failed] = machine.feed(m.password_message(b"md5" + b"0" * 32))
    assert isinstance(failed, AuthFailed)
    assert failed.error == errors.password_authentication_failed(USER)


def test_a_message_other_than_a_password_during_authentication_is_refused() -> None:
    def client() -> Flights:
        yield STARTUP
        yield QUERY
    login = assert_same_however_split(client, method=AuthMethod.MD5, secret=SECRET, compare_replies=False)
    assert login.events == [IDENTIFIED,
                            refused(errors.protocol_violation("expected a password message, got 'Q'"), None)]


def test_an_oversized_auth_message_is_a_protocol_violation() -> None:
    machine = LoginMachine(ignored_parameters=())
    machine.feed(STARTUP)
    machine.authenticate(AuthMethod.MD5, SECRET)
    [event] = machine.feed(b"p\x00\x01\x00\x01")
    assert summary(event) == refused(errors.protocol_violation("invalid length 65537 for message type 'p'"),
                                     "protocol_error")


def test_terminate_during_authentication_means_the_client_left() -> None:
    def client() -> Flights:
        yield STARTUP
        yield m.terminate()
    login = assert_same_however_split(client, method=AuthMethod.SCRAM_SHA_256, secret=SECRET)
    assert login.events == [IDENTIFIED, ("left",)]


def test_authenticate_is_answered_only_once_per_identified() -> None:
    machine = LoginMachine(ignored_parameters=())
    with pytest.raises(RuntimeError):
        machine.authenticate(AuthMethod.TRUST, None)
    machine.feed(STARTUP)
    machine.authenticate(AuthMethod.TRUST, None)
    with pytest.raises(RuntimeError):
        machine.authenticate(AuthMethod.TRUST, None)


# ---- the welcome -------------------------------------------------------------------------------

def test_welcome_is_authentication_ok_parameters_cancel_key_and_ready_for_query() -> None:
    parameters = {"server_version": "16.4", "TimeZone": "UTC"}
    assert welcome(parameters, 0x1234, b"\xff\xff\xff\xfe") == (
        m.authentication_ok() + m.parameter_statuses(parameters) + m.backend_key_data(0x1234, -2)
        + m.ready_for_query())


def test_the_admin_consoles_welcome_has_a_zero_cancel_key() -> None:
    assert welcome({}, 0, b"") == m.authentication_ok() + m.backend_key_data(0, 0) + m.ready_for_query()


def test_a_pools_prebuilt_welcome_says_what_welcome_would_as_the_parameters_change() -> None:
    prebuilt = Welcome()
    defaults = {"server_version": "16.4", "TimeZone": "UTC", "application_name": ""}
    shared = {"application_name": "pgbench"}  # the same objects again: the head is reused without comparing
    logins = [(defaults, {"application_name": "pgbench"}, 7), (defaults, {"application_name": "pgbench"}, 8),
              (defaults, shared, 11), (defaults, shared, 12),
              (defaults, {"application_name": "psql"}, 9), ({**defaults, "TimeZone": "CET"}, {}, 10)]
    for server, own, process_id in logins:
        assert prebuilt.message(server, own, process_id, b"\x00\x00\x00\x01") == welcome(
            {**server, **own}, process_id, b"\x00\x00\x00\x01")


# ---- TLS offered (client_tls_sslmode): the machine says when TLS begins; the edge runs it ----------

CLIENT_HELLO = b"\x16\x03\x01\x00\x05hello"  # what matters is the first byte, a TLS handshake record


def _kinds(events: list[Any]) -> list[Any]:
    out: list[Any] = []
    for event in events:
        if isinstance(event, Reply):
            out.append(("reply", event.data))
        elif isinstance(event, StartTls):
            out.append(("tls", event.initial, event.direct))
        elif isinstance(event, Refused):
            out.append(("refused", event.error.message, event.reason))
        else:
            out.append(type(event).__name__)
    return out


def test_an_ssl_request_is_answered_s_when_tls_is_offered_and_the_startup_follows_encrypted() -> None:
    machine = LoginMachine((), tls_offered=True)
    assert _kinds(machine.feed(build_ssl_request())) == [("reply", b"S"), ("tls", b"", False)]
    assert machine.encrypted
    assert _kinds(machine.feed(STARTUP)) == ["Identified"]  # what the TLS records decrypted to


def test_a_client_hello_pipelined_behind_the_ssl_request_is_handed_to_tls() -> None:
    machine = LoginMachine((), tls_offered=True)
    events = machine.feed(build_ssl_request() + CLIENT_HELLO)
    assert _kinds(events) == [("reply", b"S"), ("tls", CLIENT_HELLO, False)]


def test_a_first_byte_of_a_client_hello_begins_direct_tls() -> None:
    machine = LoginMachine((), tls_offered=True, tls_required=True)
    assert _kinds(machine.feed(CLIENT_HELLO)) == [("tls", CLIENT_HELLO, True)]
    assert _kinds(machine.feed(STARTUP)) == ["Identified"]


def test_direct_tls_where_none_is_offered_is_a_protocol_violation() -> None:
    events = LoginMachine(()).feed(CLIENT_HELLO)
    assert _kinds(events) == [("refused", "protocol violation: the client began TLS directly, but this listener "
                                          "offers no TLS", "protocol_error")]


def test_a_plaintext_login_is_refused_when_tls_is_required_but_a_cancel_request_gets_through() -> None:
    events = LoginMachine((), tls_offered=True, tls_required=True).feed(STARTUP)
    assert _kinds(events) == [("refused", "SSL required", "tls_required")]
    events = LoginMachine((), tls_offered=True, tls_required=True).feed(build_cancel_request(7, b"\x00" * 4))
    assert _kinds(events) == ["CancelRequested"]


def test_a_second_ssl_request_inside_tls_is_a_protocol_violation() -> None:
    machine = LoginMachine((), tls_offered=True)
    machine.feed(build_ssl_request())
    assert _kinds(machine.feed(build_ssl_request())) == [
        ("refused", "protocol violation: SSLRequest on a connection that is already encrypted", "protocol_error")]
