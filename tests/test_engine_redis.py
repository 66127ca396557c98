"""The Redis engine: several brokers on one Redis behave as one.

Each test runs two or three brokers in this process, each with its own
Redis engine (its own connections: nodes as Redis sees them), on the
machine's Redis with a key prefix of its own, deleted afterwards.
tests/test_cluster_nodes.py runs the same over ``broker serve`` processes;
tests/test_engine_redis_faults.py stops, slows and restarts Redis.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import trio

from broker import Broker
from broker.core.config import config_from_dict
from broker.core.errors import ConfigError
from broker.engine.redis import RedisEngine
from tests.conftest import BrokerFactory, merge
from tests.helpers import ENCODINGS, MSGPACK, Client, EncodingName, connect, wait_until
from tests.redis_service import delete_prefix, needs_machine_redis, redis_command, unique_prefix
from tests.service import http_get

pytestmark = needs_machine_redis

URL = "redis://127.0.0.1:6379/0"
HISTORY = {"history": [{"pattern": "t.>", "size": 100, "ttl": 60.0}]}
Node = Callable[..., Awaitable[Broker]]


@pytest.fixture
async def prefix() -> AsyncIterator[str]:
    value = unique_prefix()
    yield value
    await delete_prefix(URL, value)


@pytest.fixture
def node(start_broker: BrokerFactory, prefix: str) -> Node:
    """Start a broker with the Redis engine on the test's prefix."""

    async def start(config: dict[str, Any] | None = None, **options: Any) -> Broker:
        base = {"engine": {"type": "redis", "url": URL, "prefix": prefix}}
        return await start_broker(merge(base, config or {}), **options)

    return start


def engine(broker: Broker) -> RedisEngine:
    assert isinstance(broker.engine, RedisEngine)
    return broker.engine


def subprotocol(encoding: EncodingName) -> str | None:
    return MSGPACK if encoding == "msgpack" else "broker.v1.json"


async def test_engine_config_is_checked_with_the_key_named() -> None:
    with pytest.raises(ConfigError, match=r"engine\.url: type = \"redis\" needs url"):
        config_from_dict({"engine": {"type": "redis"}})
    with pytest.raises(ConfigError, match=r"engine\.prefix: must not contain '\{'"):
        config_from_dict({"engine": {"type": "redis", "url": URL, "prefix": "a{b}"}})
    with pytest.raises(ConfigError, match=r"engine\.url: only used with type = \"redis\""):
        config_from_dict({"engine": {"url": URL}})
    with pytest.raises(ConfigError, match=r"engine\.cluster\[1\]: 'x' is not host:port"):
        config_from_dict({"engine": {"type": "redis", "cluster": ["a:1", "x"]}})
    with pytest.raises(ConfigError, match=r"engine\.cluster: give url"):
        config_from_dict({"engine": {"type": "redis", "url": URL, "cluster": ["a:1"]}})
    with pytest.raises(ConfigError, match=r"engine\.url: must be a redis://"):
        config_from_dict({"engine": {"type": "redis", "url": "http://x"}})
    # The in-process engine's memory bounds do not bound Redis: refused, not ignored.
    for key in ("max_history_bytes", "max_topics"):
        with pytest.raises(ConfigError, match=rf"limits\.{key}: does not apply .* maxmemory"):
            config_from_dict({"engine": {"type": "redis", "url": URL}, "limits": {key: 1000}})
    config_from_dict({"engine": {"type": "redis", "url": URL}, "limits": {"topic_idle": 60}})


@ENCODINGS
async def test_a_publish_on_one_node_reaches_subscribers_on_the_others(
    node: Node, encoding: EncodingName
) -> None:
    a, b, c = await node(), await node(), await node()
    async with (
        connect(b.url, subprotocol(encoding)) as on_b,
        connect(c.url, subprotocol(encoding)) as on_c,
        connect(a.url) as publisher,
    ):
        await on_b.sub("orders.eu")
        await on_c.sub("orders.*")
        seq = await publisher.pub("orders.eu", {"id": 7, "px": 1.5}, key="k7")
        for client in (on_b, on_c):
            event = await client.recv()
            assert event["topic"] == "orders.eu" and event["seq"] == seq == 1
            assert event["data"] == {"id": 7, "px": 1.5} and event["key"] == "k7"
        # The publishing node has no subscriber: nothing came back to it.
        assert engine(a).engine_stats()["received"] == 0
        await on_b.assert_alive()
        await on_c.assert_alive()


