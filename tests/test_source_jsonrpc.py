"""The jsonrpc source against a fake JSON-RPC node on loopback.

The node is driven step by step (tests/fake_jsonrpc.py): it answers
eth_subscribe, sends notifications, stalls, drops the connection, sends
garbage. Every test reads what reaches a subscribed broker client, and the
reconnect tests check that nothing reaches the topic twice.
"""

from __future__ import annotations

from typing import Any

import pytest
import trio
from broker_jsonrpc import create

from broker import Broker, ConfigError, config_from_dict
from broker.plugin.host import PluginContext
from broker.sources import Supervisor
from tests.conftest import BrokerFactory
from tests.fake_jsonrpc import FakeNode, head, transfer_log
from tests.helpers import Client, connect, free_port, wait_until

FAST = {"backoff_min": 0.01, "backoff_max": 0.05, "ping_interval": 0}


def source_config(urls: list[str], **extra: Any) -> dict[str, Any]:
    table: dict[str, Any] = {
        "name": "node",
        "urls": urls,
        **FAST,
        "subscriptions": [
            {"params": ["newHeads"], "topic": "eth.blocks"},
            {
                "params": ["logs", {"address": "0xA0b86991c6218b36c1d19D4a2e9Eb0cE3606eB48"}],
                "topic": "eth.logs.{params.result.address|lower}",
                "key": "{params.result.transactionHash}",
            },
        ],
    }
    table.update(extra)
    return table


async def start(
    start_broker: BrokerFactory, urls: list[str], **extra: Any
) -> tuple[Broker, Supervisor]:
    broker = await start_broker(
        {
            "plugins": {"enabled": ["noauth", "jsonrpc"]},
            "plugin": {"jsonrpc": {"sources": [source_config(urls, **extra)]}},
        },
        factories={"jsonrpc": create},
    )
    assert len(broker.sources) == 1
    return broker, broker.sources[0]


async def heads(client: Client, count: int) -> list[int]:
    numbers = []
    for _ in range(count):
        msg = await client.recv()
        assert msg["op"] == "msg" and msg["topic"] == "eth.blocks", msg
        numbers.append(int(msg["data"]["number"], 16))
    return numbers


@pytest.fixture
async def node(nursery: trio.Nursery) -> FakeNode:
    result: FakeNode = await nursery.start(FakeNode().serve)
    return result


async def test_heads_and_logs_reach_their_topics(
    start_broker: BrokerFactory, node: FakeNode
) -> None:
    broker, sup = await start(start_broker, [node.url])
    async with connect(broker.url) as client:
        await client.sub("eth.>")
        conn = await node.connection(0)
        blocks, logs = await conn.wait_subscribed(2)
        assert conn.requests[0] == {
            "jsonrpc": "2.0",
            "id": 1,
            "method": "eth_subscribe",
            "params": ["newHeads"],
        }
        assert conn.requests[1]["params"][0] == "logs"
        await wait_until(lambda: sup.state == "running")
        await conn.notify(blocks, head(100))
        msg = await client.recv()
        assert msg == {"op": "msg", "topic": "eth.blocks", "seq": 1, "data": head(100)}
        await conn.notify(logs, transfer_log(100))
        msg = await client.recv()
        assert msg["topic"] == "eth.logs.0xa0b86991c6218b36c1d19d4a2e9eb0ce3606eb48"
        assert msg["data"] == transfer_log(100)
        assert msg["key"] == transfer_log(100)["transactionHash"]
    status = sup.status()
    assert status["published"] == 2
    assert status["state"] == "running"
    assert status["detail"]["url"] == node.url.rstrip("/")
    assert status["subject"] == "jsonrpc:node"


async def test_drop_reconnects_resubscribes_and_forwards_nothing_twice(
    start_broker: BrokerFactory, node: FakeNode
) -> None:
    broker, sup = await start(start_broker, [node.url])
    async with connect(broker.url) as client:
        await client.sub("eth.blocks")
        first = await node.connection(0)
        old, _ = await first.wait_subscribed(2)
        for n in (1, 2, 3):
            await first.notify(old, head(n))
        assert await heads(client, 3) == [1, 2, 3]

        await first.drop()
        second = await node.connection(1)
        new, _ = await second.wait_subscribed(2)
        assert new != old
        await wait_until(lambda: sup.state == "running")
        # A stale notification of the old subscription (a node replaying, a
        # proxy mixing connections) is not forwarded: it is not current.
        await second.notify(old, head(3))
        for n in (4, 5, 6):
            await second.notify(new, head(n))
        assert await heads(client, 3) == [4, 5, 6]
        await client.assert_alive()
    status = sup.status()
    assert status["restarts"] == 1
    assert "connection closed" in status["last_error"]
    assert status["published"] == 6
    assert status["ignored"] >= 1


