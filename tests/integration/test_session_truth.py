"""Session mode tells the truth: a client is told its backend's real pid, and a NOTIFY's sender pid is the one its
sender was told (in transaction mode too, where that is pgmux's own)."""

from __future__ import annotations

import asyncio
import threading
import time

import asyncpg
import psycopg
import pytest

from pgusers import APP, APP_DATABASE

MADE_UP_PIDS = 1 << 22  # pgmux's own process ids start here: no real pid reaches it (Linux pid_max <= 2^22)


def _pooled(proxy) -> psycopg.Connection:
    return psycopg.connect(host=proxy.host, port=proxy.port(), user=APP.name, password=APP.password,
                           dbname=APP_DATABASE, autocommit=True, connect_timeout=10)


def _direct(postgres) -> psycopg.Connection:
    return psycopg.connect(postgres.dsn(user=APP.name, password=APP.password, database=APP_DATABASE),
                           autocommit=True)


async def _connect(proxy, **kwargs) -> asyncpg.Connection:
    return await asyncpg.connect(host=proxy.host, port=proxy.port(), user=APP.name, password=APP.password,
                                 database=APP_DATABASE, statement_cache_size=0, **kwargs)


def _backend_pid(conn: psycopg.Connection) -> int:
    row = conn.execute("SELECT pg_backend_pid()").fetchone()
    assert row is not None
    return int(row[0])


def _notification(listener: psycopg.Connection) -> psycopg.Notify:
    for notify in listener.notifies(timeout=10, stop_after=1):
        return notify
    raise AssertionError("no notification arrived within 10 s")


def test_a_session_client_is_told_its_backends_real_pid(pgmux) -> None:
    proxy = pgmux(pool_mode="session", default_pool_size=2)
    with _pooled(proxy) as first, _pooled(proxy) as second:
        assert first.info.backend_pid == _backend_pid(first)
        assert second.info.backend_pid == _backend_pid(second) != first.info.backend_pid

    async def scenario() -> None:
        conn = await _connect(proxy)
        assert conn.get_server_pid() == await conn.fetchval("SELECT pg_backend_pid()")
        await conn.close()

    asyncio.run(scenario())


def test_a_session_clients_welcome_reports_its_own_settings_on_its_backend(pgmux) -> None:
    proxy = pgmux(pool_mode="session", default_pool_size=1)

    async def scenario() -> None:
        for zone in ("Asia/Tokyo", "America/Lima"):  # the second client gets the first one's backend
            conn = await _connect(proxy, server_settings={"TimeZone": zone})
            assert conn.get_settings().TimeZone == zone  # the welcome's ParameterStatus
            assert await conn.fetchval("SHOW TimeZone") == zone
            assert conn.get_server_pid() == await conn.fetchval("SELECT pg_backend_pid()")
            await conn.close()

    asyncio.run(scenario())


def test_terminating_a_session_clients_backend_by_its_pid_ends_that_session_only(pgmux, postgres) -> None:
    proxy = pgmux(pool_mode="session", default_pool_size=2)
    with _pooled(proxy) as victim, _pooled(proxy) as bystander, _direct(postgres) as admin:
        pid = victim.info.backend_pid
        assert admin.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchone() == (True,)
        with pytest.raises(psycopg.OperationalError):
            victim.execute("SELECT 1")
        assert bystander.execute("SELECT 1").fetchone() == (1,)
        with _pooled(proxy) as next_client:
            assert _backend_pid(next_client) == next_client.info.backend_pid != pid


def test_a_cancel_reaches_a_session_clients_query(pgmux_process, postgres) -> None:
    # A real process: psycopg's cancel() blocks holding the GIL, which an in-process pgmux needs.
    port = pgmux_process(PGMUX_POOL_MODE="session").ports()[0]
    dsn = f"postgresql://{APP.name}:{APP.password}@127.0.0.1:{port}/{APP_DATABASE}"
    with psycopg.connect(dsn, autocommit=True) as conn, _direct(postgres) as admin:
        pid = conn.info.backend_pid
        outcome: list[BaseException | None] = []

        def sleep() -> None:
            try:
                conn.execute("SELECT pg_sleep(30)")
                outcome.append(None)
            except BaseException as exc:  # reported to the test's thread
                outcome.append(exc)

        sleeper = threading.Thread(target=sleep)
        sleeper.start()
        deadline = time.monotonic() + 10
        # The pid the client was told is the one PostgreSQL shows running its query.
        while admin.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s AND query LIKE 'SELECT pg_sleep%%' "
                            "AND state = 'active'", (pid,)).fetchone() is None:
            assert time.monotonic() < deadline, "the query never started"
            time.sleep(0.05)
        started = time.monotonic()
        conn.cancel()
        sleeper.join(20)
        assert len(outcome) == 1 and isinstance(outcome[0], psycopg.errors.QueryCanceled)
        assert time.monotonic() - started < 10
        assert _backend_pid(conn) == pid  # the session goes on, on its backend