async def test_seq_is_cluster_wide_and_every_node_sees_one_order(node: Node) -> None:
    nodes = [await node({"queue": {"max_messages": 10_000}}) for _ in range(3)]
    per_publisher = 150
    acked: list[int] = []
    seen: dict[int, list[int]] = {}

    async def subscriber(index: int, ready: trio.Event) -> None:
        async with connect(nodes[index].url) as client:
            await client.sub("t.one")
            ready.set()
            seqs: list[int] = []
            while len(seqs) < per_publisher * len(nodes):
                event = await client.recv()
                seqs.append(event["seq"])
            seen[index] = seqs

    async def publisher(index: int) -> None:
        async with connect(nodes[index].url) as client:
            for n in range(per_publisher):
                acked.append(await client.pub("t.one", [index, n], id=n))

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            for index in range(len(nodes)):
                ready = trio.Event()
                nursery.start_soon(subscriber, index, ready)
                await ready.wait()
            async with trio.open_nursery() as publishers:
                for index in range(len(nodes)):
                    publishers.start_soon(publisher, index)
    total = per_publisher * len(nodes)
    # Two nodes never hand out the same seq ...
    assert sorted(acked) == list(range(1, total + 1))
    # ... and every subscriber, on every node, sees one order per topic.
    for seqs in seen.values():
        assert seqs == list(range(1, total + 1))


async def test_wildcards_work_across_nodes_and_over_matches_are_counted(node: Node) -> None:
    a, b = await node(), await node()
    async with connect(b.url) as sub, connect(a.url) as pub:
        await sub.sub("t.*")
        await sub.sub("eth.>", id="s2")
        # t.* is PSUBSCRIBE prefix:m:t.* in Redis, which also matches t.a.b:
        # b receives it, matches nothing locally, and counts it.
        await pub.pub("t.a.b", 0)
        await pub.pub("u.a", 1)  # no subscription of b covers it: b never sees it
        await pub.pub("eth.blocks.x", 2)
        await pub.pub("t.a", 3)
        got = [await sub.recv(), await sub.recv()]
        assert [(e["topic"], e["data"]) for e in got] == [("eth.blocks.x", 2), ("t.a", 3)]
        await sub.assert_alive()
        stats = engine(b).engine_stats()
        assert stats["received"] == 3 and stats["unwanted"] == 1, stats


async def test_unsubscribe_stops_what_redis_sends_the_node(node: Node) -> None:
    a, b = await node(), await node()
    async with connect(b.url) as first, connect(b.url) as second, connect(a.url) as pub:
        await first.sub("t.*")
        await second.sub("t.*")
        await second.sub("t.x", id="s2")
        assert engine(b).engine_stats()["channels"] == 2
        await first.request({"op": "unsub", "id": 1, "topic": "t.*"})
        assert engine(b).engine_stats()["channels"] == 2  # second still needs it
        await second.request({"op": "unsub", "id": 2, "topic": "t.*"})
        await second.request({"op": "unsub", "id": 3, "topic": "t.x"})
        assert engine(b).engine_stats()["channels"] == 0
        await pub.pub("t.x", 1)
        await pub.pub("t.y", 2)
        # Were b still subscribed, these would reach it before a marker
        # published after them (one fan-out connection, in order).
        await second.sub("marker")
        await pub.pub("marker", 3)
        assert (await second.recv())["topic"] == "marker"
        assert engine(b).engine_stats()["received"] == 1
        await first.assert_alive()
        await second.assert_alive()


