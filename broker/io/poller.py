"""Waiting for many idle sockets to become readable, cheaply.

Tens of thousands of mostly idle connections are the broker's common case,
and an idle connection is a task suspended until its socket has something to
read. Through ``trio.lowlevel.wait_readable`` that wait holds four suspended
coroutines, a closure with four cells and trio's registration object (about
1.1 KB and ten objects the cyclic garbage collector scans on every full pass),
and costs an ``epoll_ctl`` per wait (trio registers one-shot) plus two more
per connection (a failed ``MOD`` before the ``ADD``, and a ``DEL`` on close).

A :class:`ReadPoller` keeps an epoll instance of its own. Each connection's
socket is registered once, edge-triggered, when the connection starts; a
reader that found its socket empty *parks* (:meth:`ReadPoller.park`, then
``trio.lowlevel.wait_task_rescheduled``, one suspended coroutine), and the
poller's task, woken by trio when its epoll has events, reschedules the
parked readers whose sockets became readable. Closing a socket removes it
from the epoll by itself.

Edge-triggered is correct because a reader parks only after a read found the
socket empty, with no checkpoint in between: any data that arrives later is a
new edge. Under TLS the read is ``TLSStream.receive_nowait``, which returns
None only when its last read of the socket found it empty, so the same rule
holds. An event for a socket whose reader is not parked is ignored (that
reader reads before it parks again); a spurious wake-up costs one empty read.

Linux only (``select.epoll``); :func:`create_poller` returns None elsewhere,
and the connection then waits with ``trio.lowlevel.wait_readable``.
"""

from __future__ import annotations

import select
from typing import Final

import trio

__all__ = ["ReadPoller", "create_poller"]

#: Most events taken per wake-up (more stay ready for the next one).
MAX_EVENTS: Final = 1024


class ReadPoller:
    """An epoll instance for sockets' readability, and the readers parked on them.

    Run :meth:`run` in a nursery that outlives every reader that parks.
    """

    __slots__ = ("_epoll", "_parked")

    def __init__(self) -> None:
        self._epoll = select.epoll()
        #: The reader parked on each descriptor.
        self._parked: dict[int, trio.lowlevel.Task] = {}

    def register(self, fd: int) -> bool:
        """Watch *fd* (a connected socket) until it is closed; False if the
        kernel refused (the caller then waits through trio)."""
        try:
            self._epoll.register(fd, select.EPOLLIN | select.EPOLLET)
        except OSError:
            return False
        return True

    def park(self, fd: int, task: trio.lowlevel.Task) -> None:
        """*task* waits for *fd*: it is rescheduled once *fd* is readable.

        Call it right after a read of *fd* found nothing, then
        ``await trio.lowlevel.wait_task_rescheduled(abort)`` with an *abort*
        that calls :meth:`unpark`.
        """
        self._parked[fd] = task

    def unpark(self, fd: int) -> None:
        """The reader parked on *fd* stops waiting (it was cancelled)."""
        self._parked.pop(fd, None)

    @property
    def parked(self) -> int:
        """Readers waiting now."""
        return len(self._parked)

    async def run(self) -> None:
        """Wake the parked readers whose sockets became readable, for ever."""
        epoll = self._epoll
        parked = self._parked
        reschedule = trio.lowlevel.reschedule
        try:
            while True:
                await trio.lowlevel.wait_readable(epoll.fileno())
                for fd, _events in epoll.poll(0, MAX_EVENTS):
                    task = parked.pop(fd, None)
                    if task is not None:
                        reschedule(task)
        finally:
            trio.lowlevel.notify_closing(epoll.fileno())
            epoll.close()


def create_poller() -> ReadPoller | None:
    """A :class:`ReadPoller`, or None where ``select.epoll`` does not exist."""
    if not hasattr(select, "epoll"):
        return None
    return ReadPoller()
