"""`workers = 2`: two processes behind one port, one bound on backends and clients, a dead worker replaced,
signals passed to every worker."""

from __future__ import annotations

import asyncio
import re
import signal
import socket
import time
import urllib.error
import urllib.request

import asyncpg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pgusers import APP, APP_DATABASE


async def _connect(port: int) -> asyncpg.Connection:
    return await asyncpg.connect(host="127.0.0.1", port=port, user=APP.name, password=APP.password,
                                 database=APP_DATABASE, statement_cache_size=0, ssl=False)


def _wait_for_listeners(process, count: int) -> None:
    deadline = time.monotonic() + 20
    while process.log_path.read_text().count("listening on") < count:
        assert time.monotonic() < deadline, process.log_path.read_text()
        time.sleep(0.05)


def _free_loopback_port() -> int:
    """A free loopback port, for the supervisor's metrics listener."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _two_workers(pgmux_process, **env: str):
    """pgmux with two workers, once both listen: the process and its port."""
    process = pgmux_process(PGMUX_WORKERS="2", **env)
    _wait_for_listeners(process, 2)
    return process, process.ports()[0]


async def _backends(postgres) -> int:
    conn = await asyncpg.connect(postgres.dsn(postgres.superuser, postgres.password, "postgres", sslmode="disable"))
    try:
        return await conn.fetchval("SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND usename = $2",
                                   APP_DATABASE, APP.name)
    finally:
        await conn.close()


def test_two_workers_keep_postgres_backends_within_the_pool_size_for_1000_clients(pgmux_process, postgres) -> None:
    process, port = _two_workers(pgmux_process, PGMUX_DEFAULT_POOL_SIZE="4", PGMUX_MAX_CLIENT_CONN="200")
    most = 0

    async def client(gate: asyncio.Semaphore) -> None:
        async with gate:
            conn = await _connect(port)
            try:
                assert await conn.fetchval("SELECT 1") == 1
            finally:
                await conn.close()

    async def watch(done: asyncio.Event) -> None:
        nonlocal most
        while not done.is_set():
            most = max(most, await _backends(postgres))
            await asyncio.sleep(0.02)

    async def scenario() -> None:
        gate = asyncio.Semaphore(100)
        done = asyncio.Event()
        watcher = asyncio.create_task(watch(done))
        await asyncio.gather(*(client(gate) for _ in range(1000)))
        done.set()
        await watcher

    asyncio.run(scenario())
    assert 0 < most <= 4
    assert len(set(process.worker_pids().values())) == 2


def test_a_client_storm_is_refused_with_53300_within_the_global_client_limit(pgmux_process) -> None:
    process, port = _two_workers(pgmux_process, PGMUX_MAX_CLIENT_CONN="4", PGMUX_MAX_LOGIN_CLIENTS="100")

    async def scenario() -> tuple[list[asyncpg.Connection], list[BaseException]]:
        results = await asyncio.gather(*(_connect(port) for _ in range(40)), return_exceptions=True)
        admitted = [r for r in results if isinstance(r, asyncpg.Connection)]
        refused = [r for r in results if isinstance(r, BaseException)]
        for conn in admitted:
            assert await conn.fetchval("SELECT 1") == 1
            await conn.close()
        return admitted, refused

    admitted, refused = asyncio.run(scenario())
    assert 0 < len(admitted) <= 4
    assert refused and all(isinstance(r, asyncpg.PostgresError) and r.sqlstate == "53300" for r in refused)


def test_a_worker_killed_with_sigkill_is_replaced_and_the_other_workers_clients_keep_working(pgmux_process) -> None:
    process, port = _two_workers(pgmux_process)
    victim = process.worker_pids()[1]

    async def scenario() -> None:
        clients = [await _connect(port) for _ in range(12)]
        process.signal_pid(victim, signal.SIGKILL)
        await asyncio.sleep(0.3)
        survivors = 0
        for conn in clients:
            try:
                assert await conn.fetchval("SELECT 1") == 1
            except (asyncpg.InterfaceError, asyncpg.ConnectionDoesNotExistError, OSError):
                continue  # it was the dead worker's
            survivors += 1
            # Those of the living worker keep working, query after query.
            assert await conn.fetchval("SELECT 2") == 2
        assert 0 < survivors < len(clients)  # the kernel spread 12 clients over both workers
        process.wait_for_log(f"worker 1 (pid {victim}) died (killed by SIGKILL)")
        deadline = time.monotonic() + 20
        while process.worker_pids()[1] == victim:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        _wait_for_listeners(process, 3)
        for _ in range(10):  # both workers answer new clients again
            conn = await _connect(port)
            assert await conn.fetchval("SELECT 3") == 3
            await conn.close()
        for conn in clients:
            conn.terminate()

    asyncio.run(scenario())


def test_sighup_reloads_every_worker_and_sigterm_drains_them_and_ends_the_supervisor(pgmux_process) -> None:
    process, port = _two_workers(pgmux_process, PGMUX_SHUTDOWN_TIMEOUT="10")
    process.signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while process.log_path.read_text().count("configuration reloaded") < 2:
        assert time.monotonic() < deadline, process.log_path.read_text()
        time.sleep(0.05)

    async def scenario() -> None:
        busy = await _connect(port)
        await busy.execute("BEGIN")
        process.signal(signal.SIGTERM)
        await asyncio.sleep(0.5)
        # The transaction finishes: the drain waits for its boundary.
        assert await busy.fetchval("SELECT 1") == 1
        await busy.execute("COMMIT")
        await asyncio.sleep(0.5)
        with pytest.raises((asyncpg.AdminShutdownError, asyncpg.InterfaceError,
                            asyncpg.ConnectionDoesNotExistError, OSError)):
            await busy.fetchval("SELECT 1")

    asyncio.run(scenario())
    process.process.wait(15)
    assert process.process.returncode == 0
    log = process.log_path.read_text()
    assert log.count("pgmux stopped") == 2 and "all workers stopped" in log


def test_metrics_and_readiness_answer_for_every_worker(pgmux_process) -> None:
    metrics_port = _free_loopback_port()
    process, port = _two_workers(pgmux_process, PGMUX_METRICS_LISTEN=f"127.0.0.1:{metrics_port}")

    async def clients() -> list[asyncpg.Connection]:
        return [await _connect(port) for _ in range(8)]

    def get(path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}{path}", timeout=10) as answer:
                return answer.status, answer.read().decode()
        except urllib.error.HTTPError as refused:
            return refused.code, refused.read().decode()

    loop = asyncio.new_event_loop()
    try:
        held = loop.run_until_complete(clients())
        deadline = time.monotonic() + 20
        while get("/readyz")[0] != 200:  # each worker ready once its upstream check has passed
            assert time.monotonic() < deadline, get("/readyz")
            time.sleep(0.2)
        status, text = get("/metrics")
        assert status == 200
        connected = {int(worker): float(value) for worker, value in re.findall(
            r'^pgmux_client_connections\{worker="(\d)"[^}]*\} (\S+)$', text, re.M)}
        assert set(connected) == {0, 1} and sum(connected.values()) == 8
        assert text.count("# TYPE pgmux_client_connections gauge") == 1
        families = list(text_string_to_metric_families(text))  # valid Prometheus text, as a whole
        assert len({family.name for family in families}) == len(families)
        for conn in held:
            loop.run_until_complete(conn.close())
    finally:
        loop.close()


# ---- the slot table: backends follow the clients across workers (proxy/slots.py) ------------------------------


async def _clients_on(process, port: int, worker: int, count: int) -> list[asyncpg.Connection]:
    """``count`` clients the kernel gave to ``worker`` (others are closed): the log names each login's worker
    and client address."""
    kept: list[asyncpg.Connection] = []
    for _ in range(200):
        conn = await _connect(port)
        local = conn._transport.get_extra_info("sockname")[1]
        line = re.compile(rf"w(\d) c\d+ login ok: \S+ from 127\.0\.0\.1:{local} ")
        deadline = time.monotonic() + 10
        while (found := line.search(process.log_path.read_text())) is None:
            assert time.monotonic() < deadline, f"no login line for client port {local}"
            await asyncio.sleep(0.02)
        if int(found.group(1)) == worker:
            kept.append(conn)
            if len(kept) == count:
                return kept
        else:
            await conn.close()
    raise AssertionError(f"the kernel gave worker {worker} only {len(kept)} of 200 clients")


async def _begin(clients: list[asyncpg.Connection]) -> list[int]:
    """Open a transaction on each client at once: each holds a backend until it commits; returns their pids."""

    async def one(conn: asyncpg.Connection) -> int:
        await conn.execute("BEGIN")
        return await conn.fetchval("SELECT pg_backend_pid()")

    return list(await asyncio.gather(*(one(conn) for conn in clients)))


async def _commit(clients: list[asyncpg.Connection]) -> None:
    await asyncio.gather(*(conn.execute("COMMIT") for conn in clients))


async def _watch_backends(postgres, done: asyncio.Event) -> int:
    """The most backends of the app's pool PostgreSQL shows, sampled until ``done``."""
    most = 0
    while not done.is_set():
        most = max(most, await _backends(postgres))
        await asyncio.sleep(0.01)
    return most


