"""N broker processes on one machine: the systemd template units
(examples/systemd/trio-broker@.service, trio-broker@.socket,
trio-broker-admin@.socket), and what they set up, run for real.

``systemd-analyze verify`` checks the units where it is installed. Then two
``broker serve`` processes get what systemd would give two instances: each
an ``SO_REUSEPORT`` socket on one shared WebSocket port and an admin socket
of its own, as ``LISTEN_FDS``. On the Redis engine (the machine's Redis,
a prefix of the test's own) they act as one broker on one port.
"""

from __future__ import annotations

import json
import shutil
import socket
from contextlib import AsyncExitStack
from pathlib import Path

import pytest

from tests.helpers import connect, free_port
from tests.redis_service import delete_prefix, needs_machine_redis, unique_prefix
from tests.service import http_get, open_notify_socket, run_broker
from tests.test_systemd_units import directives, verify_units

ROOT = Path(__file__).resolve().parent.parent
UNITS = ROOT / "examples" / "systemd"
SERVICE = UNITS / "trio-broker@.service"
SOCKET = UNITS / "trio-broker@.socket"
ADMIN = UNITS / "trio-broker-admin@.socket"
URL = "redis://127.0.0.1:6379/0"


@pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze is not installed (Debian: apt-get install systemd)",
)
def test_template_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    instances = [
        "trio-broker@8770.service",
        "trio-broker@8770.socket",
        "trio-broker-admin@8770.socket",
    ]
    verify_units(tmp_path, (SERVICE, SOCKET, ADMIN), instances)


def test_template_units_share_the_port_and_name_their_sockets() -> None:
    socket_unit = {k: v for _, k, v in directives(SOCKET)}
    assert socket_unit["ReusePort"] == "yes"
    assert socket_unit["FileDescriptorName"] == "ws"
    assert socket_unit["Service"] == "trio-broker@%i.service"
    admin = {k: v for _, k, v in directives(ADMIN)}
    assert admin["FileDescriptorName"] == "admin"
    assert admin["ListenStream"] == "127.0.0.1:%i"
    requires = [v for _, k, v in directives(SERVICE) if k == "Requires"]
    assert requires == ["trio-broker@%i.socket trio-broker-admin@%i.socket"]
    # The service part is the single-process unit's, line for line.
    single = [d for d in directives(UNITS / "trio-broker.service") if d[0] != "Unit"]
    assert [d for d in directives(SERVICE) if d[0] != "Unit"] == single


@pytest.mark.parametrize("unit", [SERVICE, SOCKET, ADMIN], ids=lambda p: p.name)
def test_every_template_directive_is_explained(unit: Path) -> None:
    docs = (ROOT / "docs" / "operations.md").read_text() + (
        ROOT / "docs" / "cluster.md"
    ).read_text()
    for _, key, _ in directives(unit):
        assert f"`{key}=" in docs, f"neither operations.md nor cluster.md explains {key}="


@needs_machine_redis
async def test_two_processes_on_one_port_act_as_one(tmp_path: Path) -> None:
    prefix = unique_prefix()
    config = tmp_path / "broker.toml"
    config.write_text(f'[engine]\ntype = "redis"\nurl = "{URL}"\nprefix = "{prefix}"\n')
    port = free_port()
    ws_sockets, admins = [], []
    for _ in range(2):  # what trio-broker@.socket and trio-broker-admin@.socket bind
        ws = socket.socket()
        ws.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ws.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        ws.bind(("127.0.0.1", port))
        ws.listen(128)
        ws_sockets.append(ws)
        admin = socket.socket()
        admin.bind(("127.0.0.1", 0))
        admin.listen(16)
        admins.append(admin)
    admin_ports = [a.getsockname()[1] for a in admins]
    url = f"ws://127.0.0.1:{port}/ws"
    try:
        async with AsyncExitStack() as stack:
            for ws, admin in zip(ws_sockets, admins, strict=True):
                notify = await stack.enter_async_context(open_notify_socket())
                await stack.enter_async_context(
                    run_broker(
                        config,
                        notify,
                        listen_fds=[ws.fileno(), admin.fileno()],
                        fd_names=["ws", "admin"],
                    )
                )
            for s in ws_sockets + admins:
                s.close()  # the processes have their copies
            publisher = await stack.enter_async_context(connect(url))
            clients = [await stack.enter_async_context(connect(url)) for _ in range(40)]
            for client in clients:
                await client.sub("t.one")
            # The kernel spread the connections over both processes ...
            for admin_port in admin_ports:
                _, _, body = await http_get("127.0.0.1", admin_port, "/api/stats")
                assert json.loads(body)["connections"] > 0
            # ... which deliver a publish made on either to all of them.
            seq = await publisher.pub("t.one", "hello")
            for client in clients:
                event = await client.recv()
                assert (event["seq"], event["data"]) == (seq, "hello")
    finally:
        await delete_prefix(URL, prefix)
