"""log_connections and log_disconnections (PgBouncer's names): a line per login and per logged-in client's end."""

from __future__ import annotations

import asyncio
import logging

import asyncpg
import pytest

from pgusers import APP, APP_DATABASE


def _log_in_and_out(proxy) -> None:
    async def session() -> None:
        conn = await asyncpg.connect(host=proxy.host, port=proxy.port(), user=APP.name, password=APP.password,
                                     database=APP_DATABASE, ssl=False)
        try:
            assert await conn.fetchval("SELECT 1") == 1
        finally:
            await conn.close()

    asyncio.run(asyncio.wait_for(session(), 30))
    proxy.call(lambda p: None)  # the client's end has been handled by now


def _lines(caplog, text: str) -> list[str]:
    return [record.getMessage() for record in caplog.records if text in record.getMessage()]


@pytest.mark.parametrize("log_connections", [True, False])
@pytest.mark.parametrize("log_disconnections", [True, False])
def test_each_login_and_each_clients_end_logs_a_line_unless_turned_off(pgmux, caplog, log_connections: bool,
                                                                     log_disconnections: bool) -> None:
    proxy = pgmux(log_connections=log_connections, log_disconnections=log_disconnections)
    caplog.set_level(logging.INFO, logger="pgmux")
    _log_in_and_out(proxy)
    assert len(_lines(caplog, "login ok: ")) == (1 if log_connections else 0)
    assert len(_lines(caplog, "client gone: ")) == (1 if log_disconnections else 0)
