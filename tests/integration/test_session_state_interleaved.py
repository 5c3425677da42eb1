"""No state crosses clients in transaction mode, with clients interleaved on a pool of two backends.

Differential: several clients' scripts run interleaved statement by statement (a fixed, seeded order)
through pgmux on a pool of 2, each script also run alone straight against PostgreSQL; every client must
see exactly what PostgreSQL showed it, and a bystander only the defaults. Then what real pools and
vanishing clients leave behind.
"""

from __future__ import annotations

import asyncio
import random
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import psycopg
import pytest
from psycopg_pool import ConnectionPool

from pgusers import APP, APP_DATABASE
from test_session_state import SETTING_SCRIPTS, STATE_ROLE, _direct, _pooled, state_role  # noqa: F401 (fixture)

# What a session can observe of its own state (a superset of test_session_state's PROBE).
PROBE = """SELECT current_user, session_user, current_setting('work_mem'), current_setting('statement_timeout'),
  current_setting('lock_timeout'), current_setting('search_path'),
  coalesce(nullif(current_setting('app.tenant_id', true), ''), '-'),
  current_setting('default_transaction_read_only'), current_setting('default_transaction_isolation'),
  current_setting('TimeZone'), current_setting('client_encoding'), current_setting('DateStyle'),
  (SELECT count(*) FROM pg_catalog.pg_class WHERE relnamespace = pg_catalog.pg_my_temp_schema()),
  (SELECT count(*) FROM pg_catalog.pg_locks WHERE locktype = 'advisory' AND pid = pg_catalog.pg_backend_pid()),
  (SELECT count(*) FROM pg_catalog.pg_listening_channels()),
  (SELECT count(*) FROM pg_catalog.pg_cursors WHERE is_holdable),
  (SELECT count(*) FROM pg_catalog.pg_prepared_statements WHERE from_sql)"""
# Columns of PROBE that count session-only state: a client holding any keeps its backend.
_PIN_COLUMNS = slice(12, 17)

