"""HTTP `POST /sql` (Neon's SQL-over-HTTP contract) on a running pgmux, the endpoint called on pgmux's own loop
as the HTTP listener calls it: parameters, answers, batches, errors with their SQLSTATE, limits, authentication,
and backends left as they were found."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson
import psycopg
import pytest

from pgusers import APP, APP_DATABASE
from proxy.http.exchange import HttpRequest, HttpResponse
from test_auth_query import AUTH_QUERY, FIRST, LOOKED_UP, looked_up_role  # noqa: F401 (a fixture)

PEER = "127.0.0.1:40000"
# What the serverless driver sends with every neon() query.
DRIVER_HEADERS = {"Neon-Raw-Text-Output": "true", "Neon-Array-Mode": "true"}


def _connection_string(proxy: Any, password: str = APP.password, user: str = APP.name, query: str = "") -> str:
    return f"postgresql://{user}:{password}@{proxy.host}:{proxy.port()}/{APP_DATABASE}{query}"


def _send(proxy: Any, method: str = "POST", body: bytes = b"", headers: dict[str, str] | None = None,
          peer: str = PEER) -> HttpResponse:
    request = HttpRequest(method, "/sql", {name.lower(): value for name, value in (headers or {}).items()}, body,
                          peer)

    async def call() -> HttpResponse:
        assert proxy.proxy is not None
        return await proxy.proxy.sql_endpoint(request)

    return asyncio.run_coroutine_threadsafe(call(), proxy.loop).result(30)


def _post(proxy: Any, body: Any, connection: str | None = None, **headers: str) -> tuple[int, Any]:
    """POST ``body`` as JSON with the app user's connection string; the status and the decoded answer."""
    sent = {"Neon-Connection-String": connection or _connection_string(proxy)}
    sent.update({name.replace("_", "-"): value for name, value in headers.items()})
    response = _send(proxy, body=orjson.dumps(body), headers=sent)
    return response.status, orjson.loads(response.body)


def _query(proxy: Any, sql: str, *params: Any, **headers: str) -> Any:
    status, answer = _post(proxy, {"query": sql, "params": list(params)}, **headers)
    assert status == 200, answer
    return answer


def test_parameters_of_every_common_type_round_trip(pgmux) -> None:
    proxy = pgmux()
    params = [42, "12345678901234567890.123456789", "grüße ✓ 日本語 'quoted'", "2024-05-06T07:08:09.123Z",
              {"a": [1, "x"], "n": None}, {"b": True}, "\\xdeadbeef", [1, 2, None], None, ["a b", 'q"uote', "ü"],
              True, 1.5, 9007199254740993]
    sql = ("SELECT $1::int AS i, $2::numeric AS n, $3::text AS t, $4::timestamptz AS ts, $5::json AS j, "
           "$6::jsonb AS jb, $7::bytea AS b, $8::int[] AS a, $9::text AS nothing, $10::text[] AS ta, "
           "$11::bool AS yes, $12::float8 AS f, $13::int8 AS big")
    connection = _connection_string(proxy, query="?sslmode=require&TimeZone=UTC")
    status, answer = _post(proxy, {"query": sql, "params": params}, connection)
    assert status == 200, answer
    assert answer["rows"] == [{
        "i": 42, "n": "12345678901234567890.123456789", "t": "grüße ✓ 日本語 'quoted'",
        "ts": "2024-05-06 07:08:09.123+00", "j": {"a": [1, "x"], "n": None}, "jb": {"b": True}, "b": "\\xdeadbeef",
        "a": [1, 2, None], "nothing": None, "ta": ["a b", 'q"uote', "ü"], "yes": True, "f": 1.5,
        "big": "9007199254740993",
    }]
    assert answer["command"] == "SELECT" and answer["rowCount"] == 1 and answer["rowAsArray"] is False
    # As the driver asks: raw text (it parses each value by type itself), rows as arrays.
    status, raw = _post(proxy, {"query": sql, "params": params}, connection, **DRIVER_HEADERS)
    assert status == 200, raw
    assert raw["rowAsArray"] is True
    assert raw["rows"] == [["42", "12345678901234567890.123456789", "grüße ✓ 日本語 'quoted'",
                            "2024-05-06 07:08:09.123+00", '{"a":[1,"x"],"n":null}', '{"b": true}', "\\xdeadbeef",
                            "{1,2,NULL}", None, '{"a b","q\\"uote",ü}', "t", "1.5", "9007199254740993"]]
    assert [(field["name"], field["dataTypeID"]) for field in raw["fields"]] == [
        ("i", 23), ("n", 1700), ("t", 25), ("ts", 1184), ("j", 114), ("jb", 3802), ("b", 17), ("a", 1007),
        ("nothing", 25), ("ta", 1009), ("yes", 16), ("f", 701), ("big", 20)]


