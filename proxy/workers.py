"""Workers: N pgmux processes sharing each listener (SO_REUSEPORT), their shares of the limits, and their supervisor.

Each worker is today's single-process pgmux (its own event loop, pools and clients). The backend limits (pool
sizes, max_db_connections, max_user_connections) hold for the whole pgmux through the slot table the workers
share (proxy/slots.py), so PostgreSQL never sees more backends than configured, whatever the number of workers;
every other limit (clients, min_pool_size) is split into fixed shares that add up to it. The supervisor binds
each listener first (a busy port fails the start at once, and port 0 is chosen once for all), forks the
workers, replaces a worker that dies (its clients are lost, nobody else's; its slots are freed), passes
SIGHUP, SIGTERM and SIGINT to every worker, and exits when all have stopped. With ``metrics_listen`` the
supervisor serves /metrics, /healthz and /readyz for the whole pgmux: each worker serves its own on a private
loopback port, and the supervisor asks them all. A CancelRequest the kernel hands to another worker than the
one that issued its key is forwarded to that one's private cancel address (proxy/peering.py), a Unix socket
the supervisor names before forking: a replacement worker takes over the same address.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import http.server
import os
import re
import shutil
import signal
import socket
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Final

from proxy.logs import get_logger
from proxy.settings import (
    SPLIT_DATABASE_LIMITS,
    SPLIT_LIMITS,
    DatabaseSettings,
    ListenerSettings,
    PeerAddress,
    Settings,
    split_address,
)
from proxy.slots import SlotTable, share

log = get_logger("workers")

_RESTART_DELAY: Final = 1.0  # a worker that died within this long of its start is restarted after this long
_FORWARDED: Final = (signal.SIGHUP, signal.SIGTERM, signal.SIGINT)
_PR_SET_PDEATHSIG: Final = 1
_PRIVATE_METRICS: Final = "127.0.0.1:0"  # where each worker serves its own metrics for the supervisor
_SCRAPE_TIMEOUT: Final = 5.0
_UNIX_PATH_MAX: Final = 107  # bytes of a Unix socket's path (sun_path holds 108, with the closing NUL)
_SAMPLE: Final = re.compile(r"([^\s{]+)(?:\{(.*)\})?(\s.*)")


def worker_settings(settings: Settings, workers: int, worker: int) -> Settings:
    """The settings worker ``worker`` of ``workers`` runs by: each limit other than the backend limits (which the
    slot table holds for the whole pgmux) replaced by its share."""
    if workers == 1:
        return settings

    def part(limit: int) -> int:
        return share(limit, workers, worker)

    def database(db: DatabaseSettings) -> DatabaseSettings:
        return db.model_copy(update={name: part(getattr(db, name)) for name in SPLIT_DATABASE_LIMITS
                                     if getattr(db, name)})

    return settings.model_copy(update={
        **{name: part(getattr(settings, name)) for name in SPLIT_LIMITS},
        "databases": {name: database(db) for name, db in settings.databases.items()},
        # The upstream_url shorthand's database has no overrides: the global shares above apply to it.
        # The supervisor serves metrics_listen; each worker answers it on a private port (WorkerViews).
        "metrics_listen": _PRIVATE_METRICS if settings.metrics_listen else None,
    })


def reserve_listeners(settings: Settings) -> tuple[Settings, list[socket.socket]]:
    """Bind every listener's address in the supervisor (not listening: workers accept on their own sockets).

    A busy port fails here, before any worker starts; a port 0 is chosen here, once, for every worker.
    Returns the settings with each listener's address made concrete and the sockets holding the ports.
    """
    reserved: list[socket.socket] = []
    listeners: list[ListenerSettings] = []
    try:
        for listener in settings.all_listeners():
            host, port = split_address(listener.address)
            family, kind, proto, _, address = socket.getaddrinfo(
                host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
            sock = socket.socket(family, kind, proto)
            reserved.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind(address)
            if port == 0:
                listener = listener.model_copy(update={"address": f"{host}:{sock.getsockname()[1]}"})
            listeners.append(listener)
    except BaseException:
        for sock in reserved:
            sock.close()
        raise
    return settings.model_copy(update={"listen": None, "listeners": listeners}), reserved


@contextlib.contextmanager
def private_cancel_addresses(count: int) -> Iterator[dict[int, PeerAddress]]:
    """Where each of ``count`` workers takes the CancelRequests its siblings forward (by worker index): a Unix
    socket per worker (.s.PGSQL.<index + 1>, a port cannot be 0) in a directory only this user may enter, made
    before any worker starts and removed, with whatever sockets are left in it, when the supervisor is done."""
    directory = tempfile.mkdtemp(prefix="pgmux-cancel-")  # mode 0700; each worker makes its socket 0600 as well
    try:
        addresses = {index: PeerAddress(host=directory, port=index + 1) for index in range(count)}
        longest = str(addresses[count - 1])
        if len(os.fsencode(longest)) > _UNIX_PATH_MAX:  # refused now, not by every worker in turn as it starts
            raise OSError(errno.ENAMETOOLONG, f"{longest} is too long for a Unix socket; set TMPDIR to a "
                          "shorter directory")
        yield addresses
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def merge_expositions(texts: Mapping[int, str]) -> str:
    """One Prometheus text from each worker's (by worker index): every sample labelled ``worker="N"``, each
    metric family's HELP and TYPE once, its samples from all workers together (as the format requires)."""
    families: dict[str, list[str]] = {}  # family -> its HELP/TYPE lines, then its samples; in first-seen order
    for worker, text in sorted(texts.items()):
        family = ""
        for line in text.splitlines():
            if line.startswith("# "):
                words = line.split(" ", 3)
                if len(words) >= 3 and words[1] in ("HELP", "TYPE"):
                    family = words[2]
                    lines = families.setdefault(family, [])
                    if line not in lines:
                        lines.append(line)
                continue
            match = _SAMPLE.fullmatch(line)
            if match is None:
                continue
            name, labels, rest = match.groups()
            labelled = f'worker="{worker}"' + (f",{labels}" if labels else "")
            families.setdefault(family or name, []).append(f"{name}{{{labelled}}}{rest}")
    return "".join(line + "\n" for lines in families.values() for line in lines)


