"""The engine seam: where a publish gets its position, and how publications
reach this node's subscribers.

An :class:`Engine` is the one object a cluster backend replaces. The broker
talks to it in three ways, and to nothing else of it:

* :meth:`Engine.publish` gives the message its per-topic ``seq`` (the
  engine's own counter, shared by every node of a cluster) and makes it
  reach every node that is interested in the topic, this one included.
  :meth:`Engine.submit` does the same without awaiting when the engine can
  fix the message's place at once (a remote engine: its command is queued
  on the connection that carries it), and hands back what to await for its
  ``seq``: that is how one connection's publishes are pipelined.
* Every publication this node must deliver, whether published here or on
  another node, comes back through the node's :class:`Delivery` (the hub):
  ``deliver(topic, seq, data, key)`` for each, then ``flush()`` once a batch
  is queued. Local and remote publications take this one path.
* :meth:`Engine.subscribe` / :meth:`Engine.unsubscribe` tell the engine
  which patterns this node needs (see :class:`Interest`, which calls them
  only when a pattern gains its first or loses its last local subscriber).

**The ordering contract.** An engine calls ``deliver`` for the publications
of one topic in ``seq`` order, each once, from one task at a time, and
never awaits inside a ``deliver`` call (``deliver`` is synchronous). The
broker's guarantees follow from it whatever the engine awaits elsewhere:
every local subscriber gets a topic's messages in ``seq`` order (each
subscriber's queue is FIFO), without loss except by its own queue's
overflow policy, which it is told about. An engine may await anywhere in
:meth:`publish` (a network round trip, a lock) as long as the step that
assigns a ``seq`` and the step that fixes the delivery order are one
(an atomic script in Redis; one synchronous block in memory).
``tests/test_engine_seam.py`` runs the whole broker over an engine that
yields at random points and checks exactly that.

**History and recovery.** The engine keeps the stored messages where it
keeps the ``seq`` (:class:`~broker.core.history.History` in memory), so a
message is numbered, stored and delivered in one step.
:meth:`Engine.recover` reads what a subscriber asks for before it goes live
(its position, the messages after its ``since``, the latest N, a snapshot).
It may await: the session buffers the live publications of the pattern that
arrive meanwhile (:meth:`Hub.buffer <broker.core.hub.Hub.buffer>`) and
drops those the read already covers, so the subscriber gets each message
once and in order however the read and the live stream interleave.

**Presence.** The engine keeps who is subscribed to the topics a
``[[presence]]`` rule covers (:class:`~broker.core.presence.PresenceTable`,
or the same shape in a cluster's store): :meth:`Engine.presence_join` and
:meth:`Engine.presence_leave` as connections subscribe and go,
:meth:`Engine.presence` to answer. A member's first connection on a topic
(``join``) and its last (``leave``), on whichever node, reach this node's
subscribers through :meth:`Delivery.presence_event`, the way publications
do.
"""

from __future__ import annotations

from typing import Any, Protocol

import trio

from broker.core.config import Config
from broker.core.history import HistoryPage, Recovery, Replay
from broker.core.presence import PresenceInfo, PresenceStats
from broker.core.protocol import Position

__all__ = ["Delivery", "Engine", "Submitted"]


class Delivery(Protocol):
    """Where an engine hands publications to this node (the :class:`~broker.core.hub.Hub`)."""

    def deliver(
        self, topic: str, seq: int, data: Any, key: str | None, epoch: str | None = None
    ) -> int:
        """Queue one publication for every matching local subscriber; synchronous.

        *epoch* is given with the first message of an epoch (``seq`` 1) and
        only then: subscribers learn the new epoch from that message.
        """
        ...

    def flush(self) -> None:
        """Write what :meth:`deliver` queued (call once per batch)."""
        ...

    def presence_event(self, topic: str, op: str, member: dict[str, Any]) -> int:
        """Queue a ``join`` or ``leave`` (*op*) of *member* for the local
        subscribers that asked for *topic*'s presence events; synchronous,
        flushed like :meth:`deliver`. Returns how many got it."""
        ...


class Submitted(Protocol):
    """A publish an engine has taken and not answered yet (see :meth:`Engine.submit`)."""

    async def result(self) -> int:
        """The message's ``seq``, once the engine has it. Raises
        :class:`~broker.core.errors.EngineUnavailable` as :meth:`Engine.publish`
        does. Await it once."""
        ...


