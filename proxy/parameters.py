"""Session parameters that follow a client from backend to backend: startup parsing and the SQL that syncs them."""

from __future__ import annotations

import re
from collections.abc import Collection

from proxy.protocol import errors

# Parameters the server reports with ParameterStatus and a client may set: pgmux tracks them per
# client. Other startup parameters are remembered as pgmux SET them on each backend.
SYNCED_PARAMETERS = frozenset({
    "client_encoding", "DateStyle", "IntervalStyle", "TimeZone", "standard_conforming_strings",
    "application_name", "search_path",
})
_PARAMETER_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*$")
_OPTION = re.compile(r"(?:-c\s*|--)([A-Za-z_][A-Za-z0-9_.-]*)=((?:\\.|[^\s\\])*)")


class StartupParameters:
    """What a StartupMessage asks for, sorted by how pgmux keeps it.

    A plain class, not a dataclass: compiled, its __init__ is native code; a dataclass's generated
    __init__ would be interpreted on every login.
    """

    def __init__(self) -> None:
        self.synced: dict[str, str] = {}
        self.unreported: dict[str, str] = {}
        self.unsupported_options: list[str] = []  # _pq_.* extensions, for NegotiateProtocolVersion

    def set(self, name: str, value: str) -> None:
        (self.synced if name in SYNCED_PARAMETERS else self.unreported)[name] = value


def parse_startup_parameters(parameters: dict[str, str], ignored: Collection[str]) -> StartupParameters:
    """Sort a client's startup parameters; raises the 08P01 PgError for one pgmux cannot honour."""
    parsed = StartupParameters()
    for name, value in parameters.items():
        if name in ("user", "database") or name in ignored:
            continue
        if name in SYNCED_PARAMETERS:  # the usual ones (application_name, client_encoding...), no regex needed
            parsed.synced[name] = value
        elif name.startswith("_pq_."):
            parsed.unsupported_options.append(name)
        elif name == "options":
            for option_name, option_value in _parse_options(value):
                parsed.set(option_name, option_value)
        elif name == "replication" or not _PARAMETER_NAME.match(name):
            raise errors.unsupported_startup_parameter(name)
        else:
            parsed.set(name, value)
    return parsed


def _parse_options(value: str) -> list[tuple[str, str]]:
    """``-c name=value`` / ``--name=value`` pairs, backslash escapes undone, as libpq sends them."""
    found = [(name.replace("-", "_"), re.sub(r"\\(.)", r"\1", raw)) for name, raw in _OPTION.findall(value)]
    if _OPTION.sub("", value).strip():
        raise errors.unsupported_startup_parameter("options")
    return found


def _quote_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def sync_sql(wanted: dict[str, str], wanted_unreported: dict[str, str],
             server_params: dict[str, str], server_unreported: dict[str, str]) -> str | None:
    """SQL that gives a backend the wanted parameters, or None when it has them already.

    The backend's dicts are updated now, not when the reply comes: the next client linked to it
    must compare against what this SQL will have done. set_config takes the value as a plain
    string, so list values such as search_path keep their meaning.
    """
    if wanted.items() <= server_params.items() and wanted_unreported == server_unreported:
        return None  # the common case, checked in C: the backend already has them all
    changes: list[tuple[str, str]] = []
    for name, value in wanted.items():
        if server_params.get(name) != value:
            changes.append((name, value))
            server_params[name] = value
    statements: list[str] = []
    for name in wanted_unreported.keys() | server_unreported.keys():
        wanted_value = wanted_unreported.get(name)
        if server_unreported.get(name) == wanted_value:
            continue
        if wanted_value is None:
            statements.append(f"RESET {name}")
            del server_unreported[name]
        else:
            changes.append((name, wanted_value))
            server_unreported[name] = wanted_value
    if changes:
        calls = ", ".join(f"pg_catalog.set_config({_quote_literal(name)}, {_quote_literal(value)}, false)"
                          for name, value in changes)
        statements.append(f"SELECT {calls}")
    return ";".join(statements) if statements else None
