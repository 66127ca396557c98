"""The Redis engine on a Redis Cluster (``[engine] cluster = [...]``).

Each test makes its own cluster from ``redis-server --cluster-enabled yes``
processes on free ports and ``redis-cli --cluster create`` (three
primaries; with replicas for the failover test), and runs brokers in this
process on it. Checked: several brokers act as one (exact and pattern
subscriptions, history, recovery, presence); the keys of one topic sit in
one hash slot; topics of a history rule fan out through sharded pub/sub;
the brokers follow a failover and a moved slot, and report what was lost.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from broker import Broker
from broker.engine.redis import RedisEngine
from broker.engine.redis.layout import key_slot
from broker.engine.redis.links import ClusterLinks
from broker.ops.reload import reload_broker
from tests.conftest import BrokerFactory, merge
from tests.helpers import connect, mask_frame, raw_connect, wait_until
from tests.redis_service import (
    RedisProcess,
    needs_redis_server,
    open_cluster,
    redis_command,
    wait_cluster_ok,
)

pytestmark = needs_redis_server

HISTORY = {
    "history": [{"pattern": "t.>", "size": 100, "ttl": 60.0}],
    "presence": [{"pattern": "chat.>"}],
}
Node = Callable[..., Awaitable[Broker]]


@pytest.fixture
async def cluster() -> AsyncIterator[list[RedisProcess]]:
    async with open_cluster(3) as servers:
        yield servers


def node_factory(start_broker: BrokerFactory, servers: list[RedisProcess]) -> Node:
    async def start(config: dict[str, Any] | None = None, **options: Any) -> Broker:
        engine = {
            "type": "redis",
            "cluster": [servers[0].address],  # a startup node: the others are found
            "prefix": "c:",
            "timeout": 1.0,
        }
        broker = await start_broker(merge({"engine": engine}, config or {}), **options)
        await wait_until(lambda: broker.readiness()[0], 10)
        return broker

    return start


def engine(broker: Broker) -> RedisEngine:
    assert isinstance(broker.engine, RedisEngine)
    return broker.engine


def follows(broker: Broker, key: str, server: RedisProcess) -> bool:
    """*broker* has *server* as *key*'s owner on its slot map, and every
    link up (counted down the moment a map change closes them)."""
    links = engine(broker)._links
    assert isinstance(links, ClusterLinks)
    owner = links.owner(key_slot(key))
    return owner is not None and owner[1] == server.port and links.healthy()


async def owner_of(servers: list[RedisProcess], key: str) -> RedisProcess:
    """The running primary that serves *key*'s slot."""
    slot = key_slot(key)
    for server in servers:
        if server.process is None:
            continue
        reply = await redis_command(server.url, "CLUSTER", "SLOTS")
        assert isinstance(reply, list)
        for start, end, primary, *_ in reply:
            if start <= slot <= end:
                port = primary[1]
                return next(s for s in servers if s.port == port)
    raise AssertionError(f"no owner for slot {slot}")


async def test_brokers_on_a_cluster_act_as_one(
    start_broker: BrokerFactory, cluster: list[RedisProcess]
) -> None:
    node = node_factory(start_broker, cluster)
    a, b = await node(HISTORY), await node(HISTORY)
    async with connect(b.url) as sub, connect(a.url) as pub:
        ok = await sub.request({"op": "sub", "id": 1, "topic": "t.x"})
        await sub.request({"op": "sub", "id": 2, "topic": "t.*"})  # covered by the rule
        await sub.sub("u.*", id=3)  # no rule: classic pub/sub
        assert await pub.pub("t.x", 1) == 1
        assert await pub.pub("t.y", 2) == 1
        assert await pub.pub("u.v", 3) == 1
        got = [await sub.recv() for _ in range(3)]
        assert [(e["topic"], e["data"]) for e in got] == [("t.x", 1), ("t.y", 2), ("u.v", 3)]
        await sub.assert_alive()

        # The rule's topics fan out through sharded pub/sub, on the primary
        # that owns the rule's slot; u.* through classic pub/sub.
        rule = engine(a).rule_for("t.x")
        assert rule is not None
        owner = await owner_of(cluster, rule.base)
        counts = await redis_command(
            owner.url, "PUBSUB", "SHARDNUMSUB", rule.base + "c:t.x", rule.base + "c"
        )
        assert counts == [rule.base.encode() + b"c:t.x", 1, rule.base.encode() + b"c", 1]
        assert await redis_command(cluster[0].url, "PUBSUB", "NUMPAT") == 1

        # Every key of a topic is in one slot (the rule's), on its owner.
        keys = await redis_command(owner.url, "KEYS", "c:*")
        assert isinstance(keys, list) and keys
        assert {key_slot(k) for k in keys if b"{" + rule.id.encode() + b"}" in k} == {
            key_slot(rule.base)
        }

        # Recovery and history on the other node; presence cluster-wide.
        async with connect(a.url) as again:
            reply = await again.request(
                {"op": "sub", "id": 1, "topic": "t.x", "since": {"epoch": ok["epoch"], "seq": 0}}
            )
            assert reply["recovered"] is True
            assert (await again.recv())["data"] == 1
            await again.sub("chat.r", id=2)
        await wait_until(lambda: engine(a).presence_stats().members == 0)
        async with connect(a.url) as member:
            await member.sub("chat.r")
            await member.assert_alive()
            reply = await sub.request({"op": "presence", "id": 9, "topic": "chat.r"})
            assert reply["count"] == 1


