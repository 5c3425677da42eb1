"""Cancels always land: a CancelRequest that reaches another pgmux (peer) or another worker is forwarded to
the one that issued its key, and only there is its secret checked."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import asyncpg
import pytest

from harness import ROOT
from pgusers import APP, APP_DATABASE
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
    """Two pgmux processes as peers 1 and 2, each with both in [peers]; returns their ports (and keeps the
    processes in ``start.processes``)."""
    def start(pool_mode: str) -> tuple[int, int]:
        ports = [_free_port(), _free_port()]
        table = '{"1": "host=127.0.0.1 port=%d", "2": "host=127.0.0.1 port=%d"}' % tuple(ports)
        for peer_id, port in ((1, ports[0]), (2, ports[1])):
            start.processes.append(pgmux_process("--listen", f"127.0.0.1:{port}", PGMUX_PEER_ID=str(peer_id), PGMUX_PEERS=table,
                          PGMUX_POOL_MODE=pool_mode, PGMUX_DEFAULT_POOL_SIZE="120", PGMUX_MAX_CLIENT_CONN="500"))
        return ports[0], ports[1]
    start.processes = []
    return start


@pytest.mark.parametrize("pool_mode", ["transaction", "session"])
def test_a_hundred_cancels_sent_to_the_other_peer_all_land(peers, pool_mode) -> None:
    owner, other = peers(pool_mode)
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
