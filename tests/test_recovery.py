"""History and recovery over a live broker: positions in ``ok``, ``since``,
``history``, snapshots, and the race between reading history and going live.

Each race test runs over the in-process engine, over
:class:`~tests.test_engine_seam.YieldingEngine` (an engine that awaits at
random points and delivers from a task of its own, as a remote one does)
and over the Redis engine (on the machine's Redis, when it is there).
"""

from __future__ import annotations

import dataclasses
import random
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker import Broker
from broker.core.config import EngineConfig, config_from_dict
from broker.core.topics import pattern_matches
from broker.plugin.host import PluginHost
from tests.conftest import CLOSE_TIMEOUT, BrokerFactory
from tests.helpers import Client, connect
from tests.redis_service import (
    MACHINE_REDIS_DOWN,
    delete_prefix,
    needs_machine_redis,
    unique_prefix,
)
from tests.test_engine_seam import YieldingEngine

HISTORY = {"history": [{"pattern": "t.>", "size": 10_000, "ttl": 600.0}]}
REDIS_URL = "redis://127.0.0.1:6379/0"
#: The engines the property test draws from (Redis when the machine has it).
ENGINES = ["memory", "yielding"] + ([] if MACHINE_REDIS_DOWN else ["redis"])
QUEUE = {"queue": {"max_messages": 100_000, "max_bytes": 64 << 20}}

Start = Callable[[dict[str, Any]], Awaitable[Broker]]


@pytest.fixture(params=["memory", "yielding", pytest.param("redis", marks=needs_machine_redis)])
async def start(
    request: pytest.FixtureRequest, start_broker: BrokerFactory
) -> AsyncIterator[Start]:
    """Start a broker over the named engine (``redis``: the Redis engine on
    the machine's Redis, under a key prefix of the test's own)."""
    prefix = unique_prefix()

    async def go(config: dict[str, Any]) -> Broker:
        if request.param == "memory":
            return await start_broker(config)
        if request.param == "redis":
            engine = {"engine": {"type": "redis", "url": REDIS_URL, "prefix": prefix}}
            return await start_broker({**config, **engine})
        return await start_broker(config, engine=lambda d: YieldingEngine(d, 11))

    yield go
    if request.param == "redis":
        await delete_prefix(REDIS_URL, prefix)


class Tracker:
    """A client's view, as a resuming client keeps it: the last position
    per topic (epoch from the ok or from a seq-1 message) and every seq seen."""

    def __init__(self, pattern: str) -> None:
        self.pattern = pattern
        self.exact = "*" not in pattern and ">" not in pattern
        self.epoch: str | None = None  # an exact topic's, from its ok
        self.cursor: str | None = None
        self.positions: dict[str, tuple[str | None, int]] = {}
        self.seen: defaultdict[str, list[int]] = defaultdict(list)
        self.resyncs: list[dict[str, Any]] = []

    def since(self) -> dict[str, Any] | None:
        if self.exact:
            if self.epoch is None:
                return None
            _, seq = self.positions.get(self.pattern, (self.epoch, 0))
            return {"epoch": self.epoch, "seq": seq}
        if self.cursor is None:
            return None
        topics = {
            t: ({"seq": s} if e is None else {"epoch": e, "seq": s})
            for t, (e, s) in self.positions.items()
        }
        return {"cursor": self.cursor, "topics": topics}

    def ok(self, reply: dict[str, Any]) -> None:
        assert reply["op"] == "ok", reply
        if reply.get("recovered") is False:
            self.resyncs.append(reply)
        if self.exact and "epoch" in reply:
            self.epoch = reply["epoch"]
            if reply.get("recovered") is not True:
                # Live from here; with recovered true the replay comes first.
                self.positions[self.pattern] = (reply["epoch"], reply["seq"])
        if "cursor" in reply:
            self.cursor = reply["cursor"]
        for topic in reply.get("lost", []):
            self.positions.pop(topic, None)

    def msg(self, event: dict[str, Any]) -> None:
        assert event["op"] == "msg", event
        topic, seq = event["topic"], event["seq"]
        epoch = event.get("epoch")
        known = self.positions.get(topic)
        if known is not None and epoch is None and known[0] is not None:
            epoch = known[0]
        if self.exact and epoch is not None:
            self.epoch = epoch
        self.positions[topic] = (epoch, seq)
        self.seen[topic].append(seq)

    async def subscribe(self, client: Client, id: int = 1) -> dict[str, Any]:
        command: dict[str, Any] = {"op": "sub", "id": id, "topic": self.pattern}
        since = self.since()
        if since is not None:
            command["since"] = since
        reply = await client.request(command)
        self.ok(reply)
        return reply


