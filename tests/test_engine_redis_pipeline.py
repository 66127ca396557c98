"""One connection's publishes are pipelined to Redis, with every guarantee kept.

A client that sends publishes without waiting for each ack gets them
submitted to Redis one after the other, without waiting for each round trip
(``Engine.submit``), at most ``PUBLISH_WINDOW`` at once; the acks come back
in the order of the requests, each publish's seq follows the client's order
per topic, a later command sees the publishes before it done, and each
publish gets an answer whatever Redis does meanwhile.

The tests that pause (``CLIENT PAUSE ... WRITE``: Redis holds every script
call until ``CLIENT UNPAUSE``), slow down or kill Redis run their own
``redis-server``; the others use the machine's Redis with a key prefix of
their own. A pipelined publish across a moved Redis Cluster slot is in
tests/test_cluster.py.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio
import trio.testing

from broker import Broker
from broker.engine.redis import RedisEngine
from broker.engine.redis.engine import REFRESH_WINDOW
from broker.server.session import PUBLISH_WINDOW
from tests.conftest import BrokerFactory, merge
from tests.helpers import RawClient, connect, mask_frame, raw_connect, wait_until
from tests.redis_service import (
    MACHINE_URL,
    RedisProcess,
    delete_prefix,
    needs_machine_redis,
    needs_redis_server,
    open_redis,
    redis_command,
    unique_prefix,
)

pytestmark = needs_redis_server

HISTORY = {"history": [{"pattern": "t.>", "size": 10_000, "ttl": 60.0}]}
QUEUE = {"queue": {"max_messages": 100_000, "max_bytes": 64 << 20}}


def pub_frame(topic: str, data: Any, request_id: int | str | None = None) -> bytes:
    command: dict[str, Any] = {"op": "pub", "topic": topic, "data": data}
    if request_id is not None:
        command["id"] = request_id
    return mask_frame(0x1, json.dumps(command, separators=(",", ":")).encode())


def ping_frame(request_id: str) -> bytes:
    return mask_frame(0x1, json.dumps({"op": "ping", "id": request_id}).encode())


def pending(broker: Broker) -> int:
    """Script calls this node has sent (or holds to send) and not had answered."""
    engine = broker.engine
    assert isinstance(engine, RedisEngine)
    return engine.engine_stats()["pending"]


async def replies(client: RawClient, count: int) -> list[dict[str, Any]]:
    return [await client.recv() for _ in range(count)]


@pytest.fixture
async def redis() -> AsyncIterator[RedisProcess]:
    async with open_redis() as server:
        yield server


async def start_node(
    start_broker: BrokerFactory,
    url: str,
    prefix: str = "p:",
    extra: dict[str, Any] | None = None,
    **engine: Any,
) -> Broker:
    config = {"engine": {"type": "redis", "url": url, "prefix": prefix, **engine}}
    broker = await start_broker(merge(merge(merge(config, HISTORY), QUEUE), extra or {}))
    await wait_until(lambda: broker.readiness()[0])
    return broker


async def pause(redis: RedisProcess) -> None:
    """Redis holds every script call (they write) until unpause."""
    await redis_command(redis.url, "CLIENT", "PAUSE", 20_000, "WRITE")


async def unpause(redis: RedisProcess) -> None:
    await redis_command(redis.url, "CLIENT", "UNPAUSE")


async def test_a_connections_publishes_wait_for_redis_together_and_are_acked_in_order(
    start_broker: BrokerFactory, redis: RedisProcess
) -> None:
    node = await start_node(start_broker, redis.url)
    async with raw_connect(node.url) as client:
        await pause(redis)
        topics = ["t.a", "t.b", "t.c"]
        frames = [pub_frame(topics[n % 3], n, n) for n in range(100)]
        await client.send_raw(b"".join(frames) + ping_frame("after"))
        # All 100 are with Redis at once: one connection's publishes do not
        # wait for each other's round trip.
        await wait_until(lambda: pending(node) == 100)
        await unpause(redis)
        got = await replies(client, 101)
    assert [r["id"] for r in got] == [*range(100), "after"]
    assert got[-1] == {"op": "pong", "id": "after"}
    for k, topic in enumerate(topics):
        # Each topic numbered in the order the client sent its publishes.
        assert [r["seq"] for r in got[k:100:3]] == list(range(1, len(got[k:100:3]) + 1)), topic


async def test_the_window_bounds_a_connections_publishes_in_flight(
    start_broker: BrokerFactory, redis: RedisProcess
) -> None:
    """Past PUBLISH_WINDOW publishes waiting for Redis, the connection stops
    reading until the oldest is answered: back-pressure, not a growing queue."""
    node = await start_node(start_broker, redis.url)
    total = 3 * PUBLISH_WINDOW
    async with raw_connect(node.url) as client:
        await pause(redis)
        frames = [pub_frame("t.a", n, n) for n in range(total)]
        async with trio.open_nursery() as nursery:
            # The client's send blocks once the socket buffers are full.
            nursery.start_soon(client.send_raw, b"".join(frames) + ping_frame("after"))
            await wait_until(lambda: pending(node) == PUBLISH_WINDOW)
            await trio.testing.wait_all_tasks_blocked()
            # Nothing moves while Redis holds the window: not one more.
            assert pending(node) == PUBLISH_WINDOW
            (connection,) = node.connections
            in_flight = connection.session.in_flight
            # The oldest is off the queue, being waited for.
            assert in_flight is not None and len(in_flight) == PUBLISH_WINDOW - 1
            await unpause(redis)
        got = await replies(client, total + 1)
    assert [r["id"] for r in got] == [*range(total), "after"]
    assert [r["seq"] for r in got[:-1]] == list(range(1, total + 1))
    assert pending(node) == 0


@needs_machine_redis
async def test_pipelined_publishes_of_several_connections_and_nodes_keep_every_order(
    start_broker: BrokerFactory,
) -> None:
    """Three nodes, two connections each, every one sending its publishes
    without waiting for acks, to two topics: each connection's acks come in
    its order, each topic's seqs are handed out once, and every subscriber,
    on every node, gets each topic in seq order with each publisher's
    messages in the order it sent them."""
    prefix = unique_prefix()
    try:
        nodes = [await start_node(start_broker, MACHINE_URL, prefix) for _ in range(3)]
        per_connection = 300
        topics = ["t.a", "t.b"]
        plans = {
            (n, c): [topics[(i * 7 + n + c) % 5 % 2] for i in range(per_connection)]
            for n in range(3)
            for c in range(2)
        }
        acks: dict[tuple[int, int], list[dict[str, Any]]] = {}
        seen: dict[int, list[dict[str, Any]]] = {}
        total = per_connection * len(plans)

        async def subscriber(index: int, ready: trio.Event) -> None:
            async with connect(nodes[index].url) as client:
                await client.request({"op": "sub", "id": 1, "topic": "t.>"})
                ready.set()
                seen[index] = [await client.recv() for _ in range(total)]

        async def publisher(n: int, c: int) -> None:
            plan = plans[(n, c)]
            async with raw_connect(nodes[n].url) as client:
                blob = b"".join(pub_frame(t, [n, c, i], i) for i, t in enumerate(plan))
                await client.send_raw(blob)
                acks[(n, c)] = await replies(client, per_connection)

        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                for index in range(3):
                    ready = trio.Event()
                    nursery.start_soon(subscriber, index, ready)
                    await ready.wait()
                async with trio.open_nursery() as publishers:
                    for n, c in plans:
                        publishers.start_soon(publisher, n, c)
        numbered: dict[str, list[int]] = defaultdict(list)
        for (n, c), got in acks.items():
            assert [r["id"] for r in got] == list(range(per_connection))
            assert all(r["op"] == "ok" for r in got)
            for topic in topics:
                mine = [r["seq"] for r, t in zip(got, plans[(n, c)], strict=True) if t == topic]
                assert mine == sorted(mine), (n, c, topic)  # the client's order
                numbered[topic] += mine
        for topic, seqs in numbered.items():
            assert sorted(seqs) == list(range(1, len(seqs) + 1)), topic  # each seq once
        for events in seen.values():
            for topic in topics:
                of_topic = [e for e in events if e["topic"] == topic]
                assert [e["seq"] for e in of_topic] == list(range(1, len(of_topic) + 1))
                last: dict[tuple[int, int], int] = {}
                for e in of_topic:
                    n, c, i = e["data"]
                    assert last.get((n, c), -1) < i
                    last[(n, c)] = i
    finally:
        await delete_prefix(MACHINE_URL, prefix)


@needs_machine_redis
async def test_a_command_after_publishes_sees_them_done(start_broker: BrokerFactory) -> None:
    prefix = unique_prefix()
    try:
        node = await start_node(start_broker, MACHINE_URL, prefix)
        async with raw_connect(node.url) as client:
            blob = b"".join(pub_frame("t.a", n) for n in range(200))  # no acks asked
            history = {"op": "history", "id": "h", "topic": "t.a", "limit": 1000}
            await client.send_raw(blob + mask_frame(0x1, json.dumps(history).encode()))
            page = await client.recv()
            assert [m["data"] for m in page["messages"]] == list(range(200))
            # ... and a sub with since: its position counts every one of them.
            since = {"epoch": page["epoch"], "seq": 0}
            sub = {"op": "sub", "id": "s", "topic": "t.a", "since": since}
            await client.send_raw(
                b"".join(pub_frame("t.a", n) for n in range(200, 210))
                + mask_frame(0x1, json.dumps(sub).encode())
            )
            ok = await client.recv()
            assert ok["seq"] == 210 and ok["recovered"] is True, ok
            assert [(await client.recv())["data"] for _ in range(210)] == list(range(210))
    finally:
        await delete_prefix(MACHINE_URL, prefix)


async def test_redis_killed_mid_pipeline_every_publish_is_answered(
    start_broker: BrokerFactory, redis: RedisProcess
) -> None:
    """Redis dies while a window of publishes waits for it and more are
    coming: each one is answered, in order (unavailable: their fate is not
    known), within the timeout; once Redis is back, publishing works."""
    node = await start_node(start_broker, redis.url, timeout=0.5)
    total = PUBLISH_WINDOW + 72
    async with raw_connect(node.url) as client:
        await pause(redis)
        frames = [pub_frame("t.a", n, n) for n in range(total)]
        await client.send_raw(b"".join(frames) + ping_frame("after"))
        await wait_until(lambda: pending(node) == PUBLISH_WINDOW)
        await redis.kill()
        started = trio.current_time()
        got = await replies(client, total + 1)
        took = trio.current_time() - started
        assert [r["id"] for r in got] == [*range(total), "after"]
        assert all(r["op"] == "err" and r["code"] == "unavailable" for r in got[:-1]), got
        # The window failed when the connection did; those after it waited
        # for a connection together, within one timeout of their submit.
        assert took < 2.0, took
        assert node.stats.publishes.get("unavailable") == total
        await redis.start()
        await wait_until(lambda: node.readiness()[0], 10)
        await client.send_raw(pub_frame("t.a", "again", "x"))
        assert (await client.recv())["seq"] == 1  # Redis lost everything: a new epoch
    assert pending(node) == 0


async def test_a_stalled_redis_times_out_each_pipelined_publish_in_order(
    start_broker: BrokerFactory, redis: RedisProcess
) -> None:
    """Redis takes no script call for a second (CLIENT PAUSE: as a stalled
    Redis); the timeout is 0.3 s: every publish sent meanwhile is answered
    unavailable, in order, and the node keeps serving."""
    node = await start_node(start_broker, redis.url, timeout=0.3, keepalive=5.0)
    async with raw_connect(node.url) as client:
        await redis_command(redis.url, "CLIENT", "PAUSE", 1000, "WRITE")
        started = trio.current_time()
        await client.send_raw(b"".join(pub_frame("t.a", n, n) for n in range(50)))
        got = await replies(client, 50)
        took = trio.current_time() - started
        assert [r["id"] for r in got] == list(range(50))
        assert all(r.get("code") == "unavailable" for r in got), got
        assert "within 0.3 s" in got[0]["message"], got[0]
        assert 0.25 < took < 0.9, took
        # Meanwhile what needs no Redis is answered at once.
        await client.send_raw(ping_frame("alive"))
        assert await client.recv(0.2) == {"op": "pong", "id": "alive"}
    await wait_until(lambda: node.readiness()[0], 10)
    async with raw_connect(node.url) as client:
        with trio.fail_after(5):
            while True:  # until the pause is over
                await client.send_raw(pub_frame("t.a", "later", "x"))
                reply = await client.recv()
                if reply["op"] == "ok":
                    break
    assert pending(node) == 0


async def test_publishes_in_flight_when_the_client_closes_are_published(
    start_broker: BrokerFactory, redis: RedisProcess
) -> None:
    node = await start_node(start_broker, redis.url)
    close = mask_frame(0x8, (1000).to_bytes(2, "big"))
    async with connect(node.url) as subscriber:
        await subscriber.request({"op": "sub", "id": 1, "topic": "t.a"})
        # A client sends 50 publishes and closes before Redis answered any.
        async with raw_connect(node.url) as client:
            await pause(redis)
            await client.send_raw(b"".join(pub_frame("t.a", n, n) for n in range(50)) + close)
            await wait_until(lambda: pending(node) == 50)
        # Its connection waits for the answers as it closes (up to the
        # closing handshake's bound): they are counted and observed.
        await unpause(redis)
        await wait_until(lambda: node.stats.publishes.get("ok") == 50)
        assert [(await subscriber.recv())["data"] for _ in range(50)] == list(range(50))
        # Past that bound the connection is gone; what it sent is still
        # with Redis, and published.
        async with raw_connect(node.url) as client:
            await pause(redis)
            await client.send_raw(b"".join(pub_frame("t.a", n, n) for n in range(50)) + close)
            await wait_until(lambda: pending(node) == 50)
        await wait_until(lambda: len(node.connections) == 1)
        await unpause(redis)
        assert [(await subscriber.recv())["data"] for _ in range(50)] == list(range(50))
        await wait_until(lambda: pending(node) == 0)


async def test_the_presence_refresh_is_pipelined(
    start_broker: BrokerFactory, redis: RedisProcess
) -> None:
    """A node's presence refresh (every presence_ttl / 3) is one call per
    topic: they wait for Redis together, REFRESH_WINDOW at once, instead of
    one round trip each."""
    node = await start_node(start_broker, redis.url, extra={"presence": [{"pattern": "chat.>"}]})
    topics = 300
    async with raw_connect(node.url) as member:
        subs = [{"op": "sub", "id": n, "topic": f"chat.{n}"} for n in range(topics)]
        await member.send_raw(b"".join(mask_frame(0x1, json.dumps(s).encode()) for s in subs))
        assert [(await member.recv())["id"] for _ in range(topics)] == list(range(topics))
        engine = node.engine
        assert isinstance(engine, RedisEngine)
        await pause(redis)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(engine._presence_refresh)
            await wait_until(lambda: pending(node) == REFRESH_WINDOW)
            await unpause(redis)
        async with connect(node.url) as watcher:
            reply = await watcher.request({"op": "presence", "id": 1, "topic": "chat.299"})
            assert (reply["count"], reply["connections"]) == (1, 1), reply
