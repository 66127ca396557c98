"""The wire protocol against a real broker, as a foreign client sees it.

Every bad input gets a defined answer: an ``err`` (and the connection stays
usable, proven by a ping -> pong after it) or a close with a specific code.
Then routing across connections and encodings.
"""

from __future__ import annotations

import json
from typing import Any

import msgpack
import pytest
import trio
import trio_websocket
from wsproto.events import CloseConnection, TextMessage

from broker import Broker
from tests.conftest import BrokerFactory
from tests.helpers import (
    JSON,
    MSGPACK,
    Client,
    connect,
    mask_frame,
    raw_connect,
    rejection,
    wait_until,
)

# -- answers to bad input: err, connection stays up --------------------------


def assert_err(reply: dict[str, Any], code: str, id: Any = None, contains: str = "") -> None:
    assert reply["op"] == "err", reply
    assert reply["code"] == code, reply
    if id is None:
        assert "id" not in reply, reply
    else:
        assert reply["id"] == id, reply
    assert isinstance(reply["message"], str) and reply["message"], reply
    assert contains in reply["message"], reply


@pytest.fixture
async def broker(start_broker: BrokerFactory) -> Broker:
    return await start_broker()


async def test_malformed_json_is_bad_request_without_id(broker: Broker) -> None:
    async with connect(broker.url) as c:
        for text in ['{"op": "ping", "id": 1', "not json", "", '{"op":"ping"}}', "NaN"]:
            await c.ws.send_message(text)
            assert_err(await c.recv(), "bad_request", contains="malformed JSON")
            await c.assert_alive()


@pytest.mark.parametrize(
    "text", ["[]", '[{"op": "ping", "id": 1}]', "42", '"ping"', "null", "true"]
)
async def test_non_object_frame_is_bad_request(broker: Broker, text: str) -> None:
    async with connect(broker.url) as c:
        await c.ws.send_message(text)
        assert_err(await c.recv(), "bad_request", contains="object")
        await c.assert_alive()


async def test_unknown_op_echoes_id(broker: Broker) -> None:
    async with connect(broker.url) as c:
        assert_err(await c.request({"op": "frobnicate", "id": 7}), "bad_request", 7, "unknown op")
        assert_err(await c.request({"op": "PING", "id": "x"}), "bad_request", "x", "unknown op")
        # An op of the wrong type.
        assert_err(await c.request({"op": 1, "id": 8}), "bad_request", 8)
        await c.assert_alive()


async def test_missing_op(broker: Broker) -> None:
    async with connect(broker.url) as c:
        assert_err(await c.request({"id": 3, "topic": "a"}), "bad_request", 3, "'op'")
        assert_err(await c.request({}), "bad_request", contains="'op'")
        await c.assert_alive()


@pytest.mark.parametrize(
    ("command", "contains"),
    [
        ({"op": "sub", "id": 1}, "topic"),
        ({"op": "unsub", "id": 1}, "topic"),
        ({"op": "pub", "id": 1, "data": 1}, "topic"),
        ({"op": "sub", "id": 1, "topic": 5}, "string"),
        ({"op": "pub", "id": 1, "topic": 5, "data": 1}, "string"),
        ({"op": "pub", "id": 1, "topic": ["a"], "data": 1}, "string"),
        ({"op": "pub", "id": 1, "topic": "a.b"}, "'data'"),
        ({"op": "pub", "id": 1, "topic": "a.b", "data": 1, "key": 5}, "key"),
        ({"op": "pub", "id": 1, "topic": "a.b", "data": 1, "key": ""}, "key"),
        ({"op": "pub", "id": 1, "topic": "a.b", "data": 1, "key": "k" * 257}, "key"),
    ],
)
async def test_missing_or_wrongly_typed_fields(
    broker: Broker, command: dict[str, Any], contains: str
) -> None:
    async with connect(broker.url) as c:
        assert_err(await c.request(command), "bad_request", 1, contains)
        await c.assert_alive()


@pytest.mark.parametrize("bad_id", [True, False, 1.5, 1.0, -1, 2**53, "", "x" * 65, [1], {"a": 1}])
async def test_invalid_id_is_bad_request_without_id(broker: Broker, bad_id: Any) -> None:
    async with connect(broker.url) as c:
        reply = await c.request({"op": "ping", "id": bad_id})
        assert_err(reply, "bad_request", contains="id must be")
        await c.assert_alive()


