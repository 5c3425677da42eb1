"""No state crosses clients in transaction mode, with clients interleaved on a pool of two backends.

Differential: several clients' scripts run interleaved statement by statement (a fixed, seeded order)
through pgmux on a pool of 2, each script also run alone straight against PostgreSQL; every client must
see exactly what PostgreSQL showed it, and a bystander only the defaults. Then what real pools and
vanishing clients leave behind.
"""

from __future__ import annotations

import asyncio
import os
import random
import socket
import struct
import time
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
    "temp_sequence": ["CREATE TEMP SEQUENCE counter", "SELECT nextval('counter')", "DROP SEQUENCE counter"],
    # Settings made while pinned move with the client once it is released.
    "set_while_pinned": ["CREATE TEMP TABLE pinned (id int)", "SET work_mem = '5MB'", f"SET ROLE {STATE_ROLE}",
                         "SET app.tenant_id = '21'", "DISCARD TEMP", "SELECT 1"],
    "pool_reset_in_one_string": ["SELECT pg_advisory_lock(4206)", "LISTEN pgmux_reset", "SET app.tenant_id = '4'",
                                 "DECLARE kept CURSOR WITH HOLD FOR SELECT 1",
                                 "SELECT pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL"],
    "discard_all_releases_everything": ["CREATE TEMP TABLE dropped (id int)", "SELECT pg_advisory_lock(4207)",
                                        "PREPARE gone AS SELECT 2", "SET work_mem = '5MB'", "DISCARD ALL"],
    "deallocate_all": ["PREPARE first_one AS SELECT 1", "PREPARE second_one AS SELECT 2", "DEALLOCATE ALL"],
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
    "session_authorization_resets_role": [f"SET ROLE {STATE_ROLE}", "SET SESSION AUTHORIZATION DEFAULT"],
    "set_role_none": [f"SET ROLE {STATE_ROLE}", "SET ROLE NONE"],
    "set_local_role": ["BEGIN", f"SET LOCAL ROLE {STATE_ROLE}", "SELECT current_user", "COMMIT"],
    "rollback_and_chain": ["BEGIN", "SET work_mem = '7MB'", "ROLLBACK AND CHAIN", "SET lock_timeout = '7s'",
                           "COMMIT"],
}
# The same statement text resolves to a different table per search_path: through pgmux the statement may be
# one prepared by another client (shared server statements); each client must read its own table.
SCHEMAS_SETUP = """
DROP SCHEMA IF EXISTS mix_a CASCADE; DROP SCHEMA IF EXISTS mix_b CASCADE;
CREATE SCHEMA mix_a; CREATE SCHEMA mix_b;
CREATE TABLE mix_a.t AS SELECT 'a'::text AS v; CREATE TABLE mix_b.t AS SELECT 42 AS v;
GRANT USAGE ON SCHEMA mix_a, mix_b TO PUBLIC; GRANT SELECT ON mix_a.t, mix_b.t TO PUBLIC;
"""
_READ_T = "SELECT v FROM t"
SEARCH_PATH_SCRIPTS = {
    "search_path_a": ["SET search_path TO mix_a"] + [_READ_T] * 6,
    "search_path_b": ["SET search_path TO mix_b"] + [_READ_T] * 6,
    "search_path_a_then_b": ["SET search_path TO mix_a", _READ_T, _READ_T, "SET search_path TO mix_b", _READ_T,
                             _READ_T, "RESET search_path", _READ_T],
    "search_path_in_a_rolled_back_transaction": ["SET search_path TO mix_a", "BEGIN", "SET search_path TO mix_b",
                                                 _READ_T, "ROLLBACK", _READ_T, _READ_T],
}
SCRIPTS = {**SETTING_SCRIPTS, **MORE_SETTING_SCRIPTS, **PIN_SCRIPTS, **SEARCH_PATH_SCRIPTS}
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

    driver: Driver
    steps: list[Step] = field(default_factory=list)
    seen: dict[str, list[Any]] = field(default_factory=dict)
    holding: bool = False


class Driver:
    """How a client library connects, runs a statement and reports what it showed (for both sides)."""

    name = ""

    def connect(self, dsn: str) -> Any:
        raise NotImplementedError

    def run(self, conn: Any, sql: str) -> Any:
        """What a statement showed its client: its results, or the error's SQLSTATE."""
        raise NotImplementedError

    def in_transaction(self, conn: Any) -> bool:
        raise NotImplementedError

    def close(self, conn: Any) -> None:
        raise NotImplementedError

    def holds(self, conn: Any) -> bool:
        """The session keeps a backend: an open transaction, or session-only state."""
        if self.in_transaction(conn):
            return True
        probed = self.run(conn, PROBE)
        if probed[0] == "error":  # asyncpg's cached probe after DISCARD ALL: 26000, and nothing held
            return False
        ((_, rows),) = probed
        return any(rows[0][_PIN_COLUMNS])


