"""Configuration: one frozen Settings model from CLI flags > PGMUX_* env > TOML file > defaults; upstream URL parsing."""

from __future__ import annotations

import enum
import os
import ipaddress
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Final, Literal
from urllib.parse import parse_qs, quote, unquote, urlsplit

from pydantic import AfterValidator, BaseModel, BeforeValidator, ByteSize, ConfigDict, Field, SecretStr, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from proxy.auth.secrets import AuthMethod

DEFAULT_CONFIG_FILE = Path("pgmux.toml")


class PoolMode(str, enum.Enum):
    TRANSACTION = "transaction"
    SESSION = "session"


class SessionStatePolicy(str, enum.Enum):
    """What transaction mode does with session-only state (temporary tables, advisory locks, LISTEN...)."""

    PIN = "pin"  # the client keeps its backend until it releases that state or leaves
    REFUSE = "refuse"  # a statement that would create it fails with 0A000; the session stays usable
    IGNORE = "ignore"  # PgBouncer's behaviour: the state stays on the backend for whoever comes next


class SslMode(str, enum.Enum):
    DISABLE = "disable"
    ALLOW = "allow"
    PREFER = "prefer"
    REQUIRE = "require"
    VERIFY_CA = "verify-ca"
    VERIFY_FULL = "verify-full"


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(value: Any) -> Any:
    """Accept 5, 2.5, "250ms", "5s", "2m", "1h"; bare numbers are seconds, as in PgBouncer."""
    if isinstance(value, str):
        match = _DURATION.match(value)
        if not match:
            raise ValueError(f"{value!r} is not a duration: use seconds or a number with ms, s, m or h")
        return float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    return value


def _non_negative(value: float) -> float:
    if value < 0:
        raise ValueError("must not be negative")
    return value


Duration = Annotated[float, BeforeValidator(parse_duration), AfterValidator(_non_negative)]
Count = Annotated[int, Field(ge=0)]


@dataclass(frozen=True)
class Upstream:
    """Where and as whom pgmux connects for one database."""

    host: str
    port: int
    database: str
    user: str
    password: str | None
    sslmode: SslMode
    sslrootcert: str | None
    # Logging in without the password (a user looked up with auth_query): the ClientKey and ServerKey of its
    # SCRAM verifier, or its md5 hash. Never shown: redacted() leaves them out.
    scram_keys: tuple[bytes, bytes] | None = field(default=None, repr=False)
    md5_hash: str | None = field(default=None, repr=False)

    @property
    def unix_socket(self) -> str | None:
        """The socket path when ``host`` names a directory, as libpq does."""
        return f"{self.host}/.s.PGSQL.{self.port}" if self.host.startswith("/") else None

    def redacted(self) -> str:
        """The URL with its password hidden: the only form of it that may be logged or shown."""
        auth = quote(self.user, safe="") + (":***" if self.password is not None else "")
        if self.unix_socket:
            host = quote(self.host, safe="")
        elif ":" in self.host:
            host = f"[{self.host}]"  # an IPv6 address
        else:
            host = self.host
        return f"postgresql://{auth}@{host}:{self.port}/{self.database}?sslmode={self.sslmode.value}"

    def __repr__(self) -> str:
        return f"Upstream({self.redacted()})"


def parse_upstream_url(url: str) -> Upstream:
    """Parse a libpq-style URL (postgres:// or postgresql://), including ``?host=/socket/dir``."""
    parts = urlsplit(url)
    if parts.scheme not in ("postgres", "postgresql"):
        raise ValueError("upstream URL must start with postgresql://")
    query: dict[str, str] = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    host = query.pop("host", None) or unquote(parts.hostname or "") or "localhost"
    try:
        port = int(query.pop("port", None) or parts.port or 5432)
    except ValueError:
        # urlsplit's own message would quote what it took for the port: possibly part of the password.
        raise ValueError("upstream URL has an invalid port; percent-encode '/', '@', ':' and '#' "
                         "in the user name and password") from None
    user = unquote(query.pop("user", "") or parts.username or "")
    if not user:
        raise ValueError("upstream URL must name a user (postgresql://USER:PASSWORD@host/db)")
    password = query.pop("password", None)
    if password is None and parts.password is not None:
        password = unquote(parts.password)
    database = unquote(query.pop("dbname", "") or parts.path.lstrip("/") or user)
    try:
        sslmode = SslMode(query.pop("sslmode", "prefer"))
    except ValueError:
        raise ValueError(f"unknown sslmode; use one of {', '.join(m.value for m in SslMode)}") from None
    sslrootcert = query.pop("sslrootcert", None)
    if query:
        raise ValueError(f"unsupported upstream URL parameter(s): {', '.join(sorted(query))}")
    return Upstream(host, port, database, user, password, sslmode, sslrootcert)


