"""The per-subscriber queue and its policies, without sockets."""

from __future__ import annotations

import tracemalloc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.core import outbox
from broker.core.outbox import OTHER_TOPICS, Outbox, Policy, PushResult, QueueRule


def rule(policy: Policy, max_messages: int = 3, max_bytes: int = 10_000) -> QueueRule:
    return QueueRule(str(policy), policy, max_messages, max_bytes)


def msg(n: int, size: int = 10) -> bytes:
    return f"{n:0{size}d}".encode()


def drain(box: Outbox, dropped: dict[str, int]) -> list[bytes]:
    """Read everything, adding the drop notices to *dropped*."""
    out: list[bytes] = []
    while box.pending():
        for topic, count in box.take_drops().items():
            dropped[topic] = dropped.get(topic, 0) + count
        out += box.take(1 << 30)
    return out


def test_fifo_under_limits() -> None:
    box = Outbox(max_messages=10, max_bytes=1000)
    r = rule(Policy.DROP_OLDEST, 10)
    for i in range(5):
        assert box.push(msg(i), "t", r) is PushResult.QUEUED
    assert len(box) == 5
    assert box.queued_bytes == 50
    assert box.take(1 << 20) == [msg(i) for i in range(5)]
    assert not box.pending()
    assert box.queued_bytes == 0


def test_take_respects_batch_bytes_but_always_returns_one() -> None:
    box = Outbox(max_messages=10, max_bytes=1000)
    r = rule(Policy.DROP_OLDEST, 10)
    for i in range(4):
        box.push(msg(i), "t", r)
    assert box.take(15) == [msg(0), msg(1)]
    assert box.take(1) == [msg(2)]
    assert box.take(1) == [msg(3)]


def test_drop_oldest_keeps_newest_and_counts() -> None:
    box = Outbox(max_messages=100, max_bytes=10_000)
    r = rule(Policy.DROP_OLDEST, 3)
    results = [box.push(msg(i), "t", r) for i in range(5)]
    assert results == [PushResult.QUEUED] * 3 + [PushResult.DROPPED] * 2
    assert box.take_drops() == {"t": 2}
    assert box.take(1 << 20) == [msg(2), msg(3), msg(4)]
    assert box.dropped_total == 2


def test_drop_newest_keeps_oldest() -> None:
    box = Outbox(max_messages=100, max_bytes=10_000)
    r = rule(Policy.DROP_NEWEST, 3)
    for i in range(5):
        box.push(msg(i), "t", r)
    assert box.take_drops() == {"t": 2}
    assert box.take(1 << 20) == [msg(0), msg(1), msg(2)]


def test_disconnect_policy_reports_and_keeps_queue() -> None:
    box = Outbox(max_messages=100, max_bytes=10_000)
    r = rule(Policy.DISCONNECT, 2)
    assert box.push(msg(0), "t", r) is PushResult.QUEUED
    assert box.push(msg(1), "t", r) is PushResult.QUEUED
    assert box.push(msg(2), "t", r) is PushResult.DISCONNECT
    assert len(box) == 2
    assert box.dropped_total == 0


def test_conflate_keeps_newest_per_topic_and_key_in_publish_order() -> None:
    box = Outbox(max_messages=100, max_bytes=10_000)
    r = rule(Policy.CONFLATE, 10)
    box.push(b"a1", "book.x", r, key="bid")
    box.push(b"b1", "book.x", r, key="ask")
    assert box.push(b"a2", "book.x", r, key="bid") is PushResult.DROPPED
    box.push(b"c1", "book.y", r, key="bid")
    # The replacement goes to the back, so seq order within a topic holds.
    assert box.take_drops() == {"book.x": 1}
    assert box.take(1 << 20) == [b"b1", b"a2", b"c1"]


def test_conflate_without_key_is_per_topic() -> None:
    box = Outbox(max_messages=100, max_bytes=10_000)
    r = rule(Policy.CONFLATE, 10)
    for i in range(50):
        box.push(msg(i), "ticker.btc", r)
    assert box.take(1 << 20) == [msg(49)]
    assert box.take_drops() == {"ticker.btc": 49}