async def test_two_patterns_on_one_glob_and_overlapping_subscriptions(node: Node) -> None:
    """t.* and t.> share one Redis glob; t.x and t.> overlap: each client
    still gets each message once, and the node drops Redis's duplicates."""
    a, b = await node(), await node()
    async with connect(b.url) as c1, connect(b.url) as c2, connect(b.url) as c3:
        await c1.sub("t.*")
        await c2.sub("t.>")
        await c3.sub("t.x")
        await c3.sub("t.>", id="s2")
        assert engine(b).engine_stats()["channels"] == 2  # prefix:m:t.* and prefix:m:t.x
        async with connect(a.url) as pub:
            await pub.pub("t.x", "one")
            await pub.pub("t.y.z", "two")
        assert [(await c1.recv())["data"]] == ["one"]
        assert [(await c2.recv())["data"] for _ in range(2)] == ["one", "two"]
        assert [(await c3.recv())["data"] for _ in range(2)] == ["one", "two"]
        for client in (c1, c2, c3):
            await client.assert_alive()
        await c2.request({"op": "unsub", "id": 1, "topic": "t.>"})
        await c3.request({"op": "unsub", "id": 2, "topic": "t.>"})
        async with connect(a.url) as pub:
            await pub.pub("t.q", "three")  # t.* still subscribed: the glob stays
        assert (await c1.recv())["data"] == "three"
        stats = engine(b).engine_stats()
        assert stats["duplicates"] == 1, stats  # t.x came as message and pmessage


async def test_a_subscriber_recovers_on_another_node(node: Node) -> None:
    a, b, c = await node(HISTORY), await node(HISTORY), await node(HISTORY)
    async with connect(a.url) as pub:
        async with connect(b.url) as sub:
            ok = await sub.request({"op": "sub", "id": 1, "topic": "t.a"})
            assert ok["seq"] == 0 and ok["epoch"]
            await pub.pub("t.a", 1)
            assert (await sub.recv())["seq"] == 1
        for n in range(2, 6):
            await pub.pub("t.a", n)
        async with connect(c.url) as again:
            reply = await again.request(
                {"op": "sub", "id": 1, "topic": "t.a", "since": {"epoch": ok["epoch"], "seq": 1}}
            )
            assert reply == {"op": "ok", "id": 1, "epoch": ok["epoch"], "seq": 5, "recovered": True}
            assert [(await again.recv())["data"] for _ in range(4)] == [2, 3, 4, 5]
            await pub.pub("t.a", 6)
            assert (await again.recv())["seq"] == 6
            # history N and the history command, served by a third node.
            async with connect(a.url) as reader:
                page = await reader.request({"op": "history", "id": 2, "topic": "t.a", "limit": 2})
                assert [m["data"] for m in page["messages"]] == [5, 6] and page["seq"] == 6
                reply = await reader.request({"op": "sub", "id": 3, "topic": "t.a", "history": 3})
                assert [(await reader.recv())["data"] for _ in range(3)] == [4, 5, 6]
                await reader.assert_alive()


async def test_a_pattern_subscriber_resumes_on_another_node(node: Node) -> None:
    a, b = await node(HISTORY), await node(HISTORY)
    async with connect(a.url) as pub:
        await pub.pub("t.a", "a1")
        async with connect(a.url) as sub:
            ok = await sub.request({"op": "sub", "id": 1, "topic": "t.*"})
            cursor = ok["cursor"]
            await pub.pub("t.a", "a2")
            seen = await sub.recv()
        await pub.pub("t.a", "a3")
        await pub.pub("t.c", "c1")  # a topic first published while away
        async with connect(b.url) as again:
            reply = await again.request(
                {
                    "op": "sub",
                    "id": 1,
                    "topic": "t.*",
                    "since": {"cursor": cursor, "topics": {"t.a": {"seq": seen["seq"]}}},
                }
            )
            assert reply["recovered"] is True, reply
            got = [await again.recv() for _ in range(2)]
            assert [(e["topic"], e["data"]) for e in got] == [("t.a", "a3"), ("t.c", "c1")]
            assert got[1]["epoch"]  # t.c's first message says which epoch it starts
            # A cursor this engine did not give: recovered false, unknown.
            bad = await again.request(
                {"op": "sub", "id": 2, "topic": "t.>", "since": {"cursor": "x:y:1", "topics": {}}}
            )
            assert bad["recovered"] is False and bad["unknown"] is True
            await again.assert_alive()


