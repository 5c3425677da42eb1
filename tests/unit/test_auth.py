"""Sans-IO tests of proxy.auth: both sides of SCRAM/md5/cleartext driven by passing bytes back and forth."""

from __future__ import annotations

import base64
import hashlib

import pytest
import scramp
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.auth import (
    AuthenticationFailed,
    AuthMethod,
    ClientAuthenticator,
    ServerAuthenticator,
    ServerAuthError,
    UserSecret,
    client_authenticator,
)
from proxy.auth.secrets import md5_password_hash, raw_scram_auth_info
from proxy.protocol import messages

USER = "alice"
PASSWORD = "correct horse battery staple"

# A verifier PostgreSQL 16 itself stored (from a published pg_dumpall of a lab cluster, shipped
# together with its plaintext "teamcityFortitude"): proves the format and the key derivation match.
PG_DUMPED_USER = "teamcity"
PG_DUMPED_PASSWORD = "teamcityFortitude"
PG_DUMPED_VERIFIER = (
    "SCRAM-SHA-256$4096:Bzyc1OTNCUEHnUkl29i8Pg==$FTvvXoTomm8woyWz3zREDTgCc+4KBfPXBXA2bPQH1cw="
    ":UngrizJhljLaDCLVX+h9iejo6llckAEDHqeqEISAtyU="
)


# ---- helpers -----------------------------------------------------------------------------------

def split(message: bytes, kind: int) -> bytes:
    """Check one whole typed message of ``kind`` and return its body (after the 5-byte header)."""
    assert message[0] == kind, f"expected {chr(kind)!r}, got {chr(message[0])!r}"
    (length,) = messages.UINT32.unpack_from(message, 1)
    assert length == len(message) - 1
    return message[5:]


def auth_request(message: bytes) -> tuple[int, bytes]:
    return messages.parse_authentication(split(message, messages.AUTHENTICATION))


def password_body(message: bytes) -> bytes:
    return split(message, messages.PASSWORD)


def make_verifier(password: str, iterations: int = 4096) -> str:
    """PostgreSQL's stored form, built from scramp's (salt, StoredKey, ServerKey, iterations)."""
    salt, stored_key, server_key, iterations = scramp.ScramMechanism("SCRAM-SHA-256").make_auth_info(
        password, iteration_count=iterations
    )
    b64 = lambda b: base64.b64encode(b).decode()  # noqa: E731
    return f"SCRAM-SHA-256${iterations}:{b64(salt)}${b64(stored_key)}:{b64(server_key)}"


def log_in(server_side: ServerAuthenticator, client_side: ClientAuthenticator) -> None:
    """Run one login: pgmux-as-server (ClientAuthenticator) against pgmux-as-client (ServerAuthenticator)."""
    request = client_side.start()
    while request:
        reply = server_side.respond(*auth_request(request))
        if reply is None:
            break
        request = client_side.receive(password_body(reply))
    assert client_side.done
    # The caller sends AuthenticationOk itself once the ClientAuthenticator is done.
    assert server_side.respond(*auth_request(messages.authentication_ok())) is None
    assert server_side.done


def scramp_client_first(client: scramp.ScramClient, username_in_scram: str | None = None) -> bytes:
    """A SASLInitialResponse body from scramp's client; optionally rewrite the SCRAM user name as
    libpq does (it sends "n=,"), keeping the client's own signature input consistent."""
    client_first = client.get_client_first()
    if username_in_scram is not None:
        gs2, bare = client_first[:3], client_first[3:]
        bare = f"n={username_in_scram}" + bare[bare.index(",") :]
        client.client_first_bare = bare
        client_first = gs2 + bare
    return password_body(messages.sasl_initial_response("SCRAM-SHA-256", client_first.encode()))


