"""broker.client's side of history, recovery and presence (docs/client.md),
against a scripted peer.

The peer is a real WebSocket server on a loopback socket that plays the
broker's part of the protocol frame by frame (as tests/helpers.py's clients
play a foreign client's): each test reads what the client sends (the
``since`` of a resubscription...) and answers as the history spec says a
broker does. End-to-end tests against the real broker are in
test_client_reconnect.py.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import trio
import trio_websocket

from broker.client import (
    History,
    Interrupted,
    Item,
    Join,
    Leave,
    Message,
    Presence,
    Reconnect,
    Reconnected,
    Resync,
    Subscription,
    open_client,
)

WAIT = 10.0
FAST = Reconnect(initial_delay=0.01, max_delay=0.05)


class Peer:
    """The broker's end of one connection."""

    def __init__(self, ws: trio_websocket.WebSocketConnection) -> None:
        self.ws = ws
        self.closed = trio.Event()

    async def recv(self) -> dict[str, Any]:
        with trio.fail_after(WAIT):
            frame = json.loads(await self.ws.get_message())
        assert isinstance(frame, dict)
        return frame

    async def expect(self, op: str) -> dict[str, Any]:
        frame = await self.recv()
        assert frame["op"] == op, frame
        return frame

    async def send(self, **fields: Any) -> None:
        await self.ws.send_message(json.dumps(fields))

    async def msg(self, topic: str, seq: int, **extra: Any) -> None:
        await self.send(op="msg", topic=topic, seq=seq, data=f"{topic}#{seq}", **extra)

    async def close(self, code: int = 1001, reason: str = "restarting") -> None:
        await self.ws.aclose(code, reason)
        self.closed.set()


class Scripted:
    """A listening socket whose connections are handed to the test."""

    def __init__(self) -> None:
        self._send, self._receive = trio.open_memory_channel[Peer](10)
        self.url = ""

    async def _handler(self, request: trio_websocket.WebSocketRequest) -> None:
        ws = await request.accept(subprotocol="broker.v1.json")
        peer = Peer(ws)
        await self._send.send(peer)
        await peer.closed.wait()

    async def next(self) -> Peer:
        """The next connection the client makes."""
        with trio.fail_after(WAIT):
            return await self._receive.receive()


@pytest.fixture
async def scripted(nursery: trio.Nursery) -> Scripted:
    server = Scripted()
    listener = await nursery.start(
        trio_websocket.serve_websocket, server._handler, "127.0.0.1", 0, None
    )
    server.url = f"ws://127.0.0.1:{listener.port}/ws"
    return server


async def receive(subscription: Subscription) -> Item:
    with trio.fail_after(WAIT):
        return await subscription.receive()


def message(topic: str, seq: int) -> Message:
    return Message(topic, seq, f"{topic}#{seq}")


async def subscribed(
    nursery: trio.Nursery, client: Any, peer: Peer, pattern: str, ok: dict[str, Any], **options: Any
) -> tuple[Subscription, dict[str, Any]]:
    """Enter ``client.subscribe(pattern)`` in a task, answering its ``sub``
    with *ok*; the Subscription, and the ``sub`` frame the client sent."""
    ready: trio.MemorySendChannel[Subscription]
    ready, got = trio.open_memory_channel[Subscription](1)

    async def hold() -> None:
        async with client.subscribe(pattern, **options) as sub:
            await ready.send(sub)
            await trio.sleep_forever()

    nursery.start_soon(hold)
    frame = await peer.expect("sub")
    await peer.send(op="ok", id=frame["id"], **ok)
    with trio.fail_after(WAIT):
        return await got.receive(), frame


async def test_topic_resumes_with_since_and_gets_the_replay_once(
    scripted: Scripted, nursery: trio.Nursery
) -> None:
    async with open_client(scripted.url, reconnect=FAST) as client:
        peer = await scripted.next()
        sub, frame = await subscribed(nursery, client, peer, "t", {"epoch": "E1", "seq": 5})
        assert "since" not in frame
        await peer.msg("t", 6)
        await peer.msg("t", 7)
        assert [await receive(sub), await receive(sub)] == [message("t", 6), message("t", 7)]
        await peer.close(1001, "restarting")
        assert await receive(sub) == Interrupted(1001, "restarting")

        peer = await scripted.next()
        frame = await peer.expect("sub")
        assert frame["since"] == {"epoch": "E1", "seq": 7}
        await peer.send(op="ok", id=frame["id"], epoch="E1", seq=10, recovered=True)
        for seq in (7, 8, 9, 10, 11):  # 7 overlaps what was delivered
            await peer.msg("t", seq)
        assert await receive(sub) == Reconnected(1)
        # No Resync: recovered. No gap, no duplicate.
        assert [await receive(sub) for _ in range(4)] == [message("t", s) for s in (8, 9, 10, 11)]
        # The client's requests go out on the new connection.
        results: list[Any] = []
        async with trio.open_nursery() as tasks:
            tasks.start_soon(lambda: _collect(results, client.publish("t", "x")))
            pub = await peer.expect("pub")
            await peer.send(op="ok", id=pub["id"], seq=12)
        assert results == [12]


async def test_topic_not_recovered_resyncs_and_the_new_epoch_is_delivered(
    scripted: Scripted, nursery: trio.Nursery
) -> None:
    async with open_client(scripted.url, reconnect=FAST) as client:
        peer = await scripted.next()
        sub, _ = await subscribed(nursery, client, peer, "t", {"epoch": "E1", "seq": 40})
        await peer.close()
        assert isinstance(await receive(sub), Interrupted)
        peer = await scripted.next()
        frame = await peer.expect("sub")
        assert frame["since"] == {"epoch": "E1", "seq": 40}
        # A restarted broker: another epoch, nothing to replay.
        await peer.send(op="ok", id=frame["id"], epoch="E2", seq=0, recovered=False)
        await peer.msg("t", 1, epoch="E2")
        assert await receive(sub) == Reconnected(1)
        assert await receive(sub) == Resync("t", "E2", 0, (), False, "not_recovered")
        # seq 1 < 40, but of the new epoch: delivered.
        first = await receive(sub)
        assert first == message("t", 1)
        assert isinstance(first, Message) and first.epoch == "E2"


