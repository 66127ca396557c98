"""The read poller idle connections wait on (broker.io.poller), over real sockets.

A reader parks after a read found its socket empty and is rescheduled when
the socket becomes readable; cancelling it unparks it; events for sockets
nobody waits on are ignored; a descriptor closed and reused by a new socket
wakes the new socket's reader; a sweep retires only the readers parked
since the one before and not woken in between, and a dormant socket's
sleeper is woken once. Through the broker: idle connections are parked,
answer as soon as a client writes, and leave the poller when they close
(tests/test_dormant.py follows them when they go dormant).
"""

from __future__ import annotations

import os
import socket
import sys
from functools import partial

import pytest
import trio
import trio.testing

from broker.io.poller import RETIRED, ReadPoller, create_poller
from tests.conftest import BrokerFactory
from tests.helpers import RawClient, wait_until

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="epoll is Linux's")


def _longer_than(got: list[bytes], n: int) -> bool:
    return len(got) > n


def _pair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair()
    a.setblocking(False)
    return a, b


async def _read_parked(
    poller: ReadPoller, sock: socket.socket, got: list[bytes], woken: list[object] | None = None
) -> None:
    """What a connection's reader does: read, and park when empty (each
    wake-up's value in *woken*; it ends when retired)."""
    fd = sock.fileno()
    task = trio.lowlevel.current_task()

    def abort(_: trio.lowlevel.RaiseCancelT) -> trio.lowlevel.Abort:
        poller.unpark(fd)
        return trio.lowlevel.Abort.SUCCEEDED

    while True:
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            poller.park(fd, task)
            value = await trio.lowlevel.wait_task_rescheduled(abort)
            if woken is not None:
                woken.append(value)
            if value is RETIRED:
                return
            continue
        got.append(data)
        if not data:
            return


async def test_a_parked_reader_wakes_for_each_write_and_at_the_end() -> None:
    poller = create_poller()
    assert poller is not None
    ours, theirs = _pair()
    got: list[bytes] = []
    with ours, theirs:
        assert poller.register(ours.fileno())
        async with trio.open_nursery() as nursery:
            nursery.start_soon(poller.run)
            nursery.start_soon(_read_parked, poller, ours, got)
            await trio.testing.wait_all_tasks_blocked()
            assert poller.parked == 1 and got == []
            for chunk in (b"one", b"two"):
                before = len(got)
                theirs.sendall(chunk)
                await wait_until(partial(_longer_than, got, before))
                assert got[-1] == chunk
                await trio.testing.wait_all_tasks_blocked()
                assert poller.parked == 1
            theirs.shutdown(socket.SHUT_WR)
            await wait_until(lambda: got[-1] == b"")
            assert poller.parked == 0
            nursery.cancel_scope.cancel()
    assert got == [b"one", b"two", b""]


async def test_a_cancelled_reader_is_unparked() -> None:
    poller = create_poller()
    assert poller is not None
    ours, theirs = _pair()
    with ours, theirs:
        assert poller.register(ours.fileno())
        async with trio.open_nursery() as nursery:
            nursery.start_soon(poller.run)
            with trio.CancelScope() as scope:
                nursery.start_soon(_cancel_when_parked, poller, scope)
                await _read_parked(poller, ours, [])
            assert scope.cancelled_caught
            assert poller.parked == 0
            # Data for a socket nobody waits on now: the event is ignored.
            theirs.sendall(b"late")
            await trio.testing.wait_all_tasks_blocked()
            assert poller.parked == 0
            nursery.cancel_scope.cancel()


async def _cancel_when_parked(poller: ReadPoller, scope: trio.CancelScope) -> None:
    await wait_until(lambda: poller.parked == 1)
    scope.cancel()


async def test_a_reused_descriptor_wakes_its_new_reader() -> None:
    """A socket closed while registered leaves the epoll by itself: the next
    socket given the same descriptor registers and wakes like any other."""
    poller = create_poller()
    assert poller is not None
    async with trio.open_nursery() as nursery:
        nursery.start_soon(poller.run)
        first, peer = _pair()
        fd = first.fileno()
        assert poller.register(fd)
        peer.sendall(b"unread")  # an event nobody takes
        await trio.testing.wait_all_tasks_blocked()
        first.close()
        peer.close()
        ours, theirs = _pair()
        with ours, theirs:
            assert ours.fileno() == fd or theirs.fileno() == fd
            if ours.fileno() != fd:
                ours, theirs = theirs, ours
                ours.setblocking(False)
            assert poller.register(ours.fileno())
            got: list[bytes] = []
            nursery.start_soon(_read_parked, poller, ours, got)
            await trio.testing.wait_all_tasks_blocked()
            assert got == [] and poller.parked == 1
            theirs.sendall(b"fresh")
            await wait_until(lambda: got == [b"fresh"])
        nursery.cancel_scope.cancel()


