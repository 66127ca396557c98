"""One source's publishes per second through the Redis engine.

    PYTHONPATH=.:plugins .venv/bin/python bench/source_rate.py [--mode send|publish] [--n 20000]

Runs a broker in this process on the Redis engine (a ``redis-server`` of
its own on a free port, no persistence; or ``--redis-url`` with a key
prefix of its own, deleted afterwards), with one source that publishes
``--n`` messages as fast as its publisher takes them, over 100 topics that
a ``[[history]]`` rule covers (as ``bench/cluster.py``'s
``publish-history``), then one ``publish`` (which returns once every
earlier one is answered). Prints the publishes per second of each of
``--repeats`` runs (a fresh broker each) and their median.

``--mode send`` uses ``Publisher.send`` (pipelined: up to
``SEND_WINDOW`` publishes in flight); ``--mode publish`` awaits each
``Publisher.publish`` (one Redis round trip each). The default, ``auto``,
is ``send`` where the publisher has it: run against an older checkout
(``PYTHONPATH=/path/to/old:/path/to/old/plugins``) for the rate before it.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Mapping
from typing import Any

import trio

from broker import (
    Broker,
    Identity,
    PluginContext,
    PluginHost,
    SourcesContext,
    config_from_dict,
    hookimpl,
)
from broker.sources import Publisher

TOPICS = 100
NO_AOF = ("--appendonly", "no", "--dir")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Feed:
    """Publishes *n* messages once started, then one ``publish`` as a fence."""

    name = "feed"
    identity = Identity("bench:feed")

    def __init__(self, n: int, mode: str) -> None:
        self.n = n
        self.mode = mode
        self.elapsed: float | None = None
        self.done = trio.Event()

    async def run(self, publisher: Publisher) -> None:
        publisher.ready()
        mode = self.mode
        if mode == "auto":
            mode = "send" if hasattr(publisher, "send") else "publish"
        self.mode = mode
        body = {"price": 1.5, "size": 100, "side": "buy"}
        start = time.perf_counter()
        if mode == "send":
            send = publisher.send
            for i in range(self.n):
                await send(f"p.{i % TOPICS}", body)
        else:
            publish = publisher.publish
            for i in range(self.n):
                await publish(f"p.{i % TOPICS}", body)
        await publisher.publish("p.0", body)
        self.elapsed = time.perf_counter() - start
        self.done.set()
        await trio.sleep_forever()


class Plugin:
    def __init__(self, feed: Feed) -> None:
        self.feed = feed

    @hookimpl
    def broker_sources(self, broker: SourcesContext) -> list[Any]:
        return [self.feed]


async def one_run(url: str, prefix: str, n: int, mode: str) -> tuple[str, float]:
    feed = Feed(n, mode)

    def factory(settings: Mapping[str, Any], context: PluginContext) -> object:
        return Plugin(feed)

    cfg = config_from_dict(
        {
            "listener": {"host": "127.0.0.1", "port": 0},
            "engine": {"type": "redis", "url": url, "prefix": prefix},
            "history": [{"pattern": "p.>", "size": 1000, "ttl": 300.0}],
            "plugins": {"enabled": ["noauth", "bench"]},
        }
    )
    broker = Broker(cfg, plugins=PluginHost.from_config(cfg, factories={"bench": factory}))
    async with trio.open_nursery() as nursery:
        await nursery.start(broker.serve)
        with trio.fail_after(600):
            await feed.done.wait()
        sup = broker.sources[0]
        assert sup.published == n + 1 and sup.rejected == 0, sup.status()
        broker.stop()
    assert feed.elapsed is not None
    return feed.mode, (n + 1) / feed.elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=["auto", "send", "publish"], default="auto")
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--redis-url", help="an existing Redis (default: a redis-server of its own)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    server = None
    workdir = tempfile.mkdtemp(prefix="source-rate-")
    url = args.redis_url
    if url is None:
        binary = shutil.which("redis-server")
        if binary is None:
            print("redis-server is not installed", file=sys.stderr)
            return 1
        port = free_port()
        server = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", *NO_AOF, workdir],
            stdout=subprocess.DEVNULL,
        )
        url = f"redis://127.0.0.1:{port}/0"
        end = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > end:
                    raise
                time.sleep(0.05)
    # The test suite's helper (run from the project root: PYTHONPATH=.:plugins).
    from tests.redis_service import delete_prefix

    try:
        rates = []
        for _ in range(args.repeats):
            prefix = f"bench:{uuid.uuid4().hex[:8]}:"
            try:
                mode, rate = trio.run(one_run, url, prefix, args.n, args.mode)
            finally:
                trio.run(delete_prefix, url, prefix)
            rates.append(rate)
            print(f"{mode}: {rate:,.0f} publishes/s", flush=True)
        print(f"median {mode}: {statistics.median(rates):,.0f} publishes/s ({args.n:,} each)")
    finally:
        if server is not None:
            server.kill()
            server.wait()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