def _valid_upstream_url(value: SecretStr) -> SecretStr:
    parse_upstream_url(value.get_secret_value())
    return value


UpstreamUrl = Annotated[SecretStr, AfterValidator(_valid_upstream_url)]


def _valid_address(value: str) -> str:
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{value!r} is not HOST:PORT")
    return value


Address = Annotated[str, AfterValidator(_valid_address)]


def split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)


class DatabaseSettings(_Section):
    """One `[databases.NAME]` entry: the upstream and per-database pool overrides (PgBouncer names)."""

    url: UpstreamUrl
    pool_size: Count | None = None
    min_pool_size: Count | None = None
    reserve_pool_size: Count | None = None
    max_db_connections: Count | None = None
    max_db_client_connections: Count | None = None
    # TLS host names (SNI) that select this database, whatever database the StartupMessage names: one
    # TLS listener then serves many databases, one host name each (tenant1.db.example.com).
    server_names: list[str] = []


class ListenerSettings(_Section):
    """One `[[listeners]]` entry: its own pool mode, client authentication and client TLS (None: the global one)."""

    address: Address
    # postgres: PostgreSQL's protocol over TCP. http: edge runtimes' front end (the Neon serverless driver),
    # WebSocket sessions and HTTP requests on one port, TLS (wss/https) from the client_tls_* settings.
    protocol: Literal["postgres", "http"] = "postgres"
    # An http listener without TLS carries passwords in plaintext: off loopback only when set (behind a
    # TLS-terminating proxy such as Caddy or nginx).
    allow_plaintext_http: bool = False
    pool_mode: PoolMode = PoolMode.TRANSACTION
    auth_type: AuthMethod = AuthMethod.SCRAM_SHA_256
    client_tls_sslmode: SslMode | None = None
    client_tls_cert_file: str | None = None
    client_tls_key_file: str | None = None
    client_tls_ca_file: str | None = None
    client_tls_protocols: str | None = None
    client_tls_ciphers: str | None = None


# PgBouncer's bound: a peer id travels in the cancel keys pgmux hands out (see proxy/cancel.py's KeyLayout).
MAX_PEER_ID = 16383
_PEER_KEYS = ("host", "port")


def _peer_connection_string(value: Any) -> Any:
    """A [peers] entry as PgBouncer writes it, "host=10.0.0.2 port=6432", read into its fields (a table passes)."""
    if not isinstance(value, str):
        return value
    fields: dict[str, str] = {}
    for pair in value.split():
        key, equals, setting = pair.partition("=")
        if not equals or not setting:
            raise ValueError(f"{pair!r} is not key=value (a peer is \"host=HOST port=PORT\")")
        if key not in _PEER_KEYS:
            raise ValueError(f"unknown peer setting {key!r}; use {' and '.join(_PEER_KEYS)}")
        fields[key] = setting
    return fields


class PeerAddress(_Section):
    """Where a pgmux takes CancelRequests: a `[peers]` entry (another pgmux of the fleet), or a worker's private
    cancel address. A host that begins with / is a directory holding the Unix socket .s.PGSQL.PORT, as libpq and
    PgBouncer read it."""

    host: Annotated[str, Field(min_length=1)]
    port: Annotated[int, Field(ge=1, le=65535)] = 6432

    @property
    def unix_socket(self) -> str | None:
        return f"{self.host}/.s.PGSQL.{self.port}" if self.host.startswith("/") else None

    def __str__(self) -> str:
        return self.unix_socket or (f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}")


Peer = Annotated[PeerAddress, BeforeValidator(_peer_connection_string)]
PeerId = Annotated[int, Field(ge=1, le=MAX_PEER_ID)]


class UserSettings(_Section):
    """One `[users.NAME]` entry: a plaintext password, an md5 hash (md5...) or a SCRAM verifier (SCRAM-SHA-256$...)."""

    password: SecretStr


# The limits workers = N splits into a share per worker (proxy/workers.py: worker_settings), globally and per
# database; the backend limits hold for the whole pgmux instead (proxy/slots.py).
SPLIT_LIMITS: tuple[str, ...] = ("min_pool_size", "max_client_conn", "max_login_clients", "max_db_client_connections",
                                 "max_user_client_connections", "max_wait_clients")
SPLIT_DATABASE_LIMITS: tuple[str, ...] = ("min_pool_size", "max_db_client_connections")


CGROUP_CPU_MAX: Final = Path("/sys/fs/cgroup/cpu.max")


