"""A source's publishes are pipelined to Redis (``Publisher.send``).

``send`` hands each message to the publish pipeline without waiting for
Redis's answer, at most ``SEND_WINDOW`` in flight; the answers are counted
in order by a task of the supervisor's. These tests check, on the Redis
engine, that a source's messages reach another node complete and in order,
that refusals are counted while the rest flows, that the window really
holds ``SEND_WINDOW`` publishes with Redis at once (and no more), that a
Redis lost mid-stream is counted and hangs nothing, and that a source that
ends or is stopped leaves nothing in flight unaccounted for. The in-process
engine's ``send`` is in tests/test_sources.py.

The tests that pause (``CLIENT PAUSE ... WRITE``) or kill Redis run their own
``redis-server``; the others use the machine's Redis with a key prefix of
their own.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import pytest
import trio
import trio.testing

from broker import Broker, Identity, PluginContext, SourceError, SourcesContext, hookimpl
from broker.engine.redis import RedisEngine
from broker.sources import SEND_WINDOW, Publisher, SourceState, Supervisor
from tests.conftest import BrokerFactory, merge
from tests.helpers import connect, wait_until
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

FEED = Identity("feed")


class Feed:
    """A source whose run is the test's *body*, started when *go* is set."""

    name = "feed"
    identity = FEED

    def __init__(self, body: Callable[[Publisher], Awaitable[None]]) -> None:
        self.body = body
        self.go = trio.Event()
        self.runs = 0

    async def run(self, publisher: Publisher) -> None:
        self.runs += 1
        publisher.ready()
        await self.go.wait()
        await self.body(publisher)
        await trio.sleep_forever()


class FeedPlugin:
    """Contributes the feed; refuses (broker_validate) data equal to a refused value."""

    def __init__(self, feed: Feed, refuse: Callable[[Any], bool] | None = None) -> None:
        self.feed = feed
        self.refuse = refuse

    @hookimpl
    def broker_sources(self, broker: SourcesContext) -> list[Any]:
        return [self.feed]

    @hookimpl
    def broker_validate(self, topic: str, data: Any) -> str | None:
        return "refused by the test" if self.refuse is not None and self.refuse(data) else None


async def start_node(
    start_broker: BrokerFactory, url: str, prefix: str, plugin: object | None = None, **engine: Any
) -> Broker:
    config: dict[str, Any] = {
        "engine": {"type": "redis", "url": url, "prefix": prefix, **engine},
        "queue": {"max_messages": 100_000, "max_bytes": 64 << 20},
    }
    factories = None
    if plugin is not None:

        def factory(settings: Mapping[str, Any], context: PluginContext) -> object:
            return plugin

        factories = {"feed": factory}
        config = merge(config, {"plugins": {"enabled": ["noauth", "feed"]}})
    broker = await start_broker(config, factories=factories)
    await wait_until(lambda: broker.readiness()[0])
    return broker


def pending(broker: Broker) -> int:
    """Script calls this node has sent (or holds to send) and not had answered."""
    engine = broker.engine
    assert isinstance(engine, RedisEngine)
    return engine.engine_stats()["pending"]


def state(sup: Supervisor) -> SourceState:
    """The state, read through a call (so that type checkers do not narrow it)."""
    return sup.state


def supervisor(broker: Broker) -> Supervisor:
    (sup,) = broker.sources
    return sup


@pytest.fixture
async def redis() -> AsyncIterator[RedisProcess]:
    async with open_redis() as server:
        yield server


async def pause(redis: RedisProcess) -> None:
    """Redis holds every script call (they write) until unpause."""
    await redis_command(redis.url, "CLIENT", "PAUSE", 20_000, "WRITE")


async def unpause(redis: RedisProcess) -> None:
    await redis_command(redis.url, "CLIENT", "UNPAUSE")