def test_full_results_describe_columns_commands_and_row_counts(pgmux) -> None:
    proxy = pgmux()
    _query(proxy, "DROP TABLE IF EXISTS http_items")
    created = _query(proxy, "CREATE TABLE http_items (id int PRIMARY KEY, name text)")
    assert created["command"] == "CREATE" and created["rowCount"] is None and created["fields"] == []
    inserted = _query(proxy, "INSERT INTO http_items VALUES ($1, $2), ($3, $4)", 1, "one", 2, "two")
    assert inserted["command"] == "INSERT" and inserted["rowCount"] == 2
    selected = _query(proxy, "SELECT id, name FROM http_items ORDER BY id", Neon_Array_Mode="true")
    assert selected["rows"] == [[1, "one"], [2, "two"]] and selected["rowAsArray"] is True
    first = selected["fields"][0]
    assert first["name"] == "id" and first["dataTypeID"] == 23 and first["tableID"] > 0 and first["columnID"] == 1
    assert first["dataTypeSize"] == 4 and first["dataTypeModifier"] == -1 and first["format"] == "text"
    # A query's own arrayMode wins over the header.
    status, answer = _post(proxy, {"query": "SELECT 1 AS one", "params": [], "arrayMode": False}, Neon_Array_Mode="true")
    assert status == 200 and answer["rows"] == [{"one": 1}]
    updated = _query(proxy, "UPDATE http_items SET name = upper(name)")
    assert updated["command"] == "UPDATE" and updated["rowCount"] == 2
    _query(proxy, "DROP TABLE http_items")


def test_a_batch_runs_in_one_transaction_with_the_modes_its_headers_ask_for(pgmux) -> None:
    proxy = pgmux()
    _query(proxy, "DROP TABLE IF EXISTS http_batch")
    _query(proxy, "CREATE TABLE http_batch (id int)")
    modes = {"Neon-Batch-Isolation-Level": "Serializable", "Neon-Batch-Read-Only": "true",
             "Neon-Batch-Deferrable": "false"}
    body = {"queries": [{"query": "SELECT current_setting('transaction_isolation') AS level", "params": []},
                        {"query": "SELECT current_setting('transaction_read_only') AS ro, txid_current_if_assigned() "
                                  "IS NULL AS no_xid, $1::text AS p", "params": ["x"]}]}
    response = _send(proxy, body=orjson.dumps(body), headers={
        "neon-connection-string": _connection_string(proxy), **{k.lower(): v for k, v in modes.items()}})
    assert response.status == 200, response.body
    results = orjson.loads(response.body)["results"]
    assert results[0]["rows"] == [{"level": "serializable"}]
    assert results[1]["rows"] == [{"ro": "on", "no_xid": True, "p": "x"}]
    assert ("Neon-Batch-Isolation-Level", "Serializable") in response.headers  # echoed, as Neon does
    # A write in a read-only batch fails with PostgreSQL's 25006, and nothing of the batch stays.
    status, error = _post(proxy, {"queries": [{"query": "SELECT 1", "params": []},
                                              {"query": "INSERT INTO http_batch VALUES (1)", "params": []}]},
                          Neon_Batch_Isolation_Level="Serializable", Neon_Batch_Read_Only="true")
    assert status == 400 and error["code"] == "25006", error
    # The first error ends the batch: what ran before it is rolled back, what follows never runs.
    status, error = _post(proxy, {"queries": [{"query": "INSERT INTO http_batch VALUES (1)", "params": []},
                                              {"query": "SELECT 1/0", "params": []},
                                              {"query": "INSERT INTO http_batch VALUES (2)", "params": []}]})
    assert status == 400 and error["code"] == "22012", error
    assert _query(proxy, "SELECT count(*)::int AS n FROM http_batch")["rows"] == [{"n": 0}]
    committed = _post(proxy, {"queries": [{"query": "INSERT INTO http_batch VALUES (3)", "params": []}]})
    assert committed[0] == 200 and committed[1]["results"][0]["rowCount"] == 1
    assert _query(proxy, "SELECT count(*)::int AS n FROM http_batch")["rows"] == [{"n": 1}]
    status, error = _post(proxy, {"queries": []}, Neon_Batch_Isolation_Level="Sometimes")
    assert status == 400 and "Neon-Batch-Isolation-Level" in error["message"]
    _query(proxy, "DROP TABLE http_batch")


