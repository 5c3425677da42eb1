"""Clients authenticating to pgmux (SCRAM, md5, trust, [users] entries) and pgmux logging in upstream."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import re
import socket
import struct
from collections.abc import Iterator
from contextlib import contextmanager

import asyncpg
import psycopg
import pytest
from scramp import ScramMechanism

from pgusers import APP, APP_DATABASE, MD5, PLAIN
from proxy.auth.secrets import md5_password_hash
from proxy.logs import LOGGER_NAME, setup_logging
from proxy.protocol.startup import build_startup_message

WRONG_PASSWORD = "not-the-password-7f3a"


async def _asyncpg(proxy, user: str, password: str | None, database: str = APP_DATABASE,
                   listener: int = 0) -> asyncpg.Connection:
    return await asyncpg.connect(host=proxy.host, port=proxy.port(listener), user=user, password=password,
                                 database=database, statement_cache_size=0, ssl=False, timeout=10)


def _asyncpg_query(proxy, user: str, password: str | None, sql: str, database: str = APP_DATABASE,
                   listener: int = 0):
    async def run():
        conn = await _asyncpg(proxy, user, password, database, listener)
        try:
            return await conn.fetchval(sql)
        finally:
            await conn.close()

    return asyncio.run(run())


def _asyncpg_error(proxy, user: str, password: str | None, database: str = APP_DATABASE,
                   listener: int = 0) -> asyncpg.PostgresError:
    async def run() -> asyncpg.PostgresError:
        with pytest.raises(asyncpg.PostgresError) as caught:
            conn = await _asyncpg(proxy, user, password, database, listener)
            await conn.close()
        return caught.value

    return asyncio.run(run())


def _psycopg_query(proxy, user: str, password: str | None, sql: str, database: str = APP_DATABASE,
                   listener: int = 0):
    with psycopg.connect(proxy.dsn(user, password, database, listener), connect_timeout=10,
                         sslmode="disable") as conn:
        return conn.execute(sql).fetchone()[0]


def _scram_verifier(password: str, iterations: int = 4096) -> str:
    """A PostgreSQL-format SCRAM-SHA-256 verifier, as pg_authid.rolpassword stores it."""
    salt, stored_key, server_key, iterations = ScramMechanism("SCRAM-SHA-256").make_auth_info(
        password, iteration_count=iterations)
    b64 = lambda raw: base64.b64encode(raw).decode()  # noqa: E731
    return f"SCRAM-SHA-256${iterations}:{b64(salt)}${b64(stored_key)}:{b64(server_key)}"


# ---- SCRAM (the default) --------------------------------------------------------------------------

def test_scram_login_works_for_asyncpg_and_psycopg(pgmux) -> None:
    proxy = pgmux()
    assert _asyncpg_query(proxy, APP.name, APP.password, "SELECT current_user") == APP.name
    assert _psycopg_query(proxy, APP.name, APP.password, "SELECT current_user") == APP.name
    assert proxy.call(lambda p: p.registry.rejections["auth_failed"]) == 0


def test_wrong_password_gets_28p01_is_counted_and_others_are_still_served(pgmux) -> None:
    proxy = pgmux()

    error = _asyncpg_error(proxy, APP.name, WRONG_PASSWORD)
    assert isinstance(error, asyncpg.InvalidPasswordError)
    assert error.sqlstate == "28P01"
    assert f'password authentication failed for user "{APP.name}"' in str(error)

    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        _psycopg_query(proxy, APP.name, WRONG_PASSWORD, "SELECT 1")

    assert proxy.call(lambda p: p.registry.rejections["auth_failed"]) == 2
    # The failed logins left nothing behind: the right password still gets in, through both drivers.
    assert _asyncpg_query(proxy, APP.name, APP.password, "SELECT 41 + 1") == 42
    assert _psycopg_query(proxy, APP.name, APP.password, "SELECT 41 + 1") == 42


@pytest.mark.parametrize("auth_type", ["scram-sha-256", "md5"])
def test_unknown_user_gets_the_same_28p01_text_as_a_wrong_password(pgmux, auth_type) -> None:
    proxy = pgmux(auth_type=auth_type)
    unknown = _asyncpg_error(proxy, "ghost", "whatever")
    wrong = _asyncpg_error(proxy, APP.name, WRONG_PASSWORD)
    assert isinstance(unknown, asyncpg.InvalidPasswordError)
    assert unknown.sqlstate == wrong.sqlstate == "28P01"
    assert str(unknown) == str(wrong).replace(f'"{APP.name}"', '"ghost"')
    assert str(unknown) == 'password authentication failed for user "ghost"'
    assert proxy.call(lambda p: p.registry.rejections["auth_failed"]) == 2


def _first_authentication_request(proxy, database: str) -> bytes:
    """What pgmux answers a StartupMessage with, before any password: the Authentication request's code and payload."""
    with socket.create_connection((proxy.host, proxy.port()), timeout=10) as sock:
        sock.sendall(build_startup_message({"user": APP.name, "database": database}))
        header = sock.recv(5, socket.MSG_WAITALL)
        body = sock.recv(struct.unpack("!I", header[1:])[0] - 4, socket.MSG_WAITALL)
    assert header[:1] == b"R", (header, body)  # an Authentication request, not an ErrorResponse
    return body