# Session-only state, each released at its script's end (a client pinned for good would starve the pool).
PIN_SCRIPTS = {
    "temp_table": ["CREATE TEMP TABLE scratch (id int)", "INSERT INTO scratch VALUES (1)",
                   "SELECT count(*) FROM scratch", "DISCARD TEMP"],
    "advisory_lock": ["SELECT pg_advisory_lock(4201)", "SELECT pg_advisory_lock_shared(4202)",
                      "SELECT pg_advisory_unlock_all()"],
    "try_advisory_lock": ["SELECT pg_try_advisory_lock(4203)", "SELECT pg_advisory_unlock(4203)"],
    "xact_advisory_lock": ["BEGIN", "SELECT pg_advisory_xact_lock(4204)", "COMMIT"],
    "listen": ["LISTEN pgmux_mix", "NOTIFY pgmux_mix, 'hello'", "UNLISTEN *"],
    "hold_cursor": ["DECLARE held CURSOR WITH HOLD FOR SELECT g FROM generate_series(1, 3) g", "FETCH 2 FROM held",
                    "FETCH ALL FROM held", "CLOSE ALL"],
    "sql_prepare": ["PREPARE plus_one(int) AS SELECT $1 + 1", "EXECUTE plus_one(41)", "DEALLOCATE plus_one"],
    "temp_table_in_rolled_back_transaction": ["BEGIN", "CREATE TEMP TABLE gone (id int)", "ROLLBACK"],
    "temp_table_on_commit_drop": ["BEGIN", "CREATE TEMP TABLE brief (id int) ON COMMIT DROP", "COMMIT"],
}
MORE_SETTING_SCRIPTS = {
    "set_names": ["SET NAMES 'LATIN1'"],
    "set_client_encoding": ["SET client_encoding TO 'EUC_JP'"],
    "set_client_encoding_then_reset": ["SET client_encoding TO 'LATIN1'", "RESET client_encoding"],
    "session_authorization_self": [f"SET SESSION AUTHORIZATION {APP.name}"],
    "session_authorization_default": ["SET SESSION AUTHORIZATION DEFAULT"],
    "reset_role_alone": ["RESET ROLE"],
    "set_role_committed": ["BEGIN", f"SET ROLE {STATE_ROLE}", "COMMIT"],
    "set_role_rolled_back": ["BEGIN", f"SET ROLE {STATE_ROLE}", "ROLLBACK"],
    "set_config_local_then_session": ["BEGIN", "SELECT set_config('app.tenant_id', '5', true)",
                                      "SELECT set_config('work_mem', '6MB', false)", "COMMIT"],
    "set_config_search_path": ["SELECT set_config('search_path', 'pg_catalog', false)"],
    "nested_savepoints": ["BEGIN", "SET work_mem = '9MB'", "SAVEPOINT a", "SET work_mem = '10MB'",
                          "SAVEPOINT b", "SET lock_timeout = '4s'", "RELEASE SAVEPOINT b",
                          "ROLLBACK TO SAVEPOINT a", "COMMIT"],
    "failed_transaction": ["BEGIN", "SET work_mem = '9MB'", "SELECT 1 / 0", "ROLLBACK"],
    "failed_transaction_committed": ["BEGIN", "SET work_mem = '9MB'", "SELECT 1 / 0", "COMMIT"],
    "multi_statement_transaction": ["BEGIN; SET search_path TO pg_catalog; SET app.tenant_id = '3'; COMMIT"],
    "multi_statement_failing": ["SET work_mem = '3MB'; SELECT 1 / 0"],
    "multi_statement_open_transaction": ["BEGIN; SET statement_timeout = '9s'", "SELECT 1", "COMMIT"],
    "reset_one": ["SET work_mem = '8MB'", "RESET work_mem"],
    "discard_all": ["SET work_mem = '8MB'", f"SET ROLE {STATE_ROLE}", "DISCARD ALL"],
    "date_style": ["SET DateStyle TO 'German, DMY'"],
    "set_and_read_in_one": ["SET app.tenant_id = '99'; SELECT current_setting('app.tenant_id')"],
    "custom_setting_reset": ["SET app.tenant_id = '1'", "RESET app.tenant_id"],
}
SCRIPTS = {**SETTING_SCRIPTS, **MORE_SETTING_SCRIPTS, **PIN_SCRIPTS}
POOL_SIZE = 2


@dataclass
class Step:
    """One entry of a client's interleaved script: a statement, a probe, or a (re)connection."""

    script: str
    sql: str | None  # None: the client connects afresh for this script
    holding: bool = False  # after it the client keeps a backend (open transaction or session-only state)


@dataclass
class Slot:
    """One client of the interleaving: its scripts' steps in order, and what it saw."""

    steps: list[Step]
    seen: dict[str, list[Any]] = field(default_factory=dict)
    holding: bool = False


def _outcome_psycopg(conn: psycopg.Connection, sql: str) -> Any:
    """What a statement showed its client: each result's command tag and rows, or the error's SQLSTATE."""
    try:
        cursor = conn.execute(sql)
    except psycopg.Error as exc:
        return ("error", exc.sqlstate)
    results = []
    while True:
        rows = cursor.fetchall() if cursor.description is not None else None
        results.append((cursor.statusmessage, rows))
        if not cursor.nextset():
            return results


def _holds(conn: psycopg.Connection) -> bool:
    if conn.info.transaction_status is not psycopg.pq.TransactionStatus.IDLE:
        return True
    row = conn.execute(PROBE).fetchone()
    assert row is not None
    return any(row[_PIN_COLUMNS])


