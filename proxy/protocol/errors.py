"""SQLSTATE catalogue and ErrorResponse/NoticeResponse encoding: every error pgmux itself sends is built here."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from proxy.protocol.messages import ERROR_RESPONSE, NOTICE_RESPONSE, message, read_cstring


class SqlState(str, enum.Enum):
    """The SQLSTATE codes pgmux uses, named as PostgreSQL's errcodes.txt names them."""

    TOO_MANY_CONNECTIONS = "53300"
    CONNECTION_FAILURE = "08006"
    SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION = "08001"
    PROTOCOL_VIOLATION = "08P01"
    INVALID_PASSWORD = "28P01"
    INVALID_AUTHORIZATION_SPECIFICATION = "28000"
    INVALID_CATALOG_NAME = "3D000"
    FEATURE_NOT_SUPPORTED = "0A000"
    ADMIN_SHUTDOWN = "57P01"
    IDLE_SESSION_TIMEOUT = "57P05"
    IDLE_IN_TRANSACTION_SESSION_TIMEOUT = "25P03"
    QUERY_CANCELED = "57014"
    INSUFFICIENT_PRIVILEGE = "42501"
    INTERNAL_ERROR = "XX000"
    SYNTAX_ERROR = "42601"
    OBJECT_NOT_IN_PREREQUISITE_STATE = "55000"
    CONFIG_FILE_ERROR = "F0000"
    PROGRAM_LIMIT_EXCEEDED = "54000"


class Severity(str, enum.Enum):
    ERROR = "ERROR"
    FATAL = "FATAL"
    NOTICE = "NOTICE"
    WARNING = "WARNING"


@dataclass(frozen=True)
class PgError(Exception):
    """An error pgmux reports to a client; ``severity`` FATAL means the connection is closed after it."""

    sqlstate: SqlState | str  # a plain string only for an error PostgreSQL itself raised, relayed as it is
    message: str
    hint: str | None = None
    detail: str | None = None
    severity: Severity = Severity.ERROR
    reason: str | None = None  # the rejection reason it is counted under (pgmux_client_rejections_total)

    def __str__(self) -> str:
        code = self.sqlstate.value if isinstance(self.sqlstate, SqlState) else self.sqlstate
        return f"{self.severity.value} {code} {self.message}"

    def to_bytes(self) -> bytes:
        return error_response(self.severity, self.sqlstate, self.message, hint=self.hint, detail=self.detail)


def _fields(severity: Severity, sqlstate: str, text: str, hint: str | None, detail: str | None) -> bytes:
    parts = [b"S", severity.value.encode(), b"\x00", b"V", severity.value.encode(), b"\x00",
             b"C", sqlstate.encode(), b"\x00", b"M", text.encode(), b"\x00"]
    if detail:
        parts += [b"D", detail.encode(), b"\x00"]
    if hint:
        parts += [b"H", hint.encode(), b"\x00"]
    parts.append(b"\x00")
    return b"".join(parts)


def error_response(severity: Severity, sqlstate: SqlState | str, text: str, *,
                   hint: str | None = None, detail: str | None = None) -> bytes:
    code = sqlstate.value if isinstance(sqlstate, SqlState) else sqlstate
    return message(ERROR_RESPONSE, _fields(severity, code, text, hint, detail))


def notice_response(text: str, *, sqlstate: str = "00000", hint: str | None = None) -> bytes:
    return message(NOTICE_RESPONSE, _fields(Severity.NOTICE, sqlstate, text, hint, None))


def parse_error_fields(body: bytes | memoryview) -> dict[str, str]:
    """Decode the fields of an ErrorResponse/NoticeResponse body keyed by their one-letter codes."""
    fields: dict[str, str] = {}
    data = bytes(body)
    offset = 0
    while offset < len(data) and data[offset] != 0:
        code = chr(data[offset])
        value, offset = read_cstring(data, offset + 1)
        fields[code] = value
    return fields


# ---- the catalogue: every refusal a client can get from pgmux ---------------------------------

def unknown_database(name: str) -> PgError:
    return PgError(SqlState.INVALID_CATALOG_NAME, f'database "{name}" does not exist in pgmux',
                   hint="Add it under [databases] in the pgmux config, or check the database name in the URL.",
                   severity=Severity.FATAL)


def password_authentication_failed(user: str) -> PgError:
    return PgError(SqlState.INVALID_PASSWORD, f'password authentication failed for user "{user}"',
                   severity=Severity.FATAL)


def unknown_user(user: str) -> PgError:
    # Same text as a wrong password so that probing cannot tell which user names exist.
    return password_authentication_failed(user)