def test_a_session_client_waiting_for_a_backend_at_login_is_shown_waiting_and_may_leave(pgmux) -> None:
    proxy = pgmux(pool_mode="session", default_pool_size=1, query_wait_timeout=30)

    async def scenario() -> None:
        holder = await _connect(proxy)
        waiting = asyncio.ensure_future(_connect(proxy))
        deadline = time.monotonic() + 10
        while "waiting" not in proxy.call(lambda p: [c.state.value for c in p.registry.clients]):
            assert time.monotonic() < deadline, "the second login never joined the line"
            await asyncio.sleep(0.05)
        waiting.cancel()  # gives up while in line: its place goes, nothing of it stays
        with pytest.raises(asyncio.CancelledError):
            await waiting
        held = holder.get_server_pid()
        await holder.close()
        successor = await asyncio.wait_for(_connect(proxy), 10)
        assert successor.get_server_pid() == held == await successor.fetchval("SELECT pg_backend_pid()")
        await successor.close()

    asyncio.run(scenario())


def test_a_graceful_shutdown_ends_a_session_login_in_line_at_once(pgmux) -> None:
    proxy = pgmux(pool_mode="session", default_pool_size=1, query_wait_timeout=30, shutdown_timeout=30)

    async def scenario() -> None:
        holder = await _connect(proxy)
        await holder.execute("BEGIN")  # mid-transaction: the shutdown waits for it
        waiting = asyncio.ensure_future(_connect(proxy))
        deadline = time.monotonic() + 10
        while "waiting" not in proxy.call(lambda p: [c.state.value for c in p.registry.clients]):
            assert time.monotonic() < deadline, "the second login never joined the line"
            await asyncio.sleep(0.05)
        assert proxy.proxy is not None
        stopping = asyncio.wrap_future(asyncio.run_coroutine_threadsafe(proxy.proxy.stop(graceful=True), proxy.loop))
        with pytest.raises(asyncpg.AdminShutdownError):
            await asyncio.wait_for(waiting, 5)  # nothing under way: told at once, not after the holder
        assert not stopping.done()
        await holder.execute("COMMIT")
        await asyncio.wait_for(stopping, 10)
        await holder.close(timeout=5)

    asyncio.run(scenario())


def test_a_session_login_refused_for_want_of_a_backend_is_fatal_53300(pgmux) -> None:
    proxy = pgmux(pool_mode="session", default_pool_size=1, query_wait_timeout=1)

    async def scenario() -> None:
        holder = await _connect(proxy)
        with pytest.raises(asyncpg.TooManyConnectionsError):
            await _connect(proxy)
        assert await holder.fetchval("SELECT 1") == 1
        await holder.close()

    asyncio.run(scenario())


def test_a_session_clients_notify_carries_the_pid_its_sender_was_told(pgmux) -> None:
    proxy = pgmux(pool_mode="session", default_pool_size=2)
    with _pooled(proxy) as listener, _pooled(proxy) as sender:
        listener.execute("LISTEN pgmux_truth")
        sender.execute("NOTIFY pgmux_truth, 'hello'")
        notify = _notification(listener)
        assert (notify.channel, notify.payload) == ("pgmux_truth", "hello")
        assert notify.pid == sender.info.backend_pid == _backend_pid(sender)


def test_a_transaction_clients_notify_carries_the_pid_pgmux_gave_its_sender(pgmux, postgres) -> None:
    proxy = pgmux(default_pool_size=3)
    with _pooled(proxy) as listener, _pooled(proxy) as sender, _direct(postgres) as outsider:
        listener.execute("LISTEN pgmux_truth")  # pins the listener to its backend
        sender.execute("NOTIFY pgmux_truth, 'from a pooled client'")
        notify = _notification(listener)
        assert notify.payload == "from a pooled client"
        assert notify.pid == sender.info.backend_pid >= MADE_UP_PIDS  # pgmux's id, not its backend's
        sender.execute("SELECT pg_notify('pgmux_truth', 'in a transaction')")
        assert _notification(listener).pid == sender.info.backend_pid
        # A sender that is not pgmux's keeps its own pid.
        outsider.execute("NOTIFY pgmux_truth, 'direct'")
        notify = _notification(listener)
        assert notify.payload == "direct" and notify.pid == _backend_pid(outsider)
