"""pgmux logging in to PostgreSQL as a client: answers each Authentication request of one server login."""

from __future__ import annotations

import base64
import enum
import hashlib
import hmac
import secrets

from scramp import ScramClient, ScramException

from proxy.auth.secrets import SCRAM_SHA_256, ScramKeys, md5_password_hash, md5_salted_response
from proxy.protocol import messages

_SCRAM_SHA_256_PLUS = SCRAM_SHA_256 + "-PLUS"
_MD5_SALT_LEN = 4
# PostgreSQL ignores the user name inside SCRAM (the startup packet's user counts). libpq sends an
# empty one, which scramp cannot; "*" is what PgJDBC sends for the same reason, and it also spares
# role names from SASLprep.
_SCRAM_PLACEHOLDER_USER = "*"

# Authentication request codes pgmux does not implement, by the names PostgreSQL's docs use.
_UNSUPPORTED_METHODS: dict[int, str] = {
    2: "KerberosV5",
    6: "SCM credentials",
    7: "GSSAPI",
    8: "GSSAPI continuation",
    9: "SSPI",
}


class _RawPassword:
    """What scramp's ScramClient reads its password through (bytes()), holding unnormalised bytes."""

    def __init__(self, raw: bytes) -> None:
        self._raw = raw

    def __bytes__(self) -> bytes:
        return self._raw


class ServerAuthError(Exception):
    """Logging in to PostgreSQL failed on pgmux's side; the message says why and never holds the password."""


class _Stage(enum.Enum):
    NEW = "new"
    PASSWORD_SENT = "password sent"
    AWAITING_SASL_CONTINUE = "awaiting SASLContinue"
    AWAITING_SASL_FINAL = "awaiting SASLFinal"
    SASL_VERIFIED = "SCRAM server signature verified"
    DONE = "authenticated"


class ServerAuthenticator:
    """Answers the server's Authentication requests for one login of ``user``.

    With ``password``, or without it (pass-through of a client's own login, see client_auth): ``scram_keys``
    (the ClientKey the client's SCRAM proof revealed, and the ServerKey of its verifier) answer SCRAM,
    ``md5_hash`` answers md5.
    """

    def __init__(self, user: str, password: str | None, scram_keys: ScramKeys | None = None,
                 md5_hash: str | None = None) -> None:
        self.user = user
        self._password = password
        self._scram_keys = scram_keys
        self._md5_hash = md5_hash
        self._stage = _Stage.NEW
        self._scram: ScramClient | None = None
        self._keyed: _KeyedScram | None = None

    @property
    def done(self) -> bool:
        """True once the server has sent AuthenticationOk."""
        return self._stage is _Stage.DONE

    def respond(self, code: int, payload: bytes) -> bytes | None:
        """Given one Authentication request (code, payload as from messages.parse_authentication),
        return the whole message to send back, or None when nothing is to be sent."""
        if code == messages.AUTH_OK:
            self._ok()
            return None
        if code == messages.AUTH_CLEARTEXT_PASSWORD:
            self._expect(_Stage.NEW, "AuthenticationCleartextPassword")
            password = self._require_password()
            self._stage = _Stage.PASSWORD_SENT
            return messages.password_message(password.encode("utf-8"))
        if code == messages.AUTH_MD5_PASSWORD:
            return self._md5(payload)
        if code == messages.AUTH_SASL:
            return self._sasl_start(payload)
        if code == messages.AUTH_SASL_CONTINUE:
            return self._sasl_continue(payload)
        if code == messages.AUTH_SASL_FINAL:
            self._sasl_final(payload)
            return None
        name = _UNSUPPORTED_METHODS.get(code, "an unknown method")
        raise ServerAuthError(
            f"server requested {name} authentication (code {code}) for user {self.user!r}, "
            "which pgmux does not support"
        )

    def _ok(self) -> None:
        if self._stage in (_Stage.AWAITING_SASL_CONTINUE, _Stage.AWAITING_SASL_FINAL):
            # A server that skips SASLFinal never proved it knows the password: refuse it, as libpq does.
            raise ServerAuthError(
                f"server sent AuthenticationOk before completing the SCRAM exchange for user {self.user!r}"
            )
        self._stage = _Stage.DONE
        return None

    def _md5(self, payload: bytes) -> bytes:
        self._expect(_Stage.NEW, "AuthenticationMD5Password")
        md5_hash = self._md5_hash if self._password is None else None
        if md5_hash is None:
            md5_hash = md5_password_hash(self.user, self._require_password())
        if len(payload) != _MD5_SALT_LEN:
            raise ServerAuthError(f"server sent an md5 salt of {len(payload)} bytes, expected {_MD5_SALT_LEN}")
        self._stage = _Stage.PASSWORD_SENT
        return messages.password_message(md5_salted_response(md5_hash, payload))

    def _sasl_start(self, payload: bytes) -> bytes:
        self._expect(_Stage.NEW, "AuthenticationSASL")
        if self._password is None and self._scram_keys is not None:
            self._keyed = _KeyedScram(*self._scram_keys)
            self._stage = _Stage.AWAITING_SASL_CONTINUE
            return messages.sasl_initial_response(SCRAM_SHA_256, self._keyed.client_first().encode())
        password = self._require_password()
        try:
            mechanisms = messages.parse_sasl_mechanisms(payload)
        except UnicodeDecodeError:
            raise ServerAuthError("server sent an unreadable list of SASL mechanisms") from None
        if SCRAM_SHA_256 not in mechanisms:
            if _SCRAM_SHA_256_PLUS in mechanisms:
                raise ServerAuthError(
                    "server offers only SCRAM-SHA-256-PLUS (channel binding), which pgmux does not support"
                )
            raise ServerAuthError(f"server offers no SASL mechanism pgmux supports: {mechanisms[:8]}")
        # When a TLS server also offers -PLUS, plain SCRAM-SHA-256 (GS2 flag "n") is still accepted
        # unless the server insists on channel binding, which pgmux cannot provide yet.
        try:
            self._scram = ScramClient([SCRAM_SHA_256], _SCRAM_PLACEHOLDER_USER, password)
        except ScramException:
            # SASLprep refuses the password; libpq then sends the raw bytes, and so must we. scramp
            # has no switch for that, so it gets a stand-in password whose bytes are the raw ones.
            self._scram = ScramClient([SCRAM_SHA_256], _SCRAM_PLACEHOLDER_USER, "x")
            self._scram.password = _RawPassword(password.encode("utf-8"))
        client_first = self._scram.get_client_first()
        self._stage = _Stage.AWAITING_SASL_CONTINUE
        return messages.sasl_initial_response(SCRAM_SHA_256, client_first.encode("utf-8"))

    def _sasl_continue(self, payload: bytes) -> bytes:
        self._expect(_Stage.AWAITING_SASL_CONTINUE, "AuthenticationSASLContinue")
        if self._keyed is not None:
            self._stage = _Stage.AWAITING_SASL_FINAL
            return messages.sasl_response(self._keyed.client_final(self._decode(payload)).encode())
        assert self._scram is not None
        try:
            self._scram.set_server_first(self._decode(payload))
            client_final = self._scram.get_client_final()
        except ScramException as exc:
            raise ServerAuthError(f"server sent an unusable SCRAM server-first-message: {exc}") from None
        self._stage = _Stage.AWAITING_SASL_FINAL
        return messages.sasl_response(client_final.encode("utf-8"))

    def _sasl_final(self, payload: bytes) -> None:
        self._expect(_Stage.AWAITING_SASL_FINAL, "AuthenticationSASLFinal")
        if self._keyed is not None:
            self._keyed.verify_server(self._decode(payload), self.user)
            self._stage = _Stage.SASL_VERIFIED
            return
        assert self._scram is not None
        try:
            self._scram.set_server_final(self._decode(payload))
        except ScramException as exc:
            # Mostly "server signature doesn't match": the server does not know the password.
            raise ServerAuthError(f"SCRAM server verification failed for user {self.user!r}: {exc}") from None
        self._stage = _Stage.SASL_VERIFIED

    def _require_password(self) -> str:
        if self._password is None:
            raise ServerAuthError(f"server asked for a password but none is configured for user {self.user!r}")
        return self._password

    def _expect(self, stage: _Stage, request: str) -> None:
        if self._stage is not stage:
            raise ServerAuthError(f"server sent {request} out of order (authentication was {self._stage.value})")

    @staticmethod
    def _decode(payload: bytes) -> str:
        try:
            return payload.decode("utf-8")
        except UnicodeDecodeError:
            raise ServerAuthError("server sent a SCRAM message that is not UTF-8") from None

    def __repr__(self) -> str:
        return f"<ServerAuthenticator user={self.user!r} stage={self._stage.value}>"