@pytest.mark.parametrize("auth_type", ["scram-sha-256", "md5"])
def test_unknown_database_is_refused_like_a_wrong_password_so_names_cannot_be_probed(pgmux, auth_type) -> None:
    """No secret exists for a database pgmux does not serve: the exchange runs against a mock one and fails as a
    wrong password does (28P01, same text), whatever the password; the log and the metrics say why."""
    proxy = pgmux(auth_type=auth_type)
    known, unknown = (_first_authentication_request(proxy, name) for name in (APP_DATABASE, "nosuchdb"))
    assert unknown[:4] == known[:4]  # the same method asked for (md5's salt is random, SCRAM's list is equal)
    wrong_password = _asyncpg_error(proxy, APP.name, WRONG_PASSWORD)
    for password in (WRONG_PASSWORD, APP.password):
        error = _asyncpg_error(proxy, APP.name, password, database="nosuchdb")
        assert type(error) is type(wrong_password) is asyncpg.InvalidPasswordError
        assert (error.sqlstate, str(error)) == (wrong_password.sqlstate, str(wrong_password))
        assert "nosuchdb" not in str(error)
        with pytest.raises(psycopg.OperationalError) as caught:
            _psycopg_query(proxy, APP.name, password, "SELECT 1", database="nosuchdb")
        assert 'password authentication failed for user "app"' in str(caught.value)
        assert "nosuchdb" not in str(caught.value)
    rejections = proxy.call(lambda p: dict(p.registry.rejections))
    assert rejections.get("unknown_database") == 4 and rejections.get("auth_failed") == 1, rejections
    assert _asyncpg_query(proxy, APP.name, APP.password, "SELECT 1") == 1


def test_unknown_database_on_a_trust_listener_gets_3d000_after_authentication(pgmux) -> None:
    proxy = pgmux(auth_type="trust")
    error = _asyncpg_error(proxy, APP.name, None, database="nosuchdb")
    assert isinstance(error, asyncpg.InvalidCatalogNameError)
    assert error.sqlstate == "3D000" and "nosuchdb" in str(error)
    assert proxy.call(lambda p: p.registry.rejections["unknown_database"]) == 1


# ---- md5 and trust listeners --------------------------------------------------------------------

def test_md5_listener_accepts_a_user_known_by_plaintext_password(pgmux) -> None:
    proxy = pgmux(auth_type="md5")
    assert _asyncpg_query(proxy, APP.name, APP.password, "SELECT current_user") == APP.name
    assert _psycopg_query(proxy, APP.name, APP.password, "SELECT current_user") == APP.name
    error = _asyncpg_error(proxy, APP.name, WRONG_PASSWORD)
    assert error.sqlstate == "28P01"
    assert proxy.call(lambda p: p.registry.rejections["auth_failed"]) == 1


