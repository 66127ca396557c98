"""The engine seam stays correct when the engine awaits.

The whole broker runs over :class:`YieldingEngine`, an engine shaped like a
remote one (Redis): a publish yields to other tasks (trio checkpoints, a
random number of them) before and after the atomic step that assigns the
``seq`` and appends the publication to an ordered stream; a task of the
engine's own reads that stream and hands each publication to the hub,
yielding at random points between them; subscribing and unsubscribing
interest yield too, and the stream carries a topic to this node only while
the node has told the engine it wants it, as a pub/sub channel does.

Whatever interleaves, every subscriber must get every topic's messages
exactly once, in ``seq`` order, with each publisher's messages in the order
it sent them.

Its publishes are pipelined as a Redis engine's are (``Engine.submit``):
the atomic step happens in the call, the answer comes after random yields
(or, now and then, not at all: ``unavailable``), and one submit in ten is
refused for the caller to ``publish`` instead. ``pipelined=False`` makes
every submit refused: publishes then await the engine one at a time.

Presence goes the same way: joins and leaves yield around the atomic step
that updates the table, and their events reach the hub from the engine's
own task, as a remote node's would (tests/test_server_presence.py runs over it).
"""

from __future__ import annotations

import random
from collections import defaultdict, deque
from typing import Any

import pytest
import trio

from broker import Broker
from broker.core.config import Config
from broker.core.errors import EngineUnavailable
from broker.core.history import History, HistoryPage, Recovery, Replay
from broker.core.presence import PresenceInfo, PresenceStats, PresenceTable
from broker.core.protocol import Position
from broker.core.topics import pattern_matches
from broker.engine import Delivery, Interest, MemoryEngine
from tests.conftest import BrokerFactory
from tests.helpers import Client, connect, wait_until


class YieldingEngine:
    """An engine that awaits at random points (see the module doc); its
    positions and history are a :class:`~broker.core.history.History`, read
    and written in its atomic steps, as a Redis engine does in a script."""

    tracks_interest = True
    delivers_inline = False

    def __init__(
        self, delivery: Delivery, seed: int, *, pipelined: bool = True, fail_rate: float = 0.0
    ) -> None:
        self._delivery = delivery
        self._rng = random.Random(seed)
        self.pipelined = pipelined
        #: Share of submitted publishes whose answer is lost (numbered all
        #: the same, as a Redis script that ran before its connection failed).
        self.fail_rate = fail_rate
        self.log = History(
            (), clock=trio.current_time, max_bytes=1 << 26, max_topics=1 << 20, idle=600.0
        )
        self._stream: deque[tuple[str, int, Any, str | None, str | None]] = deque()
        self._more = trio.Event()
        self.interest: set[str] = set()
        self.published = 0
        self.presence_table = PresenceTable()
        self._events: deque[tuple[str, str, dict[str, Any]]] = deque()

    async def _yield(self, most: int = 3) -> None:
        for _ in range(self._rng.randint(0, most)):
            await trio.lowlevel.checkpoint()

    def _append(self, topic: str, data: Any, key: str | None) -> int:
        """The atomic step: number (and store) the message and fix its
        place in the stream."""
        seq, epoch = self.log.append(topic, data, key)
        self._stream.append((topic, seq, data, key, epoch))
        self._more.set()
        self.published += 1
        return seq

    async def publish(self, topic: str, data: Any, key: str | None) -> int:
        await self._yield()
        seq = self._append(topic, data, key)
        await self._yield()
        return seq

    def submit(self, topic: str, data: Any, key: str | None) -> _Answer | None:
        if not self.pipelined or self._rng.random() < 0.1:
            return None  # "not now": the caller awaits publish instead
        seq = self._append(topic, data, key)
        return _Answer(self, seq, self._rng.random() < self.fail_rate)

    async def subscribe(self, pattern: str) -> None:
        await self._yield()
        self.interest.add(pattern)
        await self._yield()

    async def unsubscribe(self, pattern: str) -> None:
        await self._yield()
        self.interest.discard(pattern)
        await self._yield()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            await self._more.wait()
            self._more = trio.Event()
            while self._stream:
                topic, seq, data, key, epoch = self._stream.popleft()
                # A pub/sub channel brings this node only what it asked for.
                if any(pattern_matches(p, topic) for p in self.interest):
                    self._delivery.deliver(topic, seq, data, key, epoch)
                if self._rng.random() < 0.3:
                    self._delivery.flush()
                    await self._yield()
            while self._events:
                topic, op, member = self._events.popleft()
                if any(pattern_matches(p, topic) for p in self.interest):
                    self._delivery.presence_event(topic, op, member)
                await self._yield()
            self._delivery.flush()

    def healthy(self) -> bool:
        return True

    def engine_stats(self) -> dict[str, int]:
        return {}

    def configure(self, config: Config) -> None:
        self.log.configure(config.history)

    async def recover(self, pattern: str, replay: Replay) -> Recovery:
        # The read is atomic too, but publications numbered before it may
        # still be in the stream, on their way to the hub.
        await self._yield()
        recovery = self.log.recover(pattern, replay)
        await self._yield()
        return recovery

    async def history(self, topic: str, since: Position | None, limit: int) -> HistoryPage | None:
        await self._yield()
        return self.log.page(topic, since, limit)

    def history_stats(self) -> dict[str, int]:
        return {"messages": self.log.messages}

    async def presence_join(self, topic: str, connection: str, member: dict[str, Any]) -> None:
        await self._yield()
        # The atomic step: update the table and place the event in the stream.
        joined = self.presence_table.join(topic, connection, member)
        if joined is not None:
            self._events.append((topic, "join", joined))
            self._more.set()
        await self._yield()

    async def presence_leave(self, topic: str, connection: str, member: dict[str, Any]) -> None:
        await self._yield()
        left = self.presence_table.leave(topic, connection, member)
        if left is not None:
            self._events.append((topic, "leave", left))
            self._more.set()
        await self._yield()

    async def presence(self, topic: str, max_members: int) -> PresenceInfo:
        await self._yield()
        info = self.presence_table.query(topic, max_members)
        await self._yield()
        return info

    def presence_stats(self) -> PresenceStats:
        return self.presence_table.stats()


