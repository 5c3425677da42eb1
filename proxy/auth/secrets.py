"""What pgmux knows about one user's password: plaintext, an md5 hash or a PostgreSQL SCRAM verifier."""

from __future__ import annotations

import base64
import binascii
import enum
import functools
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass, field

from scramp import ScramException, ScramMechanism

SCRAM_SHA_256 = "SCRAM-SHA-256"
_VERIFIER_PREFIX = SCRAM_SHA_256 + "$"
# PostgreSQL's own test (get_password_type): "md5" + exactly 32 lowercase hex digits; anything
# else, including upper-case hex, is a plaintext password to PostgreSQL and so to pgmux.
_MD5_HASH = re.compile(r"md5[0-9a-f]{32}")
_DIGITS = re.compile(r"[0-9]+")
_SCRAM_KEY_LEN = 32  # SHA-256 digest size: StoredKey and ServerKey are exactly this long
# PostgreSQL generates 16-byte salts (SCRAM_DEFAULT_SALT_LEN); do the same for plaintext passwords.
_SALT_LEN = 16
# scramp refuses to serve salts shorter than this and iteration counts outside this range, so a
# verifier outside them is rejected when the configuration is read, not at the first login.
_SCRAMP_MIN_SALT_LEN = 12
_SCRAMP_MIN_ITERATIONS = 4096
_SCRAMP_MAX_ITERATIONS = 10_000_000

ScramAuthInfo = tuple[bytes, bytes, bytes, int]
"""(salt, StoredKey, ServerKey, iterations): what a SCRAM server needs, in scramp's order."""
ScramKeys = tuple[bytes, bytes]
"""(ClientKey, ServerKey): what logging in with SCRAM takes without the password (see server_auth._KeyedScram)."""


class AuthMethod(str, enum.Enum):
    """How pgmux authenticates clients (the pg_hba.conf method names)."""

    SCRAM_SHA_256 = "scram-sha-256"
    MD5 = "md5"
    TRUST = "trust"


@dataclass(frozen=True)
class UserSecret:
    """One user's password in whichever forms are known. Never shows them in repr."""

    user: str
    password: str | None = field(default=None, repr=False)
    md5_hash: str | None = field(default=None, repr=False)
    scram_verifier: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.md5_hash is not None and not _MD5_HASH.fullmatch(self.md5_hash):
            raise ValueError(f"md5 hash for user {self.user!r} must be 'md5' followed by 32 lower-case hex digits")
        if self.scram_verifier is not None:
            # Parse now so a bad verifier fails when the configuration is loaded; the result is cached.
            self.scram_auth_info()

    @classmethod
    def from_config(cls, user: str, value: str) -> UserSecret:
        """Classify a configured password the way PostgreSQL classifies pg_authid.rolpassword."""
        if value == "":
            # PostgreSQL refuses to authenticate against an empty password; so does pgmux, loudly.
            raise ValueError(f"password for user {user!r} is empty")
        if value.startswith(_VERIFIER_PREFIX):
            return cls(user, scram_verifier=value)
        if _MD5_HASH.fullmatch(value):
            return cls(user, md5_hash=value)
        return cls(user, password=value)

    def scram_auth_info(self) -> ScramAuthInfo:
        """(salt, StoredKey, ServerKey, iterations) for serving SCRAM; raises ValueError if none can be had.

        From a plaintext password the PBKDF2 derivation (milliseconds of CPU) runs once per
        UserSecret, with one random salt, so a storm of logins does not pay it per login.
        """
        return self._scram_info

    # cached_property writes straight into the instance __dict__, so it works on a frozen
    # dataclass without object.__setattr__; the cache is not a field, so eq/hash ignore it.
    @functools.cached_property
    def _scram_info(self) -> ScramAuthInfo:
        if self.scram_verifier is not None:
            return _parse_verifier(self.user, self.scram_verifier)
        if self.password is not None:
            salt = secrets.token_bytes(_SALT_LEN)
            try:
                return ScramMechanism(SCRAM_SHA_256).make_auth_info(self.password, salt=salt)
            except ScramException:
                # SASLprep refuses it (e.g. control characters); PostgreSQL and libpq then use the
                # raw UTF-8 bytes, so the keys must come from those for the same logins to work.
                return raw_scram_auth_info(self.password.encode("utf-8"), salt, _SCRAMP_MIN_ITERATIONS)
        raise ValueError(f"no plaintext password or SCRAM verifier known for user {self.user!r}")

    def __repr__(self) -> str:
        def shown(value: str | None) -> str:
            return "None" if value is None else "'<redacted>'"

        return (
            f"UserSecret(user={self.user!r}, password={shown(self.password)}, "
            f"md5_hash={shown(self.md5_hash)}, scram_verifier={shown(self.scram_verifier)})"
        )

    __str__ = __repr__