def run_scram_as_client(
    authenticator: ClientAuthenticator, password: str, username_in_scram: str | None = None
) -> bytes:
    """Drive ``authenticator`` with scramp's reference client up to the client-final; return SASLFinal."""
    code, payload = auth_request(authenticator.start())
    assert code == messages.AUTH_SASL
    assert messages.parse_sasl_mechanisms(payload) == ["SCRAM-SHA-256"]
    client = scramp.ScramClient(["SCRAM-SHA-256"], "ignored", password)
    code, server_first = auth_request(authenticator.receive(scramp_client_first(client, username_in_scram)))
    assert code == messages.AUTH_SASL_CONTINUE
    client.set_server_first(server_first.decode())
    final = authenticator.receive(password_body(messages.sasl_response(client.get_client_final().encode())))
    code, server_final = auth_request(final)
    assert code == messages.AUTH_SASL_FINAL
    client.set_server_final(server_final.decode())  # raises if the signature is wrong
    return final


# ---- SCRAM -------------------------------------------------------------------------------------

def test_scram_exchange_between_pgmux_client_and_server_sides_succeeds() -> None:
    secret = UserSecret.from_config(USER, PASSWORD)
    authenticator = client_authenticator(AuthMethod.SCRAM_SHA_256, USER, secret)
    log_in(ServerAuthenticator(USER, PASSWORD), authenticator)
    assert authenticator.method is AuthMethod.SCRAM_SHA_256


def test_scram_exchange_with_scramp_reference_client_succeeds() -> None:
    authenticator = client_authenticator(AuthMethod.SCRAM_SHA_256, USER, UserSecret(USER, password=PASSWORD))
    run_scram_as_client(authenticator, PASSWORD)
    assert authenticator.done


END_POINT = hashlib.sha256(b"pgmux's certificate").digest()


def _bound_login(mechanisms: list[str], client_end_point: bytes) -> ClientAuthenticator:
    """A login with channel binding offered (``END_POINT``), by a scramp client choosing among ``mechanisms``
    and binding to ``client_end_point``; raises AuthenticationFailed as pgmux refuses it."""
    authenticator = client_authenticator(AuthMethod.SCRAM_SHA_256, USER, UserSecret(USER, password=PASSWORD),
                                         END_POINT)
    code, payload = auth_request(authenticator.start())
    assert messages.parse_sasl_mechanisms(payload) == ["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"]
    client = scramp.ScramClient(mechanisms, USER, PASSWORD,
                                channel_binding=("tls-server-end-point", client_end_point))
    body = messages.sasl_initial_response(client.mechanism_name, client.get_client_first().encode())
    code, server_first = auth_request(authenticator.receive(password_body(body)))
    client.set_server_first(server_first.decode())
    final = authenticator.receive(password_body(messages.sasl_response(client.get_client_final().encode())))
    client.set_server_final(auth_request(final)[1].decode())
    return authenticator


def test_scram_plus_binds_the_exchange_to_the_tls_session() -> None:
    assert _bound_login(["SCRAM-SHA-256-PLUS"], END_POINT).done


def test_scram_plus_with_another_sessions_binding_fails() -> None:
    # A man in the middle holds a TLS session of its own: its end point is another certificate's.
    with pytest.raises(AuthenticationFailed, match="channel binding does not match"):
        _bound_login(["SCRAM-SHA-256-PLUS"], hashlib.sha256(b"the attacker's certificate").digest())


def test_a_client_that_could_bind_but_saw_no_plus_offered_is_refused_as_a_downgrade() -> None:
    # gs2 flag "y": the client supports binding and believes pgmux offered none, so the offer was tampered with.
    with pytest.raises(AuthenticationFailed, match="downgrade"):
        _bound_login(["SCRAM-SHA-256"], END_POINT)


def test_libpq_style_empty_scram_user_name_is_accepted() -> None:
    # libpq sends "n,,n=,r=<nonce>": the user name travels in the startup packet instead.
    authenticator = client_authenticator(AuthMethod.SCRAM_SHA_256, USER, UserSecret(USER, password=PASSWORD))
    run_scram_as_client(authenticator, PASSWORD, username_in_scram="")
    assert authenticator.done


def test_scram_user_name_that_rfc_escaping_rejects_is_ignored_like_postgres_does() -> None:
    authenticator = client_authenticator(AuthMethod.SCRAM_SHA_256, USER, UserSecret(USER, password=PASSWORD))
    run_scram_as_client(authenticator, PASSWORD, username_in_scram="bad=escape")
    assert authenticator.done