class _Answer:
    """A YieldingEngine publish's answer, after random yields."""

    def __init__(self, engine: YieldingEngine, seq: int, lost: bool) -> None:
        self._engine = engine
        self._seq = seq
        self._lost = lost

    async def result(self) -> int:
        await self._engine._yield(5)
        if self._lost:
            raise EngineUnavailable("the answer was lost")
        return self._seq


async def start_yielding(
    config: dict[str, Any] | None = None,
    *,
    start_broker: BrokerFactory,
    seed: int,
    pipelined: bool = True,
    fail_rate: float = 0.0,
) -> tuple[Broker, YieldingEngine]:
    """A broker over a YieldingEngine, and the engine."""
    engines: list[YieldingEngine] = []

    def make(delivery: Delivery) -> YieldingEngine:
        engines.append(YieldingEngine(delivery, seed, pipelined=pipelined, fail_rate=fail_rate))
        return engines[-1]

    broker = await start_broker(config, engine=make)
    return broker, engines[0]


TOPICS = ["t.a", "t.b", "t.c"]
PATTERNS = ["t.a", "t.b", "t.*", "t.>"]
PUBLISHERS = 4
PER_PUBLISHER = 150


async def collect(client: Client, expected: int) -> list[dict[str, Any]]:
    got: list[dict[str, Any]] = []
    while len(got) < expected:
        event = await client.recv()
        assert event["op"] == "msg", event
        got.append(event)
    return got


@pytest.mark.parametrize("pipelined", [True, False], ids=["pipelined", "awaited"])
@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_order_and_exactly_once_over_an_awaiting_engine(
    start_broker: BrokerFactory, seed: int, pipelined: bool
) -> None:
    broker, engine = await start_yielding(
        {"queue": {"max_messages": 10_000}},
        start_broker=start_broker,
        seed=seed,
        pipelined=pipelined,
    )
    rng = random.Random(seed)
    # What each publisher will send, topic by topic, decided up front.
    plan = [[rng.choice(TOPICS) for _ in range(PER_PUBLISHER)] for _ in range(PUBLISHERS)]
    per_topic: defaultdict[str, int] = defaultdict(int)
    for topics in plan:
        for topic in topics:
            per_topic[topic] += 1
    results: dict[str, list[dict[str, Any]]] = {}

    async def subscriber(pattern: str, ready: trio.Event) -> None:
        async with connect(broker.url) as client:
            await client.sub(pattern)
            ready.set()
            expected = sum(n for t, n in per_topic.items() if pattern_matches(pattern, t))
            results[pattern] = await collect(client, expected)

    async def publisher(index: int) -> None:
        async with connect(broker.url) as client:
            for n, topic in enumerate(plan[index]):
                message = {"op": "pub", "topic": topic, "data": [index, n]}
                if n % 10 == 9:  # now and then wait for an ack, as real clients do
                    await client.pub(topic, [index, n], id=n)
                else:
                    await client.send(message)

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            for pattern in PATTERNS:
                ready = trio.Event()
                nursery.start_soon(subscriber, pattern, ready)
                await ready.wait()
            async with trio.open_nursery() as publishers:
                for index in range(PUBLISHERS):
                    publishers.start_soon(publisher, index)

    assert engine.published == PUBLISHERS * PER_PUBLISHER
    for pattern, events in results.items():
        by_topic: dict[str, list[int]] = defaultdict(list)
        last_of_publisher: dict[tuple[str, int], int] = {}
        for event in events:
            topic = event["topic"]
            assert pattern_matches(pattern, topic)
            by_topic[topic].append(event["seq"])
            index, n = event["data"]
            # Each publisher's messages arrive in the order it sent them.
            assert last_of_publisher.get((topic, index), -1) < n
            last_of_publisher[(topic, index)] = n
        for topic, seqs in by_topic.items():
            # Every message of the topic, once, in seq order.
            assert seqs == list(range(1, per_topic[topic] + 1)), (pattern, topic)