def test_a_sql_error_is_400_with_neons_error_json(pgmux) -> None:
    proxy = pgmux()
    status, error = _post(proxy, {"query": "SELECT 1/$1::int", "params": [0]})
    assert status == 400
    assert error["code"] == "22012" and error["message"] == "division by zero" and error["severity"] == "ERROR"
    assert error["file"] and error["routine"] and "detail" in error and "hint" in error and "position" in error
    status, error = _post(proxy, {"query": "SELECT nosuchcolumn", "params": []})
    assert status == 400 and error["code"] == "42703" and error["position"] == "8"
    status, error = _post(proxy, {"query": "SELECT 1; SELECT 2", "params": []})  # one statement per query
    assert status == 400 and error["code"] == "42601"
    assert _query(proxy, "SELECT 2 AS two")["rows"] == [{"two": 2}]  # the backend is still fine


def test_a_request_pgmux_cannot_read_is_400_and_other_methods_405(pgmux) -> None:
    proxy = pgmux()
    headers = {"Neon-Connection-String": _connection_string(proxy)}
    response = _send(proxy, body=b"{not json", headers=headers)
    assert response.status == 400 and "not JSON" in orjson.loads(response.body)["message"]
    response = _send(proxy, body=b'{"query": "SELECT 1", "params": []}')
    assert response.status == 400 and "Neon-Connection-String" in orjson.loads(response.body)["message"]
    for bad in ("mysql://app:x@h/app", "postgres://h/app", "not a url"):
        response = _send(proxy, body=b'{"query": "SELECT 1"}', headers={"Neon-Connection-String": bad})
        assert response.status == 400, bad
    response = _send(proxy, body=b'{"params": []}', headers=headers)
    assert response.status == 400
    assert _send(proxy, method="GET").status == 405
    preflight = _send(proxy, method="OPTIONS", headers={"Origin": "https://app.example"})
    assert preflight.status == 200
    names = dict(preflight.headers)
    assert names["Access-Control-Allow-Origin"] == "*" and names["Allow"] == "OPTIONS, POST"
    assert "Neon-Batch-Deferrable" in names["Access-Control-Allow-Headers"]
    assert "Neon-Connection-String" in names["Access-Control-Allow-Headers"]


def test_only_allowed_origins_get_cors_headers(pgmux) -> None:
    proxy = pgmux(http_allowed_origins=["https://app.example"])
    allowed = dict(_send(proxy, method="OPTIONS", headers={"Origin": "https://app.example"}).headers)
    assert allowed["Access-Control-Allow-Origin"] == "https://app.example"
    other = dict(_send(proxy, method="OPTIONS", headers={"Origin": "https://evil.example"}).headers)
    assert "Access-Control-Allow-Origin" not in other


def test_a_wrong_password_is_400_28p01_and_counted(pgmux) -> None:
    proxy = pgmux(auth_failure_limit=3)
    wrong = _connection_string(proxy, password="not-the-password")
    status, error = _post(proxy, {"query": "SELECT 1", "params": []}, wrong)
    assert status == 400 and error["code"] == "28P01"
    assert error["message"] == f'password authentication failed for user "{APP.name}"'
    status, unknown = _post(proxy, {"query": "SELECT 1", "params": []},
                            _connection_string(proxy, user="nosuchuser", password="x"))
    assert status == 400 and unknown["message"] == 'password authentication failed for user "nosuchuser"'
    assert proxy.call(lambda p: (p.registry.auth_failures["wrong_password"], p.registry.auth_failures["unknown_user"])) == (1, 1)
    _post(proxy, {"query": "SELECT 1", "params": []}, wrong)
    # Past auth_failure_limit the address is refused before any password work, even with the right password.
    status, refused = _post(proxy, {"query": "SELECT 1", "params": []})
    assert status == 400 and refused["code"] == "28000", refused
    assert proxy.call(lambda p: p.registry.http.by_status["400"]) == 4
    # Each request counts as an http client; those with wrong credentials (and the refused one) as failed logins.
    assert proxy.call(lambda p: (p.registry.accepted["http"], p.registry.logins["http"],
                                 p.registry.failed_logins_by_transport["http"])) == (4, 0, 4)
    fresh = pgmux()
    status, _ = _post(fresh, {"query": "SELECT 1", "params": []})
    assert status == 200 and fresh.call(lambda p: p.registry.logins["http"]) == 1


