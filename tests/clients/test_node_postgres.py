"""node-postgres (the `pg` npm package) through pgmux: concurrency, transactions, error codes.

`pg@8` is installed with npm once into a cache directory ($PGMUX_NODE_CACHE, default
~/.cache/pgmux-tests/node) and reused by later runs; the scenarios are the scripts in js/.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest

from clientsupport import BackendSampler, client_env, run, tls_files
from pgusers import APP, APP_DATABASE

JS_DIR = Path(__file__).resolve().parent / "js"
PG_PACKAGE = "pg@8"
NPM_TIMEOUT = 300.0


def _node_cache() -> Path:
    configured = os.environ.get("PGMUX_NODE_CACHE")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "pgmux-tests" / "node"


@pytest.fixture(scope="session")
def node_modules() -> Path:
    """A node_modules with pg@8, installed once and reused; skips only when node or npm is not installed."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip(f"node-postgres tests need node and npm on PATH (node: {node}, npm: {npm})")
    cache = _node_cache()
    modules = cache / "node_modules"
    if (modules / "pg" / "package.json").is_file():
        return modules
    cache.parent.mkdir(parents=True, exist_ok=True)
    # Install beside the cache and rename into place, so a concurrent or interrupted run never sees half a tree.
    staging = Path(tempfile.mkdtemp(prefix="node-install-", dir=cache.parent))
    try:
        env = {**os.environ, "npm_config_update_notifier": "false"}
        run([npm, "install", "--no-audit", "--no-fund", "--no-save", "--prefix", staging, PG_PACKAGE],
            env=env, timeout=NPM_TIMEOUT, cwd=staging)
        try:
            staging.rename(cache)
        except OSError:  # someone else finished first (or a broken cache dir exists): replace only a broken one
            if not (modules / "pg" / "package.json").is_file():
                shutil.rmtree(cache, ignore_errors=True)
                staging.rename(cache)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    assert (modules / "pg" / "package.json").is_file(), f"npm install {PG_PACKAGE} left no {modules}/pg"
    return modules


def _node(node_modules: Path, proxy, script: str, timeout: float = 60, **env: str) -> dict[str, Any]:
    """Run js/<script> against pgmux and return the JSON object it prints."""
    environment = client_env(APP.password, NODE_PATH=str(node_modules), PGHOST=proxy.host,
                             PGPORT=str(proxy.port()), PGUSER=APP.name, PGDATABASE=APP_DATABASE,
                             SCENARIO_TIMEOUT_MS=str(int((timeout - 5) * 1000)), **env)
    result = run([shutil.which("node") or "node", JS_DIR / script], env=environment, timeout=timeout, cwd=JS_DIR)
    lines = result.stdout.strip().splitlines()
    assert lines, f"{script} printed nothing; stderr:\n{result.stderr}"
    return json.loads(lines[-1])


def test_node_postgres_50_concurrent_clients_with_parameterised_queries_on_5_backends(
        pgmux, postgres, node_modules) -> None:
    proxy = pgmux(default_pool_size=5)
    sampler = BackendSampler(postgres, APP_DATABASE, proxy)
    sampler.wait_until_no_backends()
    with sampler.running():
        result = _node(node_modules, proxy, "concurrent_queries.js", CLIENTS="50")
    assert result == {"clients": 50, "queriesOk": 50 * 20, "applicationNameMismatches": [], "poolQueriesOk": 500}
    seen_by_postgres, held_by_pgmux = sampler.peak()
    assert seen_by_postgres <= 5
    assert held_by_pgmux <= 5


def test_node_postgres_transactions_commit_and_roll_back(pgmux, node_modules) -> None:
    proxy = pgmux(default_pool_size=2)
    result = _node(node_modules, proxy, "transaction.js")
    assert result == {
        "insideBeforeCommit": 10,
        "outsideBeforeCommit": 0,
        "samePidInTx": True,
        "outsideAfterCommit": 10,
        "insideBeforeRollback": 5,
        "afterRollback": 10,
        "note": "updated",
    }


def test_node_postgres_sees_sqlstates_and_keeps_the_connection_after_errors(pgmux, node_modules) -> None:
    proxy = pgmux(default_pool_size=1)
    result = _node(node_modules, proxy, "error_codes.js")
    assert result["divisionByZero"]["code"] == "22012"
    assert result["divisionByZero"]["message"] == "division by zero"
    assert result["divisionByZero"]["severity"] == "ERROR"
    assert result["afterSimple"] == 1
    assert result["badParameter"]["code"] == "22P02"
    assert result["afterExtended"] == 7
    assert result["uniqueViolation"]["code"] == "23505"
    assert result["uniqueViolation"]["constraint"] == "node_errors_pkey"
    assert result["uniqueViolation"]["table"] == "node_errors"
    assert result["uniqueViolation"]["detail"] == "Key (id)=(1) already exists."
    assert result["inTransaction"]["code"] == "22012"
    assert result["aborted"]["code"] == "25P02"
    assert result["afterRollback"] == 2
    assert result["syntax"]["code"] == "42601"
    assert result["afterSyntax"] == 1


def test_node_postgres_end_returns_at_once_while_every_backend_is_busy(pgmux, node_modules) -> None:
    # The only backend stays in a transaction throughout: closing clients must not wait in line for it.
    proxy = pgmux(default_pool_size=1, query_wait_timeout=8)
    result = _node(node_modules, proxy, "end_while_busy.js")
    assert result["slowestEndMs"] < 2000, result
    assert result["poolEndMs"] < 2000, result


def test_node_postgres_verifies_pgmuxs_certificate_with_ssl_ca(pgmux, node_modules, tmp_path) -> None:
    tls = tls_files(tmp_path)
    proxy = pgmux(**tls.pgmux_settings())
    result = _node(node_modules, proxy, "tls_connect.js", CA_FILE=str(tls.ca))
    assert result["two"] == 2
    assert result["encrypted"] is True
    assert result["protocol"] in ("TLSv1.2", "TLSv1.3")