async def test_a_subscriber_joining_mid_stream_gets_a_gapless_suffix(
    start_broker: BrokerFactory,
) -> None:
    broker, _ = await start_yielding(
        {"queue": {"max_messages": 10_000}}, start_broker=start_broker, seed=7
    )
    total = 400
    joined: list[int] = []

    async def publisher(started: trio.Event) -> None:
        async with connect(broker.url) as client:
            for n in range(total):
                await client.send({"op": "pub", "topic": "t.x", "data": n})
                if n == 50:
                    started.set()
            await client.pub("t.x", "end", id="last")

    async def late(started: trio.Event) -> None:
        async with connect(broker.url) as client:
            await started.wait()
            await client.sub("t.*")
            while True:
                event = await client.recv()
                if event["data"] == "end":
                    break
                joined.append(event["seq"])

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            started = trio.Event()
            nursery.start_soon(late, started)
            nursery.start_soon(publisher, started)
    # Whatever it missed before its ok, from then on nothing is skipped.
    assert joined == list(range(joined[0], joined[0] + len(joined)))
    assert joined[-1] == total


async def test_interest_tells_the_engine_on_first_and_last_subscriber(
    start_broker: BrokerFactory,
) -> None:
    broker, engine = await start_yielding(start_broker=start_broker, seed=3)
    async with connect(broker.url) as a, connect(broker.url) as b:
        await a.sub("x.>")
        await b.sub("x.>")
        assert engine.interest == {"x.>"}
        await a.request({"op": "unsub", "id": 1, "topic": "x.>"})
        assert engine.interest == {"x.>"}  # b still needs it
        await b.request({"op": "unsub", "id": 1, "topic": "x.>"})
        assert engine.interest == set()
        await a.sub("y")
    # A connection that closes gives its patterns up too.
    await wait_until(lambda: not engine.interest)


async def test_interest_converges_when_changes_interleave() -> None:
    """Many tasks subscribing and unsubscribing one pattern at once, over an
    engine that yields inside every change: the engine ends up told exactly
    the patterns that still have subscribers."""

    class Engine(MemoryEngine):
        tracks_interest = True

        def __init__(self) -> None:
            super().__init__(_NullDelivery())
            self.told: set[str] = set()
            self.calls = 0

        async def subscribe(self, pattern: str) -> None:
            self.calls += 1
            await trio.lowlevel.checkpoint()
            assert pattern not in self.told
            self.told.add(pattern)

        async def unsubscribe(self, pattern: str) -> None:
            self.calls += 1
            await trio.lowlevel.checkpoint()
            assert pattern in self.told
            self.told.discard(pattern)

    engine = Engine()
    interest = Interest(engine)
    rng = random.Random(5)
    held: list[str] = []

    async def churn(seed: int) -> None:
        mine = random.Random(seed)
        for _ in range(50):
            pattern = mine.choice(["a", "b"])
            await interest.acquire(pattern)
            assert pattern in engine.told  # never before the engine confirmed
            if mine.random() < 0.6:
                await interest.release(pattern)
            else:
                held.append(pattern)

    async with trio.open_nursery() as nursery:
        for _ in range(8):
            nursery.start_soon(churn, rng.randrange(1000))
    assert engine.told == set(held)


class _NullDelivery:
    def deliver(
        self, topic: str, seq: int, data: Any, key: str | None, epoch: str | None = None
    ) -> int:
        return 0

    def flush(self) -> None:
        pass

    def presence_event(self, topic: str, op: str, member: dict[str, Any]) -> int:
        return 0
