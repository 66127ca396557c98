"""Fan-out without sockets: encode once, frame once, never await."""

from __future__ import annotations

import json
from typing import Any

import msgpack
import pytest

from broker import config_from_dict
from broker.core.hub import Hub
from broker.core.outbox import Outbox
from broker.core.protocol import Encoding
from broker.engine import MemoryEngine


class FakeSubscriber:
    def __init__(self, encoding: Encoding = Encoding.JSON, max_messages: int = 100) -> None:
        self.encoding = encoding
        self.outbox = Outbox(max_messages=max_messages, max_bytes=1 << 20)
        self.dirty = False
        self.flushes = 0
        self.slow = False

    def flush(self) -> None:
        self.flushes += 1

    def slow_consumer(self) -> None:
        self.slow = True


def payloads(sub: FakeSubscriber) -> list[Any]:
    out = []
    for frame in sub.outbox.take(1 << 30):
        body = frame[2:]  # small frames: 2-byte header
        out.append(json.loads(body) if sub.encoding is Encoding.JSON else msgpack.unpackb(body))
    return out


def make_hub(**queue: Any) -> Hub:
    return Hub(config_from_dict({"queue": queue}).queue)


def test_deliver_once_per_connection_even_with_overlapping_patterns() -> None:
    hub = make_hub()
    sub = FakeSubscriber()
    for pattern in ("a.*", "a.>", "a.b"):
        hub.subscribe(pattern, sub)
    assert hub.deliver("a.b", 1, {"x": 1}, None) == 1
    assert payloads(sub) == [{"op": "msg", "topic": "a.b", "seq": 1, "data": {"x": 1}}]
    assert sub.dirty
    assert hub.dirty == [sub]


def test_frames_are_shared_between_subscribers_of_an_encoding() -> None:
    hub = make_hub()
    subs = [FakeSubscriber(Encoding.JSON) for _ in range(3)]
    subs += [FakeSubscriber(Encoding.MSGPACK) for _ in range(3)]
    for s in subs:
        hub.subscribe("t", s)
    hub.deliver("t", 7, [1, 2], "k")
    frames = [s.outbox.take(1 << 20)[0] for s in subs]
    assert frames[0] is frames[1] is frames[2]  # the very same bytes object
    assert frames[3] is frames[4] is frames[5]
    assert frames[0] is not frames[3]
    assert msgpack.unpackb(frames[3][2:]) == {
        "op": "msg",
        "topic": "t",
        "seq": 7,
        "data": [1, 2],
        "key": "k",
    }


def test_no_subscribers_means_no_encoding() -> None:
    hub = make_hub()
    assert hub.deliver("nobody.here", 1, object(), None) == 0  # not JSON-able: never encoded


def test_unsubscribe_stops_delivery() -> None:
    hub = make_hub()
    sub = FakeSubscriber()
    hub.subscribe("t.*", sub)
    hub.unsubscribe("t.*", sub)
    assert hub.deliver("t.x", 1, 1, None) == 0


def test_queue_rules_first_match_wins_and_default_applies() -> None:
    hub = make_hub(
        rules=[
            {"pattern": "book.>", "policy": "conflate"},
            {"pattern": "book.btc", "policy": "drop-newest"},
            {"pattern": "orders.>", "policy": "disconnect", "max_messages": 5},
        ]
    )
    assert hub.rule_for("book.btc").policy == "conflate"
    assert hub.rule_for("orders.1").max_messages == 5
    assert hub.rule_for("trades.x").name == "default"
    assert hub.rule_for("trades.x").policy == "drop-oldest"


def test_disconnect_rule_calls_slow_consumer_and_others_still_get_it() -> None:
    hub = make_hub(policy="disconnect", max_messages=2)
    slow, fast = FakeSubscriber(), FakeSubscriber()
    hub.subscribe("t", slow)
    hub.subscribe("t", fast)
    for seq in range(1, 4):
        hub.deliver("t", seq, seq, None)
        fast.outbox.take(1 << 20)
    assert slow.slow
    assert not fast.slow
    assert hub.slow_consumers == 1


@pytest.mark.parametrize("n", [1, 3])
async def test_memory_engine_numbers_per_topic(n: int) -> None:
    hub = make_hub()
    plane = MemoryEngine(hub)
    seqs = [await plane.publish("a", i, None) for i in range(n)]
    assert seqs == list(range(1, n + 1))
    assert await plane.publish("b", 0, None) == 1


def test_flush_writes_each_dirty_subscriber_once() -> None:
    hub = make_hub()
    a, b = FakeSubscriber(), FakeSubscriber()
    hub.subscribe("t", a)
    hub.subscribe("t", b)
    hub.deliver("t", 1, 1, None)
    hub.deliver("t", 2, 2, None)
    assert hub.dirty == [a, b]  # once each, however many frames
    assert hub.pending == 4
    hub.flush()
    assert (a.flushes, b.flushes) == (1, 1)
    assert not a.dirty
    assert hub.pending == 0
    assert hub.dirty == []


@pytest.mark.parametrize("encoding", list(Encoding))
def test_a_lone_subscriber_gets_the_same_as_one_of_many(encoding: Encoding) -> None:
    """The one-subscriber path of deliver (per-user topics) queues the same
    frame, counts the same and applies the same policies as the loop."""
    hub = make_hub(max_messages=2, policy="drop-newest")
    alone, crowd = FakeSubscriber(encoding), FakeSubscriber(encoding)
    other = FakeSubscriber(encoding)
    hub.subscribe("solo", alone)
    hub.subscribe("many", crowd)
    hub.subscribe("many", other)
    for seq in (1, 2, 3):
        hub.deliver("solo", seq, {"n": seq}, "k")
        hub.deliver("many", seq, {"n": seq}, "k")
    got = [{**p, "topic": "x"} for p in payloads(alone)]
    assert got == [{**p, "topic": "x"} for p in payloads(crowd)]
    assert len(got) == 2
    assert alone.outbox.dropped_total == crowd.outbox.dropped_total == 1
    assert hub.overflows == 3  # solo once, many twice
    assert hub.dirty.count(alone) == 1
    assert (hub.delivered, hub.pending) == (9, 9)


def test_a_lone_subscriber_over_a_disconnect_rule_is_closed() -> None:
    hub = make_hub(max_messages=1, policy="disconnect")
    sub = FakeSubscriber()
    hub.subscribe("solo", sub)
    hub.deliver("solo", 1, "a", None)
    hub.deliver("solo", 2, "b", None)
    assert sub.slow
    assert hub.slow_consumers == 1