def test_conflate_full_of_distinct_keys_drops_oldest() -> None:
    box = Outbox(max_messages=100, max_bytes=10_000)
    r = rule(Policy.CONFLATE, 2)
    for i in range(4):
        box.push(msg(i), "book.x", r, key=str(i))
    assert box.take(1 << 20) == [msg(2), msg(3)]


def test_byte_limit_counts_too() -> None:
    box = Outbox(max_messages=100, max_bytes=25)
    r = rule(Policy.DROP_OLDEST, 100, 10_000)
    for i in range(4):
        box.push(msg(i), "t", r)
    assert box.queued_bytes <= 25
    assert box.take(1 << 20) == [msg(2), msg(3)]


def test_message_larger_than_bound_is_dropped() -> None:
    box = Outbox(max_messages=100, max_bytes=25)
    r = rule(Policy.DROP_OLDEST, 100)
    box.push(msg(0), "t", r)
    assert box.push(b"x" * 26, "big", r) is PushResult.DROPPED
    assert box.take_drops() == {"big": 1}
    assert box.take(1 << 20) == [msg(0)]


def test_bytes_in_flight_count_against_the_bound() -> None:
    # What the connection took for a write the socket has not accepted yet
    # is memory as much as the queue is: together they stay within max_bytes.
    box = Outbox(max_messages=100, max_bytes=40)
    r = rule(Policy.DROP_OLDEST, 100)
    for i in range(4):
        assert box.push(msg(i), "t", r) is PushResult.QUEUED
    assert box.take(20) == [msg(0), msg(1)]
    box.in_flight = 15  # the unwritten tail of those two
    assert box.push(msg(4), "t", r) is PushResult.DROPPED  # 20 + 15 + 10 > 40
    assert box.queued_bytes + box.in_flight <= 40
    box.in_flight = 0  # written
    assert box.push(msg(5), "t", r) is PushResult.QUEUED
    assert box.take_drops() == {"t": 1}
    assert box.take(1 << 20) == [msg(3), msg(4), msg(5)]


@pytest.mark.parametrize(("policy", "topic"), [(Policy.DROP_OLDEST, "b"), (Policy.CONFLATE, "a")])
def test_no_room_beside_the_write_in_flight_drops_without_evicting(
    policy: Policy, topic: str
) -> None:
    box = Outbox(max_messages=100, max_bytes=40)
    r = rule(policy, 100)
    box.push(msg(0), "a", r)
    box.in_flight = 35
    # Even an empty queue would not make room for it: nothing is evicted,
    # not even the older message of the same topic it would conflate.
    assert box.push(msg(1), topic, r) is PushResult.DROPPED
    assert box.take_drops() == {topic: 1}
    assert box.take(1 << 20) == [msg(0)]


def test_no_room_beside_the_write_in_flight_disconnects_under_that_policy() -> None:
    box = Outbox(max_messages=100, max_bytes=40)
    r = rule(Policy.DISCONNECT, 100)
    box.push(msg(0), "t", r)
    box.in_flight = 35
    assert box.push(msg(1), "t", r) is PushResult.DISCONNECT
    box.in_flight = 25
    assert box.push(msg(1), "t", r) is PushResult.DISCONNECT  # 10 + 25 + 10 > 40
    box.in_flight = 0
    assert box.push(msg(1), "t", r) is PushResult.QUEUED


def test_per_rule_limits_do_not_touch_other_rules() -> None:
    box = Outbox(max_messages=100, max_bytes=10_000)
    book = QueueRule("book.>", Policy.DROP_OLDEST, 2, 10_000)
    trades = QueueRule("default", Policy.DROP_OLDEST, 100, 10_000)
    box.push(b"t0", "trades.x", trades)
    for i in range(5):
        box.push(msg(i), "book.x", book)
    box.push(b"t1", "trades.x", trades)
    assert box.take(1 << 20) == [b"t0", msg(3), msg(4), b"t1"]


