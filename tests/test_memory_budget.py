"""The Python memory an idle subscribed connection costs the broker.

Tens of thousands of mostly idle connections are the common case, and the
performance target is an RSS per idle connection of at most 12 KiB (the
benchmark's ``idle-10000`` measures the RSS). This test keeps the part that
Python code controls from creeping up: it opens idle subscribed clients,
then counts with :mod:`tracemalloc` what the broker's side allocated for
them (allocations made with a ``broker/`` frame on the stack, which covers
the tasks, coroutine frames, queues, routes and socket objects it created;
the clients' own allocations are left out).

What it measured when written: ~9.4 KB per plain connection. That counts
the connection's handler task and coroutine, which the broker's accept
loop starts itself (under ``trio.serve_listeners`` they were started from
trio's code and not counted: ~7.9 KB then). Waiting through
``SocketStream.receive_some`` instead of the socket costs ~1.6 KB more,
which this budget fails.
"""

from __future__ import annotations

import gc
import tracemalloc
from pathlib import Path

import trio
import trio.testing

from tests.conftest import BrokerFactory
from tests.helpers import RawClient

#: Bytes of Python heap per idle subscribed plain connection, at most.
BUDGET = 10_000
CONNECTIONS = 100

BROKER_DIR = str(Path(__file__).resolve().parent.parent / "broker")


def broker_bytes(before: tracemalloc.Snapshot, after: tracemalloc.Snapshot) -> int:
    """Bytes allocated between the snapshots with broker code on the stack."""
    total = 0
    for stat in after.compare_to(before, "traceback"):
        if stat.size_diff > 0 and any(f.filename.startswith(BROKER_DIR) for f in stat.traceback):
            total += stat.size_diff
    return total


async def open_idle(url: str, first: int, count: int) -> list[RawClient]:
    clients: list[RawClient] = []

    async def one(i: int) -> None:
        client = await RawClient.open(url)
        await client.send({"op": "sub", "id": 1, "topic": f"idle.{i}"})
        reply = await client.recv()
        assert reply["op"] == "ok", reply
        clients.append(client)

    async with trio.open_nursery() as nursery:
        for i in range(first, first + count):
            nursery.start_soon(one, i)
    return clients


async def test_idle_connection_stays_within_its_memory_budget(start_broker: BrokerFactory) -> None:
    broker = await start_broker({"limits": {"max_connections_per_ip": 10_000}})
    url = broker.url
    # Warm up first: one-time allocations (caches, code objects) are not
    # per connection.
    warm = await open_idle(url, 0, 20)
    gc.collect()
    tracemalloc.start(16)
    try:
        before = tracemalloc.take_snapshot()
        clients = await open_idle(url, 1000, CONNECTIONS)
        # Let every reader get back to waiting on its socket.
        await trio.testing.wait_all_tasks_blocked()
        gc.collect()
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    per_connection = broker_bytes(before, after) / CONNECTIONS
    assert len(broker.connections) == len(warm) + CONNECTIONS
    assert per_connection <= BUDGET, f"{per_connection:.0f} B per idle connection"
    for client in warm + clients:
        await client.aclose()