def test_wrong_scram_password_is_rejected() -> None:
    authenticator = client_authenticator(AuthMethod.SCRAM_SHA_256, USER, UserSecret(USER, password=PASSWORD))
    with pytest.raises(AuthenticationFailed) as failure:
        log_in(ServerAuthenticator(USER, "not the password"), authenticator)
    assert failure.value.reason == "wrong password"
    assert failure.value.user == USER
    assert not authenticator.done


def test_scram_verifier_from_postgres_format_authenticates() -> None:
    verifier = make_verifier(PASSWORD)
    secret = UserSecret.from_config(USER, verifier)
    assert secret.scram_verifier == verifier and secret.password is None
    log_in(ServerAuthenticator(USER, PASSWORD), client_authenticator(AuthMethod.SCRAM_SHA_256, USER, secret))
    with pytest.raises(AuthenticationFailed, match="wrong password"):
        log_in(ServerAuthenticator(USER, PASSWORD + "x"), client_authenticator(AuthMethod.SCRAM_SHA_256, USER, secret))


def test_verifier_stored_by_postgresql_matches_its_plaintext_and_authenticates() -> None:
    secret = UserSecret.from_config(PG_DUMPED_USER, PG_DUMPED_VERIFIER)
    salt, stored_key, server_key, iterations = secret.scram_auth_info()
    assert (salt, stored_key, server_key, iterations) == scramp.ScramMechanism().make_auth_info(
        PG_DUMPED_PASSWORD, iteration_count=4096, salt=salt
    )
    log_in(
        ServerAuthenticator(PG_DUMPED_USER, PG_DUMPED_PASSWORD),
        client_authenticator(AuthMethod.SCRAM_SHA_256, PG_DUMPED_USER, secret),
    )


