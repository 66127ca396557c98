"""Logging set-up: plain lines for the journal, or JSON lines.

Plain lines carry no timestamp by default (journald and most collectors add
their own); JSON lines carry one. Connection log lines start with the
connection id (``c42``) so one client's story can be grepped. Nothing here or
elsewhere logs a token: plugins get credentials, log lines get subjects.
"""

from __future__ import annotations

import json
import logging
import sys
import time

__all__ = ["setup_logging"]


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg (and exc if any)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def setup_logging(level: str = "info", fmt: str = "text") -> None:
    """Configure the root logger for the broker process (idempotent)."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # trio-websocket logs every frame at DEBUG; keep it quiet unless asked.
    logging.getLogger("trio-websocket").setLevel(
        logging.DEBUG if level == "debug" else logging.WARNING
    )
