"""The compiled hot path (setup.py, proxy/compiled.py) and the pure-Python build it falls back to.

The rest of the suite runs whichever build is installed (compiled, where a C compiler exists);
these tests prove the compiled modules really are the ones running, that the choice falls back to
source as a whole when a source changed, and that the pure-Python build passes the relay tests.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import proxy
from proxy.compiled import MANIFEST, PURE_PYTHON_ENV

ROOT = Path(__file__).resolve().parents[2]
PURE_RUN = os.environ.get(PURE_PYTHON_ENV, "") not in ("", "0")


def _hot_modules() -> list[str]:
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "HOT_MODULES":
            paths: list[str] = ast.literal_eval(node.value)
            return [path.removesuffix(".py").replace("/", ".") for path in paths]
    raise AssertionError("setup.py has no HOT_MODULES")


def _python(code: str, cwd: Path, **env: str) -> str:
    result = subprocess.run([sys.executable, "-c", code], cwd=cwd, env={**os.environ, **env},
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


# setup.py records what it compiled, and removes the record when it finds no C compiler.
needs_build = pytest.mark.skipif(not MANIFEST.is_file(), reason="setup.py compiled nothing here (no C compiler)")


@pytest.mark.skipif(PURE_RUN, reason=f"{PURE_PYTHON_ENV} is set: this run tests the pure-Python build")
@needs_build
def test_every_hot_module_runs_compiled_where_a_compiler_exists() -> None:
    # Without this a failed or stale build would leave the suite and the benchmarks quietly
    # measuring the interpreted path.
    assert proxy.BUILD.compiled, proxy.BUILD.reason
    assert set(_hot_modules()) <= set(proxy.BUILD.compiled)
    for name in _hot_modules():
        module = sys.modules.get(name) or __import__(name, fromlist=["_"])
        assert not module.__file__.endswith(".py"), f"{name} was imported from {module.__file__}"


@needs_build
def test_pure_python_mode_imports_every_proxy_module_from_source() -> None:
    report = _python(
        "import sys, proxy, proxy.app, proxy.protocol.framing as framing\n"
        "compiled = sorted(n for n, m in sys.modules.items() if n.startswith(('proxy', 'pgmux_hot'))"
        " and not (getattr(m, '__file__', None) or '.py').endswith('.py'))\n"
        "print(proxy.BUILD.describe(), '|', compiled, '|', sorted(framing.WALKS))",
        ROOT, **{PURE_PYTHON_ENV: "1"})
    assert report == f"pure Python ({PURE_PYTHON_ENV} is set) | [] | ['python']"


@needs_build
@pytest.mark.skipif(PURE_RUN, reason=f"{PURE_PYTHON_ENV} is set")
def test_a_source_edited_after_the_build_switches_every_module_to_source(tmp_path: Path) -> None:
    # A copy of the built package: the shared library mypyc builds stays importable from the
    # install, so the untouched copy runs compiled like the original.
    shutil.copytree(ROOT / "proxy", tmp_path / "proxy", ignore=shutil.ignore_patterns("__pycache__"))
    probe = "import proxy, proxy.pool as pool; print(proxy.BUILD.describe(), pool.__file__.endswith('.py'))"
    assert _python(probe, tmp_path).endswith(" False")

    with (tmp_path / "proxy" / "pool.py").open("a") as source:
        source.write("\n# edited after the build\n")
    assert _python(probe, tmp_path) == (
        "pure Python (proxy/pool.py changed since the build; reinstall to recompile) True")


@pytest.mark.slow
@pytest.mark.timeout(900)
@needs_build
@pytest.mark.skipif(PURE_RUN, reason="already the pure-Python run")
def test_the_pure_python_build_passes_the_relay_and_protocol_tests() -> None:
    # The fallback must stay correct, not just importable: the protocol, pooling, prepared-statement
    # and bad-input tests again, against a real PostgreSQL, with nothing compiled loaded.
    suites = ["tests/unit", "tests/integration/test_pooling.py", "tests/integration/test_prepared.py",
              "tests/integration/test_bad_input.py", "tests/integration/test_protocol_features.py",
              "tests/integration/test_faults.py", "tests/integration/test_compiled_build.py"]
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *suites],
                            cwd=ROOT, env={**os.environ, PURE_PYTHON_ENV: "1"},
                            capture_output=True, text=True, timeout=840)
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else result.stderr[-2000:]
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert " passed" in summary and "failed" not in summary, summary
