"""The compiled hot path; everything else about the package is declared in pyproject.toml.

pgmux's hot modules are compiled into extension modules that sit beside their sources, and Python
imports an extension module in preference to the .py. Both kinds are optional: without a C compiler
the install warns and pgmux runs the very same code from source (proxy/compiled.py decides, and
PGMUX_PURE_PYTHON=1 forces it; CI runs tests both ways).

- proxy.protocol._scanner: hand-written C, the frame walk inside FrameScanner.feed and the
  word tests on each simple Query and Parse (proxy/protocol/_words.h).
- proxy._relay: hand-written C, the socket transport whose steady state relays whole messages from
  socket to socket without a Python object (proxy/sockets.py uses it; asyncio's transports without it).
- HOT_MODULES: the relay, pool and protocol code every transaction and every login runs, compiled
  from their type-annotated Python by mypyc. Measured with the benchmarks: roughly a third less
  pooler CPU per transaction than the same code interpreted.
"""

from __future__ import annotations

import hashlib
import shlex
import shutil
import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, setup

HOT_MODULES = [
    "proxy/client.py",
    "proxy/server.py",
    "proxy/pool.py",
    "proxy/prepared.py",
    "proxy/parameters.py",
    "proxy/stats.py",
    "proxy/states.py",
    "proxy/flow.py",
    "proxy/protocol/framing.py",
    "proxy/protocol/messages.py",
    "proxy/protocol/startup.py",
    "proxy/app.py",
    "proxy/admission.py",
    "proxy/failed_logins.py",
    "proxy/log_levels.py",
    "proxy/registry.py",
    "proxy/cancel.py",
    "proxy/routing.py",
    "proxy/auth/client_auth.py",
    "proxy/login.py",
    "proxy/reception.py",
    "proxy/sockets.py",
]
SCANNER_SOURCE = "proxy/protocol/_scanner.c"
RELAY_SOURCE = "proxy/_relay.c"
WORDS_HEADER = "proxy/protocol/_words.h"  # included by both C sources
# What was compiled, by content: proxy/compiled.py refuses a build whose sources have changed since.
MANIFEST = Path("proxy/_compiled_sources.txt")
# The setuptools commands that produce an installable build (pip runs editable_wheel or bdist_wheel).
_BUILDING = {"build", "build_ext", "bdist_wheel", "editable_wheel", "develop", "install"}


def _have_c_compiler() -> bool:
    compiler = shlex.split(sysconfig.get_config_var("CC") or "cc")
    return bool(compiler) and shutil.which(compiler[0]) is not None


def _record_sources(paths: list[str]) -> None:
    lines = [f"{hashlib.sha256(Path(path).read_bytes()).hexdigest()}  {path}" for path in paths]
    MANIFEST.write_text("\n".join(lines) + "\n")


def compiled_extensions() -> list[Extension]:
    if not _BUILDING.intersection(sys.argv[1:]):
        return []  # metadata steps (egg_info, dist_info) run this file too: no need to type-check and compile
    if not _have_c_compiler():
        print("pgmux: no C compiler found: installing without the compiled hot path (pure Python)",
              file=sys.stderr)
        MANIFEST.unlink(missing_ok=True)
        return []
    from mypyc.build import mypycify

    # mypycify type-checks the modules first: a type error fails the build rather than quietly
    # shipping the slow path. optional=True: a failing C compiler leaves the pure-Python install.
    extensions = [Extension("proxy.protocol._scanner", [SCANNER_SOURCE], depends=[WORDS_HEADER]),
                  Extension("proxy._relay", [RELAY_SOURCE], depends=[WORDS_HEADER])]
    extensions += mypycify(HOT_MODULES, opt_level="3", group_name="pgmux_hot")
    for extension in extensions:
        extension.optional = True
    _record_sources([*HOT_MODULES, SCANNER_SOURCE, RELAY_SOURCE, WORDS_HEADER])
    return extensions


setup(ext_modules=compiled_extensions())
