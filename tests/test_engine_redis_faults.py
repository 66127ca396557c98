"""The Redis engine when Redis fails: restarts, stalls, a lost fan-out link,
Redis unreachable at start, a restart from persistence.

Each test runs its own ``redis-server`` on a free port (it is killed,
slowed or restarted) and brokers in this process on it. A broker killed
with SIGKILL is in tests/test_cluster_nodes.py (broker processes).
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trio
import trio_websocket

from broker import Broker
from broker.client import Interrupted, Message, Reconnect, Reconnected, Resync, open_client
from broker.engine.redis import RedisEngine
from tests.conftest import BrokerFactory, merge
from tests.helpers import connect, free_port, wait_until
from tests.redis_service import RedisProcess, needs_redis_server, open_redis, redis_command
from tests.service import http_get

pytestmark = needs_redis_server

HISTORY = {"history": [{"pattern": "t.>", "size": 1000, "ttl": 60.0}]}
Node = Callable[..., Awaitable[Broker]]
#: Fast reconnects for the tests' clients.
RECONNECT = Reconnect(initial_delay=0.01, max_delay=0.1, wait_timeout=5.0)


@pytest.fixture
async def redis() -> AsyncIterator[RedisProcess]:
    async with open_redis() as server:
        yield server


def node_factory(start_broker: BrokerFactory, url: str) -> Node:
    async def start(config: dict[str, Any] | None = None, **options: Any) -> Broker:
        base = {"engine": {"type": "redis", "url": url, "prefix": "f:", "timeout": 0.5}}
        return await start_broker(merge(base, config or {}), **options)

    return start


def engine(broker: Broker) -> RedisEngine:
    assert isinstance(broker.engine, RedisEngine)
    return broker.engine


async def readyz(broker: Broker) -> int:
    host, port = broker.admin_addresses[0]
    status, _, _ = await http_get(host, port, "/readyz")
    return status


async def test_redis_restart_mid_traffic(start_broker: BrokerFactory, redis: RedisProcess) -> None:
    """Redis is killed (no persistence: its data is gone) and restarted
    while a publisher and a subscriber go on. Publishes get ok or
    unavailable, never a hang; /readyz is 503 meanwhile; the subscriber
    (the Python client, on another node) is told to resume, learns that
    the epoch changed (Resync), and then gets every message acked, in order."""
    node = node_factory(start_broker, redis.url)
    a, b = await node(HISTORY), await node(HISTORY)
    answers: list[tuple[str, int | None]] = []
    items: list[Any] = []
    caught_up = trio.Event()

    async def subscriber(ready: trio.Event) -> None:
        async with (
            open_client(b.url, reconnect=RECONNECT) as client,
            client.subscribe("t.a") as sub,
        ):
            ready.set()
            async for item in sub:
                items.append(item)
                resyncs = [i for i, x in enumerate(items) if isinstance(x, Resync)]
                if resyncs and len(items) - resyncs[0] > 10:
                    caught_up.set()
                    return

    async def publisher() -> None:
        async with connect(a.url) as pub:
            n = 0
            while not caught_up.is_set():
                reply = await pub.request({"op": "pub", "id": n, "topic": "t.a", "data": n})
                if reply["op"] == "ok":
                    answers.append(("ok", reply["seq"]))
                else:
                    assert reply["code"] == "unavailable", reply
                    answers.append(("unavailable", None))
                    await trio.sleep(0.01)  # a client's backoff before it retries
                n += 1

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            ready = trio.Event()
            nursery.start_soon(subscriber, ready)
            await ready.wait()
            nursery.start_soon(publisher)
            await wait_until(lambda: len(answers) >= 20, 10)
            await redis.kill()
            await wait_until(lambda: not a.readiness()[0], 5)
            assert await readyz(a) == 503
            await wait_until(lambda: any(x[0] == "unavailable" for x in answers), 5)
            await redis.start()
            await wait_until(lambda: a.readiness()[0] and b.readiness()[0], 10)
            assert await readyz(a) == 200
    for broker in (a, b):
        stats = engine(broker).engine_stats()
        assert stats["outages"] >= 1 and stats["up"] == 1, stats
    host, port = a.admin_addresses[0]
    _, _, metrics = await http_get(host, port, "/metrics")
    assert re.search(rb"^broker_engine_outages_total [1-9]", metrics, re.MULTILINE), metrics
    assert re.search(rb'^broker_publishes_total\{result="unavailable"\} [1-9]', metrics, re.M)
    assert b"broker_engine_up 1.0" in metrics
    assert engine(b).engine_stats()["gaps"] >= 1
    # The subscriber: messages, the interruption (1012, or 1006 if the
    # close raced the kill), a Resync with the new epoch's position, then
    # every later message of the new epoch, in order.
    kinds = [type(i).__name__ for i in items]
    assert kinds.count("Interrupted") >= 1 and kinds.count("Resync") == 1, kinds
    resync = next(i for i in items if isinstance(i, Resync))
    assert resync.seq is not None
    after = items[items.index(resync) + 1 :]
    assert all(isinstance(i, Message) for i in after), after
    seqs = [i.seq for i in after if isinstance(i, Message)]
    assert seqs == list(range(resync.seq + 1, resync.seq + 1 + len(seqs))), seqs
    # Acked publishes of the new epoch beyond the resync point all arrived.
    new_epoch = [seq for _, seq in answers[answers.index(("ok", 1), 1) :] if seq is not None]
    assert [s for s in new_epoch if resync.seq < s <= seqs[-1]] == seqs


async def test_a_slow_redis_gives_bounded_errors_and_the_node_keeps_serving(
    start_broker: BrokerFactory, redis: RedisProcess
) -> None:
    node = node_factory(start_broker, redis.url)
    a = await node({"engine": {"timeout": 0.3, "keepalive": 5.0}})
    async with connect(a.url) as client, connect(a.url) as other:
        await client.pub("t.a", 1)
        async with trio.open_nursery() as nursery:
            sleeping = trio.Event()

            async def stall() -> None:
                sleeping.set()
                await redis_command(redis.url, "DEBUG", "SLEEP", "1.5")

            nursery.start_soon(stall)
            await sleeping.wait()
            # Publish until Redis is asleep (a publish that raced ahead of
            # DEBUG SLEEP is answered at once): then one gets unavailable,
            # within the 0.3 s timeout.
            with trio.fail_after(1.0):
                n = 2
                while True:
                    started = trio.current_time()
                    reply = await client.request({"op": "pub", "id": n, "topic": "t.a", "data": n})
                    took = trio.current_time() - started
                    if reply["op"] == "err":
                        break
                    n += 1
            assert reply["code"] == "unavailable" and "0.3 s" in reply["message"], reply
            assert 0.25 < took < 0.8, took
            # Meanwhile the broker answers what needs no Redis.
            started = trio.current_time()
            await other.assert_alive()
            assert trio.current_time() - started < 0.3
        # Redis is back: publishing works again, nothing is left waiting.
        await wait_until(lambda: a.readiness()[0], 5)
        assert await client.pub("t.a", 3) >= 2
    stats = engine(a).engine_stats()
    assert stats["timeouts"] >= 1 and stats["pending"] == 0, stats


async def test_a_lost_fanout_link_tells_subscribers_to_resume(
    start_broker: BrokerFactory, redis: RedisProcess
) -> None:
    """The fan-out connection alone is killed (CLIENT KILL): the node
    reconnects it, then closes its subscribed connections with 1012; the
    Python client resumes from history, missing nothing."""
    node = node_factory(start_broker, redis.url)
    a, b = await node(HISTORY), await node(HISTORY)
    got: list[Any] = []
    async with (
        open_client(b.url, reconnect=RECONNECT) as client,
        client.subscribe("t.a") as sub,
        connect(a.url) as pub,
    ):
        await pub.pub("t.a", 1)
        got.append(await sub.__anext__())
        # Kill b's fan-out link only (its subscriber connection), and
        # publish meanwhile: b's subscribers cannot see these live.
        await redis_command(redis.url, "CLIENT", "KILL", "TYPE", "pubsub")
        for n in range(2, 6):
            await pub.pub("t.a", n)
        with trio.fail_after(10):
            while len([i for i in got if isinstance(i, Message)]) < 5:
                got.append(await sub.__anext__())
    interrupted = [i for i in got if isinstance(i, Interrupted)]
    assert interrupted and interrupted[0].code == 1012, got
    assert not any(isinstance(i, Resync) for i in got), got
    assert [i.data for i in got if isinstance(i, Message)] == [1, 2, 3, 4, 5]
    assert engine(b).engine_stats()["gaps"] == 1
    assert engine(b).engine_stats()["resynced_connections"] == 1


async def test_a_publication_read_while_the_fanout_link_resubscribes_waits_for_the_gap(
    start_broker: BrokerFactory, redis: RedisProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fan-out link coming back reads publications as soon as Redis has
    its SUBSCRIBE, before its setup is over and the gap closes the node's
    subscribed connections. Such a publication must wait for the gap: given
    to a subscriber that missed the ones before it, it would move the
    client's position past the hole, and the 1012 resume would start after
    what was missed (lost for good).

    Forced here: b's fan-out link is dropped; while it is down 2 and 3 are
    published; once Redis confirmed its SUBSCRIBE, 4 is published and b's
    link has read it before its setup returns."""
    node = node_factory(start_broker, redis.url)
    a = await node(HISTORY)
    b = await node(merge(HISTORY, {"engine": {"timeout": 5.0}}))
    links = engine(b)._links
    got: list[Any] = []
    async with (
        open_client(b.url, reconnect=RECONNECT) as client,
        client.subscribe("t.a") as sub,
        connect(a.url) as pub,
    ):
        await pub.pub("t.a", 1)
        got.append(await sub.__anext__())
        subscribe_all = links._subscribe_all
        forced = trio.Event()

        async def setup(conn: Any, link: Any, mine: Any) -> None:
            if forced.is_set():
                return await subscribe_all(conn, link, mine)
            forced.set()
            for n in (2, 3):  # missed by b: its link is not subscribed
                await pub.pub("t.a", n)
            await subscribe_all(conn, link, mine)
            # Redis has the subscription: 4 comes on this link, read
            # before the link is attached (and the gap fired).
            read = trio.Event()
            on_push = conn.on_push

            def seen(push: Any) -> None:
                on_push(push)
                if push[0] == b"message":
                    read.set()

            conn.on_push = seen
            await pub.pub("t.a", 4)
            await read.wait()

        monkeypatch.setattr(links, "_subscribe_all", setup)
        await redis_command(redis.url, "CLIENT", "KILL", "TYPE", "pubsub")
        with trio.fail_after(10):
            while not any(isinstance(i, Reconnected) for i in got):
                got.append(await sub.__anext__())
            await pub.pub("t.a", 5)  # the last: what was missed came before it
            while not (isinstance(got[-1], Message) and got[-1].data == 5):
                got.append(await sub.__anext__())
        assert forced.is_set()
    assert [i.data for i in got if isinstance(i, Message)] == [1, 2, 3, 4, 5], got
    assert [type(i) for i in got][:3] == [Message, Interrupted, Reconnected], got
    assert engine(b).engine_stats()["gaps"] == 1