def too_many_failed_logins(address: str, retry_in: float) -> PgError:
    return PgError(SqlState.INVALID_AUTHORIZATION_SPECIFICATION,
                   f"too many failed logins from {address}: try again in {max(1, round(retry_in))} s",
                   severity=Severity.FATAL,
                   hint="pgmux refuses an address's logins for a while after auth_failure_limit failures.")


def tls_required() -> PgError:
    # PgBouncer's text; the hint says what to change on the client.
    return PgError(SqlState.INVALID_AUTHORIZATION_SPECIFICATION, "SSL required", severity=Severity.FATAL,
                   hint="This pgmux listener requires TLS (client_tls_sslmode): connect with sslmode=require "
                        "or stricter.")


def certificate_user_mismatch(user: str) -> PgError:
    # PostgreSQL's text for clientcert=verify-full when the certificate names someone else.
    return PgError(SqlState.INVALID_AUTHORIZATION_SPECIFICATION,
                   f'certificate authentication failed for user "{user}"', severity=Severity.FATAL,
                   detail="The client certificate's common name is not the user name (client_tls_sslmode = "
                          "verify-full).")


def protocol_violation(reason: str) -> PgError:
    return PgError(SqlState.PROTOCOL_VIOLATION, f"protocol violation: {reason}", severity=Severity.FATAL)


def internal_error(reason: str) -> PgError:
    return PgError(SqlState.INTERNAL_ERROR, f"pgmux internal error: {reason}", severity=Severity.FATAL)


def unsupported_startup_parameter(name: str) -> PgError:
    return PgError(SqlState.PROTOCOL_VIOLATION, f"unsupported startup parameter: {name}",
                   hint=f"Add {name} to ignore_startup_parameters in the pgmux config to drop it.",
                   severity=Severity.FATAL)


def parameter_refused_by_server(fields: dict[str, str], reason: str) -> PgError:
    """PostgreSQL refused one of a client's session parameters: its own error, FATAL, as its own login would end.

    ``reason`` is startup_parameter_refused (checked at login) or parameter_sync_failed (the sync to a
    backend failed later, e.g. after the role it names lost a privilege).
    """
    return PgError(fields.get("C") or SqlState.INTERNAL_ERROR, fields.get("M") or "the server refused a parameter",
                   hint=fields.get("H"), detail=fields.get("D"), severity=Severity.FATAL, reason=reason)


# Clients are never told the upstream's host, port or user: pgmux's log names them (redacted).
def upstream_unavailable(reason: str) -> PgError:
    return PgError(SqlState.CONNECTION_FAILURE, f"pgmux could not connect to the upstream server: {reason}",
                   hint="Check that PostgreSQL is running and that the upstream URL in the pgmux config is right; "
                        "pgmux's log names the server and its full error.",
                   reason="upstream_unavailable")


def server_connection_lost() -> PgError:
    return PgError(SqlState.CONNECTION_FAILURE, "the server connection was lost while it served this client",
                   hint="The transaction was not committed unless the server said so; retry it.",
                   severity=Severity.FATAL)


def too_many_clients(limit: int) -> PgError:
    return PgError(SqlState.TOO_MANY_CONNECTIONS,
                   f"too many client connections to pgmux: no more connections allowed (max_client_conn={limit} reached)",
                   hint="Retry later, close idle connections, or raise max_client_conn in the pgmux config.",
                   severity=Severity.FATAL)


def _too_many_scoped_clients(scope: str, name: str, setting: str, limit: int) -> PgError:
    return PgError(SqlState.TOO_MANY_CONNECTIONS,
                   f'too many client connections for {scope} "{name}": client connections exceeded '
                   f"({setting}={limit} reached)",
                   hint=f"Retry later, or raise {setting} in the pgmux config.",
                   severity=Severity.FATAL)


def too_many_database_clients(database: str, limit: int) -> PgError:
    return _too_many_scoped_clients("database", database, "max_db_client_connections", limit)


def too_many_user_clients(user: str, limit: int) -> PgError:
    return _too_many_scoped_clients("user", user, "max_user_client_connections", limit)


def wait_queue_full(pool: str, waiting: int, limit: int, active: int, pool_size: int) -> PgError:
    return PgError(SqlState.TOO_MANY_CONNECTIONS,
                   f"too many clients waiting for pool {pool}: {waiting} already in line "
                   f"(max_wait_clients={limit} reached; {active} of {pool_size} busy)",
                   hint="Retry with backoff, or raise default_pool_size / max_wait_clients in the pgmux config.",
                   reason="queue_full")