async def test_null_id_means_no_id(broker: Broker) -> None:
    async with connect(broker.url) as c:
        assert await c.request({"op": "ping", "id": None}) == {"op": "pong"}
        assert await c.request({"op": "ping"}) == {"op": "pong"}


@pytest.mark.parametrize(
    ("topic", "contains"),
    [
        ("a b", "token"),
        ("a/b", "token"),
        ("ä", "token"),
        ("", "empty"),
        ("a" * 257, "longer than 256"),
        ("a..b", "token"),
        (".a", "token"),
        ("a.", "token"),
        (".".join("a" * 17), "more than 16 tokens"),
    ],
)
@pytest.mark.parametrize("op", ["pub", "sub"])
async def test_invalid_topic(broker: Broker, topic: str, contains: str, op: str) -> None:
    async with connect(broker.url) as c:
        reply = await c.request({"op": op, "id": 2, "topic": topic, "data": None})
        assert_err(reply, "bad_request", 2, contains)
        await c.assert_alive()
    assert broker.hub.router.pattern_count == 0


@pytest.mark.parametrize("topic", ["a.*", "a.>", "*", ">", "a.*.b"])
async def test_wildcard_in_pub(broker: Broker, topic: str) -> None:
    async with connect(broker.url) as c:
        reply = await c.request({"op": "pub", "id": 4, "topic": topic, "data": 1})
        assert_err(reply, "bad_request", 4, "wildcards")
        await c.assert_alive()
    assert broker.hub.published == 0


@pytest.mark.parametrize("pattern", ["a.>.b", ">.a", "a.b>", "a*", "a.*b"])
async def test_bad_wildcard_in_sub(broker: Broker, pattern: str) -> None:
    async with connect(broker.url) as c:
        assert_err(await c.request({"op": "sub", "id": 5, "topic": pattern}), "bad_request", 5)
        await c.assert_alive()
    assert broker.hub.router.pattern_count == 0


async def test_unsub_of_something_not_subscribed(broker: Broker) -> None:
    async with connect(broker.url) as c:
        reply = await c.request({"op": "unsub", "id": 6, "topic": "a.b"})
        assert_err(reply, "bad_request", 6, "not subscribed")
        await c.sub("a.*")
        # A different pattern that would match the same topics is not the same.
        reply = await c.request({"op": "unsub", "id": 7, "topic": "a.>"})
        assert_err(reply, "bad_request", 7, "not subscribed")
        assert await c.request({"op": "unsub", "id": 8, "topic": "a.*"}) == {"op": "ok", "id": 8}
        reply = await c.request({"op": "unsub", "id": 9, "topic": "a.*"})
        assert_err(reply, "bad_request", 9, "not subscribed")
        await c.assert_alive()


async def test_unknown_fields_are_ignored(broker: Broker) -> None:
    async with connect(broker.url) as c:
        reply = await c.request({"op": "ping", "id": 1, "future": {"x": 1}})
        assert reply == {"op": "pong", "id": 1}


async def test_unrepresentable_data_is_rejected(broker: Broker) -> None:
    async with connect(broker.url) as c:
        # Valid JSON that msgpack subscribers could not receive.
        await c.ws.send_message('{"op":"pub","id":1,"topic":"a","data":' + str(2**64) + "}")
        assert_err(await c.recv(), "bad_request", 1, "64-bit")
        await c.ws.send_message('{"op":"pub","id":2,"topic":"a","data":"\\ud800"}')
        assert_err(await c.recv(), "bad_request", 2, "surrogate")
        await c.assert_alive()
    async with connect(broker.url, MSGPACK) as m:
        await m.ws.send_message(msgpack.packb({"op": "pub", "id": 3, "topic": "a", "data": b"x"}))
        assert_err(await m.recv(), "bad_request", 3, "bytes")
        await m.ws.send_message(
            msgpack.packb({"op": "pub", "id": 4, "topic": "a", "data": {b"k": 2}})
        )
        assert_err(await m.recv(), "bad_request", 4, "keys")
        # A non-string, non-bytes map key fails msgpack decoding itself
        # (strict_map_key), before the id could be read: err without id.
        await m.ws.send_message(msgpack.packb({"op": "pub", "id": 5, "topic": "a", "data": {1: 2}}))
        assert_err(await m.recv(), "bad_request", None, "malformed msgpack")
        await m.ws.send_message(b"\xc1")  # never-used msgpack byte
        assert_err(await m.recv(), "bad_request", contains="malformed msgpack")
        await m.assert_alive()
    assert broker.hub.published == 0


