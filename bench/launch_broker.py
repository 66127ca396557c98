"""Run trio-broker like ``broker serve -c FILE``, plus the benchmark's plugins.

    python bench/launch_broker.py -c broker.toml

Plugins are normally found through the ``trio_broker`` entry-point group;
the benchmark's validation plugin (``bench_plugins.py``) is not installed, so
this launcher passes its factory to :meth:`PluginHost.from_config` and serves
the broker with the CLI's own signal handling (SIGTERM/SIGINT: drain, stop;
a second signal: stop now). Exit codes as ``broker serve``: 0 stopped, 1
cannot serve, 2 bad configuration.
"""

from __future__ import annotations

import argparse
import signal
import sys

import trio
from bench_plugins import FACTORIES

from broker import Broker, Config, ConfigError, PluginError, PluginHost, load_config
from broker.cli import _on_signals
from broker.log import setup_logging


async def serve(config: Config) -> int:
    plugins = PluginHost.from_config(config, factories=FACTORIES)
    failed: BaseException | None = None
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        broker = Broker(config, plugins=plugins)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_on_signals, signals, broker, nursery.cancel_scope)
                await broker.serve()
                nursery.cancel_scope.cancel()
        except* OSError as group:
            failed = group.exceptions[0]
    if failed is not None:
        print(f"launch_broker: cannot serve: {failed}", file=sys.stderr)
        return 1
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-c", "--config", required=True, help="broker.toml")
    args = parser.parse_args()
    try:
        config = load_config(args.config)
        setup_logging(config.log.level, config.log.format)
        return trio.run(serve, config)
    except (ConfigError, PluginError) as e:
        print(f"launch_broker: configuration error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
