"""jsonrpc: JSON-RPC 2.0 WebSocket subscriptions (``eth_subscribe``) into topics.

Configuration (every key in docs/sources.md)::

    [plugins]
    enabled = ["noauth", "jsonrpc"]

    [[plugin.jsonrpc.sources]]
    name = "mainnet"
    urls = ["wss://node-a.example/ws", "wss://node-b.example/ws"]   # failover
    idle_timeout = 60.0

    [[plugin.jsonrpc.sources.subscriptions]]
    params = ["newHeads"]
    topic = "eth.blocks"

    [[plugin.jsonrpc.sources.subscriptions]]
    params = ["logs", { address = "0xA0b86991c6218b36c1d19D4a2e9Eb0cE3606eB48" }]
    topic = "eth.logs.{params.result.address|lower}"

Each connection sends every subscription's call (``{"jsonrpc": "2.0", "id":
N, "method": "eth_subscribe", "params": [...]}``), waits for every answer,
then maps each notification (``{"method": "eth_subscription", "params":
{"subscription": ID, "result": ...}}``) of those subscriptions to a topic.
Notifications of any other subscription id (an earlier connection's, say)
are ignored, so a reconnect never forwards a notification twice. A silent
upstream, a dropped connection or an error answer ends the session; the
supervisor reconnects (to the next URL) after its backoff.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Final

import trio

from broker import PluginContext
from broker.settings import NON_EMPTY, NonEmptyStr, Seconds
from broker.sources import (
    ConfiguredSource,
    MappingError,
    MappingSettings,
    MessageMapping,
    Publisher,
    SourceError,
    SourceOptions,
    SourcesPlugin,
    SubjectSourceSettings,
    TemplateText,
    Upstream,
    UpstreamConnection,
    UpstreamOptions,
    sources_plugin,
)

__all__ = ["JsonRpcSource", "SourceSettings", "Subscription", "SubscriptionSettings", "create"]

PLUGIN: Final = "jsonrpc"


@dataclass(frozen=True, slots=True)
class Subscription:
    """One subscribe call and how its notifications are mapped."""

    method: str
    params: tuple[Any, ...]
    mapping: MessageMapping


@dataclass(frozen=True, kw_only=True)
class SubscriptionSettings(MappingSettings):
    """A ``[[plugin.jsonrpc.sources.subscriptions]]`` table."""

    method: NonEmptyStr = "eth_subscribe"
    params: tuple[object, ...]
    data: TemplateText | None = "{params.result}"

    def subscription(self) -> Subscription:
        return Subscription(self.method, self.params, self.build())


@dataclass(frozen=True, kw_only=True)
class SourceSettings(SubjectSourceSettings, UpstreamOptions):
    """A ``[[plugin.jsonrpc.sources]]`` table."""

    subscriptions: Annotated[tuple[SubscriptionSettings, ...], NON_EMPTY]
    request_timeout: Seconds = 10.0
    notification_method: NonEmptyStr = "eth_subscription"


def _decode(raw: str | bytes) -> Any:
    text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
    return json.loads(text)


class JsonRpcSource(ConfiguredSource[SourceSettings]):
    """One upstream node (with failover URLs) and its subscriptions."""

    def __init__(self, config: SourceSettings, options: SourceOptions) -> None:
        super().__init__(config, options)
        self.upstream = Upstream(config)
        self.subscriptions = tuple(s.subscription() for s in config.subscriptions)
        #: Subscription id -> subscription, for the current connection only.
        self.active: dict[str | int, Subscription] = {}

    def status(self) -> dict[str, Any]:
        return {
            "url": self.upstream.display,
            "subscriptions": {str(k): list(v.params[:1]) for k, v in self.active.items()},
        }

    async def run(self, publisher: Publisher) -> None:
        try:
            await self.upstream.run(lambda conn: self._session(conn, publisher))
        finally:
            self.active = {}

    async def _session(self, conn: UpstreamConnection, publisher: Publisher) -> None:
        config = self.config
        active: dict[str | int, Subscription] = {}
        self.active = active
        pending: dict[int, Subscription] = {}
        for request_id, call in enumerate(self.subscriptions, 1):
            pending[request_id] = call
            await conn.send_json(
                {"jsonrpc": "2.0", "id": request_id, "method": call.method, "params": call.params}
            )
        deadline = trio.current_time() + config.request_timeout
        while True:
            with trio.move_on_at(deadline if pending else math.inf) as waited:
                raw = await conn.receive()
            if waited.cancelled_caught:
                first = next(iter(pending.values()))
                raise SourceError(
                    f"{conn.display}: no answer to {first.method} within "
                    f"{config.request_timeout:g} s"
                )
            try:
                message = _decode(raw)
            except (ValueError, RecursionError):
                publisher.skip(f"{conn.display} sent a message that is not JSON")
                continue
            for item in message if isinstance(message, list) else [message]:
                if not isinstance(item, dict):
                    publisher.skip(f"{conn.display} sent JSON that is not an object")
                    continue
                if "id" in item and ("result" in item or "error" in item):
                    self._answer(conn, item, pending, active)
                    if not pending:
                        publisher.ready()
                    continue
                if item.get("method") != config.notification_method:
                    publisher.ignore(f"not a {config.notification_method} notification")
                    continue
                params = item.get("params")
                sub_id = params.get("subscription") if isinstance(params, dict) else None
                sub = active.get(sub_id) if isinstance(sub_id, str | int) else None
                if sub is None:
                    publisher.ignore(f"notification for subscription {sub_id!r}, not a current one")
                    continue
                try:
                    topic, data, key = sub.mapping.apply(item)
                except MappingError as e:
                    publisher.skip(str(e))
                    continue
                await publisher.send(topic, data, key)  # counted and logged by the publisher

    def _answer(
        self,
        conn: UpstreamConnection,
        answer: dict[str, Any],
        pending: dict[int, Subscription],
        active: dict[str | int, Subscription],
    ) -> None:
        request_id = answer.get("id")
        sub = pending.pop(request_id, None) if type(request_id) is int else None
        if sub is None:
            return  # not one of ours
        if "error" in answer:
            error = answer["error"]
            detail = error.get("message") if isinstance(error, dict) else error
            raise SourceError(
                f"{conn.display}: {sub.method} {json.dumps(sub.params[:1])} failed: {detail}"
            )
        sub_id = answer.get("result")
        if type(sub_id) is not str and type(sub_id) is not int:
            raise SourceError(
                f"{conn.display}: {sub.method} answered {sub_id!r}, not a subscription id"
            )
        active[sub_id] = sub


def create(settings: Mapping[str, Any], context: PluginContext) -> SourcesPlugin[SourceSettings]:
    """Plugin factory (entry point ``jsonrpc``)."""
    return sources_plugin(settings, context, SourceSettings, JsonRpcSource)
