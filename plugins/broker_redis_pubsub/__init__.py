"""redis_pubsub: Redis pub/sub channels and patterns into topics (needs
``trio-broker[redis]``).

Named apart from the Redis *engine* (``[engine] type = "redis"``), which
shares state between brokers; this plugin only reads channels into topics.

Configuration (every key in docs/sources.md)::

    [plugins]
    enabled = ["noauth", "redis_pubsub"]

    [[plugin.redis_pubsub.sources]]
    name = "backend"
    url = "redis://127.0.0.1:6379/0"
    patterns = ["prices:*"]

    [[plugin.redis_pubsub.sources.mappings]]
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
from typing import Annotated, Any, Final, Literal
from urllib.parse import parse_qs, urlsplit, urlunsplit

from broker import ConfigError, PluginContext
from broker.settings import NON_EMPTY, Check, NonEmptyStr, Seconds
from broker.sources import (
    ConfiguredSource,
    MatchMappingSettings,
    Publisher,
    SourceError,
    SourceOptions,
    SourcesPlugin,
    SubjectSourceSettings,
    TemplateText,
    publish_mapped,
    sources_plugin,
)

__all__ = ["MappingSettings", "RedisSource", "SourceSettings", "create"]

PLUGIN: Final = "redis_pubsub"


def verified_url(url: str) -> str:
    """*url*, asking coredis to check the server's host name on ``rediss://``
    (it verifies the certificate chain only, unless told): a certificate
    for another host from any trusted CA must not pass for the Redis server.
    An explicit ``ssl_check_hostname`` in the URL is kept."""
    parts = urlsplit(url)
    if parts.scheme != "rediss" or "ssl_check_hostname" in parse_qs(parts.query):
        return url
    query = f"{parts.query}&ssl_check_hostname=true" if parts.query else "ssl_check_hostname=true"
    return urlunsplit(parts._replace(query=query))


def _redis_url(url: str) -> None:
    if urlsplit(url).scheme not in ("redis", "rediss", "unix"):
        raise ValueError("must be a redis://, rediss:// or unix:// URL")


def _client_name(name: str) -> None:
    if any(c.isspace() for c in name):
        raise ValueError("must not contain spaces")


@dataclass(frozen=True, kw_only=True)
class MappingSettings(MatchMappingSettings):
    """A ``[[plugin.redis_pubsub.sources.mappings]]`` table: the data is the message's."""

    data: TemplateText | None = "{data}"


@dataclass(frozen=True, kw_only=True)
class SourceSettings(SubjectSourceSettings):
    """A ``[[plugin.redis_pubsub.sources]]`` table."""

    url: Annotated[str, NON_EMPTY, Check(_redis_url)] = "redis://127.0.0.1:6379/0"
    channels: tuple[NonEmptyStr, ...] = ()
    patterns: tuple[NonEmptyStr, ...] = ()
    payload: Literal["json", "text"] = "json"
    mappings: Annotated[tuple[MappingSettings, ...], NON_EMPTY]
    #: Default ``trio-broker:NAME``.
    client_name: Annotated[str, NON_EMPTY, Check(_client_name)] | None = None
    connect_timeout: Seconds = 5.0
    keepalive: Seconds = 15.0

    def validate(self) -> None:
        if not self.channels and not self.patterns:
            raise ConfigError("channels", "give channels, patterns or both")


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


class RedisSource(ConfiguredSource[SourceSettings]):
    """One Redis connection subscribed to channels and patterns."""

    def __init__(self, config: SourceSettings, options: SourceOptions) -> None:
        super().__init__(config, options)
        self.display = display_url(config.url)
        self.client_name = config.client_name or f"trio-broker:{config.name}"
        self.mappings = tuple(m.build() for m in config.mappings)

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
                verified_url(config.url),
                decode_responses=False,
                client_name=self.client_name,
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
        await publish_mapped(publisher, self.mappings, root)


def _text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8")
    return str(value)


def create(settings: Mapping[str, Any], context: PluginContext) -> SourcesPlugin[SourceSettings]:
    """Plugin factory (entry point ``redis_pubsub``)."""
    return sources_plugin(settings, context, SourceSettings, RedisSource)
