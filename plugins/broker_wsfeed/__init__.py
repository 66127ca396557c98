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

from broker import ConfigError, Identity, PluginContext, Settings
from broker.sources import (
    Backoff,
    MessageMapping,
    Publisher,
    SourceOptions,
    SourcesPlugin,
    Upstream,
    UpstreamConnection,
    UpstreamOptions,
    parse_mappings,
    parse_source_options,
    parse_upstream_options,
    publish_mapped,
    sources_plugin,
)

__all__ = ["WsFeedSource", "create"]

PLUGIN: Final = "wsfeed"


@dataclass(frozen=True, slots=True)
class SourceConfig:
    options: SourceOptions
    upstream: UpstreamOptions
    send: tuple[str, ...]
    mappings: tuple[MessageMapping, ...]


class WsFeedSource:
    """One upstream feed (with failover URLs) and its mappings."""

    def __init__(self, config: SourceConfig) -> None:
        self.config = config
        self.name = config.options.name
        self.identity: Identity = config.options.identity
        self.backoff: Backoff = config.options.backoff
        self.upstream = Upstream(config.upstream)

    def status(self) -> dict[str, Any]:
        return {"url": self.upstream.display}

    async def run(self, publisher: Publisher) -> None:
        await self.upstream.run(lambda conn: self._session(conn, publisher))

    async def _session(self, conn: UpstreamConnection, publisher: Publisher) -> None:
        for frame in self.config.send:
            await conn.send(frame)
        publisher.ready()
        mappings = self.config.mappings
        while True:
            raw = await conn.receive()
            try:
                message = json.loads(raw.decode("utf-8") if isinstance(raw, bytes) else raw)
            except (ValueError, RecursionError):
                publisher.skip(f"{conn.display} sent a frame that is not JSON")
                continue
            await publish_mapped(publisher, mappings, message)


def _source(t: Settings, context: PluginContext) -> SourceConfig:
    options = parse_source_options(t, context.name)
    upstream = parse_upstream_options(t, source_file=context.config.source)
    frames = []
    for i, item in enumerate(t.array("send", [])):
        if isinstance(item, str):
            frames.append(item)
        elif isinstance(item, Mapping):
            frames.append(json.dumps(item, separators=(",", ":")))
        else:
            raise ConfigError(f"{t.key('send')}[{i}]", "must be a string or a table")
    mappings = parse_mappings(t, "mappings")
    t.finish()
    return SourceConfig(options, upstream, tuple(frames), mappings)


def create(settings: Mapping[str, Any], context: PluginContext) -> SourcesPlugin[SourceConfig]:
    """Plugin factory (entry point ``wsfeed``)."""
    return sources_plugin(settings, context, _source, WsFeedSource)
