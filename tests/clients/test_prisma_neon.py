"""Prisma 7 with @prisma/adapter-neon through pgmux's HTTP listener: PrismaNeon over WebSockets and PrismaNeonHttp
over POST /sql, configured only with the Neon driver's documented options (webSocketConstructor,
useSecureWebSocket, wsProxy; fetchEndpoint).

The client is the one test_prisma.py generates from prisma/schema.prisma (the prisma_client_dir fixture): a
generated client does not depend on its adapter. The adapter, the driver and ws are installed with npm once
into a cache of their own beside the others (node_cache()'s parent / "prisma7-neon"); the scenarios are
js/prisma_neon.js, on the same fresh tables (prisma/schema.sql) as test_prisma.py.

@prisma/adapter-neon 7 exports PrismaNeon and PrismaNeonHttp (no PrismaNeonHTTP). PrismaNeonHttp sends each
query as its own request and rejects every transaction itself ("Transactions are not supported in HTTP mode"),
batches and nested writes included, although the driver's sql.transaction() and pgmux's /sql batches support
them: that is the adapter's choice, so the HTTP test checks the refusal rather than a batch. Nor does it convert
the driver's errors (only its WebSocket queryable does), so over HTTP a unique violation reaches Prisma as code
"23505", not P2002: the SQLSTATE pgmux's error JSON carries, passed on as is.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from clientsupport import BackendSampler, client_env, run, upstream_for
from npmcache import installed_versions, node_and_npm, node_cache, npm_install
from pgusers import APP
from test_prisma import prisma_client_dir, prisma_database  # noqa: F401 (fixtures)

JS_DIR = Path(__file__).resolve().parent / "js"
PACKAGES = ["@prisma/adapter-neon@7", "@neondatabase/serverless@1", "ws@8"]
PACKAGE_NAMES = ["@prisma/adapter-neon", "@neondatabase/serverless", "ws"]
POOL_SIZE = 3
HTTP_LISTENER = {"address": "127.0.0.1:0", "protocol": "http", "allow_plaintext_http": True}
CLIENTS, WORKERS, ROUNDS = 4, 5, 3
# js/prisma_neon.js's raw query, as Prisma typed it (a bigint beyond 2**53 exact, Decimal as text, bytes as hex).
RAW_TYPES = {"i": 42, "big": "9007199254740993n", "n": "12345.678", "t": "grüße ✓ 日本語",
             "ts": "2024-05-06T07:08:09.123Z", "j": {"a": [1, "x"]}, "b": "deadbeef", "a": [1, 2, 3], "nothing": None,
             "yes": True, "role": "ADMIN"}


@pytest.fixture(scope="session")
def neon_adapter_modules() -> Path:
    node_and_npm()
    return npm_install(node_cache().parent / "prisma7-neon", PACKAGES, required=PACKAGE_NAMES)


def _run_prisma_neon(modules: Path, client_dir: Path, port: int, database: str, mode: str,
                     timeout: float = 180, **extra_env: str) -> dict[str, Any]:
    # The host is never dialled: wsProxy and fetchEndpoint name pgmux; user, password and database are used.
    url = f"postgresql://{APP.name}:{quote(APP.password, safe='')}@db.internal:5432/{database}"
    env = client_env(NODE_PATH=str(modules), PRISMA_CLIENT_DIR=str(client_dir), DATABASE_URL=url,
                     PGMUX_HTTP_PORT=str(port), MODE=mode, CLIENTS=str(CLIENTS), WORKERS=str(WORKERS),
                     POOL_MAX=str(POOL_SIZE), ROUNDS=str(ROUNDS), SCENARIO_TIMEOUT_MS=str(int((timeout - 5) * 1000)),
                     CHECKPOINT_DISABLE="1", **extra_env)
    result = run([shutil.which("node") or "node", JS_DIR / "prisma_neon.js"], env=env, timeout=timeout, cwd=JS_DIR)
    lines = result.stdout.strip().splitlines()
    assert lines, f"prisma_neon.js printed nothing; stderr:\n{result.stderr}"
    report: dict[str, Any] = json.loads(lines[-1])
    report["versions"] = installed_versions(modules, PACKAGE_NAMES)
    return report


def _assert_workload_exact(result: dict[str, Any], steps: dict[str, int]) -> None:
    report = json.dumps(result, indent=1)
    assert result["errorCount"] == 0, report
    assert result["tally"] == steps, report
    totals = result["totals"]
    assert {key: totals[key] for key in ("users", "posts", "views")} == totals["expected"], report
    assert totals["users"] == CLIENTS * WORKERS, report
    assert result["rawTypes"] == RAW_TYPES, report


def _sampled_run(pgmux, postgres, prisma_client_dir, prisma_database: str, modules: Path, transport: str):
    """The workload over ``transport`` on a pool of POOL_SIZE, sampling the backends PostgreSQL and pgmux hold."""
    _, client_dir = prisma_client_dir
    proxy = pgmux(upstream_url=upstream_for(postgres, prisma_database), default_pool_size=POOL_SIZE,
                  query_wait_timeout=60, listeners=[HTTP_LISTENER])
    sampler = BackendSampler(postgres, prisma_database, proxy)
    sampler.wait_until_no_backends()
    with sampler.running():
        result = _run_prisma_neon(modules, client_dir, proxy.port(1), prisma_database, transport)
    return proxy, sampler, result


def test_prisma_neon_over_websocket_with_interactive_transactions_on_a_pool_of_3(
        pgmux, postgres, prisma_client_dir, prisma_database, neon_adapter_modules) -> None:  # noqa: F811
    proxy, sampler, result = _sampled_run(pgmux, postgres, prisma_client_dir, prisma_database,
                                          neon_adapter_modules, "websocket")
    workers = CLIENTS * WORKERS
    per_round = {"createPost": 1, "findUserWithPosts": 1, "incrementViews": 1, "batchTransaction": 1,
                 "committedTransaction": 1, "rolledBackTransaction": 1}
    _assert_workload_exact(result, {"createUser": workers,
                                    **{kind: n * ROUNDS * workers for kind, n in per_round.items()}})
    # Batch and committed transactions added a post each round; rolled-back ones added nothing.
    assert result["totals"]["posts"] == 3 * ROUNDS * workers, result
    assert result["isolation"] == "serializable", result
    # The adapter maps the driver's error fields to Prisma's codes, with the columns or constraint named.
    assert result["constraintErrors"] == {
        "duplicateEmail": {"name": "PrismaClientKnownRequestError", "code": "P2002", "cause": {
            "originalCode": "23505", "kind": "UniqueConstraintViolation", "constraint": {"fields": ["email"]}}},
        "missingAuthor": {"name": "PrismaClientKnownRequestError", "code": "P2003", "cause": {
            "originalCode": "23503", "kind": "ForeignKeyConstraintViolation",
            "constraint": {"index": "Post_authorId_fkey"}}},
    }, result
    seen_by_postgres, held_by_pgmux = sampler.peak()
    assert seen_by_postgres <= POOL_SIZE and held_by_pgmux <= POOL_SIZE, (seen_by_postgres, held_by_pgmux)
    accepted = proxy.call(lambda p: dict(p.registry.accepted))
    assert accepted.get("websocket", 0) >= CLIENTS and "tcp" not in accepted, accepted


def test_prisma_neon_http_reads_and_writes_and_refuses_transactions_with_its_own_message(
        pgmux, postgres, prisma_client_dir, prisma_database, neon_adapter_modules) -> None:  # noqa: F811
    proxy, sampler, result = _sampled_run(pgmux, postgres, prisma_client_dir, prisma_database,
                                          neon_adapter_modules, "http")
    workers = CLIENTS * WORKERS
    per_round = {"createPost": 1, "findUserWithPosts": 1, "incrementViews": 1}
    _assert_workload_exact(result, {"createUser": workers,
                                    **{kind: n * ROUNDS * workers for kind, n in per_round.items()}})
    # Each query is its own request, so the adapter refuses every transaction before sending anything:
    # interactive, batch, and the one Prisma opens for a nested create. Nothing of them was written.
    refused = {"name": "Error", "message": "Transactions are not supported in HTTP mode"}
    assert result["transactions"] == {"interactive": refused, "batch": refused, "nested": refused, "written": 0}
    # PrismaNeonHttp passes the driver's error on unmapped (only its WebSocket queryable converts errors), so
    # Prisma reports PostgreSQL's SQLSTATE, which the driver read from pgmux's error JSON, as the code.
    assert result["constraintErrors"] == {
        "duplicateEmail": {"name": "PrismaClientKnownRequestError", "code": "23505", "cause": None},
        "missingAuthor": {"name": "PrismaClientKnownRequestError", "code": "23503", "cause": None},
    }, result
    seen_by_postgres, held_by_pgmux = sampler.peak()
    assert seen_by_postgres <= POOL_SIZE and held_by_pgmux <= POOL_SIZE, (seen_by_postgres, held_by_pgmux)
    assert proxy.call(lambda p: p.registry.http.by_status.get("200", 0)) >= workers * (1 + 3 * ROUNDS)
    assert proxy.call(lambda p: dict(p.registry.accepted)).get("websocket", 0) == 0


def test_a_full_pool_refusal_reaches_prisma_as_53300_over_both_transports(
        pgmux, postgres, prisma_client_dir, prisma_database, neon_adapter_modules) -> None:  # noqa: F811
    _, client_dir = prisma_client_dir
    proxy = pgmux(upstream_url=upstream_for(postgres, prisma_database), default_pool_size=1,
                  query_wait_timeout=0.3, listeners=[HTTP_LISTENER])
    result = _run_prisma_neon(neon_adapter_modules, client_dir, proxy.port(1), prisma_database, "websocket",
                              timeout=60, SCENARIO="refusal")
    # PrismaNeon maps it to Prisma's "too many connections"; PrismaNeonHttp passes the SQLSTATE on (see above).
    assert result["refused"] == {
        "websocket": {"name": "PrismaClientKnownRequestError", "code": "P2037",
                      "cause": {"originalCode": "53300", "kind": "TooManyConnections"}},
        "http": {"name": "PrismaClientKnownRequestError", "code": "53300", "cause": None},
    }, result
    # The transaction that held the backend was unaffected, and both clients query again once it is free.
    assert result["afterwards"] == {"holder": 0, "websocket": 0, "http": 0}, result