class Engine(Protocol):
    """What a publish goes through; see the module doc for the contract."""

    #: Whether the engine needs to hear which patterns this node subscribes
    #: to (a remote engine); False for one that delivers every publication
    #: locally anyway, which spares the per-pattern bookkeeping.
    tracks_interest: bool

    #: Whether every publication numbered so far has reached the node's
    #: Delivery by the time :meth:`recover` reads (true in memory, where
    #: numbering and delivering are one step). False for an engine whose
    #: publications may still be on their way: the hub then fences the new
    #: subscriber against what its replay covered (see ``Hub.fence``).
    delivers_inline: bool

    async def publish(self, topic: str, data: Any, key: str | None) -> int:
        """Publish; return the message's per-topic ``seq``.

        Raises :class:`~broker.core.errors.EngineUnavailable` when a remote
        engine cannot take it (unreachable, or no answer within its bound):
        the publisher is answered ``err`` ``unavailable``. So may
        :meth:`subscribe`, :meth:`recover`, :meth:`history` and
        :meth:`presence`; :meth:`presence_join` and :meth:`presence_leave`
        do not (an engine catches up with them once it can).

        The caller flushes the delivery (``Delivery.flush``) when its batch is
        done; an engine that delivers from a task of its own flushes itself.
        """
        ...

    def submit(self, topic: str, data: Any, key: str | None) -> int | Submitted | None:
        """:meth:`publish` without awaiting, for a caller that publishes
        several messages in a row (a connection's ``pub`` commands).

        Returns the ``seq`` when the engine numbers in the call (in memory);
        a :class:`Submitted` when the message's place is fixed (its ``seq``
        will follow the ``seq`` of every publish submitted before it to the
        same topic, and precede those submitted after) but its answer is
        still to come; None when the engine cannot fix its place without
        waiting (Redis unreachable for now, too many commands in flight):
        the caller then awaits the results it has, and :meth:`publish`.
        """
        ...

    async def subscribe(self, pattern: str) -> None:
        """This node now has a local subscriber to *pattern*: receive its topics.

        Returns once publications of those topics made after the call will
        reach :class:`Delivery`. May raise (the subscription is refused).
        """
        ...

    async def unsubscribe(self, pattern: str) -> None:
        """This node's last local subscriber to *pattern* has gone."""
        ...

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The engine's own work for as long as the broker serves (a remote
        engine reads its fan-out stream here). Reports started once the engine
        can take publishes; cancelled at shutdown."""
        ...

    def healthy(self) -> bool:
        """False while the engine cannot publish (``/readyz`` answers 503)."""
        ...

    def engine_stats(self) -> dict[str, int]:
        """Counters and gauges of a remote engine's links (``up``,
        ``outages``, ``unavailable``, what its fan-out received...) for the
        metrics; empty for an engine that has none. Synchronous and cheap."""
        ...

    def configure(self, config: Config) -> None:
        """Apply the ``[[history]]`` rules and limits of *config* (at start and
        on reload; topics already stored take their new rule)."""
        ...

    async def recover(self, pattern: str, replay: Replay) -> Recovery:
        """What a new subscription to *pattern* gets before live messages:
        its position (or cursor), and the stored messages *replay* asks for.

        May await; see the module doc for how the caller keeps the result and
        the live stream gapless.
        """
        ...

    async def history(self, topic: str, since: Position | None, limit: int) -> HistoryPage | None:
        """A ``history`` command's page of *topic*; None when no rule keeps its history."""
        ...

    def history_stats(self) -> dict[str, int]:
        """Gauges of what the engine keeps: ``messages``, ``bytes``,
        ``topics`` (positions tracked), ``stored_topics``, ``evicted``."""

    async def presence_join(self, topic: str, connection: str, member: dict[str, Any]) -> None:
        """*connection* (this node's id for it) of *member* (``subject`` and
        the fields the rule shows) subscribed to *topic*, which a presence
        rule covers. If it is the member's first connection there, a
        ``join`` reaches :meth:`Delivery.presence_event` on every node with
        subscribers of the topic, as a publication would (an engine that
        hands it over within the call leaves the flush to the caller, as
        :meth:`publish` does).

        A caller cancelled here does not know whether the join happened,
        and calls :meth:`presence_leave` anyway: leaving with a connection
        that is not there changes nothing (and sends no ``leave``).
        """
        ...

    async def presence_leave(self, topic: str, connection: str, member: dict[str, Any]) -> None:
        """*connection* of *member* (as given to :meth:`presence_join`) is no
        longer subscribed to *topic*. If it was the member's last connection
        there, a ``leave`` goes out as a ``join`` does."""
        ...

    async def presence(self, topic: str, max_members: int) -> PresenceInfo:
        """Who is subscribed to *topic*: exact counts, and the members when
        there are no more than *max_members*."""
        ...

    def presence_stats(self) -> PresenceStats:
        """Presence totals for the metrics (a cluster engine: what this node
        last knew); synchronous and cheap."""
        ...
