"""Queue policies with a subscriber that stops reading.

The slow subscriber is a raw TCP socket with a small receive buffer that
subscribes and then never reads again, so the broker's writer for it blocks
once the kernel's buffers are full and its outbox overflows. A second, normal
subscriber reads everything; the publisher is paced by that normal
subscriber only (never more than ``WINDOW`` messages ahead of it), so the
normal subscriber's own queue can never overflow, whatever the kernel
buffers, and any loss it saw would be the slow one's fault.

Messages already written into kernel socket buffers are delivered, not
dropped, and how many fit depends on the kernel: so the accounting checked is
``received + sum(dropped counts) == N``, never exact numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import trio

from broker import Broker
from broker.server.connection import Connection
from tests.conftest import BrokerFactory
from tests.helpers import RawClient, connect, raw_connect, wait_until

N = 2000
PAYLOAD = "x" * 8192
#: Most messages the publisher may be ahead of the normal subscriber; below
#: max_messages (and max_bytes / 8 KiB), so the normal one never drops.
WINDOW = 8
MAX_MESSAGES = 10
MAX_BYTES = 100_000
SMALL_QUEUE: dict[str, Any] = {"max_messages": MAX_MESSAGES, "max_bytes": MAX_BYTES}


@dataclass
class Run:
    """What one backpressure run observed."""

    normal_seqs: list[int] = field(default_factory=list)
    #: (seq, key) of each msg the slow subscriber read, in order, and the
    #: dropped notices as ("dropped", count) in between.
    slow_events: list[tuple[Any, Any]] = field(default_factory=list)
    max_queued_messages: int = 0
    #: The most bytes queued plus in flight (taken for a write the socket
    #: has not accepted): together they are what the queue bound bounds.
    max_held_bytes: int = 0
    max_in_flight: int = 0
    dropped_total: int = 0

    @property
    def slow_seqs(self) -> list[int]:
        return [seq for seq, _ in self.slow_events if seq != "dropped"]

    @property
    def slow_dropped(self) -> int:
        return sum(count for kind, count in self.slow_events if kind == "dropped")

    def after_last_notice(self) -> list[tuple[int, Any]]:
        """The messages that were still queued when the slow client resumed."""
        kinds = [kind for kind, _ in self.slow_events]
        last = len(kinds) - 1 - kinds[::-1].index("dropped")
        return self.slow_events[last + 1 :]


def find_connection(broker: Broker, raw: RawClient) -> Connection:
    port = raw.stream.socket.getsockname()[1]
    (conn,) = (c for c in broker.connections if c.peer[1] == port)
    return conn


async def publish_with_a_slow_subscriber(
    broker: Broker,
    topic: str,
    *,
    keys: list[str] | None = None,
    slow_reads_at_the_end: bool = True,
) -> tuple[Run, Connection, RawClient]:
    """Publish N messages to *topic* with a normal and a slow subscriber.

    Returns the observations, the slow subscriber's Connection object and its
    (closed) raw client.
    """
    run = Run()
    async with (
        raw_connect(broker.url, rcvbuf=4096) as slow,
        connect(broker.url) as normal,
        connect(broker.url) as pub,
    ):
        await slow.send({"op": "sub", "id": "slow", "topic": topic})
        assert await slow.recv() == {"op": "ok", "id": "slow"}
        slow_conn = find_connection(broker, slow)
        await normal.sub(topic)

        progress = trio.lowlevel.ParkingLot()

        def sample() -> None:
            stats = slow_conn.outbox.stats()
            run.max_queued_messages = max(run.max_queued_messages, stats.messages)
            outbox = slow_conn.outbox
            run.max_held_bytes = max(run.max_held_bytes, outbox.queued_bytes + outbox.in_flight)
            run.max_in_flight = max(run.max_in_flight, outbox.in_flight)
            assert stats.bytes == outbox.queued_bytes

        async def read_normal() -> None:
            while len(run.normal_seqs) < N:
                msg = await normal.recv()
                assert msg["op"] == "msg", msg
                run.normal_seqs.append(msg["seq"])
                sample()
                progress.unpark_all()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_normal)
            for i in range(1, N + 1):
                while len(run.normal_seqs) < i - WINDOW:
                    await progress.park()
                command: dict[str, Any] = {"op": "pub", "topic": topic, "data": PAYLOAD}
                if keys:
                    command["key"] = keys[i % len(keys)]
                await pub.send(command)
        sample()
        run.dropped_total = slow_conn.outbox.dropped_total
        await normal.assert_alive()
        await pub.assert_alive()

        if slow_reads_at_the_end:
            # Now read everything that was kept for the slow subscriber.
            with trio.fail_after(10):
                while len(run.slow_seqs) + run.slow_dropped < N:
                    msg = await slow.recv()
                    if msg["op"] == "dropped":
                        assert msg["topic"] == topic
                        assert isinstance(msg["count"], int) and msg["count"] > 0
                        run.slow_events.append(("dropped", msg["count"]))
                    else:
                        assert msg["op"] == "msg" and msg["topic"] == topic, msg
                        assert msg["data"] == PAYLOAD
                        run.slow_events.append((msg["seq"], msg.get("key")))
            # Nothing more was owed: the next frame answers this ping.
            await slow.send({"op": "ping", "id": "end"})
            assert await slow.recv() == {"op": "pong", "id": "end"}
    return run, slow_conn, slow


def check_common(run: Run) -> None:
    # The normal subscriber got every message, in order: never held back.
    assert run.normal_seqs == list(range(1, N + 1))
    # The slow one's memory stayed bounded...
    assert run.max_queued_messages <= MAX_MESSAGES
    assert run.max_held_bytes <= MAX_BYTES
    # (the socket backed up: a write was in flight, and was counted)
    assert run.max_in_flight > 0
    # ...because messages were dropped, and every one is accounted for.
    assert run.dropped_total > 0
    assert run.slow_dropped == run.dropped_total
    assert len(run.slow_seqs) + run.slow_dropped == N
    assert run.slow_seqs == sorted(set(run.slow_seqs)), "duplicated or reordered messages"


async def test_drop_oldest_keeps_the_newest(start_broker: BrokerFactory) -> None:
    broker = await start_broker({"queue": SMALL_QUEUE})
    run, _, _ = await publish_with_a_slow_subscriber(broker, "feed.x")
    check_common(run)
    seqs = run.slow_seqs
    assert seqs[0] == 1  # the first ones were already in the kernel's buffers
    assert seqs[-1] == N  # and the newest were kept
    tail = [seq for seq, _ in run.after_last_notice()]
    assert 0 < len(tail) <= MAX_MESSAGES
    assert tail == list(range(N - len(tail) + 1, N + 1))
    assert broker.hub.overflows > 0
    assert broker.hub.slow_consumers == 0


async def test_drop_newest_keeps_the_oldest(start_broker: BrokerFactory) -> None:
    broker = await start_broker({"queue": {**SMALL_QUEUE, "policy": "drop-newest"}})
    run, _, _ = await publish_with_a_slow_subscriber(broker, "feed.x")
    check_common(run)
    # Everything it got is the oldest messages, without a gap; the rest was
    # dropped on arrival.
    assert run.slow_seqs == list(range(1, len(run.slow_seqs) + 1))
    assert run.slow_seqs[-1] < N
    # What was still queued when it resumed came after the notice (the notice
    # goes first although the messages it reports are newer than these).
    tail = [seq for seq, _ in run.after_last_notice()]
    assert 0 < len(tail) <= MAX_MESSAGES
    assert tail[-1] == run.slow_seqs[-1]


async def test_conflate_keeps_the_latest_per_key(start_broker: BrokerFactory) -> None:
    broker = await start_broker(
        {"queue": {**SMALL_QUEUE, "rules": [{"pattern": "book.>", "policy": "conflate"}]}}
    )
    keys = ["k0", "k1", "k2"]
    run, _, _ = await publish_with_a_slow_subscriber(broker, "book.BTC", keys=keys)
    check_common(run)
    # Never more than one queued message per key.
    assert run.max_queued_messages <= len(keys)
    # What was queued when it resumed: at most one message per key, and the
    # latest of each key is never lost.
    tail = run.after_last_notice()
    tail_keys = [key for _, key in tail]
    assert len(tail_keys) == len(set(tail_keys)) <= len(keys)
    assert {N - 2, N - 1, N} <= set(run.slow_seqs)
    for seq, key in run.slow_events:
        if seq != "dropped":
            assert key == keys[seq % len(keys)]


async def test_conflate_rule_leaves_other_topics_on_the_default(
    start_broker: BrokerFactory,
) -> None:
    broker = await start_broker(
        {"queue": {**SMALL_QUEUE, "rules": [{"pattern": "book.>", "policy": "conflate"}]}}
    )
    assert broker.hub.rule_for("book.BTC").policy == "conflate"
    assert broker.hub.rule_for("trades.BTC").policy == "drop-oldest"
    run, _, _ = await publish_with_a_slow_subscriber(broker, "trades.BTC", keys=["k0", "k1"])
    check_common(run)
    assert run.slow_seqs[-1] == N


async def test_disconnect_policy_closes_the_slow_consumer(start_broker: BrokerFactory) -> None:
    broker = await start_broker({"queue": {"policy": "disconnect", "max_messages": MAX_MESSAGES}})
    run, slow_conn, _ = await publish_with_a_slow_subscriber(
        broker, "feed.x", slow_reads_at_the_end=False
    )
    assert run.normal_seqs == list(range(1, N + 1))
    await wait_until(lambda: slow_conn not in broker.connections)
    assert slow_conn.close_code == 1008
    assert slow_conn.close_reason == "slow consumer: outbound queue full"
    assert run.max_queued_messages <= MAX_MESSAGES
    # == 1 most of the time; see test_slow_consumers_counts_each_slow_consumer_once.
    assert broker.hub.slow_consumers >= 1
    assert slow_conn.outbox.dropped_total == 0  # nothing dropped: cut off instead


async def test_disconnect_policy_slow_client_sees_the_connection_end(
    start_broker: BrokerFactory,
) -> None:
    """Its socket is full, so no close frame can be queued behind the data:
    the broker aborts the TCP connection; the client reads what was in flight
    (the oldest messages, in order) and then EOF."""
    broker = await start_broker({"queue": {"policy": "disconnect", "max_messages": MAX_MESSAGES}})
    async with raw_connect(broker.url, rcvbuf=4096) as slow, connect(broker.url) as pub:
        await slow.send({"op": "sub", "id": 1, "topic": "d"})
        assert await slow.recv() == {"op": "ok", "id": 1}
        slow_conn = find_connection(broker, slow)
        with trio.fail_after(10):
            i = 0
            while slow_conn in broker.connections:
                i += 1
                await pub.pub("d", PAYLOAD, id=i)
        seqs: list[int] = []
        with trio.fail_after(10):
            try:
                while True:
                    msg = await slow.recv()
                    seqs.append(msg["seq"])
            except (EOFError, trio.BrokenResourceError):
                pass
        assert seqs == list(range(1, len(seqs) + 1))
        assert len(seqs) < i
    assert broker.hub.slow_consumers >= 1


async def test_slow_consumers_counts_each_slow_consumer_once(
    start_broker: BrokerFactory,
) -> None:
    broker = await start_broker({"queue": {"policy": "disconnect", "max_messages": MAX_MESSAGES}})
    async with connect(broker.url) as sub:
        await sub.sub("d")
        (conn,) = broker.connections
        # Deliveries with no checkpoint in between, as when several publishers'
        # messages (or a backplane's batch) are routed in one scheduler tick:
        # the connection's writer cannot run, its queue overflows on the 11th.
        for seq in range(1, 21):
            broker.hub.deliver("d", seq, "x", None)
        assert conn.close_code == 1008
        await wait_until(lambda: conn not in broker.connections)
    assert broker.hub.slow_consumers == 1
