"""The engine seam: where a publish gets its position, and how publications
reach this node's subscribers.

An :class:`Engine` is the one object a cluster backend replaces. The broker
talks to it in three ways, and to nothing else of it:

* :meth:`Engine.publish` gives the message its per-topic ``seq`` (the
  engine's own counter, shared by every node of a cluster) and makes it
  reach every node that is interested in the topic, this one included.
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

The history and presence of later releases live here too: an engine that
keeps history answers ``history(...)`` from where it keeps its ``seq``.
"""

from __future__ import annotations

from typing import Any, Protocol

import trio

__all__ = ["Delivery", "Engine", "Flusher", "Interest", "MemoryEngine"]


class Delivery(Protocol):
    """Where an engine hands publications to this node (the :class:`~broker.hub.Hub`)."""

    def deliver(self, topic: str, seq: int, data: Any, key: str | None) -> int:
        """Queue one publication for every matching local subscriber; synchronous."""
        ...

    def flush(self) -> None:
        """Write what :meth:`deliver` queued (call once per batch)."""
        ...


class Engine(Protocol):
    """What a publish goes through; see the module doc for the contract."""

    async def publish(self, topic: str, data: Any, key: str | None) -> int:
        """Publish; return the message's per-topic ``seq``.

        The caller flushes the delivery (``Delivery.flush``) when its batch is
        done; an engine that delivers from a task of its own flushes itself.
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


class MemoryEngine:
    """One process, nothing shared: numbers messages per topic and delivers
    them in the same synchronous step, so the ``seq`` order is the delivery
    order by construction.

    ``seq`` starts at 1 for each topic and grows by one per message. The
    counters live as long as the process.
    """

    __slots__ = ("_delivery", "_seq")

    def __init__(self, delivery: Delivery) -> None:
        self._delivery = delivery
        self._seq: dict[str, int] = {}

    async def publish(self, topic: str, data: Any, key: str | None) -> int:
        # One synchronous block: assign, then deliver. Nothing may await in
        # between, or another publish could deliver seq + 1 first.
        seq = self._seq.get(topic, 0) + 1
        self._seq[topic] = seq
        self._delivery.deliver(topic, seq, data, key)
        return seq

    async def subscribe(self, pattern: str) -> None:
        """Every publication is local: nothing to do."""

    async def unsubscribe(self, pattern: str) -> None:
        """Every publication is local: nothing to do."""

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()

    def healthy(self) -> bool:
        return True


class Interest:
    """This node's subscribed patterns, counted, told to the engine on change.

    :meth:`acquire` before a local subscriber is added to the hub,
    :meth:`release` after it was removed. The engine hears of a pattern only
    when its count goes from 0 to 1 (``subscribe``) or back to 0
    (``unsubscribe``), one change at a time, so the engine's view converges
    to the counts whatever interleaves: a subscriber never gets its ``ok``
    before the engine has confirmed the pattern.
    """

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._counts: dict[str, int] = {}
        self._told: set[str] = set()  # patterns the engine has confirmed
        self._lock = trio.Lock()

    def __contains__(self, pattern: str) -> bool:
        return pattern in self._counts

    def __len__(self) -> int:
        return len(self._counts)

    async def acquire(self, pattern: str) -> None:
        """Count one more local subscriber of *pattern*; returns once the
        engine delivers its topics. If the engine refuses, the count is
        undone and the error raised."""
        self._counts[pattern] = self._counts.get(pattern, 0) + 1
        if pattern in self._told:
            return
        try:
            await self._sync(pattern)
        except BaseException:
            self._drop(pattern)
            raise

    async def release(self, pattern: str) -> None:
        """Count one local subscriber of *pattern* less."""
        if self._drop(pattern):
            await self._sync(pattern)

    def release_nowait(self, pattern: str) -> bool:
        """:meth:`release` for a caller that cannot await (a closing
        connection): True if the engine should now be told, which the caller
        then does with :meth:`settle`."""
        return self._drop(pattern)

    async def settle(self, pattern: str) -> None:
        """Bring the engine's view of *pattern* in line with the count."""
        await self._sync(pattern)

    def _drop(self, pattern: str) -> bool:
        count = self._counts[pattern] - 1
        if count:
            self._counts[pattern] = count
            return False
        del self._counts[pattern]
        return True

    async def _sync(self, pattern: str) -> None:
        async with self._lock:
            wanted = pattern in self._counts
            if wanted and pattern not in self._told:
                await self._engine.subscribe(pattern)
                self._told.add(pattern)
            elif not wanted and pattern in self._told:
                self._told.discard(pattern)
                await self._engine.unsubscribe(pattern)


class Flusher:
    """Flushes the hub for publishers that have no read loop of their own to
    do it (sources, embedding programs): :meth:`request` after publishing,
    and the flush happens once the publisher next waits, so a burst of
    publishes made without waiting is written as one batch per subscriber,
    as a client's read is."""

    def __init__(self, delivery: Delivery) -> None:
        self._delivery = delivery
        self._wakeup = trio.Event()

    def request(self) -> None:
        """Have the hub flushed soon (cheap when a flush is already due)."""
        self._wakeup.set()

    async def run(self) -> None:
        """Flush whenever asked, for as long as the broker serves."""
        while True:
            await self._wakeup.wait()
            self._wakeup = trio.Event()
            self._delivery.flush()
