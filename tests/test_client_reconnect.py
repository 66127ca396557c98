"""broker.client reconnects: against real brokers that drop the connection
or restart on the same port.

Every wait is on an item of a subscription, a reply, an event set by a
plugin, or broker state, bounded by ``WAIT``; nothing sleeps to synchronise.
"""

from __future__ import annotations

import random
import socket
from collections.abc import Mapping
from typing import Any

import pytest
import trio
import trio.testing

from broker import Action, Broker, ClientInfo, PluginContext, hookimpl
from broker.client import (
    ConnectionLost,
    Disconnected,
    Forbidden,
    Interrupted,
    Item,
    Message,
    Reconnect,
    Reconnected,
    ReconnectFailed,
    Resync,
    Subscription,
    open_client,
)
from broker.core.errors import CloseCode
from broker.server.connection import Connection
from tests.conftest import BrokerFactory, merge
from tests.helpers import TOKEN, TOKENS_CONFIG, Restartable, deny_factory, wait_until

WAIT = 10.0

#: Reconnect at once (within 10 ms) and often: tests wait on events, not delays.
FAST = Reconnect(initial_delay=0.01, max_delay=0.05)

BOB = "bob-token-0123456789"
TWO_TOKENS: dict[str, Any] = merge(
    TOKENS_CONFIG,
    {
        "plugin": {
            "tokens": {"tokens": [{"id": "alice", "token": TOKEN}, {"id": "bob", "token": BOB}]}
        }
    },
)


async def receive(subscription: Subscription) -> Item:
    with trio.fail_after(WAIT):
        return await subscription.receive()


async def receive_message(subscription: Subscription) -> Message:
    item = await receive(subscription)
    assert isinstance(item, Message), item
    return item


def kick(broker: Broker, code: int = CloseCode.GOING_AWAY, reason: str = "kicked") -> None:
    """Close the broker's side of its only open connection that subscribes
    (or its only open connection, if none subscribes)."""
    conns = live(broker)
    subscribers = [c for c in conns if c.subscriptions]
    (conn,) = subscribers or conns
    conn.close(code, reason)


def live(broker: Broker) -> list[Connection]:
    """The broker's connections that are not closing."""
    return [c for c in broker.connections if c.close_code is None]


@pytest.fixture
async def restartable(nursery: trio.Nursery) -> Restartable:
    return Restartable(nursery)


# -- backoff ------------------------------------------------------------------------


def test_backoff_delay_is_full_jitter_within_bounds() -> None:
    settings = Reconnect(initial_delay=0.5, max_delay=8.0, factor=2.0)
    rng = random.Random(1234)
    ceilings = [0.5, 1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    assert [settings.ceiling(n) for n in range(7)] == ceilings
    for attempt, ceiling in enumerate(ceilings):
        delays = [settings.delay(attempt, rng) for _ in range(200)]
        assert all(0 <= d <= ceiling for d in delays)
        # Full jitter: spread over the whole range, not bunched at the top.
        assert min(delays) < ceiling * 0.1
        assert max(delays) > ceiling * 0.9
    # Seeded: reproducible.
    first = [settings.delay(n, random.Random(7)) for n in range(5)]
    assert first == [settings.delay(n, random.Random(7)) for n in range(5)]
    # A huge attempt number neither overflows nor exceeds the bound.
    assert settings.ceiling(10_000) == 8.0
    assert 0 <= settings.delay(10_000, rng) <= 8.0


def test_backoff_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="initial_delay"):
        Reconnect(initial_delay=2, max_delay=1)
    with pytest.raises(ValueError, match="factor"):
        Reconnect(factor=0.5)
    with pytest.raises(ValueError, match="max_attempts"):
        Reconnect(max_attempts=0)
    assert not Reconnect().gives_up(10**6)
    assert Reconnect(max_attempts=3).gives_up(3)
    assert not Reconnect(max_attempts=3).gives_up(2)


# -- reconnecting ----------------------------------------------------------------------


