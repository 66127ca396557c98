"""Dormant connections: an idle reader's task ends, and the connection lives on.

A reader parked on the broker's read poller through a whole sweep is retired
(broker.io.poller): its task ends and the connection stays registered with
the poller, subscribed, its queue in place. Input wakes it into a new task;
so does a close (by the broker, its shutdown or its cancellation). These
tests retire readers with two calls of ``ReadPoller.retire_quiet`` (the
first marks the parked readers, the second retires the ones still parked)
rather than waiting for the sweep's timer, and check what users see: the
dormant connection answers, receives, closes with the right code, and is
counted out when it ends.
"""

from __future__ import annotations

import os
import select
import ssl
from collections.abc import Mapping
from typing import Any

import pytest
import trio
import trio.testing
from wsproto.events import CloseConnection, Ping, Pong, TextMessage

from broker import ClientInfo, PluginHost, config_from_dict, hookimpl
from broker.core import outbox
from broker.core.errors import CloseCode
from broker.io.poller import ReadPoller
from broker.plugin.host import PluginContext
from broker.server.broker import Broker
from broker.server.connection import RECEIVE_SIZE, Connection
from tests.conftest import BrokerFactory
from tests.helpers import WAIT, RawClient, dumps, wait_until
from tests.redis_service import MACHINE_URL, delete_prefix, needs_machine_redis, unique_prefix

pytestmark = pytest.mark.skipif(not hasattr(select, "epoll"), reason="epoll is Linux's")


def _poller(broker: Broker) -> ReadPoller:
    poller = broker._poller
    assert poller is not None
    return poller


async def retire_all(broker: Broker) -> None:
    """Retire every parked reader now, and let their tasks end."""
    poller = _poller(broker)
    await trio.testing.wait_all_tasks_blocked()
    poller.retire_quiet()  # marks the readers parked now
    poller.retire_quiet()  # retires the ones still parked: all of them
    await trio.testing.wait_all_tasks_blocked()
    assert poller.parked == 0
    assert all(conn.asleep for conn in broker.connections)
    assert poller.dormant == len(broker.connections)


async def subscribed(url: str, topic: str, ssl_context: ssl.SSLContext | None = None) -> RawClient:
    client = await RawClient.open(url, ssl_context=ssl_context)
    await client.send({"op": "sub", "id": 1, "topic": topic})
    assert (await client.recv())["op"] == "ok"
    return client


def _tls_config(scheme: str, tls_files: dict[str, str]) -> dict[str, object]:
    """A listener on wss:// with the test certificate, or the default one."""
    if scheme == "ws":
        return {}
    return {"listener": {"tls_cert": tls_files["tls_cert"], "tls_key": tls_files["tls_key"]}}


@pytest.mark.parametrize("scheme", ["ws", "wss"])
async def test_a_dormant_connection_answers_publishes_and_receives(
    start_broker: BrokerFactory,
    scheme: str,
    tls_files: dict[str, str],
    client_ssl: ssl.SSLContext,
) -> None:
    broker = await start_broker(_tls_config(scheme, tls_files))
    ssl_context = client_ssl if scheme == "wss" else None
    alice = await subscribed(broker.url, "chat.alice", ssl_context)
    bob = await subscribed(broker.url, "chat.bob", ssl_context)
    await retire_all(broker)
    assert _poller(broker).dormant == 2

    # Input wakes a dormant connection: it answers and publishes.
    await alice.send({"op": "ping", "id": 7})
    assert await alice.recv() == {"op": "pong", "id": 7}
    await alice.send({"op": "pub", "id": 8, "topic": "chat.bob", "data": "hi", "ack": True})
    assert (await alice.recv())["op"] == "ok"
    # Bob, still dormant, receives: deliveries are written by the
    # publisher's task, and do not wake the subscriber's reader.
    message = await bob.recv()
    assert message["op"] == "msg" and message["data"] == "hi"
    (bob_conn,) = [c for c in broker.connections if c.subscriptions == {"chat.bob"}]
    assert bob_conn.asleep

    # Alice's new task parks like any reader, and is retired again.
    await retire_all(broker)
    await bob.send({"op": "pub", "topic": "chat.alice", "data": "back"})
    message = await alice.recv()
    assert message["op"] == "msg" and message["data"] == "back"
    await alice.aclose()
    await bob.aclose()


