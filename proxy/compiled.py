"""Whether pgmux runs its compiled hot path or the Python source it was compiled from.

setup.py compiles the modules every transaction runs (mypyc, and the C frame walk) into extension
modules beside their sources, and records the sources' hashes in _compiled_sources.txt. Python
prefers an extension module to a .py, so a source edited after the build would silently lose to
stale compiled code. ``choose()`` runs once, before any of those modules is imported:

- the build is used when it exists and every recorded source still matches its hash;
- otherwise (PGMUX_PURE_PYTHON=1, a changed source, no record) every proxy module is imported
  from its .py and no compiled module loads. All or none: modules mypyc compiles together call
  each other inside one shared library, so a mix would hold two copies of each class.

This module itself is never compiled: it must run before the compiled ones can be chosen.
"""

from __future__ import annotations

import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

PURE_PYTHON_ENV = "PGMUX_PURE_PYTHON"
_PACKAGE_DIR = Path(__file__).resolve().parent
# Written by setup.py when it compiles, and only then.
MANIFEST = _PACKAGE_DIR / "_compiled_sources.txt"


@dataclass(frozen=True)
class Build:
    """What runs: ``compiled`` names the compiled modules in use (empty: all from source)."""

    compiled: tuple[str, ...]
    reason: str  # why: shown in the startup log and the benchmark report

    def describe(self) -> str:
        if self.compiled:
            return f"compiled hot path ({len(self.compiled)} modules: mypyc and C)"
        return f"pure Python ({self.reason})"


def _built_modules() -> dict[str, Path]:
    """Extension modules in the package, by module name."""
    found: dict[str, Path] = {}
    for path in _PACKAGE_DIR.rglob("*"):
        for suffix in importlib.machinery.EXTENSION_SUFFIXES:
            if path.name.endswith(suffix):
                relative = path.relative_to(_PACKAGE_DIR.parent).as_posix().removesuffix(suffix)
                found[relative.replace("/", ".")] = path
                break
    return found


def _changed_source() -> str | None:
    """The first recorded source whose content differs from what was compiled, or why none can be trusted."""
    if not MANIFEST.is_file():
        return "no record of the compiled sources"
    root = _PACKAGE_DIR.parent
    for line in MANIFEST.read_text().splitlines():
        digest, _, relative = line.partition("  ")
        source = root / relative
        # Sources that are not installed (the C file in a wheel) cannot have been edited in place.
        if source.is_file() and hashlib.sha256(source.read_bytes()).hexdigest() != digest:
            return relative
    return None


def choose() -> Build:
    built = _built_modules()
    if not built:
        return Build((), "no compiled modules: installed without a C compiler, or not installed")
    if os.environ.get(PURE_PYTHON_ENV, "") not in ("", "0"):
        return _use_source(built, f"{PURE_PYTHON_ENV} is set")
    changed = _changed_source()
    if changed is not None:
        return _use_source(built, f"{changed} changed since the build; reinstall to recompile")
    return Build(tuple(sorted(built)), "built and matching its sources")


def _use_source(built: dict[str, Path], reason: str) -> Build:
    sys.meta_path.insert(0, _SourceOnlyFinder(frozenset(built)))
    return Build((), reason)


class _SourceOnlyFinder(importlib.abc.MetaPathFinder):
    """Imports each compiled proxy module from its .py; one with no .py (the C scanner) is not imported."""

    def __init__(self, compiled: frozenset[str]) -> None:
        self._compiled = compiled

    def find_spec(self, fullname: str, path: Sequence[str] | None,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        if fullname not in self._compiled:
            return None
        source = _PACKAGE_DIR.parent.joinpath(*fullname.split(".")).with_suffix(".py")
        if not source.is_file():
            raise ModuleNotFoundError(f"{fullname} exists only compiled, and the pure-Python build is in use",
                                      name=fullname)
        return importlib.util.spec_from_file_location(fullname, source)