async def test_reconnects_after_the_broker_closes_the_connection(
    start_broker: BrokerFactory,
) -> None:
    broker = await start_broker()
    async with (
        open_client(broker.url, reconnect=FAST) as client,
        open_client(broker.url) as publisher,
        client.subscribe("t") as sub,
        client.subscribe("u.*") as other,
    ):
        assert await publisher.publish("t", "before") == 1
        assert await receive(sub) == Message("t", 1, "before")
        (conn,) = [c for c in broker.connections if c.subscriptions]
        conn.close(CloseCode.GOING_AWAY, "kicked")
        for subscription in (sub, other):
            assert await receive(subscription) == Interrupted(1001, "kicked")
            assert await receive(subscription) == Reconnected(1)
            # No history on the broker: what was missed cannot be replayed.
            resync = await receive(subscription)
            assert isinstance(resync, Resync)
            assert (resync.topic, resync.reason) == (subscription.pattern, "no_history")
        assert client.connected
        assert client.reconnects == 1
        # Both subscriptions are held again by the broker, on the new connection.
        (new,) = [c for c in broker.connections if c.subscriptions]
        assert new is not conn
        assert new.subscriptions == {"t", "u.*"}
        assert await publisher.publish("t", "after") == 2
        assert await receive_message(sub) == Message("t", 2, "after")
        await publisher.publish("u.x", "x")
        assert await receive_message(other) == Message("u.x", 1, "x")
        # The client's own requests work on the new connection.
        assert await client.publish("t", "mine") == 3
        assert await receive_message(sub) == Message("t", 3, "mine")


async def test_reconnects_after_the_tcp_connection_drops(start_broker: BrokerFactory) -> None:
    # No close frame: what a network failure or a killed broker looks like.
    broker = await start_broker()
    async with open_client(broker.url, reconnect=FAST) as client, client.subscribe("t") as sub:
        (conn,) = live(broker)
        assert isinstance(conn.stream, trio.SocketStream)
        conn.stream.socket.shutdown(socket.SHUT_RDWR)
        assert await receive(sub) == Interrupted(1006, "abnormal closure")
        assert await receive(sub) == Reconnected(1)
        assert isinstance(await receive(sub), Resync)
        assert await client.publish("t", "back") == 1
        assert await receive(sub) == Message("t", 1, "back")


async def test_reconnects_across_a_broker_restart(restartable: Restartable) -> None:
    await restartable.start()
    async with open_client(restartable.url, reconnect=FAST) as client, client.subscribe("t") as sub:
        assert await client.publish("t", "first") == 1
        assert await receive(sub) == Message("t", 1, "first")
        await restartable.stop()
        assert await receive(sub) == Interrupted(1001, "server shutting down")
        assert not client.connected
        assert not client.closed
        broker = await restartable.start()
        reconnected = await receive(sub)
        assert isinstance(reconnected, Reconnected)
        assert reconnected.attempts >= 1
        assert isinstance(await receive(sub), Resync)
        assert broker.hub.router.pattern_count == 1
        # A new broker: the numbering starts again, and nothing is taken for
        # a duplicate of what the old one sent.
        assert await client.publish("t", "second") == 1
        assert await receive_message(sub) == Message("t", 1, "second")


async def test_token_callback_is_called_before_each_connection(
    start_broker: BrokerFactory,
) -> None:
    broker = await start_broker(TWO_TOKENS)
    tokens = [TOKEN, BOB, TOKEN]
    calls = 0

    async def get_token() -> str:
        nonlocal calls
        calls += 1
        await trio.lowlevel.checkpoint()
        return tokens[calls - 1]

    async with (
        open_client(broker.url, get_token=get_token, reconnect=FAST) as client,
        client.subscribe("t") as sub,
    ):
        assert calls == 1
        (conn,) = broker.connections
        assert conn.identity.subject == "alice"
        for expected_calls, subject in [(2, "bob"), (3, "alice")]:
            kick(broker)
            assert isinstance(await receive(sub), Interrupted)
            assert isinstance(await receive(sub), Reconnected)
            assert isinstance(await receive(sub), Resync)
            assert calls == expected_calls
            (conn,) = live(broker)
            assert conn.identity.subject == subject


