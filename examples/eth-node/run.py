"""Run the eth-node example without a node: the test suite's fake node
"mining" a block every second, the broker (broker.local.toml) and the chain
ticker page's web server, in one process.

    .venv/bin/python examples/eth-node/run.py [--block-time 1] [--port 8765] [--web-port 8000]

then open http://127.0.0.1:8000/, or, in another terminal:

    .venv/bin/broker sub 'eth.>'

Ctrl-C stops it. See README.md next to this file.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import logging
import sys
import tomllib
from pathlib import Path

import trio

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent.parent))  # tests.fake_jsonrpc: the fake node

from static_server import StaticServer  # noqa: E402

from broker import Broker, config_from_dict  # noqa: E402
from tests.fake_jsonrpc import FakeNode, head, transfer_log  # noqa: E402


async def mine(node: FakeNode, block_time: float) -> None:
    """Send each subscriber a new head and a USDC Transfer log per block."""
    for number in itertools.count(1):
        await trio.sleep(block_time)
        for conn in list(node.connections):
            if conn.closed.is_set():
                continue
            for sub_id, params in list(conn.subscriptions.items()):
                result = head(number) if params[0] == "newHeads" else transfer_log(number)
                with contextlib.suppress(Exception):  # the source reconnects
                    await conn.notify(sub_id, result)


async def main(block_time: float, port: int, web_port: int) -> None:
    config_file = HERE / "broker.local.toml"
    async with trio.open_nursery() as nursery:
        node = await nursery.start(FakeNode().serve)
        data = tomllib.loads(config_file.read_text())
        data["listener"]["port"] = port
        data["plugin"]["jsonrpc"]["sources"][0]["urls"] = [node.url]
        broker = Broker(config_from_dict(data, source=config_file))
        await nursery.start(broker.serve)
        web = await nursery.start(StaticServer(HERE / "web").serve, "127.0.0.1", web_port)
        nursery.start_soon(mine, node, block_time)
        query = "" if broker.url == "ws://127.0.0.1:8765/ws" else f"?broker={broker.url}"
        print(f"fake node on {node.url}, broker on {broker.url}", flush=True)
        print(f"chain ticker: http://127.0.0.1:{web.port}/{query}", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--block-time", type=float, default=1.0, help="seconds between blocks")
    parser.add_argument("--port", type=int, default=8765, help="the broker's port")
    parser.add_argument("--web-port", type=int, default=8000, help="the page's port")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    with contextlib.suppress(KeyboardInterrupt):
        trio.run(main, args.block_time, args.port, args.web_port)