async def test_silent_upstream_is_dropped_and_resubscribed(
    start_broker: BrokerFactory, node: FakeNode
) -> None:
    broker, sup = await start(start_broker, [node.url], idle_timeout=0.5)
    async with connect(broker.url) as client:
        await client.sub("eth.blocks")
        first = await node.connection(0)
        old, _ = await first.wait_subscribed(2)
        # The node stalls: nothing after the subscription answers.
        second = await node.connection(1)
        new, _ = await second.wait_subscribed(2)
        assert new != old
        with trio.fail_after(2):
            await first.closed.wait()  # the source closed the stalled one
        await second.notify(new, head(2))
        assert await heads(client, 1) == [2]
    assert sup.restarts >= 1
    assert sup.last_error is not None and "no message for 0.5 s" in sup.last_error


async def test_garbage_and_unmappable_notifications_are_counted_not_fatal(
    start_broker: BrokerFactory, node: FakeNode
) -> None:
    broker, sup = await start(start_broker, [node.url])
    async with connect(broker.url) as client:
        await client.sub("eth.>")
        conn = await node.connection(0)
        blocks, logs = await conn.wait_subscribed(2)
        await conn.send("this is not JSON {")
        await conn.send("[1, 2]")
        await conn.send({"jsonrpc": "2.0", "method": "something_else", "params": {}})
        # No address: the topic template cannot be rendered.
        await conn.notify(logs, {"topics": []})
        # An address that is not a topic token.
        await conn.notify(logs, {"address": "0x12 34/56", "transactionHash": "0x1"})
        # Not representable in msgpack (and so not publishable).
        await conn.notify(blocks, {"number": "0x1", "huge": 2**70})
        await conn.notify(blocks, head(7))
        assert await heads(client, 1) == [7]
        await client.assert_alive()
    status = sup.status()
    assert status["restarts"] == 0
    assert status["skipped"] == 5  # not JSON, 2 non-objects, 2 unmappable
    assert status["rejected"] == 1  # the huge integer
    assert status["ignored"] == 1  # the other method
    assert status["published"] == 1


async def test_error_answer_backs_off_and_retries(
    start_broker: BrokerFactory, nursery: trio.Nursery
) -> None:
    node = FakeNode(refuse="invalid params")
    await nursery.start(node.serve)
    _, sup = await start(start_broker, [node.url])
    await node.connection(2)  # the source retried, with backoff, twice at least
    await wait_until(lambda: sup.restarts >= 2)
    assert sup.last_error is not None
    assert "eth_subscribe" in sup.last_error and "invalid params" in sup.last_error
    assert sup.state in ("backing_off", "starting")


async def test_unanswered_subscribe_times_out(
    start_broker: BrokerFactory, nursery: trio.Nursery
) -> None:
    node = FakeNode(answer=False)
    await nursery.start(node.serve)
    _, sup = await start(start_broker, [node.url], request_timeout=0.1)
    await node.connection(1)
    assert (
        sup.last_error is not None and "no answer to eth_subscribe within 0.1 s" in sup.last_error
    )


async def test_failover_to_the_next_url(start_broker: BrokerFactory, nursery: trio.Nursery) -> None:
    a = FakeNode()
    b = FakeNode()
    await nursery.start(a.serve)
    await nursery.start(b.serve)
    dead = f"ws://127.0.0.1:{free_port()}/"
    broker, sup = await start(start_broker, [dead, a.url, b.url])
    async with connect(broker.url) as client:
        await client.sub("eth.blocks")
        conn_a = await a.connection(0)
        sub_a, _ = await conn_a.wait_subscribed(2)
        await conn_a.notify(sub_a, head(1))
        assert await heads(client, 1) == [1]
        await conn_a.drop()
        # The next attempt starts after the URL that failed: b.
        conn_b = await b.connection(0)
        sub_b, _ = await conn_b.wait_subscribed(2)
        await wait_until(lambda: sup.state == "running")
        await conn_b.notify(sub_b, head(2))
        assert await heads(client, 1) == [2]
        assert len(a.connections) == 1
    assert sup.status()["detail"]["url"] == b.url.rstrip("/")