async def test_a_resume_names_the_topics_it_cannot_replay(node: Node) -> None:
    small = {"history": [{"pattern": "t.>", "size": 2}]}
    a, b = await node(small), await node(small)
    async with connect(a.url) as pub:
        async with connect(b.url) as sub:
            ok = await sub.request({"op": "sub", "id": 1, "topic": "t.*"})
            await pub.pub("t.a", 1)
            await pub.pub("t.b", 1)
            first, second = await sub.recv(), await sub.recv()
        for n in range(2, 6):
            await pub.pub("t.a", n)  # 4 missed, 2 kept: a gap
        await pub.pub("t.b", 2)
        async with connect(a.url) as again:
            topics = {e["topic"]: {"epoch": e["epoch"], "seq": e["seq"]} for e in (first, second)}
            reply = await again.request(
                {
                    "op": "sub",
                    "id": 1,
                    "topic": "t.*",
                    "since": {"cursor": ok["cursor"], "topics": topics},
                }
            )
            assert reply["recovered"] is False and reply["lost"] == ["t.a"], reply
            event = await again.recv()
            assert (event["topic"], event["seq"]) == ("t.b", 2)
            await again.assert_alive()


async def test_snapshots_are_kept_in_redis(node: Node) -> None:
    book = {"history": [{"pattern": "book.*", "size": 0, "snapshot": True}]}
    a, b = await node(book), await node(book)
    async with connect(a.url) as pub:
        await pub.pub("book.X", 5, key="100")
        await pub.pub("book.X", 7, key="101")
        await pub.pub("book.X", None, key="100")  # removes the level
        await pub.pub("book.X", {"status": "open"})
        async with connect(b.url) as sub:
            reply = await sub.request({"op": "sub", "id": 1, "topic": "book.X", "snapshot": True})
            assert reply["seq"] == 4
            got = [await sub.recv() for _ in range(2)]
            assert [(e.get("key"), e["data"], e["snapshot"]) for e in got] == [
                ("101", 7, True),
                (None, {"status": "open"}, True),
            ]
            await pub.pub("book.X", 9, key="102")
            live = await sub.recv()
            assert live["seq"] == 5 and "snapshot" not in live
            # A pattern's snapshot, from the other node.
            async with connect(a.url) as other:
                await other.request({"op": "sub", "id": 1, "topic": "book.*", "snapshot": True})
                keys = [(await other.recv()).get("key") for _ in range(3)]
                assert keys == ["101", None, "102"]
                await other.assert_alive()


async def test_presence_is_cluster_wide(node: Node) -> None:
    chat = {
        "presence": [{"pattern": "chat.>"}],
        "plugins": {"enabled": ["tokens"]},
        "plugin": {
            "tokens": {"tokens": [{"id": n, "token": f"{n}-token-0123456789"} for n in "abc"]}
        },
    }
    a, b, c = await node(chat), await node(chat), await node(chat)

    def auth(who: str) -> list[tuple[bytes, bytes]]:
        return [(b"authorization", f"Bearer {who}-token-0123456789".encode())]

    async with connect(c.url, headers=auth("c")) as watcher:
        await watcher.request({"op": "sub", "id": 1, "topic": "chat.r", "presence": True})
        assert (await watcher.recv())["member"]["subject"] == "c"  # its own join
        async with (
            connect(a.url, headers=auth("a")) as alice,
            connect(b.url, headers=auth("b")) as bob,
        ):
            await alice.sub("chat.r")
            await bob.sub("chat.r")
            # The joins made on the other nodes reach the watcher's node.
            events = await collect_presence(watcher, "join", 2)
            assert sorted(e["member"]["subject"] for e in events) == ["a", "b"]
            assert all(e["member"]["connections"] == 1 for e in events)
            reply = await watcher.request({"op": "presence", "id": 2, "topic": "chat.r"})
            assert (reply["count"], reply["connections"]) == (3, 3)
            assert [m["subject"] for m in reply["members"]] == ["a", "b", "c"]
            # The same answer from a node where the watcher is not.
            assert (await alice.request({"op": "presence", "id": 3, "topic": "chat.r"}))[
                "count"
            ] == 3
        # Both left: two leave events reach the watcher on the third node.
        events = await collect_presence(watcher, "leave", 2)
        assert sorted(e["member"]["subject"] for e in events) == ["a", "b"]
        assert all(e["member"]["connections"] == 0 for e in events)
        reply = await watcher.request({"op": "presence", "id": 4, "topic": "chat.r"})
        assert (reply["count"], reply["members"]) == (1, [{"subject": "c", "connections": 1}])


