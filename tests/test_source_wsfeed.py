"""The wsfeed source against a fake exchange stream on loopback.

The fake feed is driven frame by frame from the test; a "black hole" server
completes the WebSocket handshake and then never reads again, so pings go
unanswered.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import pytest
import trio
import trio_websocket
from broker_wsfeed import create
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, Request

from broker import Broker, ConfigError, config_from_dict
from broker.plugin.host import PluginContext
from broker.sources import Supervisor
from tests.conftest import BrokerFactory
from tests.helpers import Client, connect, wait_until

SUBSCRIBE = {"op": "subscribe", "channels": ["trades", "book"], "symbols": ["BTC-USD"]}


@dataclass
class FeedConnection:
    ws: trio_websocket.WebSocketConnection
    received: list[str] = field(default_factory=list)
    got: trio.Event = field(default_factory=trio.Event)
    closed: trio.Event = field(default_factory=trio.Event)

    async def wait_received(self, count: int) -> list[str]:
        with trio.fail_after(5):
            while len(self.received) < count:
                await self.got.wait()
        return self.received

    async def send(self, obj: Any) -> None:
        await self.ws.send_message(obj if isinstance(obj, str) else json.dumps(obj))

    async def drop(self) -> None:
        await trio.aclose_forcefully(self.ws._stream)


class FakeFeed:
    def __init__(self) -> None:
        self.connections: list[FeedConnection] = []
        self.port = 0
        self._arrived = trio.Event()

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/stream"

    async def serve(
        self, *, task_status: trio.TaskStatus[FakeFeed] = trio.TASK_STATUS_IGNORED
    ) -> None:
        async with trio.open_nursery() as nursery:
            server = await nursery.start(
                trio_websocket.serve_websocket, self._handler, "127.0.0.1", 0, None
            )
            self.port = server.port
            task_status.started(self)

    async def connection(self, index: int) -> FeedConnection:
        with trio.fail_after(5):
            while len(self.connections) <= index:
                await self._arrived.wait()
        return self.connections[index]

    async def _handler(self, request: trio_websocket.WebSocketRequest) -> None:
        conn = FeedConnection(await request.accept())
        self.connections.append(conn)
        self._arrived.set()
        self._arrived = trio.Event()
        try:
            while True:
                message = await conn.ws.get_message()
                assert isinstance(message, str)
                conn.received.append(message)
                conn.got.set()
                conn.got = trio.Event()
        except trio_websocket.ConnectionClosed:
            pass
        finally:
            conn.closed.set()


def trade(n: int, symbol: str = "BTC-USD") -> dict[str, Any]:
    return {"type": "trade", "symbol": symbol, "id": n, "price": 64000 + n, "qty": 0.5}


def source_config(urls: list[str], **extra: Any) -> dict[str, Any]:
    table: dict[str, Any] = {
        "name": "exchange",
        "urls": urls,
        "send": ["hello", SUBSCRIBE],
        "backoff_min": 0.01,
        "backoff_max": 0.05,
        "ping_interval": 0,
        "mappings": [
            {"match": {"type": "trade"}, "topic": "trades.{symbol}"},
            {
                "match": {"type": "book"},
                "topic": "book.{symbol}",
                "key": "{side}:{price}",
                "data": "{qty}",
            },
            {"match": {"type": "ticker", "meta": {"venue": "x"}}, "topic": "ticker.{symbol|token}"},
        ],
    }
    table.update(extra)
    return table


async def start(
    start_broker: BrokerFactory, urls: list[str], **extra: Any
) -> tuple[Broker, Supervisor]:
    broker = await start_broker(
        {
            "plugins": {"enabled": ["noauth", "wsfeed"]},
            "plugin": {"wsfeed": {"sources": [source_config(urls, **extra)]}},
        },
        factories={"wsfeed": create},
    )
    return broker, broker.sources[0]


async def trade_ids(client: Client, count: int) -> list[int]:
    ids = []
    for _ in range(count):
        msg = await client.recv()
        assert msg["op"] == "msg" and msg["topic"] == "trades.BTC-USD", msg
        ids.append(msg["data"]["id"])
    return ids


@pytest.fixture
async def feed(nursery: trio.Nursery) -> FakeFeed:
    result: FakeFeed = await nursery.start(FakeFeed().serve)
    return result


async def test_sends_its_frames_then_maps_by_match(
    start_broker: BrokerFactory, feed: FakeFeed
) -> None:
    broker, sup = await start(start_broker, [feed.url])
    async with connect(broker.url) as client:
        await client.sub(">")
        conn = await feed.connection(0)
        assert await conn.wait_received(2) == [
            "hello",
            json.dumps(SUBSCRIBE, separators=(",", ":")),
        ]
        await wait_until(lambda: sup.state == "running")
        await conn.send({"type": "subscribed"})
        await conn.send({"type": "heartbeat", "ts": 1})
        await conn.send(trade(1))
        assert await client.recv() == {
            "op": "msg",
            "topic": "trades.BTC-USD",
            "seq": 1,
            "data": trade(1),
        }
        await conn.send(
            {"type": "book", "symbol": "BTC-USD", "side": "bid", "price": 63999.5, "qty": 2}
        )
        assert await client.recv() == {
            "op": "msg",
            "topic": "book.BTC-USD",
            "seq": 1,
            "data": 2,
            "key": "bid:63999.5",
        }
        # Nested match (meta.venue), and the token filter for a symbol with '/'.
        await conn.send({"type": "ticker", "symbol": "XBT/USD", "meta": {"venue": "y"}})
        await conn.send({"type": "ticker", "symbol": "XBT/USD", "meta": {"venue": "x"}})
        msg = await client.recv()
        assert msg["topic"] == "ticker.XBT_USD"
        await client.assert_alive()
    status = sup.status()
    assert (status["published"], status["ignored"], status["skipped"]) == (3, 3, 0)


async def test_reconnect_resends_its_frames_and_duplicates_nothing(
    start_broker: BrokerFactory, feed: FakeFeed
) -> None:
    broker, sup = await start(start_broker, [feed.url])
    async with connect(broker.url) as client:
        await client.sub("trades.*")
        first = await feed.connection(0)
        await first.wait_received(2)
        for n in (1, 2, 3):
            await first.send(trade(n))
        assert await trade_ids(client, 3) == [1, 2, 3]
        await first.drop()
        second = await feed.connection(1)
        assert len(await second.wait_received(2)) == 2  # subscribed again
        for n in (4, 5, 6):
            await second.send(trade(n))
        assert await trade_ids(client, 3) == [4, 5, 6]
        await client.assert_alive()
    assert sup.restarts == 1
    assert sup.published == 6


async def test_bad_frames_are_skipped(start_broker: BrokerFactory, feed: FakeFeed) -> None:
    broker, sup = await start(start_broker, [feed.url])
    async with connect(broker.url) as client:
        await client.sub(">")
        conn = await feed.connection(0)
        await conn.send("}{")
        await conn.ws.send_message(b"\xff\xfe binary garbage")
        await conn.send({"type": "trade", "id": 1})  # no symbol
        await conn.send({"type": "trade", "symbol": "BTC USD", "id": 2})  # not a topic token
        await conn.send({"type": "trade", "symbol": {"a": 1}, "id": 3})  # not a scalar
        await conn.send(trade(4))
        assert await trade_ids(client, 1) == [4]
    assert (sup.skipped, sup.published, sup.restarts) == (5, 1, 0)


async def test_silent_feed_is_reconnected(start_broker: BrokerFactory, feed: FakeFeed) -> None:
    _, sup = await start(start_broker, [feed.url], idle_timeout=0.1)
    await feed.connection(1)
    assert sup.last_error is not None and "no message for 0.1 s" in sup.last_error


async def test_unanswered_ping_drops_the_connection(
    start_broker: BrokerFactory, nursery: trio.Nursery
) -> None:
    accepted = 0
    second = trio.Event()

    async def black_hole(stream: trio.SocketStream) -> None:
        nonlocal accepted
        ws = WSConnection(ConnectionType.SERVER)
        while True:
            ws.receive_data(await stream.receive_some(4096))
            if any(isinstance(e, Request) for e in ws.events()):
                break
        await stream.send_all(ws.send(AcceptConnection()))
        accepted += 1
        if accepted == 2:
            second.set()
        await trio.sleep_forever()  # never reads again: pings go unanswered

    listeners = await nursery.start(partial(trio.serve_tcp, black_hole, 0, host="127.0.0.1"))
    port = listeners[0].socket.getsockname()[1]
    _, sup = await start(
        start_broker, [f"ws://127.0.0.1:{port}/"], ping_interval=0.1, idle_timeout=0
    )
    with trio.fail_after(2):
        await second.wait()
    assert sup.last_error is not None and "no pong within 0.1 s" in sup.last_error


def make(settings: dict[str, Any]) -> object:
    config = config_from_dict({"plugins": {"enabled": ["wsfeed"]}})
    return create(settings, PluginContext("wsfeed", config))


def base(**extra: Any) -> dict[str, Any]:
    table = {"name": "a", "urls": ["ws://x"], "mappings": [{"topic": "t"}]}
    table.update(extra)
    return {"sources": [table]}


@pytest.mark.parametrize(
    ("settings", "key", "reason"),
    [
        (base(send=[1]), "sources[0].send[0]", "expected a string or a table"),
        (base(mappings=[]), "sources[0].mappings", "must not be empty"),
        (
            base(mappings=[{"topic": "t.{x|shout}"}]),
            "sources[0].mappings[0].topic",
            "unknown filter",
        ),
        (
            base(mappings=[{"topic": "t", "match": {"a": [1]}}]),
            "sources[0].mappings[0].match.a",
            "must be",
        ),
        (base(headers={"X-Key": 1}), "sources[0].headers.X-Key", "expected a string"),
        (base(idle_timeout=-1), "sources[0].idle_timeout", "must be >= 0"),
        (base(ca_file="/nonexistent/ca.pem"), "sources[0].ca_file", "file not found"),
        (base(urls=["ws://x:99999/"]), "sources[0].urls[0]", "invalid port"),
        (base(roles="admin"), "sources[0].roles", "expected an array"),
        (base(extra=1), "sources[0].extra", "unknown key"),
    ],
)
def test_bad_settings_name_the_key(settings: dict[str, Any], key: str, reason: str) -> None:
    with pytest.raises(ConfigError) as info:
        make(settings)
    assert info.value.key == key
    assert reason in info.value.reason


def test_identity_from_settings() -> None:
    plugin = make(base(subject="feed-bot", roles=["publisher"]))
    sources = plugin.broker_sources(broker=None)  # type: ignore[attr-defined]
    assert sources[0].identity.subject == "feed-bot"
    assert sources[0].identity.roles == frozenset({"publisher"})
    assert sources[0].identity.plugin == "wsfeed"
