"""Clients → pgmux over TLS: SSLRequest and PostgreSQL 17 direct TLS, verified by real drivers, with
client certificates, plaintext refused under require, and certificates reloaded for new connections."""

from __future__ import annotations

import asyncio
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import threading
from pathlib import Path

import asyncpg
import psycopg
import pytest
import trustme

from pgusers import APP, APP_DATABASE
from test_metrics import scrape, value

SSL_REQUEST = struct.pack("!ii", 8, 80877103)


class Certificates:
    """A CA, pgmux's certificate for 127.0.0.1 and localhost, and client certificates, as files."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.ca = trustme.CA()
        self.ca_file = self._write("ca.pem", self.ca.cert_pem.bytes())
        self.cert_file, self.key_file = self.server("server", "127.0.0.1", "localhost")

    def _write(self, name: str, data: bytes) -> str:
        path = self.directory / name
        path.write_bytes(data)
        path.chmod(0o600)
        return str(path)

    def server(self, name: str, *hosts: str, ca: trustme.CA | None = None) -> tuple[str, str]:
        issued = (ca or self.ca).issue_cert(*hosts)
        return (self._write(f"{name}.crt", b"".join(blob.bytes() for blob in issued.cert_chain_pems)),
                self._write(f"{name}.key", issued.private_key_pem.bytes()))

    def client(self, common_name: str, ca: trustme.CA | None = None) -> tuple[str, str]:
        issued = (ca or self.ca).issue_cert(common_name=common_name)
        return (self._write(f"client-{common_name}.crt", issued.cert_chain_pems[0].bytes()),
                self._write(f"client-{common_name}.key", issued.private_key_pem.bytes()))


@pytest.fixture
def certificates(tmp_path: Path) -> Certificates:
    return Certificates(tmp_path)


def _tls_pgmux(pgmux, certificates: Certificates, sslmode: str = "require", **settings):
    return pgmux(client_tls_sslmode=sslmode, client_tls_cert_file=certificates.cert_file,
                 client_tls_key_file=certificates.key_file, metrics_listen="127.0.0.1:0", **settings)


def _connect(proxy, **params) -> psycopg.Connection:
    params.setdefault("dbname", APP_DATABASE)
    return psycopg.connect(host=proxy.host, port=proxy.port(), user=APP.name, password=APP.password,
                           autocommit=True, connect_timeout=10, **params)


def test_psycopg_verify_full_connects_over_tls(pgmux, certificates) -> None:
    proxy = _tls_pgmux(pgmux, certificates)
    with _connect(proxy, sslmode="verify-full", sslrootcert=certificates.ca_file) as conn:
        assert conn.pgconn.ssl_in_use
        assert conn.execute("SELECT 1").fetchone() == (1,)
    assert value(scrape(proxy), "pgmux_tls_handshake_failures_total", reason="handshake") == 0


@pytest.mark.skipif(psycopg.pq.version() < 170000, reason="libpq before 17 has no sslnegotiation=direct")
def test_direct_tls_of_postgresql_17_connects_without_an_sslrequest(pgmux, certificates) -> None:
    proxy = _tls_pgmux(pgmux, certificates)
    with _connect(proxy, sslmode="verify-full", sslrootcert=certificates.ca_file, sslnegotiation="direct") as conn:
        assert conn.pgconn.ssl_in_use
        assert conn.execute("SELECT current_user").fetchone() == (APP.name,)


def test_direct_tls_without_alpn_postgresql_is_refused(pgmux, certificates) -> None:
    proxy = _tls_pgmux(pgmux, certificates)
    context = ssl.create_default_context(cafile=certificates.ca_file)
    context.set_alpn_protocols(["http/1.1"])
    with socket.create_connection((proxy.host, proxy.port()), timeout=10) as raw:
        with pytest.raises((ssl.SSLError, ConnectionError)):
            with context.wrap_socket(raw, server_hostname="localhost") as tls:
                tls.sendall(b"\x00\x00\x00\x08\x04\xd2\x16\x2f")
                assert tls.recv(1) == b""  # closed without a word
                raise ConnectionError("closed")
    assert value(scrape(proxy), "pgmux_tls_handshake_failures_total", reason="alpn") == 1


def test_asyncpg_with_a_verifying_context(pgmux, certificates) -> None:
    proxy = _tls_pgmux(pgmux, certificates)
    context = ssl.create_default_context(cafile=certificates.ca_file)

    async def run() -> tuple[int, list[bool]]:
        conn = await asyncpg.connect(host="localhost", port=proxy.port(), user=APP.name, password=APP.password,
                                     database=APP_DATABASE, ssl=context, timeout=10)
        try:
            return (await conn.fetchval("SELECT 41 + 1"),
                    proxy.call(lambda p: [client.tls is not None for client in p.registry.clients]))
        finally:
            await conn.close()

    assert asyncio.run(run()) == (42, [True])


def test_plaintext_login_is_refused_under_require_with_ssl_required(pgmux, certificates) -> None:
    proxy = _tls_pgmux(pgmux, certificates)
    with pytest.raises(psycopg.OperationalError) as refused:
        _connect(proxy, sslmode="disable")
    assert "SSL required" in str(refused.value)
    assert value(scrape(proxy), "pgmux_client_rejections_total", reason="tls_required") == 1
    # Under prefer the same client is welcome in plaintext, and TLS is still offered.
    preferring = _tls_pgmux(pgmux, certificates, sslmode="prefer")
    with _connect(preferring, sslmode="disable") as conn:
        assert not conn.pgconn.ssl_in_use
    with _connect(preferring, sslmode="require") as conn:
        assert conn.pgconn.ssl_in_use


def test_disabled_tls_answers_n_and_require_clients_fail_cleanly(pgmux) -> None:
    proxy = pgmux()
    with socket.create_connection((proxy.host, proxy.port()), timeout=10) as raw:
        raw.sendall(SSL_REQUEST)
        assert raw.recv(1) == b"N"
    with pytest.raises(psycopg.OperationalError):
        _connect(proxy, sslmode="require")


def test_cancel_request_works_for_a_tls_client(pgmux, certificates) -> None:
    # psycopg's cancel_safe() sends the CancelRequest the way libpq 17+ does: over TLS when the session is.
    proxy = _tls_pgmux(pgmux, certificates)
    with _connect(proxy, sslmode="require") as conn:
        timer = threading.Timer(0.5, conn.cancel_safe)
        timer.start()
        try:
            with pytest.raises(psycopg.errors.QueryCanceled):
                conn.execute("SELECT pg_sleep(10)")
        finally:
            timer.cancel()
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_client_certificates_under_verify_full_must_name_the_user(pgmux, certificates) -> None:
    proxy = _tls_pgmux(pgmux, certificates, sslmode="verify-full", client_tls_ca_file=certificates.ca_file)
    cert, key = certificates.client(APP.name)
    with _connect(proxy, sslmode="verify-full", sslrootcert=certificates.ca_file, sslcert=cert, sslkey=key) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    other_cert, other_key = certificates.client("somebody_else")
    with pytest.raises(psycopg.OperationalError) as mismatch:
        _connect(proxy, sslmode="verify-full", sslrootcert=certificates.ca_file, sslcert=other_cert,
                 sslkey=other_key)
    assert 'certificate authentication failed for user "app"' in str(mismatch.value)
    foreign_cert, foreign_key = certificates.client(APP.name, ca=trustme.CA())
    with pytest.raises(psycopg.OperationalError):
        _connect(proxy, sslmode="verify-full", sslrootcert=certificates.ca_file, sslcert=foreign_cert,
                 sslkey=foreign_key)
    with pytest.raises(psycopg.OperationalError):
        _connect(proxy, sslmode="verify-full", sslrootcert=certificates.ca_file)  # no certificate at all
    assert value(scrape(proxy), "pgmux_tls_handshake_failures_total", reason="client_certificate") >= 1


def test_show_clients_and_metrics_show_tls(pgmux, certificates) -> None:
    proxy = _tls_pgmux(pgmux, certificates, sslmode="prefer", admin_users=[APP.name])
    with _connect(proxy, sslmode="require") as tls_client, _connect(proxy, sslmode="disable") as plain:
        tls_client.execute("SELECT 1")
        plain.execute("SELECT 1")
        with _connect(proxy, sslmode="disable", dbname="pgmux") as console:
            clients = console.execute("SHOW CLIENTS")
            names = [column.name for column in clients.description]
            shown = sorted(row[names.index("tls")] for row in clients.fetchall())
        assert shown[0] == "" and shown[1] == ""  # the console and the plaintext client
        assert shown[2].startswith("TLSv1.")
        assert value(scrape(proxy), "pgmux_clients_tls") == 1


def test_psql_verify_full(pgmux, certificates) -> None:
    psql = shutil.which("psql")
    if psql is None:
        pytest.skip("no psql on this machine")
    proxy = _tls_pgmux(pgmux, certificates)
    url = (f"postgresql://{APP.name}@localhost:{proxy.port()}/{APP_DATABASE}"
           f"?sslmode=verify-full&sslrootcert={certificates.ca_file}")
    out = subprocess.run([psql, url, "-Atc", "SELECT ssl FROM (SELECT true AS ssl) s"], capture_output=True,
                         text=True, timeout=30, env={"PGPASSWORD": APP.password, "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "t"


def test_reload_swaps_the_certificate_for_new_connections_only(pgmux, certificates) -> None:
    proxy = _tls_pgmux(pgmux, certificates)
    new_ca = trustme.CA()
    new_cert, new_key = certificates.server("rotated", "127.0.0.1", "localhost", ca=new_ca)
    new_ca_file = certificates._write("new-ca.pem", new_ca.cert_pem.bytes())
    with _connect(proxy, sslmode="verify-full", sslrootcert=certificates.ca_file) as staying:
        settings = proxy.call(lambda p: p.settings)
        bad = settings.model_copy(update={"client_tls_cert_file": str(certificates.directory / "missing.crt")})
        proxy.call(lambda p: p.reload(bad))  # refused: the old certificate stays
        with _connect(proxy, sslmode="verify-full", sslrootcert=certificates.ca_file) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        rotated = settings.model_copy(update={"client_tls_cert_file": new_cert, "client_tls_key_file": new_key})
        proxy.call(lambda p: p.reload(rotated))
        with _connect(proxy, sslmode="verify-full", sslrootcert=new_ca_file) as conn:
            assert conn.execute("SELECT 2").fetchone() == (2,)
        with pytest.raises(psycopg.OperationalError):
            _connect(proxy, sslmode="verify-full", sslrootcert=certificates.ca_file)
        assert staying.execute("SELECT 3").fetchone() == (3,)  # the established client keeps its TLS


def test_scram_channel_binding_is_offered_over_tls_and_required_by_libpq(pgmux, certificates) -> None:
    proxy = _tls_pgmux(pgmux, certificates)
    with _connect(proxy, sslmode="verify-full", sslrootcert=certificates.ca_file, channel_binding="require") as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    # Without TLS there is nothing to bind to: libpq's channel_binding=require then refuses to go on.
    plain = pgmux()
    with pytest.raises(psycopg.OperationalError) as refused:
        _connect(plain, sslmode="disable", channel_binding="require")
    assert "channel binding" in str(refused.value)


def test_asyncpg_without_channel_binding_still_logs_in_over_tls(pgmux, certificates) -> None:
    # asyncpg picks SCRAM-SHA-256 (it does no channel binding) and says "n": allowed, as PostgreSQL allows it.
    proxy = _tls_pgmux(pgmux, certificates)
    context = ssl.create_default_context(cafile=certificates.ca_file)

    async def run() -> int:
        conn = await asyncpg.connect(host="localhost", port=proxy.port(), user=APP.name, password=APP.password,
                                     database=APP_DATABASE, ssl=context, timeout=10)
        try:
            return await conn.fetchval("SELECT 7")
        finally:
            await conn.close()

    assert asyncio.run(run()) == 7


def test_the_tls_host_name_selects_the_database_so_one_listener_serves_many(pgmux, postgres, certificates) -> None:
    cert, key = certificates.server("tenants", "tenant1.pgmux.test", "tenant2.pgmux.test", "127.0.0.1")
    def url(database: str) -> str:
        return postgres.dsn(APP.name, APP.password, database, sslmode="disable")
    proxy = pgmux(client_tls_sslmode="require", client_tls_cert_file=cert, client_tls_key_file=key,
                  databases={"tenant1": {"url": url(APP_DATABASE), "server_names": ["tenant1.pgmux.test"]},
                             "tenant2": {"url": url("postgres"), "server_names": ["Tenant2.pgmux.test"]}})

    def current_database(host: str | None, dbname: str) -> str:
        params = {"host": host, "hostaddr": "127.0.0.1"} if host else {"host": "127.0.0.1"}
        with psycopg.connect(port=proxy.port(), user=APP.name, password=APP.password, dbname=dbname,
                             sslmode="verify-full", sslrootcert=certificates.ca_file, autocommit=True,
                             connect_timeout=10, **params) as conn:
            return conn.execute("SELECT current_database()").fetchone()[0]

    # The host name wins over the StartupMessage's database; without a known name, the database named.
    assert current_database("tenant1.pgmux.test", "anything") == APP_DATABASE
    assert current_database("tenant2.pgmux.test", "tenant1") == "postgres"
    assert current_database(None, "tenant2") == "postgres"  # an IP address sends no host name


def test_sighup_rotates_the_certificate_while_a_tls_client_stays_connected(pgmux_process, certificates) -> None:
    process = pgmux_process(PGMUX_CLIENT_TLS_SSLMODE="require", PGMUX_CLIENT_TLS_CERT_FILE=certificates.cert_file,
                            PGMUX_CLIENT_TLS_KEY_FILE=certificates.key_file)
    port = process.ports()[0]

    def connect(ca_file: str) -> psycopg.Connection:
        return psycopg.connect(host="localhost", port=port, user=APP.name, password=APP.password,
                               dbname=APP_DATABASE, sslmode="verify-full", sslrootcert=ca_file, autocommit=True,
                               connect_timeout=10)

    with connect(certificates.ca_file) as staying:
        assert staying.execute("SELECT 1").fetchone() == (1,)
        # The operator replaces the files in place (as cert-manager or certbot do), then signals.
        new_ca = trustme.CA()
        issued = new_ca.issue_cert("localhost", "127.0.0.1")
        Path(certificates.cert_file).write_bytes(issued.cert_chain_pems[0].bytes())
        Path(certificates.key_file).write_bytes(issued.private_key_pem.bytes())
        new_ca_file = certificates._write("rotated-ca.pem", new_ca.cert_pem.bytes())
        process.signal(signal.SIGHUP)
        process.wait_for_log("configuration reloaded")
        with connect(new_ca_file) as fresh:
            assert fresh.execute("SELECT 2").fetchone() == (2,)
        with pytest.raises(psycopg.OperationalError):
            connect(certificates.ca_file)  # new connections get the new certificate only
        assert staying.execute("SELECT 3").fetchone() == (3,)  # the established session is untouched


def test_psql_direct_tls_where_its_libpq_supports_it(pgmux, certificates) -> None:
    psql = shutil.which("psql")
    if psql is None:
        pytest.skip("no psql on this machine")
    version = subprocess.run([psql, "--version"], capture_output=True, text=True, timeout=10).stdout
    major = int(version.split()[-1].split(".")[0]) if version.split() else 0
    if major < 17:
        pytest.skip(f"this psql ({version.strip()}) has no sslnegotiation=direct (libpq 17+); "
                    "psycopg's bundled libpq covers direct TLS in test_direct_tls_of_postgresql_17...")
    proxy = _tls_pgmux(pgmux, certificates)
    url = (f"postgresql://{APP.name}@localhost:{proxy.port()}/{APP_DATABASE}"
           f"?sslmode=verify-full&sslrootcert={certificates.ca_file}&sslnegotiation=direct")
    out = subprocess.run([psql, url, "-Atc", "SELECT 1"], capture_output=True, text=True, timeout=30,
                         env={"PGPASSWORD": APP.password, "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "1"
