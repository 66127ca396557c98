"""Presence without sockets: the table, the rules, the members, the hub's events."""

from __future__ import annotations

import json
import math
from typing import Any

import msgpack
from hypothesis import given
from hypothesis import strategies as st

from broker import Identity, config_from_dict
from broker.core.config import PresenceRuleConfig
from broker.core.hub import Hub
from broker.core.presence import (
    PresenceInfo,
    PresenceRules,
    PresenceStats,
    PresenceTable,
    member_of,
)
from broker.core.protocol import Encoding
from broker.engine import MemoryEngine
from tests.test_hub import FakeSubscriber, payloads


def alice(**extra: Any) -> dict[str, Any]:
    return {"subject": "alice", **extra}


# -- the table ------------------------------------------------------------------------


def test_first_connection_joins_last_one_leaves() -> None:
    table = PresenceTable()
    assert table.join("chat.a", "c1", alice()) == {"subject": "alice", "connections": 1}
    # The same subject on a second connection: the same member, no event.
    assert table.join("chat.a", "c2", alice()) is None
    assert table.query("chat.a", 100) == PresenceInfo(
        1, 2, ({"subject": "alice", "connections": 2},)
    )
    assert table.leave("chat.a", "c1", alice()) is None
    assert table.query("chat.a", 100) == PresenceInfo(
        1, 1, ({"subject": "alice", "connections": 1},)
    )
    assert table.leave("chat.a", "c2", alice()) == {"subject": "alice", "connections": 0}
    assert table.query("chat.a", 100) == PresenceInfo(0, 0, ())


def test_joining_twice_and_leaving_what_was_never_joined_change_nothing() -> None:
    table = PresenceTable()
    assert table.join("t", "c1", alice()) is not None
    assert table.join("t", "c1", alice()) is None
    assert table.query("t", 10).connections == 1
    assert table.leave("t", "c9", alice()) is None  # not this connection
    assert table.leave("t", "c1", {"subject": "bob"}) is None  # not this member
    assert table.leave("other", "c1", alice()) is None  # not this topic
    assert table.stats() == PresenceStats(1, 1, 1)
    assert table.leave("t", "c1", alice()) is not None
    assert table.leave("t", "c1", alice()) is None


def test_counts_stay_exact_beyond_the_cap() -> None:
    table = PresenceTable()
    for n in range(250):
        subject = f"user{n:03}"
        for c in range(n % 3 + 1):  # 1 to 3 connections each
            table.join("room", f"{subject}/{c}", {"subject": subject})
    connections = sum(n % 3 + 1 for n in range(250))
    assert table.query("room", 100) == PresenceInfo(250, connections, None)
    info = table.query("room", 250)
    assert (info.count, info.connections) == (250, connections)
    assert info.members is not None
    assert [m["subject"] for m in info.members] == [f"user{n:03}" for n in range(250)]
    assert info.members[2] == {"subject": "user002", "connections": 3}
    assert table.stats() == PresenceStats(1, 250, connections)


def test_members_are_sorted_by_subject_and_keep_their_first_fields() -> None:
    table = PresenceTable()
    table.join("t", "c1", {"subject": "carol", "roles": ["a"]})
    table.join("t", "c2", {"subject": "alice"})
    table.join("t", "c3", {"subject": "carol", "roles": ["b"]})  # refreshed roles: not shown
    assert table.query("t", 10).members == (
        {"subject": "alice", "connections": 1},
        {"subject": "carol", "roles": ["a"], "connections": 2},
    )
    assert table.query("t", 1).members is None
    assert table.query("t", 0).members is None
    assert table.query("empty", 0) == PresenceInfo(0, 0, ())


def test_an_emptied_topic_is_forgotten() -> None:
    table = PresenceTable()
    for topic in ("a", "b"):
        table.join(topic, "c1", alice())
        table.join(topic, "c2", {"subject": "bob"})
    assert len(table) == 2
    assert table.stats() == PresenceStats(2, 4, 4)
    for topic in ("a", "b"):
        table.leave(topic, "c1", alice())
        table.leave(topic, "c2", {"subject": "bob"})
    assert len(table) == 0
    assert table._topics == {}
    assert table.stats() == PresenceStats(0, 0, 0)


OPS = st.lists(
    st.tuples(
        st.booleans(),  # join or leave
        st.sampled_from(["t1", "t2"]),
        st.sampled_from(["c1", "c2", "c3", "c4"]),
        st.sampled_from(["alice", "bob"]),
    ),
    max_size=60,
)