class Psycopg(Driver):
    """psycopg in autocommit: simple queries, statements prepared (named) after their fifth run."""

    name = "psycopg"

    def connect(self, dsn: str) -> psycopg.Connection:
        return psycopg.connect(dsn, autocommit=True, connect_timeout=10)

    def run(self, conn: psycopg.Connection, sql: str) -> Any:
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

    def in_transaction(self, conn: psycopg.Connection) -> bool:
        return conn.info.transaction_status is not psycopg.pq.TransactionStatus.IDLE

    def close(self, conn: psycopg.Connection) -> None:
        conn.close()


class Asyncpg(Driver):
    """asyncpg: each single statement through the extended protocol as a named, cached statement;
    a multi-statement string (which only the simple protocol takes) through execute()."""

    name = "asyncpg"

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()

    def connect(self, dsn: str) -> asyncpg.Connection:
        return self.loop.run_until_complete(asyncpg.connect(dsn, ssl=False, timeout=10))

    def run(self, conn: asyncpg.Connection, sql: str) -> Any:
        try:
            if ";" in sql:
                return [(self.loop.run_until_complete(conn.execute(sql)), None)]
            rows = self.loop.run_until_complete(conn.fetch(sql))
        except asyncpg.PostgresError as exc:
            return ("error", exc.sqlstate)
        return [("fetch", [tuple(row) for row in rows])]

    def in_transaction(self, conn: asyncpg.Connection) -> bool:
        return conn.is_in_transaction()

    def close(self, conn: asyncpg.Connection) -> None:
        self.loop.run_until_complete(conn.close(timeout=10))


@pytest.fixture(params=["psycopg", "asyncpg", "mixed"])
def drivers(request) -> Any:
    """The driver of each client of the interleaving, the bystander's last: all one library, or both in turn."""
    asyncpg_driver = Asyncpg()
    by_name: dict[str, Driver] = {"psycopg": Psycopg(), "asyncpg": asyncpg_driver}
    names = ["psycopg", "asyncpg"] * 2 if request.param == "mixed" else [request.param] * 4
    yield [by_name[name] for name in names]
    asyncpg_driver.loop.close()


def _direct_dsn(postgres) -> str:
    return postgres.dsn(user=APP.name, password=APP.password, database=APP_DATABASE)


def _pooled_dsn(proxy) -> str:
    return proxy.dsn(APP.name, APP.password, APP_DATABASE)


def _expected(postgres, driver: Driver, script: str) -> tuple[list[Step], list[Any]]:
    """The script's steps (a probe after each statement) and what each showed, straight against PostgreSQL."""
    steps = [Step(script, None)]
    seen: list[Any] = []
    direct = driver.connect(_direct_dsn(postgres))
    try:
        for sql in SCRIPTS[script]:
            for text in (sql, PROBE):
                seen.append(driver.run(direct, text))
                steps.append(Step(script, text, driver.holds(direct)))
    finally:
        driver.close(direct)
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


@pytest.fixture(scope="module")
def schemas(postgres) -> None:
    postgres.psql(SCHEMAS_SETUP, database=APP_DATABASE)


def _plan(postgres, drivers: list[Driver], scripts: list[str]) -> tuple[list[Slot], dict[str, list[Any]]]:
    """Scripts dealt round-robin to a slot per driver but the last, each script on a fresh connection;
    the last slot is the bystander's."""
    expected: dict[str, list[Any]] = {}
    slots = [Slot(driver) for driver in drivers]
    clients = len(slots) - 1
    for index, script in enumerate(scripts):
        slot = slots[index % clients]
        steps, expected[script] = _expected(postgres, slot.driver, script)
        slot.steps.extend(steps)
    return slots, expected


def _chunks(names: list[str], size: int) -> list[list[str]]:
    return [names[i:i + size] for i in range(0, len(names), size)]


# Every script, dealt to 3 clients per run (plus the bystander), each run with its own seed.
SCRIPT_GROUPS = _chunks(list(SCRIPTS), 9)


def test_the_scripts_cover_at_least_25_kinds_of_session_state() -> None:
    assert len(SCRIPTS) >= 25


