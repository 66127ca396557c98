"""Flushing the hub for publishers that have no read loop of their own."""

from __future__ import annotations

import trio

from broker.engine.base import Delivery

__all__ = ["Flusher"]


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