async def test_token_and_get_token_are_exclusive() -> None:
    async def get_token() -> str:
        return TOKEN

    with pytest.raises(ValueError, match="not both"):
        async with open_client("ws://127.0.0.1:1/ws", token=TOKEN, get_token=get_token):
            pass


async def test_refused_reconnection_raises_reconnect_failed(start_broker: BrokerFactory) -> None:
    # The broker now refuses the token (401): retrying cannot help.
    broker = await start_broker(TOKENS_CONFIG)
    tokens = iter([TOKEN, "revoked-token-0123456789"])

    async def get_token() -> str:
        return next(tokens)

    async with open_client(broker.url, get_token=get_token, reconnect=FAST) as client:
        async with client.subscribe("t") as sub:
            kick(broker)
            assert isinstance(await receive(sub), Interrupted)
            with pytest.raises(ReconnectFailed) as info:
                await receive(sub)
            assert info.value.error.status == 401
            assert info.value.attempts == 1
            assert info.value.code == 1001  # the lost connection's
            assert "gave up reconnecting after 1 attempt: HTTP 401" in str(info.value)
        assert client.closed
        with pytest.raises(ReconnectFailed):
            await client.publish("t", 1)


async def test_gives_up_after_max_attempts(restartable: Restartable) -> None:
    await restartable.start()
    settings = Reconnect(initial_delay=0.01, max_delay=0.01, max_attempts=3)
    async with (
        open_client(restartable.url, reconnect=settings) as client,
        client.subscribe("t") as sub,
    ):
        await restartable.stop()
        assert isinstance(await receive(sub), Interrupted)
        with pytest.raises(ReconnectFailed) as info:
            await receive(sub)
        assert info.value.attempts == 3
        assert info.value.error.status is None
        assert "refused" in info.value.error.reason.lower()
        assert client.closed


class KickOnSubscribe:
    """Once armed, closes (1001) every connection that subscribes."""

    def __init__(self) -> None:
        self.broker: Broker | None = None
        self.kicked = 0

    @hookimpl
    def broker_authorize(self, action: Action, client: ClientInfo | None) -> None:
        if self.broker is None or action is not Action.SUBSCRIBE or client is None:
            return
        (conn,) = [c for c in self.broker.connections if c.id == client.id]
        self.kicked += 1
        conn.close(CloseCode.GOING_AWAY, "kicked again")


async def test_connections_lost_before_resubscribing_count_as_failures(
    start_broker: BrokerFactory,
) -> None:
    kicker = KickOnSubscribe()

    def factory(settings: Mapping[str, Any], context: PluginContext) -> KickOnSubscribe:
        return kicker

    broker = await start_broker(
        {"plugins": {"enabled": ["kick", "noauth"]}}, factories={"kick": factory}
    )
    settings = Reconnect(initial_delay=0.01, max_delay=0.01, max_attempts=3)
    async with open_client(broker.url, reconnect=settings) as client, client.subscribe("t") as sub:
        kicker.broker = broker
        kick(broker)
        assert await receive(sub) == Interrupted(1001, "kicked")
        # Each new connection is accepted, then dropped while resubscribing.
        with pytest.raises(ReconnectFailed) as info:
            await receive(sub)
        assert info.value.attempts == 3
        assert kicker.kicked == 3
        assert "lost before resubscribing (1001): kicked again" in str(info.value)
        assert client.reconnects == 0


async def test_policy_close_is_not_reconnected(start_broker: BrokerFactory) -> None:
    broker = await start_broker()
    async with open_client(broker.url, reconnect=FAST) as client, client.subscribe("t") as sub:
        kick(broker, CloseCode.POLICY_VIOLATION, "go away")
        with pytest.raises(Disconnected) as info:
            await receive(sub)  # no Interrupted: the client is closed for good
        assert type(info.value) is Disconnected
        assert (info.value.code, info.value.reason) == (1008, "go away")
        assert client.closed
        assert client.reconnects == 0