def test_scram_auth_info_for_a_plaintext_password_is_computed_once(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = 0
    real = scramp.ScramMechanism.make_auth_info

    def counting(self: scramp.ScramMechanism, *args: object, **kwargs: object) -> tuple[bytes, bytes, bytes, int]:
        nonlocal calls
        calls += 1
        return real(self, *args, **kwargs)

    monkeypatch.setattr(scramp.ScramMechanism, "make_auth_info", counting)
    secret = UserSecret.from_config(USER, PASSWORD)
    for _ in range(5):
        log_in(ServerAuthenticator(USER, PASSWORD), client_authenticator(AuthMethod.SCRAM_SHA_256, USER, secret))
    assert calls == 1
    assert secret.scram_auth_info() is secret.scram_auth_info()


def test_client_choosing_another_sasl_mechanism_is_rejected() -> None:
    for mechanism in ("SCRAM-SHA-256-PLUS", "SCRAM-SHA-1", "PLAIN"):
        authenticator = client_authenticator(AuthMethod.SCRAM_SHA_256, USER, UserSecret(USER, password=PASSWORD))
        authenticator.start()
        body = password_body(messages.sasl_initial_response(mechanism, b"n,,n=,r=abcdef"))
        with pytest.raises(AuthenticationFailed, match=f"unsupported SASL mechanism '{mechanism}'"):
            authenticator.receive(body)


def test_client_requiring_channel_binding_is_rejected() -> None:
    authenticator = client_authenticator(AuthMethod.SCRAM_SHA_256, USER, UserSecret(USER, password=PASSWORD))
    authenticator.start()
    body = password_body(messages.sasl_initial_response("SCRAM-SHA-256", b"p=tls-server-end-point,,n=,r=abcdef"))
    with pytest.raises(AuthenticationFailed, match="channel binding"):
        authenticator.receive(body)


def test_messages_out_of_order_are_rejected() -> None:
    authenticator = client_authenticator(AuthMethod.SCRAM_SHA_256, USER, UserSecret(USER, password=PASSWORD))
    with pytest.raises(AuthenticationFailed, match="while authentication was new"):
        authenticator.receive(b"n,,n=,r=abc")
    done = client_authenticator(AuthMethod.SCRAM_SHA_256, USER, UserSecret(USER, password=PASSWORD))
    run_scram_as_client(done, PASSWORD)
    with pytest.raises(AuthenticationFailed, match="while authentication was done"):
        done.receive(b"c=biws,r=x,p=y")


def test_a_failed_attempt_refuses_every_later_message() -> None:
    authenticator = client_authenticator(AuthMethod.SCRAM_SHA_256, USER, UserSecret(USER, password=PASSWORD))
    authenticator.start()
    with pytest.raises(AuthenticationFailed):
        authenticator.receive(b"\xff")
    with pytest.raises(AuthenticationFailed, match="while authentication was failed"):
        authenticator.receive(b"\xff")


# ---- md5 ---------------------------------------------------------------------------------------

def test_md5_exchange_succeeds_with_plaintext_and_with_stored_hash() -> None:
    for value in (PASSWORD, "md5" + hashlib.md5((PASSWORD + USER).encode()).hexdigest()):
        secret = UserSecret.from_config(USER, value)
        assert auth_request(client_authenticator(AuthMethod.MD5, USER, secret).start())[0] == messages.AUTH_MD5_PASSWORD
        authenticator = client_authenticator(AuthMethod.MD5, USER, secret)
        log_in(ServerAuthenticator(USER, PASSWORD), authenticator)
        assert authenticator.method is AuthMethod.MD5


def test_md5_exchange_with_hash_from_postgres_regression_tests() -> None:
    # PostgreSQL's src/test/regress/sql/password.sql: 'foo' for regress_passwd2, stored as md5.
    secret = UserSecret.from_config("regress_passwd2", "md5dfa155cadd5f4ad57860162f3fab9cdb")
    assert secret.md5_hash is not None
    authenticator = client_authenticator(AuthMethod.MD5, "regress_passwd2", secret)
    log_in(ServerAuthenticator("regress_passwd2", "foo"), authenticator)


def test_md5_salt_is_fresh_for_every_attempt() -> None:
    secret = UserSecret(USER, password=PASSWORD)
    salts = {auth_request(client_authenticator(AuthMethod.MD5, USER, secret).start())[1] for _ in range(8)}
    assert len(salts) == 8 and all(len(salt) == 4 for salt in salts)


def test_wrong_md5_password_is_rejected() -> None:
    authenticator = client_authenticator(AuthMethod.MD5, USER, UserSecret(USER, password=PASSWORD))
    with pytest.raises(AuthenticationFailed) as failure:
        log_in(ServerAuthenticator(USER, "nope"), authenticator)
    assert failure.value.reason == "wrong password"


def test_md5_method_falls_back_to_scram_for_verifier_only_users() -> None:
    secret = UserSecret.from_config(USER, make_verifier(PASSWORD))
    authenticator = client_authenticator(AuthMethod.MD5, USER, secret)
    assert authenticator.method is AuthMethod.SCRAM_SHA_256
    assert auth_request(client_authenticator(AuthMethod.MD5, USER, secret).start())[0] == messages.AUTH_SASL
    log_in(ServerAuthenticator(USER, PASSWORD), authenticator)


# ---- unknown users, missing secrets, trust ------------------------------------------------------

def test_unknown_user_fails_only_after_a_full_exchange() -> None:
    # SCRAM: AuthenticationSASL, then SASLContinue with a salt, and only the client-final fails.
    authenticator = client_authenticator(AuthMethod.SCRAM_SHA_256, "mallory", None)
    with pytest.raises(AuthenticationFailed) as failure:
        run_scram_as_client(authenticator, "guess")
    assert failure.value.reason == "no password known for user"
    assert failure.value.user == "mallory"
    # md5: AuthenticationMD5Password with a salt, and only the answer fails.
    authenticator = client_authenticator(AuthMethod.MD5, "mallory", None)
    code, salt = auth_request(authenticator.start())
    assert code == messages.AUTH_MD5_PASSWORD and len(salt) == 4
    with pytest.raises(AuthenticationFailed, match="no password known for user"):
        authenticator.receive(password_body(ServerAuthenticator("mallory", "guess").respond(code, salt) or b""))


def test_unknown_user_sees_the_same_scram_salt_on_every_attempt() -> None:
    # A real user's salt is stable; a mock one that changed per attempt would give the game away.
    def salt_seen(user: str) -> bytes:
        authenticator = client_authenticator(AuthMethod.SCRAM_SHA_256, user, None)
        authenticator.start()
        client = scramp.ScramClient(["SCRAM-SHA-256"], "x", "guess")
        code, server_first = auth_request(authenticator.receive(scramp_client_first(client, "")))
        return dict(part.split("=", 1) for part in server_first.decode().split(","))["s"].encode()

    assert salt_seen("mallory") == salt_seen("mallory")
    assert salt_seen("mallory") != salt_seen("trudy")


def test_scram_with_only_an_md5_hash_known_fails_after_a_full_exchange() -> None:
    secret = UserSecret.from_config(USER, "md5" + hashlib.md5((PASSWORD + USER).encode()).hexdigest())
    with pytest.raises(AuthenticationFailed, match="only an md5 hash is known"):
        run_scram_as_client(client_authenticator(AuthMethod.SCRAM_SHA_256, USER, secret), PASSWORD)


def test_trust_needs_no_messages() -> None:
    authenticator = client_authenticator(AuthMethod.TRUST, USER, None)
    assert authenticator.start() == b""
    assert authenticator.done
    with pytest.raises(AuthenticationFailed):
        authenticator.receive(b"password\x00")


def test_secret_for_another_user_is_a_caller_bug() -> None:
    with pytest.raises(ValueError, match="secret for user 'bob'"):
        client_authenticator(AuthMethod.MD5, USER, UserSecret("bob", password=PASSWORD))


# ---- UserSecret --------------------------------------------------------------------------------

def test_from_config_classifies_values_like_postgres() -> None:
    md5_hash = "md5" + hashlib.md5(b"pwalice").hexdigest()
    assert UserSecret.from_config(USER, md5_hash).md5_hash == md5_hash
    assert UserSecret.from_config(USER, md5_hash.upper()).password == md5_hash.upper()  # PG: plaintext
    assert UserSecret.from_config(USER, "md5abc").password == "md5abc"
    assert UserSecret.from_config(USER, PG_DUMPED_VERIFIER).scram_verifier == PG_DUMPED_VERIFIER
    assert UserSecret.from_config(USER, "hunter2").password == "hunter2"
    with pytest.raises(ValueError, match="empty"):
        UserSecret.from_config(USER, "")


def test_secret_repr_never_shows_the_password() -> None:
    md5_hash = "md5" + hashlib.md5((PASSWORD + USER).encode()).hexdigest()
    verifier = make_verifier(PASSWORD)
    for secret in (
        UserSecret.from_config(USER, PASSWORD),
        UserSecret.from_config(USER, md5_hash),
        UserSecret.from_config(USER, verifier),
    ):
        if secret.md5_hash is None:
            secret.scram_auth_info()  # the cached keys must not show up either
        for shown in (repr(secret), str(secret), f"{secret}", repr([secret])):
            assert PASSWORD not in shown and md5_hash not in shown and verifier not in shown
            assert verifier.split("$")[2].split(":")[0] not in shown
        assert USER in repr(secret) and "<redacted>" in repr(secret)


@pytest.mark.parametrize(
    ("verifier", "problem"),
    [
        ("SCRAM-SHA-256$4096:c2FsdHNhbHRzYWx0$abc", "malformed"),
        ("SCRAM-SHA-256$4096$a:b", "malformed"),
        ("SCRAM-SHA-256$abc:c2FsdHNhbHRzYWx0$" + "A" * 44 + ":" + "A" * 44, "iteration count 'abc'"),
        ("SCRAM-SHA-256$-1:c2FsdHNhbHRzYWx0$" + "A" * 44 + ":" + "A" * 44, "iteration count '-1'"),
        ("SCRAM-SHA-256$1024:c2FsdHNhbHRzYWx0c2FsdA==$" + "A" * 43 + "=:" + "A" * 43 + "=", "iteration count 1024"),
        ("SCRAM-SHA-256$4096:not*base64$" + "A" * 43 + "=:" + "A" * 43 + "=", "salt is not valid base64"),
        # PostgreSQL's own regression tests store this 10-byte salt; scramp needs 12.
        (
            "SCRAM-SHA-256$4096:VLK4RMaQLCvNtQ==$6YtlR4t69SguDiwFvbVgVZtuz6gpJQQqUMZ7IQJK5yI="
            ":ps75jrHeYU4lXCcXI4O8oIdJ3eO8o2jirjruw9phBTo=",
            "salt is 10 bytes",
        ),
        ("SCRAM-SHA-256$4096:c2FsdHNhbHRzYWx0c2FsdA==$AAAA:" + "A" * 43 + "=", "StoredKey is 3 bytes"),
        ("SCRAM-SHA-256$4096:c2FsdHNhbHRzYWx0c2FsdA==$" + "A" * 43 + "=:%%%%", "ServerKey is not valid base64"),
    ],
)
def test_malformed_verifier_names_the_problem(verifier: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem) as failure:
        UserSecret.from_config(USER, verifier)
    assert USER in str(failure.value)
    assert "c2FsdHNhbHRzYWx0" not in str(failure.value)  # never echoes the salt or keys


def test_password_that_saslprep_forbids_uses_its_raw_bytes_like_postgresql() -> None:
    # PostgreSQL and libpq fall back to the unnormalised bytes when SASLprep refuses a password.
    secret = UserSecret.from_config(USER, "bell\x07")
    salt, stored_key, server_key, iterations = secret.scram_auth_info()
    assert (stored_key, server_key) == raw_scram_auth_info(b"bell\x07", salt, iterations)[1:3]
    log_in(ServerAuthenticator(USER, "bell\x07"), client_authenticator(AuthMethod.SCRAM_SHA_256, USER, secret))
    with pytest.raises(AuthenticationFailed):
        log_in(ServerAuthenticator(USER, "bell\x08"), client_authenticator(AuthMethod.SCRAM_SHA_256, USER, secret))
    log_in(ServerAuthenticator(USER, "bell\x07"), client_authenticator(AuthMethod.MD5, USER, secret))


# ---- ServerAuthenticator -----------------------------------------------------------------------

def test_server_authenticator_answers_cleartext_requests() -> None:
    authenticator = ServerAuthenticator(USER, PASSWORD)
    reply = authenticator.respond(messages.AUTH_CLEARTEXT_PASSWORD, b"")
    assert reply is not None and messages.parse_password(password_body(reply)) == PASSWORD.encode()
    assert authenticator.respond(messages.AUTH_OK, b"") is None and authenticator.done


def test_server_authenticator_needs_nothing_for_trust() -> None:
    authenticator = ServerAuthenticator(USER, None)
    assert authenticator.respond(messages.AUTH_OK, b"") is None
    assert authenticator.done


@pytest.mark.parametrize(
    ("code", "name"), [(2, "KerberosV5"), (6, "SCM"), (7, "GSSAPI"), (9, "SSPI"), (99, "unknown")]
)
def test_server_authenticator_refuses_unknown_method(code: int, name: str) -> None:
    with pytest.raises(ServerAuthError, match=name) as failure:
        ServerAuthenticator(USER, PASSWORD).respond(code, b"")
    assert f"code {code}" in str(failure.value)


@pytest.mark.parametrize(
    ("code", "payload"),
    [
        (messages.AUTH_CLEARTEXT_PASSWORD, b""),
        (messages.AUTH_MD5_PASSWORD, b"salt"),
        (messages.AUTH_SASL, b"SCRAM-SHA-256\x00\x00"),
    ],
)
def test_server_authenticator_without_password_says_none_is_configured(code: int, payload: bytes) -> None:
    expected = f"server asked for a password but none is configured for user '{USER}'"
    with pytest.raises(ServerAuthError, match=expected):
        ServerAuthenticator(USER, None).respond(code, payload)


def test_server_authenticator_refuses_scram_plus_only_offers() -> None:
    with pytest.raises(ServerAuthError, match="only SCRAM-SHA-256-PLUS"):
        ServerAuthenticator(USER, PASSWORD).respond(messages.AUTH_SASL, b"SCRAM-SHA-256-PLUS\x00\x00")


def test_server_authenticator_prefers_plain_scram_when_plus_is_also_offered() -> None:
    offer = b"SCRAM-SHA-256-PLUS\x00SCRAM-SHA-256\x00\x00"
    reply = ServerAuthenticator(USER, PASSWORD).respond(messages.AUTH_SASL, offer)
    assert reply is not None
    mechanism, client_first = messages.parse_sasl_initial_response(password_body(reply))
    assert mechanism == "SCRAM-SHA-256" and client_first.startswith(b"n,,n=*,r=")


def test_server_authenticator_detects_a_server_that_does_not_know_the_password() -> None:
    # An impostor server with a verifier for a different password: pgmux's proof fails there, and
    # a server that answers with a made-up signature anyway must be caught by pgmux.
    impostor = client_authenticator(AuthMethod.SCRAM_SHA_256, USER, UserSecret(USER, password=PASSWORD))
    authenticator = ServerAuthenticator(USER, PASSWORD)
    code, payload = auth_request(impostor.start())
    first = authenticator.respond(code, payload)
    assert first is not None
    code, payload = auth_request(impostor.receive(password_body(first)))
    assert authenticator.respond(code, payload) is not None
    forged = b"v=" + base64.b64encode(b"\x00" * 32)
    with pytest.raises(ServerAuthError, match="server signature doesn't match") as failure:
        authenticator.respond(messages.AUTH_SASL_FINAL, forged)
    assert PASSWORD not in str(failure.value)


def test_server_authenticator_refuses_ok_before_the_scram_exchange_completes() -> None:
    authenticator = ServerAuthenticator(USER, PASSWORD)
    authenticator.respond(messages.AUTH_SASL, b"SCRAM-SHA-256\x00\x00")
    with pytest.raises(ServerAuthError, match="before completing the SCRAM exchange"):
        authenticator.respond(messages.AUTH_OK, b"")


def test_server_authenticator_refuses_requests_out_of_order() -> None:
    with pytest.raises(ServerAuthError, match="out of order"):
        ServerAuthenticator(USER, PASSWORD).respond(messages.AUTH_SASL_CONTINUE, b"r=abc,s=c2FsdA==,i=4096")
    with pytest.raises(ServerAuthError, match="out of order"):
        ServerAuthenticator(USER, PASSWORD).respond(messages.AUTH_SASL_FINAL, b"v=abc")


def test_server_authenticator_errors_never_contain_the_password() -> None:
    secret_password = "s3cr3t-Pa55"
    failures: list[ServerAuthError] = []
    requests = [(7, b""), (messages.AUTH_SASL, b"SCRAM-SHA-256-PLUS\x00\x00"), (messages.AUTH_MD5_PASSWORD, b"xy")]
    for code, payload in requests:
        with pytest.raises(ServerAuthError) as failure:
            ServerAuthenticator(USER, secret_password).respond(code, payload)
        failures.append(failure.value)
    authenticator = ServerAuthenticator(USER, secret_password)
    authenticator.respond(messages.AUTH_SASL, b"SCRAM-SHA-256\x00\x00")
    with pytest.raises(ServerAuthError) as failure:
        authenticator.respond(messages.AUTH_SASL_CONTINUE, b"r=wrong-nonce,s=c2FsdHNhbHRzYWx0,i=4096")
    failures.append(failure.value)
    for error in failures:
        assert secret_password not in str(error) and secret_password not in repr(error)


def test_wrong_password_configured_for_the_server_is_reported_by_the_server() -> None:
    # The server side (here pgmux's own ClientAuthenticator standing in for PostgreSQL) rejects it.
    with pytest.raises(AuthenticationFailed, match="wrong password"):
        authenticator = client_authenticator(AuthMethod.MD5, USER, UserSecret(USER, password=PASSWORD))
        log_in(ServerAuthenticator(USER, "stale"), authenticator)


# ---- fuzzing -----------------------------------------------------------------------------------

def _authenticators() -> list[ClientAuthenticator]:
    secret = UserSecret(USER, password=PASSWORD)
    return [
        client_authenticator(AuthMethod.SCRAM_SHA_256, USER, secret),
        client_authenticator(AuthMethod.SCRAM_SHA_256, "nobody", None),
        client_authenticator(AuthMethod.MD5, USER, secret),
        client_authenticator(AuthMethod.TRUST, USER, None),
    ]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=200), min_size=1, max_size=3))
