"""Processes the harness starts (stopped by pid, never by name) and CPU/memory accounting with psutil."""

from __future__ import annotations

import ctypes
import os
import pwd
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil

_PR_SET_PDEATHSIG = 1


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def raise_nofile_limit() -> tuple[int, int]:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit; return (soft, hard) afterwards."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard_target = 1_048_576
    else:
        hard_target = hard
    if soft < hard_target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard_target, hard))
        except (ValueError, OSError):
            pass
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def _child_setup(nofile: int | None) -> Callable[[], None]:
    """preexec hook: raise the fd limit and make the kernel kill the child if the harness dies first."""
    parent_pid = os.getpid()
    arm_deathsig = sys.platform.startswith("linux") and threading.current_thread() is threading.main_thread()

    def setup() -> None:
        if nofile is not None:
            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            target = hard if hard != resource.RLIM_INFINITY else nofile
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (min(max(soft, nofile), target), hard))
            except (ValueError, OSError):
                pass
        if arm_deathsig:
            # Runs after Popen's setuid (which would clear the setting) and before exec.
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL))
            if os.getppid() != parent_pid:
                os.kill(os.getpid(), signal.SIGKILL)

    return setup


class ManagedProcess:
    """A long-running child (pgmux, PgBouncer): started with its output in a log file, stopped by its pid."""

    def __init__(self, name: str, argv: Sequence[str], *, env: Mapping[str, str], cwd: Path, log_path: Path,
                 run_as: pwd.struct_passwd | None = None, nofile: int | None = None,
                 stop_signal: signal.Signals = signal.SIGINT) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.stop_signal = stop_signal
        self._log = log_path.open("ab")
        extra: dict[str, object] = {}
        if run_as is not None:
            extra = {"user": run_as.pw_uid, "group": run_as.pw_gid, "extra_groups": []}
        self.process = subprocess.Popen(
            self.argv, env=dict(env), cwd=cwd, stdin=subprocess.DEVNULL, stdout=self._log,
            stderr=subprocess.STDOUT, preexec_fn=_child_setup(nofile), **extra,  # type: ignore[arg-type]
        )
        self.pid = self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def wait_for_port(self, host: str, port: int, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if not self.alive():
                raise RuntimeError(f"{self.name} exited with code {self.process.returncode} before listening; "
                                   f"log tail:\n{self.log_tail()}")
            try:
                socket.create_connection((host, port), timeout=1).close()
                return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not listen on {host}:{port} within {timeout:g}s; "
                                   f"log tail:\n{self.log_tail()}")
            time.sleep(0.02)

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:]) or "(log is empty)"

    def stop(self, timeout: float = 10.0) -> int | None:
        """Send the stop signal to our pid, SIGKILL it after ``timeout``; reap it. Idempotent."""
        try:
            if self.process.poll() is None:
                self.process.send_signal(self.stop_signal)
                try:
                    self.process.wait(timeout)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait(10)
        finally:
            self._log.close()
        return self.process.returncode


def run_bounded(argv: Sequence[str], *, env: Mapping[str, str], timeout: float,
                cwd: Path | None = None) -> tuple[int | None, str, str, bool]:
    """Run a client program to completion or ``timeout``; on timeout SIGKILL it by pid.

    Returns (returncode, stdout, stderr, timed_out).
    """
    process = subprocess.Popen(list(argv), env=dict(env), cwd=cwd, stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=_child_setup(None))
    try:
        stdout, stderr = process.communicate(timeout=timeout)
        return process.returncode, stdout, stderr, False
    except subprocess.TimeoutExpired:
        process.kill()
        stdout, stderr = process.communicate(timeout=10)
        return None, stdout or "", stderr or "", True
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)


# --------------------------------------------------------------------------- accounting


