"""pgmux verifying an app that connects to it: one small state machine per login attempt (SCRAM, md5, trust)."""

from __future__ import annotations

import base64
import enum
import hashlib
import hmac
import secrets
import struct
from typing import Final, NoReturn

from scramp import ScramException, ScramMechanism
from scramp.core import ScramServer
from scramp.utils import ServerError

from proxy.auth.cleartext import CleartextChecks
from proxy.auth.secrets import (
    SCRAM_SHA_256,
    AuthMethod,
    ScramAuthInfo,
    ScramKeys,
    UserSecret,
    md5_password_hash,
    md5_salted_response,
)
from proxy.protocol import messages

_MD5_SALT_LEN = 4
_MOCK_SALT_LEN = 16
_MOCK_ITERATIONS = 4096
# Mock SCRAM salts are derived from the user name with this per-process key, as PostgreSQL derives
# them from its cluster-wide mock nonce: the same unknown user sees the same salt on every attempt,
# just as a real user does, so a changing salt does not reveal that the user does not exist.
_MOCK_SALT_KEY = secrets.token_bytes(32)
_MAX_SHOWN_MECHANISM = 64  # a hostile client must not fill the logs through the reason text
SCRAM_SHA_256_PLUS = SCRAM_SHA_256 + "-PLUS"
_TLS_SERVER_END_POINT = "tls-server-end-point"

NO_PASSWORD_KNOWN = "no password known for user"
WRONG_PASSWORD = "wrong password"
# What went wrong, by kind (the metric pgmux_auth_failures_total counts them; the client is never told).
WRONG = "wrong_password"
UNKNOWN_USER = "unknown_user"
UNUSABLE_SECRET = "unusable_secret"  # only an md5 hash for SCRAM, or a malformed verifier
MALFORMED = "protocol"
CHANNEL_BINDING = "channel_binding"
FAILURE_KINDS = (WRONG, UNKNOWN_USER, UNUSABLE_SECRET, MALFORMED, CHANNEL_BINDING)


class AuthenticationFailed(Exception):
    """The client did not prove who it is. ``reason`` is for pgmux's logs only, ``kind`` (FAILURE_KINDS) for its
    metrics.

    The client itself must get one and the same error whatever the reason, so that it cannot tell
    an unknown user from a wrong password.
    """

    def __init__(self, user: str, reason: str, kind: str) -> None:
        super().__init__(f"authentication failed for user {user!r}: {reason}")
        self.user = user
        self.reason = reason
        self.kind = kind


class _Stage(enum.Enum):
    NEW = "new"
    AWAITING_PASSWORD = "awaiting PasswordMessage"
    AWAITING_SASL_INITIAL = "awaiting SASLInitialResponse"
    AWAITING_SASL_RESPONSE = "awaiting SASLResponse"
    DONE = "done"
    FAILED = "failed"


# Enum members as C statics when compiled: reading one off its class goes through EnumType.__getattr__ (about
# 800 instructions: a trust login read two).
_TRUST: Final = AuthMethod.TRUST
_MD5: Final = AuthMethod.MD5
_SCRAM: Final = AuthMethod.SCRAM_SHA_256


class ClientAuthenticator:
    """One login attempt: ``start()`` once, then feed each 'p' message body to ``receive()``.

    Neither returns AuthenticationOk: the caller sends it once ``done`` is True.
    """

    def __init__(self, user: str) -> None:
        self.user = user
        self._stage = _Stage.NEW

    @property
    def method(self) -> AuthMethod:
        """The method actually run (md5 configured + SCRAM verifier only => SCRAM)."""
        raise NotImplementedError

    def start(self) -> bytes:
        """The first Authentication request to send (b"" when none is needed)."""
        if self._stage is not _Stage.NEW:
            raise RuntimeError("ClientAuthenticator.start() called twice")
        return self._start()

    def receive(self, body: bytes) -> bytes:
        """Consume the body of the client's 'p' message; return the bytes to send next (may be b"")."""
        expected = self._stage
        if expected not in (_Stage.AWAITING_PASSWORD, _Stage.AWAITING_SASL_INITIAL, _Stage.AWAITING_SASL_RESPONSE):
            self._fail(f"client sent a password message while authentication was {expected.value}")
        return self._receive(expected, bytes(body))

    @property
    def done(self) -> bool:
        """True once the client is authenticated."""
        return self._stage is _Stage.DONE

    @property
    def scram_keys(self) -> ScramKeys | None:
        """After a SCRAM login against a verifier: (ClientKey, ServerKey), with which pgmux can log in to a server
        holding the same verifier as this user, never having known the password (see server_auth)."""
        return None

    def _start(self) -> bytes:
        raise NotImplementedError

    def _receive(self, stage: _Stage, body: bytes) -> bytes:
        raise NotImplementedError

    def _fail(self, reason: str, kind: str = MALFORMED) -> NoReturn:
        # Once failed, every later message is refused too: the caller should already be closing.
        self._stage = _Stage.FAILED
        raise AuthenticationFailed(self.user, reason, kind)

    def _fail_missing(self, missing: tuple[str, str]) -> NoReturn:
        self._fail(*missing)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} user={self.user!r} method={self.method.value} stage={self._stage.value}>"


