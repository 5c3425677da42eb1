"""Failed logins are limited per source address: one address guessing passwords is cut off cheaply, and
logins from every other address go on untouched."""

from __future__ import annotations

import logging
import socket
import struct
import time

import psycopg

from pgusers import APP, APP_DATABASE
from proxy.auth.secrets import md5_password_hash, md5_salted_response
from proxy.protocol import messages as m
from proxy.protocol.startup import build_startup_message
from test_metrics import scrape, value

GUESS = "guess-9d1c"


def _md5_login_from(source: str, proxy, password: str) -> str:
    """One md5 login from ``source`` (a loopback address), by hand; pgmux's error message, or "ok"."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.bind((source, 0))
        sock.connect((proxy.host, proxy.port()))
        sock.sendall(build_startup_message({"user": APP.name, "database": APP_DATABASE}))
        buffer = b""
        while True:
            while len(buffer) < 5 or len(buffer) < 1 + struct.unpack_from("!I", buffer, 1)[0]:
                chunk = sock.recv(65536)
                if not chunk:
                    return "closed"
                buffer += chunk
            length = struct.unpack_from("!I", buffer, 1)[0]
            kind, body, buffer = buffer[0], buffer[5:1 + length], buffer[1 + length:]
            if kind == m.ERROR_RESPONSE:
                fields = dict((part[:1], part[1:]) for part in body.split(b"\x00") if part)
                return fields[b"M"].decode()
            if kind == m.AUTHENTICATION and struct.unpack_from("!I", body)[0] == 5:  # md5, with its salt
                answer = md5_salted_response(md5_password_hash(APP.name, password), body[4:8])
                sock.sendall(m.password_message(answer))
            elif kind == m.READY_FOR_QUERY:
                return "ok"


def test_a_flood_of_bad_logins_from_one_address_is_cut_off_and_others_log_in(pgmux, caplog) -> None:
    proxy = pgmux(auth_type="md5", auth_failure_limit=3, auth_failure_window=60, metrics_listen="127.0.0.1:0")
    caplog.set_level(logging.INFO)
    answers = [_md5_login_from("127.0.0.2", proxy, GUESS) for _ in range(20)]
    assert answers[:3] == [f'password authentication failed for user "{APP.name}"'] * 3
    assert all(answer.startswith("too many failed logins from 127.0.0.2: try again in ") for answer in answers[3:])
    # Even the right password is refused from there until the window ends: no password work is done for it.
    assert _md5_login_from("127.0.0.2", proxy, APP.password).startswith("too many failed logins")
    # Another address is untouched, through a real driver too.
    assert _md5_login_from("127.0.0.1", proxy, GUESS) == f'password authentication failed for user "{APP.name}"'
    assert _md5_login_from("127.0.0.1", proxy, APP.password) == "ok"
    with psycopg.connect(host="127.0.0.1", port=proxy.port(), user=APP.name, password=APP.password,
                         dbname=APP_DATABASE, connect_timeout=10) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    text = scrape(proxy)
    assert value(text, "pgmux_auth_failures_total", reason="wrong_password") == 4
    assert value(text, "pgmux_auth_failures_total", reason="rate_limited") == 18
    assert value(text, "pgmux_client_rejections_total", reason="auth_rate_limited") == 18
    assert GUESS not in caplog.text and APP.password not in caplog.text


def test_an_address_may_try_again_once_its_window_ends(pgmux) -> None:
    proxy = pgmux(auth_type="md5", auth_failure_limit=2, auth_failure_window=0.5)
    assert [_md5_login_from("127.0.0.3", proxy, GUESS) for _ in range(3)][-1].startswith("too many failed logins")
    time.sleep(0.6)
    assert _md5_login_from("127.0.0.3", proxy, APP.password) == "ok"
