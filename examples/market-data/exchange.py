"""A simulated exchange: a public market-data WebSocket API on loopback.

It behaves like a real exchange's public stream, simplified: a client
connects, sends a subscribe message, and receives JSON frames:

    -> {"op": "subscribe", "channels": ["trades", "book", "candles"], "symbols": ["BTC-USD"]}
    <- {"type": "subscribed", "channels": [...], "symbols": [...]}
    <- the whole book of each symbol, one "book" event per level (with "book")
    <- {"type": "trade", "symbol": "BTC-USD", "id": 17, "price": 64012.5, "qty": 0.0132,
        "side": "buy", "ts": 1700000000123}
    <- {"type": "book", "symbol": "BTC-USD", "side": "bid", "price": 64010.0, "qty": 1.25,
        "ts": ...}                                   (a level's new size; 0 removes it)
    <- {"type": "candle", "symbol": "BTC-USD", "interval": "1s", "start": 1700000000000,
        "open": ..., "high": ..., "low": ..., "close": ..., "volume": ..., "trades": 12}
    <- {"type": "heartbeat", "ts": ...}            (every second, subscribed or not)

Prices follow a mean-reverting random walk per symbol (they wander around
their start price and stay within a few hundred price steps of it, so the
book's price levels, and the broker's snapshot of them, stay bounded however
long it runs); each "tick" makes a trade and moves a few order-book levels. ``--rate`` ticks per second per symbol (default
20); candles close every ``--candle-interval`` seconds (default 1).

Run it alone with ``python examples/market-data/exchange.py --port 9001``,
or everything at once with ``python examples/market-data/run.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import random
import time
from dataclasses import dataclass, field
from typing import Any

import trio
import trio_websocket

START_PRICES = {"BTC-USD": 64000.0, "ETH-USD": 3200.0, "SOL-USD": 145.0}
#: The walk of the log price, per tick: its noise, and its pull back to the
#: start (an Ornstein-Uhlenbeck process). BTC-USD moves about 6 price steps
#: a tick and stays within about 250 of its start: 450 book levels after an
#: hour at 20 ticks a second.
VOLATILITY = 0.0001
REVERSION = 0.02
CHANNELS = ("trades", "book", "candles")


def _ms() -> int:
    return int(time.time() * 1000)


@dataclass
class _Candle:
    start: int
    open: float
    high: float
    low: float
    close: float
    volume: float = 0.0
    trades: int = 0


@dataclass
class Market:
    """One symbol: its price walk, its order book and its current candle."""

    symbol: str
    price: float
    rng: random.Random
    tick: float = field(init=False)
    start: float = field(init=False)
    drift: float = 0.0  # log(price / start)
    bids: dict[float, float] = field(default_factory=dict)
    asks: dict[float, float] = field(default_factory=dict)
    candle: _Candle | None = None
    trade_id: int = 0

    def __post_init__(self) -> None:
        self.tick = 10 ** (math.floor(math.log10(self.price)) - 4)
        self.start = self.price
        for i in range(1, 11):
            self.bids[self._level(self.price - i * self.tick)] = self._size()
            self.asks[self._level(self.price + i * self.tick)] = self._size()

    def _level(self, price: float) -> float:
        return round(round(price / self.tick) * self.tick, 8)

    def _size(self) -> float:
        return round(self.rng.uniform(0.01, 5.0), 4)

    def step(self) -> list[dict[str, Any]]:
        """One tick: a trade and a few book changes."""
        rng = self.rng
        self.drift = self.drift * (1 - REVERSION) + rng.gauss(0, VOLATILITY)
        self.price = max(self.tick, self.start * math.exp(self.drift))
        side = rng.choice(("buy", "sell"))
        qty = round(rng.expovariate(1 / 0.05), 4) or 0.0001
        price = self._level(self.price)
        self.trade_id += 1
        now = _ms()
        events: list[dict[str, Any]] = [
            {
                "type": "trade",
                "symbol": self.symbol,
                "id": self.trade_id,
                "price": price,
                "qty": qty,
                "side": side,
                "ts": now,
            }
        ]
        c = self.candle
        if c is None:
            c = self.candle = _Candle(now, price, price, price, price)
        c.high, c.low, c.close = max(c.high, price), min(c.low, price), price
        c.volume = round(c.volume + qty, 4)
        c.trades += 1
        for _ in range(rng.randint(1, 3)):
            book_side = rng.choice(("bid", "ask"))
            levels = self.bids if book_side == "bid" else self.asks
            offset = rng.randint(1, 10) * self.tick
            level = self._level(price - offset if book_side == "bid" else price + offset)
            size = 0.0 if level in levels and rng.random() < 0.2 else self._size()
            if size:
                levels[level] = size
            else:
                levels.pop(level, None)
            events.append(
                {
                    "type": "book",
                    "symbol": self.symbol,
                    "side": book_side,
                    "price": level,
                    "qty": size,
                    "ts": now,
                }
            )
        return events

    def book_levels(self, now: int) -> list[dict[str, Any]]:
        """The whole book as ``book`` events, one per level."""
        return [
            {
                "type": "book",
                "symbol": self.symbol,
                "side": side,
                "price": price,
                "qty": qty,
                "ts": now,
            }
            for side, levels in (("bid", self.bids), ("ask", self.asks))
            for price, qty in sorted(levels.items())
        ]

    def close_candle(self, interval: str) -> dict[str, Any] | None:
        c = self.candle
        self.candle = None
        if c is None:
            return None
        return {
            "type": "candle",
            "symbol": self.symbol,
            "interval": interval,
            "start": c.start,
            "open": c.open,
            "high": c.high,
            "low": c.low,
            "close": c.close,
            "volume": c.volume,
            "trades": c.trades,
        }


class _Client:
    def __init__(self, ws: trio_websocket.WebSocketConnection) -> None:
        self.ws = ws
        self.channels: set[str] = set()
        self.symbols: set[str] = set()
        self.send, self.receive = trio.open_memory_channel[str](1000)

    def offer(self, event: dict[str, Any]) -> None:
        channel = {"trade": "trades", "book": "book", "candle": "candles"}.get(event["type"])
        if channel is not None and (
            channel not in self.channels or event["symbol"] not in self.symbols
        ):
            return
        # A slow client misses updates, as on a real exchange.
        with contextlib.suppress(trio.WouldBlock):
            self.send.send_nowait(json.dumps(event))


class Exchange:
    """The simulated exchange server.

    Args:
        rate: ticks per second per symbol.
        candle_interval: seconds per candle.
        symbols: the markets (default: BTC-USD, ETH-USD, SOL-USD).
        seed: for reproducible prices.
    """

    def __init__(
        self,
        *,
        rate: float = 20.0,
        candle_interval: float = 1.0,
        symbols: list[str] | None = None,
        seed: int | None = None,
    ) -> None:
        rng = random.Random(seed)
        names = symbols or list(START_PRICES)
        self.markets = [Market(s, START_PRICES.get(s, 100.0), rng) for s in names]
        self.rate = rate
        self.candle_interval = candle_interval
        self.clients: set[_Client] = set()
        self.port = 0

    async def serve(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        task_status: trio.TaskStatus[Exchange] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        async with trio.open_nursery() as nursery:
            server = await nursery.start(
                trio_websocket.serve_websocket, self._handler, host, port, None
            )
            self.port = server.port
            nursery.start_soon(self._ticker)
            nursery.start_soon(self._candles)
            nursery.start_soon(self._heartbeats)
            task_status.started(self)

    def _broadcast(self, event: dict[str, Any]) -> None:
        for client in list(self.clients):
            client.offer(event)

    async def _ticker(self) -> None:
        period = 1.0 / self.rate
        next_at = trio.current_time()
        while True:
            for market in self.markets:
                for event in market.step():
                    self._broadcast(event)
            next_at += period
            await trio.sleep_until(next_at)

    async def _candles(self) -> None:
        interval = f"{self.candle_interval:g}s"
        while True:
            await trio.sleep(self.candle_interval)
            for market in self.markets:
                candle = market.close_candle(interval)
                if candle is not None:
                    self._broadcast(candle)

    async def _heartbeats(self) -> None:
        while True:
            await trio.sleep(1.0)
            self._broadcast({"type": "heartbeat", "ts": _ms()})

    async def _handler(self, request: trio_websocket.WebSocketRequest) -> None:
        ws = await request.accept()
        client = _Client(ws)
        self.clients.add(client)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._writer, client)
                while True:
                    self._command(client, await ws.get_message())
        except* trio_websocket.ConnectionClosed:
            pass  # the client left, perhaps while its writer was sending
        finally:
            self.clients.discard(client)

    def _command(self, client: _Client, message: str | bytes) -> None:
        try:
            command = json.loads(message)
        except ValueError:
            client.offer({"type": "error", "message": "not JSON"})
            return
        if not isinstance(command, dict) or command.get("op") != "subscribe":
            client.offer({"type": "error", "message": "unknown op"})
            return
        known = {m.symbol for m in self.markets}
        channels = [c for c in command.get("channels", []) if c in CHANNELS]
        symbols = [s for s in command.get("symbols", []) if s in known]
        client.channels.update(channels)
        client.symbols.update(symbols)
        client.offer({"type": "subscribed", "channels": channels, "symbols": symbols})
        if "book" in channels:
            # As real exchanges do: the current book first, then its changes.
            now = _ms()
            for market in self.markets:
                if market.symbol in symbols:
                    for event in market.book_levels(now):
                        client.offer(event)

    async def _writer(self, client: _Client) -> None:
        async for text in client.receive:
            await client.ws.send_message(text)


def main() -> None:
    parser = argparse.ArgumentParser(description="a simulated exchange's market-data stream")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9001)
    parser.add_argument("--rate", type=float, default=20.0, help="ticks per second per symbol")
    parser.add_argument("--candle-interval", type=float, default=1.0, help="seconds")
    args = parser.parse_args()
    exchange = Exchange(rate=args.rate, candle_interval=args.candle_interval)

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(exchange.serve, args.host, args.port)
            print(f"exchange on ws://{args.host}:{exchange.port}/", flush=True)

    try:
        trio.run(run)
    except* KeyboardInterrupt:  # Ctrl-C: it may come out of a nursery, in a group
        pass


if __name__ == "__main__":
    main()
