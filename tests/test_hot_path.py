"""What the fast write path must never break, over real sockets.

Frames are built once and written with one writev per subscriber per
batch; a publisher's reads are batched before a flush; a backed-up socket
hands over to a writer task. None of that may reorder a subscriber's
messages, lose or corrupt one, or let one subscriber disturb another.
(That frames built once are byte-identical to wsproto's is in test_frames.)
"""

from __future__ import annotations

import json
import socket

import pytest
import trio

from broker import Broker
from broker.io.writer import _tail
from tests.conftest import BrokerFactory
from tests.helpers import JSON, MSGPACK, RawClient, connect, mask_frame, raw_connect, wait_until


def pub_frame(topic: str, n: int) -> bytes:
    body = json.dumps({"op": "pub", "topic": topic, "data": n}, separators=(",", ":"))
    return mask_frame(0x1, body.encode())


async def blast(broker: Broker, frames: list[bytes]) -> None:
    """Send many publishes at once, as one stream of bytes (no acks)."""
    async with raw_connect(broker.url) as publisher:
        await publisher.send_raw(b"".join(frames))
        await publisher.send({"op": "ping", "id": "done"})
        # Replies come in order: the pong means every publish was handled.
        assert await publisher.recv() == {"op": "pong", "id": "done"}


async def collect(client: RawClient, n: int) -> list[dict[str, object]]:
    out: list[dict[str, object]] = []
    while len(out) < n:
        out.append(await client.recv())
    return out


@pytest.mark.parametrize("subprotocol", [JSON, MSGPACK])
async def test_batched_fan_out_keeps_each_subscribers_order(
    start_broker: BrokerFactory, subprotocol: str
) -> None:
    # Queues big enough that nothing is dropped: this is about order.
    broker = await start_broker({"queue": {"max_messages": 10_000, "max_bytes": 10_000_000}})
    topics = ["a.x", "b.y", "c.z"]
    n = 2000  # ~70 KiB of publishes: more than one read, batched before a flush
    subscribers = [await RawClient.open(broker.url, subprotocol) for _ in range(5)]
    try:
        for i, sub in enumerate(subscribers):
            await sub.send({"op": "sub", "id": i, "topic": ">"})
            assert (await sub.recv())["op"] == "ok"
        frames = [pub_frame(topics[k % 3], k) for k in range(n)]
        async with trio.open_nursery() as nursery:
            results: list[list[dict[str, object]]] = [[] for _ in subscribers]

            async def read(i: int) -> None:
                results[i] = await collect(subscribers[i], n)

            for i in range(len(subscribers)):
                nursery.start_soon(read, i)
            await blast(broker, frames)
        for got in results:
            # One publisher: every subscriber sees exactly its publish order...
            assert [m["data"] for m in got] == list(range(n))
            # ...and each topic's seq runs 1, 2, 3, ... without a gap.
            for topic in topics:
                seqs = [m["seq"] for m in got if m["topic"] == topic]
                assert seqs == list(range(1, len(seqs) + 1))
    finally:
        for sub in subscribers:
            await sub.aclose()


async def test_a_subscriber_that_vanishes_mid_batch_does_not_affect_the_others(
    start_broker: BrokerFactory,
) -> None:
    broker = await start_broker({"queue": {"max_messages": 10_000, "max_bytes": 10_000_000}})
    n = 2000
    async with connect(broker.url) as steady, connect(broker.url) as also_steady:
        await steady.sub("t")
        await also_steady.sub("t")
        doomed = await RawClient.open(broker.url, rcvbuf=4096)
        await doomed.send({"op": "sub", "id": 1, "topic": "t"})
        assert (await doomed.recv())["op"] == "ok"
        # Abort with a TCP reset while frames for it are being written.
        doomed.stream.socket.setsockopt(
            socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
        )
        frames = [pub_frame("t", k) for k in range(n)]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(blast, broker, frames)
            await wait_until(lambda: broker.hub.published > n // 4)
            await trio.aclose_forcefully(doomed.stream)
        for client in (steady, also_steady):
            got = [(await client.recv())["data"] for _ in range(n)]
            assert got == list(range(n))
    await wait_until(lambda: not broker.connections)


async def test_partial_writes_resume_without_corruption(start_broker: BrokerFactory) -> None:
    """A subscriber whose socket fills up part-way through a frame gets the
    rest, intact and in order, once it reads again (direct write -> writer)."""
    broker = await start_broker({"queue": {"max_messages": 100_000, "max_bytes": 50_000_000}})
    n = 400
    slow = await RawClient.open(broker.url, rcvbuf=4096)
    try:
        await slow.send({"op": "sub", "id": 1, "topic": "big"})
        assert (await slow.recv())["op"] == "ok"
        payload = "y" * 9000  # frames that never fit a 4 KiB window whole
        body = [
            mask_frame(
                0x1, json.dumps({"op": "pub", "topic": "big", "data": [k, payload]}).encode()
            )
            for k in range(n)
        ]
        await blast(broker, body)
        got = [(await slow.recv())["data"] for _ in range(n)]
        assert [g[0] for g in got] == list(range(n))
        assert all(g[1] == payload for g in got)
        assert broker.hub.overflows == 0
    finally:
        await slow.aclose()


@pytest.mark.parametrize("written", range(0, 12))
def test_the_tail_of_a_partial_write_is_exactly_what_was_not_written(written: int) -> None:
    parts = [b"abc", b"", b"defg", b"hijk"]
    assert _tail(parts, written) == b"".join(parts)[written:]