async def test_many_deliveries_to_a_dormant_subscriber_need_no_task(
    start_broker: BrokerFactory,
) -> None:
    """Enough to back its socket up: the writer task that then runs is the
    writer's, not the reader's, and everything arrives in order."""
    broker = await start_broker()
    subscriber = await subscribed(broker.url, "feed")
    publisher = await RawClient.open(broker.url)
    await retire_all(broker)
    count = 2_000
    payload = "x" * 1_000

    async def publish() -> None:
        for i in range(count):
            await publisher.send({"op": "pub", "topic": "feed", "data": f"{i} {payload}"})

    async with trio.open_nursery() as nursery:
        nursery.start_soon(publish)
        for i in range(count):
            message = await subscriber.recv()
            assert message["data"] == f"{i} {payload}"
    (conn,) = [c for c in broker.connections if c.subscriptions == {"feed"}]
    assert conn.asleep
    await subscriber.aclose()
    await publisher.aclose()


def queue_shed(conn: Connection) -> bool:
    """The connection's queue holds no lists or rule state (Outbox.shed)."""
    box = conn.outbox
    return box._frames is outbox._NO_LIST and box._last is None


async def test_a_dormant_connections_queue_keeps_nothing_for_its_next_batch(
    start_broker: BrokerFactory,
) -> None:
    """A parked reader's queue keeps its lists and rule state from batch to
    batch; once the connection is dormant (first from the handshake's task,
    then from a task that input woke) they are freed, made again by the
    next delivery, and freed again at the next retirement."""
    broker = await start_broker(sweep_interval=None)
    subscriber = await subscribed(broker.url, "feed")
    publisher = await RawClient.open(broker.url)
    (conn,) = [c for c in broker.connections if c.subscriptions == {"feed"}]
    await publisher.send({"op": "pub", "topic": "feed", "data": "1"})
    assert (await subscriber.recv())["data"] == "1"
    assert not queue_shed(conn)
    await retire_all(broker)
    assert queue_shed(conn)
    await publisher.send({"op": "pub", "topic": "feed", "data": "2"})
    assert (await subscriber.recv())["data"] == "2"
    assert conn.asleep and not queue_shed(conn)
    # Woken by input, it answers; retired again, it sheds again.
    await subscriber.send({"op": "ping", "id": 1})
    assert await subscriber.recv() == {"op": "pong", "id": 1}
    await retire_all(broker)
    assert queue_shed(conn)
    await publisher.send({"op": "pub", "topic": "feed", "data": "3"})
    assert (await subscriber.recv())["data"] == "3"
    await subscriber.aclose()
    await publisher.aclose()


async def test_a_dormant_client_that_hangs_up_is_counted_out(start_broker: BrokerFactory) -> None:
    disconnected: list[tuple[int, str]] = []

    class Observer:
        @hookimpl
        def broker_disconnected(self, client: ClientInfo, code: int, reason: str) -> None:
            disconnected.append((code, reason))

    def create(settings: Mapping[str, Any], context: PluginContext) -> object:
        return Observer()

    broker = await start_broker(
        {"plugins": {"enabled": ["noauth", "test"]}}, factories={"test": create}
    )
    closing = await subscribed(broker.url, "a")
    vanishing = await subscribed(broker.url, "b")
    staying = await subscribed(broker.url, "c")
    await retire_all(broker)
    # A close frame wakes it; its close handshake completes as usual.
    await closing.send_raw(closing.wsp.send(CloseConnection(1000)))
    assert (await closing.expect_close()).code == 1000
    # TCP closed without a close frame: the EOF wakes it.
    await vanishing.stream.aclose()
    await wait_until(lambda: len(broker.connections) == 1)
    assert sorted(disconnected) == [(1000, ""), (int(CloseCode.ABNORMAL), "connection lost")]
    assert broker._sockets_open == 1 and dict(broker._per_ip) == {"127.0.0.1": 1}
    assert _poller(broker).dormant == 1
    await closing.aclose()
    await staying.aclose()