def test_md5_listener_accepts_a_users_entry_given_as_md5_hash(pgmux) -> None:
    alice_password = "alice-md5-pw"
    proxy = pgmux(auth_type="md5", users={"alice": {"password": md5_password_hash("alice", alice_password)}})
    # Known only by a hash: pgmux cannot log in upstream as alice, so it uses the database URL's user.
    assert _asyncpg_query(proxy, "alice", alice_password, "SELECT current_user") == APP.name
    assert _psycopg_query(proxy, "alice", alice_password, "SELECT current_user") == APP.name
    assert _asyncpg_error(proxy, "alice", WRONG_PASSWORD).sqlstate == "28P01"


def test_md5_and_scram_listeners_side_by_side_each_use_their_own_method(pgmux) -> None:
    proxy = pgmux(listen=None, listeners=[
        {"address": "127.0.0.1:0", "pool_mode": "transaction", "auth_type": "scram-sha-256"},
        {"address": "127.0.0.1:0", "pool_mode": "session", "auth_type": "md5"},
    ])
    # libpq's require_auth makes the client refuse any other method than the one named.
    for listener, method in ((0, "scram-sha-256"), (1, "md5")):
        dsn = proxy.dsn(APP.name, APP.password, APP_DATABASE, listener)
        with psycopg.connect(dsn, require_auth=method, sslmode="disable", connect_timeout=10) as conn:
            assert conn.execute("SELECT 1").fetchone()[0] == 1


def test_md5_listener_serves_scram_to_a_user_known_only_by_verifier(pgmux) -> None:
    proxy = pgmux(auth_type="md5", users={"carol": {"password": _scram_verifier("carol-pw")}})
    dsn = proxy.dsn("carol", "carol-pw", APP_DATABASE)
    with psycopg.connect(dsn, require_auth="scram-sha-256", sslmode="disable", connect_timeout=10) as conn:
        assert conn.execute("SELECT current_user").fetchone()[0] == APP.name


def test_trust_listener_lets_a_known_user_in_without_a_password(pgmux) -> None:
    proxy = pgmux(auth_type="trust")
    assert _asyncpg_query(proxy, APP.name, None, "SELECT current_user") == APP.name
    with psycopg.connect(proxy.dsn(APP.name, None, APP_DATABASE), require_auth="none", sslmode="disable",
                         connect_timeout=10) as conn:
        assert conn.execute("SELECT current_user").fetchone()[0] == APP.name


# ---- [users.NAME] entries ---------------------------------------------------------------------

def test_users_entry_with_plaintext_password_for_the_upstream_user_works(pgmux) -> None:
    proxy = pgmux(users={APP.name: {"password": APP.password}})
    assert _asyncpg_query(proxy, APP.name, APP.password, "SELECT current_user") == APP.name
    assert _psycopg_query(proxy, APP.name, APP.password, "SELECT current_user") == APP.name
    assert _asyncpg_error(proxy, APP.name, WRONG_PASSWORD).sqlstate == "28P01"


def test_users_entry_with_plaintext_password_logs_in_upstream_as_itself(pgmux) -> None:
    proxy = pgmux(users={PLAIN.name: {"password": PLAIN.password}})
    assert _asyncpg_query(proxy, PLAIN.name, PLAIN.password, "SELECT current_user") == PLAIN.name
    assert _asyncpg_query(proxy, APP.name, APP.password, "SELECT current_user") == APP.name


def test_scram_verifier_entry_authenticates_and_logs_in_upstream_as_the_url_user(pgmux) -> None:
    proxy = pgmux(users={"dave": {"password": _scram_verifier("dave-pw", iterations=4096)}})
    assert _asyncpg_query(proxy, "dave", "dave-pw", "SELECT current_user") == APP.name
    assert _psycopg_query(proxy, "dave", "dave-pw", "SELECT session_user") == APP.name
    error = _asyncpg_error(proxy, "dave", WRONG_PASSWORD)
    assert isinstance(error, asyncpg.InvalidPasswordError)
    # Both logins share the pool of the upstream user: one pool, keyed by the URL's user.
    pools = proxy.call(lambda p: sorted(str(key) for key in p.router.pools))
    assert pools == [f"{APP_DATABASE}/{APP.name}"]