def _parse_verifier(user: str, verifier: str) -> ScramAuthInfo:
    """Parse PostgreSQL's "SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>" (base64 parts).

    Error messages name the faulty part but never echo salts or keys.
    """
    where = f"SCRAM verifier for user {user!r}"
    shape = "expected 'SCRAM-SHA-256$<iterations>:<base64 salt>$<base64 StoredKey>:<base64 ServerKey>'"
    parts = verifier.split("$")
    if len(parts) != 3 or parts[0] != SCRAM_SHA_256:
        raise ValueError(f"{where} is malformed: {shape}")
    iterations_salt = parts[1].split(":")
    keys = parts[2].split(":")
    if len(iterations_salt) != 2 or len(keys) != 2:
        raise ValueError(f"{where} is malformed: {shape}")
    iterations_text, salt_text = iterations_salt
    if not _DIGITS.fullmatch(iterations_text):
        raise ValueError(f"{where}: iteration count {iterations_text[:20]!r} is not a positive integer")
    iterations = int(iterations_text)
    if not _SCRAMP_MIN_ITERATIONS <= iterations <= _SCRAMP_MAX_ITERATIONS:
        raise ValueError(
            f"{where}: iteration count {iterations} is outside the range pgmux supports "
            f"({_SCRAMP_MIN_ITERATIONS}..{_SCRAMP_MAX_ITERATIONS})"
        )
    salt = _b64(where, "salt", salt_text)
    if len(salt) < _SCRAMP_MIN_SALT_LEN:
        raise ValueError(
            f"{where}: salt is {len(salt)} bytes; pgmux needs at least {_SCRAMP_MIN_SALT_LEN} "
            f"(reset the password on a current PostgreSQL to get a 16-byte salt)"
        )
    stored_key = _b64(where, "StoredKey", keys[0])
    server_key = _b64(where, "ServerKey", keys[1])
    for name, key in (("StoredKey", stored_key), ("ServerKey", server_key)):
        if len(key) != _SCRAM_KEY_LEN:
            raise ValueError(f"{where}: {name} is {len(key)} bytes, SCRAM-SHA-256 needs {_SCRAM_KEY_LEN}")
    return salt, stored_key, server_key, iterations


def _b64(where: str, name: str, text: str) -> bytes:
    try:
        decoded = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"{where}: {name} is not valid base64") from None
    if not decoded:
        raise ValueError(f"{where}: {name} is empty")
    return decoded


def raw_scram_auth_info(password: bytes, salt: bytes, iterations: int) -> ScramAuthInfo:
    """RFC 5802 keys from password bytes as they are, for passwords SASLprep cannot normalise."""
    salted = hashlib.pbkdf2_hmac("sha256", password, salt, iterations)
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    server_key = hmac.new(salted, b"Server Key", hashlib.sha256).digest()
    return salt, hashlib.sha256(client_key).digest(), server_key, iterations


def md5_salted_response(md5_hash: str, salt: bytes) -> bytes:
    """What a client must send for AuthenticationMD5Password: "md5" + md5(hex of md5(password+user) + salt)."""
    return b"md5" + hashlib.md5(md5_hash[3:].encode("ascii") + salt).hexdigest().encode("ascii")


def md5_password_hash(user: str, password: str) -> str:
    """PostgreSQL's stored md5 form: "md5" + hex(md5(password + user))."""
    return "md5" + hashlib.md5((password + user).encode("utf-8")).hexdigest()