async def test_a_sweep_retires_only_readers_parked_through_it() -> None:
    """retire_quiet() retires the readers that were parked at its previous
    call and have not been woken since; a reader woken in between (and
    parked again) waits for the next call."""
    poller = create_poller()
    assert poller is not None
    (busy, busy_peer), (idle, idle_peer) = _pair(), _pair()
    woken: dict[str, list[object]] = {"busy": [], "idle": []}

    with busy, busy_peer, idle, idle_peer:
        assert poller.register(busy.fileno()) and poller.register(idle.fileno())
        async with trio.open_nursery() as nursery:
            nursery.start_soon(poller.run)
            nursery.start_soon(_read_parked, poller, busy, [], woken["busy"])
            nursery.start_soon(_read_parked, poller, idle, [], woken["idle"])
            await trio.testing.wait_all_tasks_blocked()
            assert poller.retire_quiet() == 0  # marks both
            busy_peer.sendall(b"input")
            await wait_until(lambda: woken["busy"] == [None])
            await trio.testing.wait_all_tasks_blocked()
            assert poller.parked == 2
            assert poller.retire_quiet() == 1  # the idle one only
            await trio.testing.wait_all_tasks_blocked()
            assert woken == {"busy": [None], "idle": [RETIRED]}
            assert poller.retire_quiet() == 1  # the busy one, quiet since
            await trio.testing.wait_all_tasks_blocked()
            assert woken["busy"] == [None, RETIRED] and poller.parked == 0
            nursery.cancel_scope.cancel()


class _Sleeper:
    def __init__(self) -> None:
        self.readables = 0
        self.wakes = 0

    def readable(self) -> None:
        self.readables += 1

    def wake(self) -> None:
        self.wakes += 1


async def test_a_dormant_socket_tells_its_sleeper_once() -> None:
    """Input on a dormant socket calls its sleeper's readable() once (the
    poller forgets it); stopping wakes the ones still dormant."""
    poller = create_poller()
    assert poller is not None
    ours, theirs = _pair()
    kept, kept_peer = _pair()
    sleeper, taken = _Sleeper(), _Sleeper()
    with ours, theirs, kept, kept_peer:
        assert poller.register(ours.fileno()) and poller.register(kept.fileno())
        poller.sleep(ours.fileno(), sleeper)
        poller.sleep(kept.fileno(), taken)
        assert poller.dormant == 2
        # Taken back by its owner (to close it): the poller forgets it.
        assert poller.take(kept.fileno()) and not poller.take(kept.fileno())
        async with trio.open_nursery() as nursery:
            nursery.start_soon(poller.run)
            theirs.sendall(b"one")
            kept_peer.sendall(b"ignored")
            await wait_until(lambda: sleeper.readables == 1)
            theirs.sendall(b"two")  # nobody sleeps on it now
            await trio.testing.wait_all_tasks_blocked()
            assert (sleeper.readables, taken.readables, poller.dormant) == (1, 0, 0)
            assert sleeper.wakes == taken.wakes == 0
            poller.sleep(ours.fileno(), sleeper)
            poller.wake_all()
            assert (sleeper.wakes, sleeper.readables, poller.dormant) == (1, 1, 0)
            nursery.cancel_scope.cancel()


async def test_idle_connections_are_parked_and_answer_at_once(
    start_broker: BrokerFactory,
) -> None:
    broker = await start_broker(sweep_interval=None)
    poller = broker._poller
    assert poller is not None
    clients = [await RawClient.open(broker.url) for _ in range(5)]
    for i, client in enumerate(clients):
        await client.send({"op": "sub", "id": 1, "topic": f"idle.{i}"})
        assert (await client.recv())["op"] == "ok"
    await trio.testing.wait_all_tasks_blocked()
    assert poller.parked == len(broker.connections) == 5
    # A parked connection reads as soon as its client writes.
    await clients[2].send({"op": "ping", "id": 7})
    assert await clients[2].recv() == {"op": "pong", "id": 7}
    # One that closes leaves the poller; the others stay parked.
    await clients[0].aclose()
    await wait_until(lambda: len(broker.connections) == 4)
    await trio.testing.wait_all_tasks_blocked()
    assert poller.parked == 4
    # Closed by the broker while parked (here: it is shutting down).
    broker.stop()
    await wait_until(lambda: not broker.connections)
    assert poller.parked == 0
    for client in clients[1:]:
        await client.aclose()