def test_verifier_postgres_itself_stored_authenticates_the_client(pgmux, postgres) -> None:
    verifier = postgres.psql(f"SELECT rolpassword FROM pg_authid WHERE rolname = '{APP.name}'").strip()
    assert verifier.startswith("SCRAM-SHA-256$")
    proxy = pgmux(users={APP.name: {"password": verifier}})
    assert _asyncpg_query(proxy, APP.name, APP.password, "SELECT current_user") == APP.name
    assert _psycopg_query(proxy, APP.name, APP.password, "SELECT current_user") == APP.name
    assert _asyncpg_error(proxy, APP.name, WRONG_PASSWORD).sqlstate == "28P01"


# ---- passwords SASLprep cannot normalise ---------------------------------------------------------

@pytest.fixture
def make_role(postgres):
    """Create a login role with the given password (stored as SCRAM); dropped after the test."""
    created: list[str] = []

    def make(name: str, password: str) -> str:
        literal = "'" + password.replace("'", "''") + "'"
        postgres.psql(f"SET password_encryption = 'scram-sha-256';\n"
                      f'DROP ROLE IF EXISTS "{name}";\nCREATE ROLE "{name}" LOGIN PASSWORD {literal}')
        created.append(name)
        return name

    yield make
    for name in created:
        postgres.psql(f'DROP ROLE IF EXISTS "{name}"')


# PostgreSQL normalises SCRAM passwords with SASLprep, and when SASLprep refuses a password (control
# characters, unassigned code points, invalid UTF-8) both the server and libpq use its raw bytes
# instead (src/common/saslprep.c, "the password is used as is"). Such a role can log in directly.
SASLPREP_PASSWORDS = {
    "normalised": "naïve-ß-密码-Ⅸ",
    "control-char": "tab\there",
}


@pytest.mark.parametrize("password", list(SASLPREP_PASSWORDS.values()), ids=list(SASLPREP_PASSWORDS))
def test_client_scram_accepts_every_password_postgresql_accepts(pgmux, postgres, make_role, password) -> None:
    role = make_role("saslprep_client", password)
    with psycopg.connect(postgres.dsn(role, password, APP_DATABASE), sslmode="disable", connect_timeout=10):
        pass  # PostgreSQL itself accepts this password
    # Users known to pgmux log in upstream as themselves, so the whole path is exercised.
    proxy = pgmux(users={role: {"password": password}})
    assert _psycopg_query(proxy, role, password, "SELECT current_user") == role
    assert _asyncpg_query(proxy, role, password, "SELECT current_user") == role


@pytest.mark.parametrize("password", list(SASLPREP_PASSWORDS.values()), ids=list(SASLPREP_PASSWORDS))
def test_upstream_scram_login_works_with_every_password_postgresql_accepts(pgmux, postgres, make_role,
                                                                          password) -> None:
    role = make_role("saslprep_upstream", password)
    # A trust listener isolates pgmux's own SCRAM login upstream from the client's.
    proxy = pgmux(auth_type="trust", server_login_retry=0,
                  upstream_url=postgres.dsn(role, password, APP_DATABASE, sslmode="disable"))
    assert _psycopg_query(proxy, role, None, "SELECT current_user") == role


# ---- pgmux's own login upstream: md5 and cleartext server auth ----------------------------------

@pytest.mark.parametrize("role", [MD5, PLAIN], ids=["server-md5", "server-cleartext"])
def test_upstream_login_with_server_side_md5_and_cleartext_auth(pgmux, postgres, role) -> None:
    proxy = pgmux(upstream_url=postgres.dsn(role.name, role.password, APP_DATABASE, sslmode="disable"))
    assert _asyncpg_query(proxy, role.name, role.password, "SELECT current_user") == role.name
    assert _psycopg_query(proxy, role.name, role.password, "SELECT 6 * 7") == 42
    # A second client reuses the same backend, logged in once.
    assert _asyncpg_query(proxy, role.name, role.password, "SELECT count(*) FROM generate_series(1, 5)") == 5
    assert proxy.call(lambda p: sum(pool.stats.server_connects for pool in p.router.pools.values())) == 1


