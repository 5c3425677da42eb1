"""Registry (live clients, logins, refusals, tasks), CancelKeys and Router, without sockets or a running pgmux."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from proxy.admission import Admission
from proxy.cancel import CancelKeys
from proxy.client import ClientConnection
from proxy.protocol.errors import PgError, SqlState
from proxy.registry import Console, Registry
from proxy.routing import Router
from proxy.settings import Settings, load_settings


# Real clients (compiled, an interpreted stand-in could not implement the Cancellable trait); the
# router and settings they carry are never used here.
_SETTINGS = Settings(upstream_url="postgresql://app:secret@127.0.0.1:1/app", listen="127.0.0.1:0")


def _no_console(client: ClientConnection, can_modify: bool) -> Console:
    raise AssertionError("no console in these tests")


def _registry(max_client_conn: int = 100) -> Registry[ClientConnection]:
    return Registry(Admission(max_client_conn, 0, 0), _no_console)


def _client(keys: CancelKeys | None = None) -> ClientConnection:
    registry = _registry()
    router = Router(_SETTINGS, registry.admission, registry.spawn, registry.count_rejection)
    return ClientConnection(router, registry, keys or CancelKeys(), _SETTINGS.all_listeners()[0])


def _cancels_reaching(caplog: pytest.LogCaptureFixture, client: ClientConnection) -> int:
    """CancelRequests that reached ``client`` (with no query running, each is logged as ignored)."""
    return sum(1 for record in caplog.records
               if getattr(record, "conn", None) == client.id and record.getMessage().startswith("cancel request"))


def test_the_oldest_login_in_progress_is_crowded_out_at_the_limit() -> None:
    registry = _registry()
    first, second = _client(), _client()
    registry.add(first)
    registry.add(second)
    assert registry.accepted == {"tcp": 2}
    assert registry.oldest_logging_in(3) is None
    assert registry.oldest_logging_in(2) is first
    registry.login_finished(first)
    assert registry.oldest_logging_in(1) is second
    assert registry.clients == {first, second}


def test_max_client_conn_counts_logged_in_clients_and_the_newcomer() -> None:
    registry = _registry(max_client_conn=2)
    logged_in, newcomer = _client(), _client()
    for client in (logged_in, newcomer):
        registry.add(client)
    registry.login_finished(logged_in)
    assert registry.client_limit_error() is None  # one logged in, plus the newcomer: 2
    other = _client()
    registry.add(other)
    registry.login_finished(other)
    refusal = registry.client_limit_error()
    assert refusal is not None and refusal.sqlstate == SqlState.TOO_MANY_CONNECTIONS
    assert registry.rejections["max_client_conn"] == 1
    registry.forget_client(other)
    assert registry.client_limit_error() is None


def test_a_draining_registry_refuses_every_login() -> None:
    registry = _registry()
    registry.draining = True
    refusal = registry.client_limit_error()
    assert refusal is not None and refusal.sqlstate == SqlState.ADMIN_SHUTDOWN
    assert registry.rejections["shutdown"] == 1


def test_spawned_tasks_are_tracked_until_done() -> None:
    async def scenario() -> None:
        registry = _registry()
        finish = asyncio.Event()
        task = registry.spawn(finish.wait(), name="waits")
        assert registry.tasks == {task}
        finish.set()
        await task
        await asyncio.sleep(0)  # done callbacks run on the next pass of the loop
        assert not registry.tasks

    asyncio.run(scenario())


def test_a_cancel_request_reaches_the_client_whose_key_it_carries(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO")
    keys = CancelKeys()
    client, other = _client(), _client()
    client.cancel_key = keys.register(client)
    other.cancel_key = keys.register(other)
    process_id, secret = client.cancel_key
    assert process_id > 0 and len(secret) == 4 and process_id != other.cancel_key[0]
    keys.cancel(process_id, secret)
    assert (_cancels_reaching(caplog, client), _cancels_reaching(caplog, other)) == (1, 0)


def test_a_made_up_process_id_is_beyond_every_real_pid() -> None:
    keys = CancelKeys()
    for _ in range(200):
        client = _client(keys)
        client.cancel_key = keys.register(client)
        assert 1 << 22 <= client.cancel_key[0] < 1 << 31  # Linux's pid_max is at most 2^22


def test_a_session_client_gets_its_backends_pid_unless_a_live_client_holds_it(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO")
    keys = CancelKeys()
    first, second = _client(keys), _client(keys)
    first.cancel_key = keys.register(first, backend_pid=1234)
    # Another upstream host's backend 1234: the id is taken, so the second client's is made up.
    second.cancel_key = keys.register(second, backend_pid=1234)
    assert first.cancel_key[0] == 1234 and second.cancel_key[0] >= 1 << 22
    assert first.cancel_key[1] != second.cancel_key[1]
    keys.cancel(*first.cancel_key)
    keys.cancel(*second.cancel_key)
    assert (_cancels_reaching(caplog, first), _cancels_reaching(caplog, second)) == (1, 1)
    keys.forget(first)
    third = _client(keys)
    third.cancel_key = keys.register(third, backend_pid=1234)  # free again once its holder has gone
    assert third.cancel_key[0] == 1234


@pytest.mark.parametrize("wrong", ["secret", "process id"])
def test_a_cancel_request_with_a_wrong_key_reaches_nobody(wrong: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO")
    async def scenario() -> None:  # an unknown key is logged with a summary timer: it needs a loop
        keys = CancelKeys()
        client = _client()
        client.cancel_key = process_id, secret = keys.register(client)
        if wrong == "secret":
            keys.cancel(process_id, bytes(b ^ 0xFF for b in secret))
        else:
            keys.cancel(process_id ^ 1, secret)
        assert _cancels_reaching(caplog, client) == 0

    asyncio.run(scenario())


def test_a_forgotten_client_is_reached_by_no_cancel_request(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO")
    async def scenario() -> None:
        keys = CancelKeys()
        client = _client()
        client.cancel_key = keys.register(client)
        keys.forget(client)
        keys.cancel(*client.cancel_key)
        assert _cancels_reaching(caplog, client) == 0
        keys.forget(_client())  # a client that never logged in has nothing to forget

    asyncio.run(scenario())


# ---- Router: where a login goes --------------------------------------------------------------------

@pytest.fixture
def router(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Router:
    for name in list(os.environ):
        if name.startswith("PGMUX_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)  # no pgmux.toml of the caller's
    settings = load_settings(None, [], upstream_url="postgresql://app:app-secret@db.internal:5432/app",
                             admin_users=["boss"], stats_users=["watcher"])
    registry = _registry()
    return Router(settings, registry.admission, registry.spawn, registry.count_rejection)


def test_a_login_to_a_database_pgmux_does_not_serve_has_no_secret_and_no_pool(router: Router) -> None:
    rejections: list[str] = []
    router._count_rejection = rejections.append
    assert router.serves_database("app") and not router.serves_database("elsewhere")
    assert router.login_secret("elsewhere", "app") is None  # checked against a mock secret: fails as a wrong password
    with pytest.raises(PgError):
        router.login_pool("elsewhere", "app")
    assert rejections == ["unknown_database"] and not router.pools


def test_the_database_url_user_logs_in_with_its_password(router: Router) -> None:
    secret = router.login_secret("app", "app")
    assert secret is not None and secret.password == "app-secret"
    assert router.login_secret("app", "stranger") is None


def test_admin_roles_come_from_admin_users_and_stats_users(router: Router) -> None:
    roles = [router.admin_role(user) for user in ("boss", "watcher", "app")]
    assert roles == ["admin", "stats", None]


def test_a_pool_is_made_on_the_first_login_and_shared_by_the_next(router: Router) -> None:
    async def scenario() -> None:
        pool = router.login_pool("app", "app")
        assert router.login_pool("app", "app") is pool
        assert pool.clients == 2 and list(router.pools) == [pool.key]

    asyncio.run(scenario())


def test_pause_and_resume_of_one_database(router: Router) -> None:
    router.pause("app")
    assert router.is_paused("app") and not router.paused_all
    router.resume("app")
    assert not router.is_paused("app")


# ---- KeyLayout: the route to a key's owner in its secret -------------------------------------------

def test_a_single_pgmux_without_peers_spends_no_bit_of_the_secret_on_routing() -> None:
    from proxy.cancel import NO_ROUTES
    assert NO_ROUTES.routing_bits == 0 and NO_ROUTES.issue(b"\xff\xff\xff\xff") == b"\xff\xff\xff\xff"


def test_a_key_names_its_peer_and_worker_and_spends_only_the_bits_they_need() -> None:
    from proxy.cancel import KeyLayout
    layout = KeyLayout(peer_id=2, largest_peer_id=3, worker=1, workers=2)
    assert (layout.routing_bits, layout.random_bits) == (4, 28)  # forwarded bit, 2 peer bits, 1 worker bit
    other = KeyLayout(peer_id=3, largest_peer_id=3)  # another peer reads the peer field alike
    for _ in range(100):
        value = int.from_bytes(layout.issue(os.urandom(4)), "big")
        assert (layout.peer_of(value), layout.worker_of(value), layout.forwarded(value)) == (2, 1, False)
        assert other.peer_of(value) == 2
        forwarded = int.from_bytes(other.mark_forwarded(value), "big")
        assert layout.forwarded(forwarded) and layout.as_issued(forwarded) == value.to_bytes(4, "big")


def test_a_cancel_for_another_peer_is_forwarded_once_and_one_forwarded_here_for_another_is_dropped() -> None:
    from proxy.cancel import ANY_WORKER, KeyLayout
    sent: list[tuple[int, int, int, bytes]] = []

    def forward(peer_id: int, worker: int, process_id: int, secret: bytes) -> bool:
        sent.append((peer_id, worker, process_id, secret))
        return True

    async def scenario() -> None:
        issuer = KeyLayout(peer_id=2, largest_peer_id=2)
        here = CancelKeys(KeyLayout(peer_id=1, largest_peer_id=2), forward)
        secret = issuer.issue(os.urandom(4))
        here.cancel(77, secret)
        assert len(sent) == 1 and sent[0][:3] == (2, ANY_WORKER, 77)
        assert issuer.forwarded(int.from_bytes(sent[0][3], "big"))
        here.cancel(77, sent[0][3])  # came back forwarded (a misconfigured peer): never forwarded again
        assert len(sent) == 1

    asyncio.run(scenario())
