"""The Neon serverless driver's HTTP mode (`neon()`) and drizzle-orm/neon-http through pgmux's `POST /sql`.

The packages are installed with npm once into a cache of their own beside the node-postgres one
(node_cache()'s parent / "neon-http"), and js/neon_http.js runs against a pgmux with a PostgreSQL listener and
an HTTP one, the driver pointed at it with `neonConfig.fetchEndpoint` only.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any
from urllib.parse import quote

import psycopg

from clientsupport import client_env, run
from npmcache import node_and_npm, node_cache, npm_install
from pgusers import APP, APP_DATABASE

JS_DIR = Path(__file__).resolve().parent / "js"
PACKAGES = ["@neondatabase/serverless@1", "drizzle-orm@0"]
PACKAGE_NAMES = ["@neondatabase/serverless", "drizzle-orm"]


def _neon_modules() -> Path:
    node_and_npm()
    return npm_install(node_cache().parent / "neon-http", PACKAGES, required=PACKAGE_NAMES)


HTTP_LISTENERS = [{"address": "127.0.0.1:0"},
                  {"address": "127.0.0.1:0", "protocol": "http", "allow_plaintext_http": True}]


def _run_scenario(proxy: Any, modules: Path, scenario: str = "workload") -> dict[str, Any]:
    http_port = proxy.port(1)
    url = f"postgresql://{APP.name}:{quote(APP.password, safe='')}@127.0.0.1:{http_port}/{APP_DATABASE}"
    env = client_env(NODE_PATH=str(modules), DATABASE_URL=url, SQL_ENDPOINT=f"http://127.0.0.1:{http_port}/sql",
                     SCENARIO_TIMEOUT_MS="60000", SCENARIO=scenario)
    result = run([shutil.which("node") or "node", JS_DIR / "neon_http.js"], env=env, timeout=90, cwd=JS_DIR)
    lines = result.stdout.strip().splitlines()
    assert lines, f"neon_http.js printed nothing; stderr:\n{result.stderr}"
    return json.loads(lines[-1])


def test_neon_http_driver_and_drizzle_run_their_workload_through_pgmux(pgmux) -> None:
    modules = _neon_modules()
    proxy = pgmux(listen=None, listeners=HTTP_LISTENERS, http_max_response_size="1MiB")
    result = _run_scenario(proxy, modules)
    assert result["types"] == {
        "i": 42, "n": "12345678901234567890.5", "t": "grüße ✓ 日本語", "ts": "2024-05-06T07:08:09.123Z",
        "j": {"a": [1, "x"]}, "jb": {"b": True}, "b": "deadbeef", "a": [1, 2, 3], "nothing": None,
        "ta": ["a b", 'q"uote'], "yes": True,
    }
    assert result["queried"] == 42
    assert result["fullResults"] == {"command": "SELECT", "rowCount": 1, "rowAsArray": True, "rows": [["hi", 2]],
                                     "fields": [["word", 25], ["two", 23]]}
    assert result["transaction"] == {"level": "serializable", "readOnly": "on"}
    assert result["writeInReadOnly"]["code"] == "25006"
    assert result["divisionByZero"]["code"] == "22012"
    assert result["divisionByZero"]["message"] == "division by zero"
    assert "507" in result["oversized"]["message"]  # the driver keeps no code for a status other than 400
    assert result["wrongPassword"]["code"] == "28P01"
    assert result["drizzle"] == {"selected": [{"id": 1, "name": "one"}, {"id": 2, "name": "TWO"}], "counted": 2,
                                 "batched": [{"id": 3, "name": "three"}]}
    assert proxy.call(lambda p: p.registry.http.by_status.get("200", 0)) >= 10


def test_a_pool_refusal_reaches_neon_as_53300(pgmux) -> None:
    modules = _neon_modules()
    proxy = pgmux(listen=None, listeners=HTTP_LISTENERS, default_pool_size=1, query_wait_timeout=0.3)
    with psycopg.connect(host=proxy.host, port=proxy.port(), user=APP.name, password=APP.password,
                         dbname=APP_DATABASE, connect_timeout=10) as holder:
        holder.execute("SELECT 1")  # a transaction is open (psycopg's default): the only backend is held
        refused = _run_scenario(proxy, modules, "refusal")["refused"]
    assert refused["code"] == "53300", refused
    assert "query_wait_timeout" in refused["message"], refused