async def test_refused_resubscription_ends_that_subscription(
    restartable: Restartable,
) -> None:
    await restartable.start()
    async with (
        open_client(restartable.url, reconnect=FAST) as client,
        client.subscribe("secret.plans") as secret,
        client.subscribe("public") as public,
    ):
        await restartable.stop()
        # The new broker does not allow secret.* any more.
        await restartable.start(
            {"plugins": {"enabled": ["deny", "noauth"]}}, factories={"deny": deny_factory}
        )
        assert isinstance(await receive(secret), Interrupted)
        with pytest.raises(Forbidden, match=r"secret\.plans"):
            await receive(secret)
        assert isinstance(await receive(public), Interrupted)
        assert isinstance(await receive(public), Reconnected)
        assert isinstance(await receive(public), Resync)
        assert isinstance(client.errors[-1], Forbidden)
        assert await client.publish("public", "still here") == 1
        assert await receive_message(public) == Message("public", 1, "still here")


# -- requests around a disconnection ---------------------------------------------------------


class Hold:
    """Holds every publish on ``hold.*`` in validation until released."""

    def __init__(self) -> None:
        self.entered = trio.Event()
        self.release = trio.Event()

    @hookimpl
    async def broker_validate(self, topic: str) -> None:
        if topic.startswith("hold."):
            self.entered.set()
            await self.release.wait()


async def test_in_flight_publish_raises_connection_lost(start_broker: BrokerFactory) -> None:
    hold = Hold()

    def factory(settings: Mapping[str, Any], context: PluginContext) -> Hold:
        return hold

    broker = await start_broker(
        {"plugins": {"enabled": ["hold", "noauth"]}}, factories={"hold": factory}
    )
    async with open_client(broker.url, reconnect=FAST) as client, client.subscribe("t") as sub:
        failure: list[BaseException] = []

        async def publish() -> None:
            try:
                await client.publish("hold.x", 1)
            except ConnectionLost as exc:
                failure.append(exc)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(publish)
            with trio.fail_after(WAIT):
                await hold.entered.wait()
            kick(broker)
        hold.release.set()
        (exc,) = failure
        assert isinstance(exc, Disconnected)
        assert (exc.code, exc.reason) == (1001, "kicked")
        # The client reconnects and goes on.
        assert isinstance(await receive(sub), Interrupted)
        assert isinstance(await receive(sub), Reconnected)
        assert await client.publish("t", "ok") == 1


async def test_requests_while_reconnecting_wait_for_the_connection(
    restartable: Restartable, nursery: trio.Nursery
) -> None:
    await restartable.start()
    async with open_client(restartable.url, reconnect=FAST) as client, client.subscribe("t") as sub:
        await restartable.stop()
        assert isinstance(await receive(sub), Interrupted)
        results: dict[str, Any] = {}
        subscribed = trio.Event()

        async def publish() -> None:
            results["seq"] = await client.publish("t", "queued")

        async def subscribe() -> None:
            async with client.subscribe("u") as later:
                subscribed.set()
                results["u"] = await receive(later)

        async with trio.open_nursery() as waiting:
            waiting.start_soon(publish)
            waiting.start_soon(subscribe)
            await trio.testing.wait_all_tasks_blocked()
            assert not results
            assert not subscribed.is_set()
            await restartable.start()
            with trio.fail_after(WAIT):
                await subscribed.wait()
            await client.publish("u", "for the pending subscribe")
        assert results["seq"] == 1
        assert results["u"] == Message("u", 1, "for the pending subscribe")


async def test_requests_while_reconnecting_time_out(restartable: Restartable) -> None:
    await restartable.start()
    settings = Reconnect(initial_delay=0.01, max_delay=0.05, wait_timeout=0.2)
    async with (
        open_client(restartable.url, reconnect=settings) as client,
        client.subscribe("t") as sub,
    ):
        await restartable.stop()
        assert isinstance(await receive(sub), Interrupted)
        with trio.fail_after(WAIT), pytest.raises(ConnectionLost, match="not reconnected within"):
            await client.publish("t", 1)
        with trio.fail_after(WAIT), pytest.raises(ConnectionLost):
            async with client.subscribe("u"):
                pytest.fail("subscribed without a connection")
        assert not client.closed  # still trying