def usable_cpus(cpu_max: Path = CGROUP_CPU_MAX) -> int:
    """The cores this process may use: those its CPU affinity allows, fewer under a cgroup v2 CPU quota (a container's
    CPU limit, rounded up). Not os.cpu_count(): in a pod limited to 2 CPUs on a 64-core node that says 64."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        quota, period = cpu_max.read_text().split()[:2]  # "max 100000", or "150000 100000": 1.5 CPUs
        if quota == "max":
            return cpus
        limit = -(-int(quota) // int(period))
    except (OSError, ValueError, ZeroDivisionError):
        return cpus  # no cgroup v2 CPU controller here, or nothing it says that can be read as a quota
    return max(1, min(cpus, limit))


class Settings(BaseSettings):
    """Everything pgmux can be told; validated once, then frozen."""

    model_config = SettingsConfigDict(
        env_prefix="PGMUX_", env_nested_delimiter="__", env_ignore_empty=True, extra="forbid", frozen=True,
        hide_input_in_errors=True,
        cli_kebab_case=True, cli_implicit_flags=True,
    )

    # Shorthands for the smallest sidecar: one upstream, one listener.
    upstream_url: UpstreamUrl | None = None
    listen: Address | None = None
    pool_mode: PoolMode = PoolMode.TRANSACTION
    auth_type: AuthMethod = AuthMethod.SCRAM_SHA_256

    databases: dict[str, DatabaseSettings] = {}
    listeners: list[ListenerSettings] = []
    users: dict[str, UserSettings] = {}

    # Pool sizing and limits, as PgBouncer names them.
    default_pool_size: Annotated[int, Field(ge=1)] = 20
    min_pool_size: Count = 0
    reserve_pool_size: Count = 0
    reserve_pool_timeout: Duration = 5.0
    max_client_conn: Annotated[int, Field(ge=1)] = 1000  # logged-in clients (logins count in max_login_clients)
    # Clients still logging in (no StartupMessage or no password yet); 0 means max_client_conn. When all
    # are taken, the oldest unfinished login is closed to make room: a login takes milliseconds, so the
    # oldest is the one most likely stalled, and silent sockets cannot lock healthy clients out.
    max_login_clients: Count = 0
    max_db_connections: Count = 0
    max_user_connections: Count = 0
    max_db_client_connections: Count = 0
    max_user_client_connections: Count = 0
    max_wait_clients: Count = 0  # per pool; 0 = no cap on the line (load shedding off)

    # Timeouts (seconds; 0 disables where PgBouncer allows it).
    server_idle_timeout: Duration = 600.0
    server_lifetime: Duration = 3600.0
    server_connect_timeout: Duration = 15.0
    # How long clients keep waiting while a pool that worked cannot log in (restart, failover);
    # past it, and at once for wrong passwords or a pool that never logged in, they get 08006.
    server_login_retry: Duration = 15.0
    query_wait_timeout: Duration = 120.0
    # PgBouncer's default is 60 s; a login to pgmux takes milliseconds, and a socket that never logs in
    # should hold its slot for as short a time as a slow network allows.
    client_login_timeout: Duration = 15.0
    client_idle_timeout: Duration = 0.0
    idle_transaction_timeout: Duration = 0.0
    # A linked client that sent part of a message and nothing more of it for this long is cut off (08P01)
    # and its backend closed: the server waits for the rest and serves nobody else meanwhile.
    client_request_timeout: Duration = 30.0
    query_timeout: Duration = 0.0
    shutdown_timeout: Duration = 30.0

    # TLS for clients, as PgBouncer names it (each may be set per listener too). disable: SSLRequest is
    # answered N; allow/prefer: TLS is offered; require: plaintext logins are refused; verify-ca/verify-full:
    # clients must present a certificate signed by client_tls_ca_file (verify-full: named after the user).
    client_tls_sslmode: SslMode = SslMode.DISABLE
    client_tls_cert_file: str | None = None
    client_tls_key_file: str | None = None
    client_tls_ca_file: str | None = None
    client_tls_protocols: str = "secure"  # TLS 1.2 and 1.3; or a list: "tlsv1.3"
    client_tls_ciphers: str = "default"  # OpenSSL's default list, or an OpenSSL cipher string

    # Failed logins per source address: past auth_failure_limit within auth_failure_window, that address's
    # logins are refused before any password work until the window ends (0 turns it off).
    auth_failure_limit: Count = 100
    auth_failure_window: Duration = 60.0

    # Users not in [users] looked up in the database, as PgBouncer does: auth_query runs as auth_user (a [users]
    # entry with a plaintext password, or a database URL's user) in auth_dbname (default: the login's database).
    # Answers are kept auth_cache_ttl seconds: a changed password takes effect within it.
    auth_user: str | None = None
    auth_query: str = "SELECT usename, passwd FROM pg_shadow WHERE usename=$1"
    auth_dbname: str | None = None
    auth_cache_ttl: Duration = 30.0

    server_reset_query: str = "DISCARD ALL"
    # Transaction mode: what a client's session-only state does (settings always follow their client).
    session_state: SessionStatePolicy = SessionStatePolicy.PIN
    ignore_startup_parameters: list[str] = []
    max_prepared_statements: Count = 200
    # The largest client message pgmux holds whole to look at (in transaction mode a named prepared
    # statement's Parse); a larger one is refused with FATAL 54000. Messages pgmux needs only the
    # start of stream through at any size. Bytes: 16777216, "16MiB", "64kB".
    max_client_buffer: Annotated[ByteSize, Field(ge=0)] = ByteSize(16 * 1024 * 1024)

    # HTTP `POST /sql` (Neon's SQL-over-HTTP contract, see proxy/http/sql.py): the origins browsers may call it
    # from (CORS; "*": any), the largest answer it sends (larger ones get 507), and how long one request may take
    # (waiting for a server included) before its query is canceled and it is answered 57014.
    http_allowed_origins: list[str] = ["*"]
    http_max_response_size: Annotated[ByteSize, Field(ge=0)] = ByteSize(10 * 1024 * 1024)
    http_request_timeout: Duration = 15.0

    admin_users: list[str] = []  # may run every admin console command
    stats_users: list[str] = []  # may run the read-only SHOW commands
    stats_period: Duration = 60.0  # how often the "stats:" log line is written; 0 turns it off

    # HTTP listeners: the largest request body read (larger ones get 413, nothing of them is buffered).
    http_max_request_size: Annotated[ByteSize, Field(ge=1)] = ByteSize(10 * 1024 * 1024)

    # Worker processes sharing each listener (SO_REUSEPORT) under a supervisor; "auto": one per usable core
    # (usable_cpus). The limits above hold for the whole pgmux: the backend limits through a table the workers
    # share (proxy/slots.py), the others as each worker's fixed share (proxy/workers.py).
    workers: Annotated[int, Field(ge=1)] | Literal["auto"] = 1

    # Peering, as PgBouncer names it: each pgmux of a fleet behind one address (a load balancer, a Kubernetes
    # Service) has its own peer_id (1..16383; 0: no peering), and [peers] says where each other one takes
    # CancelRequests ("host=10.0.0.2 port=6432", or a table with host and port). A CancelRequest carrying another
    # peer's key is forwarded there once (proxy/cancel.py: KeyLayout). Every peer should list the same ids: the
    # largest decides how many bits of the key carry it.
    peer_id: Annotated[int, Field(ge=0, le=MAX_PEER_ID)] = 0
    peers: dict[PeerId, Peer] = {}

    metrics_listen: Address | None = None
    log_format: Literal["plain", "json"] = "plain"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # PgBouncer's names: a "login ok" line per client login and a "client gone" line per logged-in client's end,
    # at info. Off, a connect-per-request fleet keeps info's other lines without two lines per request (whose
    # formatting costs as much user CPU as the rest of a plain login).
    log_connections: bool = True
    log_disconnections: bool = True

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # init kwargs carry the CLI flags; the TOML path is chosen by load_settings.
        toml_file = settings_cls.model_config.get("toml_file")
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if toml_file:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file))
        return tuple(sources)

    @model_validator(mode="after")
    def _check_whole(self) -> "Settings":
        if self.upstream_url is not None:
            name = parse_upstream_url(self.upstream_url.get_secret_value()).database
            if name in self.databases:
                raise ValueError(f"upstream_url names database {name!r}, which [databases.{name}] defines too")
        if not self.upstream_url and not self.databases:
            raise ValueError("no upstream: set upstream_url (PGMUX_UPSTREAM_URL) or add a [databases.NAME] section")
        # Port 0 (any free port, used by tests) may repeat.
        addresses = [listener.address for listener in self.all_listeners() if not listener.address.endswith(":0")]
        if len(set(addresses)) != len(addresses):
            raise ValueError(f"two listeners share an address: {addresses}")
        for listener in self.all_listeners():
            self._check_http_listener(listener)
        self._check_worker_shares()
        for name, user in self.users.items():
            _check_user_secret(name, user.password.get_secret_value())
        if self.peers and not self.peer_id:
            raise ValueError("[peers] is set but peer_id is not: give this pgmux its own peer_id (1..16383)")
        seen: dict[str, str] = {}
        for name, database in self.databases.items():
            for host in database.server_names:
                if host.lower() in seen:
                    raise ValueError(f"server name {host!r} selects both [databases.{seen[host.lower()]}] and "
                                     f"[databases.{name}]")
                seen[host.lower()] = name
        return self

    def _check_worker_shares(self) -> None:
        """Each worker serves a share of every client limit (proxy/workers.py): a share of 0 would leave that worker
        unlimited (0 means no limit). The backend limits are not split: the slot table holds them (proxy/slots.py)."""
        workers = self.worker_count()
        if workers == 1:
            return
        shared = ("max_client_conn", "max_login_clients", "max_db_client_connections", "max_user_client_connections",
                  "max_wait_clients")
        limits = {name: getattr(self, name) for name in shared}
        for database, db in self.databases.items():
            limits[f"databases.{database}.max_db_client_connections"] = db.max_db_client_connections
        for name, limit in limits.items():
            if limit and limit < workers:
                raise ValueError(f"{name} = {limit} is smaller than workers = {workers}: each worker serves a share "
                                 "of it, and every share must be at least 1")

    def _check_http_listener(self, listener: ListenerSettings) -> None:
        if listener.protocol != "http":
            return
        sslmode = listener.client_tls_sslmode or self.client_tls_sslmode
        host = split_address(listener.address)[0]
        if sslmode is SslMode.DISABLE and not listener.allow_plaintext_http and not _is_loopback(host):
            raise ValueError(f"listener {listener.address} (protocol http) has no TLS and is not on loopback: "
                             "passwords would travel in plaintext. Set client_tls_sslmode with a certificate, or "
                             "allow_plaintext_http = true when a TLS-terminating proxy is in front")
        if sslmode is SslMode.VERIFY_FULL:
            raise ValueError(f"listener {listener.address} (protocol http): client_tls_sslmode = verify-full "
                             "matches certificates to PostgreSQL users, which an HTTP listener cannot; use verify-ca")

    def worker_count(self) -> int:
        """How many worker processes serve: ``workers``, with "auto" the cores this process may use."""
        return self.workers if isinstance(self.workers, int) else usable_cpus()

    def all_databases(self) -> dict[str, DatabaseSettings]:
        """The [databases] sections plus the one the upstream_url shorthand names."""
        databases = dict(self.databases)
        if self.upstream_url is not None:
            name = parse_upstream_url(self.upstream_url.get_secret_value()).database
            databases[name] = DatabaseSettings(url=self.upstream_url)
        return databases

    def all_listeners(self) -> list[ListenerSettings]:
        """The [[listeners]] plus the one the listen shorthand names; 127.0.0.1:6432 when neither is set."""
        listeners = list(self.listeners)
        if self.listen is not None or not listeners:
            listeners.insert(0, ListenerSettings(address=self.listen or "127.0.0.1:6432",
                                                 pool_mode=self.pool_mode, auth_type=self.auth_type))
        return listeners

    def redacted(self) -> dict[str, Any]:
        """The effective configuration as plain data with every secret hidden (for check-config and logs)."""
        data = self.model_dump(mode="json")
        if self.upstream_url is not None:
            data["upstream_url"] = parse_upstream_url(self.upstream_url.get_secret_value()).redacted()
        for name, database in self.databases.items():
            data["databases"][name]["url"] = parse_upstream_url(database.url.get_secret_value()).redacted()
        for name in self.users:
            data["users"][name]["password"] = "***"
        return data


def _check_user_secret(user: str, value: str) -> None:
    from proxy.auth.secrets import UserSecret

    try:
        UserSecret.from_config(user, value)
    except ValueError as exc:
        raise ValueError(f"users.{user}.password: {exc}") from None


def load_settings(config_file: Path | None = None, cli_args: list[str] | None = None, **overrides: Any) -> Settings:
    """Build Settings from (highest first) CLI flags, overrides, PGMUX_* env, the TOML file, defaults.

    ``config_file`` None means ``pgmux.toml`` in the working directory if it exists.
    """
    if config_file is None and DEFAULT_CONFIG_FILE.exists():
        config_file = DEFAULT_CONFIG_FILE
    if config_file is not None and not config_file.exists():
        raise FileNotFoundError(f"config file {config_file} does not exist")

    class _FromFile(Settings):
        model_config = SettingsConfigDict(toml_file=config_file)

    kwargs: dict[str, Any] = dict(overrides)
    if cli_args is not None:
        kwargs["_cli_parse_args"] = cli_args
    loaded = _FromFile(**kwargs)
    return Settings.model_construct(**{name: getattr(loaded, name) for name in Settings.model_fields})