@pytest.mark.parametrize("seed", range(len(SCRIPT_GROUPS)))
def test_interleaved_clients_on_a_pool_of_two_each_see_only_their_own_state(pgmux, postgres, state_role, schemas,
                                                                            drivers, seed) -> None:
    slots, expected = _plan(postgres, drivers, SCRIPT_GROUPS[seed])
    bystander = slots[-1]
    fresh = bystander.driver.connect(_direct_dsn(postgres))
    defaults = bystander.driver.run(fresh, PROBE)
    bystander.driver.close(fresh)
    proxy = pgmux(default_pool_size=POOL_SIZE, query_wait_timeout=5)
    bystander_index = len(slots) - 1
    conns: dict[int, Any] = {bystander_index: bystander.driver.connect(_pooled_dsn(proxy))}
    cursor = [0] * len(slots)
    bystander_saw = []
    try:
        for i in _schedule(slots, bystander_index, seed):
            driver = slots[i].driver
            if i == bystander_index:
                bystander_saw.append(driver.run(conns[i], PROBE))
                continue
            step = slots[i].steps[cursor[i]]
            cursor[i] += 1
            if step.sql is None:
                if i in conns:
                    driver.close(conns[i])
                conns[i] = driver.connect(_pooled_dsn(proxy))
                slots[i].seen[step.script] = []
            else:
                slots[i].seen[step.script].append(driver.run(conns[i], step.sql))
    finally:
        for i, conn in conns.items():
            slots[i].driver.close(conn)
    for slot in slots[:-1]:
        for script, seen in slot.seen.items():
            assert seen == expected[script], script
    assert bystander_saw == [defaults] * len(bystander_saw)


# ---- leaks over many short transactions -------------------------------------------------------------

LEAKY_SETTINGS = [
    f"SET ROLE {STATE_ROLE}",
    "SET app.tenant_id = 'leak'",
    "SET search_path TO pg_catalog",
    "SET statement_timeout = '1s'",
    "SET default_transaction_read_only = on",
    "SELECT set_config('work_mem', '12MB', false)",
    "SET TIME ZONE 'Asia/Tokyo'",
    "SET client_encoding TO 'LATIN1'",
    "SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL REPEATABLE READ",
    "BEGIN; SET DateStyle = 'SQL, DMY'; COMMIT",
]


def _probe(conn: psycopg.Connection) -> tuple:
    row = conn.execute(PROBE).fetchone()
    assert row is not None
    return tuple(row)


def test_many_short_lived_clients_only_ever_see_the_defaults(pgmux, postgres, state_role) -> None:
    """Setters SET things then leave (between transactions or in the middle of one) or stay idle; the many
    clients that come and go on the same two backends meanwhile must only ever see the defaults."""
    with _direct(postgres) as fresh:
        defaults = _probe(fresh)
    proxy = pgmux(default_pool_size=POOL_SIZE, query_wait_timeout=5)
    rng = random.Random(16)
    idle: list[tuple[psycopg.Connection, tuple]] = []
    seen = []
    try:
        for _ in range(80):
            if rng.random() < 0.4:
                setter = _pooled(proxy)
                for statement in rng.sample(LEAKY_SETTINGS, 3):
                    setter.execute(statement)
                ending = rng.choice(["leave", "leave_mid_transaction", "stay_idle"])
                if ending == "stay_idle" and len(idle) < 4:
                    idle.append((setter, _probe(setter)))
                    continue
                if ending == "leave_mid_transaction":
                    setter.execute("BEGIN")
                    setter.execute(rng.choice(LEAKY_SETTINGS[:4]))
                setter.close()
            with _pooled(proxy) as observer:
                seen.append(_probe(observer))
                if rng.random() < 0.5:
                    with observer.transaction():
                        seen.append(_probe(observer))
        # The setters that stayed still have their own state, and nobody else got it.
        assert [_probe(conn) for conn, _ in idle] == [mine for _, mine in idle]
    finally:
        for conn, _ in idle:
            conn.close()
    assert seen == [defaults] * len(seen)
    assert idle, "the seeded run kept no setter idle: choose another seed"


# ---- real pools ---------------------------------------------------------------------------------------

TENANT = "SELECT current_user, coalesce(nullif(current_setting('app.tenant_id', true), ''), '-'), " \
         "current_setting('work_mem')"


def _pins(proxy) -> list[list[str]]:
    """The clients' pins once pgmux has read every session it is reading (it does so right after the
    ReadyForQuery that ends a transaction, so a client may have its answer a moment before the pin is known)."""
    deadline = time.monotonic() + 5
    while proxy.call(lambda p: any(c.server is not None and c.server.inspecting for c in p.registry.clients)):
        assert time.monotonic() < deadline, "pgmux never finished reading a session"
        time.sleep(0.01)
    return proxy.call(lambda p: [sorted(c.pins) for c in p.registry.clients if c.pins])


