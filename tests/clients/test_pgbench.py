"""pgbench through pgmux: select-only in simple and extended mode, and a connection per transaction (-C).

The data is loaded with `pgbench -i` directly into PostgreSQL (database pgbench_clients), so the pgmux runs
measure only pgmux; every run must finish with zero failed transactions while PostgreSQL never sees more
backends in that database than pgmux's pool size.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from clientsupport import BackendSampler, client_bin_dir, client_env, ensure_database, run, upstream_for
from pgusers import APP

DATABASE = "pgbench_clients"
POOL_SIZE = 5


@dataclass(frozen=True)
class PgbenchReport:
    processed: int
    expected: int | None  # "processed: N/M" when the run is bounded by -t
    failed: int
    output: str


def _parse(output: str) -> PgbenchReport:
    processed = re.search(r"^number of transactions actually processed: (\d+)(?:/(\d+))?$", output, re.M)
    failed = re.search(r"^number of failed transactions: (\d+)", output, re.M)
    assert processed and failed, f"unexpected pgbench output:\n{output}"
    expected = int(processed.group(2)) if processed.group(2) else None
    return PgbenchReport(int(processed.group(1)), expected, int(failed.group(1)), output)


@pytest.fixture(scope="module")
def pgbench_bin(postgres) -> Path:
    """pgbench, with scale 1 loaded directly (not through pgmux) into a database of its own, once per module."""
    pgbench = client_bin_dir() / "pgbench"
    ensure_database(postgres, DATABASE)
    run([pgbench, "-i", "-s", "1", "-q", "-h", postgres.host, "-p", str(postgres.port), "-U", APP.name, DATABASE],
        env=client_env(APP.password), timeout=60)
    return pgbench


def _pgbench_through(proxy, pgbench: Path, *args: str, timeout: float = 60) -> PgbenchReport:
    result = run([pgbench, "-h", proxy.host, "-p", str(proxy.port()), "-U", APP.name, *args, DATABASE],
                 env=client_env(APP.password), timeout=timeout)
    output = result.stdout + result.stderr
    assert "aborted" not in output and "error" not in output.lower(), output
    return _parse(output)


def _logged_transactions(log_dir: Path) -> int:
    # -l writes one line per transaction, in one file per pgbench thread.
    return sum(len(path.read_text().splitlines()) for path in log_dir.glob("pgbench_log.*"))


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["simple", "extended"])
def test_pgbench_select_only_20_clients_on_5_backends_without_failures(
        pgmux, postgres, pgbench_bin, tmp_path, mode) -> None:
    proxy = pgmux(upstream_url=upstream_for(postgres, DATABASE), default_pool_size=POOL_SIZE)
    sampler = BackendSampler(postgres, DATABASE, proxy)
    sampler.wait_until_no_backends()
    with sampler.running():
        report = _pgbench_through(proxy, pgbench_bin, "-S", "-M", mode, "-c", "20", "-j", "2", "-T", "3",
                                  "-l", "--log-prefix", str(tmp_path / "pgbench_log"))
    assert report.failed == 0, report.output
    assert report.processed > 0, report.output
    assert _logged_transactions(tmp_path) == report.processed, report.output
    assert f"query mode: {mode}" in report.output
    seen_by_postgres, held_by_pgmux = sampler.peak()
    assert seen_by_postgres <= POOL_SIZE
    assert held_by_pgmux <= POOL_SIZE


def test_pgbench_connection_per_transaction_completes_every_transaction(pgmux, postgres, pgbench_bin) -> None:
    proxy = pgmux(upstream_url=upstream_for(postgres, DATABASE), default_pool_size=POOL_SIZE)
    sampler = BackendSampler(postgres, DATABASE, proxy)
    sampler.wait_until_no_backends()
    with sampler.running():
        # -C: every one of the 500 transactions logs in to pgmux afresh (SCRAM) and disconnects.
        report = _pgbench_through(proxy, pgbench_bin, "-S", "-M", "simple", "-C", "-c", "10", "-j", "2", "-t", "50")
    assert report.failed == 0, report.output
    assert report.expected == 10 * 50, report.output
    assert report.processed == report.expected, report.output
    seen_by_postgres, held_by_pgmux = sampler.peak()
    assert seen_by_postgres <= POOL_SIZE
    assert held_by_pgmux <= POOL_SIZE