def test_the_clients_of_one_worker_get_the_whole_pool_even_the_backends_another_worker_opened(pgmux_process,
                                                                                              postgres) -> None:
    metrics_port = _free_loopback_port()
    process, port = _two_workers(pgmux_process, PGMUX_DEFAULT_POOL_SIZE="4", PGMUX_QUERY_WAIT_TIMEOUT="2",
                                 PGMUX_METRICS_LISTEN=f"127.0.0.1:{metrics_port}")

    async def scenario() -> None:
        zero = await _clients_on(process, port, 0, 4)
        one = await _clients_on(process, port, 1, 5)
        done = asyncio.Event()
        watcher = asyncio.create_task(_watch_backends(postgres, done))
        # Worker 1's clients take the whole pool, then leave its four backends idle.
        assert len(set(await _begin(one[:4]))) == 4
        await _commit(one[:4])
        # Worker 0's clients get all four: worker 1 lets its idle backends go.
        assert len(set(await asyncio.wait_for(_begin(zero), 15))) == 4
        # The pool is full for the whole pgmux: a fifth client (worker 1's) waits, and is refused at its timeout.
        with pytest.raises(asyncpg.PostgresError) as refused:
            await one[4].fetchval("SELECT 1")
        assert refused.value.sqlstate == "53300"
        # And back: once worker 0's clients are done, worker 1's get all four again.
        await _commit(zero)
        assert len(set(await asyncio.wait_for(_begin(one[:4]), 15))) == 4
        await _commit(one[:4])
        done.set()
        assert 0 < await watcher <= 4
        for conn in zero + one:
            await conn.close()

    asyncio.run(scenario())
    assert "another worker's clients need the connection" in process.log_path.read_text()
    # Each worker's four backends went to the other (the pool was full for the whole pgmux both times), counted.
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    yielded = {int(worker): float(value) for worker, value in re.findall(
        r'^pgmux_servers_yielded_total\{worker="(\d)"[^}]*\} (\S+)$', text, re.M)}
    assert set(yielded) == {0, 1} and min(yielded.values()) >= 4, yielded


