"""The in-process engine: one broker, nothing shared, nothing to start."""

from __future__ import annotations

from typing import Any

import trio

from broker.core.config import Config
from broker.core.history import History, HistoryPage, Recovery, Replay
from broker.core.presence import PresenceInfo, PresenceStats, PresenceTable
from broker.core.protocol import Position
from broker.engine.base import Delivery

__all__ = ["MemoryEngine"]

#: Seconds between sweeps of expired history and idle topics.
SWEEP_INTERVAL = 1.0


class MemoryEngine:
    """One process, nothing shared: numbers (and stores) messages per topic
    and delivers them in the same synchronous step, so the ``seq`` order is
    the delivery order by construction.

    Positions and history live in a :class:`~broker.core.history.History`
    for as long as the process: its node epoch is new at every start, so a
    client resuming from before a restart is told ``recovered: false``.

    Presence is one :class:`~broker.core.presence.PresenceTable`; a join or
    leave event is handed to the hub in the same step (the caller flushes).
    """

    __slots__ = ("_delivery", "_history", "_presence")

    #: Every publication is local: no need to know the node's patterns.
    tracks_interest = False
    #: Numbering and delivering are one step.
    delivers_inline = True

    def __init__(self, delivery: Delivery, config: Config | None = None) -> None:
        self._delivery = delivery
        config = config or Config()
        limits = config.limits
        self._history = History(
            config.history,
            clock=trio.current_time,
            max_bytes=limits.max_history_bytes,
            max_topics=limits.max_topics,
            idle=limits.topic_idle,
        )
        self._presence = PresenceTable()

    @property
    def log(self) -> History:
        """The positions and stored messages (for tests and stats)."""
        return self._history

    def submit(self, topic: str, data: Any, key: str | None) -> int:
        # One synchronous block: number and store, then deliver. Nothing may
        # await in between, or another publish could deliver seq + 1 first.
        seq, epoch = self._history.append(topic, data, key)
        if epoch is None:
            self._delivery.deliver(topic, seq, data, key)
        else:
            self._delivery.deliver(topic, seq, data, key, epoch)
        return seq

    async def publish(self, topic: str, data: Any, key: str | None) -> int:
        return self.submit(topic, data, key)

    async def subscribe(self, pattern: str) -> None:
        """Every publication is local: nothing to do."""

    async def unsubscribe(self, pattern: str) -> None:
        """Every publication is local: nothing to do."""

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            await trio.sleep(SWEEP_INTERVAL)
            self._history.expire()

    def healthy(self) -> bool:
        return True

    def engine_stats(self) -> dict[str, int]:
        return {}

    def configure(self, config: Config) -> None:
        limits = config.limits
        history = self._history
        history.max_bytes = limits.max_history_bytes
        history.max_topics = limits.max_topics
        history.idle = limits.topic_idle
        history.configure(config.history)

    async def recover(self, pattern: str, replay: Replay) -> Recovery:
        return self._history.recover(pattern, replay)

    async def history(self, topic: str, since: Position | None, limit: int) -> HistoryPage | None:
        return self._history.page(topic, since, limit)

    def history_stats(self) -> dict[str, int]:
        history = self._history
        return {
            "messages": history.messages,
            "bytes": history.bytes,
            "topics": history.topics,
            "stored_topics": history.stored_topics,
            "evicted": history.evicted,
        }

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
