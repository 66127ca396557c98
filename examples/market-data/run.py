"""Run the market-data example: the simulated exchange and the broker, in one process.

    .venv/bin/python examples/market-data/run.py [--rate 20] [--port 8765] [--admin-port 8766]

It prints the ``broker sub`` command to try in another terminal (with
``--url`` when the port moved). Ctrl-C stops both. See README.md next to
this file.
"""

from __future__ import annotations

import argparse
import sys
import tomllib
from pathlib import Path

import trio

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from exchange import Exchange  # noqa: E402

from broker import Broker, ConfigError, config_from_dict  # noqa: E402
from broker.cli import explain, sub_command  # noqa: E402
from broker.ops.log import setup_logging  # noqa: E402

#: The config keys this script sets from its flags.
FLAGS = {"listener.port": "--port", "admin.port": "--admin-port"}


def admin_port_for(port: int, admin_port: int | None) -> int:
    """``--admin-port``, or the port after ``--port`` as in the defaults
    (8765, 8766): two copies on different ports do not collide; 0 stays 0."""
    if admin_port is not None:
        return admin_port
    return port + 1 if port else 0


async def main(rate: float, port: int, admin_port: int, exchange_port: int) -> None:
    config_file = HERE / "broker.toml"
    exchange = Exchange(rate=rate)
    async with trio.open_nursery() as nursery:
        try:
            await nursery.start(exchange.serve, "127.0.0.1", exchange_port)
        except* OSError as group:
            error = explain(group, {})
            where = f"127.0.0.1:{exchange_port} (--exchange-port)"
            raise OSError(f"the exchange cannot listen on {where}: {error}") from None
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
        print(f"try:  .venv/bin/{sub_command(broker.url, 'trades.>', 'candles.>')}", flush=True)


def cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=20.0, help="ticks per second per symbol")
    parser.add_argument("--port", type=int, default=8765, help="the broker's WebSocket port")
    parser.add_argument(
        "--admin-port", type=int, help="the broker's health and metrics port (default: --port + 1)"
    )
    parser.add_argument("--exchange-port", type=int, default=9001)
    args = parser.parse_args(argv)
    setup_logging("info")
    admin_port = admin_port_for(args.port, args.admin_port)
    status = 0
    try:
        trio.run(main, args.rate, args.port, admin_port, args.exchange_port)
    except* KeyboardInterrupt:
        pass
    except* (ConfigError, OSError) as group:
        print(f"run.py: {explain(group, FLAGS)}", file=sys.stderr)
        status = 1
    return status


if __name__ == "__main__":
    sys.exit(cli())