# -- answers to bad input: the connection is closed ----------------------------


async def test_binary_frame_on_json_closes_1003(broker: Broker) -> None:
    async with connect(broker.url) as c:
        await c.assert_alive()
        await c.ws.send_message(b'{"op":"ping","id":1}')
        reason = await c.expect_close()
        assert reason.code == 1003
        assert "binary" in (reason.reason or "")
    await wait_until(lambda: not broker.connections)


async def test_text_frame_on_msgpack_closes_1003(broker: Broker) -> None:
    async with connect(broker.url, MSGPACK) as c:
        await c.assert_alive()
        await c.ws.send_message('{"op":"ping","id":1}')
        reason = await c.expect_close()
        assert reason.code == 1003
        assert "text" in (reason.reason or "")


async def test_replies_before_a_fatal_frame_are_delivered(broker: Broker) -> None:
    # One attempt loses the race about half the time: 30 make it certain.
    for _ in range(30):
        async with connect(broker.url) as c:
            # Back to back: the pong is queued before the close (drain=True),
            # so it must be written before the close frame.
            await c.send({"op": "ping", "id": 1})
            await c.ws.send_message(b"\x00")
            assert await c.recv() == {"op": "pong", "id": 1}
            assert (await c.expect_close()).code == 1003


INVALID_UTF8 = [
    pytest.param([mask_frame(0x1, b"\xff\xfe")], id="one-frame"),
    pytest.param(
        # A valid first fragment, then a continuation that breaks the UTF-8.
        [mask_frame(0x1, b'{"op":"ping","x":"\xc3', fin=False), mask_frame(0x0, b'("}')],
        id="fragments",
    ),
]


@pytest.mark.parametrize("frames", INVALID_UTF8)
async def test_invalid_utf8_text_frame_fails_the_connection(
    broker: Broker, frames: list[bytes]
) -> None:
    """The connection ends, and observers (broker_disconnected) see 1007."""
    async with raw_connect(broker.url) as raw:
        await raw.send({"op": "ping", "id": 1})
        assert await raw.recv() == {"op": "pong", "id": 1}
        (conn,) = broker.connections
        for data in frames:
            await raw.send_raw(data)
        await raw.read_until_eof()
    await wait_until(lambda: not broker.connections)
    assert conn.close_code == 1007


@pytest.mark.parametrize("frames", INVALID_UTF8)
async def test_invalid_utf8_text_frame_closes_1007(broker: Broker, frames: list[bytes]) -> None:
    async with raw_connect(broker.url) as raw:
        for data in frames:
            await raw.send_raw(data)
        try:
            close = await raw.expect_close()
        except EOFError:
            pytest.fail("TCP closed without a close frame")
        assert isinstance(close, CloseConnection)
        assert close.code == 1007


async def test_frame_over_max_message_size_closes_1009(start_broker: BrokerFactory) -> None:
    broker = await start_broker({"limits": {"max_message_size": 1000}})
    async with connect(broker.url) as c:
        # Just under the limit is fine.
        ok = {"op": "pub", "id": 1, "topic": "a", "data": ""}
        ok["data"] = "x" * (1000 - len(json.dumps(ok)))
        assert (await c.request(ok))["op"] == "ok"
        await c.send({"op": "pub", "id": 2, "topic": "a", "data": "x" * 1000})
        reason = await c.expect_close()
        assert reason.code == 1009
        assert reason.reason == "message larger than 1000 bytes"
    await wait_until(lambda: not broker.connections)
    assert broker.hub.published == 1


