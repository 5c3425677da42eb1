"""Startup parameter parsing and the SQL that makes a backend match a client (no sockets)."""

from __future__ import annotations

import pytest

from proxy.parameters import parse_startup_parameters, sync_sql
from proxy.protocol.errors import PgError


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


def test_sync_sql_sets_only_what_differs_and_resets_what_the_client_lacks() -> None:
    server_params = {"TimeZone": "UTC", "DateStyle": "ISO, MDY"}
    server_unreported = {"statement_timeout": "1s"}
    sql = sync_sql({"TimeZone": "Asia/Tokyo", "DateStyle": "ISO, MDY"}, {"work_mem": "4MB"},
                   server_params, server_unreported)
    assert sql == ("RESET statement_timeout;SELECT pg_catalog.set_config('TimeZone', 'Asia/Tokyo', false), "
                   "pg_catalog.set_config('work_mem', '4MB', false)")
    assert server_params["TimeZone"] == "Asia/Tokyo" and server_unreported == {"work_mem": "4MB"}
    assert sync_sql({"TimeZone": "Asia/Tokyo"}, {"work_mem": "4MB"}, server_params, server_unreported) is None


def test_sync_sql_quotes_values_as_literals() -> None:
    sql = sync_sql({"application_name": "it's"}, {}, {}, {})
    assert sql == "SELECT pg_catalog.set_config('application_name', 'it''s', false)"
