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

**Dormant connections.** A parked reader is still a task: its Task object,
its coroutine frames, its context and the cancel scope it reads in (about
2.5 KB, 40 % of an idle plain connection). :meth:`ReadPoller.sweep` retires
the readers that stay parked through a whole sweep interval: each is
rescheduled with :data:`RETIRED`, reads once more (the same rule as
parking: only a read that finds the socket empty lets it go), hands the
descriptor to the poller with :meth:`ReadPoller.sleep` and ends its task.
The connection is then *dormant*: no task, its socket still registered, its
subscriptions and queue in place (deliveries are written by the publisher's
task, never by the reader). When the socket becomes readable the poller
calls its :meth:`Sleeper.readable`: the connection answers pings and pongs
there and then (a heartbeat costs a dormant connection no task) and goes
back to sleep, or starts a task for anything else. Anything that must
close a dormant connection takes it back with :meth:`ReadPoller.take` and
starts its task with :meth:`Sleeper.wake`.

Linux only (``select.epoll``); :func:`create_poller` returns None elsewhere,
and the connection then waits with ``trio.lowlevel.wait_readable``.
"""

from __future__ import annotations

import select
from typing import Final, Protocol

import outcome
import trio

__all__ = ["RETIRED", "SWEEP_INTERVAL", "ReadPoller", "Sleeper", "create_poller"]

#: Most events taken per wake-up (more stay ready for the next one).
MAX_EVENTS: Final = 1024
#: Seconds between sweeps: a reader parked through a whole interval (so for
#: one to two intervals) is retired and its connection goes dormant.
SWEEP_INTERVAL: Final = 1.0


class _Retired:
    __slots__ = ()

    def __repr__(self) -> str:
        return "RETIRED"


#: What ``wait_task_rescheduled`` returns to a parked reader that the sweep
#: retires (any other wake-up returns None).
RETIRED: Final = _Retired()


class Sleeper(Protocol):
    """A dormant connection, as the poller sees it."""

    def readable(self) -> None:
        """Its socket is readable (the poller has already forgotten it):
        handle the input without awaiting, and either :meth:`ReadPoller.sleep`
        again or start a task."""

    def wake(self) -> None:
        """Start its task (synchronously): the broker is stopping
        (:meth:`ReadPoller.wake_all`)."""


class ReadPoller:
    """An epoll instance for sockets' readability, and the readers parked on them.

    Run :meth:`run` in a nursery that outlives every reader that parks.
    """

    __slots__ = ("_dormant", "_epoll", "_parked", "_quiet")

    def __init__(self) -> None:
        self._epoll = select.epoll()
        #: The reader parked on each descriptor.
        self._parked: dict[int, trio.lowlevel.Task] = {}
        #: The dormant connection on each descriptor.
        self._dormant: dict[int, Sleeper] = {}
        #: Descriptors whose readers were parked at the last sweep and have
        #: not been woken since (the next sweep retires them).
        self._quiet: set[int] = set()

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
        self._quiet.discard(fd)

    def sleep(self, fd: int, sleeper: Sleeper) -> None:
        """*fd*'s connection goes dormant: its ``readable()`` is called once
        *fd* is readable (and the poller forgets it).

        As with :meth:`park`, call it right after a read of *fd* found
        nothing, with no checkpoint in between.
        """
        self._dormant[fd] = sleeper

    def take(self, fd: int) -> bool:
        """Forget the dormant connection on *fd* (it is about to be woken by
        its owner, to close): False if it was not dormant."""
        return self._dormant.pop(fd, None) is not None

    @property
    def parked(self) -> int:
        """Readers waiting now."""
        return len(self._parked)

    @property
    def dormant(self) -> int:
        """Connections waiting without a task now."""
        return len(self._dormant)

    def retire_quiet(self) -> int:
        """Retire the readers parked since the last call and not woken in
        between (each is rescheduled with :data:`RETIRED`), and remember
        the ones parked now for the next call; how many were retired."""
        parked = self._parked
        retired = 0
        for fd in self._quiet:
            task = parked.pop(fd, None)
            if task is not None:
                # (an Outcome is unwrapped once: a new one each time)
                trio.lowlevel.reschedule(task, outcome.Value(RETIRED))
                retired += 1
        self._quiet = set(parked)
        return retired

    def wake_all(self) -> None:
        """Wake every dormant connection (the broker is stopping: each
        needs its task to close)."""
        dormant, self._dormant = self._dormant, {}
        for sleeper in dormant.values():
            sleeper.wake()

    async def sweep(self, interval: float = SWEEP_INTERVAL) -> None:
        """:meth:`retire_quiet` every *interval* seconds, for ever."""
        while True:
            await trio.sleep(interval)
            self.retire_quiet()

    async def run(self) -> None:
        """Wake the parked readers whose sockets became readable, and hand
        the dormant connections' readable sockets to them, for ever."""
        epoll = self._epoll
        parked = self._parked
        dormant = self._dormant
        reschedule = trio.lowlevel.reschedule
        try:
            while True:
                await trio.lowlevel.wait_readable(epoll.fileno())
                quiet = self._quiet
                for fd, _events in epoll.poll(0, MAX_EVENTS):
                    task = parked.pop(fd, None)
                    if task is not None:
                        quiet.discard(fd)
                        reschedule(task)
                    else:
                        sleeper = dormant.pop(fd, None)
                        if sleeper is not None:
                            sleeper.readable()
        finally:
            trio.lowlevel.notify_closing(epoll.fileno())
            epoll.close()


def create_poller() -> ReadPoller | None:
    """A :class:`ReadPoller`, or None where ``select.epoll`` does not exist."""
    if not hasattr(select, "epoll"):
        return None
    return ReadPoller()