async def test_too_many_subscriptions(start_broker: BrokerFactory) -> None:
    broker = await start_broker({"limits": {"max_subscriptions": 2}})
    async with connect(broker.url) as c:
        await c.sub("a", 1)
        await c.sub("b.*", 2)
        assert_err(await c.request({"op": "sub", "id": 3, "topic": "c"}), "limit", 3, "max 2")
        # Re-subscribing to a pattern already held is not a new subscription.
        await c.sub("a", 4)
        await c.assert_alive()
        # Room again after an unsub.
        assert await c.request({"op": "unsub", "id": 5, "topic": "a"}) == {"op": "ok", "id": 5}
        await c.sub("c", 6)
    await wait_until(lambda: broker.hub.router.pattern_count == 0)


async def test_resubscribe_is_idempotent(broker: Broker) -> None:
    async with connect(broker.url) as sub, connect(broker.url) as pub:
        await sub.sub("t.x", 1)
        await sub.sub("t.x", 2)
        assert broker.hub.router.pattern_count == 1
        assert len(broker.hub.router) == 1
        await pub.pub("t.x", "once")
        assert await sub.recv() == {"op": "msg", "topic": "t.x", "seq": 1, "data": "once"}
        # One unsub undoes it.
        assert await sub.request({"op": "unsub", "id": 3, "topic": "t.x"}) == {"op": "ok", "id": 3}
        assert len(broker.hub.router) == 0
        await sub.assert_alive()


# -- the opening handshake -----------------------------------------------------


async def test_unknown_subprotocol_is_400_listing_supported(broker: Broker) -> None:
    e = await rejection(broker.url, subprotocol="broker.v2.cbor")
    assert e.status_code == 400
    assert e.body is not None
    assert b"broker.v1.json" in e.body
    assert b"broker.v1.msgpack" in e.body
    assert broker.stats.rejected["subprotocol"] == 1


async def test_known_subprotocol_among_unknown_ones_is_chosen(broker: Broker) -> None:
    async with trio_websocket.open_websocket_url(
        broker.url, subprotocols=["nope", MSGPACK, JSON]
    ) as ws:
        assert ws.subprotocol == MSGPACK
        c = Client(ws, MSGPACK)
        await c.assert_alive()


async def test_no_subprotocol_speaks_json(broker: Broker) -> None:
    async with connect(broker.url, None) as c:
        assert c.ws.subprotocol is None
        assert await c.request({"op": "ping", "id": 1}) == {"op": "pong", "id": 1}
        await c.sub("a.b")
        await c.send({"op": "pub", "id": 2, "topic": "a.b", "data": [1]})
        assert await c.recv() == {"op": "msg", "topic": "a.b", "seq": 1, "data": [1]}
        assert await c.recv() == {"op": "ok", "id": 2, "seq": 1}


async def test_msgpack_supports_the_same_ops(broker: Broker) -> None:
    async with connect(broker.url, MSGPACK) as c:
        assert await c.request({"op": "ping", "id": 1}) == {"op": "pong", "id": 1}
        await c.sub("m.*", 2)
        data = {"n": 1, "f": 1.5, "s": "ü", "l": [None, True], "big": 2**63}
        await c.send({"op": "pub", "id": 3, "topic": "m.x", "data": data, "key": "k"})
        msg = await c.recv()
        assert msg == {"op": "msg", "topic": "m.x", "seq": 1, "data": data, "key": "k"}
        assert await c.recv() == {"op": "ok", "id": 3, "seq": 1}
        assert await c.request({"op": "unsub", "id": 4, "topic": "m.*"}) == {"op": "ok", "id": 4}
        assert_err(await c.request({"op": "nope", "id": 5}), "bad_request", 5)
        await c.assert_alive()


async def test_wrong_path_is_404(broker: Broker) -> None:
    url = broker.url.removesuffix("/ws") + "/other"
    e = await rejection(url)
    assert e.status_code == 404
    assert e.body is not None and b"/other" in e.body
    # The query string is not part of the path.
    async with connect(broker.url + "?x=1") as c:
        await c.assert_alive()


# -- a client that does not read its replies -------------------------------------