class _KeyedScram:
    """The client side of SCRAM-SHA-256 from keys instead of a password (RFC 5802 §3).

    The proof needs only the ClientKey (ClientProof = ClientKey XOR HMAC(H(ClientKey), AuthMessage)), the
    server's signature check only the ServerKey: a client's own SCRAM login to pgmux reveals the first, its
    verifier holds the second. scramp derives both from a password only, hence these few lines. Works only
    where the server's verifier is the one pgmux checked the client against (same salt and iterations).
    """

    def __init__(self, client_key: bytes, server_key: bytes) -> None:
        self._client_key = client_key
        self._server_key = server_key
        self._nonce = base64.b64encode(secrets.token_bytes(18)).decode()
        self._bare = f"n={_SCRAM_PLACEHOLDER_USER},r={self._nonce}"
        self._auth_message = b""

    def client_first(self) -> str:
        return "n,," + self._bare

    def client_final(self, server_first: str) -> str:
        attributes = dict(part.split("=", 1) for part in server_first.split(",") if "=" in part)
        nonce = attributes.get("r", "")
        if not nonce.startswith(self._nonce) or "s" not in attributes or "i" not in attributes:
            raise ServerAuthError("server sent an unusable SCRAM server-first-message")
        without_proof = f"c=biws,r={nonce}"
        self._auth_message = f"{self._bare},{server_first},{without_proof}".encode()
        stored_key = hashlib.sha256(self._client_key).digest()
        signature = hmac.new(stored_key, self._auth_message, hashlib.sha256).digest()
        proof = bytes(a ^ b for a, b in zip(self._client_key, signature))
        return f"{without_proof},p={base64.b64encode(proof).decode()}"

    def verify_server(self, server_final: str, user: str) -> None:
        expected = hmac.new(self._server_key, self._auth_message, hashlib.sha256).digest()
        if not server_final.startswith("v=") or not hmac.compare_digest(
                server_final[2:].encode(), base64.b64encode(expected)):
            raise ServerAuthError(f"SCRAM server verification failed for user {user!r}: the server does not hold "
                                  "the verifier pgmux checked the client against")
