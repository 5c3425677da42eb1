"""The import layering of proxy/, read from the sources with ast: sans-IO cores, one composition root, no cycles.

Every import counts, wherever it is written: at module level, under ``if TYPE_CHECKING`` (mypy and
mypyc compile against those) and inside functions (they run the first time the function does).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "proxy"

# Modules that must run without an event loop or a socket: fed bytes, they return bytes and events.
SANS_IO = ("proxy.protocol", "proxy.auth", "proxy.login", "proxy.fanout")
IO_MODULES = frozenset({"asyncio", "socket", "ssl", "uvloop", "selectors"})
# The composition root and the only modules allowed to build it (tests and benchmarks aside).
ROOT = "proxy.app"
ROOT_USERS = frozenset({"proxy.cli", "proxy.demo"})


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES.get(name, Path()).name == "__init__.py"


def _imports(name: str) -> Iterator[str]:
    """Every module ``name`` imports, as written (``from package import module`` names the module)."""
    tree = ast.parse(MODULES[name].read_text(), filename=str(MODULES[name]))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolved against this module's package
                base = name if _is_package(name) else name.rpartition(".")[0]
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                source = f"{base}.{node.module}" if node.module else base
            else:
                assert node.module is not None
                source = node.module
            yield source
            for alias in node.names:
                if f"{source}.{alias.name}" in MODULES:
                    yield f"{source}.{alias.name}"


def _proxy_imports(name: str) -> set[str]:
    """The proxy modules ``name`` imports itself (a compiled-only module, with no source, is left out)."""
    return {imported for imported in _imports(name) if imported in MODULES and imported != name}


GRAPH = {name: _proxy_imports(name) for name in MODULES}


def _loaded_by(name: str) -> set[str]:
    """Every proxy module that importing ``name`` runs: what it imports, their packages, and so on."""
    seen: set[str] = set()
    todo = [name]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        todo.extend(GRAPH[current])
        package = current.rpartition(".")[0]
        if package:
            todo.append(package)  # importing a submodule runs its package's __init__ first
    return seen


def _sans_io_modules() -> list[str]:
    return [name for name in MODULES if any(name == core or name.startswith(f"{core}.") for core in SANS_IO)]


def test_the_import_graph_is_read_from_the_sources() -> None:
    # Guards the tests below against passing vacuously on a parser that finds nothing.
    assert "proxy.server" in GRAPH["proxy.client"]
    assert "proxy.protocol.messages" in GRAPH["proxy.protocol.errors"]
    assert "proxy.protocol.messages" in GRAPH["proxy.auth.server_auth"]  # "from proxy.protocol import messages"
    assert {"proxy.protocol.framing", "proxy.auth.client_auth"} <= set(_sans_io_modules())


@pytest.mark.parametrize("name", _sans_io_modules())
def test_sans_io_modules_import_no_event_loop_and_no_socket(name: str) -> None:
    offenders = {}
    for module in sorted(_loaded_by(name)):
        io = sorted({imported.partition(".")[0] for imported in _imports(module)} & IO_MODULES)
        if io:
            offenders[module] = io
    assert not offenders, f"{name} must run without IO, but importing it loads {offenders}"


def test_only_the_cli_and_the_demo_import_the_composition_root() -> None:
    importers = sorted(name for name, imported in GRAPH.items() if ROOT in imported)
    assert set(importers) <= ROOT_USERS, f"{ROOT} is imported by {importers}; only {sorted(ROOT_USERS)} may"


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle in ``graph`` (module -> the modules it imports), as the modules around it, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(name: str) -> list[str] | None:
        state[name] = 1
        path.append(name)
        for imported in sorted(graph[name]):
            if state.get(imported) == 1:
                return path[path.index(imported):] + [imported]
            if imported not in state:
                found = visit(imported)
                if found is not None:
                    return found
        path.pop()
        state[name] = 2
        return None

    for name in sorted(graph):
        if name not in state:
            found = visit(name)
            if found is not None:
                return found
    return None


def test_no_import_cycle_among_proxy_modules() -> None:
    cycle = _cycle(GRAPH)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_cycle_check_finds_a_cycle_however_long() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": {"b"}}) == ["b", "b"]
