"""Presence over a live broker: join/leave events, the ``presence`` command,
authorization, bad requests, connections that vanish, an awaiting engine."""

from __future__ import annotations

import random
import socket
import struct
from collections import Counter
from typing import Any

import pytest
import trio

from broker import Broker
from broker.engine import Delivery, MemoryEngine
from tests.conftest import BrokerFactory
from tests.helpers import Client, RawClient, connect, raw_connect, wait_until
from tests.plugin_helpers import as_user, header_auth
from tests.redis_service import delete_prefix, needs_machine_redis, unique_prefix
from tests.test_engine_seam import start_yielding

REDIS_URL = "redis://127.0.0.1:6379/0"

PRESENCE = {"pattern": "chat.>", "fields": ["subject", "roles"], "max_members": 100}


def tokens_config(subjects: list[str], **extra: Any) -> dict[str, Any]:
    """The tokens plugin with one token per subject (``token-SUBJECT-0123456789``),
    noauth after it for clients without a token (subject ``anonymous``)."""
    entries = [{"id": s, "token": token(s), "roles": [f"r-{s}"]} for s in subjects]
    return {
        "plugins": {"enabled": ["tokens", "noauth"]},
        "plugin": {"tokens": {"tokens": entries}},
        "presence": [PRESENCE],
        **extra,
    }


def token(subject: str) -> str:
    return f"token-{subject}-0123456789"


def url_for(broker: Broker, subject: str) -> str:
    return f"{broker.url}?token={token(subject)}"


def member(subject: str, connections: int) -> dict[str, Any]:
    return {"subject": subject, "roles": [f"r-{subject}"], "connections": connections}


async def watch(client: Client, topic: str) -> None:
    """``sub`` with presence events: the ok, then (first connection) its own join."""
    reply = await client.request({"op": "sub", "id": "w", "topic": topic, "presence": True})
    assert reply == {"op": "ok", "id": "w"}, reply


async def events(client: Client, n: int) -> list[dict[str, Any]]:
    got = [await client.recv() for _ in range(n)]
    assert all(e["op"] in ("join", "leave") for e in got), got
    return got


async def query(client: Client, topic: str) -> dict[str, Any]:
    reply = await client.request({"op": "presence", "id": "q", "topic": topic})
    assert reply["op"] == "ok", reply
    return reply


# -- events and counts ----------------------------------------------------------------

SUBJECTS = [f"user{n:02}" for n in range(25)]
PER_SUBJECT = 4  # 100 connections