async def test_flood_of_pubs_without_reading_replies(broker: Broker) -> None:
    """5000 pubs sent before reading a single reply: ~110 KB of replies fit in
    the kernel's socket buffers, so the broker's writer never blocks, the 256
    replies allowed in its queue are never reached and the client keeps
    working. Meanwhile another subscriber gets every message."""
    n = 5000
    received: list[int] = []
    async with connect(broker.url) as sub, connect(broker.url) as flood:
        await sub.sub("flood")

        async def read_sub() -> None:
            while len(received) < n:
                msg = await sub.recv()
                assert msg["op"] == "msg", msg
                received.append(msg["seq"])

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_sub)
            for i in range(n):
                await flood.send({"op": "pub", "id": i, "topic": "flood", "data": i})
            for i in range(n):
                assert await flood.recv() == {"op": "ok", "id": i, "seq": i + 1}
        await flood.assert_alive()
        assert received == list(range(1, n + 1))
        # And after the flood.
        await flood.pub("flood", "after")
        assert (await sub.recv())["data"] == "after"


async def test_unread_replies_past_max_replies_disconnect(broker: Broker) -> None:
    """A client whose socket is full (it reads nothing) and keeps sending
    commands is cut off once ``max_replies`` (256) replies wait in its queue;
    the broker records 1008. Its socket is full, so no close frame can reach
    it: the TCP connection is dropped. Another client is unaffected."""
    async with connect(broker.url) as other, raw_connect(broker.url, rcvbuf=4096) as flood:
        await other.sub("side")
        await flood.send({"op": "sub", "id": 0, "topic": "big"})
        assert await flood.recv() == {"op": "ok", "id": 0}
        (conn,) = (c for c in broker.connections if c.subscriptions == {"big"})
        payload = "x" * 60_000
        sent = 0
        with trio.fail_after(10):
            try:
                # Its own publishes come back to it, fill its socket, then its
                # replies pile up.
                for sent in range(1, 5001):
                    await flood.send({"op": "pub", "id": sent, "topic": "big", "data": payload})
                    if sent % 32 == 0:
                        await trio.lowlevel.checkpoint()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            await wait_until(lambda: conn not in broker.connections)
        assert conn.close_code == 1008
        assert conn.close_reason == "too many unread replies"
        assert sent < 5000
        await other.assert_alive()
        await other.send({"op": "pub", "topic": "side", "data": "still here"})
        assert await other.recv() == {"op": "msg", "topic": "side", "seq": 1, "data": "still here"}


@pytest.mark.parametrize("op", ["sub", "ping"])
async def test_a_reading_client_gets_every_reply_to_one_large_write(
    broker: Broker, op: str
) -> None:
    """A client resubscribing to many topics after a reconnect sends the
    commands in one write and reads the answers: 1000 of them, well past
    ``max_replies`` (256), are all answered. Only replies the client leaves
    unread count against the limit, not those one read produced."""
    n = 1000
    async with raw_connect(broker.url) as client:
        commands = [
            {"op": "sub", "id": i, "topic": f"pl.{i}"} if op == "sub" else {"op": "ping", "id": i}
            for i in range(n)
        ]
        data = b"".join(client.wsp.send(TextMessage(data=json.dumps(c))) for c in commands)
        await client.send_raw(data)  # about 40 KB in one write
        answer = "ok" if op == "sub" else "pong"
        for i in range(n):
            assert await client.recv() == {"op": answer, "id": i}
        await client.send({"op": "ping", "id": "after"})
        assert await client.recv() == {"op": "pong", "id": "after"}
        if op == "sub":  # the last subscription took
            async with connect(broker.url) as pub:
                await pub.pub("pl.999", "last")
            assert await client.recv() == {"op": "msg", "topic": "pl.999", "seq": 1, "data": "last"}


async def test_replies_unread_by_a_client_whose_socket_is_full_disconnect(
    broker: Broker,
) -> None:
    """A client that does not read: once its socket is full (the broker's
    writer waits on it), ``max_replies`` unread replies close it with 1008,
    even when they all come from one write."""
    async with connect(broker.url) as pub, raw_connect(broker.url, rcvbuf=4096) as lazy:
        await lazy.send({"op": "sub", "id": 0, "topic": "big"})
        assert await lazy.recv() == {"op": "ok", "id": 0}
        (conn,) = (c for c in broker.connections if c.subscriptions == {"big"})
        payload = "x" * 60_000
        with trio.fail_after(10):
            while not conn.writer.writer_running:  # its socket is full
                await pub.send({"op": "pub", "topic": "big", "data": payload})
                await pub.assert_alive()
        pings = [{"op": "ping", "id": i} for i in range(300)]
        data = b"".join(lazy.wsp.send(TextMessage(data=json.dumps(p))) for p in pings)
        await lazy.send_raw(data)
        await wait_until(lambda: conn not in broker.connections)
        assert (conn.close_code, conn.close_reason) == (1008, "too many unread replies")
        await pub.assert_alive()