def test_random_bytes_only_ever_raise_authentication_failed(bodies: list[bytes]) -> None:
    for authenticator in _authenticators():
        authenticator.start()
        for body in bodies:
            try:
                authenticator.receive(body)
            except AuthenticationFailed:
                break


_scram_text = st.text(alphabet=st.sampled_from(list("nyprcsiamv=,*0123456789abcXYZ+/ \x00é")), max_size=80)


@settings(max_examples=300, deadline=None)
@given(gs2=st.sampled_from(["n,,", "y,,", "p=tls-unique,,", "n,a=x,", ""]), first=_scram_text, final=_scram_text)
def test_scram_shaped_garbage_only_ever_raises_authentication_failed(gs2: str, first: str, final: str) -> None:
    for secret in (UserSecret(USER, password=PASSWORD), None):
        authenticator = client_authenticator(AuthMethod.SCRAM_SHA_256, USER, secret)
        authenticator.start()
        try:
            client_first = (gs2 + first).encode()
            authenticator.receive(password_body(messages.sasl_initial_response("SCRAM-SHA-256", client_first)))
            authenticator.receive(password_body(messages.sasl_response(final.encode())))
        except AuthenticationFailed:
            continue
        pytest.fail("garbage authenticated")


@settings(max_examples=200, deadline=None)
@given(final=st.binary(max_size=120))
def test_garbage_client_final_after_a_valid_client_first_only_raises_authentication_failed(final: bytes) -> None:
    authenticator = client_authenticator(AuthMethod.SCRAM_SHA_256, USER, UserSecret(USER, password=PASSWORD))
    authenticator.start()
    authenticator.receive(scramp_client_first(scramp.ScramClient(["SCRAM-SHA-256"], "x", PASSWORD), ""))
    with pytest.raises(AuthenticationFailed):
        authenticator.receive(final)