async def test_closing_a_dormant_connection_sends_its_close_frame(
    start_broker: BrokerFactory,
) -> None:
    """The broker closes it (an expired identity, an operator, a slow
    consumer all go through Connection.close): a task is started for it,
    which sends the close frame and counts it out."""
    broker = await start_broker()
    client = await subscribed(broker.url, "a")
    other = await subscribed(broker.url, "b")
    await retire_all(broker)
    (conn,) = [c for c in broker.connections if c.subscriptions == {"a"}]
    conn.close(CloseCode.POLICY_VIOLATION, "enough")
    close = await client.expect_close()
    assert (close.code, close.reason) == (int(CloseCode.POLICY_VIOLATION), "enough")
    await client.aclose()
    await wait_until(lambda: len(broker.connections) == 1)
    # Shutting down closes the other dormant one with 1001 after its drain.
    broker.stop()
    assert (await other.expect_close()).code == int(CloseCode.GOING_AWAY)
    await wait_until(lambda: not broker.connections and broker._sockets_open == 0)
    await other.aclose()


async def test_cancelling_the_broker_closes_its_dormant_connections() -> None:
    """No stop(), no drain: the broker's task is cancelled. Dormant
    connections have no task to cancel; each is woken into one that closes
    it, as a cancelled reader does, and serve() returns."""
    cfg = config_from_dict({"listener": {"host": "127.0.0.1", "port": 0}, "admin": {"port": 0}})
    broker = Broker(cfg, plugins=PluginHost.from_config(cfg), close_timeout=0.5)
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as inner:
            await inner.start(broker.serve)
            clients = [await subscribed(broker.url, f"t.{i}") for i in range(3)]
            await retire_all(broker)
            inner.cancel_scope.cancel()
        assert not broker.connections and broker._sockets_open == 0
    assert not scope.cancelled_caught
    for client in clients:
        close = await client.expect_close()
        assert close.code == 1000
        await client.aclose()


async def test_input_arriving_as_the_reader_retires_is_read(start_broker: BrokerFactory) -> None:
    """The retired reader reads once more before its task ends: a message
    that arrives after the retirement but before that read is handled, and
    the reader stays a task.

    The poller takes the message's edge in the same scheduling batch as the
    retired reader runs, in an order trio picks at random: when the poller
    goes first, the edge is for nobody, and a reader that went dormant
    without reading again would never see the message. Twenty rounds make
    that case all but certain to come up."""
    broker = await start_broker(sweep_interval=None)  # no sweep but ours
    client = await subscribed(broker.url, "a")
    poller = _poller(broker)
    (conn,) = broker.connections
    for i in range(20):
        await trio.testing.wait_all_tasks_blocked()
        assert poller.parked == 1
        poller.retire_quiet()
        # In the kernel's buffer before anything else runs.
        frame = client.wsp.send(TextMessage(data=str(dumps({"op": "ping", "id": i}))))
        os.write(client.stream.socket.fileno(), frame)
        assert poller.retire_quiet() == 1  # rescheduled with RETIRED, not yet run
        assert await client.recv() == {"op": "pong", "id": i}
        await trio.testing.wait_all_tasks_blocked()
        assert not conn.asleep and poller.parked == 1 and poller.dormant == 0
    await client.aclose()


