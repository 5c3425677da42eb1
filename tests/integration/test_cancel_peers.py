"""Cancels always land: a CancelRequest that reaches another pgmux (peer) or another worker is forwarded to
the one that issued its key, and only there is its secret checked."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import asyncpg
import psycopg
import pytest

from harness import ROOT
from pgusers import APP, APP_DATABASE
from proxy.cancel import KeyLayout
from proxy.protocol.startup import build_cancel_request


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def _send_cancel(port: int, process_id: int, secret: bytes) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(build_cancel_request(process_id, secret))
    assert await asyncio.wait_for(reader.read(), 10) == b""
    writer.close()


def _key(conn: asyncpg.Connection) -> tuple[int, bytes]:
    secret = conn._protocol.backend_secret
    return conn.get_server_pid(), secret.to_bytes(4, "big", signed=True) if isinstance(secret, int) else secret


async def _cancels_landing(owner_port: int, other_port: int, count: int) -> int:
    """``count`` clients of the pgmux on ``owner_port`` run pg_sleep(30); each one's cancel is sent to
    ``other_port``; how many queries end with 57014."""
    conns = [await asyncpg.connect(host="127.0.0.1", port=owner_port, user=APP.name, password=APP.password,
                                   database=APP_DATABASE, statement_cache_size=0) for _ in range(count)]
    try:
        queries = [asyncio.ensure_future(conn.execute("SELECT pg_sleep(30)")) for conn in conns]
        await asyncio.sleep(1.0)  # every query runs
        await asyncio.gather(*(_send_cancel(other_port, *_key(conn)) for conn in conns))
        results = await asyncio.wait_for(asyncio.gather(*queries, return_exceptions=True), 20)
        return sum(isinstance(result, asyncpg.QueryCanceledError) for result in results)
    finally:
        for conn in conns:
            conn.terminate()


@pytest.fixture
def peers(pgmux_process):
    """Two pgmux processes as peers 1 and 2, each with both in [peers] and ``workers`` workers; returns their ports
    (and keeps the processes in ``start.processes``)."""
    def start(pool_mode: str, workers: int = 1) -> tuple[int, int]:
        ports = [_free_port(), _free_port()]
        table = '{"1": "host=127.0.0.1 port=%d", "2": "host=127.0.0.1 port=%d"}' % tuple(ports)
        for peer_id, port in ((1, ports[0]), (2, ports[1])):
            start.processes.append(pgmux_process(
                "--listen", f"127.0.0.1:{port}", PGMUX_PEER_ID=str(peer_id), PGMUX_PEERS=table,
                PGMUX_POOL_MODE=pool_mode, PGMUX_MAX_CLIENT_CONN="500", PGMUX_WORKERS=str(workers),
                # Each worker's share holds every session a test opens (a waiting one runs nothing to cancel).
                PGMUX_DEFAULT_POOL_SIZE=str(120 * workers)))
            if workers > 1:
                _wait_for_workers(start.processes[-1], workers)
        return ports[0], ports[1]
    start.processes = []
    return start


@pytest.mark.parametrize("pool_mode", ["transaction", "session"])
def test_a_hundred_cancels_sent_to_the_other_peer_all_land(peers, pool_mode) -> None:
    owner, other = peers(pool_mode)
    assert asyncio.run(_cancels_landing(owner, other, 100)) == 100


def test_two_peers_of_two_workers_each_land_a_hundred_cancels_sent_to_the_other_peer(peers) -> None:
    # A cancel reaches either worker of the other peer, goes on to the owning peer's port, reaches either of
    # its workers, and from there, if need be, to the worker that issued the key: up to three hops.
    owner, other = peers("transaction", workers=2)
    assert asyncio.run(_cancels_landing(owner, other, 100)) == 100


def test_a_wrong_secret_forwarded_is_refused_by_its_owner_and_an_unknown_peer_is_dropped(peers) -> None:
    owner, other = peers("transaction")

    async def scenario() -> None:
        conn = await asyncpg.connect(host="127.0.0.1", port=owner, user=APP.name, password=APP.password,
                                     database=APP_DATABASE, statement_cache_size=0)
        query = asyncio.ensure_future(conn.execute("SELECT pg_sleep(2)"))
        await asyncio.sleep(0.3)
        process_id, secret = _key(conn)
        wrong = bytes([secret[0] ^ 0x80]) + secret[1:]  # the same route, another secret
        await _send_cancel(other, process_id, wrong)
        unknown_peer = secret[:3] + bytes([(secret[3] & 0xF8) | (3 << 1)])  # peer 3: in no [peers]
        await _send_cancel(other, process_id, unknown_peer)
        await query  # not cancelled
        await conn.close()

    asyncio.run(scenario())
    peers.processes[0].wait_for_log("cancel request with an unknown key ignored")  # the wrong secret, at its owner
    peers.processes[1].wait_for_log("cancel request with an unknown key ignored")  # peer 3's key, at peer 2


def test_forwarding_to_a_peer_that_is_down_does_not_hold_up_the_listener(pgmux) -> None:
    down = _free_port()  # nothing listens there
    proxy = pgmux(peer_id=1, peers={2: f"host=127.0.0.1 port={down}"})

    async def scenario() -> None:
        for _ in range(20):
            await asyncio.wait_for(_send_cancel(proxy.port(), 12345, bytes([0, 0, 0, 2 << 1])), 2)
        conn = await asyncpg.connect(host="127.0.0.1", port=proxy.port(), user=APP.name, password=APP.password,
                                     database=APP_DATABASE, statement_cache_size=0)
        assert await conn.fetchval("SELECT 1") == 1
        await conn.close()
        async with asyncio.timeout(5):
            while proxy.call(lambda p: p.registry.cancel_forward_failures["peer"]) < 20:
                await asyncio.sleep(0.05)

    asyncio.run(scenario())


_WORKER = textwrap.dedent("""
    import asyncio, sys
    from proxy.cli import new_event_loop
    from proxy.logs import setup_logging
    from proxy.app import run
    from proxy.peering import WorkerRole
    from proxy.settings import PeerAddress, load_settings
    index, rundir = int(sys.argv[1]), sys.argv[2]
    setup_logging()
    role = WorkerRole(index=index, count=2, cancel_address=PeerAddress(host=rundir, port=6432 + index),
                      siblings={i: PeerAddress(host=rundir, port=6432 + i) for i in range(2)})
    loop = new_event_loop()
    loop.run_until_complete(run(load_settings(None, []), worker=role))
