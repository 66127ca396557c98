"""Run the market-data example: the simulated exchange, the broker and the
dashboard's web server, in one process.

    .venv/bin/python examples/market-data/run.py [--rate 20] [--port 8765] [--admin-port 8766] [--web-port 8000]

then open http://127.0.0.1:8000/ (the dashboard). It also prints the
``broker sub`` command to try in another terminal (with ``--url`` when the
port moved). Ctrl-C stops both. See README.md next to this file.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tomllib
from pathlib import Path

import trio

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from example_cli import (  # noqa: E402
    admin_port_for,
    describe,
    listening,
    page_url,
    sub_hint,
)
from exchange import Exchange  # noqa: E402
from static_server import StaticServer  # noqa: E402

from broker import Broker, ConfigError, config_from_dict  # noqa: E402


async def main(rate: float, port: int, admin_port: int, exchange_port: int, web_port: int) -> None:
    config_file = HERE / "broker.toml"
    exchange = Exchange(rate=rate)
    async with trio.open_nursery() as nursery:
        with listening("the exchange", exchange_port, "--exchange-port"):
            await nursery.start(exchange.serve, "127.0.0.1", exchange_port)
        data = tomllib.loads(config_file.read_text())
        data["listener"]["port"] = port
        data.setdefault("admin", {})["port"] = admin_port
        data["plugin"]["wsfeed"]["sources"][0]["urls"] = [f"ws://127.0.0.1:{exchange.port}/"]
        broker = Broker(config_from_dict(data, source=config_file))
        await nursery.start(broker.serve)
        print(
            f"exchange on ws://127.0.0.1:{exchange.port}/, broker on {broker.url}, "
            f"health and metrics on {broker.admin_url}",
            flush=True,
        )
        with listening("the dashboard", web_port, "--web-port"):
            web = await nursery.start(StaticServer(HERE / "web").serve, "127.0.0.1", web_port)
        print(page_url("dashboard", web.port, broker.url), flush=True)
        print(f"try:  {sub_hint(broker.url, 'trades.>', 'candles.>')}", flush=True)


def cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=20.0, help="ticks per second per symbol")
    parser.add_argument("--port", type=int, default=8765, help="the broker's WebSocket port")
    parser.add_argument(
        "--admin-port", type=int, help="the broker's health and metrics port (default: --port + 1)"
    )
    parser.add_argument("--exchange-port", type=int, default=9001)
    parser.add_argument("--web-port", type=int, default=8000, help="the dashboard's port")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    admin_port = admin_port_for(args.port, args.admin_port)
    status = 0
    try:
        trio.run(main, args.rate, args.port, admin_port, args.exchange_port, args.web_port)
    except* KeyboardInterrupt:
        pass
    except* (ConfigError, OSError) as group:
        print(f"run.py: {describe(group)}", file=sys.stderr)
        status = 1
    return status


if __name__ == "__main__":
    sys.exit(cli())