@pytest.mark.parametrize("scheme", ["ws", "wss"])
async def test_a_heartbeat_leaves_a_dormant_connection_dormant(
    start_broker: BrokerFactory,
    scheme: str,
    tls_files: dict[str, str],
    client_ssl: ssl.SSLContext,
) -> None:
    """The broker's ping and the client's pong, and a client's own ping and
    the broker's pong, are handled without a task: the connection stays
    dormant, alive (the pong is noted) and with its queue shed, and it
    still receives."""
    broker = await start_broker(_tls_config(scheme, tls_files), sweep_interval=None)
    ssl_context = client_ssl if scheme == "wss" else None
    client = await subscribed(broker.url, "feed", ssl_context)
    publisher = await RawClient.open(broker.url, ssl_context=ssl_context)
    await retire_all(broker)
    (conn,) = [c for c in broker.connections if c.subscriptions == {"feed"}]
    poller = _poller(broker)
    for round_ in range(3):
        # The heartbeat: a ping queued and flushed; the client answers it.
        conn.send_ping()
        broker.hub.flush()
        assert conn.ping_outstanding
        seen = conn.last_seen
        assert isinstance(await client.next_event(), Ping)  # answered by next_event
        await wait_until(lambda: not conn.ping_outstanding)
        assert conn.asleep and conn.last_seen >= seen and queue_shed(conn)
        # The client's own ping gets its pong, the same way.
        await client.send_raw(client.wsp.send(Ping(b"hi %d" % round_)))
        assert await client.next_event() == Pong(b"hi %d" % round_)
        await trio.testing.wait_all_tasks_blocked()
        assert conn.asleep and queue_shed(conn)
        assert poller.dormant == 2 and poller.parked == 0
    await publisher.send({"op": "pub", "topic": "feed", "data": "still here"})
    assert (await client.recv())["data"] == "still here"
    assert conn.asleep
    await client.aclose()
    await publisher.aclose()


async def test_a_ping_with_a_message_wakes_the_connection(start_broker: BrokerFactory) -> None:
    """A ping and a message in one read: the connection's task handles both,
    in order; a ping cut short by the network wakes it too, and its pong
    comes once the rest arrives."""
    broker = await start_broker(sweep_interval=None)
    client = await subscribed(broker.url, "a")
    (conn,) = broker.connections
    await retire_all(broker)
    ping = client.wsp.send(Ping(b"p"))
    message = client.wsp.send(TextMessage(data=str(dumps({"op": "ping", "id": 5}))))
    await client.send_raw(ping + message)
    assert await client.next_event() == Pong(b"p")
    assert await client.recv() == {"op": "pong", "id": 5}
    await trio.testing.wait_all_tasks_blocked()
    assert not conn.asleep

    await retire_all(broker)
    ping = client.wsp.send(Ping(b"split"))
    await client.send_raw(ping[:3])
    await trio.testing.wait_all_tasks_blocked()
    assert not conn.asleep  # woken: the parser holds the start of a frame
    await client.send_raw(ping[3:])
    assert await client.next_event() == Pong(b"split")
    await client.aclose()


async def test_a_flood_of_pongs_gets_the_connection_its_task(start_broker: BrokerFactory) -> None:
    """The poller's task handles a few short reads of pings and pongs, not a
    client that keeps it busy: a read that fills the buffer wakes the
    connection into its task (which takes turns with the others), and the
    unsolicited pongs are taken there, the connection open."""
    broker = await start_broker(sweep_interval=None)
    client = await subscribed(broker.url, "a")
    (conn,) = broker.connections
    await retire_all(broker)
    # Whole frames filling the broker's first read exactly (618 of 106 bytes
    # and one of 28), then more: only the read's size tells it apart.
    first = [client.wsp.send(Pong(b"x" * 100)) for _ in range(618)]
    first.append(client.wsp.send(Pong(b"y" * 22)))
    assert sum(map(len, first)) == RECEIVE_SIZE
    flood = b"".join(first) + b"".join(client.wsp.send(Pong(b"z" * 100)) for _ in range(80))
    # In the kernel's buffer before the broker runs: its first read is full.
    assert os.write(client.stream.socket.fileno(), flood) == len(flood)
    await trio.testing.wait_all_tasks_blocked()
    assert not conn.asleep and conn.close_code is None
    assert conn.bytes_in >= len(flood)
    await client.send({"op": "ping", "id": 2})
    assert await client.recv() == {"op": "pong", "id": 2}
    await client.aclose()