async def test_join_and_leave_events_and_exact_counts_over_100_connections(
    start_broker: BrokerFactory,
) -> None:
    broker = await start_broker(tokens_config([*SUBJECTS, "watcher"]))
    topic = "chat.lobby"
    leave_now = {(s, i): trio.Event() for s in SUBJECTS for i in range(PER_SUBJECT)}
    gone = {key: trio.Event() for key in leave_now}

    async def connection(
        subject: str, index: int, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        async with connect(url_for(broker, subject)) as client:
            await client.sub(topic)
            task_status.started()
            await leave_now[subject, index].wait()
            if index % 2:  # half unsubscribe first, half just close
                reply = await client.request({"op": "unsub", "id": "u", "topic": topic})
                assert reply == {"op": "ok", "id": "u"}
        gone[subject, index].set()

    async with connect(url_for(broker, "watcher")) as watcher, trio.open_nursery() as nursery:
        await watch(watcher, topic)
        assert await watcher.recv() == {
            "op": "join",
            "topic": topic,
            "member": member("watcher", 1),
        }
        for index in range(PER_SUBJECT):
            for subject in SUBJECTS:
                await nursery.start(connection, subject, index)
        # One join per subject, on its first connection; nothing else pending.
        joins = await events(watcher, len(SUBJECTS))
        assert joins == [{"op": "join", "topic": topic, "member": member(s, 1)} for s in SUBJECTS]
        await watcher.assert_alive()

        reply = await query(watcher, topic)
        assert (reply["count"], reply["connections"]) == (26, 101)
        assert reply["members"] == sorted(
            [member(s, PER_SUBJECT) for s in SUBJECTS] + [member("watcher", 1)],
            key=lambda m: m["subject"],
        )
        stats = broker.stats_snapshot()["presence"]
        assert stats == {"topics": 1, "members": 26, "connections": 101, "events": 26}
        registry = broker.metrics.registry
        assert registry.get_sample_value("broker_presence_members") == 26
        assert registry.get_sample_value("broker_presence_connections") == 101
        assert registry.get_sample_value("broker_presence_topics") == 1

        # All but the last connection of each subject go: no leave yet.
        for index in range(PER_SUBJECT - 1):
            for subject in SUBJECTS:
                leave_now[subject, index].set()
                await gone[subject, index].wait()
        await wait_until(lambda: len(broker.connections) == len(SUBJECTS) + 1)
        await watcher.assert_alive()
        reply = await query(watcher, topic)
        assert (reply["count"], reply["connections"]) == (26, 26)
        # The last ones: one leave per subject.
        for subject in SUBJECTS:
            leave_now[subject, PER_SUBJECT - 1].set()
        leaves = await events(watcher, len(SUBJECTS))
        assert sorted(e["member"]["subject"] for e in leaves) == SUBJECTS
        assert all(
            e == {"op": "leave", "topic": topic, "member": member(e["member"]["subject"], 0)}
            for e in leaves
        )
        reply = await query(watcher, topic)
        assert reply == {
            "op": "ok",
            "id": "q",
            "count": 1,
            "connections": 1,
            "members": [member("watcher", 1)],
        }
    await wait_until(lambda: broker.engine.presence_stats().members == 0)
    assert broker.stats_snapshot()["presence"]["topics"] == 0


async def test_members_are_listed_up_to_the_cap_counts_stay_exact(
    start_broker: BrokerFactory,
) -> None:
    subjects = ["a", "b", "c"]
    config = tokens_config(subjects)
    config["presence"] = [{"pattern": "chat.>", "max_members": 2}]
    broker = await start_broker(config)
    async with (
        connect(url_for(broker, "a")) as a,
        connect(url_for(broker, "b")) as b,
        connect(url_for(broker, "c")) as c,
    ):
        await a.sub("chat.x")
        await b.sub("chat.x")
        assert await query(a, "chat.x") == {
            "op": "ok",
            "id": "q",
            "count": 2,
            "connections": 2,
            "members": [{"subject": "a", "connections": 1}, {"subject": "b", "connections": 1}],
        }
        await c.sub("chat.x")
        assert await query(c, "chat.x") == {"op": "ok", "id": "q", "count": 3, "connections": 3}
        # Nobody there yet: an empty list.
        assert await query(c, "chat.y") == {
            "op": "ok",
            "id": "q",
            "count": 0,
            "connections": 0,
            "members": [],
        }


async def test_patterns_do_not_count_and_events_come_after_the_ok(
    start_broker: BrokerFactory,
) -> None:
    broker = await start_broker(tokens_config(["alice", "bob"]))
    async with connect(url_for(broker, "alice")) as alice, connect(url_for(broker, "bob")) as bob:
        await bob.sub("chat.*")  # a pattern: not a member
        await bob.sub("chat.room")  # a plain sub: a member, no events
        await watch(alice, "chat.room")
        assert await alice.recv() == {
            "op": "join",
            "topic": "chat.room",
            "member": member("alice", 1),
        }
        assert (await query(alice, "chat.room"))["count"] == 2
        await bob.assert_alive()  # bob asked for no events
        # Subscribing again with presence starts the events of a topic held.
        await bob.request({"op": "sub", "id": 1, "topic": "chat.room", "presence": True})
        await alice.request({"op": "unsub", "id": 2, "topic": "chat.room"})
        assert await bob.recv() == {
            "op": "leave",
            "topic": "chat.room",
            "member": member("alice", 0),
        }
        await alice.assert_alive()  # no leave of its own after its unsub


# -- authorization and bad requests ---------------------------------------------------


async def test_presence_needs_subscribe_authorization(start_broker: BrokerFactory) -> None:
    acl = {"rules": [{"roles": ["user"], "subscribe": ["chat.public", "chat.{sub}"]}]}
    broker = await start_broker(
        {
            "plugins": {"enabled": ["headerauth", "acl"]},
            "plugin": {"acl": acl},
            "presence": [{"pattern": "chat.*", "fields": ["subject", "claims.name"]}],
        },
        factories=header_auth(),
    )
    async with connect(broker.url, headers=as_user("alice", "user", name="Alice")) as alice:
        await alice.sub("chat.public")
        reply = await alice.request({"op": "presence", "id": 1, "topic": "chat.bob"})
        assert reply == {
            "op": "err",
            "id": 1,
            "code": "forbidden",
            "message": "not allowed to subscribe to chat.bob",
        }
        reply = await alice.request({"op": "sub", "id": 2, "topic": "chat.bob", "presence": True})
        assert reply["code"] == "forbidden"
        assert broker.stats.forbidden == 2
        assert await query(alice, "chat.public") == {
            "op": "ok",
            "id": "q",
            "count": 1,
            "connections": 1,
            "members": [{"subject": "alice", "claims": {"name": "Alice"}, "connections": 1}],
        }
        assert await query(alice, "chat.alice") == {
            "op": "ok",
            "id": "q",
            "count": 0,
            "connections": 0,
            "members": [],
        }


async def test_bad_requests(start_broker: BrokerFactory) -> None:
    broker = await start_broker({"presence": [{"pattern": "chat.>"}]})
    async with connect(broker.url) as client:
        cases = [
            (
                {"op": "sub", "id": 1, "topic": "chat.*", "presence": True},
                "presence needs a topic, not a pattern",
            ),
            (
                {"op": "sub", "id": 2, "topic": "trades.x", "presence": True},
                "no presence for trades.x",
            ),
            ({"op": "presence", "id": 3, "topic": "trades.x"}, "no presence for trades.x"),
        ]
        for command, message in cases:
            reply = await client.request(command)
            assert reply == {
                "op": "err",
                "id": command["id"],
                "code": "bad_request",
                "message": message,
            }
        for command in [
            {"op": "presence", "id": 4, "topic": "chat.*"},
            {"op": "presence", "id": 5},
            {"op": "sub", "id": 6, "topic": "chat.x", "presence": "yes"},
        ]:
            reply = await client.request(command)
            assert (reply["op"], reply["id"], reply["code"]) == (
                "err",
                command["id"],
                "bad_request",
            )
        # A refused presence sub subscribed to nothing.
        for topic in ("chat.*", "trades.x"):
            reply = await client.request({"op": "unsub", "id": 7, "topic": topic})
            assert reply["message"] == f"not subscribed to {topic}"
        # Without the option, a topic no rule covers is an ordinary sub.
        await client.sub("trades.x")
        assert len(broker.hub.presence_watchers) == 0
        assert broker.engine.presence_stats().connections == 0


# -- connections that vanish ----------------------------------------------------------


def abort(raw: RawClient) -> None:
    """Reset the TCP connection: no close frame, no FIN."""
    raw.stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    raw.stream.socket.close()


async def test_an_aborted_connection_is_counted_out(start_broker: BrokerFactory) -> None:
    broker = await start_broker(tokens_config(["alice"]))
    async with connect(url_for(broker, "alice")) as alice:
        await watch(alice, "chat.room")
        await alice.recv()  # its own join
        raw = await RawClient.open(broker.url)  # no token: anonymous
        await raw.send({"op": "sub", "id": 1, "topic": "chat.room"})
        assert await raw.recv() == {"op": "ok", "id": 1}
        joined = await alice.recv()
        assert joined == {
            "op": "join",
            "topic": "chat.room",
            "member": {"subject": "anonymous", "roles": [], "connections": 1},
        }
        abort(raw)
        assert await alice.recv() == {
            "op": "leave",
            "topic": "chat.room",
            "member": {"subject": "anonymous", "roles": [], "connections": 0},
        }
        assert (await query(alice, "chat.room"))["count"] == 1


async def test_a_silent_connection_is_counted_out_after_its_ping_timeout(
    start_broker: BrokerFactory,
) -> None:
    """A client that stops reading and answering (its host went away): the
    heartbeat drops it, it never answers the close frame either, and it is
    still counted out."""
    config = tokens_config(["alice"], limits={"ping_interval": 0.1, "ping_timeout": 0.2})
    broker = await start_broker(config)
    async with connect(url_for(broker, "alice")) as alice, raw_connect(broker.url) as raw:
        await watch(alice, "chat.room")
        await alice.recv()
        await raw.send({"op": "sub", "id": 1, "topic": "chat.room"})
        assert await raw.recv() == {"op": "ok", "id": 1}
        assert (await alice.recv())["op"] == "join"
        # raw reads nothing from now on.
        assert await alice.recv() == {
            "op": "leave",
            "topic": "chat.room",
            "member": {"subject": "anonymous", "roles": [], "connections": 0},
        }
        await wait_until(lambda: len(broker.connections) == 1)
        assert (await query(alice, "chat.room"))["connections"] == 1


# -- an engine that awaits --------------------------------------------------------------


@pytest.mark.parametrize(
    ("engine_name", "seed"),
    [
        ("yielding", 11),
        ("yielding", 12),
        ("yielding", 13),
        pytest.param("redis", 11, marks=needs_machine_redis),
    ],
)
async def test_presence_stays_exact_over_an_awaiting_engine(
    start_broker: BrokerFactory, engine_name: str, seed: int
) -> None:
    """Joins and leaves interleave at random over the YieldingEngine, whose
    events reach the hub from its own task, and over the Redis engine: the
    counts stay exact and each subject's events alternate join, leave, join..."""
    subjects = [f"u{n}" for n in range(8)]
    config = tokens_config([*subjects, "watcher", "marker"])
    if engine_name == "redis":
        prefix = unique_prefix()
        config = {**config, "engine": {"type": "redis", "url": REDIS_URL, "prefix": prefix}}
        broker = await start_broker(config)
        try:
            await _presence_stays_exact(broker, seed, subjects)
            await wait_until(lambda: broker.engine.presence_stats().members == 0)
        finally:
            await delete_prefix(REDIS_URL, prefix)
        return
    broker, engine = await start_yielding(config, start_broker=start_broker, seed=seed)
    await _presence_stays_exact(broker, seed, subjects)
    await wait_until(lambda: engine.presence_table.stats().members == 0)


async def _presence_stays_exact(broker: Broker, seed: int, subjects: list[str]) -> None:
    topic = "chat.busy"
    rng = random.Random(seed)
    plan = [rng.choice(subjects) for _ in range(40)]
    present: Counter[str] = Counter()

    def count(event: dict[str, Any]) -> str:
        subject: str = event["member"]["subject"]
        present[subject] += 1 if event["op"] == "join" else -1
        assert present[subject] in (0, 1), event
        return subject

    async with connect(url_for(broker, "watcher")) as watcher:
        await watch(watcher, topic)
        assert (await watcher.recv())["member"] == member("watcher", 1)
        settled = trio.Semaphore(0)
        done = trio.Event()

        async def connection(subject: str, n: int) -> None:
            async with connect(url_for(broker, subject)) as client:
                await client.sub(topic)
                if n % 3 == 0:  # some leave and come back
                    await client.request({"op": "unsub", "id": "u", "topic": topic})
                    await client.sub(topic)
                # Commands run in order: once pinged, the sub's join is done.
                await client.assert_alive()
                settled.release()
                await done.wait()

        async with trio.open_nursery() as nursery:
            for n, subject in enumerate(plan):
                nursery.start_soon(connection, subject, n)
            for _ in plan:
                await settled.acquire()
            async with connect(url_for(broker, "marker")) as marker:
                # The engine's stream is ordered: once the marker's join
                # arrives, every earlier event has.
                await marker.sub(topic)
                while count(await watcher.recv()) != "marker":
                    pass
                assert {s for s in present if present[s]} == {*plan, "marker"}
                reply = await query(watcher, topic)
                assert (reply["count"], reply["connections"]) == (len(set(plan)) + 2, len(plan) + 2)
                assert {m["subject"]: m["connections"] for m in reply["members"]} == {
                    **Counter(plan),
                    "watcher": 1,
                    "marker": 1,
                }
                done.set()
        # Everyone else left: one leave per subject.
        while any(present.values()):
            event = await watcher.recv()
            assert event["op"] == "leave", event
            count(event)
        assert await query(watcher, topic) == {
            "op": "ok",
            "id": "q",
            "count": 1,
            "connections": 1,
            "members": [member("watcher", 1)],
        }


class StuckJoinEngine(MemoryEngine):
    """A MemoryEngine whose joins of ``anonymous`` never return (a remote
    engine that stopped answering), after the join's step or before it."""

    def __init__(self, delivery: Delivery, *, step_first: bool) -> None:
        super().__init__(delivery)
        self.step_first = step_first
        self.stuck = trio.Event()
        self.left = trio.Event()

    async def presence_join(self, topic: str, connection: str, member: dict[str, Any]) -> None:
        if member["subject"] != "anonymous":
            return await super().presence_join(topic, connection, member)
        if self.step_first:
            await super().presence_join(topic, connection, member)
        self.stuck.set()
        await trio.sleep_forever()

    async def presence_leave(self, topic: str, connection: str, member: dict[str, Any]) -> None:
        await super().presence_leave(topic, connection, member)
        if member["subject"] == "anonymous":
            self.left.set()


@pytest.mark.parametrize("step_first", [True, False], ids=["joined", "not-joined"])
async def test_a_connection_closed_while_its_join_is_in_flight_is_counted_out(
    start_broker: BrokerFactory, step_first: bool
) -> None:
    """The join may or may not have happened when the close cancels it: the
    connection leaves anyway, and a leave of what never joined is nothing."""
    engines: list[StuckJoinEngine] = []

    def make(delivery: Delivery) -> StuckJoinEngine:
        engines.append(StuckJoinEngine(delivery, step_first=step_first))
        return engines[-1]

    config = tokens_config(["alice"], limits={"ping_interval": 0.1, "ping_timeout": 0.2})
    broker = await start_broker(config, engine=make)
    (engine,) = engines
    async with connect(url_for(broker, "alice")) as alice, raw_connect(broker.url) as raw:
        await watch(alice, "chat.room")
        await alice.recv()
        await raw.send({"op": "sub", "id": 1, "topic": "chat.room"})
        await engine.stuck.wait()
        # raw's command never ends, so its reader reads nothing more: the
        # heartbeat closes it (no pong), which cancels the join.
        await engine.left.wait()
        if step_first:
            assert (await alice.recv())["op"] == "join"
            assert await alice.recv() == {
                "op": "leave",
                "topic": "chat.room",
                "member": {"subject": "anonymous", "roles": [], "connections": 0},
            }
        await alice.assert_alive()
        assert await query(alice, "chat.room") == {
            "op": "ok",
            "id": "q",
            "count": 1,
            "connections": 1,
            "members": [member("alice", 1)],
        }
