"""Checking a password that arrived in cleartext (WebSocket and HTTP clients) against what pgmux knows of it.

A SCRAM verifier is checked as PostgreSQL checks a cleartext password against one: PBKDF2 over the password
with the verifier's salt and iteration count, then its StoredKey compared. That costs milliseconds of CPU, so
a successful check is remembered for a short while, keyed by a hash of user, password and verifier (never the
password itself): a burst of requests with the same credentials pays it once.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections import OrderedDict
from typing import Final

from scramp.utils import saslprep

from proxy.auth.secrets import ScramKeys, UserSecret, md5_password_hash

_REMEMBERED: Final = 4096  # successful checks kept at most, the oldest forgotten first
REMEMBER_FOR: Final = 60.0  # seconds


def _password_bytes(password: str) -> bytes:
    """As PostgreSQL and libpq: SASLprep when it applies, else the raw UTF-8 bytes."""
    try:
        return saslprep(password).encode("utf-8")
    except ValueError:
        return password.encode("utf-8")


def scram_keys_for(secret: UserSecret, password: str) -> ScramKeys | None:
    """(ClientKey, ServerKey) of ``password`` under ``secret``'s SCRAM verifier, if it matches the verifier."""
    if secret.scram_verifier is None:
        return None
    salt, stored_key, server_key, iterations = secret.scram_auth_info()
    salted = hashlib.pbkdf2_hmac("sha256", _password_bytes(password), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    if not hmac.compare_digest(hashlib.sha256(client_key).digest(), stored_key):
        return None
    return client_key, server_key


class CleartextChecks:
    """Checks cleartext passwords against secrets, remembering recent successes (see the module's docstring)."""

    def __init__(self) -> None:
        # hash(user, password, secret) -> (until, the SCRAM keys found, or None for a non-SCRAM secret)
        self._remembered: OrderedDict[bytes, tuple[float, ScramKeys | None]] = OrderedDict()

    def check(self, secret: UserSecret | None, user: str, password: str) -> tuple[bool, ScramKeys | None]:
        """Whether ``password`` is ``user``'s, and with a SCRAM verifier the keys that log in upstream as it
        (see server_auth). An unknown user (``secret`` None) never matches."""
        if secret is None or not password:
            return False, None
        key = hashlib.sha256("\x00".join((user, password, secret.password or "", secret.md5_hash or "",
                                          secret.scram_verifier or "")).encode("utf-8", "surrogatepass")).digest()
        now = time.monotonic()
        remembered = self._remembered.get(key)
        if remembered is not None and remembered[0] > now:
            return True, remembered[1]
        keys: ScramKeys | None = None
        if secret.password is not None:
            ok = hmac.compare_digest(secret.password.encode("utf-8", "surrogatepass"),
                                     password.encode("utf-8", "surrogatepass"))
        elif secret.md5_hash is not None:
            ok = hmac.compare_digest(secret.md5_hash, md5_password_hash(user, password))
        else:
            keys = scram_keys_for(secret, password)
            ok = keys is not None
        if ok:
            self._remembered[key] = (now + REMEMBER_FOR, keys)
            self._remembered.move_to_end(key)
            if len(self._remembered) > _REMEMBERED:
                self._remembered.popitem(last=False)
        return ok, keys
