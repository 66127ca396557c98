"""Presence: who is subscribed to a topic (sans-I/O).

A topic that a ``[[presence]]`` rule matches keeps its **members**: one per
identity (``Identity.subject``) with a connection subscribed to the topic
(an exact-topic ``sub``; patterns do not count). A member shows the fields
its rule names and how many of its connections are there.

:class:`PresenceTable` is the table of one engine (the
:class:`~broker.engine.MemoryEngine` keeps one for the process; a cluster
engine keeps the same shape in its store). :meth:`PresenceTable.join` and
:meth:`PresenceTable.leave` return the member when a ``join`` or ``leave``
event is due: a member's first connection on the topic, its last one.
Counts are exact however many members there are; the list of members an
answer carries is capped by the rule (``max_members``). A topic that
empties costs nothing.

:class:`PresenceRules` finds the rule of a topic (the first match, cached),
and :func:`member_of` builds the member a connection's identity shows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

from broker.core.config import PresenceRuleConfig
from broker.core.errors import ProtocolError
from broker.core.protocol import check_publish
from broker.core.topics import pattern_matches
from broker.core.values import Identity

__all__ = ["PresenceInfo", "PresenceRules", "PresenceStats", "PresenceTable", "member_of"]

#: Prefix of a presence field taken from the identity's claims.
CLAIMS_PREFIX: Final = "claims."


@dataclass(frozen=True, slots=True)
class PresenceInfo:
    """A ``presence`` answer: *count* members (distinct subjects),
    *connections* connections, and the members themselves (sorted by
    subject) unless there are more than the rule's ``max_members``."""

    count: int
    connections: int
    members: tuple[dict[str, Any], ...] | None


@dataclass(frozen=True, slots=True)
class PresenceStats:
    """Totals over every topic of a table (the metrics' gauges)."""

    topics: int
    members: int
    connections: int


class _Member:
    __slots__ = ("connections", "fields")

    def __init__(self, fields: dict[str, Any]) -> None:
        #: What the member shows (``subject`` and the rule's fields), as joined.
        self.fields = fields
        #: Its connections subscribed to the topic.
        self.connections: set[str] = set()

    def shown(self) -> dict[str, Any]:
        return {**self.fields, "connections": len(self.connections)}


class _Topic:
    __slots__ = ("connections", "members")

    def __init__(self) -> None:
        self.members: dict[str, _Member] = {}  # by subject
        self.connections = 0


class PresenceTable:
    """Members per topic, keyed by subject, with their connections.

    *connection* ids must be unique among the connections the table sees
    (a cluster engine qualifies a node's connection ids with the node's).
    Joining twice and leaving a topic never joined change nothing, so a
    caller that does not know whether a join went through may leave.
    """

    __slots__ = ("_topics", "connections", "members")

    def __init__(self) -> None:
        self._topics: dict[str, _Topic] = {}
        #: Members over every topic (a subject on two topics counts twice).
        self.members = 0
        #: Connections over every topic.
        self.connections = 0

    def __len__(self) -> int:
        """Topics with at least one member."""
        return len(self._topics)

    def join(self, topic: str, connection: str, member: dict[str, Any]) -> dict[str, Any] | None:
        """*connection* (of *member*, whose ``subject`` keys it) subscribed
        to *topic*. Returns the member (``connections``: 1) when this is its
        first connection there, a ``join`` being due; else None.

        A member keeps the fields of its first connection.
        """
        subject = member["subject"]
        entry = self._topics.get(topic)
        if entry is None:
            entry = self._topics[topic] = _Topic()
        shown = entry.members.get(subject)
        first = shown is None
        if shown is None:
            shown = entry.members[subject] = _Member(dict(member))
            self.members += 1
        elif connection in shown.connections:
            return None
        shown.connections.add(connection)
        entry.connections += 1
        self.connections += 1
        return shown.shown() if first else None

    def leave(self, topic: str, connection: str, member: dict[str, Any]) -> dict[str, Any] | None:
        """*connection* is no longer subscribed to *topic*. Returns the member
        (``connections``: 0) when it was its last connection there, a
        ``leave`` being due; else None (also for a connection not there)."""
        entry = self._topics.get(topic)
        if entry is None:
            return None
        subject = member["subject"]
        shown = entry.members.get(subject)
        if shown is None or connection not in shown.connections:
            return None
        shown.connections.discard(connection)
        entry.connections -= 1
        self.connections -= 1
        if shown.connections:
            return None
        del entry.members[subject]
        self.members -= 1
        if not entry.members:
            del self._topics[topic]
        return shown.shown()

    def query(self, topic: str, max_members: int) -> PresenceInfo:
        """The members of *topic*: exact counts, and the members sorted by
        subject when there are no more than *max_members*."""
        entry = self._topics.get(topic)
        if entry is None:
            return PresenceInfo(0, 0, () if max_members >= 0 else None)
        count = len(entry.members)
        members = None
        if count <= max_members:
            members = tuple(entry.members[s].shown() for s in sorted(entry.members))
        return PresenceInfo(count, entry.connections, members)

    def stats(self) -> PresenceStats:
        return PresenceStats(len(self._topics), self.members, self.connections)


