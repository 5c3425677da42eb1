"""Registry: the live client connections, the tasks pgmux owns and the refusal counts (uvicorn's ServerState)."""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable, Coroutine
from typing import Any, Final, Generic, Protocol, TypeVar

from mypy_extensions import mypyc_attr

from proxy.admission import Admission
from proxy.failed_logins import FailedLogins
from proxy.logs import get_logger
from proxy.protocol import errors
from proxy.stats import HttpStats

log = get_logger("registry")

# How clients reach pgmux (the metrics' transport label): PostgreSQL over TCP, a WebSocket session, an HTTP request.
TCP: Final = "tcp"
WEBSOCKET: Final = "websocket"
HTTP: Final = "http"
TRANSPORTS: Final = (TCP, WEBSOCKET, HTTP)

# The client connection type: generic, so that this module never imports the client edge that uses it.
ClientT = TypeVar("ClientT")


class Console(Protocol):
    """Where a client's bytes go once it logged in to the admin console (admin.AdminSession).

    A Protocol, not a mypyc trait: its implementation is interpreted code, off the hot path.
    """

    def welcome(self) -> bytes:
        """What the client is told once it is on the console: AuthenticationOk up to ReadyForQuery."""
        ...

    def feed(self, data: bytes) -> None:
        ...


@mypyc_attr(native_class=False)  # a dict subclass cannot be a native class
class Tally(dict[str, int]):
    """Counts by name, a name not counted yet reading as 0, as in a Counter: for the counts every connection and
    login adds to. A Counter defines __delitem__ in Python, which sends even its item assignments through an
    interpreted slot; this class leaves dict's own."""

    def __missing__(self, key: str) -> int:
        return 0


class Registry(Generic[ClientT]):
    """What every connection shares that is not routing: who is connected, what runs, what was refused.

    The composition root (app.Proxy) builds it; clients, the admin console and /metrics get it instead
    of the whole Proxy.
    """

    def __init__(self, admission: Admission, open_console: Callable[[ClientT, bool], Console]) -> None:
        self.admission = admission
        # What a console login becomes (client, may modify): the composition root alone sees what it needs.
        self.open_console = open_console
        self.clients: set[ClientT] = set()
        # The clients that have not authenticated yet, oldest first (a dict keeps arrival order).
        self.logging_in: dict[ClientT, None] = {}
        self.rejections: collections.Counter[str] = collections.Counter()
        self.session_changes: collections.Counter[str] = collections.Counter()  # by sql_words kind
        self.tls_failures: collections.Counter[str] = collections.Counter()  # client TLS, by TlsError reason
        self.auth_failures: collections.Counter[str] = collections.Counter()  # failed logins, by kind
        self.failed_logins = FailedLogins()
        self.session_refusals: collections.Counter[str] = collections.Counter()  # by session_state.PIN_KINDS kind
        self.accepted = Tally()  # clients accepted since start, by transport
        # Clients over other transports than TCP, by transport, and each one's transport (TCP, the usual case,
        # costs a login no bookkeeping: its count is what remains of ``clients``).
        self.connected: collections.Counter[str] = collections.Counter()
        self.logins = Tally()  # successful logins, by transport
        self.failed_logins_by_transport: collections.Counter[str] = collections.Counter()
        self._transport: dict[ClientT, str] = {}
        # CancelRequests sent on to the pgmux that issued their key (proxy/peering.py), by "peer" / "worker".
        self.cancels_forwarded: collections.Counter[str] = collections.Counter()
        self.cancel_forward_failures: collections.Counter[str] = collections.Counter()
        self.http = HttpStats()  # HTTP /sql requests (proxy/http/sql.py)
        self.draining = False  # shutdown has begun: new logins are refused
        self.tasks: set[asyncio.Task[Any]] = set()

    # ---- tasks ------------------------------------------------------------------------------------

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        """Start a task that the proxy owns: it is tracked until done, and its failure is logged."""
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self.tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("task %s failed", task.get_name(), exc_info=task.exception())

    # ---- clients ----------------------------------------------------------------------------------

    def add(self, client: ClientT, transport: str = TCP) -> None:
        """A client connected (``transport``: TRANSPORTS): it counts as logging in until login_finished."""
        self.accepted[transport] += 1
        if transport != TCP:
            self.connected[transport] += 1
            self._transport[client] = transport
        self.clients.add(client)
        self.logging_in[client] = None

    def oldest_logging_in(self, limit: int) -> ClientT | None:
        """The client to crowd out when ``limit`` clients are logging in already (None: there is room).

        Refusing the newcomer instead would let sockets that never log in lock everyone out.
        """
        return next(iter(self.logging_in)) if len(self.logging_in) >= limit else None

    def client_limit_error(self) -> errors.PgError | None:
        """The refusal for a client still logging in: at connect (before any authentication work) and again
        once it has authenticated. max_client_conn counts logged-in clients, this one included."""
        if self.draining:
            self.count_rejection("shutdown")
            return errors.shutting_down()
        refusal = self.admission.check_connection(len(self.clients) - len(self.logging_in) + 1)
        if refusal is not None:
            self.count_rejection("max_client_conn")
        return refusal

    def login_finished(self, client: ClientT) -> None:
        """The client has authenticated: it no longer counts against max_login_clients."""
        self.logging_in.pop(client, None)
        self.logins[self.transport_of(client)] += 1

    def forget_client(self, client: ClientT) -> None:
        """The connection ended."""
        self.clients.discard(client)
        self.logging_in.pop(client, None)
        if self._transport:
            transport = self._transport.pop(client, None)
            if transport is not None:
                self.connected[transport] -= 1

    def transport_of(self, client: ClientT) -> str:
        return self._transport.get(client, TCP) if self._transport else TCP

    def connected_by_transport(self) -> dict[str, int]:
        """Live clients by transport (TCP's: all the others)."""
        return {**self.connected, TCP: len(self.clients) - sum(self.connected.values())}

    # ---- counters -----------------------------------------------------------------------------

    def count_rejection(self, reason: str) -> None:
        self.rejections[reason] += 1

    def count_auth_failure(self, kind: str, transport: str) -> None:
        """A login over ``transport`` failed (a wrong password, an unknown user...) or was refused for the
        failures before it."""
        self.auth_failures[kind] += 1
        self.failed_logins_by_transport[transport] += 1

    def count_tls_failure(self, reason: str) -> None:
        """A client's TLS handshake (or a record after it) failed for ``reason``."""
        self.tls_failures[reason] += 1

    def count_session_change(self, kind: str) -> None:
        """A client ran a statement that may change its session's state of this kind."""
        self.session_changes[kind] += 1

    def count_session_refusal(self, kind: str) -> None:
        """A statement that would have created session-only state of this kind was refused (session_state = refuse)."""
        self.session_refusals[kind] += 1
