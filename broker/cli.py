"""The ``broker`` command: serve, check-config, pub, sub.

Exit codes: 0 success, 1 runtime failure (cannot bind, connection refused,
server error), 2 bad usage or bad configuration.
"""

from __future__ import annotations

import argparse
import logging
import signal
import ssl
import sys
from collections.abc import Sequence
from typing import Any

import trio

from . import __version__
from .config import Config, load_config
from .errors import ConfigError, PluginError
from .log import setup_logging

__all__ = ["main"]

log = logging.getLogger("broker")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="broker", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"trio-broker {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the broker")
    serve.add_argument("-c", "--config", help="broker.toml (default: built-in defaults)")

    check = sub.add_parser("check-config", help="validate a config file and its plugins")
    check.add_argument("-c", "--config", default="broker.toml", help="file to check")

    def client_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--url", default="ws://127.0.0.1:8765/ws", help="broker URL")
        p.add_argument("--token", help="bearer token (or set BROKER_TOKEN)")
        p.add_argument("--encoding", choices=("json", "msgpack"), default="json")
        p.add_argument("--cafile", help="CA certificate(s) to trust for wss://")

    pub = sub.add_parser("pub", help="publish one message")
    pub.add_argument("topic")
    pub.add_argument("data", help="JSON value (a bare word is sent as a string)")
    pub.add_argument("--key", help="conflation key")
    client_options(pub)

    subp = sub.add_parser("sub", help="print messages as JSON lines")
    subp.add_argument("pattern", nargs="+")
    subp.add_argument("-n", "--count", type=int, default=0, help="exit after N messages")
    client_options(subp)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "serve":
        return _serve(args.config)
    if args.command == "check-config":
        return _check(args.config)
    from .client_cli import run_pub, run_sub

    if args.command == "pub":
        return run_pub(args)
    return run_sub(args)


def _load(path: str | None) -> Config | None:
    try:
        return load_config(path)
    except ConfigError as e:
        print(f"broker: configuration error: {e}", file=sys.stderr)
        return None


def _check(path: str) -> int:
    config = _load(path)
    if config is None:
        return 2
    from .plugin_host import PluginHost
    from .server import make_ssl_context

    try:
        PluginHost.from_config(config)
        if config.listener.tls:
            make_ssl_context(config.listener.tls_cert, config.listener.tls_key)
    except (ssl.SSLError, OSError) as e:
        print(f"broker: configuration error: listener.tls_cert: cannot load: {e}", file=sys.stderr)
        return 2
    except (ConfigError, PluginError) as e:
        print(f"broker: configuration error: {e}", file=sys.stderr)
        return 2
    print(f"{path}: OK")
    return 0


def _serve(path: str | None) -> int:
    config = _load(path)
    if config is None:
        return 2
    setup_logging(config.log.level, config.log.format)
    try:
        return trio.run(_serve_async, config)
    except (ConfigError, PluginError) as e:
        print(f"broker: configuration error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        log.error("cannot start: %s", e)
        return 1


async def _serve_async(config: Config) -> int:
    from .server import Broker

    # Install the signal receiver before anything slow: SIGTERM/SIGINT's
    # default actions would kill the process without a drain.
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        broker = Broker(config)
        failed: BaseException | None = None
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_on_signals, signals, broker, nursery.cancel_scope)
                await broker.serve()
                nursery.cancel_scope.cancel()
        except* OSError as group:
            failed = group.exceptions[0]
    if failed is not None:
        log.error("cannot serve: %s", failed)
        return 1
    log.info("stopped")
    return 0


async def _on_signals(signals: Any, broker: Any, scope: trio.CancelScope) -> None:
    async for signum in signals:
        name = signal.Signals(signum).name
        if broker.stopping:
            log.warning("second %s: stopping now", name)
            scope.cancel()
            return
        log.info("%s: draining and stopping", name)
        broker.stop()