#: Stands for "no rule" in PresenceRules' cache.
_NO_RULE: Final = object()


class PresenceRules:
    """The first ``[[presence]]`` rule whose pattern matches a topic, cached
    per topic (like :meth:`Hub.rule_for <broker.core.hub.Hub.rule_for>`).

    :meth:`rule_for` takes the rules in force each time: when they are not
    the ones the cache was built for (a reload), the cache starts over.
    """

    __slots__ = ("_cache", "_cache_size", "_rules")

    def __init__(self, *, cache_size: int = 4096) -> None:
        self._rules: tuple[PresenceRuleConfig, ...] = ()
        self._cache: dict[str, object] = {}
        self._cache_size = cache_size

    def rule_for(
        self, rules: tuple[PresenceRuleConfig, ...], topic: str
    ) -> PresenceRuleConfig | None:
        if not rules:
            return None
        if rules is not self._rules:
            self._rules = rules
            self._cache = {}
        found = self._cache.get(topic)
        if found is None:
            found = next((r for r in rules if pattern_matches(r.pattern, topic)), _NO_RULE)
            if len(self._cache) >= self._cache_size:
                self._cache.clear()
            self._cache[topic] = found
        return found if isinstance(found, PresenceRuleConfig) else None


def _representable(value: Any) -> bool:
    """True if *value* encodes in JSON and msgpack (the rules of ``data``)."""
    try:
        check_publish("presence", value)
    except ProtocolError:
        return False
    return True


def member_of(identity: Identity, fields: Sequence[str]) -> dict[str, Any]:
    """What a connection of *identity* shows as a member, per a rule's *fields*.

    ``subject`` always; ``roles`` as a sorted list; ``plugin``; each
    ``claims.NAME`` present in ``identity.claims`` under ``"claims"``
    (``{"claims": {"NAME": value}}``; no ``"claims"`` when none is present).
    A value that JSON or msgpack cannot carry is left out (a subject with
    lone surrogates is shown with them escaped).
    """
    subject = identity.subject
    if not _representable(subject):
        subject = subject.encode("utf-8", "backslashreplace").decode("utf-8")
    member: dict[str, Any] = {"subject": subject}
    claims: dict[str, Any] = {}
    for name in fields:
        value: Any
        if name == "roles":
            value = sorted(identity.roles)
        elif name == "plugin":
            value = identity.plugin
        elif name.startswith(CLAIMS_PREFIX):
            claim = name[len(CLAIMS_PREFIX) :]
            if claim in identity.claims:
                value = identity.claims[claim]
                if _representable(value):
                    claims[claim] = value
            continue
        else:
            continue  # "subject", shown anyway
        if _representable(value):
            member[name] = value
    if claims:
        member["claims"] = claims
    return member
