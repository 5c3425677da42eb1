"""Cancel requests reach only the query they were sent for, never the next client's on the same backend."""

from __future__ import annotations

import asyncio
import random
import struct

import asyncpg
import psycopg
import pytest

from pgusers import APP, APP_DATABASE
from proxy.protocol.startup import CANCEL_REQUEST_CODE, build_cancel_request


async def _connect(proxy, **kwargs) -> asyncpg.Connection:
    kwargs.setdefault("statement_cache_size", 0)
    return await asyncpg.connect(host=proxy.host, port=proxy.port(), user=APP.name, password=APP.password,
                                 database=APP_DATABASE, **kwargs)


async def _send_cancel(host: str, port: int, conn: asyncpg.Connection) -> None:
    """A CancelRequest with the key ``conn`` was given, as libpq sends one: its own connection, closed by the peer."""
    secret = conn._protocol.backend_secret
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(build_cancel_request(conn.get_server_pid(), secret.to_bytes(4, "big", signed=True)
                                      if isinstance(secret, int) else secret))
    assert await asyncio.wait_for(reader.read(), 10) == b""  # nothing is answered: the peer just closes
    writer.close()


# A query that tells its client the moment it starts running on the backend (a NOTICE is flushed
# at once), then runs for the given number of seconds.
_ANNOUNCED_SLEEP = "DO $$ BEGIN RAISE NOTICE 'running'; PERFORM pg_sleep({}); END $$"


def test_a_cancel_racing_the_end_of_a_query_never_cancels_the_next_clients_query(pgmux) -> None:
    # One backend for two clients. A sends a CancelRequest for each of its short queries as soon as the
    # query runs, so the cancel reaches pgmux while the query runs and often reaches PostgreSQL only
    # after it ended; B never cancels anything and waits for the backend all the time. A cancel still
    # on its way when A's query ends must not land on B's query, which runs next on that backend.
    proxy = pgmux(default_pool_size=1)
    iterations = 600
    rng = random.Random(5)

    async def scenario() -> tuple[int, int, int]:
        a = await _connect(proxy)
        b = await _connect(proxy)
        cancels: set[asyncio.Task[None]] = set()

        delay = 0.0

        async def cancel_after_delay() -> None:
            await asyncio.sleep(delay)
            await _send_cancel(proxy.host, proxy.port(), a)

        def on_notice(conn: asyncpg.Connection, message: asyncpg.PostgresLogMessage) -> None:
            task = asyncio.ensure_future(cancel_after_delay())
            cancels.add(task)
            task.add_done_callback(cancels.discard)

        a.add_log_listener(on_notice)
        a_cancelled = b_cancelled = b_done = 0
        stop = asyncio.Event()

        async def canceller() -> None:
            nonlocal a_cancelled, delay
            for _ in range(iterations):
                delay = rng.uniform(0.0, 0.003)
                try:
                    await a.execute(_ANNOUNCED_SLEEP.format(0.002))
                except asyncpg.QueryCanceledError:
                    a_cancelled += 1

        async def bystander() -> None:
            nonlocal b_cancelled, b_done
            while not stop.is_set():
                try:
                    assert await b.fetchval("SELECT 7 FROM pg_sleep(0.005)") == 7
                except asyncpg.QueryCanceledError:
                    b_cancelled += 1
                b_done += 1

        bystanding = asyncio.ensure_future(bystander())
        try:
            await asyncio.wait_for(canceller(), 20)
        finally:
            stop.set()
            await asyncio.wait_for(bystanding, 10)
            await asyncio.wait_for(asyncio.gather(*cancels), 10)
        await a.close()
        await b.close()
        return a_cancelled, b_cancelled, b_done

    a_cancelled, b_cancelled, b_done = asyncio.run(scenario())
    print(f"A: {a_cancelled} of {iterations} queries cancelled; B (never cancels): {b_cancelled} of {b_done} cancelled")
    assert a_cancelled > 0, "no cancel reached a query in time: the test did not race cancels against query ends"
    assert b_done >= iterations // 2
    assert b_cancelled == 0, f"{b_cancelled} of {b_done} queries of a client that never cancelled were cancelled"