def test_upstream_login_failure_reaches_the_client_as_08006_and_is_counted(pgmux, postgres) -> None:
    upstream_secret = "stale-upstream-pw-41d0"
    proxy = pgmux(upstream_url=postgres.dsn(APP.name, upstream_secret, APP_DATABASE, sslmode="disable"),
                  server_login_retry=0)
    error = _asyncpg_error(proxy, APP.name, upstream_secret)
    assert error.sqlstate == "08006"
    assert error.severity == "FATAL"
    # The cause, without the upstream's host, port or user (pgmux's log names them).
    assert error.message == "pgmux could not connect to the upstream server: the server refused the login (SQLSTATE 28P01)"
    assert error.hint
    # A refusal like any other: counted (design §5), and not as an authentication failure of the client.
    rejections = proxy.call(lambda p: dict(p.registry.rejections))
    assert rejections.get("auth_failed", 0) == 0
    assert rejections.get("upstream_unavailable") == 1, rejections


# ---- nothing secret in the logs ------------------------------------------------------------------

@contextmanager
def _captured_pgmux_logs(log_format: str) -> Iterator[tuple[io.StringIO, list[logging.LogRecord]]]:
    """pgmux's own formatted output (setup_logging) at debug level, plus the raw records."""
    logger = logging.getLogger(LOGGER_NAME)
    saved = (logger.handlers[:], logger.level, logger.propagate)
    stream = io.StringIO()
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    try:
        setup_logging(log_format, "debug", stream=stream)
        logger.addHandler(Keep())
        yield stream, records
    finally:
        logger.handlers[:], logger.level, logger.propagate = saved


@pytest.mark.parametrize("log_format", ["plain", "json"])
def test_logs_never_contain_a_password(pgmux, postgres, log_format) -> None:
    upstream_secret = "wrong-upstream-pw-9c1e"
    alice_password = "alice-pw-5d2b"
    alice_hash = md5_password_hash("alice", alice_password)
    with _captured_pgmux_logs(log_format) as (stream, records):
        good = pgmux(users={"alice": {"password": alice_hash}}, auth_type="md5")
        # Wrong password from the client, to pgmux itself.
        assert _asyncpg_error(good, APP.name, WRONG_PASSWORD).sqlstate == "28P01"
        assert _asyncpg_error(good, "alice", WRONG_PASSWORD).sqlstate == "28P01"
        assert _asyncpg_query(good, "alice", alice_password, "SELECT 1") == 1

        # The upstream refuses pgmux: the URL's password is wrong. The client logs in to pgmux with
        # that same password (it is the only one pgmux knows for the user) and learns of the failure.
        bad = pgmux(upstream_url=postgres.dsn(APP.name, upstream_secret, APP_DATABASE, sslmode="disable"),
                    server_login_retry=0)
        error = _asyncpg_error(bad, APP.name, upstream_secret)
        assert error.sqlstate in ("08006", "08001"), error.sqlstate
        text = str(error)
        assert str(postgres.port) not in text and "postgresql://" not in text and f'"{APP.name}"' not in text
        assert "28P01" in text  # PostgreSQL's own text names the user: the client gets its SQLSTATE
        assert upstream_secret not in text
        with pytest.raises(psycopg.OperationalError) as caught:
            _psycopg_query(bad, APP.name, upstream_secret, "SELECT 1")
        assert "28P01" in str(caught.value) and upstream_secret not in str(caught.value)
        assert str(postgres.port) not in str(caught.value)

    output = stream.getvalue()
    assert "authentication failed" in output  # the capture did see the failures
    assert "could not log in" in output or "could not connect" in output
    # Every refusal is one line that names the client connection.
    failures = [line for line in output.splitlines() if "authentication failed for user '" in line]
    assert len(failures) == 2, output
    if log_format == "json":
        entries = [json.loads(line) for line in failures]
        assert all(re.fullmatch(r"c\d+", entry["conn"]) for entry in entries), entries
    else:
        assert all(re.search(r" WARNING c\d+ authentication failed", line) for line in failures), failures
    secrets = [APP.password, WRONG_PASSWORD, upstream_secret, alice_password, alice_hash, alice_hash[3:]]
    for secret in secrets:
        assert secret not in output, f"{secret!r} appears in pgmux's log output"
    # Not only the formatted output: a handler the operator adds gets no password either.
    for record in records:
        message = record.getMessage()
        for secret in secrets:
            assert secret not in message, f"{secret!r} in a raw pgmux log record: {message!r}"
