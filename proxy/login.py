"""The login conversation as a sans-IO state machine: client bytes in, events out (no socket, no event loop)."""

from __future__ import annotations

import enum
from collections.abc import Collection, Mapping
from typing import Final

from proxy.auth.cleartext import CleartextChecks
from proxy.auth.client_auth import AuthenticationFailed, ClientAuthenticator, client_authenticator
from proxy.auth.secrets import AuthMethod, ScramKeys, UserSecret
from proxy.parameters import StartupParameters, parse_startup_parameters
from proxy.protocol import errors
from proxy.protocol import messages as m
from proxy.protocol.errors import PgError
from proxy.protocol.framing import Frame, FrameScanner, ProtocolViolation
from proxy.protocol.startup import CancelRequest, GSSENCRequest, SSLRequest, StartupMessage, startup_packet_at

_CAPTURE_ALL: Final = frozenset(range(256))
_MAX_AUTH_MESSAGE: Final = 1 << 16  # a password or SASL message is far smaller


# The events: plain classes, not dataclasses, so that compiled their __init__ is native code (one or
# two are made per login).

class Reply:
    """Bytes to send the client."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data


class CancelRequested:
    """The connection was a CancelRequest: forward it, then close without a word."""

    __slots__ = ("process_id", "secret_key")

    def __init__(self, process_id: int, secret_key: bytes) -> None:
        self.process_id = process_id
        self.secret_key = secret_key


class Identified:
    """The StartupMessage said who logs in where. The machine waits: call ``authenticate()`` with the
    user's secret, or refuse the login (nothing more is read until then)."""

    __slots__ = ("user", "database", "minor", "parameters")

    def __init__(self, user: str, database: str, minor: int, parameters: StartupParameters) -> None:
        self.user = user
        self.database = database
        self.minor = minor  # the protocol 3.x the client asked for (NegotiateProtocolVersion has answered 3.0)
        self.parameters = parameters


class Authenticated:
    """The client proved who it is: welcome it. ``leftover``: what it pipelined behind its last auth message;
    ``scram_keys``: after SCRAM against a verifier, what logs in upstream as the client (see server_auth)."""

    __slots__ = ("leftover", "scram_keys")

    def __init__(self, leftover: bytes, scram_keys: ScramKeys | None = None) -> None:
        self.leftover = leftover
        self.scram_keys = scram_keys


class Refused:
    """The login cannot go on: send ``error`` (FATAL) and close.

    ``reason``: the rejection it is counted under; None when it is not counted (or was already).
    """

    __slots__ = ("error", "reason")

    def __init__(self, error: PgError, reason: str | None) -> None:
        self.error = error
        self.reason = reason


class AuthFailed:
    """The client did not prove who it is: send ``error`` (FATAL) and close.

    ``error`` is the same whatever went wrong, so that a client cannot tell an unknown user from a
    wrong password; ``log_reason`` says what went wrong, for pgmux's logs only, ``kind`` for its metrics
    (client_auth.FAILURE_KINDS).
    """

    __slots__ = ("error", "log_reason", "kind")

    def __init__(self, error: PgError, log_reason: str, kind: str) -> None:
        self.error = error
        self.log_reason = log_reason
        self.kind = kind


class StartTls:
    """Begin TLS: from now on the client's bytes are TLS records, ``initial`` the first of them; feed the
    machine what they decrypt to. ``direct``: the client began with its ClientHello (PostgreSQL 17's
    sslnegotiation=direct), not with an SSLRequest."""

    __slots__ = ("initial", "direct")

    def __init__(self, initial: bytes, direct: bool) -> None:
        self.initial = initial
        self.direct = direct


class ClientLeft:
    """The client sent Terminate before it was authenticated."""

    __slots__ = ()


LoginEvent = Reply | StartTls | CancelRequested | Identified | Authenticated | Refused | AuthFailed | ClientLeft

_NO_ENCRYPTION: Final = Reply(b"N")  # the client continues in plaintext (no TLS here; never GSS)
_TLS_ACCEPTED: Final = Reply(b"S")
_TLS_HANDSHAKE_RECORD: Final = 0x16  # a ClientHello's first byte; a startup packet's is its length's top byte


class _Phase(enum.Enum):
    STARTUP = "startup"  # reading startup packets (SSLRequest, GSSENCRequest, CancelRequest, StartupMessage)
    IDENTIFIED = "identified"  # waiting for authenticate()
    AUTH = "auth"  # reading password / SASL messages
    DONE = "done"  # authenticated, refused, cancelled or left: the caller reads no more through the machine