def test_a_cancel_sent_while_the_query_runs_cancels_it_and_the_client_waiting_for_its_backend_is_served(
        pgmux) -> None:
    proxy = pgmux(default_pool_size=1)

    async def scenario() -> None:
        a = await _connect(proxy)
        b = await _connect(proxy)
        running = asyncio.Event()
        a.add_log_listener(lambda conn, message: running.set())
        cancelled = asyncio.ensure_future(a.execute(_ANNOUNCED_SLEEP.format(10)))
        await asyncio.wait_for(running.wait(), 10)
        waiting = asyncio.ensure_future(b.fetchval("SELECT 7"))  # in line for the only backend
        await _send_cancel(proxy.host, proxy.port(), a)
        with pytest.raises(asyncpg.QueryCanceledError):
            await asyncio.wait_for(cancelled, 5)
        assert await asyncio.wait_for(waiting, 5) == 7
        assert await a.fetchval("SELECT 8") == 8
        await a.close()
        await b.close()

    asyncio.run(scenario())


def test_postgres_ignores_a_cancel_that_reaches_an_idle_backend(postgres) -> None:
    # What makes waiting for the cancel connection to close enough: PostgreSQL closes it after
    # signalling the backend, and a backend the signal finds idle drops it rather than cancel the
    # next query it reads (postgres.c resets QueryCancelPending after reading a command).
    async def scenario() -> None:
        conn = await asyncpg.connect(postgres.dsn(APP.name, APP.password, APP_DATABASE, sslmode="disable"))
        for _ in range(200):
            await conn.execute("SELECT 1")
            await _send_cancel(postgres.host, postgres.port, conn)
            assert await conn.fetchval("SELECT 7 FROM pg_sleep(0.001)") == 7
        await conn.close()

    asyncio.run(scenario())


class _CancelHoldingRelay:
    """A TCP relay in front of PostgreSQL that keeps each CancelRequest's connection open after PostgreSQL
    closed it, until released: to pgmux that cancel stays in flight as long as the test wants."""

    def __init__(self, host: str, port: int) -> None:
        self._upstream = (host, port)
        self.held: list[asyncio.Event] = []  # one per cancel PostgreSQL has carried out, set to close it
        self.port = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def upstream_url(self) -> str:
        return f"postgresql://{APP.name}:{APP.password}@127.0.0.1:{self.port}/{APP_DATABASE}?sslmode=disable"

    async def wait_held(self, count: int) -> None:
        """Until ``count`` cancels have signalled their backend (PostgreSQL closed their connection)."""
        async with asyncio.timeout(5):
            while len(self.held) < count:
                await asyncio.sleep(0.01)

    def close(self) -> None:
        for held in self.held:
            held.set()
        assert self._server is not None
        self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readexactly(8)
            up_reader, up_writer = await asyncio.open_connection(*self._upstream)
            up_writer.write(head)
            length, code = struct.unpack("!ii", head)
            if code == CANCEL_REQUEST_CODE:
                up_writer.write(await reader.readexactly(length - 8))
                assert await up_reader.read() == b""
                up_writer.close()
                held = asyncio.Event()
                self.held.append(held)
                await held.wait()
            else:
                await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        finally:
            writer.close()


def _pool_and_servers(proxy) -> tuple[dict, list[dict]]:
    """SHOW POOLS (the app pool's row) and SHOW SERVERS on the admin console."""
    with psycopg.connect(proxy.dsn(APP.name, APP.password, "pgmux"), autocommit=True) as console:
        def rows(command: str) -> list[dict]:
            cursor = console.execute(command)
            return [dict(zip([c.name for c in cursor.description], row)) for row in cursor.fetchall()]
        return next(row for row in rows("SHOW POOLS") if row["database"] == APP_DATABASE), rows("SHOW SERVERS")


async def _cancel_while_another_waits(proxy, relay: _CancelHoldingRelay, cancels: int,
                                      ) -> tuple[int, asyncio.Future[int], list[asyncpg.Connection]]:
    """On a pool of one: A's query runs, B waits for the backend, ``cancels`` cancels (0: query_timeout's)
    stop A's query and are held by the relay. Returns A's backend pid, B's pending pg_backend_pid(), A and B."""
    a = await _connect(proxy)
    b = await _connect(proxy)
    backend = await a.fetchval("SELECT pg_backend_pid()")
    running = asyncio.Event()
    a.add_log_listener(lambda conn, message: running.set())
    cancelled = asyncio.ensure_future(a.execute(_ANNOUNCED_SLEEP.format(10)))
    await asyncio.wait_for(running.wait(), 10)
    waiting = asyncio.ensure_future(b.fetchval("SELECT pg_backend_pid()"))
    for _ in range(cancels):
        await _send_cancel(proxy.host, proxy.port(), a)
    with pytest.raises(asyncpg.QueryCanceledError):  # the cancel still stops the query it was sent for
        await asyncio.wait_for(cancelled, 5)
    await relay.wait_held(max(cancels, 1))
    return backend, waiting, [a, b]