# -- routing -------------------------------------------------------------------------


@pytest.mark.parametrize(("sub_proto", "pub_proto"), [(JSON, MSGPACK), (MSGPACK, JSON)])
async def test_pub_sub_across_encodings(broker: Broker, sub_proto: str, pub_proto: str) -> None:
    async with connect(broker.url, sub_proto) as sub, connect(broker.url, pub_proto) as pub:
        await sub.sub("x.y")
        data = {"list": [1, 2.5, None, True, "ü"], "nested": {"k": -(2**63)}}
        assert await pub.pub("x.y", data, key="K") == 1
        assert await sub.recv() == {"op": "msg", "topic": "x.y", "seq": 1, "data": data, "key": "K"}
        await sub.assert_alive()


async def test_wildcards(broker: Broker) -> None:
    async with (
        connect(broker.url) as star,
        connect(broker.url) as tail,
        connect(broker.url) as exact,
        connect(broker.url) as pub,
    ):
        await star.sub("a.*")
        await tail.sub("a.>")
        await exact.sub("a.b.c")
        for topic in ["a", "a.b", "a.b.c", "b.a", "a.bc.d.e"]:
            await pub.pub(topic, topic)
        assert [(await star.recv())["topic"]] == ["a.b"]
        assert [(await tail.recv())["topic"] for _ in range(3)] == ["a.b", "a.b.c", "a.bc.d.e"]
        assert [(await exact.recv())["topic"]] == ["a.b.c"]
        for c in (star, tail, exact):
            await c.assert_alive()


async def test_one_delivery_per_connection_when_several_patterns_match(broker: Broker) -> None:
    async with connect(broker.url) as sub, connect(broker.url) as pub:
        for i, pattern in enumerate(["a.b.c", "a.*.c", "a.>", "*.b.*", ">"]):
            await sub.sub(pattern, i)
        await pub.pub("a.b.c", 1)
        assert await sub.recv() == {"op": "msg", "topic": "a.b.c", "seq": 1, "data": 1}
        await sub.assert_alive()  # and no second copy
        # Dropping some of the patterns keeps the delivery while one matches.
        for i, pattern in enumerate(["a.b.c", "a.*.c", "a.>", "*.b.*"]):
            assert await sub.request({"op": "unsub", "id": i, "topic": pattern}) == {
                "op": "ok",
                "id": i,
            }
        await pub.pub("a.b.c", 2)
        assert (await sub.recv())["seq"] == 2
        await sub.assert_alive()


async def test_unsub_stops_delivery(broker: Broker) -> None:
    async with connect(broker.url) as sub, connect(broker.url) as pub:
        await sub.sub("u.*")
        await pub.pub("u.1", "before")
        assert (await sub.recv())["data"] == "before"
        assert await sub.request({"op": "unsub", "id": 1, "topic": "u.*"}) == {"op": "ok", "id": 1}
        await pub.pub("u.1", "after")
        await sub.assert_alive()  # the pong comes first: no message was queued
        assert broker.hub.router.pattern_count == 0


async def test_seq_increments_per_topic(broker: Broker) -> None:
    async with connect(broker.url) as sub, connect(broker.url, MSGPACK) as pub:
        await sub.sub("s.>")
        seqs = [await pub.pub(t, i) for i, t in enumerate(["s.a", "s.a", "s.b", "s.a", "s.b"])]
        assert seqs == [1, 2, 1, 3, 2]
        got = [await sub.recv() for _ in range(5)]
        assert [(m["topic"], m["seq"], m["data"]) for m in got] == [
            ("s.a", 1, 0),
            ("s.a", 2, 1),
            ("s.b", 1, 2),
            ("s.a", 3, 3),
            ("s.b", 2, 4),
        ]
    # Topics with no subscriber are numbered too.
    async with connect(broker.url) as pub2:
        assert await pub2.pub("nobody", 1) == 1
        assert await pub2.pub("nobody", 1) == 2


