"""Proxy, the composition root: builds the registry, cancel keys, router and observers; runs the process."""

from __future__ import annotations

import asyncio
import functools
import os
import signal
import time
from collections.abc import Callable
from typing import Any

from proxy import BUILD, __version__
from proxy.admin import AdminSession, Lifecycle, WorkerConsole
from proxy.admission import Admission
from proxy.cancel import ANY_WORKER, CancelKeys, KeyLayout
from proxy.http.exchange import Endpoint
from proxy.http.listener import HttpConnection, HttpRoutes
from proxy.http.sql import SqlEndpoint
from proxy.client import ClientConnection
from proxy.logs import get_logger
from proxy.metrics import MetricsServer, Readiness
from proxy.peering import CancelForwarder, SiblingConsoles, WorkerRole, listen_for_siblings
from proxy.protocol import errors
from proxy.reception import Reception
from proxy.registry import TCP, WEBSOCKET, Registry
from proxy.routing import Router
from proxy.settings import ListenerSettings, Settings, split_address
from proxy.slots import WorkerLedger
from proxy.sockets import Listening, listen
from proxy.states import ClientState
from proxy.stats import StatsWindow, stats_log_line
from proxy.tls import NO_TLS, ClientTls, client_tls_options, load_client_tls

log = get_logger("app")

JANITOR_PERIOD = 0.25  # how often timeouts are checked: their resolution