async def test_a_sub_that_read_its_position_before_the_fanout_was_back_is_told_to_resume(
    start_broker: BrokerFactory, redis: RedisProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ``sub`` of a pattern the node already has passes the interest at
    once, even while the fan-out link is down; it reads its position from
    Redis meanwhile. What is published after that read and before the link
    subscribes again never reaches the node: if the gap fires before the
    ``sub`` is answered, the connection must be closed with it (1012, to
    resume), not answered ``ok`` with a position the next message skips.

    Forced here: b's fan-out link is held down (its setup waits); z's
    position is read; 2 is published (missed by b); the link comes back and
    its gap fires; only then is z's read answered."""
    node = node_factory(start_broker, redis.url)
    a = await node(HISTORY)
    b = await node(merge(HISTORY, {"engine": {"timeout": 5.0}}))
    links = engine(b)._links
    subscribe_all = links._subscribe_all
    down, back, gap = trio.Event(), trio.Event(), trio.Event()

    async def setup(conn: Any, link: Any, mine: Any) -> None:
        down.set()
        await back.wait()
        await subscribe_all(conn, link, mine)

    on_gap = links._on_gap

    def gap_fired() -> None:
        on_gap()
        gap.set()

    recover = engine(b).recover

    async def read_then_miss(pattern: str, replay: Any) -> Any:
        recovery = await recover(pattern, replay)
        await pub.pub("t.a", 2)  # b's fan-out link is down: b misses it
        back.set()
        await gap.wait()
        return recovery

    async with connect(a.url) as pub, connect(b.url) as x, connect(b.url) as z:
        # x gives b the pattern: z's sub passes the interest at once.
        assert (await x.request({"op": "sub", "id": "x", "topic": "t.a"}))["op"] == "ok"
        await pub.pub("t.a", 1)
        assert (await x.recv())["data"] == 1
        monkeypatch.setattr(links, "_subscribe_all", setup)
        monkeypatch.setattr(links, "_on_gap", gap_fired)
        await redis_command(redis.url, "CLIENT", "KILL", "TYPE", "pubsub")
        with trio.fail_after(10):
            await down.wait()
        monkeypatch.setattr(engine(b), "recover", read_then_miss)
        await z.send({"op": "sub", "id": "z", "topic": "t.a"})
        closed: trio_websocket.CloseReason | None = None
        try:
            ok = await z.recv()
            await pub.pub("t.a", 3)
            message = await z.recv()
        except trio_websocket.ConnectionClosed as e:
            closed = e.reason
        else:
            assert message["seq"] == ok["seq"] + 1, ("a hole after the ok", ok, message)
        assert closed is not None and closed.code == 1012, ("answered after the gap", closed)
        assert (await x.expect_close()).code == 1012
    assert engine(b).engine_stats()["resynced_connections"] == 2


async def test_redis_unreachable_at_start_then_reachable(start_broker: BrokerFactory) -> None:
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    a = await node_factory(start_broker, url)({"engine": {"connect_timeout": 0.5}})
    assert a.readiness() == (False, ["cluster backend unreachable"])
    async with connect(a.url) as client:
        reply = await client.request({"op": "pub", "id": 1, "topic": "t.a", "data": 1})
        assert reply["code"] == "unavailable", reply
        reply = await client.request({"op": "sub", "id": 2, "topic": "t.a"})
        assert reply["code"] == "unavailable", reply
        assert a.stats.publishes.get("unavailable") == 1
        server = RedisProcess(Path(tempfile.mkdtemp(prefix="tb-redis-")), port)
        try:
            await server.start()
            await wait_until(lambda: a.readiness()[0], 10)
            assert await client.pub("t.a", 2) == 1
            await client.sub("t.a")
        finally:
            with trio.CancelScope(shield=True):
                await server.stop()


async def test_a_restart_from_persistence_starts_new_epochs(start_broker: BrokerFactory) -> None:
    """Redis restarted from its append-only file still has the topics, but
    writes acknowledged before the restart may be missing: a new epoch."""
    async with open_redis("--appendonly", "yes", "--appendfsync", "always") as server:
        a = await node_factory(start_broker, server.url)(HISTORY)
        async with connect(a.url) as client:
            assert await client.pub("t.a", 1) == 1
            ok = await client.request({"op": "history", "id": 1, "topic": "t.a"})
            await server.restart()
            assert await redis_command(server.url, "EXISTS", "f:h:{" + rule_id(a) + "}:m:t.a") == 1
            await wait_until(lambda: a.readiness()[0], 10)
            with trio.fail_after(5):
                while True:  # the node may still be reconnecting
                    reply = await client.request(
                        {"op": "pub", "id": "p", "topic": "t.a", "data": 2}
                    )
                    if reply["op"] == "ok":
                        break
                    assert reply["code"] == "unavailable", reply
            assert reply["seq"] == 1
            again = await client.request(
                {
                    "op": "history",
                    "id": 3,
                    "topic": "t.a",
                    "since": {"epoch": ok["epoch"], "seq": 1},
                }
            )
            assert again["recovered"] is False and again["epoch"] != ok["epoch"]


def rule_id(broker: Broker) -> str:
    rule = engine(broker).rule_for("t.a")
    assert rule is not None
    return rule.id


async def test_a_leave_that_could_not_reach_redis_is_made_by_the_refresh(
    start_broker: BrokerFactory, redis: RedisProcess
) -> None:
    """A member leaves while Redis is stalled: the node counts it out
    locally, and its next presence refresh brings Redis in line (the leave
    event reaches a watcher on another node)."""
    config = {
        "presence": [{"pattern": "chat.>"}],
        "engine": {"timeout": 0.3, "presence_ttl": 3.0},
        "plugins": {"enabled": ["tokens"]},
        "plugin": {
            "tokens": {"tokens": [{"id": n, "token": f"{n}-token-0123456789"} for n in ("a", "w")]}
        },
    }
    node = node_factory(start_broker, redis.url)
    a, b = await node(config), await node(config)
    async with (
        connect(f"{b.url}?token=w-token-0123456789") as watcher,
        connect(f"{a.url}?token=a-token-0123456789") as member,
    ):
        await watcher.request({"op": "sub", "id": 1, "topic": "chat.r", "presence": True})
        assert (await watcher.recv())["member"]["subject"] == "w"
        await member.sub("chat.r")
        assert (await watcher.recv())["member"]["subject"] == "a"
        async with trio.open_nursery() as nursery:
            stalled = trio.Event()

            async def stall() -> None:
                stalled.set()
                await redis_command(redis.url, "DEBUG", "SLEEP", "1")

            nursery.start_soon(stall)
            await stalled.wait()
            # The unsub is answered at once; its leave waits for Redis (up
            # to 0.3 s) or, if Redis was not asleep yet, goes through.
            await member.request({"op": "unsub", "id": 2, "topic": "chat.r"})
        with trio.fail_after(5):
            event = await watcher.recv()
        assert event["op"] == "leave" and event["member"]["subject"] == "a", event
        reply = await watcher.request({"op": "presence", "id": 3, "topic": "chat.r"})
        assert reply.get("count") == 1, reply
