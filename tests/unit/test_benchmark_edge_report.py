"""The benchmark's edge rows (issue 18): each path's p50/p99 against the TCP baselines, and why it was not measured."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from benchmarks.report import edge_table, markdown
from benchmarks.scenarios.edge import node_client
from benchmarks.targets import NO_HTTP_FRONT_END


def _mode(p50: float, p99: float) -> dict[str, Any]:
    return {"status": "ok", "requests": 100, "latency_ms": {"p50": p50, "p99": p99}, "pooler_cpu_us_per_request": 50.0}


def _results(pgmux: dict[str, Any]) -> dict[str, Any]:
    unavailable = {"status": "unavailable", "reason": NO_HTTP_FRONT_END}
    return {"scenarios": {"edge": {"title": "edge", "params": {"client": {"node": "v20"}},
                                   "results": {"direct": unavailable, "pgmux": pgmux, "pgbouncer": unavailable}}}}


def _measured() -> dict[str, Any]:
    return {"status": "ok", "modes": {"tcp_connect": _mode(4.0, 8.0), "http": _mode(2.0, 4.0),
                                      "ws_connect": _mode(3.0, 12.0), "tcp_query": _mode(0.25, 0.5),
                                      "ws_query": _mode(0.5, 2.0)}}


@pytest.fixture
def fresh_node_client() -> Iterator[None]:
    node_client.cache_clear()
    yield
    node_client.cache_clear()


def test_edge_rows_divide_each_path_by_the_tcp_connect_and_the_open_connection_baselines() -> None:
    rows = {row["mode"]: row for row in edge_table(_results(_measured()))}

    assert (rows["http"]["p50_ms"], rows["http"]["p50/tcp_connect"], rows["http"]["p99/tcp_connect"]) == (2.0, 0.5, 0.5)
    assert (rows["ws_query"]["p50/tcp_query"], rows["ws_query"]["p99/tcp_query"]) == (2.0, 4.0)
    assert rows["ws_connect"]["p99/tcp_connect"] == 1.5
    assert list(rows) == ["tcp_connect", "http", "ws_connect", "tcp_query", "ws_query"]


def test_edge_section_of_the_report_has_a_row_per_path_with_its_ratios() -> None:
    results = _results(_measured())
    results["edge"] = edge_table(results)

    text = markdown(results, None)

    assert "## Edge runtimes (issue 18; pgmux only)" in text
    assert "| HTTP: POST /sql, SELECT 1 (neon()) | 2.00 | 4.00 | 0.50× | 0.50× | 8.00× | 8.00× |" in text


def test_edge_section_says_why_pgmux_was_not_measured() -> None:
    results = _results({"status": "unavailable", "reason": "no node on PATH: ..."})
    results["edge"] = edge_table(results)

    assert results["edge"] == []
    assert "Not measured: no node on PATH" in markdown(results, None)


def test_without_node_the_edge_scenario_is_unavailable_with_the_reason(
        fresh_node_client: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))

    client, reason = node_client()

    assert client is None and reason is not None and reason.startswith("no node on PATH")


def test_without_the_npm_packages_the_reason_names_them_and_where_they_were_looked_for(
        fresh_node_client: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake_node = tmp_path / "bin" / "node"
    fake_node.parent.mkdir()
    fake_node.write_text("#!/bin/sh\necho v0.0.0\n")
    fake_node.chmod(0o755)
    monkeypatch.setenv("PATH", str(fake_node.parent))
    monkeypatch.setenv("PGMUX_NODE_CACHE", str(tmp_path / "node"))
    monkeypatch.setenv("PGMUX_NEON_CACHE", str(tmp_path / "neon"))

    client, reason = node_client()

    assert client is None and reason is not None
    assert f"@neondatabase/serverless in {tmp_path / 'neon' / 'node_modules'}" in reason
    assert f"pg in {tmp_path / 'node' / 'node_modules'}" in reason