@given(OPS)
def test_events_and_counts_match_a_reference_model(ops: list[tuple[bool, str, str, str]]) -> None:
    """Join/leave in any order, any repetition: a join event exactly when a
    subject gains its first connection on a topic, a leave when it loses its
    last, and the counts of the model."""
    table = PresenceTable()
    model: dict[str, dict[str, set[str]]] = {}
    for joining, topic, connection, subject in ops:
        members = model.setdefault(topic, {})
        before = set(members.get(subject, set()))
        if joining:
            event = table.join(topic, connection, {"subject": subject})
            members.setdefault(subject, set()).add(connection)
            assert (event is not None) == (not before)
        else:
            event = table.leave(topic, connection, {"subject": subject})
            members.get(subject, set()).discard(connection)
            if not members.get(subject):
                members.pop(subject, None)
            assert (event is not None) == (before == {connection})
        if event is not None:
            assert event["subject"] == subject
        for name, subjects in model.items():
            info = table.query(name, 10)
            assert info.count == len(subjects)
            assert info.connections == sum(len(c) for c in subjects.values())
    assert len(table) == sum(1 for subjects in model.values() if subjects)


# -- rules and members ----------------------------------------------------------------


def rules(*entries: dict[str, Any]) -> tuple[PresenceRuleConfig, ...]:
    return config_from_dict({"presence": list(entries)}).presence


def test_the_first_matching_rule_applies_and_a_reload_starts_over() -> None:
    cache = PresenceRules()
    first = rules(
        {"pattern": "chat.vip", "max_members": 5},
        {"pattern": "chat.*", "fields": ["subject", "roles"]},
    )
    rule = cache.rule_for(first, "chat.vip")
    assert rule is not None and rule.max_members == 5
    rule = cache.rule_for(first, "chat.room")
    assert rule is not None and rule.fields == ("subject", "roles")
    assert cache.rule_for(first, "trades.x") is None
    assert cache.rule_for(first, "trades.x") is None  # cached "no rule"
    assert cache.rule_for((), "chat.room") is None
    reloaded = rules({"pattern": "trades.>"})
    assert cache.rule_for(reloaded, "chat.room") is None
    assert cache.rule_for(reloaded, "trades.x") is reloaded[0]


def test_the_rule_cache_is_bounded() -> None:
    cache = PresenceRules(cache_size=4)
    rs = rules({"pattern": "t.*"})
    for n in range(10):
        assert cache.rule_for(rs, f"t.{n}") is rs[0]
        assert len(cache._cache) <= 4


def test_member_shows_the_fields_the_rule_names() -> None:
    identity = Identity(
        "alice",
        frozenset({"writer", "admin"}),
        {"name": "Alice", "team": {"id": 7}, "avatar": b"\x89PNG", "score": math.nan},
        plugin="jwt",
    )
    assert member_of(identity, ("subject",)) == {"subject": "alice"}
    assert member_of(identity, ()) == {"subject": "alice"}
    assert member_of(
        identity,
        ("roles", "plugin", "claims.name", "claims.team", "claims.missing"),
    ) == {
        "subject": "alice",
        "roles": ["admin", "writer"],
        "plugin": "jwt",
        "claims": {"name": "Alice", "team": {"id": 7}},
    }
    # Values neither JSON nor msgpack can carry are left out.
    assert member_of(identity, ("claims.avatar", "claims.score")) == {"subject": "alice"}
    odd = Identity("x", frozenset({"ok", "bad\ud800"}), {"set": {1}, "t": (1,)})
    assert member_of(odd, ("roles", "claims.set", "claims.t")) == {"subject": "x"}
    # A subject always shows, made representable.
    shown = member_of(Identity("eve\ud800"), ())
    assert shown == {"subject": "eve\\ud800"}
    json.dumps(shown).encode()


# -- the hub's events -----------------------------------------------------------------


def make_hub(**config: Any) -> Hub:
    return Hub(config_from_dict(config).queue)