class _TrustAuthenticator(ClientAuthenticator):
    @property
    def method(self) -> AuthMethod:
        return _TRUST

    def _start(self) -> bytes:
        self._stage = _Stage.DONE
        return b""


class _Md5Authenticator(ClientAuthenticator):
    @property
    def method(self) -> AuthMethod:
        return _MD5

    def __init__(self, user: str, md5_hash: str | None) -> None:
        super().__init__(user)
        # Without a real hash, a random one keeps the work done (and so the timing) the same as for
        # a known user; the attempt then fails once the client has answered.
        self._md5_hash = md5_hash if md5_hash is not None else "md5" + secrets.token_hex(16)
        self._unknown = md5_hash is None
        self._salt = b""

    def _start(self) -> bytes:
        self._salt = secrets.token_bytes(_MD5_SALT_LEN)
        self._stage = _Stage.AWAITING_PASSWORD
        return messages.authentication_md5(self._salt)

    def _receive(self, stage: _Stage, body: bytes) -> bytes:
        answer = messages.parse_password(body)
        expected = md5_salted_response(self._md5_hash, self._salt)
        matches = hmac.compare_digest(answer, expected)
        if self._unknown:
            self._fail(NO_PASSWORD_KNOWN, UNKNOWN_USER)
        if not matches:
            self._fail(WRONG_PASSWORD, WRONG)
        self._stage = _Stage.DONE
        return b""


class _CleartextAuthenticator(ClientAuthenticator):
    """The password itself, checked against whatever secret is known (CleartextChecks): for WebSocket clients,
    whose driver sends it before the server has asked for anything. The connection is already encrypted (wss) or
    runs behind a TLS-terminating proxy, as the HTTP listener's configuration requires off loopback."""

    @property
    def method(self) -> AuthMethod:
        """What the secret is ultimately checked as; never shown to the client."""
        return _SCRAM

    def __init__(self, user: str, secret: UserSecret | None, checks: CleartextChecks) -> None:
        super().__init__(user)
        self._secret = secret
        self._checks = checks
        self._keys: ScramKeys | None = None

    @property
    def scram_keys(self) -> ScramKeys | None:
        return self._keys

    def _start(self) -> bytes:
        self._stage = _Stage.AWAITING_PASSWORD
        return messages.authentication_cleartext()

    def _receive(self, stage: _Stage, body: bytes) -> bytes:
        try:
            password = messages.parse_password(body).decode("utf-8")
        except UnicodeDecodeError:
            self._fail(WRONG_PASSWORD, WRONG)
        if self._secret is None:
            # The work a real user's SCRAM verifier costs, so that the answer's timing does not tell.
            salt, _, _, iterations = _mock_scram_auth_info(self.user)
            hashlib.pbkdf2_hmac("sha256", password.encode("utf-8", "surrogatepass"), salt, iterations)
            self._fail(NO_PASSWORD_KNOWN, UNKNOWN_USER)
        ok, self._keys = self._checks.check(self._secret, self.user, password)
        if not ok:
            self._fail(WRONG_PASSWORD, WRONG)
        self._stage = _Stage.DONE
        return b""


