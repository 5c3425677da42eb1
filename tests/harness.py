"""Runs a real pgmux for a test: in a background thread with its own event loop, or as a subprocess."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

from proxy.app import Proxy
from proxy.cli import new_event_loop
from proxy.settings import Settings, load_settings

T = TypeVar("T")
ROOT = Path(__file__).resolve().parent.parent


class RunningPgmux:
    """A pgmux serving on loopback from a thread; ``call`` runs a function inside its loop (for state checks)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.loop = new_event_loop()  # pgmux's own choice: uvloop, as in production
        self.proxy: Proxy | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="pgmux", daemon=True)
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("pgmux did not start within 30 s")
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.proxy = Proxy(self.settings)
            self.loop.run_until_complete(self.proxy.start())
        except BaseException as exc:  # reported to the test thread
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        self.loop.run_until_complete(self.proxy.wait_stopped())
        self.loop.run_until_complete(asyncio.sleep(0.05))
        self.loop.close()

    @property
    def host(self) -> str:
        assert self.proxy is not None
        return self.proxy.addresses[0][0]

    def port(self, listener: int = 0) -> int:
        assert self.proxy is not None
        return self.proxy.addresses[listener][1]

    def dsn(self, user: str, password: str | None, database: str, listener: int = 0, **query: str) -> str:
        auth = quote(user, safe="") + (f":{quote(password, safe='')}" if password is not None else "")
        params = "&".join(f"{k}={v}" for k, v in query.items())
        return f"postgresql://{auth}@{self.host}:{self.port(listener)}/{database}" + (f"?{params}" if params else "")

    def call(self, fn: Callable[[Proxy], T]) -> T:
        """Run ``fn(proxy)`` on pgmux's loop and return its result (a consistent view of its state)."""
        async def invoke() -> T:
            assert self.proxy is not None
            return fn(self.proxy)
        return asyncio.run_coroutine_threadsafe(invoke(), self.loop).result(10)

    def stop(self) -> None:
        if self.proxy is not None and self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(self.proxy.stop(graceful=False), self.loop).result(30)
        self._thread.join(30)


def start_pgmux(upstream_url: str | None = None, **overrides: Any) -> RunningPgmux:
    """pgmux on an ephemeral loopback port; ``overrides`` are Settings fields."""
    overrides.setdefault("listen", "127.0.0.1:0")
    if upstream_url is not None:
        overrides["upstream_url"] = upstream_url
    return RunningPgmux(load_settings(None, [], **overrides))


class PgmuxProcess:
    """pgmux as a real `python -m proxy serve` process, for signals and the CLI; stopped by its pid."""

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.process = subprocess.Popen([sys.executable, "-m", "proxy", *args], cwd=ROOT,
                                        env={**os.environ, **env}, stdout=self._log, stderr=subprocess.STDOUT)

    def wait_for_log(self, text: str, timeout: float = 20.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            output = self.log_path.read_text(errors="replace")
            if text in output:
                return output
            if self.process.poll() is not None:
                raise RuntimeError(f"pgmux exited with {self.process.returncode}:\n{output}")
            time.sleep(0.05)
        raise TimeoutError(f"{text!r} not in pgmux log:\n{self.log_path.read_text(errors='replace')}")

    def ports(self) -> list[int]:
        """The ports pgmux reported listening on, in listener order."""
        output = self.wait_for_log("listening on")
        return [int(port) for port in re.findall(r"listening on [^ ]+:(\d+) ", output)]

    def worker_pids(self) -> dict[int, int]:
        """Each worker's current pid (``workers`` > 1), from the supervisor's log: the latest start of each index."""
        text = self.log_path.read_text()
        return {int(index): int(pid) for index, pid in re.findall(r"worker (\d+) started \(pid (\d+)\)", text)}

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def signal_pid(self, pid: int, signum: int) -> None:
        """Signal one of pgmux's own processes (a worker), checked to be a child of this one."""
        with open(f"/proc/{pid}/stat") as stat:
            parent = int(stat.read().rsplit(")", 1)[1].split()[1])
        assert parent == self.process.pid, f"pid {pid} is not a worker of pgmux {self.process.pid}"
        os.kill(pid, signum)

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self._log.close()
        return self.process.returncode
