"""Run the market-data example: the simulated exchange, the broker and the
dashboard's web server, in one process.

    .venv/bin/python examples/market-data/run.py [--rate 20] [--port 8765] [--web-port 8000]

then open http://127.0.0.1:8000/ (the dashboard), or, in another terminal:

    .venv/bin/broker sub 'trades.>' 'candles.>'
    .venv/bin/broker sub 'book.BTC-USD'

Ctrl-C stops both. See README.md next to this file.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import tomllib
from pathlib import Path

import trio

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from exchange import Exchange  # noqa: E402
from static_server import StaticServer  # noqa: E402

from broker import Broker, config_from_dict  # noqa: E402


async def main(rate: float, port: int, exchange_port: int, web_port: int) -> None:
    config_file = HERE / "broker.toml"
    exchange = Exchange(rate=rate)
    async with trio.open_nursery() as nursery:
        await nursery.start(exchange.serve, "127.0.0.1", exchange_port)
        data = tomllib.loads(config_file.read_text())
        data["listener"]["port"] = port
        data["plugin"]["wsfeed"]["sources"][0]["urls"] = [f"ws://127.0.0.1:{exchange.port}/"]
        broker = Broker(config_from_dict(data, source=config_file))
        await nursery.start(broker.serve)
        web = await nursery.start(StaticServer(HERE / "web").serve, "127.0.0.1", web_port)
        print(f"exchange on ws://127.0.0.1:{exchange.port}/, broker on {broker.url}", flush=True)
        query = "" if broker.url == "ws://127.0.0.1:8765/ws" else f"?broker={broker.url}"
        print(f"dashboard: http://127.0.0.1:{web.port}/{query}", flush=True)
        print("try:  .venv/bin/broker sub 'trades.>' 'candles.>'", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=20.0, help="ticks per second per symbol")
    parser.add_argument("--port", type=int, default=8765, help="the broker's port")
    parser.add_argument("--exchange-port", type=int, default=9001)
    parser.add_argument("--web-port", type=int, default=8000, help="the dashboard's port")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    with contextlib.suppress(KeyboardInterrupt):
        trio.run(main, args.rate, args.port, args.exchange_port, args.web_port)
