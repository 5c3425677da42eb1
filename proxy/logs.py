"""Structured logging: one line per event with a connection id, plain or JSON, passwords redacted everywhere."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import sys
import time

LOGGER_NAME = "pgmux"

# postgresql://user:secret@host -> postgresql://user:***@host ; password=secret -> password=***
_URL_PASSWORD = re.compile(r"(?P<head>\b[a-z][a-z0-9+.-]*://[^:/@\s]*:)(?P<secret>[^@\s]*)(?P<tail>@)", re.IGNORECASE)
# ?password=secret&... in a URL query runs to the next '&'.
_QUERY_PASSWORD = re.compile(r"(?P<head>[?&]password=)(?P<secret>[^&\s#]*)", re.IGNORECASE)
# password='a b' / password="a b" keep their quotes; an unquoted value runs to white space (libpq).
_KEYWORD_PASSWORD = re.compile(
    r"""(?P<head>(?<![?&])\bpassword["']?\s*[=:]\s*)(?:(?P<quote>['"])(?P<quoted>(?:(?!(?P=quote))[^\\]|\\.)*)(?P=quote)|(?P<bare>[^\s'"]+))""",
    re.IGNORECASE)


def _hide_keyword(match: re.Match[str]) -> str:
    quote = match["quote"] or ""
    return f"{match['head']}{quote}***{quote}"


# Each pattern above needs "://" or "password" (in any case) in the text; most lines have neither, and one search
# for them costs a sixth of the three substitutions (which were 6 µs of every "login ok" line).
_MAY_HOLD_A_PASSWORD = re.compile(r"://|password", re.IGNORECASE)


def redact(text: str) -> str:
    """Hide passwords in URLs and key=value DSNs; the one place every printed string goes through."""
    if _MAY_HOLD_A_PASSWORD.search(text) is None:
        return text
    text = _URL_PASSWORD.sub(lambda m: f"{m['head']}***{m['tail']}", text)
    text = _QUERY_PASSWORD.sub(lambda m: f"{m['head']}***", text)
    return _KEYWORD_PASSWORD.sub(_hide_keyword, text)


class _RedactingFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "msg": redact(record.getMessage()),
        }
        conn = getattr(record, "conn", None)
        if conn:
            entry["conn"] = conn
        worker = getattr(record, "worker", None)
        if worker is not None:
            entry["worker"] = worker
        if record.exc_info:
            entry["exc"] = redact(self.formatException(record.exc_info))
        return json.dumps(entry)


class _ConnIdFilter(logging.Filter):
    """Puts the connection id (``extra={"conn": "c42"}``) at the front of plain lines."""

    def filter(self, record: logging.LogRecord) -> bool:
        conn = getattr(record, "conn", None)
        record.conn_prefix = f"{conn} " if conn else ""
        return True


class _WorkerFilter(logging.Filter):
    """Names the worker process on every line (``w1 c42 ...``): connection ids repeat across workers."""

    def __init__(self, worker: int) -> None:
        super().__init__()
        self.worker = worker

    def filter(self, record: logging.LogRecord) -> bool:
        record.worker = self.worker
        record.conn_prefix = f"w{self.worker} {getattr(record, 'conn_prefix', '')}"
        return True


def label_worker(worker: int) -> None:
    """In a worker process (proxy/workers.py): tag every line it logs with its index."""
    for handler in logging.getLogger(LOGGER_NAME).handlers:
        handler.addFilter(_WorkerFilter(worker))


def setup_logging(log_format: str = "plain", level: str = "info", stream: object = None) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)  # type: ignore[arg-type]
    if log_format == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(_RedactingFormatter("%(asctime)s %(levelname)s %(conn_prefix)s%(message)s"))
    handler.addFilter(_ConnIdFilter())
    logger = logging.getLogger(LOGGER_NAME)
    logger.handlers[:] = [handler]
    logger.setLevel(level.upper())
    logger.propagate = False


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(f"{LOGGER_NAME}.{name}")


class LogSummary:
    """An event anyone can repeat at will, logged at most once per ``interval``: at once, then as a count.

    A flood (CancelRequests with made-up keys need no login) writes one line, then one line per
    interval saying how many more came while it lasts, instead of one line per event.
    """

    def __init__(self, logger: logging.Logger, message: str, interval: float) -> None:
        self._logger = logger
        self._message = message
        self._interval = interval
        self._unlogged = 0
        self._timer: asyncio.TimerHandle | None = None

    def event(self) -> None:
        if self._timer is not None:
            self._unlogged += 1
            return
        self._logger.info("%s", self._message)
        self._timer = asyncio.get_running_loop().call_later(self._interval, self._summarise)

    def _summarise(self) -> None:
        self._timer = None
        if self._unlogged:
            self._logger.info("%s: %d more in the last %gs", self._message, self._unlogged, self._interval)
            self._unlogged = 0
            self._timer = asyncio.get_running_loop().call_later(self._interval, self._summarise)