async def test_the_brokers_follow_a_failover_and_report_what_was_lost(
    start_broker: BrokerFactory,
) -> None:
    """The primary that owns a rule's slot is killed; its replica takes
    over. The brokers find the new primary; publishing works again; the
    subscriber is told to resume, and the resume says recovered: false (the
    new primary may lack the last writes: a new epoch), never a wrong
    history."""
    async with open_cluster(3, replicas=1) as servers:
        node = node_factory(start_broker, servers)
        a, b = await node(HISTORY), await node(HISTORY)
        rule = engine(a).rule_for("t.x")
        assert rule is not None
        victim = await owner_of(servers, rule.base)
        async with connect(b.url) as sub, connect(a.url) as pub:
            ok = await sub.request({"op": "sub", "id": 1, "topic": "t.x"})
            for n in range(3):
                await pub.pub("t.x", n)
            assert [(await sub.recv())["seq"] for _ in range(3)] == [1, 2, 3]
            await victim.kill()
            with trio.fail_after(15):  # the cluster notices, a replica takes over
                while await owner_of(servers, rule.base) is victim:  # noqa: ASYNC110 - Redis decides: poll it
                    await trio.sleep(0.1)
            await wait_cluster_ok([s for s in servers if s.process is not None])
            # Until the brokers follow, a publish may be refused: retry.
            with trio.fail_after(15):
                while True:
                    reply = await pub.request({"op": "pub", "id": "p", "topic": "t.x", "data": 9})
                    if reply["op"] == "ok":
                        break
                    assert reply["code"] == "unavailable", reply
                    await trio.sleep(0.1)  # a client's backoff before it retries
            assert reply["seq"] == 1  # a new epoch on the new primary
            closed = await sub.expect_close()
            assert closed.code == 1012
        async with connect(b.url) as again:
            reply = await again.request(
                {"op": "sub", "id": 1, "topic": "t.x", "since": {"epoch": ok["epoch"], "seq": 3}}
            )
            assert reply["recovered"] is False and reply["epoch"] != ok["epoch"]
            assert reply["seq"] == 1
        for broker in (a, b):
            # Its sharded links start over on the new map (with backoff).
            await wait_until(lambda: broker.readiness()[0], 10)  # noqa: B023
            stats = engine(broker).engine_stats()
            assert stats["topology_changes"] >= 1 and stats["up"] == 1, stats


async def test_the_brokers_follow_a_moved_slot(
    start_broker: BrokerFactory, cluster: list[RedisProcess]
) -> None:
    """A rule's slot moves to another primary with its keys (what
    ``redis-cli --cluster reshard`` does, slot by slot): publishes follow
    (MOVED), subscribers are told to resume, and the moved topics start a
    new epoch (the new primary cannot vouch for writes it did not take)."""
    node = node_factory(start_broker, cluster)
    a, b = await node(HISTORY), await node(HISTORY)
    rule = engine(a).rule_for("t.x")
    assert rule is not None
    source = await owner_of(cluster, rule.base)
    destination = next(s for s in cluster if s is not source)
    async with connect(b.url) as sub, connect(a.url) as pub:
        ok = await sub.request({"op": "sub", "id": 1, "topic": "t.x"})
        await pub.pub("t.x", 1)
        assert (await sub.recv())["seq"] == 1
        await move_slot(cluster, key_slot(rule.base), source, destination)
        with trio.fail_after(10):
            while True:
                reply = await pub.request({"op": "pub", "id": "p", "topic": "t.x", "data": 2})
                if reply["op"] == "ok":
                    break
                assert reply["code"] == "unavailable", reply
                await trio.sleep(0.1)  # a client's backoff before it retries
        closed = await sub.expect_close()
        assert closed.code == 1012
    # Until a node has every link up again on the new map, a subscriber
    # there may be told to resume once more (a link that Redis unsubscribed
    # and the map's change each restart links, and each link's return
    # closes the connections subscribed during the outage): resume once
    # both follow the move.
    for broker in (a, b):
        await wait_until(lambda: follows(broker, rule.base, destination), 10)  # noqa: B023
    async with connect(b.url) as again:
        reply = await again.request(
            {"op": "sub", "id": 1, "topic": "t.x", "since": {"epoch": ok["epoch"], "seq": 1}}
        )
        assert reply["recovered"] is False
        await pub_and_receive(a, again, "t.x")
    assert (await owner_of(cluster, rule.base)) is destination