class Proxy:
    """One running pgmux: owns every connection, pool and task it starts."""

    def __init__(self, settings: Settings, worker: WorkerRole = WorkerRole(),
                 ledger: WorkerLedger | None = None) -> None:
        self.ledger = ledger  # with workers: the other workers' backends under the same limits (proxy/slots.py)
        admission = Admission(
            settings.max_client_conn, settings.max_db_client_connections, settings.max_user_client_connections,
            {name: db.max_db_client_connections for name, db in settings.all_databases().items()
             if db.max_db_client_connections is not None}, settings.max_login_clients)
        self.registry: Registry[ClientConnection] = Registry(admission, self._open_console)
        self.router = Router(settings, admission, self.registry.spawn, self.registry.count_rejection, ledger)
        # Cancel routing: keys name this (peer_id, worker); other peers' and sibling workers' keys are forwarded.
        self.worker = worker
        self.cancel_forwarder = CancelForwarder(self.registry.spawn, self.registry.cancels_forwarded,
                                                self.registry.cancel_forward_failures)
        for peer_id, address in settings.peers.items():
            if peer_id != settings.peer_id:  # an entry for itself is allowed (one [peers] for all) and ignored
                self.cancel_forwarder.add_route(peer_id, ANY_WORKER, address)
        for index, address in worker.siblings.items():
            if index != worker.index:
                self.cancel_forwarder.add_route(settings.peer_id, index, address)
        layout = KeyLayout(settings.peer_id, max([settings.peer_id, *settings.peers]), worker.index, worker.count)
        self.cancel_keys = CancelKeys(layout, self.cancel_forwarder.forward)
        self._sibling_listener: asyncio.AbstractServer | None = None
        self.sql_endpoint: Endpoint = SqlEndpoint(self.router, self.registry)  # what HTTP listeners answer /sql with
        self.addresses: list[tuple[str, int]] = []  # where the listeners are bound, in listener order
        # What each listener offers clients (client_tls_*), in listener order; a bad file refuses the start.
        self.client_tls: list[ClientTls] = [_load_client_tls(settings, listener)
                                            for listener in settings.all_listeners()]
        self._servers: list[Listening] = []
        self._janitor: asyncio.Task[None] | None = None
        self._stopped = asyncio.Event()
        self.reload_settings: Callable[[], Settings] | None = None  # where RELOAD / SIGHUP read settings from
        # Observability and the admin console (metrics.py, admin.py).
        self.stats_window = StatsWindow()
        self.readiness = Readiness(self.registry, self.router, self.addresses)
        self.metrics: MetricsServer | None = None
        lifecycle = Lifecycle(shutdown=self._shutdown_all, reload=self.reload_from_source, kill=self.kill)
        self.console = WorkerConsole(self.registry, self.router, self.stats_window, lifecycle, worker.index,
                                     worker.count)
        # With sibling workers, each console connection answers for the whole pgmux (admin.AdminSession).
        others = {index: address for index, address in worker.siblings.items() if index != worker.index}
        self.sibling_consoles = SiblingConsoles(others) if others else None
        self.http_connections: set[HttpConnection] = set()

    @property
    def settings(self) -> Settings:
        """The configuration in force: the router holds it, and reload replaces it there."""
        return self.router.settings

    def _open_console(self, client: ClientConnection, can_modify: bool) -> AdminSession:
        return AdminSession(self.console, client, can_modify, self.sibling_consoles)

    def shutdown(self, graceful: bool) -> None:
        """Begin stopping (see stop), as a task the proxy owns: for signals and the admin console."""
        self.registry.spawn(self.stop(graceful=graceful), name="shutdown")

    def _shutdown_all(self, graceful: bool) -> None:
        """The console's SHUTDOWN: of the whole pgmux. A worker asks its supervisor, which stops every worker
        as on SIGTERM (graceful) or SIGINT, and does not replace them."""
        if self.worker.supervisor:
            os.kill(self.worker.supervisor, signal.SIGTERM if graceful else signal.SIGINT)
        else:
            self.shutdown(graceful)

    # ---- listening ----------------------------------------------------------------------------

    async def start(self) -> None:
        log.info("pgmux %s, %s", __version__, BUILD.describe())
        loop = asyncio.get_running_loop()
        for index, listener in enumerate(self.settings.all_listeners()):
            host, port = split_address(listener.address)
            if listener.protocol == "http":
                accept: Callable[[], Any] = functools.partial(self._accept_http, listener, index)
            else:
                accept = functools.partial(self._accept, listener, index)
            # PostgreSQL listeners accept through pgmux's compiled transport where it is built; HTTP ones
            # through asyncio (h11 reads whole requests: nothing to relay).
            server = await listen(loop, host, port, accept, compiled=listener.protocol != "http",
                                  reuse_port=self.worker.count > 1)
            self._servers.append(server)
            bound = server.sockets[0].getsockname()
            self.addresses.append((bound[0], bound[1]))
            log.info("listening on %s:%d (%s, %s pooling, %s auth, client TLS %s)", bound[0], bound[1],
                     listener.protocol, listener.pool_mode.value, listener.auth_type.value,
                     self.client_tls[index].mode.value)
        if self.worker.cancel_address is not None:
            self._sibling_listener = await listen_for_siblings(self.worker.cancel_address, self.cancel_keys,
                                                               self.console.answer)
        if self.cancel_keys.layout.routing_bits:
            log.info("cancel keys carry peer %d, worker %d (%d routing bits, %d random)", self.settings.peer_id,
                     self.worker.index, self.cancel_keys.layout.routing_bits, self.cancel_keys.layout.random_bits)
        if self.ledger is not None:
            self.ledger.start()
        self._janitor = self.registry.spawn(self._run_janitor(), name="janitor")
        self.registry.spawn(self._run_stats(), name="stats")
        if self.settings.metrics_listen:
            self.metrics = MetricsServer(self.registry, self.router, self.readiness)
            await self.metrics.start(self.settings.metrics_listen)
            self.registry.spawn(self.readiness.run(), name="readiness")

    def _accept(self, listener: ListenerSettings, index: int) -> ClientConnection:
        """A PostgreSQL client over TCP (its TLS, if any, is the listener's)."""
        client = ClientConnection(self.router, self.registry, self.cancel_keys, listener)
        client.login = Reception(self.router, self.registry, self.cancel_keys, client, self.client_tls[index])
        return self._admit(client, TCP)

    def _open_websocket_session(self, listener: ListenerSettings, server_name: str | None) -> ClientConnection:
        """A PostgreSQL client inside a WebSocket: no TLS of its own (wss is the HTTP connection's), its host
        name selecting a database as SNI does, and its password taken in cleartext when it sends it unasked."""
        client = ClientConnection(self.router, self.registry, self.cancel_keys, listener)
        client.login = Reception(self.router, self.registry, self.cancel_keys, client, NO_TLS, server_name,
                                 self.router.cleartext)
        return self._admit(client, WEBSOCKET)

    def _admit(self, client: ClientConnection, transport: str) -> ClientConnection:
        registry = self.registry
        limit = registry.admission.login_limit()  # not Settings: a pydantic attribute read costs more than this
        oldest = registry.oldest_logging_in(limit)
        if oldest is not None:
            oldest.fail(errors.login_crowded_out(limit), reason="login_limit")
        registry.add(client, transport)
        return client

    def _accept_http(self, listener: ListenerSettings, index: int) -> HttpConnection:
        routes = HttpRoutes(sql=self.sql_endpoint,
                            open_session=functools.partial(self._open_websocket_session, listener),
                            max_request_size=lambda: int(self.settings.http_max_request_size),
                            count_tls_failure=self.registry.count_tls_failure, connections=self.http_connections)
        return HttpConnection(routes, self.client_tls[index])

    # ---- upkeep and shutdown ------------------------------------------------------------------

    async def _run_janitor(self) -> None:
        while True:
            await asyncio.sleep(JANITOR_PERIOD)
            now = time.monotonic()
            for pool in list(self.router.pools.values()):
                pool.maintain(now)
            if self.ledger is not None:
                self.ledger.maintain()
            for client in list(self.registry.clients):
                client.check_timeouts(now)
            self.router.drop_unused_pools(now)

    async def stop(self, graceful: bool = True) -> None:
        """Stop listening; let transactions finish (up to shutdown_timeout) if graceful; close everything."""
        registry = self.registry
        if registry.draining:
            graceful = False
        registry.draining = True
        for server in self._servers:
            server.close()
        if self._sibling_listener is not None:
            self._sibling_listener.close()
        if graceful:
            deadline = time.monotonic() + self.settings.shutdown_timeout
            while time.monotonic() < deadline:
                for client in list(registry.clients):
                    if client.state is ClientState.ADMIN or client.at_transaction_boundary():
                        client.fail(errors.shutting_down())
                if not registry.clients:
                    break
                await asyncio.sleep(0.05)
        for client in list(registry.clients):
            client.fail(errors.shutting_down())
        for connection in list(self.http_connections):
            connection.close()
        for pool in self.router.pools.values():
            pool.close_all("pgmux is shutting down")
        if self._janitor is not None:
            self._janitor.cancel()
        current = asyncio.current_task()
        for task in list(registry.tasks):
            if task is not current:
                task.cancel()
        await asyncio.sleep(0)
        if self.metrics is not None:
            self.metrics.close()
        if self.ledger is not None:
            self.ledger.stop()
        self._stopped.set()

    def reload(self, settings: Settings) -> None:
        """Apply a new configuration without dropping connected clients.

        Pool sizes, limits and timeouts take effect at once (surplus idle servers close at the next
        janitor pass); added databases accept logins; removed ones refuse new logins while their
        connected clients finish; a changed upstream gets fresh servers as the old ones come back.
        Listeners are bound at start and need a restart to change.
        """
        listeners = self.settings.all_listeners()
        if [l.model_dump() for l in settings.all_listeners()] != [l.model_dump() for l in listeners]:
            log.warning("reload: listener changes need a restart; keeping the current listeners")
        else:
            listeners = settings.all_listeners()
        self._reload_client_tls(settings, listeners)
        self.router.reload(settings)
        log.info("configuration reloaded")

    def _reload_client_tls(self, settings: Settings, listeners: list[Any]) -> None:
        """Certificates and keys read again for new connections (connected clients keep their TLS); a
        listener whose files fail to load keeps what it had."""
        for index, listener in enumerate(listeners):
            try:
                self.client_tls[index] = _load_client_tls(settings, listener)
            except ValueError as exc:
                log.error("reload: client TLS of listener %s keeps its current certificate: %s", listener.address,
                          exc)

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    def reload_from_source(self) -> str | None:
        """Reload from where the settings came from (SIGHUP, admin RELOAD); returns why not, or None."""
        if self.reload_settings is None:
            return "pgmux was started without a configuration source to reload from"
        try:
            new_settings = self.reload_settings()
        except Exception as exc:  # an invalid file must never take the running pooler down
            log.error("reload refused, keeping the current configuration: %s", exc)
            return str(exc)
        self.reload(new_settings)
        return None

    # ---- the periodic stats line (PgBouncer's "stats: ...") ---------------------------------------

    async def _run_stats(self) -> None:
        """Every stats_period: record totals for SHOW STATS averages and log the line (off when 0)."""
        while True:
            await asyncio.sleep(self.settings.stats_period or 60.0)
            averages = self.stats_window.tick(self.router.totals_by_database(), time.monotonic())
            if self.settings.stats_period:
                log.info("%s", stats_log_line(averages))

    # ---- the admin console's KILL: clients and servers together ----------------------------------

    def kill(self, database: str | None) -> None:
        """Drop every client and server of ``database`` (None: all) now; new clients wait for RESUME."""
        router = self.router
        names = [database] if database is not None else router.database_names()
        log.info("KILL %s: closing its clients and servers", database or "(all databases)")
        router.paused.update(names)
        for client in list(self.registry.clients):
            if client.state is not ClientState.ADMIN and client.database in names:
                client.fail(errors.killed_by_admin(client.database))
        router.kill_servers(database)


def _load_client_tls(settings: Settings, listener: ListenerSettings) -> ClientTls:
    return load_client_tls(client_tls_options(settings, listener), http=listener.protocol == "http")


async def run(settings: Settings, on_ready: Any = None, reload_settings: Callable[[], Settings] | None = None,
              worker: WorkerRole = WorkerRole(), ledger: WorkerLedger | None = None) -> None:
    """Serve until SIGTERM (drain) or SIGINT (fast stop); SIGHUP reloads via ``reload_settings``.

    ``worker``: this process's place among a pgmux's workers (the default: the only one);
    ``ledger``: with workers, its side of the workers' slot table.
    """
    proxy = Proxy(settings, worker, ledger)
    proxy.reload_settings = reload_settings
    await proxy.start()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, lambda: proxy.shutdown(graceful=True))
    loop.add_signal_handler(signal.SIGINT, lambda: proxy.shutdown(graceful=False))
    if reload_settings is not None:
        def on_hangup() -> None:
            log.info("SIGHUP: reloading the configuration")
            proxy.reload_from_source()

        loop.add_signal_handler(signal.SIGHUP, on_hangup)
    if on_ready is not None:
        on_ready(proxy)
    await proxy.wait_stopped()
    log.info("pgmux stopped")
