"""The worked reconnect of docs/history.md, run as written.

The ``Tape`` class is taken from the document's tested code block and
follows a real broker through the three events of the document's table: a
dropped TCP connection (every trade, once, no ``Resync``), a client away for
more trades than the history keeps (``Resync``, rebuilt from the latest
stored), and a broker restart (``Resync``, rebuilt from the new broker).
"""

from __future__ import annotations

import re
import socket
from pathlib import Path
from typing import Any

import trio

from broker.client import Reconnect, open_client
from tests.conftest import merge
from tests.helpers import TOKEN, TOKENS_CONFIG, Restartable, wait_until

DOC = Path(__file__).resolve().parent.parent / "docs" / "history.md"
MARKER = "<!-- tested: tests/test_history_example.py runs this block -->"
FAST = Reconnect(initial_delay=0.01, max_delay=0.05)
SIZE = 100
CONFIG: dict[str, Any] = merge(
    TOKENS_CONFIG, {"history": [{"pattern": "trades.>", "size": SIZE, "ttl": 300.0}]}
)


def example() -> dict[str, Any]:
    """The namespace of the document's code block (not run as a script)."""
    text = DOC.read_text(encoding="utf-8")
    after = text[text.index(MARKER) + len(MARKER) :]
    match = re.match(r"\s*```python\n(.*?)\n```", after, re.DOTALL)
    assert match is not None, "the marker is not followed by a python block"
    namespace: dict[str, Any] = {"__name__": "history_example"}
    # Padded so that tracebacks point at the document's lines.
    line = text[: text.index(MARKER) + len(MARKER) + match.start(1)].count("\n")
    exec(compile("\n" * line + match.group(1), str(DOC), "exec"), namespace)
    return namespace


async def test_the_tape_of_docs_history_md(nursery: trio.Nursery) -> None:
    Tape = example()["Tape"]
    server = Restartable(nursery, CONFIG)
    broker = await server.start()
    # The subscriber's reconnections wait on this gate from the second one
    # on: the test decides how long the client stays away.
    gate = trio.Event()
    gate.set()
    calls = 0

    async def get_token() -> str:
        nonlocal calls
        calls += 1
        await gate.wait()
        return TOKEN

    async with (
        open_client(server.url, token=TOKEN, reconnect=FAST) as publisher,
        open_client(server.url, get_token=get_token, reconnect=FAST) as client,
    ):

        async def trade(n: int) -> int:
            seq = await publisher.publish("trades.BTC-USD", {"n": n})
            assert seq is not None
            return seq

        for n in range(1, 6):  # before the tape starts: it gets them from history
            await trade(n)
        tape = Tape(size=SIZE)
        following = trio.CancelScope()

        async def follow() -> None:
            with following:
                await tape.follow(client, "trades.BTC-USD")

        nursery.start_soon(follow)
        await wait_until(lambda: tape.seq == 5)
        assert tape.trades == [{"n": n} for n in range(1, 6)]

        # 1. The TCP connection drops (no close frame); trades go on.
        (conn,) = [c for c in broker.connections if c.subscriptions]
        assert isinstance(conn.stream, trio.SocketStream)
        conn.stream.socket.shutdown(socket.SHUT_RDWR)
        for n in range(6, 9):
            await trade(n)
        await wait_until(lambda: tape.seq == 8)
        assert tape.trades == [{"n": n} for n in range(1, 9)]
        assert tape.resyncs == 0

        # 2. Away for more trades than the history keeps.
        gate = trio.Event()
        (conn,) = [c for c in broker.connections if c.subscriptions]
        conn.close(1001, "kicked")
        await wait_until(lambda: not client.connected)
        for n in range(9, 9 + SIZE + 50):
            await trade(n)
        last = 8 + SIZE + 50
        gate.set()
        await wait_until(lambda: tape.resyncs == 1 and tape.seq == last)
        assert tape.trades == [{"n": n} for n in range(last - SIZE + 1, last + 1)]
        await trade(last + 1)
        await wait_until(lambda: tape.seq == last + 1)
        assert tape.trades[-1] == {"n": last + 1} and len(tape.trades) == SIZE

        # 3. The broker restarts: its history is gone, seqs start again.
        await server.stop()
        await server.start()
        await wait_until(lambda: tape.resyncs == 2)
        await wait_until(lambda: publisher.connected)
        assert await trade(1000) == 1
        await wait_until(lambda: tape.seq == 1)
        assert tape.trades == [{"n": 1000}]
        assert calls >= 3
        following.cancel()
