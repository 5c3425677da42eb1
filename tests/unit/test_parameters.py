"""Startup parameter parsing and the SQL that makes a backend match a client (no sockets)."""

from __future__ import annotations

import pytest

from proxy.parameters import check_sql, parameter_sync, parse_startup_parameters, settings_to_check
from proxy.protocol import messages as m
from proxy.protocol.errors import PgError, Severity, error_response
from proxy.protocol.framing import FrameScanner
from proxy.server import _RELAY_CAPTURE, Backends, ServerConnection
from proxy.stats import PoolStats


def test_startup_parameters_are_sorted_into_synced_unreported_and_protocol_options() -> None:
    parsed = parse_startup_parameters(
        {"user": "app", "database": "app", "TimeZone": "UTC", "extra_float_digits": "3",
         "options": r"-c statement_timeout=5s --work-mem=4MB -c search_path=a\ b", "_pq_.x": "1"},
        ignored=[])
    assert parsed.synced == {"TimeZone": "UTC", "search_path": "a b"}
    assert parsed.unreported == {"extra_float_digits": "3", "statement_timeout": "5s", "work_mem": "4MB"}
    assert parsed.unsupported_options == ["_pq_.x"]


@pytest.mark.parametrize("parameters", [{"replication": "database"}, {"bad name": "x"}, {"options": "-x"}])
def test_parameters_pgmux_cannot_honour_are_refused_with_08p01(parameters: dict[str, str]) -> None:
    with pytest.raises(PgError) as info:
        parse_startup_parameters(parameters, ignored=[])
    assert info.value.sqlstate.value == "08P01"


def test_ignored_startup_parameters_are_dropped() -> None:
    assert parse_startup_parameters({"replication": "x"}, ignored=["replication"]).unreported == {}


def test_parameter_sync_sets_only_what_differs_and_records_nothing_before_postgres_confirms() -> None:
    server_params = {"TimeZone": "UTC", "DateStyle": "ISO, MDY"}
    server_unreported = {"statement_timeout": "1s"}
    sync = parameter_sync({"TimeZone": "Asia/Tokyo", "DateStyle": "ISO, MDY"}, {"work_mem": "4MB"},
                          server_params, server_unreported, in_transaction=False)
    assert sync is not None
    # BEGIN ... COMMIT: on failure the block stays aborted, so what the client sent behind it is refused.
    assert sync.sql == ("BEGIN;RESET statement_timeout;SELECT pg_catalog.set_config('TimeZone', 'Asia/Tokyo', false), "
                        "pg_catalog.set_config('work_mem', '4MB', false);COMMIT")
    assert server_params == {"TimeZone": "UTC", "DateStyle": "ISO, MDY"}  # untouched until confirmed
    assert server_unreported == {"statement_timeout": "1s"}
    assert sync.params == {"TimeZone": "Asia/Tokyo"} and sync.unreported == {"work_mem": "4MB"}
    server_params.update(sync.params)
    assert parameter_sync({"TimeZone": "Asia/Tokyo"}, {"work_mem": "4MB"}, server_params, sync.unreported,
                          in_transaction=False) is None


def test_parameter_sync_inside_a_transaction_is_not_wrapped() -> None:
    # A COMMIT of pgmux's would end the client's transaction.
    sync = parameter_sync({"application_name": "it's"}, {}, {}, {}, in_transaction=True)
    assert sync is not None
    assert sync.sql == "SELECT pg_catalog.set_config('application_name', 'it''s', false)"
    assert sync.unreported is None  # unchanged: nothing to record for them


def test_settings_to_check_skips_server_defaults_accepted_pairs_and_any_value_parameters() -> None:
    unchecked = settings_to_check({"TimeZone": "UTC", "search_path": "tenant_a", "application_name": "x"},
                                  {"statment_timeout": "5", "work_mem": "4MB"}, {"TimeZone": "UTC"},
                                  {("work_mem", "4MB")})
    assert unchecked == {"search_path": "tenant_a", "statment_timeout": "5"}
    # Local to the statement's own transaction: the check leaves the backend as it was.
    assert check_sql(unchecked, {"TimeZone"}) == ("SELECT pg_catalog.set_config('search_path', 'tenant_a', true), "
                                    "pg_catalog.set_config('statment_timeout', '5', true)")


def test_check_sql_sets_reported_settings_for_the_session_so_postgres_reports_their_spelling() -> None:
    sql = check_sql({"work_mem": "4MB", "client_encoding": "euc-jp"}, {"client_encoding", "TimeZone"})
    assert sql == ("SELECT pg_catalog.set_config('work_mem', '4MB', true), "
                   "pg_catalog.set_config('client_encoding', 'euc-jp', false)")


class _Transport:
    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.written.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def resume_reading(self) -> None:
        pass


def _relaying_server() -> tuple[ServerConnection, _Transport]:
    """A ServerConnection past its login, talking to a fake transport (no sockets, no loop needed)."""
    server = ServerConnection(upstream=None, on_lost=lambda _server: None, stats=PoolStats(),  # type: ignore[arg-type]
                              backends=Backends())
    transport = _Transport()
    server.transport = transport  # type: ignore[assignment]
    server._login_frames = None
    server._scanner = FrameScanner(_RELAY_CAPTURE)
    server.params = {"search_path": "tenant_p"}
    return server, transport


def test_a_sync_is_recorded_only_when_its_ready_for_query_follows_no_error() -> None:
    server, _ = _relaying_server()
    sync = parameter_sync({"search_path": "tenant_a"}, {"work_mem": "4MB"}, server.params, server.unreported,
                          in_transaction=False)
    assert sync is not None
    server.send_parameter_sync(sync)
    server.data_received(m.message(m.COMMAND_COMPLETE, b"COMMIT\x00"))
    assert server.params == {"search_path": "tenant_p"} and server.unreported == {}
    server.data_received(m.ready_for_query())
    assert server.params == {"search_path": "tenant_a"} and server.unreported == {"work_mem": "4MB"}


def test_a_failed_sync_records_nothing_and_closes_the_backend() -> None:
    server, transport = _relaying_server()
    sync = parameter_sync({"search_path": "tenant_a"}, {"statment_timeout": "5"}, server.params, server.unreported,
                          in_transaction=False)
    assert sync is not None
    server.send_parameter_sync(sync)
    server.data_received(error_response(Severity.ERROR, "42704", 'unrecognized configuration parameter "statment_timeout"')
                         + m.ready_for_query(m.TransactionStatus.FAILED))
    assert server.params == {"search_path": "tenant_p"} and server.unreported == {}
    # Closed as a healthy backend is: Terminate, then PostgreSQL's own close ends the connection.
    assert transport.written[-1] == m.terminate() and not transport.closed
    assert (server.close_reason or "").startswith("parameter sync failed: 42704")


def test_after_a_reset_what_pgmux_set_is_unknown_and_set_or_reset_again() -> None:
    server, _ = _relaying_server()
    server.unreported = {"role": "tenant", "work_mem": "5MB"}
    server.forget_unreported()
    sync = parameter_sync({}, {"work_mem": "5MB"}, server.params, server.unreported, in_transaction=False)
    assert sync is not None
    assert sync.sql == "BEGIN;RESET role;SELECT pg_catalog.set_config('work_mem', '5MB', false);COMMIT"