@settings(max_examples=200, deadline=None)
@given(code=st.integers(min_value=-(2**31), max_value=2**31 - 1), payload=st.binary(max_size=80))
def test_server_authenticator_only_ever_raises_server_auth_error(code: int, payload: bytes) -> None:
    for password in (PASSWORD, None):
        authenticator = ServerAuthenticator(USER, password)
        for step in ((messages.AUTH_SASL, b"SCRAM-SHA-256\x00\x00"), (code, payload)):
            try:
                authenticator.respond(*step)
            except ServerAuthError:
                break


def test_the_client_key_a_scram_login_reveals_logs_in_where_the_same_verifier_is_held() -> None:
    # SCRAM pass-through: pgmux checks a client against a verifier (from auth_query), then logs in to a server
    # holding that verifier as the client, with the ClientKey the client's proof revealed and no password.
    secret = UserSecret.from_config(USER, make_verifier(PASSWORD))
    first = client_authenticator(AuthMethod.SCRAM_SHA_256, USER, secret)
    run_scram_as_client(first, PASSWORD)
    keys = first.scram_keys
    assert keys is not None
    log_in(ServerAuthenticator(USER, None, scram_keys=keys), client_authenticator(AuthMethod.SCRAM_SHA_256, USER, secret))
    # Against another verifier of another password, the keys prove nothing and the server is not believed.
    other = UserSecret.from_config(USER, make_verifier(PASSWORD + "!"))
    with pytest.raises(AuthenticationFailed):
        log_in(ServerAuthenticator(USER, None, scram_keys=keys),
               client_authenticator(AuthMethod.SCRAM_SHA_256, USER, other))



def test_a_cleartext_password_is_checked_against_every_kind_of_secret_and_remembered_by_hash() -> None:
    from proxy.auth.cleartext import CleartextChecks
    checks = CleartextChecks()
    verifier = UserSecret.from_config(USER, make_verifier(PASSWORD))
    for secret in (UserSecret(USER, password=PASSWORD), UserSecret.from_config(USER, md5_password_hash(USER, PASSWORD)),
                   verifier):
        assert checks.check(secret, USER, PASSWORD)[0]
        assert not checks.check(secret, USER, PASSWORD + "x")[0]
    assert not checks.check(None, USER, PASSWORD)[0]  # an unknown user never matches
    ok, keys = checks.check(verifier, USER, PASSWORD)
    assert ok and keys is not None  # the keys log in upstream as the user (SCRAM pass-through)
    log_in(ServerAuthenticator(USER, None, scram_keys=keys), client_authenticator(AuthMethod.SCRAM_SHA_256, USER, verifier))
    assert PASSWORD.encode() not in b"".join(checks._remembered)  # remembered by a hash, never the password
