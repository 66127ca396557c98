"""The example pages in Chromium, each against its example's broker.toml
(ports moved to free ones), with screenshots for their READMEs."""

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

from broker.client import Client, Dropped, Message, open_client
from broker.core.errors import CloseCode
from broker.core.outbox import Policy
from tests.browser.driver import EXAMPLES, Gate, browser_session, serve_pages
from tests.conftest import BrokerFactory
from tests.fake_jsonrpc import FakeNode, head, transfer_log
from tests.helpers import wait_until

MARKET = EXAMPLES / "market-data"


def load_module(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def toml(path: Path) -> dict[str, Any]:
    return tomllib.loads(path.read_text(encoding="utf-8"))


def book(levels: dict[float, float]) -> list[list[float]]:
    return sorted([price, qty] for price, qty in levels.items())


BOOK_IN_PAGE = """() => ({
    bids: [...window.dashboard.bids].sort((a, b) => a[0] - b[0]),
    asks: [...window.dashboard.asks].sort((a, b) => a[0] - b[0]),
})"""


async def test_market_dashboard(
    start_broker: BrokerFactory, nursery: trio.Nursery, tmp_path: Path
) -> None:
    """The book rebuilt from snapshot + deltas equals the exchange's own,
    the tape and the candles fill from history, then live."""
    exchange_module = load_module(MARKET / "exchange.py", "market_data_exchange_web")
    exchange = exchange_module.Exchange(rate=50, candle_interval=0.25, seed=7)
    await nursery.start(exchange.serve)
    data = toml(MARKET / "broker.toml")
    data["listener"]["port"] = 0
    data["plugin"]["wsfeed"]["sources"][0]["urls"] = [f"ws://127.0.0.1:{exchange.port}/"]
    broker = await start_broker(data, factories={"wsfeed": wsfeed}, source=MARKET / "broker.toml")
    async with serve_pages() as pages, browser_session() as session:
        page = await session.open(
            pages.url(f"/examples/market-data/web/index.html?broker={broker.url}")
        )
        await page.wait_for(
            """() => window.dashboard && window.dashboard.ready
                && window.dashboard.trades.length >= 10 && window.dashboard.candles.length >= 4
                && window.dashboard.bids.size >= 10 && window.dashboard.asks.size >= 10""",
            seconds=10,
        )
        # A second tab, opened mid-stream, gets the same book from the snapshot.
        late = await session.open(
            pages.url(f"/examples/market-data/web/index.html?broker={broker.url}")
        )
        await late.wait_for("() => window.dashboard && window.dashboard.ready")
        assert await page.text("#status") == "live"
        await page.screenshot("market-dashboard.png", tmp_path)
        # The market goes quiet (ticks make no events; what was sent
        # still flows): the pages' books must end equal to the exchange's.
        for market in exchange.markets:
            market.step = list
        (btc,) = [m for m in exchange.markets if m.symbol == "BTC-USD"]
        expected = {"bids": book(btc.bids), "asks": book(btc.asks)}
        check = f"(expected) => JSON.stringify(({BOOK_IN_PAGE})()) === JSON.stringify(expected)"
        await page.wait_for(check, expected)
        await late.wait_for(check, expected)
        tape = await page.evaluate("() => window.dashboard.trades.map((t) => t.id)")
        assert tape == sorted(tape, reverse=True) and len(tape) == 30
        assert tape[0] == btc.trade_id
        assert await page.evaluate("() => window.dashboard.dropped") == 0


class Follower:
    """A Python client keeping the book of one topic from the broker's
    snapshot plus every change: what the book is, as the broker says."""

    def __init__(self, client: Client, topic: str) -> None:
        self.client = client
        self.topic = topic
        self.levels: dict[str, dict[float, float]] = {"bid": {}, "ask": {}}
        self.seq = 0  # of the last message
        self.dropped = 0

    async def follow(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        async with self.client.subscribe(self.topic, snapshot=True) as sub:
            task_status.started()
            async for item in sub:
                if isinstance(item, Dropped):
                    self.dropped += item.count
                elif isinstance(item, Message):
                    self.seq = max(self.seq, item.seq)
                    levels = self.levels[item.data["side"]]
                    if item.data["qty"] > 0:
                        levels[item.data["price"]] = item.data["qty"]
                    else:
                        levels.pop(item.data["price"], None)

    def book(self) -> dict[str, list[list[float]]]:
        return {"bids": book(self.levels["bid"]), "asks": book(self.levels["ask"])}


async def test_a_slow_tab_shows_dropped_and_ends_with_the_right_book(
    start_broker: BrokerFactory, nursery: trio.Nursery, tmp_path: Path
) -> None:
    """A tab whose main thread is stuck for a while (a long task) reads
    nothing while the market is busy: its socket backs up, then its queue,
    and the broker drops under each topic's rule of the example's
    broker.toml (conflate for the book, drop-oldest for trades). The page
    shows the drops; once it has caught up and the market is quiet, its book
    is the broker's (a Python client's, kept from the snapshot and every
    change), its tape and candles the latest the broker keeps."""
    exchange_module = load_module(MARKET / "exchange.py", "market_data_exchange_slow")
    exchange = exchange_module.Exchange(
        rate=300, candle_interval=0.25, symbols=["BTC-USD"], seed=11
    )
    await nursery.start(exchange.serve)
    data = toml(MARKET / "broker.toml")
    data["listener"]["port"] = 0
    data["plugin"]["wsfeed"]["sources"][0]["urls"] = [f"ws://127.0.0.1:{exchange.port}/"]
    broker = await start_broker(data, factories={"wsfeed": wsfeed}, source=MARKET / "broker.toml")
    client = await nursery.start(_open_client, broker.url)
    follower = Follower(client, "book.BTC-USD")
    await nursery.start(follower.follow)
    gate = Gate()
    async with serve_pages({Gate.PATH: gate.route}) as pages, browser_session() as session:
        others = set(broker.connections)
        page = await session.open(
            pages.url(f"/examples/market-data/web/index.html?broker={broker.url}")
        )
        await page.wait_for("() => window.dashboard && window.dashboard.ready")
        (tab,) = broker.connections - others
        # The tab is stuck while the market goes on: its socket fills, then
        # its queue, and the broker drops.
        async with trio.open_nursery() as stuck:
            stuck.start_soon(gate.block, page)
            await gate.entered.wait()
            # Until the broker has dropped under both rules: book changes
            # (conflated) and trades (the oldest); only this tab is slow.
            overflows = broker.hub.overflows_by_policy
            await wait_until(
                lambda: (
                    tab.outbox.dropped_total >= 300
                    and overflows[Policy.CONFLATE] > 0
                    and overflows[Policy.DROP_OLDEST] > 0
                ),
                seconds=30,
            )
            gate.open()
        # The page shows every drop.
        await page.wait_for(
            "(n) => Number(document.getElementById('dropped').textContent) >= n",
            tab.outbox.dropped_total,
        )
        assert "warn" in await page.evaluate(
            "() => document.getElementById('dropped').parentElement.className"
        )
        # The market goes quiet; the exchange has sent everything once its
        # queue to the bridge is empty, and the broker has published it all
        # once the bridge has read a heartbeat sent after that.
        for market in exchange.markets:
            market.step = list
        await wait_until(
            lambda: all(c.send.statistics().current_buffer_used == 0 for c in exchange.clients)
        )
        (source,) = broker.sources
        heartbeats = source.ignored
        await wait_until(lambda: source.ignored >= heartbeats + 2)
        # The follower has read it all once it has the topic's last seq.
        last = (await client.history("book.BTC-USD", limit=1)).seq
        await wait_until(lambda: follower.seq == last)
        assert follower.dropped == 0
        expected = follower.book()
        check = f"(expected) => JSON.stringify(({BOOK_IN_PAGE})()) === JSON.stringify(expected)"
        await page.wait_for(check, expected)
        # The tape and the candles: the latest the broker keeps.
        trades = await client.history("trades.BTC-USD", limit=30)
        ids = [m.data["id"] for m in reversed(trades.messages)]
        await page.wait_for(
            "(ids) => JSON.stringify(window.dashboard.trades.map((t) => t.id)) === JSON.stringify(ids)",
            ids,
        )
        candles = await client.history("candles.BTC-USD", limit=60)
        starts = [m.data["start"] for m in candles.messages]
        await page.wait_for(
            "(starts) => JSON.stringify(window.dashboard.candles.map((c) => c.start))"
            " === JSON.stringify(starts)",
            starts,
        )
        await page.screenshot("market-dashboard-slow.png", tmp_path)
        await page.evaluate("() => window.client.close()")


async def _open_client(
    url: str, *, task_status: trio.TaskStatus[Client] = trio.TASK_STATUS_IGNORED
) -> None:
    async with open_client(url) as client:
        task_status.started(client)
        await trio.sleep_forever()


CHAT = EXAMPLES / "chat"


async def test_chat_room(
    start_broker: BrokerFactory, nursery: trio.Nursery, tmp_path: Path
) -> None:
    """Two users: history on join, presence, a schema refusal, a private
    message, and a reader kept out of someone else's inbox."""
    chat = load_module(CHAT / "run.py", "chat_example")
    static = load_module(EXAMPLES / "static_server.py", "static_server")
    secret = "chat-test-secret-0123456789abcdef-0123"
    broker = await start_broker(chat.config(0, secret), source=CHAT / "broker.toml")
    web = await nursery.start(
        static.StaticServer(CHAT / "web", {"/login": chat.Login(secret)}).serve, "127.0.0.1", 0
    )
    url = f"http://127.0.0.1:{web.port}/?broker={broker.url}"

    async def join(session: Any, name: str) -> Any:
        page = await session.open(url)
        await page.fill("#name", name)
        await page.click("#login button")
        await page.wait_for("() => window.chat && window.chat.ready")
        return page

    async def say(page: Any, text: str) -> None:
        await page.fill("#text", text)
        await page.click("#send button")

    async with browser_session() as session:
        alice = await join(session, "alice")
        await say(alice, "hello, anyone?")
        await alice.wait_for("() => window.chat.messages.length === 1")
        bob = await join(session, "bob")
        # History on join: bob sees what alice said before he came.
        assert await bob.evaluate("() => window.chat.messages") == [
            {"from": "alice", "text": "hello, anyone?"}
        ]
        members = "() => [...window.chat.members.keys()].sort().join()"
        await alice.wait_for(f"() => ({members})() === 'alice,bob'")
        assert await bob.evaluate(members) == "alice,bob"
        await say(bob, "hi alice")
        await alice.wait_for("() => window.chat.messages.length === 2")
        # A private message, to alice's inbox.
        await say(bob, "/msg alice psst")
        await alice.wait_for("() => window.chat.inbox.length === 1")
        assert await alice.evaluate("() => window.chat.inbox") == [{"from": "bob", "text": "psst"}]
        # The schema refuses an empty message; the page says why.
        await say(bob, "")
        await bob.wait_for("() => document.getElementById('send-error').textContent !== ''")
        error = await bob.text("#send-error")
        assert error.startswith("not sent: $.text"), error
        # Only alice may read her inbox.
        refused = await bob.evaluate(
            """() => window.client.subscribe("chat.user.alice.inbox", () => {})
                .then(() => "subscribed", (e) => `${e.name}: ${e.code}`)"""
        )
        assert refused == "Forbidden: forbidden"
        await alice.screenshot("chat.png", tmp_path)
        await bob.close()
        await alice.wait_for(f"() => ({members})() === 'alice'")
        assert "bob left" in await alice.text("#messages")


ETH = EXAMPLES / "eth-node"


async def test_chain_ticker_recovers_the_gap_after_a_reconnect(
    start_broker: BrokerFactory, nursery: trio.Nursery, tmp_path: Path
) -> None:
    """Blocks and logs arrive as the node sends them; the page loses its
    connection (the broker drops it), blocks go on; back, the page has
    every block once, in order, and no resync."""
    node: FakeNode = await nursery.start(FakeNode().serve)
    data = toml(ETH / "broker.toml")
    data["listener"]["port"] = 0
    data["plugin"]["jsonrpc"]["sources"][0]["urls"] = [node.url]
    broker = await start_broker(data, factories={"jsonrpc": jsonrpc})
    conn = await node.connection(0)
    blocks, logs = await conn.wait_subscribed(2)
    await wait_until(lambda: broker.sources[0].state == "running")

    async def mine(numbers: range) -> None:
        for n in numbers:
            await conn.notify(blocks, head(n))
            await conn.notify(logs, transfer_log(n))

    await mine(range(1, 6))
    numbers = "() => window.ticker.blocks.map((b) => parseInt(b.number, 16))"
    async with serve_pages() as pages, browser_session() as session:
        page = await session.open(
            pages.url(f"/examples/eth-node/web/index.html?broker={broker.url}")
        )
        await page.wait_for(
            f"() => window.ticker && window.ticker.ready && ({numbers})().length === 5"
        )
        await mine(range(6, 9))
        await page.wait_for(f"() => ({numbers})().length === 8")
        # The broker drops the page (as when a proxy restarts); blocks go on.
        (client,) = broker.connections
        client.close(CloseCode.GOING_AWAY, "proxy restart")
        await mine(range(9, 15))
        await page.wait_for(f"() => ({numbers})().length === 14 && window.ticker.reconnects === 1")
        assert await page.evaluate(numbers) == list(range(1, 15))
        log_blocks = await page.evaluate(
            "() => window.ticker.logs.map((l) => parseInt(l.blockNumber, 16))"
        )
        assert log_blocks == list(range(1, 15))
        assert await page.evaluate("() => window.ticker.resyncs") == 0
        assert await page.text("#head") == "14"
        assert "reconnected" in await page.text("#events")
        await page.screenshot("chain-ticker.png", tmp_path)