async def test_key_passes_through_and_null_key_is_absent(broker: Broker) -> None:
    async with connect(broker.url) as sub, connect(broker.url) as pub:
        await sub.sub("k")
        await pub.pub("k", 1, key="user:42")
        await pub.pub("k", 2, key=None)
        await pub.pub("k", 3)
        assert await sub.recv() == {
            "op": "msg",
            "topic": "k",
            "seq": 1,
            "data": 1,
            "key": "user:42",
        }
        assert await sub.recv() == {"op": "msg", "topic": "k", "seq": 2, "data": 2}
        assert await sub.recv() == {"op": "msg", "topic": "k", "seq": 3, "data": 3}


async def test_data_null_is_a_valid_payload(broker: Broker) -> None:
    async with connect(broker.url) as sub, connect(broker.url) as pub:
        await sub.sub("n")
        await pub.pub("n", None)
        assert await sub.recv() == {"op": "msg", "topic": "n", "seq": 1, "data": None}


async def test_pub_without_id_gets_no_ok_but_errors_are_reported(broker: Broker) -> None:
    async with connect(broker.url) as sub, connect(broker.url) as pub:
        await sub.sub("q")
        await pub.send({"op": "pub", "topic": "q", "data": "silent"})
        # The next reply is the pong: no ok was sent for the pub.
        await pub.assert_alive()
        assert await sub.recv() == {"op": "msg", "topic": "q", "seq": 1, "data": "silent"}
        # A bad pub without id is still answered, with an err without id.
        await pub.send({"op": "pub", "topic": "q.*", "data": 1})
        assert_err(await pub.recv(), "bad_request", None, "wildcards")
        await pub.send({"op": "pub", "topic": "q"})
        assert_err(await pub.recv(), "bad_request", None, "data")
        await pub.assert_alive()


async def test_own_messages_are_delivered_to_a_subscribed_publisher(broker: Broker) -> None:
    async with connect(broker.url) as c:
        await c.sub("self")
        await c.send({"op": "pub", "id": 1, "topic": "self", "data": "me"})
        # Routed (queued) before the ok is: replies and messages share one FIFO.
        assert await c.recv() == {"op": "msg", "topic": "self", "seq": 1, "data": "me"}
        assert await c.recv() == {"op": "ok", "id": 1, "seq": 1}


async def test_subscriptions_are_removed_when_a_client_leaves(broker: Broker) -> None:
    async with connect(broker.url) as c:
        await c.sub("a")
        await c.sub("b.>")
        assert broker.hub.router.pattern_count == 2
    await wait_until(lambda: broker.hub.router.pattern_count == 0)
    await wait_until(lambda: not broker.connections)


async def test_subscriptions_as_they_come_and_go(broker: Broker) -> None:
    """None, one, several, back to one and none: the broker holds (and
    routes) exactly what the client subscribed, however it stores them (a
    connection with one subscription keeps no set of its own)."""
    async with connect(broker.url) as client, connect(broker.url) as publisher:
        await client.sub("a")
        (conn,) = [c for c in broker.connections if c.subscriptions == {"a"}]
        steps: list[tuple[str, str, set[str]]] = [
            ("sub", "a", {"a"}),  # idempotent
            ("sub", "b.*", {"a", "b.*"}),
            ("unsub", "a", {"b.*"}),
            ("unsub", "b.*", set()),
            ("sub", "c", {"c"}),
            ("unsub", "c", set()),
            ("sub", "d", {"d"}),
        ]
        for op, pattern, held in steps:
            if op == "sub":
                await client.sub(pattern)
            else:
                reply = await client.request({"op": "unsub", "id": 1, "topic": pattern})
                assert reply == {"op": "ok", "id": 1}
            assert conn.subscriptions == held
        reply = await client.request({"op": "unsub", "id": 2, "topic": "a"})
        assert_err(reply, "bad_request", 2, "not subscribed")
        for topic in ("a", "b.x", "c", "d"):
            await publisher.pub(topic, topic)
        message = await client.recv()
        assert (message["topic"], message["data"]) == ("d", "d")
        await client.assert_alive()
