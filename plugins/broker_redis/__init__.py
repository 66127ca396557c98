"""redis: Redis pub/sub channels and patterns into topics (needs ``trio-broker[redis]``).

Configuration (every key in docs/sources.md)::

    [plugins]
    enabled = ["noauth", "redis"]

    [[plugin.redis.sources]]
    name = "backend"
    url = "redis://127.0.0.1:6379/0"
    patterns = ["prices:*"]

    [[plugin.redis.sources.mappings]]
    topic = "prices.{channel|token}"       # prices:BTC-USD -> prices.prices_BTC-USD

Each Redis message is seen by the mappings as ``{"channel": ..., "pattern":
..., "data": ...}``, ``data`` being the message decoded as JSON (``payload =
"json"``, the default) or as text (``payload = "text"``); the default data
template is ``{data}``.

The client is coredis (>= 6.8), which runs under trio. Its own reconnect
policy is turned off: a lost connection (a Redis restart, ``CLIENT KILL``)
ends the subscription, and the supervisor reconnects and resubscribes after
its backoff, so the source's state shows the outage. Redis pub/sub is
at-most-once: what is published while the source is disconnected is lost,
and nothing is delivered twice. coredis buffers received messages without a
bound; this source consumes them without waiting (a publish never blocks on
subscribers), so the buffer stays small.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import urlsplit

from broker import ConfigError, Identity, PluginContext, Settings
from broker.sources import (
    Backoff,
    MessageMapping,
    Publisher,
    SourceError,
    SourceOptions,
    SourcesPlugin,
    parse_mapping,
    parse_source_options,
    publish_mapped,
    sources_plugin,
)

__all__ = ["RedisSource", "create"]

PLUGIN: Final = "redis"


@dataclass(frozen=True, slots=True)
class SourceConfig:
    options: SourceOptions
    url: str
    channels: tuple[str, ...]
    patterns: tuple[str, ...]
    payload: str
    mappings: tuple[MessageMapping, ...]
    client_name: str
    connect_timeout: float
    keepalive: float


def display_url(url: str) -> str:
    """The URL without its password."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return parts._replace(netloc=user + netloc).geturl()


def _leaf(error: BaseException) -> BaseException:
    while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
        error = error.exceptions[0]
    return error


class RedisSource:
    """One Redis connection subscribed to channels and patterns."""

    def __init__(self, config: SourceConfig) -> None:
        self.config = config
        self.name = config.options.name
        self.identity: Identity = config.options.identity
        self.backoff: Backoff = config.options.backoff
        self.display = display_url(config.url)

    def status(self) -> dict[str, Any]:
        return {
            "url": self.display,
            "channels": list(self.config.channels),
            "patterns": list(self.config.patterns),
        }

    async def run(self, publisher: Publisher) -> None:
        import coredis
        from coredis.exceptions import RedisError

        config = self.config
        try:
            client = coredis.Redis.from_url(
                config.url,
                decode_responses=False,
                client_name=config.client_name,
                connect_timeout=config.connect_timeout,
            )
            async with (
                client,
                client.pubsub(
                    channels=list(config.channels) or None,
                    patterns=list(config.patterns) or None,
                    ignore_subscribe_messages=True,
                    retry_policy=None,  # the supervisor reconnects
                    max_idle_seconds=config.keepalive,
                ) as pubsub,
            ):
                publisher.ready()
                async for message in pubsub:
                    await self._forward(message, publisher)
        except Exception as e:
            leaf = _leaf(e)
            if isinstance(leaf, RedisError | OSError | TimeoutError):
                text = str(leaf) or type(leaf).__name__
                raise SourceError(f"{self.display}: {text}") from e
            raise
        # coredis ends the iteration when no subscription is left.
        raise SourceError(f"{self.display}: the subscription ended")

    async def _forward(self, message: Mapping[str, Any], publisher: Publisher) -> None:
        try:
            channel = _text(message.get("channel"))
            pattern = message.get("pattern")
            raw = message.get("data")
            if self.config.payload == "json":
                data = json.loads(raw) if isinstance(raw, bytes | str) else raw
            else:
                data = _text(raw)
        except (ValueError, RecursionError):
            publisher.skip(f"a message on {message.get('channel')!r} is not JSON (or not UTF-8)")
            return
        root = {
            "channel": channel,
            "pattern": None if pattern is None else _text(pattern),
            "data": data,
        }
        await publish_mapped(publisher, self.config.mappings, root)


def _text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8")
    return str(value)


def _source(t: Settings, context: PluginContext) -> SourceConfig:
    options = parse_source_options(t, context.name)
    url = t.text("url", "redis://127.0.0.1:6379/0")
    if urlsplit(url).scheme not in ("redis", "rediss", "unix"):
        raise ConfigError(t.key("url"), "must be a redis://, rediss:// or unix:// URL")
    channels = t.strings("channels", [])
    patterns = t.strings("patterns", [])
    if not channels and not patterns:
        raise ConfigError(t.key("channels"), "give channels, patterns or both")
    payload = t.choice("payload", ("json", "text"), "json")
    mappings = []
    for m in t.tables("mappings", empty=False):
        mappings.append(parse_mapping(m, default_data="{data}"))
        m.finish()
    client_name = t.text("client_name", f"trio-broker:{options.name}")
    if any(c.isspace() for c in client_name):
        raise ConfigError(t.key("client_name"), "must not contain spaces")
    connect_timeout = t.number("connect_timeout", 5.0)
    keepalive = t.number("keepalive", 15.0)
    t.finish()
    return SourceConfig(
        options,
        url,
        channels,
        patterns,
        payload,
        tuple(mappings),
        client_name,
        connect_timeout,
        keepalive,
    )


def create(settings: Mapping[str, Any], context: PluginContext) -> SourcesPlugin[SourceConfig]:
    """Plugin factory (entry point ``redis``)."""
    return sources_plugin(settings, context, _source, RedisSource)