class LoginMachine:
    """One connection's login, from its first byte to AuthenticationOk (h11's style: the caller does the IO).

    ``feed(data)`` returns the events the bytes complete. After ``Identified`` the caller answers with
    ``authenticate(method, secret)``, which returns the next events, or refuses the login itself.
    After ``Authenticated``, ``Refused``, ``AuthFailed``, ``CancelRequested`` or ``ClientLeft`` the
    machine reads nothing more: the bytes that follow are the session's, or nobody's. ``welcome()``
    builds what ends a successful login.
    """

    __slots__ = ("_phase", "_buffer", "_scanner", "_auth", "_refusal", "_ignored", "user", "_tls_offered",
                 "_tls_required", "encrypted")

    def __init__(self, ignored_parameters: Collection[str], tls_offered: bool = False,
                 tls_required: bool = False) -> None:
        self._phase = _Phase.STARTUP
        self._buffer = bytearray()  # startup bytes not parsed yet, then those read before authenticate()
        self._scanner: FrameScanner | None = None  # made when an exchange begins: a trust login needs none
        self._auth: ClientAuthenticator | None = None
        self._refusal: PgError | None = None
        self._ignored = ignored_parameters  # startup parameters pgmux accepts and drops
        self.user = ""
        self._tls_offered = tls_offered
        self._tls_required = tls_required  # a plaintext StartupMessage is refused
        self.encrypted = False  # TLS began (StartTls): what the machine is fed is decrypted

    def refuse(self, error: PgError) -> None:
        """Refuse any login on this connection with ``error``, once its StartupMessage has come.

        Drivers expect their SSLRequest answered first, and a CancelRequest still gets through.
        """
        self._refusal = error

    def feed(self, data: bytes) -> list[LoginEvent]:
        """The events ``data`` completes (none when it completes nothing)."""
        events: list[LoginEvent] = []
        self._read(data, events)
        return events

    @property
    def pipelined(self) -> bool:
        """Identified, and the client has sent more already: it did not wait to be asked for its password."""
        return self._phase is _Phase.IDENTIFIED and bool(self._buffer)

    def authenticate(self, method: AuthMethod, secret: UserSecret | None, end_point: bytes | None = None,
                     cleartext: CleartextChecks | None = None) -> list[LoginEvent]:
        """Run ``method`` against ``secret`` (None: the user is unknown, the exchange runs and fails).

        ``end_point``: over TLS, the tls-server-end-point data SCRAM channel binding binds to.
        ``cleartext``: ask for the password itself instead, checked with these (not under trust).
        """
        if self._phase is not _Phase.IDENTIFIED:
            raise RuntimeError(f"authenticate() called while the login is {self._phase.value}")
        events: list[LoginEvent] = []
        auth = client_authenticator(method, self.user, secret, end_point, cleartext)
        first = auth.start()
        if first:
            events.append(Reply(first))
        rest = bytes(self._buffer) if self._buffer else b""  # usually nothing came unasked: no bytes() call
        self._buffer.clear()
        if auth.done:
            self._phase = _Phase.DONE
            events.append(Authenticated(rest))
            return events
        self._phase = _Phase.AUTH
        self._auth = auth
        self._scanner = FrameScanner(_CAPTURE_ALL, max_length=_MAX_AUTH_MESSAGE)
        if rest:
            self._read(rest, events)
        return events

    def _read(self, data: bytes, events: list[LoginEvent]) -> None:
        """Read ``data`` in the current phase; a malformed message ends the login with PostgreSQL's error."""
        phase = self._phase
        try:
            if phase is _Phase.STARTUP:
                self._read_startup(data, events)
            elif phase is _Phase.AUTH:
                self._read_auth(data, events)
            elif phase is _Phase.IDENTIFIED:
                self._buffer += data  # read once the caller has answered
        except ProtocolViolation as violation:
            self._phase = _Phase.DONE
            events.append(Refused(errors.protocol_violation(str(violation)), "protocol_error"))
        except PgError as error:
            self._phase = _Phase.DONE
            events.append(Refused(error, None))

    def _read_startup(self, data: bytes, events: list[LoginEvent]) -> None:
        # Parsed from bytes, not from the buffer: each packet usually comes in a read of its own, and over bytes
        # the compiled parse is native. The buffer keeps what is left unread.
        buffer = self._buffer
        if buffer:
            buffer += data
            data = bytes(buffer)
            buffer.clear()
        start = 0
        while True:
            if start < len(data) and data[start] == _TLS_HANDSHAKE_RECORD and not self.encrypted:
                if not self._tls_offered:
                    raise ProtocolViolation("the client began TLS directly, but this listener offers no TLS")
                self._start_tls(data[start:], False, events)
                return
            parsed = startup_packet_at(data, start)
            if parsed is None:
                buffer += data[start:]
                return
            packet, used = parsed
            start += used
            if isinstance(packet, SSLRequest) and self._tls_offered:
                if self.encrypted:
                    raise ProtocolViolation("SSLRequest on a connection that is already encrypted")
                events.append(_TLS_ACCEPTED)
                self._start_tls(data[start:], True, events)  # what follows (a pipelined ClientHello) is TLS
                return
            if isinstance(packet, (SSLRequest, GSSENCRequest)):
                if start < len(data):
                    raise ProtocolViolation("data after SSLRequest/GSSENCRequest before the reply")
                events.append(_NO_ENCRYPTION)
            elif isinstance(packet, CancelRequest):
                self._phase = _Phase.DONE
                events.append(CancelRequested(packet.process_id, packet.secret_key))
                return
            else:
                buffer += data[start:]  # what came behind it (a password sent unasked): read by authenticate()
                self._identify(packet, events)
                return

    def _start_tls(self, initial: bytes, requested: bool, events: list[LoginEvent]) -> None:
        self.encrypted = True
        events.append(StartTls(initial, direct=not requested))

    def _identify(self, startup: StartupMessage, events: list[LoginEvent]) -> None:
        if self._tls_required and not self.encrypted:
            self._phase = _Phase.DONE
            events.append(Refused(errors.tls_required(), "tls_required"))
            return
        if self._refusal is not None:
            raise self._refusal
        user = startup.user
        if not user:
            raise errors.protocol_violation("no PostgreSQL user name specified in startup packet")
        parameters = parse_startup_parameters(startup.parameters, self._ignored)
        if startup.minor > 0 or parameters.unsupported_options:
            # Tell newer clients we speak 3.0 and which _pq_ extensions we ignored; they carry on.
            events.append(Reply(m.negotiate_protocol_version(0, parameters.unsupported_options)))
        self.user = user
        self._phase = _Phase.IDENTIFIED
        events.append(Identified(user, startup.database, startup.minor, parameters))

    def _read_auth(self, data: bytes, events: list[LoginEvent]) -> None:
        scanner, auth = self._scanner, self._auth
        assert scanner is not None and auth is not None
        segments = scanner.feed(data)
        for index, segment in enumerate(segments):
            if not isinstance(segment, Frame):
                continue  # captures everything: only incomplete tails come back raw, and they stay inside
            if segment.kind == m.TERMINATE:
                self._phase = _Phase.DONE
                events.append(ClientLeft())
                return
            if segment.kind != m.PASSWORD:
                raise errors.protocol_violation(f"expected a password message, got {chr(segment.kind)!r}")
            try:
                reply = auth.receive(bytes(segment.data[5:]))
            except AuthenticationFailed as failed:
                self._phase = _Phase.DONE
                events.append(AuthFailed(errors.password_authentication_failed(self.user), failed.reason, failed.kind))
                return
            if reply:
                events.append(Reply(reply))
            if auth.done:
                self._phase = _Phase.DONE
                self._auth = None  # its SCRAM state is a kilobyte or two, needed no more
                # Bytes pipelined behind the last auth message belong to the session.
                rest = [bytes(s.data) if isinstance(s, Frame) else bytes(s) for s in segments[index + 1:]]
                events.append(Authenticated(b"".join(rest) + scanner.release_held(), auth.scram_keys))
                return


