"""pgmux as the Kubernetes base runs it: the ConfigMap's pgmux.toml and the pod's environment, probed and drained.

Only the addresses differ from the pod: loopback and free ports instead of 0.0.0.0:6432 and :9127, and the test's
PostgreSQL instead of the Secret's placeholder URL.
"""

from __future__ import annotations

import asyncio
import re
import signal
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import asyncpg
from deploy_files import container, pgmux_toml, pod_environment, pod_spec

from pgusers import APP, APP_DATABASE


def probe(port: int, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as answer:
            return int(answer.status)
    except urllib.error.HTTPError as error:
        return error.code


def wait_for_status(port: int, path: str, status: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while probe(port, path) != status:
        assert time.monotonic() < deadline, f"{path} did not answer {status} within {timeout} s"
        time.sleep(0.1)


def test_pod_configuration_is_ready_then_drains_a_transaction_well_within_the_grace_period(
        pgmux_process: Any, postgres: Any, tmp_path: Path) -> None:
    config = tmp_path / "pgmux.toml"
    config.write_text(pgmux_toml())
    env = pod_environment()
    env["PGMUX_UPSTREAM_URL"] = postgres.dsn(APP.name, APP.password, APP_DATABASE, sslmode="disable")
    process = pgmux_process("--config", str(config), "--metrics-listen", "127.0.0.1:0", **env)
    port = process.ports()[0]
    found = re.search(r"metrics on http://127\.0\.0\.1:(\d+)/metrics", process.wait_for_log("metrics on"))
    assert found is not None
    metrics_port = int(found.group(1))
    readiness = container()["readinessProbe"]["httpGet"]["path"]
    liveness = container()["livenessProbe"]["httpGet"]["path"]
    assert probe(metrics_port, liveness) == 200
    wait_for_status(metrics_port, readiness, 200, timeout=15)  # the first upstream check
    pre_stop = float(container()["lifecycle"]["preStop"]["exec"]["command"][1])
    grace = pod_spec()["terminationGracePeriodSeconds"]

    async def scenario() -> float:
        busy = await asyncpg.connect(host="127.0.0.1", port=port, user=APP.name, password=APP.password,
                                     database=APP_DATABASE, statement_cache_size=0)
        await busy.execute("BEGIN")
        process.signal(signal.SIGTERM)  # what the kubelet sends once preStop has ended
        sigterm = time.monotonic()
        await asyncio.to_thread(wait_for_status, metrics_port, readiness, 503, 5)
        await asyncio.sleep(1.0)  # the transaction runs on while pgmux drains
        assert await busy.fetchval("SELECT 1") == 1
        await busy.execute("COMMIT")
        await busy.close()
        return sigterm

    sigterm = asyncio.run(scenario())
    process.process.wait(grace)
    drained = time.monotonic() - sigterm
    assert process.process.returncode == 0
    assert drained < grace - pre_stop, f"pgmux took {drained:.1f} s to drain; the pod gives it {grace - pre_stop} s"
