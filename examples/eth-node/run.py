"""Run the eth-node example: broker.toml's broker, fed by a local fake node or by your node.

    .venv/bin/python examples/eth-node/run.py [--port 8765] [--admin-port 8766] [--web-port 8000]

starts the test suite's fake node (a devnet that mines a block every
second, on ``--node-port``), the broker bridging it and the chain ticker
page (http://127.0.0.1:8000/), in one process.
Name a real node or provider to bridge it instead (nothing else is ever
contacted):

    .venv/bin/python examples/eth-node/run.py --upstream ws://127.0.0.1:8546/
    ETH_NODE_URL=wss://... .venv/bin/python examples/eth-node/run.py

It prints the ``broker sub`` command to try in another terminal. Ctrl-C
stops it. See README.md next to this file.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tomllib
from pathlib import Path

import trio

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # static_server
sys.path.insert(0, str(HERE.parent.parent))  # the repository, for tests.fake_jsonrpc

from example_cli import (  # noqa: E402
    admin_port_for,
    describe,
    listening,
    page_url,
    sub_hint,
)
from static_server import StaticServer  # noqa: E402

from broker import Broker, ConfigError, config_from_dict  # noqa: E402
from broker.sources import display_url  # noqa: E402
from tests.fake_jsonrpc import serve_devnet  # noqa: E402

#: The environment variable naming the upstream node (as ``--upstream`` does).
UPSTREAM_ENV = "ETH_NODE_URL"


async def main(
    port: int,
    admin_port: int,
    upstream: str | None,
    node_port: int,
    block_time: float,
    web_port: int,
) -> None:
    config_file = HERE / "broker.toml"
    async with trio.open_nursery() as nursery:
        if upstream is None:
            with listening("the fake node", node_port, "--node-port"):
                node_port = await nursery.start(serve_devnet, node_port, block_time)
            upstream = f"ws://127.0.0.1:{node_port}/"
            node = f"the fake node on {upstream}"
        else:
            node = display_url(upstream)
        data = tomllib.loads(config_file.read_text())
        data["listener"]["port"] = port
        data.setdefault("admin", {})["port"] = admin_port
        data["plugin"]["jsonrpc"]["sources"][0]["urls"] = [upstream]
        broker = Broker(config_from_dict(data, source=config_file))
        await nursery.start(broker.serve)
        print(
            f"bridging {node}; broker on {broker.url}, health and metrics on {broker.admin_url}",
            flush=True,
        )
        with listening("the chain ticker page", web_port, "--web-port"):
            web = await nursery.start(StaticServer(HERE / "web").serve, "127.0.0.1", web_port)
        print(page_url("chain ticker", web.port, broker.url), flush=True)
        print(f"try:  {sub_hint(broker.url, 'eth.>')}", flush=True)


def cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8765, help="the broker's WebSocket port")
    parser.add_argument(
        "--admin-port", type=int, help="the broker's health and metrics port (default: --port + 1)"
    )
    parser.add_argument(
        "--upstream",
        metavar="URL",
        default=os.environ.get(UPSTREAM_ENV) or None,
        help=f"your node's ws:// or wss:// endpoint (or set {UPSTREAM_ENV}); "
        "default: start the fake node",
    )
    parser.add_argument(
        "--node-port", type=int, default=8545, help="the fake node's port (without --upstream)"
    )
    parser.add_argument(
        "--block-time", type=float, default=1.0, help="the fake node's seconds between blocks"
    )
    parser.add_argument("--web-port", type=int, default=8000, help="the chain ticker page's port")
    args = parser.parse_args(argv)
    if args.upstream is not None and not args.upstream.startswith(("ws://", "wss://")):
        parser.error(f"--upstream (or {UPSTREAM_ENV}) must be a ws:// or wss:// URL")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    admin_port = admin_port_for(args.port, args.admin_port)
    status = 0
    try:
        trio.run(
            main,
            args.port,
            admin_port,
            args.upstream,
            args.node_port,
            args.block_time,
            args.web_port,
        )
    except* KeyboardInterrupt:
        pass
    except* (ConfigError, OSError) as group:
        print(f"run.py: {describe(group)}", file=sys.stderr)
        status = 1
    return status


if __name__ == "__main__":
    sys.exit(cli())
