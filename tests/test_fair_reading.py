"""Fair reading: one client's input cannot hold the broker for the others.

A connection's reader handles a bounded amount of work (frames handled,
deliveries queued) per scheduling round, then lets the other tasks run
(``ROUND_BUDGET`` in :mod:`broker.server.connection`). Without it, a client
writing publishes as fast as it can had the broker handle up to 16 reads of
64 KiB (about 17,000 small messages) before anyone else was served.
"""

from __future__ import annotations

import trio
from wsproto.events import TextMessage

from broker import Broker
from broker.server.connection import FRAME_COST, ROUND_BUDGET
from tests.conftest import BrokerFactory
from tests.helpers import raw_connect, wait_until

FLOOD = 50_000  # publishes, about 3 MB


async def test_another_client_is_served_while_one_floods(start_broker: BrokerFactory) -> None:
    """A client writes 50,000 publishes without ids (no replies to slow it);
    another client's ping is answered while the flood is still being read,
    and in the meantime the broker handled only a few rounds of the flood."""
    broker: Broker = await start_broker()
    hub = broker.hub
    async with raw_connect(broker.url) as flood, raw_connect(broker.url) as other:
        one = flood.wsp.send(TextMessage(data='{"op":"pub","topic":"flood","data":"0123456789"}'))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(flood.send_raw, one * FLOOD)
            await wait_until(lambda: hub.published >= 1000)  # the flood is being read
            before = hub.published
            await other.send({"op": "ping", "id": 1})
            assert await other.recv() == {"op": "pong", "id": 1}
            during = hub.published - before
            assert hub.published < FLOOD, "the ping was answered only after the flood"
        # A round is ROUND_BUDGET // FRAME_COST frames; the ping takes a few
        # rounds to go in and its pong to come out.
        assert during < 30 * ROUND_BUDGET // FRAME_COST, during
        await wait_until(lambda: hub.published == FLOOD)  # none of the flood is lost
        await other.send({"op": "ping", "id": 2})
        assert await other.recv() == {"op": "pong", "id": 2}
