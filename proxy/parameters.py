"""Session parameters that follow a client from backend to backend: startup parsing and the SQL that syncs them."""

from __future__ import annotations

import re
from collections.abc import Collection, Container, Iterable
from typing import Final

from proxy.protocol import errors

# Parameters the server reports with ParameterStatus and a client may set: pgmux tracks them per
# client. Other startup parameters are remembered as pgmux SET them on each backend.
SYNCED_PARAMETERS: Final = frozenset({
    "client_encoding", "DateStyle", "IntervalStyle", "TimeZone", "standard_conforming_strings",
    "application_name", "search_path",
})
# What pgmux records for a setting it SET on a backend when a RESET/DISCARD may have undone it: no startup
# value can contain a NUL, so it never matches what a client wants and the next sync sets or resets it.
UNKNOWN_VALUE: Final = "\x00"
# Settings re-applied last, in this order: a new session authorization resets the role, and a role may lack
# the right to change superuser-only settings set before it.
IDENTITY_SETTINGS: Final = ("session_authorization", "role")
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


def _set_config_calls(settings: Iterable[tuple[str, str]], is_local: bool) -> str:
    local = "true" if is_local else "false"
    return ", ".join(f"pg_catalog.set_config({_quote_literal(name)}, {_quote_literal(value)}, {local})"
                     for name, value in settings)


def set_search_path_sql(value: str, is_local: bool) -> str:
    """A query that sets search_path to ``value`` (for this transaction only when ``is_local``)."""
    return f"SELECT {_set_config_calls([('search_path', value)], is_local)}"


class ParameterSets:
    """Equal parameter dicts kept once: nearly every client of a pool holds the same few (the server's
    defaults with the same startup values), and ten thousand idle clients need not hold ten thousand copies.

    A dict given out here is shared by every client that holds it: they replace it, never change it in place.
    """

    __slots__ = ("_known", "_recent")

    def __init__(self) -> None:
        self._known: dict[frozenset[tuple[str, str]], dict[str, str]] = {}
        # The last few given out, latest first: a login asks for several kinds in turn (its parameters, its
        # startup values, its unreported ones), and the next login asks for the same again.
        self._recent: list[dict[str, str]] = []

    def shared(self, parameters: dict[str, str]) -> dict[str, str]:
        """A dict equal to ``parameters`` (it, when none is kept yet), to hold from now on instead of it."""
        for kept in self._recent:
            if parameters == kept:  # the usual case: dict comparisons in C, no key built
                return kept
        key = frozenset(parameters.items())
        known = self._known.get(key)
        if known is None:
            if len(self._known) >= _SETS_KEPT:
                self._known.clear()  # logins with ever new values (an application_name per process...)
            known = self._known[key] = parameters
        self._recent.insert(0, known)
        del self._recent[_RECENT_KEPT:]
        return known


_SETS_KEPT: Final = 32
_RECENT_KEPT: Final = 4


class ParameterSync:
    """SQL that gives a backend a client's parameters, and what the backend holds once PostgreSQL confirms it.

    Nothing is recorded on the backend when the SQL is built: its ``params``/``unreported`` change only
    when the sync's ReadyForQuery comes back without an error (ServerConnection settles it).
    """

    __slots__ = ("sql", "params", "unreported")

    def __init__(self, sql: str, params: dict[str, str], unreported: dict[str, str] | None) -> None:
        self.sql = sql
        self.params = params  # reported parameters the sync sets, merged into the backend's on success
        self.unreported = unreported  # the backend's unreported parameters on success; None: unchanged


def _identity_last(name: str) -> tuple[int, str]:
    return (IDENTITY_SETTINGS.index(name) + 1 if name in IDENTITY_SETTINGS else 0, name)


def parameter_sync(wanted: dict[str, str], wanted_unreported: dict[str, str],
                   server_params: dict[str, str], server_unreported: dict[str, str],
                   in_transaction: bool) -> ParameterSync | None:
    """What gives a backend the wanted parameters, or None when it has them already.

    Outside a transaction the statements are wrapped in BEGIN ... COMMIT: a failure then leaves the
    backend in an aborted transaction block, so the client request pgmux sends right behind the sync
    (same round trip) is refused by PostgreSQL (25P02) instead of running with the wrong parameters.
    All statements of one Query share one transaction, so a sync applies entirely or not at all.
    set_config takes the value as a plain string, so list values such as search_path keep their meaning.
    """
    if wanted.items() <= server_params.items() and wanted_unreported == server_unreported:
        return None  # the common case, checked in C: the backend already has them all
    params = {name: value for name, value in wanted.items() if server_params.get(name) != value}
    changes = list(params.items())
    statements: list[str] = []
    identity: list[tuple[str, str]] = []
    for name in sorted(wanted_unreported.keys() | server_unreported.keys(), key=_identity_last):
        wanted_value = wanted_unreported.get(name)
        if server_unreported.get(name) == wanted_value:
            continue
        if name in IDENTITY_SETTINGS and name in server_unreported:
            # The backend's role goes first: the settings below are then set as the backend's own user,
            # and the client's role (or session authorization) last, as the client set them.
            statements.insert(0, f"RESET {name}")
        if wanted_value is None:
            if name not in IDENTITY_SETTINGS:
                statements.append(f"RESET {name}")
        elif name in IDENTITY_SETTINGS:
            identity.append((name, wanted_value))
        else:
            changes.append((name, wanted_value))
    changes.extend(identity)
    if changes:
        statements.append(f"SELECT {_set_config_calls(changes, is_local=False)}")
    if not statements:
        return None
    if not in_transaction:
        statements = ["BEGIN", *statements, "COMMIT"]
    unreported = None if wanted_unreported == server_unreported else dict(wanted_unreported)
    return ParameterSync(";".join(statements), params, unreported)


# Parameters PostgreSQL accepts with any value (application_name is only cleaned of non-ASCII):
# checking them would cost a login a round trip for nothing, and their values vary per connection.
_ANY_VALUE_ACCEPTED: Final = frozenset({"application_name"})


def settings_to_check(startup_synced: dict[str, str], unreported: dict[str, str],
                      server_defaults: dict[str, str], accepted: Container[tuple[str, str]]) -> dict[str, str]:
    """The startup settings PostgreSQL has yet to accept for this pool (server defaults need no check)."""
    # Loops, not a comprehension and update(generator): every login asks, and compiled, these are native.
    unchecked: dict[str, str] = {}
    for name, value in startup_synced.items():
        if server_defaults.get(name) != value and name not in _ANY_VALUE_ACCEPTED and (name, value) not in accepted:
            unchecked[name] = value
    for name, value in unreported.items():
        if (name, value) not in accepted:
            unchecked[name] = value
    return unchecked


def check_sql(settings: dict[str, str], reported: Collection[str]) -> str:
    """One statement that fails with PostgreSQL's own error for the first setting it refuses, and changes
    nothing pgmux does not see.

    set_config(..., true) lasts until the end of the statement's own implicit transaction. Settings the
    server ``reported`` at login are set for the session instead: PostgreSQL then reports each with
    ParameterStatus as it spells it (``euc-jp`` becomes ``EUC_JP``), which pgmux records for that backend.
    """
    local = [(name, value) for name, value in settings.items() if name not in reported]
    session = [(name, value) for name, value in settings.items() if name in reported]
    calls = [_set_config_calls(chosen, is_local) for chosen, is_local in ((local, True), (session, False)) if chosen]
    return f"SELECT {', '.join(calls)}"
