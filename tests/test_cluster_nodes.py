"""Broker processes (``broker serve``) on one Redis behave as one broker.

Three processes share the machine's Redis under a key prefix of the test's
own: cross-node pub/sub in both encodings, wildcards, unsub, a queue policy
applied to remote publications, recovery on another node, snapshots,
presence, and the ACL and schema plugins applied where a client publishes.
Then a process killed with SIGKILL: its clients reconnect (through a load
balancer) to another one and recover from Redis, and its presence entries
expire.
"""

from __future__ import annotations

import functools
import json
import signal
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from broker.client import Join, Leave, Message, Reconnect, Reconnected, Resync, open_client
from tests.helpers import MSGPACK, connect, free_port, raw_connect
from tests.redis_service import delete_prefix, needs_machine_redis, unique_prefix
from tests.service import BrokerProcess, http_get, open_notify_socket, run_broker

pytestmark = needs_machine_redis

URL = "redis://127.0.0.1:6379/0"
ORDER = {
    "type": "object",
    "properties": {"id": {"type": "integer"}},
    "required": ["id"],
}
TOKENS = ["alice", "bob", "watcher", "pub", "carol"]


@dataclass
class Node:
    process: BrokerProcess
    port: int
    admin_port: int

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def url_as(self, who: str) -> str:
        return f"{self.url}?token={who}-token-0123456789"

    async def stats(self) -> dict[str, Any]:
        status, _, body = await http_get("127.0.0.1", self.admin_port, "/api/stats")
        assert status == 200
        result: dict[str, Any] = json.loads(body)
        return result


def node_toml(port: int, admin_port: int, prefix: str, schema: Path) -> str:
    tokens = "\n".join(
        f'[[plugin.tokens.tokens]]\nid = "{who}"\ntoken = "{who}-token-0123456789"\n'
        for who in TOKENS
    )
    return f"""
[listener]
host = "127.0.0.1"
port = {port}

[admin]
port = {admin_port}

[engine]
type = "redis"
url = "{URL}"
prefix = "{prefix}"
presence_ttl = 2.0

[plugins]
enabled = ["tokens", "noauth", "acl", "schema"]

{tokens}

[[plugin.acl.rules]]
subjects = ["*"]
subscribe = [">"]
publish = [">"]
deny_publish = ["secret.>"]

[[plugin.schema.rules]]
pattern = "orders.>"
schema = "{schema}"

[[history]]
pattern = "t.>"
size = 1000
ttl = 60.0

[[history]]
pattern = "book.*"
size = 0
snapshot = true

[[presence]]
pattern = "chat.>"

[[queue.rules]]
pattern = "flood.>"
policy = "disconnect"
max_messages = 20
"""


@asynccontextmanager
async def open_nodes(tmp_path: Path, count: int) -> AsyncIterator[list[Node]]:
    prefix = unique_prefix()
    schema = tmp_path / "order.json"
    schema.write_text(json.dumps(ORDER))
    nodes: list[Node] = []
    try:
        async with AsyncExitStack() as stack:
            for n in range(count):
                directory = tmp_path / f"node{n}"
                directory.mkdir()
                port, admin_port = free_port(), free_port()
                config = directory / "broker.toml"
                config.write_text(node_toml(port, admin_port, prefix, schema))
                notify = await stack.enter_async_context(open_notify_socket())
                process = await stack.enter_async_context(run_broker(config, notify))
                nodes.append(Node(process, port, admin_port))
            yield nodes
    finally:
        with trio.CancelScope(shield=True):
            await delete_prefix(URL, prefix)