async def publish_all(url: str, plan: list[str], done: trio.Event | None = None) -> None:
    """Publish one message per entry of *plan* (its topic), data = index."""
    async with connect(url) as client:
        for n, topic in enumerate(plan):
            if n % 20 == 19:
                await client.pub(topic, n, id=n)
            else:
                await client.send({"op": "pub", "topic": topic, "data": n})
        await client.assert_alive()
    if done is not None:
        done.set()


async def test_ok_carries_the_position_and_live_messages_follow_it(start: Start) -> None:
    broker = await start({**HISTORY, **QUEUE})
    async with connect(broker.url) as pub:
        for n in range(5):
            await pub.pub("t.a", n)
        async with connect(broker.url) as sub:
            reply = await sub.request({"op": "sub", "id": 1, "topic": "t.a"})
            assert reply["seq"] == 5 and isinstance(reply["epoch"], str)
            await pub.pub("t.a", "next")
            event = await sub.recv()
            assert event["seq"] == 6 and event["data"] == "next"
            # A topic without a rule: a plain ok.
            assert await sub.request({"op": "sub", "id": 2, "topic": "u.a"}) == {
                "op": "ok",
                "id": 2,
            }
            # A pattern: a cursor.
            reply = await sub.request({"op": "sub", "id": 3, "topic": "t.*"})
            assert set(reply) == {"op", "id", "cursor"}