def login_crowded_out(limit: int) -> PgError:
    return PgError(SqlState.TOO_MANY_CONNECTIONS,
                   f"too many clients logging in to pgmux: this was the oldest unfinished login and made room "
                   f"for a new one (max_login_clients={limit} reached)",
                   hint="A login takes milliseconds; send the StartupMessage and password promptly, "
                        "or raise max_login_clients in the pgmux config.",
                   severity=Severity.FATAL)


def client_request_timeout(timeout: float) -> PgError:
    # PostgreSQL's own words for a message that never completes ("incomplete message from client").
    return PgError(SqlState.PROTOCOL_VIOLATION,
                   f"incomplete message from client: no more of it arrived within client_request_timeout={timeout:g}s",
                   hint="The server connection it held was closed; nothing of the unfinished request ran.",
                   severity=Severity.FATAL)


def client_buffer_exceeded(kind: str, size: int, limit: int) -> PgError:
    return PgError(SqlState.PROGRAM_LIMIT_EXCEEDED,
                   f"message of type {kind!r} is too large for pgmux to hold: {size} bytes "
                   f"(max_client_buffer={limit} reached)",
                   hint="In transaction mode pgmux holds a named prepared statement's Parse whole to rename it: "
                        "use an unnamed statement or session mode for texts this large, or raise max_client_buffer.",
                   severity=Severity.FATAL, reason="max_client_buffer")


def client_idle_timeout(timeout: float) -> PgError:
    return PgError(SqlState.IDLE_SESSION_TIMEOUT,
                   f"terminating connection due to idle timeout (client_idle_timeout={timeout:g}s)",
                   severity=Severity.FATAL)


def idle_transaction_timeout(timeout: float) -> PgError:
    return PgError(SqlState.IDLE_IN_TRANSACTION_SESSION_TIMEOUT,
                   f"terminating connection due to idle-in-transaction timeout (idle_transaction_timeout={timeout:g}s)",
                   hint="The transaction was rolled back. Commit or roll back sooner, or raise idle_transaction_timeout.",
                   severity=Severity.FATAL)


def wait_timeout(pool: str, timeout: float, active: int, waiting: int, pool_size: int) -> PgError:
    return PgError(SqlState.TOO_MANY_CONNECTIONS,
                   f"no server connection available for pool {pool} within query_wait_timeout={timeout:g}s "
                   f"({active} of {pool_size} busy, {waiting} waiting)",
                   hint="Retry later, shorten transactions, or raise default_pool_size / query_wait_timeout.",
                   reason="wait_timeout")


def admin_not_allowed(user: str) -> PgError:
    return PgError(SqlState.INSUFFICIENT_PRIVILEGE,
                   f'user "{user}" is not allowed to use the pgmux admin console',
                   hint="List the user in admin_users or stats_users in the pgmux config.",
                   severity=Severity.FATAL)


def shutting_down() -> PgError:
    return PgError(SqlState.ADMIN_SHUTDOWN, "pgmux is shutting down", severity=Severity.FATAL)


# ---- the admin console (virtual database pgmux / pgbouncer) ------------------------------------

def admin_unknown_command(query: str) -> PgError:
    return PgError(SqlState.SYNTAX_ERROR, f"invalid command '{query}', use SHOW HELP;",
                   hint="The admin console speaks PgBouncer's commands (SHOW POOLS, PAUSE db, ...), not SQL.")


def admin_access_needed(command: str) -> PgError:
    return PgError(SqlState.INSUFFICIENT_PRIVILEGE, f"admin access needed: {command} is for admin_users",
                   hint="stats_users may only run SHOW commands; list the user in admin_users to allow more.")


def admin_no_such_database(name: str) -> PgError:
    return PgError(SqlState.INVALID_CATALOG_NAME, f"no such database: {name}")


def admin_wrong_state(text: str) -> PgError:
    return PgError(SqlState.OBJECT_NOT_IN_PREREQUISITE_STATE, text)


def admin_reload_failed(reason: str) -> PgError:
    return PgError(SqlState.CONFIG_FILE_ERROR, f"RELOAD failed, keeping the current configuration: {reason}")


def admin_extended_protocol() -> PgError:
    return PgError(SqlState.FEATURE_NOT_SUPPORTED, "extended query protocol not supported by admin console",
                   hint="Send admin commands as simple queries (psql, or a driver's simple-query mode).")


def killed_by_admin(database: str) -> PgError:
    return PgError(SqlState.ADMIN_SHUTDOWN,
                   f'terminating connection due to administrator command (KILL of database "{database}")',
                   hint="New connections wait until an administrator runs RESUME.",
                   severity=Severity.FATAL)