class _ScramAuthenticator(ClientAuthenticator):
    @property
    def method(self) -> AuthMethod:
        return _SCRAM

    def __init__(self, user: str, auth_info: ScramAuthInfo, missing: tuple[str, str] | None = None,
                 end_point: bytes | None = None) -> None:
        super().__init__(user)
        self._missing = missing  # (reason, kind) when auth_info is a mock: no proof can pass
        self._auth_info = auth_info
        # Over TLS, the tls-server-end-point data that SCRAM-SHA-256-PLUS binds the exchange to.
        self._end_point = end_point
        self._server: ScramServer | None = None  # made once the client has chosen its mechanism
        self._bare = ""  # the client-first-message-bare as sent
        self._server_first = ""
        self._client_key: bytes | None = None

    @property
    def scram_keys(self) -> ScramKeys | None:
        if self._client_key is None:
            return None
        return self._client_key, self._auth_info[2]

    def _start(self) -> bytes:
        self._stage = _Stage.AWAITING_SASL_INITIAL
        # As PostgreSQL: -PLUS (channel binding) first, and only over TLS.
        if self._end_point is not None:
            return messages.authentication_sasl([SCRAM_SHA_256_PLUS, SCRAM_SHA_256])
        return messages.authentication_sasl([SCRAM_SHA_256])

    def _receive(self, stage: _Stage, body: bytes) -> bytes:
        if stage is _Stage.AWAITING_SASL_INITIAL:
            return self._receive_client_first(body)
        return self._receive_client_final(body)

    def _receive_client_first(self, body: bytes) -> bytes:
        try:
            mechanism, data = messages.parse_sasl_initial_response(body)
        except (ValueError, struct.error):
            self._fail("malformed SCRAM message: unreadable SASLInitialResponse")
        if mechanism != SCRAM_SHA_256 and (mechanism != SCRAM_SHA_256_PLUS or self._end_point is None):
            self._fail(f"client chose unsupported SASL mechanism {mechanism[:_MAX_SHOWN_MECHANISM]!r}")
        client_first = self._decode(data)
        for_scramp, bare = self._neutralise_username(client_first)
        # Bound to the TLS session whenever there is one: a client saying "y" (it thinks pgmux offers no
        # binding) is then refused, as a downgrade. PostgreSQL ignores the user name inside the SCRAM
        # messages (the startup packet's user is authoritative), so the lookup ignores it too.
        binding = None if self._end_point is None else (_TLS_SERVER_END_POINT, self._end_point)
        auth_info = self._auth_info
        self._server = ScramMechanism(mechanism).make_server(lambda _scram_user: auth_info, channel_binding=binding)
        try:
            self._server.set_client_first(for_scramp)
            # The proof the client sends is computed over the bare message it actually sent, so
            # scramp must sign and verify that one, not the copy with the placeholder user name.
            self._server.client_first_bare = bare
            server_first = self._server.get_server_first()
            self._bare, self._server_first = bare, server_first
        except ScramException as exc:
            self._fail(*_scram_reason(exc))
        self._stage = _Stage.AWAITING_SASL_RESPONSE
        return messages.authentication_sasl_continue(server_first.encode())

    def _receive_client_final(self, body: bytes) -> bytes:
        client_final = self._decode(body)
        assert self._server is not None  # made by the client-first message, which came before
        try:
            self._server.set_client_final(client_final)
        except ScramException as exc:
            if exc.server_error is ServerError.INVALID_PROOF:
                self._fail_missing(self._missing or (WRONG_PASSWORD, WRONG))
            self._fail(*_scram_reason(exc))
        if self._missing is not None:
            # Unreachable in practice (the mock keys are random), but never let a mock exchange pass.
            self._fail_missing(self._missing)
        server_final = self._server.get_server_final()
        self._client_key = self._recovered_client_key(client_final)
        self._stage = _Stage.DONE
        return messages.authentication_sasl_final(server_final.encode())

    def _recovered_client_key(self, client_final: str) -> bytes:
        """The client's ClientKey, from its proof just verified: ClientProof XOR HMAC(StoredKey, AuthMessage)."""
        without_proof, _, proof = client_final.rpartition(",p=")
        auth_message = f"{self._bare},{self._server_first},{without_proof}".encode()
        signature = hmac.new(self._auth_info[1], auth_message, hashlib.sha256).digest()
        return bytes(a ^ b for a, b in zip(base64.b64decode(proof), signature))

    def _decode(self, data: bytes) -> str:
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            self._fail("malformed SCRAM message: not UTF-8")

    def _neutralise_username(self, client_first: str) -> tuple[str, str]:
        """Return (client-first with user name "*", the client-first-message-bare as sent).

        libpq sends an empty user name ("n=,r=..."), which RFC 5802 and so scramp reject; PostgreSQL
        accepts any user name there and ignores it. Replacing it for scramp's parser, while keeping
        the original bare message for the signatures, accepts what PostgreSQL accepts.
        """
        first_comma = client_first.find(",")
        second_comma = client_first.find(",", first_comma + 1) if first_comma >= 0 else -1
        if second_comma < 0:
            self._fail("malformed SCRAM message: client-first-message has no GS2 header")
        gs2_header, bare = client_first[: second_comma + 1], client_first[second_comma + 1 :]
        username_end = bare.find(",")
        if not bare.startswith("n=") or username_end < 0:
            self._fail("malformed SCRAM message: client-first-message has no user name attribute")
        return f"{gs2_header}n=*{bare[username_end:]}", bare