def test_events_go_to_watchers_only_encoded_once_per_encoding() -> None:
    hub = make_hub()
    watchers = [FakeSubscriber(Encoding.JSON), FakeSubscriber(Encoding.MSGPACK)]
    watchers.append(FakeSubscriber(Encoding.JSON))
    other = FakeSubscriber()
    for sub in watchers:
        hub.subscribe("chat.a", sub)
        hub.watch_presence("chat.a", sub)
    hub.subscribe("chat.a", other)  # subscribed, but did not ask for events
    hub.watch_presence("chat.b", other)
    member = {"subject": "alice", "connections": 1}
    assert hub.presence_event("chat.a", "join", member) == 3
    assert hub.presence_event("chat.c", "join", member) == 0
    assert payloads(other) == []
    event = {"op": "join", "topic": "chat.a", "member": member}
    for sub in watchers:
        assert sub.dirty
        assert payloads(sub) == [event]
    assert len(hub.dirty) == 3 and {id(s) for s in hub.dirty} == {id(s) for s in watchers}
    assert hub.presence_events == 3 and hub.pending == 3
    assert hub.delivered == 0  # not messages
    hub.flush()
    assert all(sub.flushes == 1 for sub in watchers)
    hub.unwatch_presence("chat.a", watchers[0])
    hub.unwatch_presence("chat.a", watchers[1])
    hub.unwatch_presence("chat.a", watchers[2])
    hub.unwatch_presence("chat.a", watchers[2])
    assert "chat.a" not in hub.presence_watchers
    assert hub.presence_event("chat.a", "leave", member) == 0


def test_subscribers_of_an_encoding_share_one_frame() -> None:
    hub = make_hub()
    subs = [FakeSubscriber(Encoding.MSGPACK) for _ in range(2)]
    for sub in subs:
        hub.watch_presence("t", sub)
    hub.presence_event("t", "leave", {"subject": "bob", "connections": 0})
    frames = [sub.outbox.take(1 << 20)[0] for sub in subs]
    assert frames[0] is frames[1]
    assert msgpack.unpackb(frames[0][2:]) == {
        "op": "leave",
        "topic": "t",
        "member": {"subject": "bob", "connections": 0},
    }


def test_events_are_bounded_like_messages() -> None:
    hub = make_hub(queue={"rules": [{"pattern": "room.*", "max_messages": 2}]})
    sub = FakeSubscriber()
    hub.watch_presence("room.a", sub)
    for n in range(5):
        hub.presence_event("room.a", "join", {"subject": f"u{n}", "connections": 1})
    # drop-oldest under the topic's rule: the two newest are queued.
    assert [e["member"]["subject"] for e in payloads(sub)] == ["u3", "u4"]
    assert sub.outbox.dropped_total == 3
    disconnect = make_hub(queue={"rules": [{"pattern": "room.*", "policy": "disconnect"}]})
    slow = FakeSubscriber(max_messages=1)
    disconnect.watch_presence("room.a", slow)
    disconnect.presence_event("room.a", "join", {"subject": "a", "connections": 1})
    disconnect.presence_event("room.a", "join", {"subject": "b", "connections": 1})
    assert slow.slow and disconnect.slow_consumers == 1


def test_under_conflate_an_event_and_an_unkeyed_message_do_not_replace_each_other() -> None:
    hub = make_hub(queue={"rules": [{"pattern": "room.*", "policy": "conflate"}]})
    sub = FakeSubscriber()
    hub.subscribe("room.a", sub)
    hub.watch_presence("room.a", sub)
    hub.deliver("room.a", 1, "hello", None)
    hub.presence_event("room.a", "join", {"subject": "a", "connections": 1})
    hub.deliver("room.a", 2, "again", None)  # conflates seq 1 only
    hub.presence_event("room.a", "leave", {"subject": "a", "connections": 0})
    assert [(e["op"], e.get("seq")) for e in payloads(sub)] == [
        ("join", None),
        ("msg", 2),
        ("leave", None),
    ]


async def test_memory_engine_hands_events_to_the_hub() -> None:
    hub = make_hub()
    engine = MemoryEngine(hub)
    sub = FakeSubscriber()
    hub.watch_presence("t", sub)
    await engine.presence_join("t", "c1", alice())
    await engine.presence_join("t", "c2", alice())
    assert await engine.presence("t", 10) == PresenceInfo(
        1, 2, ({"subject": "alice", "connections": 2},)
    )
    await engine.presence_leave("t", "c1", alice())
    await engine.presence_leave("t", "c2", alice())
    assert [e["op"] for e in payloads(sub)] == ["join", "leave"]
    assert engine.presence_stats() == PresenceStats(0, 0, 0)