def test_replies_share_order_and_are_never_dropped() -> None:
    box = Outbox(max_messages=2, max_bytes=10_000, max_replies=2)
    r = rule(Policy.DROP_OLDEST, 2)
    box.push(msg(0), "t", r)
    assert box.push_reply(b"ok1")
    box.push(msg(1), "t", r)
    box.push(msg(2), "t", r)  # drops msg(0), not the reply
    assert box.push_reply(b"ok2")
    assert not box.push_reply(b"ok3")  # max_replies reached
    assert box.take(1 << 20) == [b"ok1", msg(1), msg(2), b"ok2"]
    assert box.push_reply(b"ok3")


def test_drop_topics_are_bounded() -> None:
    box = Outbox(max_messages=1, max_bytes=10_000, max_drop_topics=2)
    r = rule(Policy.DROP_NEWEST, 1)
    box.push(b"x", "keep", r)
    for topic in ("a", "b", "c", "d", "a"):
        box.push(b"y", topic, r)
    assert box.take_drops() == {"a": 2, "b": 1, OTHER_TOPICS: 2}


def test_tombstones_are_compacted_for_a_subscriber_that_never_reads() -> None:
    box = Outbox(max_messages=10, max_bytes=1 << 20)
    r = rule(Policy.CONFLATE, 10)
    for i in range(10_000):
        box.push(msg(i), "ticker", r, key=str(i % 3))
    assert len(box._frames) < 200  # bounded, not 10,000 tombstones
    assert sorted(box.take(1 << 20)) == sorted([msg(9997), msg(9998), msg(9999)])


def held_by_outbox_code(before: tracemalloc.Snapshot, after: tracemalloc.Snapshot) -> int:
    """Bytes allocated by outbox.py between the snapshots and still held."""
    return sum(
        stat.size_diff
        for stat in after.compare_to(before, "filename")
        if stat.traceback[0].filename == outbox.__file__
    )


def test_a_new_or_shed_queue_holds_nothing_but_itself() -> None:
    """Most connections are idle subscribers with nothing queued, and what
    each holds bounds how many a broker can keep: an outbox holds no list,
    dict or rule state of its own when new, nor once shed (as a dormant
    connection's is) after batches of messages and replies, taken whole or
    in parts."""
    r = rule(Policy.DROP_OLDEST, 10)
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        boxes = [Outbox(max_messages=10, max_bytes=1000) for _ in range(1000)]
        held = held_by_outbox_code(before, tracemalloc.take_snapshot())
        assert held / len(boxes) < 8, f"{held / len(boxes):.0f} B per new outbox"
        for box in boxes:
            assert box.push_reply(b"ok")
            box.push(msg(0), "t", r)
            box.push(msg(1), "t", r)
            assert box.take(1 << 20) == [b"ok", msg(0), msg(1)]
            box.push(msg(2), "t", r)
            box.push(msg(3), "t", r)
            assert box.take(1) == [msg(2)]
            assert box.take(1) == [msg(3)]
            assert not box.pending() and box.take(1 << 20) == []
            box.shed()
        held = held_by_outbox_code(before, tracemalloc.take_snapshot())
    finally:
        tracemalloc.stop()
    # (< 8 B, not 0: lists freed to CPython's free list still count as
    # allocated where they were made, up to 80 of them)
    assert held / len(boxes) < 8, f"{held / len(boxes):.0f} B per shed outbox"
    assert outbox._NO_LIST == []  # the shared empty list stays empty
    for box in boxes:  # and they work as before
        box.push(msg(4), "t", r)
        assert box.take(1 << 20) == [msg(4)]


def test_shed_keeps_what_is_queued() -> None:
    box = Outbox(max_messages=10, max_bytes=1000)
    r = rule(Policy.DROP_OLDEST, 2)
    for i in range(3):
        box.push(msg(i), "t", r)
    box.shed()  # a message queued: nothing is dropped
    box.push(msg(3), "t", r)
    assert box.take_drops() == {"t": 2}
    assert box.take(1 << 20) == [msg(2), msg(3)]
    assert box.push_reply(b"ok")
    box.shed()
    assert box.take(1 << 20) == [b"ok"]