def _scram_reason(exc: ScramException) -> tuple[str, str]:
    if exc.server_error is ServerError.CHANNEL_BINDING_NOT_SUPPORTED:
        return "client requires SCRAM channel binding, which pgmux offers only over client TLS", CHANNEL_BINDING
    if exc.server_error is ServerError.SERVER_DOES_SUPPORT_CHANNEL_BINDING:
        return "client did not use the SCRAM channel binding pgmux offered (a downgrade)", CHANNEL_BINDING
    if exc.server_error is ServerError.CHANNEL_BINDINGS_DONT_MATCH:
        return "SCRAM channel binding does not match this TLS session", CHANNEL_BINDING
    return f"malformed SCRAM message: {exc}", MALFORMED


def _mock_scram_auth_info(user: str) -> ScramAuthInfo:
    salt = hmac.new(_MOCK_SALT_KEY, user.encode("utf-8", "surrogatepass"), hashlib.sha256).digest()[:_MOCK_SALT_LEN]
    # Random keys: no proof can match them, so the exchange runs to the end and then fails.
    return salt, secrets.token_bytes(32), secrets.token_bytes(32), _MOCK_ITERATIONS


def client_authenticator(method: AuthMethod, user: str, secret: UserSecret | None, end_point: bytes | None = None,
                         cleartext: CleartextChecks | None = None) -> ClientAuthenticator:
    """The authenticator for one login of ``user`` under the configured ``method``.

    ``secret`` None means the user is unknown: the full exchange still runs (PostgreSQL's "mock
    authentication") and then fails, so that the flow does not reveal which users exist.
    ``end_point``: over TLS, the tls-server-end-point channel binding data (SCRAM-SHA-256-PLUS is offered).
    ``cleartext``: the client is asked for its password itself, checked with these (unless ``method`` is trust).
    """
    if secret is not None and secret.user != user:
        raise ValueError(f"secret for user {secret.user!r} given to authenticate user {user!r}")
    if method is _TRUST:
        return _TrustAuthenticator(user)
    if cleartext is not None:
        return _CleartextAuthenticator(user, secret, cleartext)
    if method is _MD5:
        if secret is not None and secret.md5_hash is not None:
            return _Md5Authenticator(user, secret.md5_hash)
        if secret is not None and secret.password is not None:
            return _Md5Authenticator(user, md5_password_hash(user, secret.password))
        if secret is None or secret.scram_verifier is None:
            return _Md5Authenticator(user, None)
        # Only a SCRAM verifier is known: like PostgreSQL, md5 in the configuration means "md5 or
        # better", and SCRAM is the only thing a verifier can serve.
    return _scram_authenticator(user, secret, end_point)


def _scram_authenticator(user: str, secret: UserSecret | None, end_point: bytes | None) -> ClientAuthenticator:
    if secret is None or (secret.password is None and secret.scram_verifier is None):
        if secret is not None and secret.md5_hash is not None:
            missing = ("only an md5 hash is known for user, which cannot serve SCRAM", UNUSABLE_SECRET)
        else:
            missing = (NO_PASSWORD_KNOWN, UNKNOWN_USER)
        return _ScramAuthenticator(user, _mock_scram_auth_info(user), missing, end_point)
    try:
        auth_info = secret.scram_auth_info()
    except ValueError as exc:
        return _ScramAuthenticator(user, _mock_scram_auth_info(user), (str(exc), UNUSABLE_SECRET), end_point)
    return _ScramAuthenticator(user, auth_info, None, end_point)
