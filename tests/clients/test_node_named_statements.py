"""node-postgres named queries ({name, text, values}) through pgmux in transaction mode, at pg's defaults.

pg prepares a named query once per connection and afterwards sends only Bind/Execute with the name, so
behind pgmux the name reaches backends that never saw its Parse: pgmux must prepare it there first.
The scenario is js/named_statements.js; `pg@8` comes from the shared node cache (see npmcache.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from clientsupport import BackendSampler, client_env, run
from npmcache import node_and_npm, node_cache, npm_install
from pgusers import APP, APP_DATABASE

JS_DIR = Path(__file__).resolve().parent / "js"
POOL_SIZE = 4


@pytest.fixture(scope="session")
def pg_modules() -> Path:
    return npm_install(node_cache(), ["pg@8"], required=["pg"])


def _run_scenario(modules: Path, proxy, script: str, timeout: float, **env: str) -> dict[str, Any]:
    node, _ = node_and_npm()
    environment = client_env(APP.password, NODE_PATH=str(modules), PGHOST=proxy.host, PGPORT=str(proxy.port()),
                             PGUSER=APP.name, PGDATABASE=APP_DATABASE,
                             SCENARIO_TIMEOUT_MS=str(int((timeout - 5) * 1000)), **env)
    result = run([node, JS_DIR / script], env=environment, timeout=timeout, cwd=JS_DIR)
    lines = result.stdout.strip().splitlines()
    assert lines, f"{script} printed nothing; stderr:\n{result.stderr}"
    return json.loads(lines[-1])


def _prepared_counters(proxy) -> dict[str, int]:
    return proxy.call(lambda p: {
        "hits": sum(pool.stats.prepared.hits for pool in p.router.pools.values()),
        "misses": sum(pool.stats.prepared.misses for pool in p.router.pools.values()),
        "evictions": sum(pool.stats.prepared.evictions for pool in p.router.pools.values()),
    })


@pytest.mark.parametrize("max_prepared_statements", [None, 8], ids=["default-lru", "lru-of-8"])
def test_node_postgres_named_queries_from_50_clients_and_in_transactions_on_4_backends(
        pgmux, postgres, pg_modules, max_prepared_statements: int | None) -> None:
    # With an LRU of 8 per backend the 20 shared and 100 per-client statements keep evicting each other,
    # so pgmux must prepare again, on the backend at hand, statements a client prepared long ago.
    settings = {} if max_prepared_statements is None else {"max_prepared_statements": max_prepared_statements}
    proxy = pgmux(default_pool_size=POOL_SIZE, query_wait_timeout=60, **settings)
    sampler = BackendSampler(postgres, APP_DATABASE, proxy)
    sampler.wait_until_no_backends()
    with sampler.running():
        result = _run_scenario(pg_modules, proxy, "named_statements.js", timeout=120,
                               CLIENTS="50", STATEMENTS="20", ROUNDS="5", POOL_QUERIES="1000")
    counters = _prepared_counters(proxy)

    assert result["errors"] == [] and result["errorCount"] == 0, json.dumps(result, indent=1)
    assert result["clientQueriesOk"] == 50 * 20 * 5
    assert result["poolQueriesOk"] == 1000
    assert result["transactions"] == {
        "insideBeforeCommit": 10,
        "oneBackendInTx": True,
        "afterCommit": 10,
        "insideBeforeRollback": 5,
        "afterRollback": 0,
        "divideInTx": 2,
        "divideByZero": "22012",
        "abortedTx": "25P02",
        "divideAfterRollback": 5,
        "badParse": "42601",
        "fixedAfterBadParse": 2,
        "loopTransactionsOk": 20,
    }
    # 50 clients x 20 statements, prepared once per connection by pg, on only 4 backends: most Binds name
    # a statement the backend already holds (hits); each client's own statements, prepared on one backend,
    # are bound later on others, where pgmux injects the Parse (misses).
    assert counters["hits"] > 0, counters
    assert counters["misses"] > 0, counters
    if max_prepared_statements is not None:
        assert counters["evictions"] > 0, counters
    seen_by_postgres, held_by_pgmux = sampler.peak()
    assert seen_by_postgres <= POOL_SIZE
    assert held_by_pgmux <= POOL_SIZE
