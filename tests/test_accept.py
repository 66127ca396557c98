"""The accept loop: bursts, addresses, and running out of file descriptors.

A burst of more connections than the loop takes per wake-up is served
whole, each connection named by the address accept() gave (IPv4 and IPv6).

Out of file descriptors, ``broker serve`` (in a subprocess with a low
open-files limit) keeps serving: once every descriptor is taken,
``accept()`` fails with EMFILE; the broker logs it, keeps its connections,
and retries, so that a client waiting in the listen backlog is served as
soon as another one leaves.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from broker.server.broker import ACCEPT_BATCH
from tests.conftest import BrokerFactory
from tests.helpers import RawClient, connect, free_port, wait_until
from tests.test_shutdown import serve_command

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="counts descriptors in /proc"
)

#: Connections the broker has room for in this test.
ROOM = 4


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def test_a_burst_of_connections_is_accepted_and_served(
    start_broker: BrokerFactory,
) -> None:
    broker = await start_broker()
    count = 3 * ACCEPT_BATCH + 5
    clients: list[RawClient] = []

    async def one(i: int) -> None:
        client = await RawClient.open(broker.url)
        clients.append(client)
        await client.send({"op": "sub", "id": 1, "topic": f"burst.{i}"})
        assert await client.recv() == {"op": "ok", "id": 1}

    async with trio.open_nursery() as nursery:
        for i in range(count):
            nursery.start_soon(one, i)
    assert len(broker.connections) == count
    # Each connection is named by the client's own address and port.
    ours = {("127.0.0.1", client.stream.socket.getsockname()[1]) for client in clients}
    assert {conn.peer for conn in broker.connections} == ours
    for client in clients:
        await client.aclose()


async def test_an_ipv6_client_is_named_by_its_address_and_port(
    start_broker: BrokerFactory,
) -> None:
    try:
        broker = await start_broker({"listener": {"host": "::1"}})
    except OSError as e:  # no IPv6 loopback here
        pytest.skip(f"cannot listen on ::1: {e}")
    async with connect(broker.url) as client:
        await client.send({"op": "ping", "id": 1})
        assert await client.recv() == {"op": "pong", "id": 1}
        [conn] = broker.connections
        stream = client.ws._stream
        assert isinstance(stream, trio.SocketStream)
        host, port = stream.socket.getsockname()[:2]
        assert conn.peer == (host, port) == ("::1", port)


async def test_accept_survives_running_out_of_descriptors(tmp_path: Path) -> None:
    port = free_port()
    config = tmp_path / "broker.toml"
    config.write_text(f'[listener]\nhost = "127.0.0.1"\nport = {port}\n[admin]\nenabled = false\n')
    url = f"ws://127.0.0.1:{port}/ws"
    log = tmp_path / "stderr.log"
    limit: list[int] = []

    def low_limit() -> None:  # in the child, before exec
        if limit:
            resource.setrlimit(resource.RLIMIT_NOFILE, (limit[0], limit[0]))

    # First run: how many descriptors a serving broker uses by itself.
    with log.open("wb") as stderr:
        probe = await trio.lowlevel.open_process(
            serve_command(config), stdin=subprocess.DEVNULL, stderr=stderr
        )
    try:
        client = await _connect_when_up(url, probe)
        base = open_fds(probe.pid) - 1  # without the probe's connection
        await client.aclose()
    finally:
        probe.kill()
        await probe.wait()

    limit.append(base + ROOM)
    with log.open("wb") as stderr:
        process = await trio.lowlevel.open_process(
            serve_command(config), stdin=subprocess.DEVNULL, stderr=stderr, preexec_fn=low_limit
        )
    clients: list[RawClient] = []
    try:
        clients.append(await _connect_when_up(url, process))
        while len(clients) < ROOM:
            clients.append(await RawClient.open(url))
        assert open_fds(process.pid) == base + ROOM

        # One more: TCP completes in the backlog, accept() fails (EMFILE).
        waiting: list[RawClient] = []

        async def late_client() -> None:
            waiting.append(await RawClient.open(url))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(late_client)
            await wait_until(lambda: b"accept failed: Too many open files" in log.read_bytes())
            # The connections it has are served meanwhile.
            for client in clients:
                await client.send({"op": "ping", "id": 1})
                assert (await client.recv())["op"] == "pong"
            assert not waiting
            # Room again: the waiting client is accepted and served.
            await clients.pop().aclose()
        [late] = waiting
        await late.send({"op": "sub", "id": 2, "topic": "after.emfile"})
        assert (await late.recv())["op"] == "ok"
        clients.append(late)
        assert process.poll() is None
    finally:
        for client in clients:
            await client.aclose()
        process.kill()
        await process.wait()


async def _connect_when_up(url: str, process: trio.Process) -> RawClient:
    with trio.fail_after(10):
        while True:
            try:
                return await RawClient.open(url)
            except OSError:
                assert process.poll() is None, "broker exited"
                await trio.sleep(0.02)