async def collect_presence(client: Client, op: str, count: int) -> list[dict[str, Any]]:
    got: list[dict[str, Any]] = []
    with trio.fail_after(5):
        while len(got) < count:
            event = await client.recv()
            assert event["op"] in ("join", "leave"), event
            if event["op"] == op:
                got.append(event)
    return got


async def test_a_lost_topic_state_starts_a_new_epoch(node: Node, prefix: str) -> None:
    """What FLUSHDB or an eviction does: the topic's state is gone. Its next
    message starts a new epoch at seq 1, which live subscribers learn from
    that message, and a resume from the old epoch is not recovered."""
    a, b = await node(HISTORY), await node(HISTORY)
    async with connect(b.url) as sub, connect(a.url) as pub:
        ok = await sub.request({"op": "sub", "id": 1, "topic": "t.a"})
        await pub.pub("t.a", 1)
        await pub.pub("u.a", 1)  # no history
        assert (await sub.recv())["seq"] == 1
        await delete_prefix(URL, prefix)
        assert await pub.pub("t.a", 2) == 1
        event = await sub.recv()
        assert event["seq"] == 1 and event["epoch"] != ok["epoch"]
        assert await pub.pub("u.a", 2) == 1
        async with connect(a.url) as again:
            reply = await again.request(
                {"op": "sub", "id": 1, "topic": "t.a", "since": {"epoch": ok["epoch"], "seq": 1}}
            )
            assert reply["recovered"] is False and reply["epoch"] == event["epoch"]
            await again.assert_alive()


async def test_a_snapshot_evicted_alone_starts_a_new_epoch(node: Node, prefix: str) -> None:
    """Redis may evict one key of a topic (maxmemory): a snapshot that lost
    its levels cannot be vouched for, so the topic starts over."""
    book = {"history": [{"pattern": "book.*", "size": 10, "snapshot": True}]}
    a = await node(book)
    async with connect(a.url) as pub:
        await pub.pub("book.X", 5, key="100")
        rule = engine(a).rule_for("book.X")
        assert rule is not None
        await redis_command(URL, "DEL", rule.base + "k:book.X")
        assert await pub.pub("book.X", 6, key="101") == 1


async def test_node_stats_and_readiness(node: Node) -> None:
    a = await node()
    assert a.readiness() == (True, [])
    stats = a.stats_snapshot()
    assert stats["ready"] is True
    assert engine(a).engine_stats()["up"] == 1