def test_a_queue_shed_between_rules_keeps_each_rules_limits() -> None:
    """A shed queue forgets its rule: the next push may bring another,
    whose limits and policy then apply (and the first one's again after)."""
    box = Outbox(max_messages=100, max_bytes=10_000)
    a = rule(Policy.DROP_NEWEST, max_messages=2)
    b = QueueRule("b", Policy.DROP_OLDEST, 1, 10_000)
    for i in range(3):
        box.push(b"a%d" % i, "ta", a)
    assert box.take(1 << 20) == [b"a0", b"a1"]
    box.shed()
    for i in range(3):
        box.push(b"b%d" % i, "tb", b)
    assert box.take(1 << 20) == [b"b2"]
    box.shed()
    for i in range(3):
        box.push(b"a%d" % i, "ta", a)
    assert box.take_drops() == {"ta": 2, "tb": 2}
    assert box.take(1 << 20) == [b"a0", b"a1"]
    assert box.dropped_total == 4


def test_invalid_limits() -> None:
    with pytest.raises(ValueError, match="positive"):
        Outbox(max_messages=0, max_bytes=10)


@settings(max_examples=200, deadline=None)
@given(
    policy=st.sampled_from([Policy.DROP_OLDEST, Policy.DROP_NEWEST, Policy.CONFLATE]),
    ops=st.lists(
        st.one_of(
            st.tuples(st.just("push"), st.sampled_from(["a", "b", "c"]), st.integers(1, 40)),
            st.tuples(st.just("take"), st.just(""), st.integers(1, 100)),
            st.tuples(st.just("in_flight"), st.just(""), st.integers(0, 150)),
            st.tuples(st.just("shed"), st.just(""), st.just(0)),
        ),
        max_size=200,
    ),
)
def test_accounting_property(policy: Policy, ops: list[tuple[str, str, int]]) -> None:
    """Whatever happens: bounds hold, nothing is lost silently, order is kept."""
    box = Outbox(max_messages=5, max_bytes=120)
    r = rule(policy, 4, 100)
    pushed: dict[str, int] = {}
    received: list[bytes] = []
    dropped: dict[str, int] = {}
    n = 0
    for op, topic, size in ops:
        if op == "push":
            n += 1
            before = box.queued_bytes
            box.push(f"{topic}{n:06d}".encode().ljust(size, b"."), topic, r)
            pushed[topic] = pushed.get(topic, 0) + 1
            # A push never takes the queue past what the write in flight
            # leaves of the bound.
            assert box.queued_bytes <= before or box.queued_bytes + box.in_flight <= 120
        elif op == "in_flight":
            box.in_flight = size
        elif op == "shed":
            box.shed()
        else:
            for t, c in box.take_drops().items():
                dropped[t] = dropped.get(t, 0) + c
            received += box.take(size)
        stats = box.stats()
        assert stats.messages <= 4
        assert stats.bytes <= 100
    received += drain(box, dropped)
    for topic, count in pushed.items():
        got = [m for m in received if m.startswith(topic.encode())]
        assert len(got) + dropped.get(topic, 0) == count
        seqs = [int(m[1:7]) for m in got]
        assert seqs == sorted(seqs)  # a subscriber never sees a topic go backwards
    assert outbox._NO_LIST == []


def test_discard_frees_everything_and_keeps_the_drop_total() -> None:
    box = Outbox(max_messages=2, max_bytes=10_000)
    r = rule(Policy.DROP_OLDEST, max_messages=2)
    for i in range(5):
        box.push(b"x" * 1000, f"t{i % 2}", r, key=None)
    assert box.push_reply(b"ok")
    dropped = box.dropped_total
    assert dropped == 3 and len(box) == 3
    box.in_flight = 500
    box.discard()
    assert (len(box), box.queued_bytes, box.in_flight, box.pending()) == (0, 0, 0, False)
    assert box.take(1 << 20) == []
    assert box.dropped_total == dropped


