"""This node's interest: which patterns it needs the engine to deliver."""

from __future__ import annotations

import trio

from broker.engine.base import Engine

__all__ = ["Interest"]


class Interest:
    """This node's subscribed patterns, counted, told to the engine on change.

    :meth:`acquire` before a local subscriber is added to the hub,
    :meth:`release` after it was removed. The engine hears of a pattern only
    when its count goes from 0 to 1 (``subscribe``) or back to 0
    (``unsubscribe``), one change at a time per pattern, so the engine's
    view converges to the counts whatever interleaves: a subscriber never
    gets its ``ok`` before the engine has confirmed the pattern. Changes of
    different patterns run concurrently (a remote engine pipelines them).
    """

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        # An engine that does not track interest costs nothing per pattern.
        self._tracking = engine.tracks_interest
        self._counts: dict[str, int] = {}
        self._told: set[str] = set()  # patterns the engine has confirmed
        #: One lock per pattern being changed, with how many tasks hold or
        #: wait for it (dropped when none does).
        self._locks: dict[str, tuple[trio.Lock, int]] = {}

    def __contains__(self, pattern: str) -> bool:
        return pattern in self._counts

    def __len__(self) -> int:
        return len(self._counts)

    async def acquire(self, pattern: str) -> None:
        """Count one more local subscriber of *pattern*; returns once the
        engine delivers its topics. If the engine refuses, the count is
        undone and the error raised."""
        if not self._tracking:
            return
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
        if self._tracking and self._drop(pattern):
            await self._sync(pattern)

    def release_nowait(self, pattern: str) -> bool:
        """:meth:`release` for a caller that cannot await (a closing
        connection): True if the engine should now be told, which the caller
        then does with :meth:`settle`."""
        return self._tracking and self._drop(pattern)

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
        lock, users = self._locks.get(pattern) or (trio.Lock(), 0)
        self._locks[pattern] = (lock, users + 1)
        try:
            async with lock:
                wanted = pattern in self._counts
                if wanted and pattern not in self._told:
                    await self._engine.subscribe(pattern)
                    self._told.add(pattern)
                elif not wanted and pattern in self._told:
                    self._told.discard(pattern)
                    await self._engine.unsubscribe(pattern)
        finally:
            lock, users = self._locks[pattern]
            if users == 1:
                del self._locks[pattern]
            else:
                self._locks[pattern] = (lock, users - 1)
