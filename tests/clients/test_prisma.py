"""Prisma 7 with @prisma/adapter-pg (node-postgres underneath) through pgmux in transaction mode.

Installed with npm once into their own cache ($PGMUX_PRISMA_CACHE, default ~/.cache/pgmux-tests/prisma7):
prisma@7, @prisma/client@7, @prisma/adapter-pg@7 and pg@8. Prisma 7's client is Rust-free (a WASM query
compiler plus the driver adapter), but the `prisma` CLI still fetches its Rust schema engine from
binaries.prisma.sh before it runs any command, `generate` included, although generating does not use it.
With no network but the npm registry, PRISMA_SCHEMA_ENGINE_BINARY (Prisma's documented override for a
custom engine path) points the CLI at a stand-in that exits with an error, so nothing is downloaded.

The tables (prisma/schema.sql) are created with SQL directly in PostgreSQL, in a database of their own;
the client generated from prisma/schema.prisma then runs js/prisma_workload.js against pgmux: 2,000
operations from 10 PrismaClients at once, with the adapter's defaults (unnamed statements) and with a
`statementNameGenerator` (every query a named prepared statement), each with zero errors. Everything
is at Prisma's defaults except its transaction timers (maxWait/timeout, see the script): 100 workers on
4 backends on a busy machine can wait more than 2 s for a turn, pooler or not.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

from clientsupport import BackendSampler, client_env, ensure_database, run, tls_files, upstream_for
from npmcache import installed_versions, node_and_npm, npm_install, prisma_cache
from pgusers import APP

HERE = Path(__file__).resolve().parent
JS_DIR = HERE / "js"
PRISMA_DIR = HERE / "prisma"
DATABASE = "prisma_clients"
POOL_SIZE = 4
OPERATIONS = 2000
PACKAGES = ["prisma@7", "@prisma/client@7", "@prisma/adapter-pg@7", "pg@8"]
PACKAGE_NAMES = ["prisma", "@prisma/client", "@prisma/adapter-pg", "pg"]
GENERATE_TIMEOUT = 120.0

NO_SCHEMA_ENGINE = """#!/bin/sh
echo "pgmux tests: the Prisma schema engine is not installed (only prisma generate runs here)" >&2
exit 1
"""


@pytest.fixture(scope="session")
def prisma_client_dir() -> tuple[Path, Path]:
    """(node_modules with Prisma 7, the client generated from prisma/schema.prisma); both cached across runs."""
    node, _ = node_and_npm()
    cache = prisma_cache()
    modules = npm_install(cache, PACKAGES, required=PACKAGE_NAMES)
    versions = installed_versions(modules, PACKAGE_NAMES)
    schema = (PRISMA_DIR / "schema.prisma").read_bytes()
    key = hashlib.sha256(schema + json.dumps(versions, sort_keys=True).encode()).hexdigest()[:16]
    target = cache / "clients" / key
    if (target / "generated" / "index.js").is_file():
        return modules, target / "generated"

    stand_in = cache / "no-schema-engine"
    if not stand_in.is_file():
        stand_in.write_text(NO_SCHEMA_ENGINE)
        stand_in.chmod(0o755)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Generated beside the cache's node_modules (so the client finds its runtime), then renamed into place.
    staging = Path(tempfile.mkdtemp(prefix=f"{key}-", dir=target.parent))
    try:
        (staging / "schema.prisma").write_bytes(schema)
        env = client_env(PRISMA_SCHEMA_ENGINE_BINARY=str(stand_in), CHECKPOINT_DISABLE="1",
                         PRISMA_HIDE_UPDATE_MESSAGE="1", PRISMA_DISABLE_WARNINGS="1")
        run([node, modules / "prisma" / "build" / "index.js", "generate", "--schema", staging / "schema.prisma"],
            env=env, timeout=GENERATE_TIMEOUT, cwd=staging)
        assert (staging / "generated" / "index.js").is_file(), f"prisma generate wrote no client in {staging}"
        try:
            staging.rename(target)
        except OSError:  # another run generated the same client first
            if not (target / "generated" / "index.js").is_file():
                shutil.rmtree(target, ignore_errors=True)
                staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return modules, target / "generated"


@pytest.fixture
def prisma_database(postgres) -> str:
    """Database prisma_clients with fresh, empty tables of prisma/schema.sql, created directly (not through pgmux)."""
    ensure_database(postgres, DATABASE)
    with psycopg.connect(upstream_for(postgres, DATABASE), autocommit=True) as conn:
        conn.execute((PRISMA_DIR / "schema.sql").read_text())
    return DATABASE


def _prepared_counters(proxy) -> dict[str, int]:
    return proxy.call(lambda p: {
        "hits": sum(pool.stats.prepared.hits for pool in p.router.pools.values()),
        "misses": sum(pool.stats.prepared.misses for pool in p.router.pools.values()),
        "evictions": sum(pool.stats.prepared.evictions for pool in p.router.pools.values()),
    })


def _run_workload(modules: Path, client_dir: Path, proxy, database: str, *, named: bool,
                  timeout: float = 240, operations: int = OPERATIONS, url_query: dict[str, str] | None = None,
                  **extra_env: str) -> dict[str, Any]:
    node, _ = node_and_npm()
    env = client_env(NODE_PATH=str(modules), PRISMA_CLIENT_DIR=str(client_dir),
                     DATABASE_URL=proxy.dsn(APP.name, APP.password, database, **(url_query or {})),
                     CLIENTS="10", WORKERS="10", POOL_MAX="5", OPERATIONS=str(operations), **extra_env,
                     NAMED="1" if named else "0", RUN="named" if named else "unnamed",
                     SCENARIO_TIMEOUT_MS=str(int((timeout - 5) * 1000)), CHECKPOINT_DISABLE="1")
    result = run([node, JS_DIR / "prisma_workload.js"], env=env, timeout=timeout, cwd=JS_DIR)
    lines = result.stdout.strip().splitlines()
    assert lines, f"prisma_workload.js printed nothing; stderr:\n{result.stderr}"
    return json.loads(lines[-1])


@pytest.mark.parametrize("named", [False, True], ids=["adapter-defaults", "statementNameGenerator"])
def test_prisma_7_adapter_pg_2000_operations_from_10_clients_on_4_backends(
        pgmux, postgres, prisma_client_dir, prisma_database, named: bool) -> None:
    modules, client_dir = prisma_client_dir
    proxy = pgmux(upstream_url=upstream_for(postgres, prisma_database), default_pool_size=POOL_SIZE,
                  query_wait_timeout=60)
    sampler = BackendSampler(postgres, prisma_database, proxy)
    sampler.wait_until_no_backends()
    started = time.monotonic()
    with sampler.running():
        result = _run_workload(modules, client_dir, proxy, prisma_database, named=named)
    elapsed = time.monotonic() - started
    counters = _prepared_counters(proxy)
    report = json.dumps({"versions": installed_versions(modules, PACKAGE_NAMES), "elapsed_s": round(elapsed, 1),
                         "prepared": counters, **result}, indent=1)

    assert result["errorCount"] == 0, report
    assert result["operationsOk"] == OPERATIONS, report
    assert result["totals"] is not None
    totals = result["totals"]
    assert {key: totals[key] for key in ("users", "posts", "views")} == totals["expected"], report
    assert totals["users"] == 100, report
    if named:
        # Every query was a named statement: pgmux mapped them onto its shared server statements.
        assert result["statementNames"] > 0, report
        assert counters["hits"] > 0, report
    else:
        # The adapter's default is unnamed statements, which pgmux passes through untouched.
        assert result["statementNames"] == 0, report
        assert counters["hits"] == 0 and counters["misses"] == 0, report
    seen_by_postgres, held_by_pgmux = sampler.peak()
    assert seen_by_postgres <= POOL_SIZE, report
    assert held_by_pgmux <= POOL_SIZE, report


def test_prisma_7_with_sslmode_require_connects_over_verified_tls(
        pgmux, postgres, prisma_client_dir, prisma_database, tmp_path) -> None:
    tls = tls_files(tmp_path)
    modules, client_dir = prisma_client_dir
    # require: a plaintext connection would be refused, so every operation below went over TLS. node-postgres
    # verifies the certificate for sslmode=require; NODE_EXTRA_CA_CERTS makes the test CA one node trusts.
    proxy = pgmux(upstream_url=upstream_for(postgres, prisma_database), default_pool_size=POOL_SIZE,
                  query_wait_timeout=60, **tls.pgmux_settings())
    result = _run_workload(modules, client_dir, proxy, prisma_database, named=False, operations=200,
                           url_query={"sslmode": "require"}, NODE_EXTRA_CA_CERTS=str(tls.ca))
    assert result["errorCount"] == 0, result
    assert result["operationsOk"] == 200, result
    assert proxy.call(lambda p: p.registry.rejections.get("tls_required", 0)) == 0
