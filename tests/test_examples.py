"""The examples work as documented: each example's broker.toml, with its ports
moved to free ones, against the example's simulated exchange or the fake node;
and each example's run.py as a user starts it (a subprocess on free ports),
down to the ``broker sub`` command it prints."""

from __future__ import annotations

import errno
import importlib.util
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tomllib
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import trio
from broker_jsonrpc import create as jsonrpc
from broker_wsfeed import create as wsfeed

from broker import PluginHost, config_from_dict
from tests.conftest import BrokerFactory
from tests.fake_jsonrpc import TRANSFER_TOPIC, FakeNode, head, transfer_log
from tests.helpers import connect, wait_until
from tests.test_cli import WAIT, Running, cli_env, held_port, must, run_cli
from tests.test_cli import wait_until as cli_wait_until

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
MARKET = EXAMPLES / "market-data"
ETH = EXAMPLES / "eth-node"


def load_module(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def toml(path: Path) -> dict[str, Any]:
    return tomllib.loads(path.read_text(encoding="utf-8"))


async def test_market_data_example(start_broker: BrokerFactory, nursery: trio.Nursery) -> None:
    exchange_module = load_module(MARKET / "exchange.py", "market_data_exchange")
    exchange = exchange_module.Exchange(rate=200, candle_interval=0.2, seed=1)
    await nursery.start(exchange.serve)

    data = toml(MARKET / "broker.toml")
    data["listener"]["port"] = 0
    data["plugin"]["wsfeed"]["sources"][0]["urls"] = [f"ws://127.0.0.1:{exchange.port}/"]
    broker = await start_broker(data, factories={"wsfeed": wsfeed}, source=MARKET / "broker.toml")
    assert broker.hub.rule_for("book.BTC-USD").policy == "conflate"

    seen: dict[str, dict[str, Any]] = {}
    async with connect(broker.url) as client:
        patterns = ("trades.>", "book.>", "candles.>")
        for pattern in patterns:
            await client.send({"op": "sub", "id": pattern, "topic": pattern})
        # The feed is live: deliveries on the first pattern may arrive before
        # the later subscriptions are acknowledged, so read both kinds.
        acked: set[str] = set()
        with trio.fail_after(1.5):
            while acked != set(patterns) or not {"trades", "book", "candles"} <= {
                t.split(".")[0] for t in seen
            }:
                msg = await client.recv()
                if msg["op"] == "msg":
                    seen.setdefault(msg["topic"], msg)
                else:
                    assert msg["op"] == "ok" and msg["id"] in patterns, msg
                    acked.add(msg["id"])
    symbols = {"BTC-USD", "ETH-USD", "SOL-USD"}
    assert {t.split(".", 1)[1] for t in seen} <= symbols
    trade = next(m for t, m in seen.items() if t.startswith("trades."))
    assert trade["data"]["type"] == "trade" and trade["data"]["price"] > 0
    book = next(m for t, m in seen.items() if t.startswith("book."))
    side, price = book["key"].split(":")
    assert side in ("bid", "ask") and float(price) == book["data"]["price"]
    candle = next(m for t, m in seen.items() if t.startswith("candles."))
    assert candle["data"]["low"] <= candle["data"]["close"] <= candle["data"]["high"]
    sup = broker.sources[0]
    assert sup.label == "wsfeed/exchange" and sup.status()["ignored"] >= 1  # "subscribed"


def test_market_data_books_fit_a_connection_queue() -> None:
    """The simulated prices wander around their start, so the levels of a
    book (every key its snapshot holds, removed levels included) stay
    bounded: after an hour of run.py's 20 ticks a second, each book's
    snapshot is within broker.toml's snapshot_keys, and the three books'
    levels and the trades' queue fit the book rule's queue, the largest and
    so a connection's whole queue. A browser following every book gets its
    whole snapshot, and when it reads too slowly conflation alone keeps its
    books right (conflate drops outright only a queue full of distinct keys)."""
    exchange_module = load_module(MARKET / "exchange.py", "market_data_exchange_books")
    exchange = exchange_module.Exchange(seed=3)
    keys: dict[str, set[tuple[str, float]]] = {}
    for market in exchange.markets:
        levels = market.book_levels(0)
        keys[market.symbol] = {(e["side"], e["price"]) for e in levels}
    for _ in range(20 * 3600):
        for market in exchange.markets:
            for event in market.step():
                if event["type"] == "book":
                    keys[market.symbol].add((event["side"], event["price"]))
    data = toml(MARKET / "broker.toml")
    rules = {rule["pattern"]: rule for rule in data["queue"]["rules"]}
    (snapshot,) = [rule for rule in data["history"] if rule["pattern"] == "book.>"]
    assert max(len(k) for k in keys.values()) <= snapshot["snapshot_keys"] // 2
    largest = max(rule.get("max_messages", 1000) for rule in rules.values())
    assert rules["book.>"]["max_messages"] == largest
    total = sum(len(k) for k in keys.values()) + rules["trades.>"]["max_messages"]
    assert total <= largest


async def test_eth_node_example_against_the_fake_node(
    start_broker: BrokerFactory, nursery: trio.Nursery
) -> None:
    node: FakeNode = await nursery.start(FakeNode().serve)
    data = toml(ETH / "broker.toml")
    data["listener"]["port"] = 0
    data["plugin"]["jsonrpc"]["sources"][0]["urls"] = [node.url]
    broker = await start_broker(data, factories={"jsonrpc": jsonrpc}, source=ETH / "broker.toml")
    assert broker.hub.rule_for("eth.blocks").policy == "conflate"
    async with connect(broker.url) as client:
        ok = await client.request({"op": "sub", "id": "s", "topic": "eth.>"})
        assert ok["op"] == "ok" and "cursor" in ok  # broker.local.toml keeps history
        conn = await node.connection(0)
        blocks, logs = await conn.wait_subscribed(2)
        assert conn.subscriptions[logs][1]["topics"] == [TRANSFER_TOPIC]
        await wait_until(lambda: broker.sources[0].state == "running")
        await conn.notify(blocks, head(1))
        await conn.notify(logs, transfer_log(1))
        first = await client.recv()
        second = await client.recv()
    assert (first["topic"], first["data"]["number"]) == ("eth.blocks", "0x1")
    assert first["key"] == head(1)["hash"]
    assert second["topic"] == "eth.logs.0xa0b86991c6218b36c1d19d4a2e9eb0ce3606eb48"
    assert second["key"] == f"{transfer_log(1)['transactionHash']}:0x0"


def test_eth_node_example_config_is_valid_and_local() -> None:
    data = toml(ETH / "broker.toml")
    config = config_from_dict(data, source=ETH / "broker.toml")
    host = PluginHost.from_config(config, factories={"jsonrpc": jsonrpc})
    assert host.pm.get_plugin("jsonrpc") is not None
    # Nothing leaves the machine unless the user names a node: the default is
    # the fake node's address (run.py, `python -m tests.fake_jsonrpc`).
    (source,) = data["plugin"]["jsonrpc"]["sources"]
    assert source["urls"] == ["ws://127.0.0.1:8545/"]


# -- run.py, as a user starts it ---------------------------------------------------


async def start_example(
    nursery: trio.Nursery, script: Path, *args: str, env: Mapping[str, str] | None = None
) -> tuple[Running, list[str]]:
    """Start *script*; wait for its three lines (where it runs, its page,
    what to try); the page's line is checked and left out."""
    process = await trio.lowlevel.open_process(
        [sys.executable, str(script), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**cli_env(), **(env or {})},
    )
    running = Running(process)
    nursery.start_soon(running.collect)
    await cli_wait_until(lambda: running.stdout.count(b"\n") >= 3, running)
    where, page, hint = running.stdout.decode().splitlines()[:3]
    assert page.startswith(("dashboard: http://127.0.0.1:", "chain ticker: http://127.0.0.1:"))
    assert "?broker=ws://127.0.0.1:" in page  # the port moved: the page is told
    assert hint.startswith("try:  .venv/bin/broker sub ")
    return running, [where, hint]


async def run_hint(hint: str, *extra: str) -> list[Any]:
    """Run the printed ``broker sub`` command (as ``python -m broker``)."""
    argv = shlex.split(hint.removeprefix("try:"))
    assert argv[:2] == [".venv/bin/broker", "sub"]
    done = await run_cli(*argv[1:], *extra)
    assert done.returncode == 0, done.stderr.decode()
    return [json.loads(line) for line in done.stdout.decode().splitlines()]


async def stop(running: Running) -> None:
    running.process.send_signal(signal.SIGINT)  # Ctrl-C
    assert await running.wait() == 0, running.stderr.decode()
    assert b"Traceback" not in running.stderr


async def test_market_data_run_moves_both_ports_and_hints_the_url(nursery: trio.Nursery) -> None:
    running, (where, hint) = await start_example(
        nursery,
        MARKET / "run.py",
        "--port",
        "0",
        "--exchange-port",
        "0",
        "--web-port",
        "0",
        "--rate",
        "100",
    )
    url = must(re.search(r"broker on (ws://127\.0\.0\.1:(\d+)/ws)", where))
    admin = must(re.search(r"health and metrics on http://127\.0\.0\.1:(\d+)", where))
    assert admin.group(1) not in ("0", "8766", url.group(2))
    # The hint reaches the broker on its moved port.
    assert f"--url {url.group(1)} " in hint
    (message,) = await run_hint(hint, "-n", "1")
    assert message["topic"].split(".")[0] in ("trades", "candles")
    await stop(running)


@pytest.mark.parametrize("script", [MARKET / "run.py", ETH / "run.py"])
def test_run_moves_the_admin_port_and_hints_the_url(script: Path) -> None:
    run = load_module(script, f"run_{script.parent.name.replace('-', '_')}")
    assert run.admin_port_for(8765, None) == 8766  # the broker's defaults
    assert run.admin_port_for(9000, None) == 9001  # moved together
    assert run.admin_port_for(0, None) == 0  # any free port, both
    assert run.admin_port_for(9000, 7000) == 7000  # --admin-port wins
    # The printed command: --url only when `broker sub` would not reach it.
    assert run.sub_hint("ws://127.0.0.1:8765/ws", "a.>") == ".venv/bin/broker sub 'a.>'"
    assert run.sub_hint("ws://127.0.0.1:9765/ws", "a.>") == (
        ".venv/bin/broker sub --url ws://127.0.0.1:9765/ws 'a.>'"
    )


async def test_market_data_run_names_a_taken_port() -> None:
    with held_port() as (port, _):
        done = await trio.run_process(
            [
                sys.executable,
                str(MARKET / "run.py"),
                "--port",
                "0",
                "--web-port",
                "0",
                "--admin-port",
                str(port),
            ],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env=cli_env(),
        )
    assert done.returncode == 1
    assert done.stderr.decode().endswith(
        f"run.py: cannot listen on 127.0.0.1:{port}: {os.strerror(errno.EADDRINUSE)} "
        "(admin.port, set by --admin-port)\n"
    )


async def test_eth_node_run_bridges_the_local_fake_node_by_default(nursery: trio.Nursery) -> None:
    running, (where, hint) = await start_example(
        nursery,
        ETH / "run.py",
        "--port",
        "0",
        "--node-port",
        "0",
        "--web-port",
        "0",
        "--block-time",
        "0.05",
    )
    assert re.match(r"bridging the fake node on ws://127\.0\.0\.1:\d+/; broker on ", where)
    assert "--url ws://127.0.0.1:" in hint
    first, second = await run_hint(hint, "-n", "2")
    assert {first["topic"], second["topic"]} <= {
        "eth.blocks",
        "eth.logs.0xa0b86991c6218b36c1d19d4a2e9eb0ce3606eb48",
    }
    await stop(running)


@pytest.mark.parametrize("how", ["flag", "environment"])
async def test_eth_node_run_bridges_the_upstream_the_user_names(
    nursery: trio.Nursery, how: str
) -> None:
    node: FakeNode = await nursery.start(FakeNode().serve)
    upstream = node.url + "v3/secret-key"  # a provider's key in the path
    args = ("--upstream", upstream) if how == "flag" else ()
    env = {"ETH_NODE_URL": upstream} if how == "environment" else {}
    running, (where, _) = await start_example(
        nursery, ETH / "run.py", "--port", "0", "--web-port", "0", *args, env=env
    )
    # Shown without its path, where providers put the key.
    assert where.startswith(f"bridging ws://127.0.0.1:{node.port}/…; broker on ")
    conn = await node.connection(0, seconds=WAIT)
    await conn.wait_subscribed(2, seconds=WAIT)
    await stop(running)
    assert b"secret-key" not in running.stdout + running.stderr
