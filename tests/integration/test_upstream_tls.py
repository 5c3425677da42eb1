"""pgmux → PostgreSQL over TLS: each sslmode against a real ssl=on server, seen from both ends."""

from __future__ import annotations

import asyncio
import socket
import ssl
import struct
from pathlib import Path
from urllib.parse import quote

import asyncpg
import pytest

from pgusers import APP, APP_DATABASE

SSL_REQUEST = struct.pack("!ii", 8, 80877103)


def _tls_url(server, host: str, **query: str) -> str:
    """The superuser's URL for the TLS server, with the host spelled as given (libpq style query)."""
    auth = f"{quote(server.superuser, safe='')}:{quote(server.password, safe='')}"
    params = "&".join(f"{key}={value}" for key, value in query.items())
    return f"postgresql://{auth}@{host}:{server.port}/postgres" + (f"?{params}" if params else "")


def _query(proxy, server, sql: str, database: str = "postgres"):
    async def run():
        conn = await asyncpg.connect(host=proxy.host, port=proxy.port(), user=server.superuser,
                                     password=server.password, database=database, ssl=False,
                                     statement_cache_size=0, timeout=10)
        try:
            return await conn.fetchrow(sql)
        finally:
            await conn.close()

    return asyncio.run(run())


def _login_error(proxy, server, database: str = "postgres") -> asyncpg.PostgresError:
    async def run() -> asyncpg.PostgresError:
        with pytest.raises(asyncpg.PostgresError) as caught:
            conn = await asyncpg.connect(host=proxy.host, port=proxy.port(), user=server.superuser,
                                         password=server.password, database=database, ssl=False, timeout=10)
            await conn.fetchval("SELECT 1")
            await conn.close()
        return caught.value

    return asyncio.run(run())


OWN_SSL = "SELECT s.ssl, s.version, s.cipher FROM pg_stat_ssl s WHERE s.pid = pg_backend_pid()"


def _server_certificate_sans(host: str, port: int, ca_file: Path) -> list[tuple[str, str]]:
    """Ask the server itself (SSLRequest, then a handshake) which names its certificate holds."""
    context = ssl.create_default_context(cafile=str(ca_file))
    context.check_hostname = False
    with socket.create_connection((host, port), timeout=10) as raw:
        raw.sendall(SSL_REQUEST)
        assert raw.recv(1) == b"S"
        with context.wrap_socket(raw) as tls:
            return list(tls.getpeercert()["subjectAltName"])


def test_verify_full_with_localhost_works_and_postgres_sees_tls(pgmux, postgres_tls) -> None:
    proxy = pgmux(upstream_url=_tls_url(postgres_tls, "localhost", sslmode="verify-full",
                                        sslrootcert=postgres_tls.ca_file))
    row = _query(proxy, postgres_tls, OWN_SSL)
    assert row["ssl"] is True
    assert row["version"].startswith("TLSv1.")
    assert row["cipher"]
    # The same, as PostgreSQL sees it from outside: every backend of pgmux's user over TCP uses TLS.
    seen = postgres_tls.psql(
        "SELECT s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) "
        f"WHERE a.usename = '{postgres_tls.superuser}' AND a.client_addr IS NOT NULL")
    assert seen.split() == ["t"]


def test_verify_full_against_127_0_0_1_uses_the_certificates_ip_san(pgmux, postgres_tls) -> None:
    sans = _server_certificate_sans(postgres_tls.host, postgres_tls.port, postgres_tls.ca_file)
    assert ("IP Address", "127.0.0.1") in sans, sans
    assert postgres_tls.host == "127.0.0.1"
    proxy = pgmux(upstream_url=_tls_url(postgres_tls, "127.0.0.1", sslmode="verify-full",
                                        sslrootcert=postgres_tls.ca_file))
    assert _query(proxy, postgres_tls, OWN_SSL)["ssl"] is True


