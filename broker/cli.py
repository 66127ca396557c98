"""The broker command: serve, check-config, pub, sub.

Exit codes: 0 success, 1 runtime failure (cannot bind, connection refused,
server error), 2 bad usage or bad configuration.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import logging
import os
import signal
import socket
import sys
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final

import trio

from broker import __version__
from broker.core.config import AdminConfig, Config, ListenerConfig, load_config
from broker.core.errors import ConfigError, PluginError
from broker.ops.log import setup_logging

if TYPE_CHECKING:
    from broker.ops.systemd import Notifier
    from broker.plugin.host import PluginFactory
    from broker.server.broker import Broker

__all__ = ["DEFAULT_URL", "main", "serve"]

log = logging.getLogger("broker")

_LISTENER = ListenerConfig()
#: Where ``broker pub`` and ``broker sub`` connect by default: the URL
#: ``broker serve`` listens on with the built-in defaults.
DEFAULT_URL: Final = f"ws://{_LISTENER.host}:{_LISTENER.port}{_LISTENER.path}"

#: ``broker serve``'s overriding flags: argument name -> (table, key, flag).
SERVE_OVERRIDES: Final = {
    "host": ("listener", "host", "--host"),
    "port": ("listener", "port", "--port"),
    "admin_port": ("admin", "port", "--admin-port"),
}


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"must be from 0 to 65535 (0: any free port), not {port}")
    return port


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="broker", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"trio-broker {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser(
        "serve",
        help="run the broker",
        description="Run the broker. The flags override the file's values.",
    )
    serve.add_argument(
        "-c", "--config", metavar="FILE", help="broker.toml (default: built-in defaults)"
    )
    serve.add_argument(
        "--host", help=f"WebSocket address (overrides listener.host; built-in {_LISTENER.host})"
    )
    serve.add_argument(
        "--port",
        type=_port,
        help=f"WebSocket port (overrides listener.port; built-in {_LISTENER.port}; 0: any free)",
    )
    serve.add_argument(
        "--admin-port",
        type=_port,
        metavar="PORT",
        help=f"health and metrics port (overrides admin.port; built-in {AdminConfig().port})",
    )

    check = sub.add_parser("check-config", help="validate a config file and its plugins")
    check.add_argument("-c", "--config", default="broker.toml", help="file to check")

    def client_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--url", default=DEFAULT_URL, help=f"broker URL (default {DEFAULT_URL})")
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
    subp.add_argument(
        "--history", type=int, metavar="N", help="first replay the N latest stored messages"
    )
    subp.add_argument(
        "--no-reconnect",
        action="store_true",
        help="exit with status 1 when the connection is lost instead of reconnecting",
    )
    client_options(subp)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "serve":
        overrides = {
            flag: (table, key, getattr(args, name))
            for name, (table, key, flag) in SERVE_OVERRIDES.items()
            if getattr(args, name) is not None
        }
        return _serve(args.config, overrides=overrides)
    if args.command == "check-config":
        return _check(args.config)
    from broker.client.cli import run_pub, run_sub

    if args.command == "pub":
        return run_pub(args)
    return run_sub(args)


#: Command-line overrides: flag -> (table, key, value).
Overrides = Mapping[str, tuple[str, str, object]]


def _load(path: str | None, overrides: Overrides | None = None) -> Config | None:
    try:
        return _override(load_config(path), overrides or {})
    except ConfigError as e:
        print(f"broker: configuration error: {e}", file=sys.stderr)
        return None


def _override(config: Config, overrides: Overrides) -> Config:
    """*config* with the flags' values in place of the file's, each table
    checked again; an error names the flag."""
    tables: dict[str, Any] = {}
    flags: dict[str, str] = {}
    for flag, (table, key, value) in overrides.items():
        current = tables.get(table, getattr(config, table))
        tables[table] = dataclasses.replace(current, **{key: value})
        flags[f"{table}.{key}"] = flag
    for table, value in tables.items():
        try:
            value.validate()
        except ConfigError as e:
            key = f"{table}.{e.key}"
            raise ConfigError(flags.get(key, key), e.reason) from None
    return dataclasses.replace(config, **tables)


def _check(path: str) -> int:
    """Validate *path* exactly as a start or a reload would (broker.reload.prepare)."""
    from broker.ops.reload import prepare

    try:
        prepare(path)
    except (ConfigError, PluginError) as e:
        print(f"broker: configuration error: {e}", file=sys.stderr)
        return 2
    print(f"{path}: OK")
    return 0


def serve(path: str | None, *, factories: Mapping[str, PluginFactory] | None = None) -> int:
    """``broker serve -c PATH``, for embedding: *factories* add plugins that
    are not installed as entry points (see PluginHost.from_config)."""
    return _serve(path, factories)


def _serve(
    path: str | None,
    factories: Mapping[str, PluginFactory] | None = None,
    *,
    overrides: Overrides | None = None,
) -> int:
    # SIGHUP's default action kills the process, and a `systemctl reload`
    # (or a log rotation) may come before the event loop's receiver is in
    # place: ignore it until then.
    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    config = _load(path, overrides)
    if config is None:
        return 2
    setup_logging(config.log.level, config.log.format)
    from broker.ops import systemd

    # Read (and remove from the environment, so that nothing this process
    # starts inherits them) what systemd passed.
    notifier = systemd.Notifier.from_environ(os.environ)
    watchdog = systemd.watchdog_interval(os.environ, os.getpid())
    for name in ("WATCHDOG_USEC", "WATCHDOG_PID"):
        os.environ.pop(name, None)
    try:
        sockets = systemd.adopt_sockets(systemd.listen_fds(os.environ, os.getpid()))
    except (ValueError, OSError) as e:
        log.error("cannot start: %s", e)
        return 1
    try:
        flags = {f"{table}.{key}": flag for flag, (table, key, _) in (overrides or {}).items()}
        return trio.run(_serve_async, config, notifier, sockets, watchdog, factories, flags)
    except (ConfigError, PluginError) as e:
        print(f"broker: configuration error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        log.error("cannot start: %s", e)
        return 1
    finally:
        notifier.close()


#: Seconds between checks of the STATUS= line (sent when it changed).
STATUS_INTERVAL = 1.0


async def _serve_async(
    config: Config,
    notifier: Notifier,
    sockets: dict[str, list[socket.socket]],
    watchdog: float | None,
    factories: Mapping[str, PluginFactory] | None = None,
    flags: Mapping[str, str] | None = None,
) -> int:
    """Serve until stopped. *flags*: the keys set on the command line
    (``listener.port`` -> ``--port``), for errors to name them."""
    from broker.plugin.host import PluginHost
    from broker.server.broker import Broker, ListenError

    # Install the signal receiver before anything slow: SIGTERM/SIGINT's
    # default actions would kill the process without a drain, SIGHUP's too.
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        plugins = PluginHost.from_config(config, factories=factories) if factories else None
        broker = Broker(config, sockets=sockets, plugins=plugins)
        failed: BaseException | None = None
        bad_config: BaseException | None = None
        reload_send, reload_receive = trio.open_memory_channel[None](1)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(
                    _on_signals, signals, broker, nursery.cancel_scope, notifier, reload_send
                )
                # Returns once every listener is bound and the sources started.
                await nursery.start(_run_broker, broker, nursery.cancel_scope)
                if not broker.stopping:
                    # Everything allocated so far (modules, config, plugins)
                    # lives as long as the process: keep it out of every
                    # garbage collection, whose full passes would otherwise
                    # scan it and show up as latency spikes.
                    gc.freeze()
                    notifier.ready(_status(broker))
                    log.info("ready")
                    nursery.start_soon(
                        _reloader, broker, notifier, reload_receive, tuple(flags or ())
                    )
                    nursery.start_soon(_status_updates, broker, notifier)
                    if watchdog is not None:
                        nursery.start_soon(_watchdog, broker, notifier, watchdog)
        except* (ConfigError, PluginError) as group:
            bad_config = group.exceptions[0]
        except* OSError as group:
            failed = group.exceptions[0]
    if bad_config is not None:
        print(f"broker: configuration error: {bad_config}", file=sys.stderr)
        return 2
    if failed is not None:
        if isinstance(failed, ListenError):
            log.error("cannot serve: %s", failed.naming(flags or {}))
        else:
            log.error("cannot serve: %s", failed)
        return 1
    log.info("stopped")
    return 0


async def _run_broker(
    broker: Broker,
    scope: trio.CancelScope,
    *,
    task_status: trio.TaskStatus[Broker] = trio.TASK_STATUS_IGNORED,
) -> None:
    await broker.serve(task_status=task_status)
    scope.cancel()  # served and drained: stop the helper tasks too


def _status(broker: Broker, prefix: str = "") -> str:
    """The STATUS= line: what `systemctl status` shows."""
    text = (
        f"{len(broker.connections)} connections, "
        f"{len(broker.hub.router)} subscriptions, {broker.hub.published} messages in"
    )
    last = broker.last_reload
    if last is not None and not last.ok:
        text += f"; last reload refused: {last.error}"
    return prefix + text


async def _on_signals(
    signals: Any,
    broker: Broker,
    scope: trio.CancelScope,
    notifier: Notifier,
    reloads: trio.MemorySendChannel[None],
) -> None:
    async for signum in signals:
        name = signal.Signals(signum).name
        if signum == signal.SIGHUP:
            if broker.stopping:
                log.info("SIGHUP: stopping; not reloading")
                continue
            with contextlib.suppress(trio.WouldBlock):
                reloads.send_nowait(None)  # one pending reload covers several signals
            continue
        if broker.stopping:
            log.warning("second %s: stopping now", name)
            scope.cancel()
            return
        log.info("%s: draining and stopping", name)
        notifier.stopping(f"draining {len(broker.connections)} connections")
        broker.stop()


async def _reloader(
    broker: Broker,
    notifier: Notifier,
    requests: trio.MemoryReceiveChannel[None],
    pinned: tuple[str, ...] = (),
) -> None:
    """Reload on each request, one at a time (notify-reload protocol).
    *pinned*: the keys the command line set (``listener.port``), which a
    reload keeps without reporting them."""
    from broker.ops.reload import reload_broker

    async for _ in requests:
        if broker.stopping:
            return
        notifier.reloading("reloading configuration")
        await reload_broker(broker, pinned=pinned)
        if broker.stopping:
            return
        notifier.ready(_status(broker))


async def _status_updates(broker: Broker, notifier: Notifier) -> None:
    if not notifier.enabled:
        return
    last = _status(broker)
    while not broker.stopping:
        await trio.sleep(STATUS_INTERVAL)
        text = _status(broker)
        if text != last and not broker.stopping:
            notifier.status(text)
            last = text


async def _watchdog(broker: Broker, notifier: Notifier, interval: float) -> None:
    """WATCHDOG=1 every *interval* seconds while the event loop is healthy.

    This task running shows the loop runs at all; the lag monitor's samples
    show it keeps up: no ping while the last sample is stale (the monitor
    itself is starved) or the lag exceeds *interval*. systemd then restarts
    a broker that stays unhealthy for WatchdogSec.
    """
    from broker.server.broker import LAG_INTERVAL

    while True:
        now = trio.current_time()
        sampled = broker.loop_lag_at
        stale = sampled is not None and now - sampled > LAG_INTERVAL + interval + 1.0
        if not stale and broker.loop_lag < interval:
            notifier.watchdog()
        else:
            log.warning(
                "event loop unhealthy (lag %.3fs%s): withholding the watchdog ping",
                broker.loop_lag,
                ", lag monitor stalled" if stale else "",
            )
        await trio.sleep(interval)
