"""The in-process engine: one broker, nothing shared, nothing to start."""

from __future__ import annotations

from typing import Any

import trio

from broker.core.presence import PresenceInfo, PresenceStats, PresenceTable
from broker.engine.base import Delivery

__all__ = ["MemoryEngine"]


class MemoryEngine:
    """One process, nothing shared: numbers messages per topic and delivers
    them in the same synchronous step, so the ``seq`` order is the delivery
    order by construction.

    ``seq`` starts at 1 for each topic and grows by one per message. The
    counters live as long as the process.

    Presence is one :class:`~broker.core.presence.PresenceTable`; a join or
    leave event is handed to the hub in the same step (the caller flushes).
    """

    __slots__ = ("_delivery", "_presence", "_seq")

    #: Every publication is local: no need to know the node's patterns.
    tracks_interest = False

    def __init__(self, delivery: Delivery) -> None:
        self._delivery = delivery
        self._seq: dict[str, int] = {}
        self._presence = PresenceTable()

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

    async def presence_join(self, topic: str, connection: str, member: dict[str, Any]) -> None:
        joined = self._presence.join(topic, connection, member)
        if joined is not None:
            self._delivery.presence_event(topic, "join", joined)

    async def presence_leave(self, topic: str, connection: str, member: dict[str, Any]) -> None:
        left = self._presence.leave(topic, connection, member)
        if left is not None:
            self._delivery.presence_event(topic, "leave", left)

    async def presence(self, topic: str, max_members: int) -> PresenceInfo:
        return self._presence.query(topic, max_members)

    def presence_stats(self) -> PresenceStats:
        return self._presence.stats()
