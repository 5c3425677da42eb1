"""npm packages for the node client tests, installed once into cache directories and reused by later runs.

The node-postgres cache ($PGMUX_NODE_CACHE, default ~/.cache/pgmux-tests/node) holds `pg@8` and is the
same one test_node_postgres.py uses. Prisma gets a cache of its own beside it ($PGMUX_PRISMA_CACHE,
default ~/.cache/pgmux-tests/prisma7) because it brings its own `pg` and many other packages.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import pytest

from clientsupport import run

NPM_TIMEOUT = 300.0


def node_cache() -> Path:
    configured = os.environ.get("PGMUX_NODE_CACHE")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "pgmux-tests" / "node"


def prisma_cache() -> Path:
    configured = os.environ.get("PGMUX_PRISMA_CACHE")
    return Path(configured).expanduser() if configured else node_cache().parent / "prisma7"


def node_and_npm() -> tuple[str, str]:
    """The node and npm executables; skips the test (with the reason) when either is not installed."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip(f"node client tests need node and npm on PATH (node: {node}, npm: {npm})")
    return node, npm


def npm_install(cache: Path, packages: Sequence[str], required: Sequence[str]) -> Path:
    """``cache``/node_modules holding ``packages`` (npm specs), installed unless every ``required`` package is there.

    npm install runs in a staging directory beside the cache, renamed into place when complete, so an
    interrupted or concurrent run never leaves or sees half a tree. Install scripts are not run: nothing
    here needs them, and the only network there may be is the npm registry.
    """
    _, npm = node_and_npm()
    modules = cache / "node_modules"

    def complete() -> bool:
        return all((modules / name / "package.json").is_file() for name in required)

    if complete():
        return modules
    cache.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f"{cache.name}-install-", dir=cache.parent))
    try:
        env = {**os.environ, "npm_config_update_notifier": "false", "npm_config_fund": "false",
               "npm_config_audit": "false"}
        run([npm, "install", "--no-audit", "--no-fund", "--no-save", "--ignore-scripts", "--prefix", staging,
             *packages], env=env, timeout=NPM_TIMEOUT, cwd=staging)
        try:
            staging.rename(cache)
        except OSError:  # someone else finished first, or a broken cache exists: replace only a broken one
            if not complete():
                shutil.rmtree(cache, ignore_errors=True)
                staging.rename(cache)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    missing = [name for name in required if not (modules / name / "package.json").is_file()]
    assert not missing, f"npm install {' '.join(packages)} left no {', '.join(missing)} in {modules}"
    return modules


def installed_versions(modules: Path, names: Sequence[str]) -> dict[str, str]:
    """The version of each package in ``modules``, from its package.json."""
    return {name: json.loads((modules / name / "package.json").read_text())["version"] for name in names}