def welcome(parameters: Mapping[str, str], process_id: int, secret_key: bytes) -> bytes:
    """What ends a successful login: AuthenticationOk, the parameters, the cancel key, ReadyForQuery.

    The admin console's cancel key is (0, b""): it has no query to cancel.
    """
    return _welcome_head(parameters) + _welcome_tail(process_id, secret_key)


class Welcome:
    """``welcome()`` for the logins into one pool, its head (AuthenticationOk and the ParameterStatus set) built
    once: nearly every login is told the same parameters, the server's defaults with the same few of its own.
    Only the cancel key differs from one welcome to the next."""

    __slots__ = ("_defaults", "_own", "_head", "_defaults_given", "_own_given")

    def __init__(self) -> None:
        self._defaults: dict[str, str] | None = None  # copies of what the head was built from
        self._own: dict[str, str] = {}
        self._head = b""
        # The very mappings last given: the pooler's are replaced, never changed in place (a pool's server_params,
        # a client's shared parameters), so the same objects again need no comparison.
        self._defaults_given: Mapping[str, str] | None = None
        self._own_given: Mapping[str, str] | None = None

    def message(self, defaults: Mapping[str, str], own: Mapping[str, str], process_id: int,
                secret_key: bytes) -> bytes:
        """The welcome with ``defaults`` (the server's parameters) and ``own`` (the client's) over them.

        Callers never change a mapping in place once they have given it here."""
        if own is not self._own_given or defaults is not self._defaults_given:
            if own != self._own or defaults != self._defaults:  # dict equality: C, and mostly identical strings
                parameters = dict(defaults)
                parameters.update(own)
                self._head = _welcome_head(parameters)
                self._defaults, self._own = dict(defaults), dict(own)
            self._defaults_given, self._own_given = defaults, own
        return self._head + _welcome_tail(process_id, secret_key)


def _welcome_head(parameters: Mapping[str, str]) -> bytes:
    return m.authentication_ok() + m.parameter_statuses(parameters)


_BACKEND_KEY_DATA_HEADER: Final = bytes((m.BACKEND_KEY_DATA, 0, 0, 0, 12))
_NO_SECRET: Final = bytes(4)  # the admin console's: it has no query to cancel
_READY: Final = m.ready_for_query()


def _welcome_tail(process_id: int, secret_key: bytes) -> bytes:
    """BackendKeyData (pgmux's keys are 4 bytes, the console's none) and ReadyForQuery(I)."""
    return (_BACKEND_KEY_DATA_HEADER + process_id.to_bytes(4, "big", signed=True) + (secret_key or _NO_SECRET)
            + _READY)