@needs_machine_redis
async def test_a_sources_sends_reach_another_node_complete_and_in_order(
    start_broker: BrokerFactory,
) -> None:
    """3,000 messages sent on node A over two topics reach a subscriber on
    node B, each topic numbered in the order sent; a ``publish`` after them
    gets the next seq (the sends are answered first)."""
    total = 3000
    last: list[int] = []

    async def body(publisher: Publisher) -> None:
        for n in range(total):
            await publisher.send(f"t.{'ab'[n % 2]}", n)
        last.append(await publisher.publish("t.a", "last"))

    feed = Feed(body)
    prefix = unique_prefix()
    try:
        a = await start_node(start_broker, MACHINE_URL, prefix, FeedPlugin(feed))
        b = await start_node(start_broker, MACHINE_URL, prefix)
        async with connect(b.url) as subscriber:
            await subscriber.sub("t.>")
            feed.go.set()
            with trio.fail_after(30):
                got = [await subscriber.recv() for _ in range(total + 1)]
        for k, topic in enumerate(["t.a", "t.b"]):
            mine = [m for m in got if m["topic"] == topic]
            assert [m["seq"] for m in mine] == list(range(1, len(mine) + 1)), topic
            expected: list[Any] = list(range(k, total, 2))
            if topic == "t.a":
                expected.append("last")
            assert [m["data"] for m in mine] == expected, topic
        assert last == [total // 2 + 1]
        sup = supervisor(a)
        assert (sup.published, sup.rejected) == (total + 1, 0)
        assert a.stats.publishes["ok"] == total + 1
        assert pending(a) == 0
    finally:
        await delete_prefix(MACHINE_URL, prefix)


@needs_machine_redis
async def test_refused_sends_are_counted_and_the_rest_arrive_in_order(
    start_broker: BrokerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """Every 10th message is refused by a validation plugin and every 25th
    has an invalid topic: they are counted as rejected (and logged), and the
    others arrive complete, in order, without a gap in the seqs."""
    total = 1000

    def topic(n: int) -> str:
        return "t..bad" if n % 25 == 0 else "t.a"

    async def body(publisher: Publisher) -> None:
        for n in range(total):
            await publisher.send(topic(n), n)

    feed = Feed(body)
    prefix = unique_prefix()
    try:
        node = await start_node(
            start_broker, MACHINE_URL, prefix, FeedPlugin(feed, refuse=lambda d: d % 10 == 3)
        )
        kept = [n for n in range(total) if n % 25 and n % 10 != 3]
        async with connect(node.url) as subscriber:
            await subscriber.sub("t.>")
            with caplog.at_level(logging.WARNING, "broker.sources"):
                feed.go.set()
                with trio.fail_after(30):
                    got = [await subscriber.recv() for _ in range(len(kept))]
        assert [m["data"] for m in got] == kept
        assert [m["seq"] for m in got] == list(range(1, len(kept) + 1))
        sup = supervisor(node)
        await wait_until(lambda: sup.published == len(kept))
        assert sup.rejected == total - len(kept)
        assert node.stats.refused_publishes["invalid"] == total // 10
        assert "source feed/feed: publish to t..bad refused" in caplog.text
    finally:
        await delete_prefix(MACHINE_URL, prefix)


async def test_the_window_holds_send_window_publishes_with_redis_at_once(
    start_broker: BrokerFactory, redis: RedisProcess
) -> None:
    """While Redis holds every script call, the source gets SEND_WINDOW
    publishes to Redis without one answer (they share round trips), then
    waits: not one more is in flight, and ``send`` has returned one time
    fewer. Once Redis answers, all of them are published, in order."""
    total = 3 * SEND_WINDOW
    sent: list[int] = []

    async def body(publisher: Publisher) -> None:
        for n in range(total):
            await publisher.send("t.a", n)
            sent.append(n)

    feed = Feed(body)
    node = await start_node(start_broker, redis.url, "p:", FeedPlugin(feed))
    async with connect(node.url) as subscriber:
        await subscriber.sub("t.a")
        await pause(redis)
        feed.go.set()
        await wait_until(lambda: pending(node) == SEND_WINDOW)
        await trio.testing.wait_all_tasks_blocked()
        assert pending(node) == SEND_WINDOW
        assert len(sent) == SEND_WINDOW - 1  # the last send waits for room
        assert supervisor(node).published == 0
        await unpause(redis)
        with trio.fail_after(10):
            got = [await subscriber.recv() for _ in range(total)]
    assert [m["data"] for m in got] == list(range(total))
    assert [m["seq"] for m in got] == list(range(1, total + 1))
    await wait_until(lambda: supervisor(node).published == total)
    assert pending(node) == 0


async def test_redis_lost_mid_stream_every_send_is_counted_and_nothing_hangs(
    start_broker: BrokerFactory, redis: RedisProcess
) -> None:
    """Redis dies with a window of sends waiting for it and more to come:
    every one is counted rejected (unavailable) within the timeout, the
    source goes on, and once Redis is back its publishes work again."""
    total = SEND_WINDOW + 72
    done = trio.Event()
    after: list[int] = []

    async def body(publisher: Publisher) -> None:
        for n in range(total):
            await publisher.send("t.a", n)
        done.set()
        await again.wait()
        after.append(await publisher.publish("t.a", "again"))

    again = trio.Event()
    feed = Feed(body)
    node = await start_node(start_broker, redis.url, "p:", FeedPlugin(feed), timeout=0.5)
    sup = supervisor(node)
    await pause(redis)
    feed.go.set()
    await wait_until(lambda: pending(node) == SEND_WINDOW)
    await redis.kill()
    with trio.fail_after(5):
        await done.wait()
        await wait_until(lambda: sup.rejected == total)
    assert sup.published == 0
    assert node.stats.publishes.get("unavailable") == total
    assert pending(node) == 0
    assert sup.state is SourceState.RUNNING  # the source never failed
    await redis.start()
    await wait_until(lambda: node.readiness()[0], 10)
    again.set()
    await wait_until(lambda: bool(after))
    assert after == [1]  # Redis lost everything: a new epoch
    assert sup.published == 1


async def test_a_source_that_fails_with_sends_in_flight_settles_them_before_restarting(
    start_broker: BrokerFactory, redis: RedisProcess
) -> None:
    """The source raises while 50 sends wait for Redis: the supervisor waits
    for their answers (the source is not restarted meanwhile), counts them,
    then backs off; nothing is left in flight."""
    fail = trio.Event()

    async def body(publisher: Publisher) -> None:
        for n in range(50):
            await publisher.send("t.a", n)
        await fail.wait()
        raise SourceError("upstream gone")

    feed = Feed(body)
    node = await start_node(start_broker, redis.url, "p:", FeedPlugin(feed))
    sup = supervisor(node)
    await pause(redis)
    feed.go.set()
    await wait_until(lambda: pending(node) == 50)
    fail.set()
    await trio.testing.wait_all_tasks_blocked()
    assert sup.state is SourceState.RUNNING  # settling, not backing off yet
    assert (sup.published, sup.rejected) == (0, 0)
    await unpause(redis)
    with trio.fail_after(5):
        while state(sup) is not SourceState.BACKING_OFF:
            await sup.changed.wait()
    assert (sup.published, sup.rejected) == (50, 0)
    assert sup.last_error == "upstream gone"
    assert pending(node) == 0


async def test_a_source_stopped_with_sends_in_flight_counts_them(
    start_broker: BrokerFactory, redis: RedisProcess, caplog: pytest.LogCaptureFixture
) -> None:
    """The broker stops while 50 sends wait for a paused Redis: the source
    stops at once, and what it had in flight is counted rejected (its fate
    unknown) and logged, not left behind."""

    async def body(publisher: Publisher) -> None:
        for n in range(50):
            await publisher.send("t.a", n)

    feed = Feed(body)
    node = await start_node(start_broker, redis.url, "p:", FeedPlugin(feed))
    sup = supervisor(node)
    await pause(redis)
    feed.go.set()
    await wait_until(lambda: pending(node) == 50)
    with caplog.at_level(logging.WARNING, "broker.sources"):
        node.stop()
        with trio.fail_after(5):
            while state(sup) is not SourceState.STOPPED:
                await sup.changed.wait()
    assert (sup.published, sup.rejected) == (0, 50)
    assert "stopped with 50 publishes unanswered" in caplog.text
    await unpause(redis)


async def test_sends_the_engine_cannot_place_at_once_keep_their_order(
    start_broker: BrokerFactory, redis: RedisProcess
) -> None:
    """With ``max_pending`` (16) below the window, the 17th send finds no
    slot: the engine cannot place it without waiting, so the source waits
    for the 16 before it and then publishes it (``Pending.placed`` false).
    The order holds throughout."""
    total = 500

    async def body(publisher: Publisher) -> None:
        for n in range(total):
            await publisher.send("t.a", n)

    feed = Feed(body)
    node = await start_node(start_broker, redis.url, "p:", FeedPlugin(feed), max_pending=16)
    async with connect(node.url) as subscriber:
        await subscriber.sub("t.a")
        await pause(redis)
        feed.go.set()
        await wait_until(lambda: pending(node) == 16)
        await trio.testing.wait_all_tasks_blocked()
        assert pending(node) == 16  # the 17th waits for them, unplaced
        await unpause(redis)
        with trio.fail_after(10):
            got = [await subscriber.recv() for _ in range(total)]
    assert [m["data"] for m in got] == list(range(total))
    assert [m["seq"] for m in got] == list(range(1, total + 1))
    await wait_until(lambda: supervisor(node).published == total)