@pytest.mark.parametrize("cancel_by", ["CancelRequest", "query_timeout"])
def test_a_backend_whose_cancel_is_in_flight_is_shown_being_canceled_and_lent_only_once_it_completed(
        pgmux, postgres, cancel_by) -> None:
    async def scenario() -> None:
        relay = _CancelHoldingRelay(postgres.host, postgres.port)
        await relay.start()
        timeouts = {"query_timeout": 0.5} if cancel_by == "query_timeout" else {}
        proxy = pgmux(upstream_url=relay.upstream_url(), default_pool_size=1, admin_users=[APP.name], **timeouts)
        try:
            backend, waiting, clients = await _cancel_while_another_waits(
                proxy, relay, cancels=1 if cancel_by == "CancelRequest" else 0)
            # A's query is over, but pgmux has not seen its cancel complete: the backend waits, B too.
            pool, servers = await asyncio.to_thread(_pool_and_servers, proxy)
            assert (pool["sv_being_canceled"], pool["sv_idle"], pool["sv_active"], pool["cl_waiting"]) == (1, 0, 0, 1)
            assert [(s["state"], s["remote_pid"]) for s in servers] == [("being_canceled", backend)]
            await asyncio.sleep(0.2)
            assert not waiting.done()

            relay.held[0].set()  # the cancel connection closes: the backend goes to the client in line
            assert await asyncio.wait_for(waiting, 5) == backend
            pool, servers = await asyncio.to_thread(_pool_and_servers, proxy)
            assert (pool["sv_being_canceled"], pool["sv_idle"], pool["cl_waiting"]) == (0, 1, 0)
            for conn in clients:
                await conn.close()
        finally:
            relay.close()

    asyncio.run(scenario())


def test_a_backend_is_lent_again_only_after_every_overlapping_cancel_completed(pgmux, postgres) -> None:
    async def scenario() -> None:
        relay = _CancelHoldingRelay(postgres.host, postgres.port)
        await relay.start()
        proxy = pgmux(upstream_url=relay.upstream_url(), default_pool_size=1)
        try:
            backend, waiting, clients = await _cancel_while_another_waits(proxy, relay, cancels=2)
            relay.held[0].set()
            await asyncio.sleep(0.3)
            assert not waiting.done(), "the backend was lent while a second cancel to it was in flight"
            relay.held[1].set()
            assert await asyncio.wait_for(waiting, 5) == backend
            for conn in clients:
                await conn.close()
        finally:
            relay.close()

    asyncio.run(scenario())


def test_a_backend_whose_cancel_is_never_confirmed_is_closed_not_lent(pgmux, postgres) -> None:
    async def scenario() -> None:
        relay = _CancelHoldingRelay(postgres.host, postgres.port)
        await relay.start()
        proxy = pgmux(upstream_url=relay.upstream_url(), default_pool_size=1, server_connect_timeout=1)
        try:
            backend, waiting, clients = await _cancel_while_another_waits(proxy, relay, cancels=1)
            # server_connect_timeout passes without the cancel connection closing: B gets a new backend.
            assert await asyncio.wait_for(waiting, 5) != backend
            for conn in clients:
                await conn.close()
        finally:
            relay.close()

    asyncio.run(scenario())


def test_shutdown_closes_a_backend_that_waits_for_its_cancel(pgmux, postgres) -> None:
    async def scenario() -> None:
        relay = _CancelHoldingRelay(postgres.host, postgres.port)
        await relay.start()
        proxy = pgmux(upstream_url=relay.upstream_url(), default_pool_size=1)
        try:
            backend, waiting, clients = await _cancel_while_another_waits(proxy, relay, cancels=1)
            await asyncio.to_thread(proxy.stop)
            with pytest.raises((asyncpg.PostgresError, asyncpg.InterfaceError, ConnectionError)):
                await asyncio.wait_for(waiting, 5)  # told that pgmux is shutting down, not left hanging
            async with asyncio.timeout(5):  # and the parked backend was closed, not leaked
                while postgres.psql(f"SELECT count(*) FROM pg_stat_activity WHERE pid = {backend}").strip() != "0":
                    await asyncio.sleep(0.05)
            for conn in clients:
                conn.terminate()
        finally:
            relay.close()

    asyncio.run(scenario())
