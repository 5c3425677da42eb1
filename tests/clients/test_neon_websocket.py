"""The Neon serverless driver (@neondatabase/serverless, WebSocket mode) and drizzle-orm/neon-serverless through
pgmux's HTTP listener, configured only with the driver's documented options (webSocketConstructor,
useSecureWebSocket, wsProxy). The packages are installed with npm once into a cache ($PGMUX_NEON_CACHE, default
~/.cache/pgmux-tests/neon) and reused; the scenarios are js/neon_websocket.js.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from clientsupport import BackendSampler, client_env, run, tls_files
from npmcache import node_and_npm, node_cache, npm_install
from pgusers import APP, APP_DATABASE

JS_DIR = Path(__file__).resolve().parent / "js"
PACKAGES = ["@neondatabase/serverless@1", "ws@8", "drizzle-orm@0"]
PACKAGE_NAMES = ["@neondatabase/serverless", "ws", "drizzle-orm"]
HTTP_LISTENER = {"address": "127.0.0.1:0", "protocol": "http"}


@pytest.fixture(scope="session")
def neon_modules() -> Path:
    node_and_npm()
    configured = os.environ.get("PGMUX_NEON_CACHE")
    cache = Path(configured).expanduser() if configured else node_cache().parent / "neon"
    return npm_install(cache, PACKAGES, required=PACKAGE_NAMES)


def _neon(modules: Path, port: int, scenario: str, timeout: float = 60, password: str | None = APP.password,
          **env: str) -> dict[str, Any]:
    environment = client_env(password, NODE_PATH=str(modules), PGUSER=APP.name, PGDATABASE=APP_DATABASE,
                             PGMUX_HTTP_PORT=str(port), SCENARIO=scenario,
                             SCENARIO_TIMEOUT_MS=str(int((timeout - 5) * 1000)), **env)
    result = run([shutil.which("node") or "node", JS_DIR / "neon_websocket.js"], env=environment, timeout=timeout,
                 cwd=JS_DIR)
    lines = result.stdout.strip().splitlines()
    assert lines, f"{scenario} printed nothing; stderr:\n{result.stderr}"
    return json.loads(lines[-1])


@pytest.mark.parametrize("pipeline", ["password", "false"])
@pytest.mark.parametrize("coalesce", ["true", "false"])
def test_neon_client_and_pool_over_websocket_with_and_without_pipelined_login(
        pgmux, neon_modules, pipeline: str, coalesce: str) -> None:
    proxy = pgmux(listeners=[HTTP_LISTENER])
    port = proxy.port(1)
    expected = {"n": 42, "t": "héllo", "sameTransaction": True}
    for ws_proxy in ("function", "string"):
        options = {"PIPELINE": pipeline, "COALESCE": coalesce, "WS_PROXY": ws_proxy}
        assert _neon(neon_modules, port, "client", **options) == expected
        assert _neon(neon_modules, port, "pool", **options) == {**expected, "poolQuery": 42}
    assert proxy.call(lambda p: p.registry.accepted["websocket"]) >= 4


def test_50_neon_clients_share_a_pool_of_3_backends(pgmux, postgres, neon_modules) -> None:
    proxy = pgmux(default_pool_size=3, listeners=[HTTP_LISTENER])
    sampler = BackendSampler(postgres, APP_DATABASE, proxy)
    sampler.wait_until_no_backends()
    with sampler.running():
        result = _neon(neon_modules, proxy.port(1), "concurrent", timeout=120, CLIENTS="50")
    assert result == {"clients": 50, "queriesOk": 250}
    seen_by_postgres, held_by_pgmux = sampler.peak()
    assert seen_by_postgres <= 3 and held_by_pgmux <= 3


@pytest.mark.parametrize("pipeline", ["password", "false"])
def test_a_wrong_password_surfaces_as_28P01(pgmux, neon_modules, pipeline: str) -> None:
    proxy = pgmux(listeners=[HTTP_LISTENER])
    result = _neon(neon_modules, proxy.port(1), "wrongPassword", PIPELINE=pipeline)
    assert result["code"] == "28P01", result
    assert proxy.call(lambda p: p.registry.auth_failures["wrong_password"]) == 1


def test_drizzle_orm_neon_serverless_runs_queries_and_transactions(pgmux, neon_modules) -> None:
    proxy = pgmux(listeners=[HTTP_LISTENER])
    assert _neon(neon_modules, proxy.port(1), "drizzle") == {"five": 5, "sameTransaction": True}
    accepted = proxy.call(lambda p: dict(p.registry.accepted))
    assert accepted["websocket"] >= 1 and "tcp" not in accepted


def test_neon_client_over_wss_with_pgmux_certificate(pgmux, neon_modules, tmp_path: Path) -> None:
    tls = tls_files(tmp_path)
    proxy = pgmux(listeners=[{**HTTP_LISTENER, **tls.pgmux_settings()}])
    result = _neon(neon_modules, proxy.port(1), "client", SECURE="true", NODE_EXTRA_CA_CERTS=str(tls.ca))
    assert result == {"n": 42, "t": "héllo", "sameTransaction": True}
