"""The one table of connection states: every state has its names, and every name it gives is exported."""

from __future__ import annotations

from proxy.states import (
    CLIENT_LABELS,
    CLIENT_NAMES,
    LOGGING_IN,
    SERVER_LABELS,
    SERVER_NAMES,
    ClientState,
    ServerState,
)


def test_every_client_and_server_state_has_its_names() -> None:
    assert set(CLIENT_NAMES) == set(ClientState)
    assert set(SERVER_NAMES) == set(ServerState)


def test_every_label_the_table_gives_is_one_the_gauges_export() -> None:
    assert {names.label for names in CLIENT_NAMES.values()} - {None} <= set(CLIENT_LABELS)
    assert {names.label for names in SERVER_NAMES.values()} - {None} <= set(SERVER_LABELS)


def test_clients_logging_in_are_labelled_login_and_listed_in_no_pool() -> None:
    for state in ClientState:
        names = CLIENT_NAMES[state]
        assert (names.label == "login") == (state in LOGGING_IN)
        if state in LOGGING_IN:
            assert names.shown is None and names.column is None


def test_show_clients_and_show_pools_use_pgbouncers_words() -> None:
    assert {names.shown for names in CLIENT_NAMES.values()} - {None} <= {"active", "idle", "waiting"}
    assert {names.column for names in CLIENT_NAMES.values()} - {None} <= {"cl_active", "cl_waiting"}
    assert {names.shown for names in SERVER_NAMES.values()} - {None} <= \
        {"active", "idle", "used", "tested", "new", "active_cancel", "being_canceled"}
    assert all(names.column is None or names.column.startswith("sv_") for names in SERVER_NAMES.values())


def test_closed_connections_are_counted_nowhere() -> None:
    for names in (CLIENT_NAMES[ClientState.CLOSED], SERVER_NAMES[ServerState.CLOSED]):
        assert (names.shown, names.column, names.label) == (None, None, None)