""")


def test_a_cancel_sent_to_a_sibling_worker_is_forwarded_to_the_worker_that_holds_the_session(
        postgres, tmp_path: Path) -> None:
    # Two processes configured as two workers of one pgmux: distinct indexes, private Unix cancel addresses.
    # (Without SO_REUSEPORT here each listens on its own port: the cancel is sent to the other one's.)
    ports = [_free_port(), _free_port()]
    processes = []
    try:
        for index in range(2):
            env = {**os.environ, "PGMUX_LISTEN": f"127.0.0.1:{ports[index]}",
                   "PGMUX_UPSTREAM_URL": postgres.dsn(APP.name, APP.password, APP_DATABASE, sslmode="disable")}
            log = (tmp_path / f"worker-{index}.log").open("wb")
            processes.append(subprocess.Popen([sys.executable, "-c", _WORKER, str(index), str(tmp_path)], cwd=ROOT,
                                              env=env, stdout=log, stderr=subprocess.STDOUT))
        for index, process in enumerate(processes):
            log_path = tmp_path / f"worker-{index}.log"
            deadline = time.monotonic() + 20
            while "taking forwarded cancel requests" not in log_path.read_text() or "listening on" not in \
                    log_path.read_text():
                assert process.poll() is None and time.monotonic() < deadline, log_path.read_text()
                time.sleep(0.05)
        assert asyncio.run(_cancels_landing(ports[0], ports[1], 10)) == 10
        assert asyncio.run(_cancels_landing(ports[1], ports[0], 10)) == 10
    finally:
        for process in processes:
            process.terminate()
            process.wait(15)


def _wait_for_workers(process, count: int) -> None:
    """Until ``count`` workers take forwarded cancels (logged once each listens, after its listeners)."""
    deadline = time.monotonic() + 20
    while process.log_path.read_text().count("taking forwarded cancel requests") < count:
        assert process.process.poll() is None and time.monotonic() < deadline, process.log_path.read_text()
        time.sleep(0.05)


def _per_worker(metrics_port: int, sample: str) -> dict[int, float]:
    """``sample`` (a metric name with its labels after worker's, as pgmux exposes them) by worker, from the
    supervisor's /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    name, _, labels = sample.partition("{")
    pattern = re.escape(name) + r'\{worker="(\d+)"' + (re.escape("," + labels[:-1]) if labels else "") + r"\} (\S+)$"
    return {int(worker): float(value) for worker, value in re.findall(pattern, text, re.M)}


def test_with_two_workers_a_hundred_driver_cancels_all_land_whichever_worker_the_kernel_picks(
        pgmux_process) -> None:
    metrics_port = _free_port()
    process = pgmux_process(PGMUX_WORKERS="2", PGMUX_DEFAULT_POOL_SIZE="200", PGMUX_MAX_CLIENT_CONN="500",
                            PGMUX_METRICS_LISTEN=f"127.0.0.1:{metrics_port}")
    _wait_for_workers(process, 2)
    port = process.ports()[0]
    dsn = f"postgresql://{APP.name}:{APP.password}@127.0.0.1:{port}/{APP_DATABASE}?sslmode=disable"

    async def scenario() -> tuple[int, float, dict[int, float]]:
        conns = [await psycopg.AsyncConnection.connect(dsn, autocommit=True) for _ in range(100)]
        try:
            clients = _per_worker(metrics_port, "pgmux_client_connections")
            queries = [asyncio.ensure_future(conn.execute("SELECT pg_sleep(30)")) for conn in conns]
            await asyncio.sleep(1.0)  # every query runs
            sent = time.monotonic()
            # psycopg's cancel: a CancelRequest on a fresh connection to the same address, which the kernel
            # hands to either worker.
            await asyncio.gather(*(conn.cancel_safe(timeout=10) for conn in conns))
            results = await asyncio.wait_for(asyncio.gather(*queries, return_exceptions=True), 20)
            elapsed = time.monotonic() - sent
            return sum(isinstance(result, psycopg.errors.QueryCanceled) for result in results), elapsed, clients
        finally:
            for conn in conns:
                await conn.close()

    cancelled, elapsed, clients = asyncio.run(scenario())
    assert cancelled == 100
    assert elapsed < 10
    assert clients.keys() == {0, 1} and all(clients.values())  # the kernel spread the sessions over both workers
    # ... and sent some of the cancels to the other worker first, which forwarded them.
    assert sum(_per_worker(metrics_port, 'pgmux_cancel_requests_forwarded_total{to="worker"}').values()) > 0


def test_cancels_for_a_killed_workers_sessions_are_dropped_and_its_replacement_takes_its_cancel_address(
        pgmux_process) -> None:
    process = pgmux_process(PGMUX_WORKERS="2", PGMUX_DEFAULT_POOL_SIZE="100")
    _wait_for_workers(process, 2)
    port = process.ports()[0]
    issued_by = KeyLayout(workers=2)  # no peers: the worker index is the secret's lowest bit

    async def connect() -> asyncpg.Connection:
        return await asyncpg.connect(host="127.0.0.1", port=port, user=APP.name, password=APP.password,
                                     database=APP_DATABASE, statement_cache_size=0, ssl=False)

    def worker_of(conn: asyncpg.Connection) -> int:
        return issued_by.worker_of(int.from_bytes(_key(conn)[1], "big"))

    async def scenario() -> None:
        first = [await connect() for _ in range(20)]
        dead_keys = [_key(conn) for conn in first if worker_of(conn) == 1]
        survivors = [conn for conn in first if worker_of(conn) == 0]
        assert dead_keys and survivors  # the kernel spread them over both workers
        process.signal_pid(process.worker_pids()[1], signal.SIGKILL)
        _wait_for_workers(process, 3)  # worker 1 again, on the address its predecessor had
        later = [await connect() for _ in range(20)]
        assert {worker_of(conn) for conn in later} == {0, 1}
        live = survivors + later
        queries = [asyncio.ensure_future(conn.execute("SELECT pg_sleep(30)")) for conn in live]
        await asyncio.sleep(1.0)  # every query runs
        # The dead sessions' keys, twice each: the kernel hands each cancel to either worker, and worker 0
        # forwards those it gets to the new worker 1, which knows none of these keys.
        await asyncio.gather(*(_send_cancel(port, *key) for key in dead_keys * 2))
        process.wait_for_log("cancel request with an unknown key ignored")
        await asyncio.sleep(0.5)
        assert not any(query.done() for query in queries)  # nobody else's query was cancelled
        # The live sessions' own cancels all land, the new worker 1's too.
        await asyncio.gather(*(_send_cancel(port, *_key(conn)) for conn in live))
        results = await asyncio.wait_for(asyncio.gather(*queries, return_exceptions=True), 10)
        assert all(isinstance(result, asyncpg.QueryCanceledError) for result in results), results
        for conn in first + later:
            conn.terminate()

    asyncio.run(scenario())


def test_worker_cancel_sockets_are_private_to_pgmux_and_removed_when_it_stops(pgmux_process) -> None:
    process = pgmux_process(PGMUX_WORKERS="2")
    _wait_for_workers(process, 2)
    sockets = sorted(set(re.findall(r"taking forwarded cancel requests on (\S+)", process.log_path.read_text())))
    assert len(sockets) == 2 and os.path.dirname(sockets[0]) == os.path.dirname(sockets[1])
    directory = os.path.dirname(sockets[0])
    assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
    assert all(stat.S_ISSOCK(os.stat(path).st_mode) and stat.S_IMODE(os.stat(path).st_mode) == 0o600
               for path in sockets)
    assert process.stop() == 0
    assert not os.path.exists(directory)