async def test_all_urls_down_reports_each(start_broker: BrokerFactory) -> None:
    urls = [f"ws://127.0.0.1:{free_port()}/", f"ws://127.0.0.1:{free_port()}/ws/v3/SECRETKEY"]
    _, sup = await start(start_broker, urls)
    await wait_until(lambda: sup.restarts >= 1)
    error = sup.last_error
    assert error is not None and error.startswith("cannot connect: ")
    assert error.count("ws://127.0.0.1:") == 2
    assert "SECRETKEY" not in error  # URLs are shown without their path


async def test_answers_the_upstreams_pings(start_broker: BrokerFactory, node: FakeNode) -> None:
    _, sup = await start(start_broker, [node.url])
    conn = await node.connection(0)
    await conn.wait_subscribed(2)
    with trio.fail_after(2):
        await conn.ws.ping(b"are you there")
    assert sup.restarts == 0


async def test_stops_cleanly_with_the_broker(start_broker: BrokerFactory, node: FakeNode) -> None:
    broker, sup = await start(start_broker, [node.url])
    conn = await node.connection(0)
    await conn.wait_subscribed(2)
    broker.stop()
    with trio.fail_after(3):
        await conn.closed.wait()
    await wait_until(lambda: sup.state == "stopped")


def make(settings: dict[str, Any]) -> object:
    config = config_from_dict({"plugins": {"enabled": ["jsonrpc"]}})
    return create(settings, PluginContext("jsonrpc", config))


@pytest.mark.parametrize(
    ("settings", "key", "reason"),
    [
        ({}, "sources", "required"),
        ({"sources": []}, "sources", "must not be empty"),
        ({"sources": [{"urls": ["ws://x"]}]}, "sources[0].name", "required"),
        (
            {"sources": [{"name": "a b", "urls": ["ws://x"], "subscriptions": []}]},
            "sources[0].name",
            "must be 1 to 64 letters",
        ),
        (
            {"sources": [{"name": "a", "urls": ["http://x"], "subscriptions": []}]},
            "sources[0].urls[0]",
            "must be a ws:// or wss:// URL",
        ),
        (
            {"sources": [{"name": "a", "urls": ["ws://x"], "subscriptions": []}]},
            "sources[0].subscriptions",
            "must not be empty",
        ),
        (
            {"sources": [{"name": "a", "urls": ["ws://x"], "subscriptions": [{"params": []}]}]},
            "sources[0].subscriptions[0].topic",
            "required",
        ),
        (
            {
                "sources": [
                    {
                        "name": "a",
                        "urls": ["ws://x"],
                        "subscriptions": [{"params": [], "topic": "{a"}],
                    }
                ]
            },
            "sources[0].subscriptions[0].topic",
            "unclosed",
        ),
        (
            {
                "sources": [
                    {
                        "name": "a",
                        "urls": ["ws://x"],
                        "subscriptions": [{"params": [], "topic": "t", "color": 1}],
                    }
                ]
            },
            "sources[0].subscriptions[0].color",
            "unknown key",
        ),
        (
            {
                "sources": [
                    {
                        "name": "a",
                        "urls": ["ws://x"],
                        "subscriptions": [{"params": [], "topic": "t"}],
                        "backoff_min": 2,
                        "backoff_max": 1,
                    }
                ]
            },
            "sources[0].backoff_max",
            "must be >= backoff_min",
        ),
        (
            {
                "sources": [
                    {
                        "name": "a",
                        "urls": ["ws://x"],
                        "subscriptions": [{"params": [], "topic": "t"}],
                    },
                    {
                        "name": "a",
                        "urls": ["ws://y"],
                        "subscriptions": [{"params": [], "topic": "t"}],
                    },
                ]
            },
            "sources[1].name",
            "another source is named 'a'",
        ),
    ],
)
def test_bad_settings_name_the_key(settings: dict[str, Any], key: str, reason: str) -> None:
    with pytest.raises(ConfigError) as info:
        make(settings)
    assert info.value.key == key
    assert reason in info.value.reason