def test_a_burst_over_both_workers_stays_within_the_pool_size_and_every_client_is_served(pgmux_process,
                                                                                        postgres) -> None:
    process, port = _two_workers(pgmux_process, PGMUX_DEFAULT_POOL_SIZE="4", PGMUX_MAX_CLIENT_CONN="400")

    async def client() -> str:
        try:
            conn = await _connect(port)
        except asyncpg.PostgresError as refused:
            return refused.sqlstate or "?"
        try:
            async with conn.transaction():  # each holds its backend a while: clients wait on both workers
                await conn.execute("SELECT pg_sleep(0.02)")
            return "served"
        except asyncpg.PostgresError as refused:
            return refused.sqlstate or "?"
        finally:
            await conn.close()

    async def scenario() -> tuple[list[str], int]:
        done = asyncio.Event()
        watcher = asyncio.create_task(_watch_backends(postgres, done))
        outcomes = await asyncio.gather(*(client() for _ in range(200)))
        done.set()
        return outcomes, await watcher

    outcomes, most = asyncio.run(scenario())
    assert set(outcomes) <= {"served", "53300"}
    assert outcomes.count("served") == 200  # query_wait_timeout (120 s) is far: nobody waits that long
    assert 0 < most <= 4
    log = process.log_path.read_text()
    assert "w0 " in log and "w1 " in log and log.count("login ok") >= 200


def test_the_slots_of_a_worker_killed_with_sigkill_go_to_the_other_workers(pgmux_process, postgres) -> None:
    process, port = _two_workers(pgmux_process, PGMUX_DEFAULT_POOL_SIZE="4", PGMUX_QUERY_WAIT_TIMEOUT="20")
    victim = process.worker_pids()[1]

    async def scenario() -> None:
        zero = await _clients_on(process, port, 0, 4)
        one = await _clients_on(process, port, 1, 4)
        assert len(set(await _begin(one))) == 4  # worker 1 holds the whole pool, in transactions
        process.signal_pid(victim, signal.SIGKILL)
        # Worker 0's clients get all four: the dead worker's slots were freed with it.
        assert len(set(await asyncio.wait_for(_begin(zero), 15))) == 4
        assert await _backends(postgres) <= 4
        await _commit(zero)
        for conn in zero:
            await conn.close()
        for conn in one:
            conn.terminate()

    asyncio.run(scenario())
    process.wait_for_log(f"worker 1 (pid {victim}) died (killed by SIGKILL)")


def test_a_workers_clients_get_their_fair_share_while_another_worker_has_clients_waiting_all_the_time(
        pgmux_process) -> None:
    process, port = _two_workers(pgmux_process, PGMUX_DEFAULT_POOL_SIZE="4", PGMUX_QUERY_WAIT_TIMEOUT="5")

    async def scenario() -> float:
        busy = await _clients_on(process, port, 0, 8)
        late = (await _clients_on(process, port, 1, 1))[0]
        stop = asyncio.Event()

        async def keep_busy(conn: asyncpg.Connection) -> None:
            while not stop.is_set():  # twice as many clients as backends: some always wait
                async with conn.transaction():
                    await conn.execute("SELECT pg_sleep(0.02)")

        load = [asyncio.create_task(keep_busy(conn)) for conn in busy]
        await asyncio.sleep(1)  # worker 0 holds the whole pool by now
        started = time.monotonic()
        try:
            assert await late.fetchval("SELECT 1") == 1  # not refused at query_wait_timeout
            return time.monotonic() - started
        finally:
            await asyncio.sleep(8 - (time.monotonic() - started))  # the load outlasts the timeout either way
            stop.set()
            await asyncio.gather(*load)
            for conn in busy + [late]:
                await conn.close()

    assert asyncio.run(scenario()) < 2
