"""A fake Ethereum JSON-RPC node: a WebSocket server speaking ``eth_subscribe``.

In tests, :class:`FakeNode` is driven step by step: it accepts connections,
answers ``eth_subscribe`` (or refuses it), and the test makes it send
notifications, garbage, stale notifications of old subscriptions, stall, or
drop the connection without a close frame.

Run on its own, it is a tiny devnet for ``examples/eth-node``: it mines a
block every ``--block-time`` seconds and emits ``newHeads`` and a
``Transfer`` log per block to whoever subscribed::

    .venv/bin/python -m tests.fake_jsonrpc --port 8545
"""

from __future__ import annotations

import argparse
import itertools
import json
from dataclasses import dataclass, field
from typing import Any

import trio
import trio_websocket

#: keccak256("Transfer(address,address,uint256)")
TRANSFER_TOPIC = "0xddf252ad1be2c89b69c2b068fc378daa952ba7f163c4a11628f55a4df523b3ef"
USDC = "0xA0b86991c6218b36c1d19D4a2e9Eb0cE3606eB48"


@dataclass
class NodeConnection:
    """One client connection to the fake node."""

    ws: trio_websocket.WebSocketConnection
    #: subscription id -> params of its eth_subscribe call
    subscriptions: dict[str, list[Any]] = field(default_factory=dict)
    requests: list[dict[str, Any]] = field(default_factory=list)
    changed: trio.Event = field(default_factory=trio.Event)
    closed: trio.Event = field(default_factory=trio.Event)

    def _changed(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    async def wait_subscribed(self, count: int = 1, seconds: float = 5.0) -> list[str]:
        with trio.fail_after(seconds):
            while len(self.subscriptions) < count:
                await self.changed.wait()
        return list(self.subscriptions)

    async def send(self, obj: Any) -> None:
        await self.ws.send_message(obj if isinstance(obj, str) else json.dumps(obj))

    async def notify(self, subscription: str, result: Any) -> None:
        await self.send(
            {
                "jsonrpc": "2.0",
                "method": "eth_subscription",
                "params": {"subscription": subscription, "result": result},
            }
        )

    async def drop(self) -> None:
        """Cut the TCP connection without a WebSocket close."""
        await trio.aclose_forcefully(self.ws._stream)


class FakeNode:
    """The server; see the module doc.

    Args:
        refuse: answer every eth_subscribe with this JSON-RPC error message.
        answer: whether to answer eth_subscribe at all (False: never answers).
    """

    def __init__(self, *, refuse: str | None = None, answer: bool = True) -> None:
        self.refuse = refuse
        self.answer = answer
        self.connections: list[NodeConnection] = []
        self.port = 0
        self._ids = itertools.count(0x10)
        self._new_connection = trio.Event()

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/"

    async def serve(
        self, *, task_status: trio.TaskStatus[FakeNode] = trio.TASK_STATUS_IGNORED
    ) -> None:
        async with trio.open_nursery() as nursery:
            server = await nursery.start(
                trio_websocket.serve_websocket, self._handler, "127.0.0.1", 0, None
            )
            self.port = server.port
            task_status.started(self)

    async def connection(self, index: int, seconds: float = 5.0) -> NodeConnection:
        """The index-th connection (from 0), waiting for it to arrive."""
        with trio.fail_after(seconds):
            while len(self.connections) <= index:
                await self._new_connection.wait()
        return self.connections[index]

    async def _handler(self, request: trio_websocket.WebSocketRequest) -> None:
        ws = await request.accept()
        conn = NodeConnection(ws)
        self.connections.append(conn)
        self._new_connection.set()
        self._new_connection = trio.Event()
        try:
            while True:
                message = await ws.get_message()
                request_obj = json.loads(message)
                conn.requests.append(request_obj)
                conn._changed()
                await self._answer(conn, request_obj)
        except (
            trio_websocket.ConnectionClosed,
            trio.BrokenResourceError,
            trio.ClosedResourceError,
        ):
            pass
        finally:
            conn.closed.set()

    async def _answer(self, conn: NodeConnection, request: dict[str, Any]) -> None:
        if request.get("method") != "eth_subscribe" or not self.answer:
            return
        if self.refuse is not None:
            await conn.send(
                {
                    "jsonrpc": "2.0",
                    "id": request["id"],
                    "error": {"code": -32602, "message": self.refuse},
                }
            )
            return
        sub_id = hex(next(self._ids))
        await conn.send({"jsonrpc": "2.0", "id": request["id"], "result": sub_id})
        conn.subscriptions[sub_id] = request["params"]
        conn._changed()


def head(number: int) -> dict[str, Any]:
    """A block header as newHeads sends it (the fields clients use most)."""
    return {
        "number": hex(number),
        "hash": "0x" + f"{number:064x}",
        "parentHash": "0x" + f"{number - 1:064x}",
        "timestamp": hex(1_700_000_000 + 12 * number),
        "gasUsed": hex(15_000_000),
        "baseFeePerGas": hex(20_000_000_000),
    }


def transfer_log(number: int, address: str = USDC) -> dict[str, Any]:
    return {
        "address": address,
        "topics": [TRANSFER_TOPIC, "0x" + "00" * 12 + "11" * 20, "0x" + "00" * 12 + "22" * 20],
        "data": "0x" + f"{1_000_000 * number:064x}",
        "blockNumber": hex(number),
        "transactionHash": "0x" + f"{number:062x}aa",
        "logIndex": "0x0",
        "removed": False,
    }


async def serve_devnet(
    port: int = 0,
    block_time: float = 1.0,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """The devnet: serve on 127.0.0.1:*port* (reported to ``nursery.start``,
    0 picks a free one) and mine a block every *block_time* seconds."""
    node = FakeNode()
    async with trio.open_nursery() as nursery:
        server = await nursery.start(
            trio_websocket.serve_websocket, node._handler, "127.0.0.1", port, None
        )
        task_status.started(server.port)
        for number in itertools.count(1):
            await trio.sleep(block_time)
            for conn in list(node.connections):
                if conn.closed.is_set():
                    continue
                for sub_id, params in list(conn.subscriptions.items()):
                    result = head(number) if params[0] == "newHeads" else transfer_log(number)
                    try:
                        await conn.notify(sub_id, result)
                    except trio_websocket.ConnectionClosed:
                        break


async def _devnet(port: int, block_time: float) -> None:
    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve_devnet, port, block_time)
        print(f"fake node on ws://127.0.0.1:{port}/ (Ctrl-C to stop)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description="a fake JSON-RPC node (eth_subscribe)")
    parser.add_argument("--port", type=int, default=8545)
    parser.add_argument("--block-time", type=float, default=1.0, help="seconds between blocks")
    args = parser.parse_args()
    try:
        trio.run(_devnet, args.port, args.block_time)
    except* KeyboardInterrupt:  # Ctrl-C: it may come out of a nursery, in a group
        pass


if __name__ == "__main__":
    main()