async def test_the_heartbeat_keeps_answering_dormant_clients_and_drops_silent_ones(
    start_broker: BrokerFactory,
) -> None:
    """Through real heartbeats: a dormant client that answers every ping
    stays connected and dormant; one that stops answering is dropped with
    1008, as a parked one is."""
    broker = await start_broker(
        {"limits": {"ping_interval": 0.1, "ping_timeout": 0.2}}, sweep_interval=None
    )
    answering = await subscribed(broker.url, "a")
    silent = await subscribed(broker.url, "b")
    await retire_all(broker)
    kept, dropped = sorted(broker.connections, key=lambda c: sorted(c.subscriptions))
    pings = 0

    async def answer() -> None:
        nonlocal pings
        while True:
            if isinstance(await answering.next_event(), Ping):  # answered
                pings += 1

    async with trio.open_nursery() as nursery:
        nursery.start_soon(answer)
        events = []
        with trio.fail_after(WAIT):
            try:
                while True:
                    events.append(await silent.next_event(answer_pings=False))
            except EOFError:
                pass
        await wait_until(lambda: pings >= 3)
        nursery.cancel_scope.cancel()
    assert any(isinstance(e, Ping) for e in events)
    assert (dropped.close_code, dropped.close_reason) == (1008, "ping timeout")
    assert kept.close_code is None and kept.asleep
    await wait_until(lambda: broker.connections == {kept})
    await answering.aclose()
    await silent.aclose()


async def test_a_reader_retired_as_the_broker_is_cancelled_closes_too() -> None:
    """Retired, and the broker cancelled before the reader has run: the
    connection still closes (1000, as a cancelled reader's does) and is
    counted out; serve() returns."""
    cfg = config_from_dict({"listener": {"host": "127.0.0.1", "port": 0}, "admin": {"port": 0}})
    broker = Broker(
        cfg, plugins=PluginHost.from_config(cfg), close_timeout=0.5, sweep_interval=None
    )
    async with trio.open_nursery() as inner:
        await inner.start(broker.serve)
        client = await subscribed(broker.url, "t")
        poller = _poller(broker)
        await trio.testing.wait_all_tasks_blocked()
        poller.retire_quiet()
        assert poller.retire_quiet() == 1
        inner.cancel_scope.cancel()
    assert not broker.connections and broker._sockets_open == 0
    assert (await client.expect_close()).code == 1000
    await client.aclose()


@needs_machine_redis
async def test_dormant_subscribers_receive_from_another_node(start_broker: BrokerFactory) -> None:
    """With the Redis engine, what another node publishes reaches this
    node's subscribers through its fan-out link and flusher, not through
    their readers: dormant subscribers receive it, in order, and stay
    dormant."""
    prefix = unique_prefix()
    engine = {"engine": {"type": "redis", "url": MACHINE_URL, "prefix": prefix}}
    try:
        here = await start_broker(engine, sweep_interval=None)
        there = await start_broker(engine, sweep_interval=None)
        subscribers = [await subscribed(here.url, "feed.a") for _ in range(3)]
        publisher = await RawClient.open(there.url)
        await retire_all(here)
        for i in range(50):
            await publisher.send({"op": "pub", "topic": "feed.a", "data": i})
        for subscriber in subscribers:
            got = [(await subscriber.recv())["data"] for _ in range(50)]
            assert got == list(range(50))
        assert all(conn.asleep for conn in here.connections)
        for client in [publisher, *subscribers]:
            await client.aclose()
    finally:
        await delete_prefix(MACHINE_URL, prefix)