async def test_three_processes_on_one_redis_act_as_one(tmp_path: Path) -> None:
    async with open_nodes(tmp_path, 3) as (a, b, c):
        async with (
            connect(b.url_as("alice")) as json_sub,
            connect(c.url_as("bob"), MSGPACK) as msgpack_sub,
            connect(a.url_as("pub")) as pub,
        ):
            # Both encodings, an exact topic and wildcards, across nodes.
            await json_sub.sub("orders.eu")
            await msgpack_sub.sub("orders.*")
            assert "cursor" in await msgpack_sub.request({"op": "sub", "id": 2, "topic": "t.>"})
            assert await pub.pub("orders.eu", {"id": 1}) == 1
            assert (await json_sub.recv())["data"] == {"id": 1}
            event = await msgpack_sub.recv()
            assert (event["topic"], event["data"]) == ("orders.eu", {"id": 1})
            # The schema and ACL plugins run where the client publishes.
            invalid = await pub.request({"op": "pub", "id": 2, "topic": "orders.eu", "data": {}})
            assert invalid["code"] == "invalid", invalid
            denied = await pub.request({"op": "pub", "id": 3, "topic": "secret.x", "data": 1})
            assert denied["code"] == "forbidden", denied
            # unsub: c no longer gets orders.
            await msgpack_sub.request({"op": "unsub", "id": 4, "topic": "orders.*"})
            await pub.pub("orders.eu", {"id": 2})
            assert (await json_sub.recv())["data"] == {"id": 2}
            await pub.pub("t.x.y", "history")
            assert (await msgpack_sub.recv())["data"] == "history"  # and nothing else
            await msgpack_sub.request({"op": "unsub", "id": 5, "topic": "t.>"})

            # Recovery on another node.
            async with connect(b.url_as("alice")) as first:
                ok = await first.request({"op": "sub", "id": 1, "topic": "t.r"})
            for n in range(3):
                await pub.pub("t.r", n)
            async with connect(c.url_as("alice")) as again:
                reply = await again.request(
                    {
                        "op": "sub",
                        "id": 1,
                        "topic": "t.r",
                        "since": {"epoch": ok["epoch"], "seq": 0},
                    }
                )
                assert reply["recovered"] is True and reply["seq"] == 3
                assert [(await again.recv())["data"] for _ in range(3)] == [0, 1, 2]

            # Snapshots kept in Redis, read on another node.
            await pub.pub("book.X", 5, key="100")
            await pub.pub("book.X", 6, key="101")
            async with connect(c.url_as("carol")) as snap:
                await snap.request({"op": "sub", "id": 1, "topic": "book.X", "snapshot": True})
                got = [await snap.recv() for _ in range(2)]
                assert [(e["key"], e["data"]) for e in got] == [("100", 5), ("101", 6)]

            # Presence: members on a and b, asked on c.
            async with connect(a.url_as("alice")) as m1, connect(b.url_as("bob")) as m2:
                await m1.sub("chat.r")
                await m2.sub("chat.r")
                await m1.assert_alive()  # the sub's join is done once pinged
                await m2.assert_alive()
                async with connect(c.url_as("carol")) as asker:
                    reply = await asker.request({"op": "presence", "id": 1, "topic": "chat.r"})
                    assert [m["subject"] for m in reply["members"]] == ["alice", "bob"]

            await json_sub.assert_alive()
            await msgpack_sub.assert_alive()

        # A queue policy applies to publications from another node: a
        # subscriber of c that does not read is disconnected (policy
        # "disconnect", 20 messages) by c while a publishes.
        async with (
            raw_connect(c.url, rcvbuf=4096) as slow,
            connect(a.url_as("pub")) as pub,
        ):
            await slow.send({"op": "sub", "id": 1, "topic": "flood.x"})
            assert await slow.recv() == {"op": "ok", "id": 1}
            payload = "x" * 4096
            with trio.fail_after(20):
                n = 0
                while (await c.stats())["slow_consumers"] == 0:
                    for _ in range(50):
                        n += 1
                        await pub.send({"op": "pub", "topic": "flood.x", "data": payload})
                    await pub.assert_alive()


async def test_a_killed_node_s_clients_resume_on_another(tmp_path: Path) -> None:
    """A broker process is killed (SIGKILL): a Python client that reached it
    through a load balancer reconnects to another one and recovers from
    Redis with nothing missed; a client that had no way back is counted out
    of presence within presence_ttl (2 s here), with a leave event."""
    async with open_nodes(tmp_path, 2) as (a, b), open_balancer([a.port, b.port]) as lb:
        items: list[Any] = []
        lb_url = f"ws://127.0.0.1:{lb}/ws?token=alice-token-0123456789"
        reconnect = Reconnect(initial_delay=0.01, max_delay=0.2, wait_timeout=5.0)
        async with (
            open_client(lb_url, reconnect=reconnect) as client,
            client.subscribe("t.k") as sub,
            connect(b.url_as("pub")) as pub,
            connect(b.url_as("watcher")) as watcher,
            connect(a.url_as("bob")) as bob,  # on a, no way back
        ):
            await watcher.request({"op": "sub", "id": 1, "topic": "chat.r", "presence": True})
            assert (await watcher.recv())["member"]["subject"] == "watcher"
            await bob.sub("chat.r")
            assert (await watcher.recv())["member"]["subject"] == "bob"
            for n in range(5):
                await pub.pub("t.k", n)
            with trio.fail_after(5):
                while len(items) < 5:
                    items.append(await sub.__anext__())
            a.process.process.send_signal(signal.SIGKILL)
            with trio.fail_after(5):
                await a.process.process.wait()
            for n in range(5, 10):
                await pub.pub("t.k", n)
            with trio.fail_after(10):
                while len([i for i in items if isinstance(i, Message)]) < 10:
                    items.append(await sub.__anext__())
            # bob's connection died with a: its entry expires, with a leave.
            with trio.fail_after(10):
                event = await watcher.recv()
            assert event["op"] == "leave" and event["member"]["subject"] == "bob", event
        assert [i.data for i in items if isinstance(i, Message)] == list(range(10))
        assert any(isinstance(i, Reconnected) for i in items)
        assert not any(isinstance(i, Resync | Join | Leave) for i in items), items


@asynccontextmanager
async def open_balancer(ports: list[int]) -> AsyncIterator[int]:
    """A TCP load balancer on a free port: each connection goes to the first
    of *ports* that accepts (a dead backend is skipped)."""

    async def relay(source: trio.SocketStream, sink: trio.SocketStream) -> None:
        try:
            while data := await source.receive_some(65536):
                await sink.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await trio.aclose_forcefully(sink)

    async def handle(client: trio.SocketStream) -> None:
        for port in ports:
            try:
                backend = await trio.open_tcp_stream("127.0.0.1", port)
            except OSError:
                continue
            async with trio.open_nursery() as nursery:
                nursery.start_soon(relay, client, backend)
                nursery.start_soon(relay, backend, client)
            return
        await trio.aclose_forcefully(client)

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, handle, 0, host="127.0.0.1")
        )
        yield listeners[0].socket.getsockname()[1]
        nursery.cancel_scope.cancel()