async def test_every_subscriber_gets_every_message_once_under_concurrent_subscribes(
    node: Node,
) -> None:
    """Many subscribes of distinct topics at once (pipelined to Redis) while
    publishers go on: each gets a gapless suffix of its topic, in order."""
    a, b = await node({"queue": {"max_messages": 10_000}}), await node()
    topics = [f"t.{n}" for n in range(20)]
    got: defaultdict[str, list[int]] = defaultdict(list)
    done = trio.Event()

    async def publisher() -> None:
        async with connect(b.url) as pub:
            for round_ in range(30):
                for topic in topics:
                    await pub.send({"op": "pub", "topic": topic, "data": round_})
            for topic in topics:
                await pub.pub(topic, "end")
        done.set()

    async def subscriber(topic: str) -> None:
        async with connect(a.url) as client:
            await client.sub(topic)
            while True:
                event = await client.recv()
                got[topic].append(event["seq"])
                if event["data"] == "end":
                    return

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(publisher)
            for topic in topics:
                nursery.start_soon(subscriber, topic)
    for topic in topics:
        seqs = got[topic]
        assert seqs == list(range(seqs[0], 32)), (topic, seqs)


async def test_publishes_from_one_connection_keep_their_order(node: Node) -> None:
    a, b = await node(), await node()
    await wait_until(lambda: a.readiness()[0] and b.readiness()[0])
    async with connect(b.url) as sub, connect(a.url) as pub:
        await sub.sub("t.>")
        for n in range(300):
            await pub.send({"op": "pub", "topic": f"t.{n % 3}", "data": n})
        data = [(await sub.recv())["data"] for _ in range(300)]
        assert data == list(range(300))


async def test_messages_past_their_ttl_are_not_replayed(node: Node) -> None:
    short = {"history": [{"pattern": "t.>", "size": 100, "ttl": 0.2}]}
    a = await node(short)
    async with connect(a.url) as client:
        await client.pub("t.a", 1)
        page = await client.request({"op": "history", "id": 1, "topic": "t.a"})
        assert [m["data"] for m in page["messages"]] == [1]

        async def expired() -> bool:
            reply = await client.request({"op": "history", "id": 2, "topic": "t.a"})
            return not reply["messages"]

        with trio.fail_after(5):
            while not await expired():  # noqa: ASYNC110 - Redis's clock decides: poll it
                await trio.sleep(0.05)
        reply = await client.request(
            {"op": "sub", "id": 3, "topic": "t.a", "since": {"epoch": page["epoch"], "seq": 0}}
        )
        assert reply["recovered"] is False and reply["seq"] == 1
        await client.assert_alive()


async def test_the_topic_index_forgets_expired_topics_and_says_so(node: Node, prefix: str) -> None:
    """A rule's index of topics drops those whose state expired; a resume
    from a cursor older than a forgotten topic's last message cannot vouch
    for it: unknown."""
    a = await node(HISTORY)
    async with connect(a.url) as client:
        ok = await client.request({"op": "sub", "id": 1, "topic": "t.*"})
        await client.request({"op": "unsub", "id": 2, "topic": "t.*"})
        await client.pub("t.gone", 1)
        await client.pub("t.kept", 1)
        rule = engine(a).rule_for("t.gone")
        assert rule is not None
        await redis_command(URL, "DEL", rule.base + "m:t.gone", rule.base + "s:t.gone")
        await engine(a)._count()
        topics = await redis_command(URL, "ZRANGE", rule.base + "topics", 0, -1)
        assert topics == [b"", b"t.kept"]  # (b"": the index is whole)
        reply = await client.request(
            {"op": "sub", "id": 3, "topic": "t.*", "since": {"cursor": ok["cursor"], "topics": {}}}
        )
        assert reply["recovered"] is False and reply["unknown"] is True, reply
        event = await client.recv()  # t.kept is replayed all the same
        assert (event["topic"], event["data"]) == ("t.kept", 1)
        await client.assert_alive()


