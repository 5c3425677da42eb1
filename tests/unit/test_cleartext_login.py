"""The WebSocket login: a password sent before the server asked (the Neon driver's pipelineConnect) is asked for
in cleartext and checked against whatever secret is known; the query pipelined behind it belongs to the session."""

from __future__ import annotations

from proxy.auth import AuthMethod, UserSecret
from proxy.auth.cleartext import CleartextChecks
from proxy.auth.client_auth import UNKNOWN_USER, WRONG
from proxy.auth.secrets import md5_password_hash
from proxy.login import AuthFailed, Authenticated, Identified, LoginMachine, Reply
from proxy.protocol import messages as m
from proxy.protocol.startup import build_startup_message
from test_auth import make_verifier

USER = "alice"
PASSWORD = "correct horse"
STARTUP = build_startup_message({"user": USER, "database": "shop"})
QUERY = m.query("SELECT 1")


def _password(password: str) -> bytes:
    return m.message(m.PASSWORD, password.encode() + b"\x00")


def _pipelined_login(secret: UserSecret | None, password: str) -> tuple[LoginMachine, list]:
    machine = LoginMachine([])
    events = machine.feed(STARTUP + _password(password) + QUERY)
    assert isinstance(events[-1], Identified)
    assert machine.pipelined
    return machine, machine.authenticate(AuthMethod.SCRAM_SHA_256, secret, None, CleartextChecks())


def test_a_pipelined_cleartext_password_logs_in_against_plaintext_md5_and_scram_secrets() -> None:
    secrets = [UserSecret(USER, password=PASSWORD), UserSecret(USER, md5_hash=md5_password_hash(USER, PASSWORD)),
               UserSecret(USER, scram_verifier=make_verifier(PASSWORD))]
    for secret in secrets:
        _, events = _pipelined_login(secret, PASSWORD)
        assert isinstance(events[0], Reply) and events[0].data == m.authentication_cleartext()
        assert isinstance(events[1], Authenticated)
        assert events[1].leftover == QUERY
        # With a SCRAM verifier, the keys that log in upstream as the user (SCRAM pass-through).
        assert (events[1].scram_keys is not None) == (secret.scram_verifier is not None)


def test_a_wrong_password_and_an_unknown_user_fail_alike_and_are_counted_apart() -> None:
    _, wrong = _pipelined_login(UserSecret(USER, scram_verifier=make_verifier(PASSWORD)), "nope")
    _, unknown = _pipelined_login(None, PASSWORD)
    assert isinstance(wrong[-1], AuthFailed) and isinstance(unknown[-1], AuthFailed)
    assert wrong[-1].error.to_bytes() == unknown[-1].error.to_bytes()
    assert (wrong[-1].kind, unknown[-1].kind) == (WRONG, UNKNOWN_USER)


def test_a_client_that_waits_after_its_startup_message_is_not_pipelined() -> None:
    machine = LoginMachine([])
    assert isinstance(machine.feed(STARTUP)[-1], Identified)
    assert not machine.pipelined