async def test_an_exact_subscriber_resumes_without_gap_or_duplicate_under_load(
    start: Start,
) -> None:
    """Publishers keep publishing while the subscriber leaves, comes back with
    since, and leaves again: it ends with every seq exactly once, in order."""
    broker = await start({**HISTORY, **QUEUE})
    total = 1500
    rng = random.Random(5)
    tracker = Tracker("t.a")
    done = trio.Event()
    async with connect(broker.url) as first:
        await tracker.subscribe(first)  # before the first publish
    async with trio.open_nursery() as nursery:
        nursery.start_soon(publish_all, broker.url, ["t.a", "t.b"] * (total // 2), done)
        for _ in range(6):
            async with connect(broker.url) as client:
                await tracker.subscribe(client)
                assert not tracker.resyncs
                for _ in range(rng.randint(0, 120)):
                    tracker.msg(await client.recv())
        await done.wait()
        async with connect(broker.url) as client:
            await tracker.subscribe(client)
            while tracker.positions["t.a"][1] < total // 2:
                tracker.msg(await client.recv())
    assert not tracker.resyncs
    assert tracker.seen["t.a"] == list(range(1, total // 2 + 1))


async def test_a_pattern_subscriber_resumes_topics_it_saw_and_new_ones(start: Start) -> None:
    broker = await start({**HISTORY, **QUEUE})
    tracker = Tracker("t.*")
    async with connect(broker.url) as pub:
        await pub.pub("t.a", "a1")
        async with connect(broker.url) as client:
            await tracker.subscribe(client)
            await pub.pub("t.a", "a2")
            await pub.pub("t.b", "b1")
            tracker.msg(await client.recv())
            tracker.msg(await client.recv())
        # Away: t.a and t.b go on, t.c is new, t.d existed before but had
        # nothing while the client was there.
        await pub.pub("t.a", "a3")
        await pub.pub("t.c", "c1")
        await pub.pub("t.b", "b2")
        async with connect(broker.url) as client:
            reply = await tracker.subscribe(client)
            assert reply["recovered"] is True, reply
            got = [await client.recv() for _ in range(3)]
            for event in got:
                tracker.msg(event)
            await client.assert_alive()
    assert [(e["topic"], e["data"]) for e in got] == [("t.a", "a3"), ("t.c", "c1"), ("t.b", "b2")]
    assert got[1]["epoch"]  # t.c's first message says which epoch it starts
    assert tracker.seen == {"t.a": [2, 3], "t.b": [1, 2], "t.c": [1]}


async def test_a_pattern_resume_names_the_topics_it_cannot_replay(
    start_broker: BrokerFactory,
) -> None:
    broker = await start_broker(
        {"history": [{"pattern": "t.>", "size": 2}], **QUEUE}  # two kept per topic
    )
    tracker = Tracker("t.*")
    async with connect(broker.url) as pub:
        async with connect(broker.url) as client:
            await tracker.subscribe(client)
            await pub.pub("t.a", 1)
            await pub.pub("t.b", 1)
            tracker.msg(await client.recv())
            tracker.msg(await client.recv())
        for n in range(2, 6):
            await pub.pub("t.a", n)  # t.a: 3 missed, 2 kept: a gap
        await pub.pub("t.b", 2)  # t.b: 1 missed, kept
        async with connect(broker.url) as client:
            reply = await tracker.subscribe(client)
            assert reply["recovered"] is False and reply["lost"] == ["t.a"], reply
            event = await client.recv()
            assert (event["topic"], event["seq"]) == ("t.b", 2)
            await client.assert_alive()


async def test_since_that_history_cannot_serve_is_not_recovered(
    start_broker: BrokerFactory,
) -> None:
    broker = await start_broker({"history": [{"pattern": "t.>", "size": 3}], **QUEUE})
    async with connect(broker.url) as client:
        for n in range(10):
            await client.pub("t.a", n)
        current = await client.request({"op": "sub", "id": 1, "topic": "t.a"})
        epoch = current["epoch"]
        await client.request({"op": "unsub", "id": 2, "topic": "t.a"})
        # Older than the three kept.
        reply = await client.request(
            {"op": "sub", "id": 3, "topic": "t.a", "since": {"epoch": epoch, "seq": 5}}
        )
        assert reply == {"op": "ok", "id": 3, "epoch": epoch, "seq": 10, "recovered": False}
        await client.assert_alive()  # and no replay
        await client.request({"op": "unsub", "id": 4, "topic": "t.a"})
        # Another epoch (a restarted broker's, say).
        reply = await client.request(
            {"op": "sub", "id": 5, "topic": "t.a", "since": {"epoch": "other", "seq": 9}}
        )
        assert reply["recovered"] is False
        await client.assert_alive()
        await client.request({"op": "unsub", "id": 6, "topic": "t.a"})
        # Within what is kept: recovered, 8..10 replayed.
        reply = await client.request(
            {"op": "sub", "id": 7, "topic": "t.a", "since": {"epoch": epoch, "seq": 7}}
        )
        assert reply["recovered"] is True
        assert [(await client.recv())["seq"] for _ in range(3)] == [8, 9, 10]
        # since on a topic without history: not recovered, plain otherwise.
        reply = await client.request(
            {"op": "sub", "id": 8, "topic": "u.a", "since": {"epoch": epoch, "seq": 1}}
        )
        assert reply == {"op": "ok", "id": 8, "recovered": False}
    assert broker.stats.recoveries == {"recovered": 1, "not_recovered": 3}


async def test_a_restarted_broker_answers_recovered_false(start_broker: BrokerFactory) -> None:
    first = await start_broker({**HISTORY})
    async with connect(first.url) as client:
        await client.pub("t.a", 1)
        reply = await client.request({"op": "sub", "id": 1, "topic": "t.a"})
    second = await start_broker({**HISTORY})  # a new process: a new epoch
    async with connect(second.url) as client:
        again = await client.request(
            {
                "op": "sub",
                "id": 1,
                "topic": "t.a",
                "since": {"epoch": reply["epoch"], "seq": reply["seq"]},
            }
        )
        assert again["recovered"] is False and again["epoch"] != reply["epoch"]
        cursor = await client.request(
            {"op": "sub", "id": 2, "topic": "t.*", "since": {"cursor": "gone:12", "topics": {}}}
        )
        assert cursor["recovered"] is False and cursor["unknown"] is True


async def test_history_n_replays_the_latest(start_broker: BrokerFactory) -> None:
    broker = await start_broker({**HISTORY})
    async with connect(broker.url) as client:
        for n in range(8):
            await client.pub("t.room" if n % 2 else "t.other", n)
        reply = await client.request({"op": "sub", "id": 1, "topic": "t.room", "history": 3})
        assert reply["seq"] == 4
        assert [(await client.recv())["data"] for _ in range(3)] == [3, 5, 7]
        # On a pattern: the latest over its topics, in publish order.
        await client.request({"op": "sub", "id": 2, "topic": "t.*", "history": 3})
        assert [(await client.recv())["data"] for _ in range(3)] == [5, 6, 7]
        await client.assert_alive()


async def test_the_history_command_pages_without_subscribing(
    start_broker: BrokerFactory,
) -> None:
    broker = await start_broker(
        {**HISTORY, "plugins": {"enabled": ["noauth", "acl"]}, "plugin": {"acl": ACL}}
    )
    async with connect(broker.url) as client:
        for n in range(5):
            await client.pub("t.a", n, key=f"k{n}" if n == 2 else None)
        latest = await client.request({"op": "history", "id": 1, "topic": "t.a", "limit": 2})
        assert latest["messages"] == [{"seq": 4, "data": 3}, {"seq": 5, "data": 4}]
        assert latest["more"] is False and latest["seq"] == 5
        epoch = latest["epoch"]
        page = await client.request(
            {
                "op": "history",
                "id": 2,
                "topic": "t.a",
                "since": {"epoch": epoch, "seq": 1},
                "limit": 2,
            }
        )
        assert page["messages"] == [{"seq": 2, "data": 1}, {"seq": 3, "data": 2, "key": "k2"}]
        assert page["more"] is True and page["recovered"] is True
        gone = await client.request(
            {"op": "history", "id": 3, "topic": "t.a", "since": {"epoch": "x", "seq": 1}}
        )
        assert gone["recovered"] is False and gone["messages"] == []
        none = await client.request({"op": "history", "id": 4, "topic": "u.a"})
        assert none["code"] == "bad_request"
        denied = await client.request({"op": "history", "id": 5, "topic": "t.secret"})
        assert denied["code"] == "forbidden"
        bad = await client.request({"op": "history", "id": 6, "topic": "t.a", "limit": 5000})
        assert bad["code"] == "bad_request"
        await client.assert_alive()


ACL = {
    "rules": [
        {"subjects": ["*"], "subscribe": ["t.>", "u.>"], "publish": ["t.>"]},
        {"subjects": ["*"], "deny_subscribe": ["t.secret"]},
    ]
}


async def test_a_snapshot_then_deltas_rebuild_the_same_order_book(start: Start) -> None:
    """A subscriber that joins mid-stream with a snapshot ends with the same
    book as one subscribed from the start."""
    broker = await start({"history": [{"pattern": "book.*", "size": 0, "snapshot": True}], **QUEUE})
    rng = random.Random(3)
    updates = []
    for _ in range(600):
        price = str(rng.randint(90, 110))
        size = rng.choice([0, 0, 1, 2, 5])
        updates.append((price, None if size == 0 else size))

    def apply(book: dict[str, int], event: dict[str, Any]) -> None:
        if event["data"] is None:
            book.pop(event["key"], None)
        else:
            book[event["key"]] = event["data"]

    early_book: dict[str, int] = {}
    late_book: dict[str, int] = {}
    async with connect(broker.url) as early, connect(broker.url) as late:
        await early.request({"op": "sub", "id": 1, "topic": "book.X"})
        half = trio.Event()

        async def publish() -> None:
            async with connect(broker.url) as pub:
                for n, (price, size) in enumerate(updates):
                    await pub.send({"op": "pub", "topic": "book.X", "data": size, "key": price})
                    if n == len(updates) // 2:
                        half.set()
                await pub.assert_alive()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(publish)
            await half.wait()
            reply = await late.request({"op": "sub", "id": 1, "topic": "book.X", "snapshot": True})
        position = reply["seq"]
        last = 0
        while last < len(updates):
            event = await late.recv()
            if event.get("snapshot"):
                assert event["seq"] <= position
            else:
                assert event["seq"] > position
                assert event["seq"] == last + 1 or last <= position
            last = max(last, event["seq"])
            apply(late_book, event)
        for _ in range(len(updates)):
            apply(early_book, await early.recv())
    assert late_book == early_book
    assert late_book  # not trivially empty


# --------------------------------------------------------------------------
# The property: random publishing, random disconnects, concurrent resubscribe
# --------------------------------------------------------------------------

SCHEDULE = st.lists(
    st.tuples(
        st.sampled_from(["t.a", "t.b", "t.c", "t.d"]),  # topic of each publish
        st.integers(min_value=0, max_value=3),  # which subscriber may drop after it
    ),
    min_size=20,
    max_size=120,
)


@settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(schedule=SCHEDULE, engine=st.sampled_from(ENGINES), seed=st.integers(0, 99))
def test_every_subscriber_ends_with_exactly_the_published_sequence(
    schedule: list[tuple[str, int]], engine: str, seed: int
) -> None:
    """Exact and pattern subscribers disconnect at random points and resume
    with since while a publisher goes on: each ends with every topic's seqs
    exactly once and in order, or was told (recovered false) it cannot."""
    trio.run(_property, schedule, engine, seed)


async def _property(schedule: list[tuple[str, int]], engine: str, seed: int) -> None:
    cfg = config_from_dict(
        {"listener": {"host": "127.0.0.1", "port": 0}, "admin": {"enabled": False}}
        | HISTORY
        | QUEUE
    )
    options: dict[str, Any] = {"close_timeout": CLOSE_TIMEOUT}
    if engine == "yielding":
        options["engine"] = lambda d: YieldingEngine(d, seed)
    prefix = unique_prefix()
    if engine == "redis":
        cfg = dataclasses.replace(
            cfg, engine=EngineConfig(type="redis", url=REDIS_URL, prefix=prefix)
        )
    broker = Broker(cfg, plugins=PluginHost.from_config(cfg), **options)
    patterns = ["t.a", "t.*", "t.>", "t.b"]
    trackers = [Tracker(p) for p in patterns]
    drops: list[trio.Event] = [trio.Event() for _ in patterns]
    published: defaultdict[str, int] = defaultdict(int)
    for topic, _ in schedule:
        published[topic] += 1
    rng = random.Random(seed)

    def complete(tracker: Tracker) -> bool:
        return all(
            tracker.positions.get(topic, (None, 0))[1] == count
            for topic, count in published.items()
            if pattern_matches(tracker.pattern, topic)
        )

    async def subscriber(index: int, ready: trio.Event) -> None:
        tracker = trackers[index]
        first = True
        while first or not complete(tracker):
            first = False
            # A queue deep enough that trio-websocket's reader never blocks
            # on messages left unread when the test drops the connection.
            async with connect(broker.url, message_queue_size=100_000) as client:
                await tracker.subscribe(client)
                ready.set()
                while not complete(tracker):
                    tracker.msg(await client.recv())
                    if drops[index].is_set():
                        drops[index] = trio.Event()
                        # The connection drops (TCP closed, no closing
                        # handshake), with whatever the broker still sends.
                        await trio.aclose_forcefully(client.ws._stream)
                        break

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(broker.serve)
            async with trio.open_nursery() as subscribers:
                for index in range(len(patterns)):
                    ready = trio.Event()
                    subscribers.start_soon(subscriber, index, ready)
                    await ready.wait()
                async with connect(broker.url) as pub:
                    for n, (topic, who) in enumerate(schedule):
                        await pub.send({"op": "pub", "topic": topic, "data": n})
                        if rng.random() < 0.15:
                            drops[who].set()
                        if n % 10 == 0:
                            await pub.assert_alive()
                    await pub.assert_alive()
            broker.stop()
    if engine == "redis":
        await delete_prefix(REDIS_URL, prefix)
    for tracker in trackers:
        assert not tracker.resyncs, tracker.resyncs
        for topic, count in published.items():
            if pattern_matches(tracker.pattern, topic):
                assert tracker.seen[topic] == list(range(1, count + 1)), (tracker.pattern, topic)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"since": {"epoch": "e"}}, "since.seq must be a non-negative integer"),
        ({"since": {"seq": 1}}, "since.epoch must be a string"),
        ({"since": 3}, "since must be an object with epoch and seq"),
        ({"history": 0}, "history must be an integer from 1 to 1000"),
        ({"history": 2, "since": {"epoch": "e", "seq": 1}}, "since and history cannot be combined"),
        ({"snapshot": "yes"}, "snapshot must be true or false"),
    ],
)
async def test_bad_sub_options_get_a_clear_error_and_nothing_else_changes(
    start_broker: BrokerFactory, options: dict[str, Any], message: str
) -> None:
    broker = await start_broker({**HISTORY})
    async with connect(broker.url) as client:
        reply = await client.request({"op": "sub", "id": 1, "topic": "t.a", **options})
        assert reply["op"] == "err" and reply["code"] == "bad_request", reply
        assert reply["message"].startswith(message), reply
        # Not subscribed, and the connection works.
        await client.pub("t.a", 1)
        await client.assert_alive()
        bad = await client.request(
            {"op": "sub", "id": 2, "topic": "t.*", "since": {"epoch": "e", "seq": 1}}
        )
        assert bad["message"].startswith("since on a pattern must be an object with cursor")
        await client.assert_alive()
