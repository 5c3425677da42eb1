"""Logging: password redaction in every printed string, plain and JSON output with connection ids."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Iterator

import pytest

from proxy.log_levels import enabled_for
from proxy.logs import LOGGER_NAME, LogSummary, get_logger, label_worker, redact, setup_logging


@pytest.fixture
def pgmux_log() -> Iterator[None]:
    """Put the "pgmux" logger back as it was: setup_logging replaces its handlers."""
    logger = logging.getLogger(LOGGER_NAME)
    saved = (logger.handlers[:], logger.level, logger.propagate)
    yield
    logger.handlers[:], logger.level, logger.propagate = saved


# ---- redact ------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "expected"), [
    ("postgresql://app:s3cret@db:5432/app", "postgresql://app:***@db:5432/app"),
    ("postgres://app:s3cret@db/app?sslmode=require", "postgres://app:***@db/app?sslmode=require"),
    ("postgresql://app:p%40ss%2Fw0rd@db/app", "postgresql://app:***@db/app"),
    ("postgresql://app:a:b:c@db/app", "postgresql://app:***@db/app"),
    ("POSTGRESQL://App:S3cret@DB/app", "POSTGRESQL://App:***@DB/app"),
    ("could not connect to postgresql://app:s3cret@10.0.0.5:5432/app: timeout",
     "could not connect to postgresql://app:***@10.0.0.5:5432/app: timeout"),
    ("two: postgresql://a:one@h1/d and postgresql://b:two@h2/d",
     "two: postgresql://a:***@h1/d and postgresql://b:***@h2/d"),
    ("postgresql://app:s3cret@db/app?password=other", "postgresql://app:***@db/app?password=***"),
    ("postgresql://db/app?user=app&password=s3cret&sslmode=require",
     "postgresql://db/app?user=app&password=***&sslmode=require"),
    ("host=db port=5432 user=app password=s3cret dbname=app", "host=db port=5432 user=app password=*** dbname=app"),
    ("host=db password = s3cret dbname=app", "host=db password = *** dbname=app"),
    ("host=db password='s3cret' dbname=app", "host=db password='***' dbname=app"),
    ('host=db password="s3cret"', 'host=db password="***"'),
    ("PASSWORD=s3cret", "PASSWORD=***"),
    ("password: s3cret", "password: ***"),
])
def test_redact_hides_the_password(text: str, expected: str) -> None:
    assert redact(text) == expected
    assert "s3cret" not in redact(text).lower()


@pytest.mark.parametrize("text", [
    "postgresql://app@db:5432/app",
    "postgresql://app:***@db:5432/app?sslmode=prefer",
    "listening on 127.0.0.1:6432 (transaction pooling, scram-sha-256 auth)",
    "pool app/alice: 5 of 5 busy, 3 waiting",
    "http://127.0.0.1:9127/metrics",
])
def test_redact_leaves_text_without_passwords_alone(text: str) -> None:
    assert redact(text) == text


def test_redact_is_idempotent() -> None:
    once = redact("postgresql://app:s3cret@db/app password=s3cret")
    assert redact(once) == once


def test_redact_hides_a_quoted_dsn_password_with_spaces() -> None:
    # libpq keyword/value syntax quotes values that contain spaces: password='correct horse battery'.
    redacted = redact("host=db user=app password='correct horse battery' dbname=app")
    for word in ("correct", "horse", "battery"):
        assert word not in redacted, redacted
    assert "host=db" in redacted and "dbname=app" in redacted


def test_redact_hides_a_dsn_password_containing_separators() -> None:
    # In keyword/value form only whitespace ends an unquoted value: ';', ',' and '&' belong to the password.
    redacted = redact("host=db password=Kq9;Zx7,Mv3&Tt1 dbname=app")
    for part in ("Zx7", "Mv3", "Tt1"):
        assert part not in redacted, redacted
    assert redacted.endswith(" dbname=app")


# ---- plain and JSON output --------------------------------------------------------------------------

def test_plain_lines_carry_the_connection_id_and_are_redacted(pgmux_log) -> None:
    stream = io.StringIO()
    setup_logging("plain", "info", stream=stream)
    log = get_logger("client")
    log.info("login ok: %s@%s", "app", "shop", extra={"conn": "c42"})
    log.warning("could not log in to %s", "postgresql://app:s3cret@db/app", extra={"conn": "s7"})
    log.info("no connection here")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 3
    assert " INFO c42 login ok: app@shop" in lines[0]
    assert " WARNING s7 could not log in to postgresql://app:***@db/app" in lines[1]
    assert lines[2].endswith(" INFO no connection here")
    assert "s3cret" not in stream.getvalue()


@pytest.mark.parametrize("log_format", ["plain", "json"])
def test_a_worker_process_names_itself_on_every_line(pgmux_log, log_format: str) -> None:
    stream = io.StringIO()
    setup_logging(log_format, "info", stream=stream)
    label_worker(1)
    log = get_logger("client")
    log.info("login ok", extra={"conn": "c42"})
    log.info("listening")
    lines = stream.getvalue().splitlines()
    if log_format == "plain":
        assert lines[0].endswith(" INFO w1 c42 login ok") and lines[1].endswith(" INFO w1 listening")
    else:
        assert [(json.loads(line)["worker"], json.loads(line).get("conn")) for line in lines] == [(1, "c42"), (1, None)]


def test_json_output_is_one_object_per_line_with_conn_ids(pgmux_log) -> None:
    stream = io.StringIO()
    setup_logging("json", "debug", stream=stream)
    log = get_logger("pool")
    log.info("server connected to %s", "postgresql://app:s3cret@db:5432/app", extra={"conn": "s1"})
    log.warning("two\nlines with password=s3cret", extra={"conn": "c9"})
    log.debug("no id")
    try:
        raise RuntimeError("boom at postgresql://app:s3cret@db/app")
    except RuntimeError:
        log.exception("task failed", extra={"conn": "c10"})
    output = stream.getvalue()
    lines = output.splitlines()
    assert len(lines) == 4, output
    entries = [json.loads(line) for line in lines]
    assert all(isinstance(entry, dict) for entry in entries)
    assert [entry["level"] for entry in entries] == ["info", "warning", "debug", "error"]
    assert [entry.get("conn") for entry in entries] == ["s1", "c9", None, "c10"]
    assert entries[0]["msg"] == "server connected to postgresql://app:***@db:5432/app"
    assert entries[1]["msg"] == "two\nlines with password=***"
    assert entries[0]["ts"].endswith("Z") and "T" in entries[0]["ts"]
    assert "RuntimeError" in entries[3]["exc"] and "postgresql://app:***@db/app" in entries[3]["exc"]
    assert "s3cret" not in output


def test_log_level_filters_and_output_stays_on_the_pgmux_logger(pgmux_log) -> None:
    stream = io.StringIO()
    setup_logging("json", "warning", stream=stream)
    log = get_logger("app")
    log.info("hidden")
    log.warning("shown")
    assert [json.loads(line)["msg"] for line in stream.getvalue().splitlines()] == ["shown"]
    assert logging.getLogger(LOGGER_NAME).propagate is False
    assert log.name == "pgmux.app"


def test_setup_logging_twice_does_not_duplicate_lines(pgmux_log) -> None:
    stream = io.StringIO()
    setup_logging("plain", "info", stream=stream)
    setup_logging("plain", "info", stream=stream)
    get_logger("x").info("once")
    assert stream.getvalue().count("once") == 1


# ---- floods: LogSummary -------------------------------------------------------------------------------

def test_log_summary_logs_a_flood_once_then_counts_it_per_interval(caplog) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER_NAME)
    log = get_logger("app")

    async def flood() -> None:
        summary = LogSummary(log, "cancel request with an unknown key ignored", interval=0.2)
        for _ in range(1000):
            summary.event()
        await asyncio.sleep(0.3)  # the first interval ends: one line counts the rest
        for _ in range(10):
            summary.event()
        await asyncio.sleep(0.6)  # the second ends with 10 more, the third quietly
        summary.event()  # after a quiet interval an event is logged at once again

    asyncio.run(flood())
    assert [record.getMessage() for record in caplog.records] == [
        "cancel request with an unknown key ignored",
        "cancel request with an unknown key ignored: 999 more in the last 0.2s",
        "cancel request with an unknown key ignored: 10 more in the last 0.2s",
        "cancel request with an unknown key ignored",
    ]


def test_enabled_for_answers_as_is_enabled_for_across_level_changes(pgmux_log: None) -> None:
    parent, log = logging.getLogger(LOGGER_NAME), get_logger("client")
    answers = []
    for level in (logging.WARNING, logging.INFO, logging.WARNING):
        parent.setLevel(level)  # after an answer was cached for the previous level
        answers.append((enabled_for(log, logging.INFO), enabled_for(log, logging.INFO), log.isEnabledFor(logging.INFO)))
    log.disabled = True
    try:
        answers.append((enabled_for(log, logging.WARNING), log.isEnabledFor(logging.WARNING)))
    finally:
        log.disabled = False
    assert answers == [(False, False, False), (True, True, True), (False, False, False), (False, False)]
