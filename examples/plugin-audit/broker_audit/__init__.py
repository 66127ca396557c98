"""audit: one JSON line per published message, for the record.

Configuration::

    [plugin.audit]
    path = "audit.jsonl"        # required; relative to broker.toml
    topics = ["orders.>"]       # patterns to audit (default [">"]: everything)
    include_data = false        # also log each message's data

Each published message whose topic matches one of ``topics`` appends a line::

    {"ts": 1700000000.123, "subject": "alice", "plugin": "tokens",
     "topic": "orders.new", "seq": 42, "key": null}

The line is written from ``broker_published``, in the publisher's task,
with an ordinary (line-buffered) file write: one ``write(2)`` into the page
cache, a few microseconds, so the hook stays synchronous. A sink that can
block for long (a network service, a slow disk with ``fsync``) would belong
in an ``async def`` hook using ``trio.to_thread.run_sync``, or in a task of
its own fed by a bounded channel.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Annotated, Any

from broker import ConfigError, Identity, PluginContext, hookimpl, parse_settings, pattern_matches
from broker.settings import NON_EMPTY, File, TopicPattern

__all__ = ["AuditLog", "Settings", "create"]


class AuditLog:
    """Appends a JSON line per published message to a file."""

    def __init__(self, file: IO[str], topics: tuple[str, ...], *, include_data: bool) -> None:
        self.file = file
        self.topics = topics
        self.include_data = include_data
        self.written = 0

    def wants(self, topic: str) -> bool:
        return any(pattern_matches(p, topic) for p in self.topics)

    @hookimpl
    def broker_published(
        self, identity: Identity, topic: str, seq: int, data: Any, key: str | None
    ) -> None:
        if not self.wants(topic):
            return
        record: dict[str, Any] = {
            "ts": round(time.time(), 3),
            "subject": identity.subject,
            "plugin": identity.plugin,
            "topic": topic,
            "seq": seq,
            "key": key,
        }
        if self.include_data:
            record["data"] = data
        self.file.write(json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n")
        self.written += 1


@dataclass(frozen=True, kw_only=True)
class Settings:
    """``[plugin.audit]``: parse_settings checks every key against these
    types and refuses the keys it does not know."""

    #: Relative to broker.toml's directory; created if missing.
    path: Annotated[str, NON_EMPTY, File(exists=False)]
    topics: Annotated[tuple[TopicPattern, ...], NON_EMPTY] = (">",)
    include_data: bool = False


def create(settings: Mapping[str, Any], context: PluginContext) -> AuditLog:
    """Plugin factory: the entry point ``audit`` names it."""
    s = parse_settings(Settings, settings, source=context.config.source)
    path = Path(s.path)
    try:
        file = path.open("a", encoding="utf-8", buffering=1)  # line-buffered
    except OSError as e:
        raise ConfigError("path", f"cannot open {path}: {e.strerror or e}") from None
    return AuditLog(file, s.topics, include_data=s.include_data)