def test_drop_oldest_drops_its_own_rules_oldest_after_a_second_rule_appears() -> None:
    """Until a second rule is used, a rule's oldest message is found by a
    scan; from then on by its positions: both must pick the same message."""
    box = Outbox(max_messages=100, max_bytes=10_000)
    a = rule(Policy.DROP_OLDEST, max_messages=2)
    b = QueueRule("b", Policy.DROP_OLDEST, 2, 10_000)
    box.push(b"a1", "ta", a)
    assert box.push_reply(b"ok1")
    box.push(b"a2", "ta", a)
    box.push(b"b1", "tb", b)  # the second rule: positions from here on
    box.push(b"a3", "ta", a)  # drops a1, not the reply nor b1
    box.push(b"b2", "tb", b)
    box.push(b"b3", "tb", b)  # drops b1
    assert box.take_drops() == {"ta": 1, "tb": 1}
    assert box.take(1 << 20) == [b"ok1", b"a2", b"a3", b"b2", b"b3"]


@settings(max_examples=300, deadline=None)
@given(
    ops=st.lists(
        st.one_of(
            st.tuples(st.just("push"), st.sampled_from(["a", "b", "c"]), st.integers(1, 40)),
            st.tuples(st.just("reply"), st.just(""), st.integers(1, 10)),
            st.tuples(st.just("take"), st.just(""), st.integers(1, 100)),
            st.tuples(st.just("in_flight"), st.just(""), st.integers(0, 150)),
            st.tuples(st.just("shed"), st.just(""), st.just(0)),
        ),
        max_size=200,
    ),
    policies=st.tuples(
        st.sampled_from([Policy.DROP_OLDEST, Policy.DROP_NEWEST, Policy.CONFLATE]),
        st.sampled_from([Policy.DROP_OLDEST, Policy.DROP_NEWEST, Policy.CONFLATE]),
    ),
)
def test_accounting_property_with_two_rules_and_replies(
    ops: list[tuple[str, str, int]], policies: tuple[Policy, Policy]
) -> None:
    """Topic "c" under a second rule (which may appear late), replies in
    between: each rule's bounds hold, replies are never dropped and keep
    their order, nothing is lost silently, no topic goes backwards."""
    box = Outbox(max_messages=6, max_bytes=150)
    rules = {"a": rule(policies[0], 3, 90), "b": rule(policies[0], 3, 90)}
    rules["b"] = rules["a"]  # "a" and "b" share one rule
    rules["c"] = QueueRule("c", policies[1], 2, 60)
    pushed: dict[str, int] = {}
    replies: list[bytes] = []
    received: list[bytes] = []
    dropped: dict[str, int] = {}
    for n, (op, topic, size) in enumerate(ops):
        if op == "push":
            box.push(f"{topic}{n:06d}".encode().ljust(size, b"."), topic, rules[topic])
            pushed[topic] = pushed.get(topic, 0) + 1
        elif op == "reply":
            frame = f"R{n:06d}".encode()
            if box.push_reply(frame):
                replies.append(frame)
        elif op == "in_flight":
            box.in_flight = size
        elif op == "shed":
            box.shed()
        else:
            for t, c in box.take_drops().items():
                dropped[t] = dropped.get(t, 0) + c
            received += box.take(size)
        assert box.stats().messages <= 6 and box.stats().bytes <= 150
    received += drain(box, dropped)
    assert [m for m in received if m.startswith(b"R")] == replies
    for topic, count in pushed.items():
        got = [m for m in received if m.startswith(topic.encode())]
        assert len(got) + dropped.get(topic, 0) == count
        seqs = [int(m[1:7]) for m in got]
        assert seqs == sorted(seqs)
    assert box.stats().messages == 0 and box.queued_bytes == 0
    assert outbox._NO_LIST == []
