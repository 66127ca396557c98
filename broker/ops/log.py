"""Logging set-up: plain lines for the journal, or JSON lines.

Plain lines carry no timestamp (journald and most collectors add their own);
JSON lines carry one. When standard error is connected to the journal
(``$JOURNAL_STREAM`` names it, as systemd sets it for a service), plain lines
also start with a ``<N>`` syslog priority prefix (``sd-daemon(3)``), so
``journalctl -p warning`` filters them by level.

Every TCP connection gets an id (``c42``) when it is accepted. The server
sets it in :data:`CONNECTION_ID` for the connection's tasks, so every line
logged on its behalf (handshake refusals, plugin errors, ...) carries it: at
the start of plain lines, and as ``"conn"`` in JSON lines. Lines that already
start with a connection id are left as they are.

Nothing here or elsewhere logs a token: plugins get credentials, log lines
get subjects. As a safety net the formatters also mask anything that looks
like ``token=VALUE`` or ``Bearer VALUE``.
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
import re
import sys
import time
from typing import Final, TextIO

__all__ = [
    "CONNECTION_ID",
    "JsonFormatter",
    "TextFormatter",
    "apply_logging",
    "setup_logging",
]

#: The id of the connection the current task serves (``None`` outside one).
CONNECTION_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "broker_connection_id", default=None
)

_LEADING_ID: Final = re.compile(r"(c\d+) ")
_SECRET: Final = re.compile(r"(?i)(\btoken=|\bbearer\s+)[^\s&\"',;]+")

#: Python levels to syslog priorities, for the journal's ``<N>`` prefix.
_PRIORITY: Final = {
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}


def redact(text: str) -> str:
    """Mask ``token=...`` and ``Bearer ...`` values in *text*."""
    return _SECRET.sub(r"\1[redacted]", text)


def _connection(message: str) -> tuple[str | None, bool]:
    """(connection id, whether the message already starts with it)."""
    match = _LEADING_ID.match(message)
    if match is not None:
        return match.group(1), True
    return CONNECTION_ID.get(), False


class TextFormatter(logging.Formatter):
    """``LEVEL logger: [cN ]message``, optionally with a journal priority prefix."""

    def __init__(self, *, journal: bool = False) -> None:
        super().__init__()
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        conn, leading = _connection(message)
        if conn is not None and not leading:
            message = f"{conn} {message}"
        line = f"{record.levelname} {record.name}: {message}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        line = redact(line)
        if self.journal:
            priority = _PRIORITY.get(record.levelno, 6)
            # Every physical line gets the prefix (tracebacks included).
            line = "\n".join(f"<{priority}>{part}" for part in line.split("\n"))
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, conn (if any), msg, exc."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        conn, _ = _connection(message)
        if conn is not None:
            entry["conn"] = conn
        entry["msg"] = redact(message)
        if record.exc_info:
            entry["exc"] = redact(self.formatException(record.exc_info))
        return json.dumps(entry, ensure_ascii=False)


def _stream_is_journal(stream: TextIO) -> bool:
    """Whether *stream* is the journal stream systemd named in $JOURNAL_STREAM."""
    value = os.environ.get("JOURNAL_STREAM", "")
    dev, _, ino = value.partition(":")
    if not dev or not ino:
        return False
    try:
        st = os.fstat(stream.fileno())
        return (st.st_dev, st.st_ino) == (int(dev), int(ino))
    except (OSError, ValueError, AttributeError):
        return False


def _formatter(fmt: str, stream: TextIO) -> logging.Formatter:
    if fmt == "json":
        return JsonFormatter()
    return TextFormatter(journal=_stream_is_journal(stream))


class _BrokerHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The handler setup_logging installs (so apply_logging can find it)."""


def _quiet_libraries(level: str) -> None:
    # trio-websocket logs every frame at DEBUG; keep it quiet unless asked.
    logging.getLogger("trio-websocket").setLevel(
        logging.DEBUG if level == "debug" else logging.WARNING
    )


def setup_logging(level: str = "info", fmt: str = "text", *, stream: TextIO | None = None) -> None:
    """Configure the root logger for the broker process (idempotent)."""
    out = stream if stream is not None else sys.stderr
    handler = _BrokerHandler(out)
    handler.setFormatter(_formatter(fmt, out))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    _quiet_libraries(level)


def apply_logging(level: str, fmt: str) -> None:
    """Change the level and format live (a reload), keeping the handler.

    Only the handler installed by :func:`setup_logging` has its format
    changed; other handlers (an embedding application's) are left alone.
    """
    root = logging.getLogger()
    root.setLevel(level.upper())
    for handler in root.handlers:
        if isinstance(handler, _BrokerHandler):
            handler.setFormatter(_formatter(fmt, handler.stream))
    _quiet_libraries(level)