def test_asyncpg_and_psycopg_pools_sharing_one_backend_never_pin_nor_see_each_others_settings(
        pgmux, postgres, state_role) -> None:
    """asyncpg's pool resets on release (SELECT pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL),
    psycopg_pool checks on acquire and resets on return: through pgmux on one backend, taking and giving back
    connections of both pools in turn never pins, never waits into a 53300, and no acquirer sees what the
    previous one of the other pool set."""
    proxy = pgmux(default_pool_size=1, query_wait_timeout=3)
    loop = asyncio.new_event_loop()
    with _direct(postgres) as fresh:
        defaults = tuple(fresh.execute(TENANT).fetchone() or ())

    def psycopg_reset(conn: psycopg.Connection) -> None:
        conn.execute("RESET ALL")

    async def asyncpg_turn(pool: asyncpg.Pool, turn: int) -> tuple:
        async with pool.acquire() as conn:
            seen = tuple(await conn.fetchrow(TENANT))
            await conn.execute(f"SET app.tenant_id = 'asyncpg-{turn}'")
            await conn.execute("SET work_mem = '11MB'")
            if turn % 3 == 0:
                await conn.execute(f"SELECT pg_advisory_lock({turn})")  # released by the pool's reset
                assert _pins(proxy) == [["advisory_lock"]]
            async with conn.transaction():
                await conn.execute(f"SET ROLE {STATE_ROLE}")
            assert (await conn.fetchrow(TENANT))[1] == f"asyncpg-{turn}"
            return seen

    async def create_pool() -> asyncpg.Pool:
        return await asyncpg.create_pool(_pooled_dsn(proxy), ssl=False, min_size=1, max_size=2)

    asyncpg_pool = loop.run_until_complete(create_pool())
    psycopg_pool = ConnectionPool(_pooled_dsn(proxy), min_size=1, max_size=2, open=True, timeout=10,
                                  kwargs={"autocommit": True}, check=ConnectionPool.check_connection,
                                  reset=psycopg_reset)
    asyncpg_seen = []
    psycopg_seen = []
    pins = []
    try:
        for turn in range(30):
            asyncpg_seen.append(loop.run_until_complete(asyncpg_turn(asyncpg_pool, turn)))
            pins.append(_pins(proxy))
            with psycopg_pool.connection() as conn:
                psycopg_seen.append(tuple(conn.execute(TENANT).fetchone() or ()))
                conn.execute(f"SET app.tenant_id = 'psycopg-{turn}'")
                conn.execute("SELECT set_config('work_mem', '13MB', false)")
            pins.append(_pins(proxy))
    finally:
        psycopg_pool.close()
        loop.run_until_complete(asyncpg_pool.close())
        loop.close()
    assert pins == [[]] * len(pins)
    assert psycopg_seen == [defaults] * len(psycopg_seen)
    # RESET ALL leaves the role (PostgreSQL's rule): the next acquirer of the same asyncpg connection keeps it.
    assert {seen[1:] for seen in asyncpg_seen} == {defaults[1:]}
    assert {seen[0] for seen in asyncpg_seen} <= {APP.name, STATE_ROLE}


# ---- clients that vanish ------------------------------------------------------------------------------

VANISH_LOCK = 9090


def _vanish(conn: psycopg.Connection, how: str) -> None:
    """End the client's TCP connection under psycopg, with no Terminate: a FIN (shutdown) or a RST (linger 0)."""
    sock = socket.socket(fileno=os.dup(conn.fileno()))
    if how == "rst":
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    else:
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()
    if how == "rst":
        # The last descriptor goes, so the kernel resets the connection; dup2 closes it and puts a harmless one
        # (psycopg closes it later) in its place in one step. Not close() then dup2(): pgmux runs in this
        # process, and a socket it opens in between (the cancel for this very client) would get the number.
        harmless = os.open(os.devnull, os.O_RDWR)
        os.dup2(harmless, conn.fileno())
        os.close(harmless)


def _advisory_locks_held(direct: psycopg.Connection) -> int:
    row = direct.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = %s",
                         (VANISH_LOCK,)).fetchone()
    assert row is not None
    return int(row[0])