class WorkerViews:
    """The whole pgmux's /metrics, /healthz and /readyz, served by the supervisor from its workers' own.

    Each worker tells its private metrics port through a pipe once it listens; a scrape asks every worker
    (in a thread of the supervisor: the supervisor has no event loop, and a scrape must not wait on signals).
    """

    def __init__(self, count: int) -> None:
        self.count = count
        self._lock = threading.Lock()
        self._pipes: dict[int, int] = {}  # worker index -> the read end its current process reports on
        self._ports: dict[int, int] = {}  # worker index -> its private metrics port, once reported
        self._server: http.server.ThreadingHTTPServer | None = None

    def new_worker(self, index: int) -> int:
        """A pipe for worker ``index``'s next process: returns the write end it reports its port on."""
        read, write = os.pipe()
        os.set_blocking(read, False)
        with self._lock:
            old = self._pipes.pop(index, None)
            if old is not None:
                os.close(old)
            self._ports.pop(index, None)
            self._pipes[index] = read
        return write

    def _ports_now(self) -> dict[int, int]:
        with self._lock:
            for index, read in self._pipes.items():
                if index not in self._ports:
                    try:
                        reported = os.read(read, 64)
                    except BlockingIOError:
                        continue
                    if reported.strip().isdigit():
                        self._ports[index] = int(reported)
            return dict(self._ports)

    def _ask(self, port: int, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=_SCRAPE_TIMEOUT) as answer:
                return answer.status, answer.read().decode()
        except urllib.error.HTTPError as refused:
            return refused.code, refused.read().decode()
        except OSError as exc:
            return 503, f"unreachable: {exc}\n"

    def respond(self, path: str) -> tuple[int, str]:
        """(status, body) for ``path`` on behalf of the whole pgmux."""
        ports = self._ports_now()
        missing = [index for index in range(self.count) if index not in ports]
        if path == "/metrics":
            texts = {}
            for index, port in ports.items():
                status, text = self._ask(port, path)
                if status == 200:
                    texts[index] = text
            return 200, merge_expositions(texts)
        if path == "/healthz":
            return 200, "ok\n"
        if path == "/readyz":
            reasons = [f"worker {index}: starting" for index in missing]
            for index, port in sorted(ports.items()):
                status, text = self._ask(port, path)
                if status != 200:
                    reasons += [f"worker {index}: {line}" for line in text.splitlines() if line != "not ready"]
            if reasons:
                return 503, "not ready\n" + "".join(reason + "\n" for reason in reasons)
            return 200, "ready\n"
        if path == "/":
            return 200, "pgmux: /metrics /healthz /readyz\n"
        return 404, "not found\n"

    def start(self, address: str) -> None:
        host, port = split_address(address)
        views = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                status, body = views.respond(self.path.split("?", 1)[0])
                data = body.encode()
                self.send_response(status)
                kind = "text/plain; version=0.0.4; charset=utf-8" if self.path.startswith("/metrics") else \
                    "text/plain; charset=utf-8"
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # probes every few seconds would flood the log

        self._server = http.server.ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        bound = self._server.server_address
        log.info("metrics on http://%s:%d/metrics (also /healthz, /readyz), for all %d workers", bound[0],
                 bound[1], self.count)
        threading.Thread(target=self._server.serve_forever, name="metrics", daemon=True).start()

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


