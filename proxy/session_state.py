"""What a session holds beyond its transaction, read from PostgreSQL itself: settings and session-only state.

After a transaction in which a client ran something that may change its session (sql_words.session_effects
says where to look), pgmux asks the backend what the session now holds, in one query (inspection_sql),
before anyone else may use it. The answer (read_report) is exact where a word-level guess cannot be:
SETs inside functions, transactions rolled back, RESET ALL, a SET of the value a setting already had.

Settings follow their client to the next backend (parameters.parameter_sync); session-only state (temporary
tables, advisory locks, LISTEN, WITH HOLD cursors, SQL-level prepared statements, LOAD) cannot move, so it
keeps the client on its backend, or is refused (the session_state setting: pin, refuse, ignore).
"""

from __future__ import annotations

import struct
from collections.abc import Collection, Iterable
from typing import Final

from proxy.parameters import IDENTITY_SETTINGS
from proxy.protocol import sql_words


# Session-only state, each with the check that finds it in the current session (true when present).
_PIN_CHECKS: Final = (
    (sql_words.TEMP, "EXISTS (SELECT FROM pg_catalog.pg_class WHERE relnamespace = pg_catalog.pg_my_temp_schema())"),
    (sql_words.ADVISORY_LOCK, "EXISTS (SELECT FROM pg_catalog.pg_locks WHERE locktype = 'advisory'"
                              " AND pid = pg_catalog.pg_backend_pid())"),
    (sql_words.LISTEN, "EXISTS (SELECT FROM pg_catalog.pg_listening_channels())"),
    (sql_words.CURSOR, "EXISTS (SELECT FROM pg_catalog.pg_cursors WHERE is_holdable)"),
    (sql_words.PREPARED_STATEMENT, "EXISTS (SELECT FROM pg_catalog.pg_prepared_statements WHERE from_sql)"),
)
# The kinds that cannot move between backends and so pin a client. A LOADed library cannot be asked about:
# the client that ran LOAD is pinned from then on, and its backend closed when it leaves.
PIN_KINDS: Final = (*(kind for kind, _ in _PIN_CHECKS), sql_words.LOAD)
# What a refused statement is called in its error (session_state = refuse).
_REFUSED_NAMES: Final = {
    sql_words.TEMP: "temporary objects",
    sql_words.ADVISORY_LOCK: "session advisory locks (pg_advisory_xact_lock ends with the transaction and is allowed)",
    sql_words.LISTEN: "LISTEN",
    sql_words.CURSOR: "WITH HOLD cursors",
    sql_words.PREPARED_STATEMENT: "SQL-level PREPARE (protocol-level prepared statements are allowed)",
    sql_words.LOAD: "LOAD",
}
_SETTING: Final = "s"
_PIN: Final = "p"
_INT16 = struct.Struct("!h")
_INT32 = struct.Struct("!i")


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def inspection_sql(custom_names: Iterable[str]) -> str:
    """One query whose rows (kind, name, value) say what the session holds now (see read_report).

    Custom settings (app.tenant_id) are not in pg_settings: those the client's statements named, or the
    client or backend is known to hold, are read one by one (missing_ok: an unknown name reads NULL).
    """
    parts = [f"SELECT '{_SETTING}', name, setting FROM pg_catalog.pg_settings WHERE source = 'session'"]
    names = sorted(custom_names)
    if names:
        array = ", ".join(_literal(name) for name in names)
        parts.append(f"SELECT '{_SETTING}', n, pg_catalog.current_setting(n, true)"
                     f" FROM pg_catalog.unnest(ARRAY[{array}]::text[]) AS n")
    parts.extend(f"SELECT '{_SETTING}', '{name}', pg_catalog.current_setting('{name}')" for name in IDENTITY_SETTINGS)
    parts.extend(f"SELECT '{_PIN}', '{kind}', NULL WHERE {check}" for kind, check in _PIN_CHECKS)
    return " UNION ALL ".join(parts)


def refusal_sql(kind: str) -> bytes:
    """A statement that fails as the refused one should, with 0A000 (session_state = refuse).

    Sent in place of the refused statement, so that PostgreSQL itself fails it: an open transaction is
    aborted, a multi-statement Query's earlier statements run, and the session goes on as after any error.
    """
    message = (f"{_REFUSED_NAMES[kind]}: not supported in transaction pooling, where the next transaction "
               "may run on another backend (pgmux session_state = refuse)")
    hint = "Use a session-mode listener of pgmux, or connect to the database directly, for session-only state."
    return (f"DO $pgmux$BEGIN RAISE EXCEPTION USING ERRCODE = '0A000', MESSAGE = {_literal(message)}, "
            f"HINT = {_literal(hint)}; END$pgmux$").encode()


def refuse_session_only(sql: bytes) -> tuple[bytes, str] | None:
    """``sql`` with its first statement that creates session-only state replaced by refusal_sql (what would
    run after it is left out: PostgreSQL would not run it either), and that state's kind; None if none."""
    found = sql_words.first_session_only_statement(sql)
    if found is None:
        return None
    start, kind = found
    return sql[:start] + refusal_sql(kind), kind


def parse_data_row(body: bytes | memoryview) -> list[str | None]:
    """The columns of a DataRow body, as text (pgmux's own queries use the text format)."""
    data = bytes(body)
    (count,) = _INT16.unpack_from(data)
    pos = 2
    values: list[str | None] = []
    for _ in range(count):
        (length,) = _INT32.unpack_from(data, pos)
        pos += 4
        if length < 0:
            values.append(None)
        else:
            values.append(data[pos:pos + length].decode("utf-8", "replace"))
            pos += length
    return values


class SessionReport:
    """A session's state beyond its transaction, as PostgreSQL reported it.

    ``settings``: those the session set itself (to re-apply elsewhere), without those pgmux follows through
    ParameterStatus; ``pins``: the kinds of session-only state it holds.
    """

    __slots__ = ("settings", "pins")

    def __init__(self, settings: dict[str, str], pins: frozenset[str]) -> None:
        self.settings = settings
        self.pins = pins


def read_report(rows: list[list[str | None]], login_user: str, followed: Collection[str]) -> SessionReport:
    """The rows of inspection_sql as a report.

    ``login_user``: the backend's own user (a session_authorization equal to it was never changed);
    ``followed``: settings pgmux tracks through ParameterStatus already (client_encoding, TimeZone...).
    A custom setting that reads '' is taken as unset: RESET leaves an empty placeholder behind.
    """
    settings: dict[str, str] = {}
    pins: set[str] = set()
    for row in rows:
        kind, name, value = row[0], row[1] or "", row[2]
        if kind == _PIN:
            pins.add(name)
        elif value is None or name in followed:
            continue
        elif name == "role":
            if value != "none":
                settings[name] = value
        elif name == "session_authorization":
            if value != login_user:
                settings[name] = value
        elif value != "" or "." not in name:
            settings[name] = value
    return SessionReport(settings, frozenset(pins))