async def test_pattern_resumes_with_cursor_and_topics(
    scripted: Scripted, nursery: trio.Nursery
) -> None:
    async with open_client(scripted.url, reconnect=FAST) as client:
        peer = await scripted.next()
        sub, _ = await subscribed(nursery, client, peer, "a.*", {"cursor": "C1"})
        await peer.msg("a.x", 1, epoch="Ex")
        await peer.msg("a.x", 2)
        await peer.msg("a.y", 5)
        for _ in range(3):
            assert isinstance(await receive(sub), Message)
        await peer.close()
        assert isinstance(await receive(sub), Interrupted)

        peer = await scripted.next()
        frame = await peer.expect("sub")
        # The epoch only where the client saw a seq-1 message carrying it.
        assert frame["since"] == {
            "cursor": "C1",
            "topics": {"a.x": {"epoch": "Ex", "seq": 2}, "a.y": {"seq": 5}},
        }
        await peer.send(op="ok", id=frame["id"], cursor="C2", recovered=False, lost=["a.y"])
        await peer.msg("a.x", 3)  # replayed
        await peer.msg("a.y", 1, epoch="Ey2")  # a.y's positions were forgotten
        assert await receive(sub) == Reconnected(1)
        assert await receive(sub) == Resync("a.*", None, None, ("a.y",), False, "not_recovered")
        assert await receive(sub) == message("a.x", 3)
        restarted = await receive(sub)
        assert restarted == message("a.y", 1)
        assert isinstance(restarted, Message) and restarted.epoch == "Ey2"

        # The next resume starts from the new cursor.
        await peer.close()
        assert isinstance(await receive(sub), Interrupted)
        peer = await scripted.next()
        frame = await peer.expect("sub")
        assert frame["since"]["cursor"] == "C2"
        assert frame["since"]["topics"]["a.y"] == {"epoch": "Ey2", "seq": 1}


async def test_live_epoch_change_resyncs_before_the_message(
    scripted: Scripted, nursery: trio.Nursery
) -> None:
    async with open_client(scripted.url, reconnect=FAST) as client:
        peer = await scripted.next()
        sub, _ = await subscribed(nursery, client, peer, "t", {"epoch": "E1", "seq": 3})
        await peer.msg("t", 4)
        await peer.msg("t", 4)  # a duplicate: never delivered
        await peer.msg("t", 1, epoch="E2")  # the topic's history was lost
        assert await receive(sub) == message("t", 4)
        assert await receive(sub) == Resync("t", "E2", 0, (), False, "epoch_changed")
        first = await receive(sub)
        assert isinstance(first, Message) and (first.seq, first.epoch) == (1, "E2")


async def test_subscribe_options_history_and_presence(
    scripted: Scripted, nursery: trio.Nursery
) -> None:
    async with open_client(scripted.url, reconnect=FAST) as client:
        peer = await scripted.next()
        sub, frame = await subscribed(
            nursery,
            client,
            peer,
            "room.1",
            {"epoch": "E", "seq": 47},
            history=3,
            snapshot=True,
            presence=True,
        )
        assert (frame["history"], frame["snapshot"], frame["presence"]) == (3, True, True)
        # The replay follows the ok: 45..47 are not taken for duplicates.
        for seq in (45, 46, 47):
            await peer.msg("room.1", seq)
        await peer.send(op="join", topic="room.1", member={"subject": "alice", "connections": 1})
        await peer.send(op="leave", topic="room.1", member={"subject": "bob", "connections": 0})
        assert [await receive(sub) for _ in range(3)] == [
            message("room.1", s) for s in (45, 46, 47)
        ]
        assert await receive(sub) == Join("room.1", {"subject": "alice", "connections": 1})
        assert await receive(sub) == Leave("room.1", {"subject": "bob", "connections": 0})

        with pytest.raises(ValueError, match="history"):
            async with client.subscribe("room.1", history=10):
                pass
        with pytest.raises(ValueError, match="history must be"):
            async with client.subscribe("room.2", history=0):
                pass

        async def history() -> History:
            return await client.history("room.1", since=("E", 45), limit=2)

        async with trio.open_nursery() as tasks:
            results: list[Any] = []
            tasks.start_soon(lambda: _collect(results, history()))
            query = await peer.expect("history")
            assert query["topic"] == "room.1"
            assert (query["since"], query["limit"]) == ({"epoch": "E", "seq": 45}, 2)
            await peer.send(
                op="ok",
                id=query["id"],
                topic="room.1",
                epoch="E",
                seq=47,
                more=True,
                messages=[{"seq": 46, "data": "room.1#46"}, {"seq": 47, "data": "room.1#47"}],
            )
        (result,) = results
        assert result == History(
            "room.1", "E", 47, (message("room.1", 46), message("room.1", 47)), True, None
        )

        async with trio.open_nursery() as tasks:
            results = []
            tasks.start_soon(lambda: _collect(results, client.presence("room.1")))
            query = await peer.expect("presence")
            await peer.send(
                op="ok", id=query["id"], count=1, connections=2, members=[{"subject": "alice"}]
            )
        assert results == [Presence(1, 2, ({"subject": "alice"},))]


async def _collect(results: list[Any], awaitable: Any) -> None:
    results.append(await awaitable)