@pytest.mark.parametrize("how", ["fin", "rst"])
@pytest.mark.parametrize("when", ["between_transactions", "mid_transaction", "mid_query"])
def test_a_client_that_vanishes_holding_a_lock_and_a_temp_table_leaves_neither(pgmux, postgres, state_role,
                                                                               how, when) -> None:
    proxy = pgmux(default_pool_size=1, query_wait_timeout=5)
    with _direct(postgres) as direct:
        defaults = _probe(direct)
        client = _pooled(proxy)
        client.execute(f"SELECT pg_advisory_lock({VANISH_LOCK})")
        client.execute("CREATE TEMP TABLE vanishing (id int)")
        if when != "between_transactions":
            client.execute("BEGIN")
            client.execute("INSERT INTO vanishing VALUES (1)")
        client.execute(f"SET ROLE {STATE_ROLE}")
        assert _advisory_locks_held(direct) == 1
        if when == "mid_query":
            client.pgconn.send_query(b"SELECT pg_sleep(60)")
            client.pgconn.flush()
            time.sleep(0.2)  # the query is running on the backend
        _vanish(client, how)
        deadline = time.monotonic() + 5
        while _advisory_locks_held(direct):
            assert time.monotonic() < deadline, "the vanished client's advisory lock is still held"
            time.sleep(0.05)
        with _pooled(proxy) as next_client:
            assert _probe(next_client) == defaults
            with pytest.raises(psycopg.errors.UndefinedTable):
                next_client.execute("SELECT * FROM vanishing")
        assert _pins(proxy) == []
        client.close()


# ---- pipelines and statements that outlive a backend --------------------------------------------------

PIPELINED = ["SET work_mem = '5MB'", f"SET ROLE {STATE_ROLE}", PROBE, "BEGIN", "SET lock_timeout = '3s'",
             "SAVEPOINT a", "SET lock_timeout = '4s'", "ROLLBACK TO SAVEPOINT a", "COMMIT", PROBE,
             "CREATE TEMP TABLE piped (id int)", PROBE, "DISCARD TEMP", "SET app.tenant_id = 'piped'", PROBE]


def _run_pipelined(conn: psycopg.Connection) -> list[Any]:
    with conn.pipeline():
        cursors = [conn.execute(statement) for statement in PIPELINED]
    return [cursor.fetchall() if cursor.description else cursor.statusmessage for cursor in cursors]


def test_pipelined_requests_behind_a_set_see_their_clients_state_and_nobody_else_does(pgmux, postgres,
                                                                                      state_role) -> None:
    """psycopg's pipeline sends what follows a SET before its answer: it waits while pgmux reads the session."""
    with _direct(postgres) as direct, _direct(postgres) as fresh:
        expected = _run_pipelined(direct)
        defaults = _probe(fresh)
    proxy = pgmux(default_pool_size=POOL_SIZE, query_wait_timeout=5)
    with _pooled(proxy) as first, _pooled(proxy) as second, _pooled(proxy) as bystander:
        seen = [_run_pipelined(first), _probe(bystander), _run_pipelined(second), _probe(bystander)]
        last = [_probe(first), _probe(second)]
    assert seen == [expected, defaults, expected, defaults]
    assert last == [tuple(expected[-1][0])] * 2


def test_a_statement_its_client_prepared_before_changing_search_path_fails_on_another_backend_as_on_its_own(
        pgmux, postgres, state_role, schemas) -> None:
    """PostgreSQL re-analyses a prepared statement used under another search_path and refuses it when its
    result type changed (0A000 'cached plan must not change result type'; asyncpg then prepares it again).
    pgmux re-creates a client's statement on whatever backend the client gets next: created there under the
    new search_path, it must not silently return rows of the new shape to a client that expects the old one."""

    async def script(dsn: str) -> list[list[tuple]]:
        client = await asyncpg.connect(dsn, ssl=False)
        holder = await asyncpg.connect(dsn, ssl=False)
        try:
            await client.execute("SET search_path TO mix_a")
            seen = [await client.fetch(_READ_T)]  # prepared: one text column
            await client.execute("SET search_path TO mix_b")
            async with holder.transaction():  # holds the client's backend: the client moves to the other one
                await holder.execute("SELECT 1")
                seen.append(await client.fetch(_READ_T))
            seen.append(await client.fetch(_READ_T))
            return [[tuple(row) for row in rows] for rows in seen]
        finally:
            await client.close()
            await holder.close()

    expected = asyncio.run(script(_direct_dsn(postgres)))
    assert expected == [[("a",)], [(42,)], [(42,)]]
    proxy = pgmux(default_pool_size=POOL_SIZE, query_wait_timeout=5)
    assert asyncio.run(script(_pooled_dsn(proxy))) == expected
