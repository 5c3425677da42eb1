"""The real-PostgreSQL fixtures and proxy/embedded.py: logins per auth method, TLS verification, clean stop."""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

import asyncpg
import psutil
import psycopg
import pytest

from pgusers import APP, APP_DATABASE, MD5, PLAIN, PgUser
from proxy.embedded import start_embedded_postgres


async def _fetch_over_tcp(dsn: str, query: str) -> object:
    connection = await asyncpg.connect(dsn, ssl=False)
    try:
        return await connection.fetchval(query)
    finally:
        await connection.close()


def _stored_password(postgres, user: PgUser) -> str:
    return postgres.psql(f"SELECT rolpassword FROM pg_authid WHERE rolname = '{user.name}'").strip()


def test_app_user_runs_select_1_over_tcp_with_scram(postgres) -> None:
    dsn = postgres.dsn(APP.name, APP.password, APP_DATABASE)

    assert asyncio.run(_fetch_over_tcp(dsn, "SELECT 1")) == 1
    # inet_server_port() is NULL on a unix socket: this really went over TCP.
    assert asyncio.run(_fetch_over_tcp(dsn, "SELECT inet_server_port()")) == postgres.port
    assert _stored_password(postgres, APP).startswith("SCRAM-SHA-256$")


@pytest.mark.parametrize("user", [MD5, PLAIN], ids=lambda user: user.auth_method)
def test_md5_and_password_method_users_log_in_to_app(postgres, user: PgUser) -> None:
    dsn = postgres.dsn(user.name, user.password, APP_DATABASE)

    assert asyncio.run(_fetch_over_tcp(dsn, "SELECT current_user")) == user.name


def test_md5user_password_is_stored_as_md5_hash(postgres) -> None:
    # md5 hba auth only works against an md5 hash, never a SCRAM verifier.
    assert _stored_password(postgres, MD5).startswith("md5")


def test_wrong_password_is_rejected(postgres) -> None:
    dsn = postgres.dsn(APP.name, "not-" + APP.password, APP_DATABASE)

    with pytest.raises(asyncpg.InvalidPasswordError):
        asyncio.run(_fetch_over_tcp(dsn, "SELECT 1"))


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1"])
def test_tls_server_passes_verify_full_with_its_ca(postgres_tls, host: str) -> None:
    dsn = postgres_tls.dsn(sslmode="verify-full", sslrootcert=str(postgres_tls.ca_file))

    with psycopg.connect(dsn, host=host, connect_timeout=10) as connection:
        row = connection.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetchone()

    assert row == (True,)


def test_tls_server_fails_verify_full_with_an_unrelated_ca(postgres_tls) -> None:
    dsn = postgres_tls.dsn(sslmode="verify-full", sslrootcert=str(postgres_tls.wrong_ca_file))

    with pytest.raises(psycopg.OperationalError, match="certificate verify failed"):
        psycopg.connect(dsn, host="localhost", connect_timeout=10)


def test_stop_ends_the_postmaster_and_its_backends_and_deletes_the_data_dir() -> None:
    server = start_embedded_postgres()
    try:
        assert server.psql("SELECT 1").strip() == "1"
        pids = [server.pid, *(child.pid for child in psutil.Process(server.pid).children(recursive=True))]
        assert len(pids) > 1  # checkpointer, walwriter, ... : all must go
        data_dir, socket_dir = server.data_dir, server.socket_dir
    finally:
        server.stop()

    assert [pid for pid in pids if psutil.pid_exists(pid)] == []
    assert not data_dir.exists()
    assert not socket_dir.exists()
    server.stop()  # a second stop is a no-op


def test_failed_start_reports_the_server_log_and_leaves_no_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A private temp root shows whether anything is left behind; it also sits under
    # root-only pytest dirs, so it exercises the traversal permissions for the server user.
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))

    with pytest.raises(RuntimeError, match='invalid value for parameter "shared_buffers"'):
        start_embedded_postgres(extra_conf={"shared_buffers": "lots"})

    assert list(tmp_path.iterdir()) == []