def test_verify_ca_checks_the_chain(pgmux, postgres_tls) -> None:
    proxy = pgmux(upstream_url=_tls_url(postgres_tls, "127.0.0.1", sslmode="verify-ca",
                                        sslrootcert=postgres_tls.ca_file))
    assert _query(proxy, postgres_tls, OWN_SSL)["ssl"] is True


def test_wrong_ca_gets_a_08006_naming_the_certificate_and_pgmux_stays_up(pgmux, postgres_tls) -> None:
    proxy = pgmux(server_login_retry=0, databases={
        "untrusted": {"url": _tls_url(postgres_tls, "localhost", sslmode="verify-full",
                                      sslrootcert=postgres_tls.wrong_ca_file)},
        "postgres": {"url": _tls_url(postgres_tls, "localhost", sslmode="verify-full",
                                     sslrootcert=postgres_tls.ca_file)},
    })
    error = _login_error(proxy, postgres_tls, database="untrusted")
    assert error.sqlstate in ("08006", "08001"), (error.sqlstate, str(error))
    text = str(error).lower()
    assert "certificate" in text or "tls" in text, text
    assert "verify" in text or "certificate" in text, text
    assert postgres_tls.password not in str(error)
    assert str(postgres_tls.port) not in str(error)  # the upstream is named in pgmux's log, not to clients
    # The failure stayed with that database: pgmux still serves the other one, over TLS.
    assert _query(proxy, postgres_tls, OWN_SSL)["ssl"] is True
    error_again = _login_error(proxy, postgres_tls, database="untrusted")
    assert error_again.sqlstate == error.sqlstate


def test_require_encrypts_without_a_ca(pgmux, postgres_tls) -> None:
    proxy = pgmux(upstream_url=_tls_url(postgres_tls, "127.0.0.1", sslmode="require"))
    assert _query(proxy, postgres_tls, OWN_SSL)["ssl"] is True


def test_require_with_a_root_cert_verifies_it_like_libpq(pgmux, postgres_tls) -> None:
    # libpq: "if a root CA file exists, sslmode=require behaves like verify-ca".
    proxy = pgmux(server_login_retry=0, upstream_url=_tls_url(
        postgres_tls, "127.0.0.1", sslmode="require", sslrootcert=postgres_tls.wrong_ca_file))
    error = _login_error(proxy, postgres_tls)
    assert error.sqlstate in ("08006", "08001")
    assert "certificate" in str(error).lower()


def test_prefer_uses_tls_when_the_server_offers_it(pgmux, postgres_tls) -> None:
    proxy = pgmux(upstream_url=_tls_url(postgres_tls, "127.0.0.1", sslmode="prefer"))
    assert _query(proxy, postgres_tls, OWN_SSL)["ssl"] is True


def test_disable_keeps_the_connection_in_plaintext(pgmux, postgres_tls) -> None:
    proxy = pgmux(upstream_url=_tls_url(postgres_tls, "127.0.0.1", sslmode="disable"))
    row = _query(proxy, postgres_tls, OWN_SSL)
    assert row["ssl"] is False


def test_require_against_a_server_without_tls_is_refused(pgmux, postgres) -> None:
    # The `postgres` fixture server (embedded wheel) is built without OpenSSL, so it answers 'N'.
    if postgres.psql("SHOW ssl").strip() == "on":
        pytest.skip("this PostgreSQL has TLS on; the refusal needs one without")
    proxy = pgmux(server_login_retry=0, upstream_url=postgres.dsn(APP.name, APP.password, APP_DATABASE,
                                                                  sslmode="require"))

    async def run() -> asyncpg.PostgresError:
        with pytest.raises(asyncpg.PostgresError) as caught:
            await asyncpg.connect(host=proxy.host, port=proxy.port(), user=APP.name, password=APP.password,
                                  database=APP_DATABASE, ssl=False, timeout=10)
        return caught.value

    error = asyncio.run(run())
    assert error.sqlstate in ("08006", "08001")
    assert "sslmode=require" in str(error)
