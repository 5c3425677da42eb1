"""Reception: what a login needs from the pooler, driven by the login machine's events for one connection."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import TYPE_CHECKING, Final

from proxy.auth.cleartext import CleartextChecks
from proxy.auth.secrets import UserSecret
from proxy.cancel import CancelKeys
from proxy.client import ClientConnection, Login
from proxy.failed_logins import source_address
from proxy.log_levels import enabled_for
from proxy.logs import get_logger
from proxy.login import (
    AuthFailed,
    Authenticated,
    CancelRequested,
    ClientLeft,
    Identified,
    LoginEvent,
    LoginMachine,
    Refused,
    Reply,
    StartTls,
)
from proxy.parameters import settings_to_check
from proxy.pool import InLine
from proxy.protocol import errors
from proxy.protocol.errors import PgError
from proxy.registry import Registry
from proxy.routing import Router
from proxy.states import ClientState
from proxy.tls import ClientTls

# A C static when compiled, where time.monotonic is a lookup per call (see pool.py).
_monotonic: Final = time.monotonic

if TYPE_CHECKING:
    from proxy.pool import Pool, Waiter
    from proxy.server import ServerConnection

log = get_logger("client")  # login lines are the client's, as they always were

ADMIN_DATABASES = frozenset({"pgmux", "pgbouncer"})  # the console answers to PgBouncer's name too
# How long a WebSocket login whose StartupMessage came alone waits for a password sent unasked before it asks for
# SCRAM. The Neon driver sends it in the same JavaScript turn, but without coalesceWrites in a frame of its own
# that node may write a loop iteration later; a client that waits to be asked (pipelineConnect false) pays this once.
PIPELINED_PASSWORD_WAIT: Final = 0.02


class Reception(Login, InLine):
    """One connection's login: asks the pooler what the machine's events need, and tells the client.

    Secret lookup, client limits, admission, the pool and its warm-up, the startup-settings check,
    the cancel key, the admin console hand-off, the counting and logging of refusals, and
    client_login_timeout (checked by the janitor, so no login pays for a timer).
    """

    def __init__(self, router: Router, registry: Registry[ClientConnection], cancel_keys: CancelKeys,
                 client: ClientConnection, tls: ClientTls, server_name: str | None = None,
                 cleartext: CleartextChecks | None = None) -> None:
        self.router = router
        self.registry = registry
        self.cancel_keys = cancel_keys
        self.client = client
        self.tls = tls  # what the listener offers, as it was when the connection came
        self.machine = LoginMachine(router.ignore_startup_parameters, tls.offered, tls.required)
        # A WebSocket session: the host name its HTTP request named (selects a database as SNI does), and the
        # checks for a password the client sends before it is asked (the Neon driver's pipelineConnect).
        self.server_name = server_name
        self._cleartext = cleartext
        self._task: asyncio.Task[None] | None = None  # the welcome, while it waits for the pool's first server
        self._waiter: Waiter | None = None  # session mode: the welcome's place in line for the session's server
        # A WebSocket login waiting PIPELINED_PASSWORD_WAIT for a password sent unasked, and the secret it is for.
        self._password_wait: asyncio.TimerHandle | None = None
        self._secret: UserSecret | None = None

    # ---- Login ------------------------------------------------------------------------------------

    def connection_made(self) -> None:
        # Decided now, told after the StartupMessage: drivers expect their SSLRequest answered first,
        # and a CancelRequest must get through even when pgmux is full.
        refusal = self.registry.client_limit_error() or self._failed_too_often()
        if refusal is not None:
            self.machine.refuse(refusal)

    def _address(self) -> str:
        """The client's IP address ('' for a Unix socket: not limited)."""
        return source_address(self.client.peer)

    def _failed_too_often(self) -> PgError | None:
        """The refusal for an address past auth_failure_limit failed logins: no password work is done for it."""
        if not self.registry.failed_logins:
            return None  # the usual case: no failures on record, nothing to look up
        settings = self.router.settings
        address = self._address()
        if not address:
            return None
        retry_in = self.registry.failed_logins.blocked_for(address, _monotonic(), settings.auth_failure_limit,
                                                           settings.auth_failure_window)
        if not retry_in:
            return None
        self.registry.count_auth_failure("rate_limited", self.registry.transport_of(self.client))
        self.registry.count_rejection("auth_rate_limited")
        log.warning("login refused: %s had %d failed logins within auth_failure_window", address,
                    settings.auth_failure_limit, extra={"conn": self.client.id})
        return errors.too_many_failed_logins(address, retry_in)

    def data_received(self, data: bytes) -> bytes:
        rest = self._handle(self.machine.feed(data))
        if self._password_wait is not None and self.machine.pipelined:
            return self._stop_waiting()  # the password came unasked
        return rest

    def check_timeout(self, now: float) -> None:
        if self._waiter is not None:
            return  # authenticated, in line for a server: query_wait_timeout decides, as for any request
        timeout = self.router.settings.client_login_timeout
        if timeout and now - self.client.connected_at > timeout:
            self.registry.count_rejection("login_timeout")
            self.client.fail(PgError(errors.SqlState.PROTOCOL_VIOLATION,
                                     f"client_login_timeout={timeout:g}s reached before the login finished",
                                     severity=errors.Severity.FATAL))

    def close(self) -> None:
        if self._password_wait is not None:
            self._password_wait.cancel()
            self._password_wait = None
        if self._task is not None:
            self._task.cancel()
            self._task = None
        waiter, self._waiter = self._waiter, None
        if waiter is not None and self.client.pool is not None:
            self.client.pool.cancel_wait(waiter)

    # ---- the machine's events ---------------------------------------------------------------------

    def _handle(self, events: list[LoginEvent]) -> bytes:
        """Act on ``events``; return the bytes pipelined behind the login (the session's)."""
        client = self.client
        for event in events:
            if client.state is ClientState.CLOSED:
                break
            if isinstance(event, Reply):
                client.write(event.data)
            elif isinstance(event, StartTls):
                # What the first records decrypt to (nothing until the handshake is done) is read next.
                assert client.transport is not None
                return client.start_tls(self.tls.wrap(client.transport, event.direct), event.initial)
            elif isinstance(event, Identified):
                return self._identified(event)
            elif isinstance(event, Authenticated):
                self._authenticated(event)
                return event.leftover
            elif isinstance(event, AuthFailed):
                self._auth_failed(event)
            elif isinstance(event, Refused):
                client.fail(event.error, reason=event.reason)
            elif isinstance(event, CancelRequested):
                self.cancel_keys.cancel(event.process_id, event.secret_key)
                client.close("cancel request handled")
            elif isinstance(event, ClientLeft):
                client.close("client left during authentication")
        return b""

    def _identified(self, event: Identified) -> bytes:
        client = self.client
        client.user, client.database = event.user, self._database(event.database)
        if (self.tls.user_must_match_certificate and client.tls is not None
                and client.tls.session.peer_common_name() != event.user):
            self.registry.count_rejection("client_certificate")
            log.warning("login refused: the client certificate does not name user %r", event.user,
                        extra={"conn": client.id})
            client.fail(errors.certificate_user_mismatch(event.user))
            return b""
        # Never changed in place (see ClientConnection.__init__): each may name the same dict as another.
        client.params = client.startup_params = event.parameters.synced
        client.unreported = client.startup_unreported = event.parameters.unreported
        if client.database in ADMIN_DATABASES:
            secret = self.router.admin_secret(event.user)
        else:
            # Nothing is created or counted for the user yet: a name alone must cost no state.
            secret = self.router.login_secret(client.database, event.user)
            if self._refused(self.router.admission.refusal(client.database, event.user)):
                return b""
            if secret is None and self.router.looks_up(client.database, event.user):
                client.state = ClientState.AUTH
                self._task = self.registry.spawn(self._authenticate_looked_up(), name=f"auth_query {client.id}")
                return b""
        client.state = ClientState.AUTH
        return self._ask_password(secret)

    def _ask_password(self, secret: UserSecret | None) -> bytes:
        """Authenticate now, or, for a WebSocket login that has sent nothing more yet, once its password comes
        unasked or PIPELINED_PASSWORD_WAIT has passed."""
        if self._cleartext is not None and not self.machine.pipelined:
            self._secret = secret
            self._password_wait = asyncio.get_running_loop().call_later(PIPELINED_PASSWORD_WAIT, self._waited)
            return b""
        return self._authenticate(secret)

    def _stop_waiting(self) -> bytes:
        wait, self._password_wait = self._password_wait, None
        if wait is not None:
            wait.cancel()
        secret, self._secret = self._secret, None
        return self._authenticate(secret)

    def _waited(self) -> None:
        """Nothing came unasked: the client waits to be asked, as over TCP."""
        self._password_wait = None
        if self.client.state is ClientState.AUTH:
            self.client.received(self._stop_waiting())

    def _authenticate(self, secret: UserSecret | None) -> bytes:
        """Ask for the password: in cleartext from a WebSocket client that sent it unasked (the Neon driver's
        pipelineConnect), else as the listener's auth_type says."""
        client = self.client
        end_point = self.tls.end_point if client.tls is not None else None
        cleartext = self._cleartext if self.machine.pipelined else None
        return self._handle(self.machine.authenticate(client.listener.auth_type, secret, end_point, cleartext))

    async def _authenticate_looked_up(self) -> None:
        """The user is not configured: authenticate it against what auth_query says (an unknown user, too, runs
        the whole exchange and fails as a wrong password does)."""
        client = self.client
        try:
            secret = await self.router.looked_up_secret(client.database, client.user)
        except PgError as exc:
            client.fail(dataclasses.replace(exc, severity=errors.Severity.FATAL), reason=exc.reason)
            return
        self._task = None
        if client.state is ClientState.AUTH:
            client.received(self._ask_password(secret))

    def _database(self, asked: str) -> str:
        """The database a login goes to: the one its host name selects (TLS SNI, a WebSocket's HTTP request), else
        the one it named."""
        tls = self.client.tls
        server_name = tls.session.server_name if tls is not None else self.server_name
        if server_name is not None and asked not in ADMIN_DATABASES:
            selected = self.router.database_for_server_name(server_name)
            if selected is not None:
                return selected
        return asked

    def _auth_failed(self, event: AuthFailed) -> None:
        client = self.client
        address = self._address()
        if address:
            self.registry.failed_logins.failed(address, _monotonic(), self.router.settings.auth_failure_window)
        if self._database_unknown():
            self.registry.count_auth_failure("unknown_database", self.registry.transport_of(client))
            self.registry.count_rejection("unknown_database")
            log.warning("login refused: database %r does not exist in pgmux (the client is told: wrong "
                        "password)", client.database, extra={"conn": client.id})
        else:
            self.registry.count_auth_failure(event.kind, self.registry.transport_of(client))
            self.registry.count_rejection("auth_failed")
            log.warning("authentication failed for user %r from %s: %s", client.user, address or "a Unix socket",
                        event.log_reason, extra={"conn": client.id})
        client.fail(event.error)

    def _authenticated(self, event: Authenticated) -> None:
        client = self.client
        # Checked again: logins that ran side by side may have filled max_client_conn meanwhile.
        refusal = self.registry.client_limit_error()
        if refusal is not None:
            client.fail(refusal)
            return
        self.registry.login_finished(client)
        if client.database in ADMIN_DATABASES:
            self._open_admin_console()
            return
        if self._database_unknown():  # only a trust listener lets such a login this far
            self.registry.count_rejection("unknown_database")
            client.fail(errors.unknown_database(client.database))
            return
        if self._refused(self.router.admission.admit(client.database, client.user)):
            return
        client.admitted = True
        pool = self.router.login_pool(client.database, client.user, event.scram_keys)
        client.begin_session(pool)
        if pool.server_params is not None and not self._unchecked_settings(pool):
            self._welcome(pool)
        else:
            self._task = self.registry.spawn(self._welcome_after_checks(pool), name=f"welcome {client.id}")

    def _refused(self, refusal: tuple[PgError, str] | None) -> bool:
        """Tell the client an admission refusal, counted under its reason; True when there was one."""
        if refusal is None:
            return False
        error, reason = refusal
        self.registry.count_rejection(reason)
        self.client.fail(error)
        return True

    def _database_unknown(self) -> bool:
        """The login named a database pgmux does not serve."""
        database = self.client.database
        return database not in ADMIN_DATABASES and not self.router.serves_database(database)

    # ---- the welcome ------------------------------------------------------------------------------

    def _unchecked_settings(self, pool: Pool) -> dict[str, str]:
        client = self.client
        return settings_to_check(client.startup_params, client.unreported, pool.server_params or {},
                                 pool.accepted_settings)

    async def _welcome_after_checks(self, pool: Pool) -> None:
        """The welcome waits for what it needs a backend for: the server's parameters (the pool's first
        login reports them) and PostgreSQL's verdict on startup settings this pool has not seen accepted.
        """
        try:
            await pool.warm_up()
            unchecked = self._unchecked_settings(pool)
            if unchecked:
                # As PostgreSQL refuses a login with a setting it rejects: pgmux could never apply it.
                await pool.check_settings(unchecked)
        except PgError as exc:
            self._fail(exc)
            return
        self._task = None
        if self.client.state is ClientState.LOGIN:
            self._welcome(pool)

    def _fail(self, error: PgError) -> None:
        """At login there is no session to keep: the error that stopped it, as FATAL."""
        self.client.fail(dataclasses.replace(error, severity=errors.Severity.FATAL), reason=error.reason)

    def _welcome(self, pool: Pool) -> None:
        client = self.client
        # The client is told, and its backends given, each startup value as PostgreSQL spells it: the
        # welcome says what PostgreSQL would, and a backend's report then matches what the client wants.
        sets = pool.parameter_sets
        if client.startup_params:
            client.startup_params = {name: pool.spelled(name, value)
                                     for name, value in client.startup_params.items()}
        # The server's synced parameters with the client's over them (its own keys only after the server's).
        params = dict(pool.synced_defaults())
        params.update(client.startup_params)
        # Held from now on as the pool's shared copies: idle clients are many, their parameters mostly alike.
        client.params = sets.shared(params)
        client.startup_params = sets.shared(client.startup_params)
        client.unreported = client.startup_unreported = sets.shared(client.unreported)
        if client.transaction_mode:
            client.cancel_key = self.cancel_keys.register(client)
            self._greet(pool)
        else:
            self._take_session_server(pool)

    # ---- session mode: the session's server first, so that the welcome can name its pid -----------

    def _take_session_server(self, pool: Pool) -> None:
        """The server this client keeps for its session, now or once the pool lends one (query_wait_timeout)."""
        server = pool.take_idle()
        if server is not None:
            self._greet_linked(pool, server)
            return
        client = self.client
        try:
            self._waiter = pool.wait(self)
        except PgError as exc:  # the line is full, or the upstream is down
            self._fail(exc)
            return
        client.state = ClientState.WAITING  # what it is: in line (SHOW CLIENTS, cl_waiting, pgmux_clients)
        client.wait_started = _monotonic()

    def server_ready(self, server: ServerConnection, now: float = 0.0) -> None:
        """The session's server (see _take_session_server)."""
        self._waiter = None
        pool = self.client.pool
        assert pool is not None
        if self.client.state is not ClientState.WAITING:
            pool.release(server)  # the client left while the server was on its way: it is untouched
        elif not server.usable:
            pool.close_server(server, "died before its next client used it")
            self._take_session_server(pool)
        else:
            self._greet_linked(pool, server)

    def server_refused(self, error: PgError) -> None:
        self._waiter = None
        if self.client.state is ClientState.WAITING:
            self._fail(error)

    def _greet_linked(self, pool: Pool, server: ServerConnection) -> None:
        """Link the session's server, and welcome the client with that backend's real pid (pgmux's secret:
        a CancelRequest still comes to pgmux, is checked, and goes on with the backend's own key)."""
        client = self.client
        assert server.backend_key is not None  # a logged-in backend has said its key
        client.cancel_key = self.cancel_keys.register(client, server.backend_key[0])
        # Its parameters are the client's before any request of the client's runs (link holds them
        # until PostgreSQL confirms); the sync's own ParameterStatus replies never reach the client,
        # so the welcome's values are the client's.
        client.link(server)
        self._greet(pool)

    def _greet(self, pool: Pool) -> None:
        """The welcome: the server's parameters with the client's own over them, and its cancel key."""
        client = self.client
        process_id, secret = client.cancel_key
        client.write(pool.welcome.message(pool.server_params or {}, client.params, process_id, secret))
        if enabled_for(log, logging.INFO) and self.router.settings.log_connections:  # as in ClientConnection._finish
            log.info("login ok: %s@%s from %s (%s mode)", client.user, client.database, client.peer,
                     "transaction" if client.transaction_mode else "session", extra={"conn": client.id})
        pool.stats.client_logins += 1
        client.logged_in()

    def _open_admin_console(self) -> None:
        client = self.client
        role = self.router.admin_role(client.user)
        if role is None:
            self.registry.count_rejection("admin_not_allowed")
            client.fail(errors.admin_not_allowed(client.user))
            return
        console = self.registry.open_console(client, role == "admin")
        client.open_console(console)
        client.write(console.welcome())
        log.info("admin console login: %s (%s)", client.user, role, extra={"conn": client.id})