def test_a_refusal_for_a_full_pool_is_400_53300(pgmux) -> None:
    proxy = pgmux(default_pool_size=1, query_wait_timeout=0.3)
    with psycopg.connect(proxy.dsn(APP.name, APP.password, APP_DATABASE), connect_timeout=10) as holder:
        holder.execute("SELECT 1")  # in a transaction: the pool's only server is held
        status, error = _post(proxy, {"query": "SELECT 1", "params": []})
        assert status == 400 and error["code"] == "53300", error
    assert _query(proxy, "SELECT 1 AS one")["rows"] == [{"one": 1}]


def test_an_answer_over_the_size_limit_is_507(pgmux) -> None:
    proxy = pgmux(http_max_response_size="64KiB", default_pool_size=1)
    response = _send(proxy, body=orjson.dumps({"query": "SELECT repeat('x', 70000) AS big", "params": []}),
                     headers={"Neon-Connection-String": _connection_string(proxy)})
    assert response.status == 507
    many = _post(proxy, {"query": "SELECT g, repeat('y', 100) FROM generate_series(1, 100000) g", "params": []})
    assert many[0] == 507  # its rows were not all kept: pgmux's memory stays bounded
    assert _query(proxy, "SELECT 3 AS three")["rows"] == [{"three": 3}]  # same backend, still in order


def test_a_request_leaves_no_session_state_for_the_next(pgmux) -> None:
    proxy = pgmux(default_pool_size=1)
    pid = _query(proxy, "SELECT pg_backend_pid() AS pid")["rows"][0]["pid"]
    default = _query(proxy, "SHOW statement_timeout")["rows"][0]["statement_timeout"]
    _query(proxy, "SET statement_timeout = '4321ms'")
    _query(proxy, "SELECT set_config('pgmux.tag', 'left-behind', false)")
    _query(proxy, "CREATE TEMP TABLE http_temp (x int)")
    _query(proxy, "SELECT pg_advisory_lock(4242)")
    status, _ = _post(proxy, {"query": "BEGIN", "params": []})  # an open transaction must not survive either
    assert status == 200
    after = _query(proxy, "SELECT pg_backend_pid() AS pid, current_setting('statement_timeout') AS st, "
                          "current_setting('pgmux.tag', true) AS tag, to_regclass('pg_temp.http_temp') AS temp, "
                          "(SELECT count(*)::int FROM pg_locks WHERE locktype = 'advisory' "
                          "AND pid = pg_backend_pid()) AS locks, txid_current_if_assigned() AS xid")
    assert after["rows"] == [{"pid": pid, "st": default, "tag": "", "temp": None, "locks": 0, "xid": None}]
    # Nor does a TCP client's own setting reach a request: the pool's defaults come back.
    with psycopg.connect(host=proxy.host, port=proxy.port(), user=APP.name, password=APP.password,
                         dbname=APP_DATABASE, options="-c statement_timeout=9876", autocommit=True,
                         connect_timeout=10) as conn:
        assert conn.execute("SHOW statement_timeout").fetchone() == ("9876ms",)
    assert _query(proxy, "SHOW statement_timeout")["rows"] == [{"statement_timeout": default}]
    # The connection string's own settings apply to that request alone.
    status, answer = _post(proxy, {"query": "SHOW statement_timeout", "params": []},
                           _connection_string(proxy, query="?options=-c%20statement_timeout%3D777"))
    assert status == 200 and answer["rows"] == [{"statement_timeout": "777ms"}]
    assert _query(proxy, "SHOW statement_timeout")["rows"] == [{"statement_timeout": default}]


