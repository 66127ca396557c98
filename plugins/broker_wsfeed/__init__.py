"""wsfeed: a generic upstream WebSocket feed (an exchange's market data) into topics.

Configuration (every key in docs/sources.md)::

    [plugins]
    enabled = ["noauth", "wsfeed"]

    [[plugin.wsfeed.sources]]
    name = "exchange"
    urls = ["wss://stream.example.com/ws"]
    # Sent after each connect: a string as it is, a table as JSON.
    send = [{ op = "subscribe", channels = ["trades", "book"], symbols = ["BTC-USD"] }]
    idle_timeout = 30.0

    [[plugin.wsfeed.sources.mappings]]
    match = { type = "trade" }
    topic = "trades.{symbol}"

    [[plugin.wsfeed.sources.mappings]]
    match = { type = "book" }
    topic = "book.{symbol}"
    key = "{side}:{price}"

Each received frame is decoded as JSON; the first mapping whose ``match``
holds turns it into a publish. Frames no mapping matches (heartbeats,
acknowledgements) are ignored and counted; frames that are not JSON, or that
a mapping cannot render, are skipped, counted and logged. A dropped or
silent upstream is reconnected by the supervisor after its backoff, and the
``send`` frames are sent again.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from broker import PluginContext
from broker.sources import (
    ConfiguredSource,
    Mappings,
    Publisher,
    SourceOptions,
    SourcesPlugin,
    SubjectSourceSettings,
    Upstream,
    UpstreamConnection,
    UpstreamOptions,
    publish_mapped,
    sources_plugin,
)

__all__ = ["SourceSettings", "WsFeedSource", "create"]

PLUGIN: Final = "wsfeed"


def _frame(item: str | dict[str, object]) -> str:
    return item if isinstance(item, str) else json.dumps(item, separators=(",", ":"))


@dataclass(frozen=True, kw_only=True)
class SourceSettings(SubjectSourceSettings, UpstreamOptions):
    """A ``[[plugin.wsfeed.sources]]`` table."""

    #: Frames sent after each connect: a string as it is, a table as JSON.
    send: tuple[str | dict[str, object], ...] = ()
    mappings: Mappings


class WsFeedSource(ConfiguredSource[SourceSettings]):
    """One upstream feed (with failover URLs) and its mappings."""

    def __init__(self, config: SourceSettings, options: SourceOptions) -> None:
        super().__init__(config, options)
        self.upstream = Upstream(config)
        self.send = tuple(_frame(item) for item in config.send)
        self.mappings = tuple(m.build() for m in config.mappings)

    def status(self) -> dict[str, Any]:
        return {"url": self.upstream.display}

    async def run(self, publisher: Publisher) -> None:
        await self.upstream.run(lambda conn: self._session(conn, publisher))

    async def _session(self, conn: UpstreamConnection, publisher: Publisher) -> None:
        for frame in self.send:
            await conn.send(frame)
        publisher.ready()
        mappings = self.mappings
        while True:
            raw = await conn.receive()
            try:
                message = json.loads(raw.decode("utf-8") if isinstance(raw, bytes) else raw)
            except (ValueError, RecursionError):
                publisher.skip(f"{conn.display} sent a frame that is not JSON")
                continue
            await publish_mapped(publisher, mappings, message)


def create(settings: Mapping[str, Any], context: PluginContext) -> SourcesPlugin[SourceSettings]:
    """Plugin factory (entry point ``wsfeed``)."""
    return sources_plugin(settings, context, SourceSettings, WsFeedSource)