def process_cpu_times(pid: int | None) -> tuple[float, float] | None:
    """(user, system) CPU seconds of one process and its live children (pgmux's workers: one process
    with workers = 1), or None if it is gone/unknown."""
    if pid is None:
        return None
    try:
        process = psutil.Process(pid)
        user, system = process.cpu_times()[:2]
        for child in process.children(recursive=True):
            try:
                times = child.cpu_times()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            user, system = user + times.user, system + times.system
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None
    return user, system


def tree_cpu_seconds(pid: int | None) -> float | None:
    """CPU of a process, its reaped children and its live children (PostgreSQL: postmaster + backends)."""
    if pid is None:
        return None
    try:
        parent = psutil.Process(pid)
        times = parent.cpu_times()
        total = times.user + times.system + times.children_user + times.children_system
        for child in parent.children():
            try:
                child_times = child.cpu_times()
                total += child_times.user + child_times.system
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        return total
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def rss_bytes(pid: int | None) -> int | None:
    if pid is None:
        return None
    try:
        return int(psutil.Process(pid).memory_info().rss)
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def memory_detail(pid: int) -> dict[str, int] | None:
    """rss/uss/pss of a process in bytes (uss/pss need /proc/PID/smaps; root or same user)."""
    try:
        info = psutil.Process(pid).memory_full_info()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None
    return {"rss": int(info.rss), "uss": int(getattr(info, "uss", 0)), "pss": int(getattr(info, "pss", 0))}


def _system_busy_seconds() -> float:
    times = psutil.cpu_times()
    idle = times.idle + getattr(times, "iowait", 0.0)
    return sum(times) - idle


@dataclass(frozen=True)
class CpuSnapshot:
    wall: float
    pooler: tuple[float, float] | None  # (user, system)
    postgres: float | None
    harness: float
    children: float
    system_busy: float


class CpuMeter:
    """Before/after CPU accounting for one measured run.

    ``other_s`` is what the whole machine spent on something else (other engineers' tests, ...):
    busy CPU minus the pooler, PostgreSQL, this harness and its reaped children (pgbench).
    """

    def __init__(self, pooler_pid: int | None, postgres_pid: int | None) -> None:
        self.pooler_pid = pooler_pid
        self.postgres_pid = postgres_pid

    def snapshot(self) -> CpuSnapshot:
        own = resource.getrusage(resource.RUSAGE_SELF)
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)
        return CpuSnapshot(
            wall=time.perf_counter(),
            pooler=process_cpu_times(self.pooler_pid),
            postgres=tree_cpu_seconds(self.postgres_pid),
            harness=own.ru_utime + own.ru_stime,
            children=kids.ru_utime + kids.ru_stime,
            system_busy=_system_busy_seconds(),
        )

    @staticmethod
    def delta(before: CpuSnapshot, after: CpuSnapshot) -> dict[str, float | None]:
        def diff(a: float | None, b: float | None) -> float | None:
            return None if a is None or b is None else round(b - a, 4)

        pooler = pooler_kernel = None
        if before.pooler and after.pooler:
            pooler = diff(sum(before.pooler), sum(after.pooler))
            # The kernel's share (socket calls, TCP on loopback) is what any pooler pays; the rest is its own code.
            pooler_kernel = diff(before.pooler[1], after.pooler[1])
        postgres = diff(before.postgres, after.postgres)
        harness = round(after.harness - before.harness, 4)
        children = round(after.children - before.children, 4)
        busy = round(after.system_busy - before.system_busy, 4)
        wall = round(after.wall - before.wall, 4)
        ours = (pooler or 0.0) + (postgres or 0.0) + harness + children
        other = round(max(0.0, busy - ours), 4)
        capacity = wall * (psutil.cpu_count() or 1)
        return {
            "wall_s": wall,
            "pooler_s": pooler,
            "pooler_kernel_s": pooler_kernel,
            "postgres_s": postgres,
            "harness_s": harness,
            "client_programs_s": children,
            "machine_busy_s": busy,
            "other_s": other,
            # CPU times tick in 10 ms steps per process: below ~1 s of wall time the share is mostly rounding.
            "other_share": round(other / capacity, 4) if wall >= 1.0 and capacity > 0 else None,
        }