def _expected(postgres, script: str) -> tuple[list[Step], list[Any]]:
    """The script's steps (a probe after each statement) and what each showed, straight against PostgreSQL."""
    steps = [Step(script, None)]
    seen: list[Any] = []
    with _direct(postgres) as direct:
        for sql in SCRIPTS[script]:
            for text in (sql, PROBE):
                seen.append(_outcome_psycopg(direct, text))
                steps.append(Step(script, text, _holds(direct)))
    return steps, seen


def _schedule(slots: list[Slot], bystander: int, seed: int) -> list[int]:
    """Which slot runs each next step, drawn by random.Random(seed) among those that can run now.

    The interleaving runs in one thread: a step that would make a second client keep a backend waits, so
    that one backend is always free for whoever runs next.
    """
    rng = random.Random(seed)
    cursor = [0] * len(slots)
    holding = [False] * len(slots)
    order: list[int] = []
    while any(cursor[i] < len(slot.steps) for i, slot in enumerate(slots) if i != bystander):
        ready = []
        for i, slot in enumerate(slots):
            if i == bystander or cursor[i] >= len(slot.steps):
                continue
            step = slot.steps[cursor[i]]
            others_hold = any(holding[j] for j in range(len(slots)) if j != i)
            if step.holding and not holding[i] and others_hold:
                continue
            ready.append(i)
        ready.append(bystander)
        chosen = rng.choice(ready)
        order.append(chosen)
        if chosen != bystander:
            holding[chosen] = slots[chosen].steps[cursor[chosen]].holding
            cursor[chosen] += 1
    return order


def _plan(postgres, scripts: list[str], clients: int) -> tuple[list[Slot], dict[str, list[Any]]]:
    """Scripts dealt round-robin to ``clients`` slots, each script on a fresh connection; then a bystander."""
    expected: dict[str, list[Any]] = {}
    slots = [Slot([]) for _ in range(clients)]
    for index, script in enumerate(scripts):
        steps, expected[script] = _expected(postgres, script)
        slots[index % clients].steps.extend(steps)
    slots.append(Slot([]))
    return slots, expected


def _defaults(postgres) -> tuple:
    with _direct(postgres) as fresh:
        row = fresh.execute(PROBE).fetchone()
    assert row is not None
    return tuple(row)


def _chunks(names: list[str], size: int) -> list[list[str]]:
    return [names[i:i + size] for i in range(0, len(names), size)]


# Every script, dealt to 3 clients per run (plus the bystander), each run with its own seed.
SCRIPT_GROUPS = _chunks(list(SCRIPTS), 9)


def test_the_scripts_cover_at_least_25_kinds_of_session_state() -> None:
    assert len(SCRIPTS) >= 25


@pytest.mark.parametrize("seed", range(len(SCRIPT_GROUPS)))
def test_interleaved_clients_on_a_pool_of_two_each_see_only_their_own_state(pgmux, postgres, state_role,
                                                                            seed) -> None:
    slots, expected = _plan(postgres, SCRIPT_GROUPS[seed], clients=3)
    defaults = _defaults(postgres)
    proxy = pgmux(default_pool_size=POOL_SIZE, query_wait_timeout=5)
    bystander_index = len(slots) - 1
    conns: dict[int, psycopg.Connection] = {bystander_index: _pooled(proxy)}
    cursor = [0] * len(slots)
    bystander_saw = []
    try:
        for i in _schedule(slots, bystander_index, seed):
            if i == bystander_index:
                bystander_saw.append(_outcome_psycopg(conns[i], PROBE))
                continue
            step = slots[i].steps[cursor[i]]
            cursor[i] += 1
            if step.sql is None:
                if i in conns:
                    conns[i].close()
                conns[i] = _pooled(proxy)
                slots[i].seen[step.script] = []
            else:
                slots[i].seen[step.script].append(_outcome_psycopg(conns[i], step.sql))
    finally:
        for conn in conns.values():
            conn.close()
    for slot in slots[:-1]:
        for script, seen in slot.seen.items():
            assert seen == expected[script], script
    assert bystander_saw == [[("SELECT 1", [defaults])]] * len(bystander_saw)