async def test_aclose_during_backoff_returns_promptly(restartable: Restartable) -> None:
    await restartable.start()
    # Long delays: after the first failed attempts the client sits in backoff.
    settings = Reconnect(initial_delay=30, max_delay=30, factor=1)
    with trio.fail_after(WAIT):
        async with (
            open_client(restartable.url, reconnect=settings) as client,
            client.subscribe("t") as sub,
        ):
            await restartable.stop()
            assert isinstance(await receive(sub), Interrupted)
            with trio.fail_after(1):
                await client.aclose()
            assert client.closed
            with pytest.raises(Disconnected) as info:
                await receive(sub)
            assert info.value.code == 1000
    # Leaving the block joined the connection loop: no task was left behind.


async def test_no_reconnect_after_aclose(start_broker: BrokerFactory) -> None:
    broker = await start_broker()
    async with open_client(broker.url, reconnect=FAST) as client, client.subscribe("t") as sub:
        await client.aclose()
        with pytest.raises(Disconnected) as info:
            await receive(sub)
        assert type(info.value) is Disconnected
        assert info.value.code == 1000
    await wait_until(lambda: not broker.connections)
    assert client.reconnects == 0


# -- recovery through a broker that keeps history -----------------------------------------

HISTORY: dict[str, Any] = {"history": [{"pattern": "t.>", "size": 100}]}


def gated_token() -> tuple[trio.Event, Any]:
    """A get_token that returns at once the first time and, for every
    reconnection, only once the event is set: the test decides how long the
    client stays disconnected."""
    gate = trio.Event()
    calls = 0

    async def get_token() -> str:
        nonlocal calls
        calls += 1
        if calls > 1:
            await gate.wait()
        return TOKEN

    return gate, get_token


async def test_messages_published_while_disconnected_are_recovered(
    start_broker: BrokerFactory,
) -> None:
    broker = await start_broker(merge(TOKENS_CONFIG, HISTORY))
    gate, get_token = gated_token()
    async with (
        open_client(broker.url, token=TOKEN) as publisher,
        open_client(broker.url, get_token=get_token, reconnect=FAST) as client,
        client.subscribe("t.a") as exact,
        client.subscribe("t.*") as pattern,  # overlaps t.a
    ):
        await publisher.publish("t.a", "a1")
        await publisher.publish("t.b", "b1")
        assert await receive(exact) == Message("t.a", 1, "a1")
        assert [await receive(pattern), await receive(pattern)] == [
            Message("t.a", 1, "a1"),
            Message("t.b", 1, "b1"),
        ]
        kick(broker)
        assert await receive(exact) == Interrupted(1001, "kicked")
        assert await receive(pattern) == Interrupted(1001, "kicked")
        # Published while the client cannot reconnect (its token is pending):
        # t.c is a topic the pattern subscription has no position for.
        missed = [("t.a", "a2"), ("t.b", "b2"), ("t.a", "a3"), ("t.c", "c1")]
        for topic, data in missed:
            await publisher.publish(topic, data)
        gate.set()
        # Each subscription: back, then exactly what it missed, in order.
        assert await receive(exact) == Reconnected(1)
        assert [await receive(exact) for _ in range(2)] == [
            Message("t.a", 2, "a2"),
            Message("t.a", 3, "a3"),
        ]
        assert await receive(pattern) == Reconnected(1)
        assert [await receive(pattern) for _ in range(4)] == [
            Message("t.a", 2, "a2"),
            Message("t.b", 2, "b2"),
            Message("t.a", 3, "a3"),
            Message("t.c", 1, "c1"),
        ]
        # Then live, once each: no Resync, no duplicate of the replay (both
        # resubscriptions replayed t.a 2 and 3 on the one connection).
        await publisher.publish("t.a", "a4")
        assert await receive(exact) == Message("t.a", 4, "a4")
        assert await receive(pattern) == Message("t.a", 4, "a4")
        assert client.reconnects == 1