async def test_pipelined_publishes_keep_their_order_across_a_moved_slot(
    start_broker: BrokerFactory, cluster: list[RedisProcess]
) -> None:
    """A client keeps 50 publishes in flight while its topic's slot moves to
    another primary: the calls sent to the old owner are answered MOVED (or
    ASK) and go to the new one before any later call does, so the acks, in
    the client's order, carry increasing seqs: one epoch, then (the new
    owner cannot vouch for the old writes) a new one from seq 1."""
    node = node_factory(start_broker, cluster)
    a = await node(HISTORY)
    rule = engine(a).rule_for("t.x")
    assert rule is not None
    source = await owner_of(cluster, rule.base)
    destination = next(s for s in cluster if s is not source)
    got: list[dict[str, Any]] = []
    moved = trio.Event()

    async def publisher() -> None:
        async with raw_connect(a.url) as client:
            n = 0
            end: int | None = None  # 500 more once the slot moved
            while end is None or n < end:
                if end is None and moved.is_set():
                    end = n + 500
                frames = [
                    mask_frame(
                        0x1,
                        json.dumps({"op": "pub", "id": n + i, "topic": "t.x", "data": i}).encode(),
                    )
                    for i in range(50)
                ]
                await client.send_raw(b"".join(frames))
                got.extend([await client.recv() for _ in range(50)])
                n += 50

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(publisher)
            await wait_until(lambda: len(got) >= 200)
            await move_slot(cluster, key_slot(rule.base), source, destination)
            moved.set()
    assert [r["id"] for r in got] == list(range(len(got)))
    assert {r.get("code") for r in got if r["op"] == "err"} <= {"unavailable"}
    seqs = [r["seq"] for r in got if r["op"] == "ok"]
    epochs = [seqs[:1]]
    for seq in seqs[1:]:
        if seq == 1:
            epochs.append([seq])
        else:
            epochs[-1].append(seq)
    assert len(epochs) == 2, [e[:3] for e in epochs]
    for epoch in epochs:
        assert epoch == sorted(epoch) and len(set(epoch)) == len(epoch)
    assert (await owner_of(cluster, rule.base)) is destination
    assert engine(a).engine_stats()["pending"] == 0


async def pub_and_receive(publisher: Broker, client: Any, topic: str) -> None:
    async with connect(publisher.url) as pub:
        seq = await pub.pub(topic, "after")
    event = await client.recv()
    assert (event["topic"], event["seq"], event["data"]) == (topic, seq, "after")


async def move_slot(
    servers: list[RedisProcess], slot: int, source: RedisProcess, destination: RedisProcess
) -> None:
    """Move *slot* and its keys, as ``redis-cli --cluster reshard`` does."""
    source_id = await redis_command(source.url, "CLUSTER", "MYID")
    destination_id = await redis_command(destination.url, "CLUSTER", "MYID")
    assert isinstance(source_id, bytes) and isinstance(destination_id, bytes)
    await redis_command(destination.url, "CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
    await redis_command(source.url, "CLUSTER", "SETSLOT", slot, "MIGRATING", destination_id)
    while True:
        keys = await redis_command(source.url, "CLUSTER", "GETKEYSINSLOT", slot, 100)
        assert isinstance(keys, list)
        if not keys:
            break
        await redis_command(
            source.url, "MIGRATE", "127.0.0.1", destination.port, "", 0, 5000, "KEYS", *keys
        )
    for server in servers:
        await redis_command(server.url, "CLUSTER", "SETSLOT", slot, "NODE", destination_id)


async def test_a_rules_change_moves_subscriptions_to_their_new_path(
    start_broker: BrokerFactory, cluster: list[RedisProcess], tmp_path: Path
) -> None:
    """On a cluster a topic's rule decides its fan-out path (sharded or
    classic): a reload that changes the rules moves the node's
    subscriptions and tells its subscribers to resume."""
    node = node_factory(start_broker, cluster)
    a = await node()
    async with connect(a.url) as sub:
        await sub.sub("u.x")  # no rule: classic pub/sub
        assert engine(a).engine_stats()["channels"] == 1
        toml = tmp_path / "broker.toml"
        toml.write_text(
            f'[engine]\ntype = "redis"\ncluster = ["{cluster[0].address}"]\nprefix = "c:"\n'
            'timeout = 1.0\n\n[[history]]\npattern = "u.>"\n'
        )
        result = await reload_broker(a, toml)
        assert result.ok, result
        assert (await sub.expect_close()).code == 1012
    rule = engine(a).rule_for("u.x")
    assert rule is not None
    async with connect(a.url) as again, connect(a.url) as pub:
        reply = await again.request({"op": "sub", "id": 1, "topic": "u.x"})
        assert reply["seq"] == 0  # a history topic now: a position
        await pub.pub("u.x", "sharded")
        assert (await again.recv())["data"] == "sharded"
        owner = await owner_of(cluster, rule.base)
        assert await redis_command(owner.url, "PUBSUB", "SHARDNUMSUB", rule.base + "c:u.x") == [
            (rule.base + "c:u.x").encode(),
            1,
        ]
