"""broker.client when a resubscription after a reconnect is answered
``unavailable``: the broker's cluster backend could not take it (yet). The
client retries it, with the same ``since``, after a backoff, until the
broker answers; what was published meanwhile is replayed, once.

Real brokers on the machine's Redis (a key prefix and an ACL user of the
test's own). Broker ``b``, the subscriber's, logs in as that user; the test
takes ``FCALL`` away from it, so that every ``sub`` that reads a position
from Redis is answered ``unavailable`` (Redis' ``NOPERM``), and kills b's
fan-out link so that b tells its subscribers to resume (1012). Broker ``a``
(the default user) publishes meanwhile. Waits are on subscription items,
replies, or polled client state, bounded; nothing sleeps to synchronise.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import pytest
import trio

from broker import Action, Broker, Identity, PluginContext, hookimpl
from broker.client import (
    Client,
    Disconnected,
    Forbidden,
    Interrupted,
    Item,
    Message,
    Reconnect,
    Reconnected,
    Subscription,
    Unavailable,
    open_client,
)
from tests.conftest import BrokerFactory, merge
from tests.helpers import wait_until
from tests.redis_service import (
    MACHINE_URL,
    MachineUser,
    delete_prefix,
    machine_user,
    needs_machine_redis,
    unique_prefix,
)

pytestmark = needs_machine_redis

WAIT = 10.0
HISTORY = {"history": [{"pattern": "t.>", "size": 100, "ttl": 60.0}]}
#: Reconnect, and retry, at once (within 10 ms): tests wait on events, not delays.
FAST = Reconnect(initial_delay=0.01, max_delay=0.05)
Node = Callable[..., Awaitable[Broker]]


@pytest.fixture
async def prefix() -> AsyncIterator[str]:
    value = unique_prefix()
    yield value
    await delete_prefix(MACHINE_URL, value)


@pytest.fixture
async def user(prefix: str) -> AsyncIterator[MachineUser]:
    async with machine_user(prefix) as value:
        yield value


@pytest.fixture
def node(start_broker: BrokerFactory, prefix: str) -> Node:
    """A broker on the machine's Redis, on the test's prefix (as *url*)."""

    async def start(
        url: str = MACHINE_URL, config: dict[str, Any] | None = None, **options: Any
    ) -> Broker:
        base = {"engine": {"type": "redis", "url": url, "prefix": prefix}}
        broker = await start_broker(merge(merge(base, HISTORY), config or {}), **options)
        await wait_until(lambda: broker.readiness()[0], WAIT)
        return broker

    return start


async def receive(subscription: Subscription) -> Item:
    with trio.fail_after(WAIT):
        return await subscription.receive()


async def messages(subscription: Subscription, count: int) -> list[tuple[str, int, Any]]:
    got = []
    for _ in range(count):
        item = await receive(subscription)
        assert isinstance(item, Message), item
        got.append((item.topic, item.seq, item.data))
    return got


def unavailable(client: Client) -> int:
    """How many resubscriptions the broker answered ``unavailable`` so far."""
    return sum(isinstance(e, Unavailable) and "NOPERM" in e.message for e in client.errors)


async def outage(user: MachineUser, *subscriptions: Subscription) -> None:
    """b's Redis user may no longer call the broker's function, and b's
    fan-out link is dropped: b closes its subscribers with 1012, and their
    resubscriptions are answered ``unavailable``."""
    await user.deny("fcall")
    assert await user.kill_pubsub() == 1
    for subscription in subscriptions:
        item = await receive(subscription)
        assert isinstance(item, Interrupted) and item.code == 1012, item


async def test_a_resubscription_answered_unavailable_is_retried_and_misses_nothing(
    user: MachineUser, node: Node
) -> None:
    a, b = await node(), await node(user.url)
    async with (
        open_client(a.url) as publisher,
        open_client(b.url, reconnect=FAST) as client,
        client.subscribe("t.a") as exact,
        client.subscribe("t.*") as pattern,  # resumes with a cursor
    ):
        await publisher.publish("t.a", "a1")
        await publisher.publish("t.b", "b1")
        assert await messages(exact, 1) == [("t.a", 1, "a1")]
        assert await messages(pattern, 2) == [("t.a", 1, "a1"), ("t.b", 1, "b1")]
        await outage(user, exact, pattern)
        # Both resubscriptions were refused, then refused again: retried.
        await wait_until(lambda: unavailable(client) >= 4, WAIT)
        # The connection itself is up: requests that need no Redis go on.
        assert client.connected
        await client.ping()
        # Published while b cannot resubscribe: history keeps them.
        await publisher.publish("t.a", "a2")
        await publisher.publish("t.b", "b2")
        await publisher.publish("t.a", "a3")
        await user.allow("fcall")
        assert await receive(exact) == Reconnected(1)
        assert await messages(exact, 2) == [("t.a", 2, "a2"), ("t.a", 3, "a3")]
        assert await receive(pattern) == Reconnected(1)
        assert await messages(pattern, 3) == [
            ("t.a", 2, "a2"),
            ("t.b", 2, "b2"),
            ("t.a", 3, "a3"),
        ]
        # Then live, once each: no Resync, no duplicate.
        await publisher.publish("t.a", "a4")
        assert await messages(exact, 1) == [("t.a", 4, "a4")]
        assert await messages(pattern, 1) == [("t.a", 4, "a4")]
        assert client.reconnects == 1
        (conn,) = [c for c in b.connections if c.subscriptions]
        assert conn.subscriptions == {"t.a", "t.*"}


async def test_a_subscribe_of_a_pattern_being_retried_joins_it(
    user: MachineUser, node: Node
) -> None:
    """A ``subscribe()`` of the pattern while its resubscription is retried
    waits for it, then shares it: the first block's position is kept (no
    fresh ``sub`` that would start it over)."""
    a, b = await node(), await node(user.url)
    async with (
        open_client(a.url) as publisher,
        open_client(b.url, reconnect=FAST) as client,
        client.subscribe("t.a") as first,
    ):
        await publisher.publish("t.a", 1)
        assert await messages(first, 1) == [("t.a", 1, 1)]
        await outage(user, first)
        await wait_until(lambda: unavailable(client) >= 2, WAIT)
        await publisher.publish("t.a", 2)
        joined, leave = trio.Event(), trio.Event()
        second: list[Subscription] = []

        async def join() -> None:
            async with client.subscribe("t.a") as sub:
                second.append(sub)
                joined.set()
                await leave.wait()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(join)
            # The retries go on, and the new block waits for them.
            await wait_until(lambda: unavailable(client) >= 4, WAIT)
            assert not joined.is_set()
            await user.allow("fcall")
            with trio.fail_after(WAIT):
                await joined.wait()
            assert await receive(first) == Reconnected(1)
            assert await messages(first, 1) == [("t.a", 2, 2)]
            await publisher.publish("t.a", 3)
            assert await messages(first, 1) == [("t.a", 3, 3)]
            # The new block gets what comes after it joined: the replay may
            # or may not (it follows the ok that let it in), then live.
            seen = await messages(second[0], 1)
            if seen[0][1] == 2:
                seen += await messages(second[0], 1)
            assert seen[-1] == ("t.a", 3, 3)
            leave.set()


class Gate:
    """Refuses subscribing to the topics in :attr:`denied` (``forbidden``)."""

    def __init__(self) -> None:
        self.denied: set[str] = set()

    @hookimpl
    def broker_authorize(self, identity: Identity, action: Action, topic: str) -> bool | None:
        return False if action is Action.SUBSCRIBE and topic in self.denied else None


async def test_a_refusal_while_retrying_ends_that_subscription(
    user: MachineUser, node: Node
) -> None:
    gate = Gate()

    def factory(settings: Mapping[str, Any], context: PluginContext) -> Gate:
        return gate

    a = await node()
    b = await node(
        user.url, {"plugins": {"enabled": ["gate", "noauth"]}}, factories={"gate": factory}
    )
    async with (
        open_client(a.url) as publisher,
        open_client(b.url, reconnect=FAST) as client,
        client.subscribe("t.a") as denied,
        client.subscribe("t.b") as kept,
    ):
        await publisher.publish("t.a", 1)
        await publisher.publish("t.b", 1)
        assert await messages(denied, 1) == [("t.a", 1, 1)]
        assert await messages(kept, 1) == [("t.b", 1, 1)]
        await outage(user, denied, kept)
        await wait_until(lambda: unavailable(client) >= 2, WAIT)
        gate.denied.add("t.a")  # the next try of t.a is refused for good
        with pytest.raises(Forbidden, match=r"t\.a"):
            await receive(denied)
        assert isinstance(client.errors[-1], Forbidden)
        await publisher.publish("t.b", 2)
        await user.allow("fcall")
        assert await receive(kept) == Reconnected(1)
        assert await messages(kept, 1) == [("t.b", 2, 2)]


async def test_max_attempts_bounds_the_retries(user: MachineUser, node: Node) -> None:
    a, b = await node(), await node(user.url)
    settings = Reconnect(initial_delay=0.01, max_delay=0.01, max_attempts=3)
    async with (
        open_client(a.url) as publisher,
        open_client(b.url, reconnect=settings) as client,
        client.subscribe("t.a") as sub,
    ):
        await publisher.publish("t.a", 1)
        assert await messages(sub, 1) == [("t.a", 1, 1)]
        await outage(user, sub)
        with pytest.raises(Unavailable, match="NOPERM"):
            await receive(sub)
        assert unavailable(client) == 3
        assert client.connected


async def test_closing_the_client_while_retrying_ends_cleanly(
    user: MachineUser, node: Node
) -> None:
    b = await node(user.url)
    # Retries soon at first, then after up to 10 s, then up to 60 s.
    settings = Reconnect(initial_delay=0.01, max_delay=60, factor=1000)
    with trio.fail_after(WAIT):
        async with open_client(b.url, reconnect=settings) as client, client.subscribe("t.a") as sub:
            await outage(user, sub)
            await wait_until(lambda: unavailable(client) >= 2, WAIT)
            with trio.fail_after(1):
                await client.aclose()
            with pytest.raises(Disconnected) as info:
                await receive(sub)
            assert type(info.value) is Disconnected and info.value.code == 1000
    # Leaving the block joined the client's tasks, the retry included.
    await wait_until(lambda: not b.connections, WAIT)


async def test_a_fresh_subscribe_answered_unavailable_raises(user: MachineUser, node: Node) -> None:
    """Not a resubscription: the caller asked, the caller is told (and may
    try again)."""
    b = await node(user.url)
    async with open_client(b.url, reconnect=FAST) as client:
        await user.deny("fcall")
        with pytest.raises(Unavailable, match="NOPERM"):
            async with client.subscribe("t.a"):
                pytest.fail("subscribed while Redis refuses")
        await user.allow("fcall")
        async with client.subscribe("t.a"):
            pass
        assert client.reconnects == 0