def report_metrics_port(write: int, port: int) -> None:
    """In a worker: tell the supervisor where its own metrics are served."""
    os.write(write, f"{port}\n".encode())
    os.close(write)


class Supervisor:
    """Forks ``count`` workers (``run_worker(index, report)`` in each: ``report`` a pipe's write end for its
    metrics port, or None), replaces dead ones (their column of ``slots`` zeroed first), fans signals out."""

    def __init__(self, count: int, run_worker: Callable[[int, int | None], None],
                 views: WorkerViews | None = None, slots: SlotTable | None = None) -> None:
        self.count = count
        self._run_worker = run_worker
        self._views = views
        self._slots = slots
        self.pids: dict[int, int] = {}  # pid -> worker index
        self._started: dict[int, float] = {}  # worker index -> when its current process started
        self._stopping = False

    def run(self) -> int:
        """Serve until every worker has stopped after SIGTERM or SIGINT; returns the exit status."""
        waited = {signal.SIGCHLD, *_FORWARDED}
        signal.pthread_sigmask(signal.SIG_BLOCK, waited)
        try:
            for index in range(self.count):
                self._start(index)
            while self.pids:
                signum = signal.sigwaitinfo(waited).si_signo
                if signum == signal.SIGCHLD:
                    self._reap()
                else:
                    self._forward(signum)
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, waited)
        log.info("all workers stopped")
        return 0

    def _start(self, index: int) -> None:
        report = self._views.new_worker(index) if self._views is not None else None
        pid = os.fork()
        if pid == 0:  # the worker: its own signals, and it ends with its supervisor
            status = 1
            try:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD, *_FORWARDED})
                _die_with_parent()
                self._run_worker(index, report)
                status = 0
            except BaseException:
                log.exception("worker %d failed", index)
            finally:
                os._exit(status)
        if report is not None:
            os.close(report)
        self.pids[pid] = index
        self._started[index] = time.monotonic()
        log.info("worker %d started (pid %d)", index, pid)

    def _reap(self) -> None:
        while self.pids:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                return
            index = self.pids.pop(pid, None)
            if index is None:
                continue
            if self._slots is not None:
                # Its backends died with it (the kernel closed their sockets): their slots go to the others.
                self._slots.forget_worker(index)
                self._slots.ring(range(self.count))
            if self._stopping:
                log.info("worker %d (pid %d) stopped", index, pid)
                continue
            log.error("worker %d (pid %d) died (%s); starting a new one", index, pid, _describe(status))
            if time.monotonic() - self._started[index] < _RESTART_DELAY:
                time.sleep(_RESTART_DELAY)  # a worker that cannot start must not be forked in a tight loop
            self._start(index)

    def _forward(self, signum: int) -> None:
        if signum in (signal.SIGTERM, signal.SIGINT):
            self._stopping = True
        log.info("%s: passing it to %d worker(s)", signal.Signals(signum).name, len(self.pids))
        for pid in self.pids:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass  # died meanwhile: reaped at its SIGCHLD


def _die_with_parent() -> None:
    """Have Linux send this worker SIGTERM when its supervisor dies (even by SIGKILL): no orphaned workers."""
    try:
        libc: Any = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass  # not Linux: the supervisor's own exit still stops them


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exit status {os.waitstatus_to_exitcode(status)}"