def test_a_request_over_the_timeout_is_canceled_with_57014(pgmux) -> None:
    proxy = pgmux(http_request_timeout=0.5, default_pool_size=1)
    pid = _query(proxy, "SELECT pg_backend_pid() AS pid")["rows"][0]["pid"]
    started = time.monotonic()
    status, error = _post(proxy, {"query": "SELECT pg_sleep(10)", "params": []})
    assert status == 400 and error["code"] == "57014", error
    assert time.monotonic() - started < 5
    after = _query(proxy, "SELECT pg_backend_pid() AS pid, 1 AS one")["rows"]
    assert after == [{"pid": pid, "one": 1}]  # canceled, not dropped: the backend serves the next request


def test_http_requests_are_measured(pgmux) -> None:
    proxy = pgmux()
    _query(proxy, "SELECT 1")
    _post(proxy, {"query": "SELECT 1/0", "params": []})
    counted = proxy.call(lambda p: (dict(p.registry.http.by_status), p.registry.http.duration.count))
    assert counted == ({"200": 1, "400": 1}, 2)


@pytest.mark.parametrize("query", ["SELECT 1", ""])
def test_an_empty_or_trivial_query_answers(pgmux, query: str) -> None:
    proxy = pgmux()
    answer = _query(proxy, query)
    assert answer["rowAsArray"] is False


def test_a_user_from_auth_query_runs_upstream_as_itself(pgmux, looked_up_role) -> None:
    proxy = pgmux(auth_user=APP.name, auth_query=AUTH_QUERY)
    connection = _connection_string(proxy, user=LOOKED_UP, password=FIRST)
    for _ in range(2):  # the second request's password check is the remembered one
        status, answer = _post(proxy, {"query": "SELECT current_user AS who", "params": []}, connection)
        assert status == 200 and answer["rows"] == [{"who": LOOKED_UP}], answer
    status, error = _post(proxy, {"query": "SELECT 1", "params": []},
                          _connection_string(proxy, user=LOOKED_UP, password="wrong"))
    assert status == 400 and error["code"] == "28P01"
    # Its pool logs in with the SCRAM keys the password revealed, never with the password.
    upstreams = proxy.call(lambda p: [(pool.config.upstream.password, pool.config.upstream.scram_keys is not None)
                                      for key, pool in p.router.pools.items() if key.user == LOOKED_UP])
    assert upstreams == [(None, True)]


def test_the_connection_strings_host_selects_a_database_only_by_its_server_names(pgmux, postgres) -> None:
    upstream = postgres.dsn(APP.name, APP.password, APP_DATABASE, sslmode="disable")
    proxy = pgmux(databases={"tenant": {"url": upstream, "server_names": ["tenant.db.example"]}})
    named = f"postgresql://{APP.name}:{APP.password}@tenant.db.example/whatever"
    status, answer = _post(proxy, {"query": "SELECT current_database() AS db", "params": []}, named)
    assert status == 200 and answer["rows"] == [{"db": APP_DATABASE}], answer
    other = f"postgresql://{APP.name}:{APP.password}@elsewhere.example/whatever"  # never dialled
    status, error = _post(proxy, {"query": "SELECT 1", "params": []}, other)
    assert status == 400 and error["code"] == "28P01"  # an unknown database fails as a wrong password


def test_a_request_counts_against_the_client_limits_while_it_runs(pgmux) -> None:
    proxy = pgmux(max_user_client_connections=1)
    with psycopg.connect(proxy.dsn(APP.name, APP.password, APP_DATABASE), autocommit=True, connect_timeout=10):
        status, error = _post(proxy, {"query": "SELECT 1", "params": []})
        assert status == 400 and error["code"] == "53300", error
    deadline = time.monotonic() + 10
    while proxy.call(lambda p: dict(p.router.admission.per_user)) and time.monotonic() < deadline:
        time.sleep(0.02)  # pgmux sees the client leave
    assert _query(proxy, "SELECT 1 AS one")["rows"] == [{"one": 1}]
    assert proxy.call(lambda p: dict(p.router.admission.per_user)) == {}  # the request left no count behind
