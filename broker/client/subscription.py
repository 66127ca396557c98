"""A :class:`Subscription`: the async iterator one ``subscribe()`` block
reads, and the buffer behind it.

The buffer holds two kinds of items. What the broker sent (messages,
``dropped``, ``join``/``leave``) counts against ``queue_size``: when that
many wait, the client's reader waits for room, which is the client's
backpressure. The client's own notices (:class:`~broker.client.Interrupted`,
:class:`~broker.client.Reconnected`, :class:`~broker.client.Resync`) never
wait: the connection loop must not stall behind a consumer, and there are
at most a few per reconnection.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import Self

import trio

from broker.client.events import Item

__all__ = ["Subscription"]


class _Buffer:
    """A FIFO of items: broker items bounded (the producer waits), notices not.

    One producer (the client), one consumer (the subscription's reader).
    """

    def __init__(self, size: int) -> None:
        self._size = size
        self._items: collections.deque[tuple[Item, bool]] = collections.deque()
        self._counted = 0
        self._readers = trio.lowlevel.ParkingLot()
        self._writers = trio.lowlevel.ParkingLot()
        #: Set when the producer is done: raised once every item is read.
        self._end: Callable[[], BaseException] | None = None
        #: The consumer left: items are discarded, the producer never waits.
        self._left = False

    @property
    def open(self) -> bool:
        return self._end is None and not self._left

    async def put(self, item: Item) -> None:
        """Append a broker item; then wait while more than *size* wait."""
        await trio.lowlevel.checkpoint_if_cancelled()
        if not self.open:
            await trio.lowlevel.cancel_shielded_checkpoint()
            return
        self._items.append((item, True))
        self._counted += 1
        self._readers.unpark()
        if self._counted <= self._size:
            await trio.lowlevel.cancel_shielded_checkpoint()
            return
        while self._counted > self._size and self.open:
            await self._writers.park()

    def notice(self, item: Item) -> None:
        """Append a client notice, without waiting."""
        if self.open:
            self._items.append((item, False))
            self._readers.unpark()

    def end(self, error: Callable[[], BaseException]) -> None:
        """No more items: once the buffered ones are read, raise *error()*."""
        if self._end is None:
            self._end = error
        self._readers.unpark_all()
        self._writers.unpark_all()

    def leave(self) -> None:
        """The consumer is gone: drop the items, free a waiting producer."""
        self._left = True
        self._items.clear()
        self._counted = 0
        self._readers.unpark_all()
        self._writers.unpark_all()

    async def get(self) -> Item:
        await trio.lowlevel.checkpoint_if_cancelled()
        parked = False
        while not self._items:
            if self._left:
                raise trio.ClosedResourceError("the subscribe() block was left")
            if self._end is not None:
                raise self._end()
            parked = True
            await self._readers.park()
        item, counted = self._items.popleft()
        if counted:
            self._counted -= 1
            self._writers.unpark_all()
        if not parked:
            await trio.lowlevel.cancel_shielded_checkpoint()
        return item


class Subscription:
    """Messages matching one pattern; yielded by
    :meth:`Client.subscribe <broker.client.Client.subscribe>`.

    An async iterator of :data:`~broker.client.events.Item`:
    :class:`~broker.client.Message` and :class:`~broker.client.Dropped`, in
    the order the broker sent them, :class:`~broker.client.Join` and
    :class:`~broker.client.Leave` with ``presence=True``, and around a
    reconnection :class:`~broker.client.Interrupted`,
    :class:`~broker.client.Reconnected` and :class:`~broker.client.Resync`.

    It never ends quietly: when the client is closed for good, the items
    already buffered are delivered and then
    :class:`~broker.client.Disconnected` is raised (or, if the broker
    refused this subscription when it was resubscribed after a reconnect,
    the :class:`~broker.client.ServerError` it answered), so a consumer loop
    cannot mistake a lost connection for the end of the stream.

    Attributes:
        pattern: the subscribed topic or pattern.
        presence: it receives ``join``/``leave`` events.
    """

    def __init__(self, pattern: str, queue_size: int, *, presence: bool = False) -> None:
        self.pattern = pattern
        self.presence = presence
        self._buffer = _Buffer(queue_size)

    def __repr__(self) -> str:
        return f"<Subscription {self.pattern!r}>"

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Item:
        return await self.receive()

    async def receive(self) -> Item:
        """Wait for the next item.

        Raises:
            Disconnected: the client is closed and every buffered item has
                been received.
            ServerError: the broker refused to resubscribe after a
                reconnect (e.g. :class:`~broker.client.Forbidden`), and
                every buffered item has been received.
            trio.ClosedResourceError: the ``subscribe()`` block was left.
        """
        return await self._buffer.get()
