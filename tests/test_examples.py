"""The examples work as documented: each example's broker.toml, with its ports
moved to free ones, against the example's simulated exchange or the fake node."""

from __future__ import annotations

import importlib.util
import sys
import tomllib
from pathlib import Path
from types import ModuleType
from typing import Any

import trio
from broker_jsonrpc import create as jsonrpc
from broker_wsfeed import create as wsfeed

from broker import PluginHost, config_from_dict
from tests.conftest import BrokerFactory
from tests.fake_jsonrpc import FakeNode, head, transfer_log
from tests.helpers import connect, wait_until

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


async def test_eth_node_example_against_the_fake_node(
    start_broker: BrokerFactory, nursery: trio.Nursery
) -> None:
    node: FakeNode = await nursery.start(FakeNode().serve)
    data = toml(ETH / "broker.local.toml")
    data["listener"]["port"] = 0
    data["plugin"]["jsonrpc"]["sources"][0]["urls"] = [node.url]
    broker = await start_broker(data, factories={"jsonrpc": jsonrpc})
    async with connect(broker.url) as client:
        ok = await client.request({"op": "sub", "id": "s", "topic": "eth.>"})
        assert ok["op"] == "ok" and "cursor" in ok  # broker.local.toml keeps history
        conn = await node.connection(0)
        blocks, logs = await conn.wait_subscribed(2)
        await wait_until(lambda: broker.sources[0].state == "running")
        await conn.notify(blocks, head(1))
        await conn.notify(logs, transfer_log(1))
        first = await client.recv()
        second = await client.recv()
    assert (first["topic"], first["data"]["number"]) == ("eth.blocks", "0x1")
    assert second["topic"] == "eth.logs.0xa0b86991c6218b36c1d19d4a2e9eb0ce3606eb48"
    assert second["key"] == f"{transfer_log(1)['transactionHash']}:0x0"


def test_eth_node_example_config_is_valid() -> None:
    config = config_from_dict(toml(ETH / "broker.toml"), source=ETH / "broker.toml")
    host = PluginHost.from_config(config, factories={"jsonrpc": jsonrpc})
    assert host.pm.get_plugin("jsonrpc") is not None