async def test_a_broker_restart_surfaces_as_resync(restartable: Restartable) -> None:
    restartable.config = HISTORY
    await restartable.start()
    async with (
        open_client(restartable.url, reconnect=FAST) as client,
        client.subscribe("t.a") as exact,
        client.subscribe("t.*") as pattern,
    ):
        for n in range(1, 4):
            await client.publish("t.a", n)
        for _ in range(3):
            await receive(exact)
            await receive(pattern)
        await restartable.stop()
        broker = await restartable.start()  # memory engine: history lost, new epochs
        assert isinstance(await receive(exact), Interrupted)
        assert isinstance(await receive(exact), Reconnected)
        topic_resync = await receive(exact)
        assert isinstance(topic_resync, Resync)
        assert (topic_resync.topic, topic_resync.reason) == ("t.a", "not_recovered")
        assert topic_resync.seq == 0  # the new broker has nothing on t.a yet
        assert topic_resync.epoch is not None
        assert isinstance(await receive(pattern), Interrupted)
        assert isinstance(await receive(pattern), Reconnected)
        resync = await receive(pattern)
        assert isinstance(resync, Resync)
        assert (resync.topic, resync.reason) == ("t.*", "not_recovered")
        # The new broker numbers from 1 again: delivered, not taken for a
        # duplicate of the old seq 1.
        assert broker.hub.router.pattern_count == 2
        assert await client.publish("t.a", "new") == 1
        first = await receive_message(exact)  # no second Resync before it
        assert first == Message("t.a", 1, "new")
        assert first.epoch == topic_resync.epoch
        assert await receive_message(pattern) == Message("t.a", 1, "new")


async def test_subscribe_with_history_and_the_history_command(
    start_broker: BrokerFactory,
) -> None:
    broker = await start_broker(HISTORY)
    async with open_client(broker.url) as client:
        for n in range(1, 6):
            await client.publish("t.a", n)
        async with client.subscribe("t.a", history=2) as sub:
            assert [await receive(sub), await receive(sub)] == [
                Message("t.a", 4, 4),
                Message("t.a", 5, 5),
            ]
            await client.publish("t.a", 6)
            assert await receive(sub) == Message("t.a", 6, 6)
        latest = await client.history("t.a", limit=2)
        assert [m.data for m in latest.messages] == [5, 6]
        assert (latest.seq, latest.recovered) == (6, None)
        assert latest.epoch is not None
        page = await client.history("t.a", since=(latest.epoch, 1), limit=3)
        assert [m.seq for m in page.messages] == [2, 3, 4]
        assert page.more
        rest = await client.history("t.a", since=(latest.epoch, 4))
        assert [m.seq for m in rest.messages] == [5, 6]
        assert not rest.more
        stale = await client.history("t.a", since=("another-epoch", 1))
        assert stale.recovered is False
        assert stale.messages == ()


async def test_subscribe_with_snapshot(start_broker: BrokerFactory) -> None:
    broker = await start_broker({"history": [{"pattern": "p.>", "size": 0, "snapshot": True}]})
    async with open_client(broker.url) as client:
        await client.publish("p.x", {"v": 1}, key="a")
        await client.publish("p.x", {"v": 2}, key="b")
        await client.publish("p.x", {"v": 3}, key="a")
        async with client.subscribe("p.x", snapshot=True) as sub:
            snapshot = [await receive_message(sub), await receive_message(sub)]
            assert all(m.snapshot for m in snapshot)
            assert sorted((m.key, m.seq, m.data["v"]) for m in snapshot) == [
                ("a", 3, 3),
                ("b", 2, 2),
            ]
            await client.publish("p.x", {"v": 4}, key="b")
            live = await receive_message(sub)
            assert (live.seq, live.snapshot) == (4, False)