async def test_the_history_gauges_count_what_redis_keeps(node: Node, prefix: str) -> None:
    """The census: one node counts what Redis keeps for the deployment (the
    rules' topics, their stored messages and memory, the topics without a
    rule), the others read its count; /metrics and /api/stats show it."""
    rules = {
        "history": [
            {"pattern": "t.>", "size": 100, "ttl": 60.0},
            {"pattern": "book.*", "size": 0, "snapshot": True},
        ]
    }
    a, b = await node(rules), await node(rules)
    async with connect(a.url) as pub:
        for n in range(5):
            await pub.pub("t.a", n)
        for n in range(2):
            await pub.pub("t.b", n)
        await pub.pub("book.X", 1, key="k")  # a snapshot, no stream
        await pub.pub("u.a", 1)  # no rule: a position only
        await pub.pub("u.b", 1)
    await redis_command(URL, "DEL", prefix + "census:lease")
    await engine(a)._census()  # takes the lease: counts
    await engine(b)._census()  # the lease is a's: reads a's count
    for broker in (a, b):
        history = broker.stats_snapshot()["history"]
        assert (history["messages"], history["topics"], history["stored_topics"]) == (7, 5, 3)
        assert history["bytes"] > 7 * 10 and history["evicted"] >= 0, history
    host, port = b.admin_addresses[0]
    _, _, metrics = await http_get(host, port, "/metrics")
    assert b"broker_history_messages 7.0" in metrics
    assert b"broker_history_topics 5.0" in metrics


async def test_a_lost_topic_index_makes_pattern_resumes_unknown(node: Node) -> None:
    """A rule's index of topics evicted (allkeys-* maxmemory policies may):
    a pattern resume cannot know which topics it held, so it answers
    recovered false with unknown, never recovered true with a topic
    missed; the census marks the loss, and cursors given after it resume
    fully again."""
    a = await node(HISTORY)
    rule = engine(a).rule_for("t.a")
    assert rule is not None
    async with connect(a.url) as client:
        ok = await client.request({"op": "sub", "id": 1, "topic": "t.*"})
        await client.request({"op": "unsub", "id": 2, "topic": "t.*"})
        await client.pub("t.a", 1)
        await client.pub("t.c", 1)  # a topic the resuming client does not know
        await redis_command(URL, "DEL", rule.base + "topics")
        since = {"cursor": ok["cursor"], "topics": {}}
        reply = await client.request({"op": "sub", "id": 3, "topic": "t.*", "since": since})
        assert reply["recovered"] is False and reply["unknown"] is True, reply
        await client.request({"op": "unsub", "id": 4, "topic": "t.*"})
        await engine(a)._count()  # the census marks the loss
        reply = await client.request({"op": "sub", "id": 5, "topic": "t.*", "since": since})
        assert reply["recovered"] is False and reply["unknown"] is True, reply
        await client.request({"op": "unsub", "id": 6, "topic": "t.*"})
        fresh = await client.request({"op": "sub", "id": 7, "topic": "t.*"})
        await client.request({"op": "unsub", "id": 8, "topic": "t.*"})
        await client.pub("t.d", 1)
        since = {"cursor": fresh["cursor"], "topics": {}}
        reply = await client.request({"op": "sub", "id": 9, "topic": "t.*", "since": since})
        assert reply["recovered"] is True, reply
        event = await client.recv()
        assert (event["topic"], event["data"]) == ("t.d", 1)
        await client.assert_alive()


async def test_a_message_on_the_fanout_channels_that_is_not_a_publication_is_dropped(
    node: Node, prefix: str
) -> None:
    """Anything else PUBLISHing on the prefix's channels (or brokers of
    another wire format) must not take the node down: what it cannot read
    is dropped, counted and logged; what follows is delivered."""
    a, b = await node(), await node()
    async with connect(a.url) as sub, connect(b.url) as pub:
        await sub.sub("t.x")
        await sub.sub("u.*", id="s2")
        for garbage in (b"", b"m\x00", b"hello", b"m" + b"\x00" * 14 + b"t.x\xc1", b"j\xff\xff"):
            await redis_command(URL, "PUBLISH", prefix + "m:t.x", garbage)
        await redis_command(URL, "PUBLISH", prefix + "m:u.y", b"zz")
        assert await pub.pub("t.x", "after") == 1
        event = await sub.recv()
        assert (event["topic"], event["data"]) == ("t.x", "after")
        await sub.assert_alive()
    stats = engine(a).engine_stats()
    assert stats["malformed"] == 6 and stats["up"] == 1, stats
    assert a.readiness()[0]
