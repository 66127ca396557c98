"""The JavaScript client (broker/web/client.js) in real Chromium, against
real brokers: both encodings, reconnects after a restart and after the
network drops, token refresh and expiry, refused handshakes, and nothing
left behind by close()."""

from __future__ import annotations

import struct
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import jwt
import pytest
import trio

from broker import Broker, Identity
from broker.io.http import Request, Response
from tests.browser.driver import Gate, Page, PageServer, Session, browser_session, serve_pages
from tests.conftest import BrokerFactory
from tests.helpers import (
    ENCODINGS,
    TOKEN,
    TOKENS_CONFIG,
    EncodingName,
    Restartable,
    wait_until,
)
from tests.redis_service import (
    MACHINE_URL,
    MachineUser,
    delete_prefix,
    machine_user,
    needs_machine_redis,
    unique_prefix,
)

HISTORY = {"history": [{"pattern": "trades.>", "size": 1000, "ttl": 300.0}]}


@pytest.fixture
async def session() -> AsyncIterator[Session]:
    async with browser_session() as s:
        yield s


@pytest.fixture
async def pages() -> AsyncIterator[PageServer]:
    async with serve_pages() as server:
        yield server


async def harness(session: Session, pages: PageServer, client: str | None = None) -> Page:
    url = pages.url("/pages/harness.html") + (f"?client={client}" if client else "")
    page = await session.open(url)
    await page.wait_for("() => window.broker !== undefined")
    return page


@ENCODINGS
async def test_publish_subscribe_history_presence(
    start_broker: BrokerFactory,
    session: Session,
    pages: PageServer,
    encoding: EncodingName,
    tmp_path: Path,
) -> None:
    broker = await start_broker({**HISTORY, "presence": [{"pattern": "room.*"}]})
    page = await harness(session, pages)
    result = await page.evaluate(
        """async ([url, encoding]) => {
            const { connect } = window.broker;
            const client = await connect(url, { encoding });
            const record = window.record(client);
            const before = await client.publish("trades.BTC", { price: 1 });
            const sub = await client.subscribe("trades.*", { history: 5 }, record);
            const seq = await client.publish("trades.BTC", { price: 2.5, qty: [1, 2] }, { key: "k" });
            const room = await client.subscribe("room.1", { presence: true }, record);
            const presence = await client.presence("room.1");
            const history = await client.history("trades.BTC", { limit: 10 });
            const rtt = await client.ping();
            let error = null;
            try { await client.publish("trades.*", 1); } catch (e) { error = [e.name, e.code]; }
            let local = null;
            try { await client.subscribe("a..b", () => {}); } catch (e) { local = [e.name, e.code]; }
            await sub.unsubscribe();
            await client.publish("trades.BTC", { price: 3 });
            const after = await client.ping();
            await room.unsubscribe();
            await client.close();
            return { before, seq, presence, history, rtt: rtt >= 0 && after >= 0, error, local,
                     leaks: window.leaks(), closed: client.closed };
        }""",
        [broker.url, encoding],
    )
    assert result["before"] == 1 and result["seq"] == 2
    assert result["presence"] == {
        "count": 1,
        "connections": 1,
        "members": [{"subject": "anonymous", "connections": 1}],
    }
    history = result["history"]
    assert [m["seq"] for m in history["messages"]] == [1, 2]
    assert history["messages"][1]["data"] == {"price": 2.5, "qty": [1, 2]}
    assert history["messages"][1]["key"] == "k"
    assert result["rtt"] is True
    assert result["error"] == ["BadRequest", "bad_request"]
    assert result["local"] == ["BadRequest", "bad_request"]
    items = await page.evaluate("() => window.items")
    messages = [i for i in items if i["type"] == "message"]
    # The stored message first (history: 5), then the live one; not the one
    # published after unsubscribe().
    assert [(m["topic"], m["seq"], m["data"]) for m in messages] == [
        ("trades.BTC", 1, {"price": 1}),
        ("trades.BTC", 2, {"price": 2.5, "qty": [1, 2]}),
    ]
    assert messages[0]["epoch"] is not None  # seq 1 carries the epoch
    assert messages[1]["key"] == "k"
    joins = [i for i in items if i["type"] == "join"]
    assert joins == [
        {
            "label": "",
            "type": "join",
            "topic": "room.1",
            "member": {"subject": "anonymous", "connections": 1},
        }
    ]
    assert result["closed"] is True
    # Nothing is left: no timer, no listener, no open socket.
    assert result["leaks"] == {"timers": 0, "listeners": [], "sockets": 0}
    events = await page.evaluate("() => window.events.map((e) => e.event)")
    assert events == ["disconnected", "closed"]


async def test_messages_cross_encodings(
    start_broker: BrokerFactory, session: Session, pages: PageServer
) -> None:
    """A message published over msgpack reaches a JSON subscriber and back."""
    broker = await start_broker()
    page = await harness(session, pages)
    got = await page.evaluate(
        """async (url) => {
            const { connect } = window.broker;
            const json = await connect(url);
            const packed = await connect(url, { encoding: "msgpack" });
            const seen = [];
            const keep = (name) => (i) => i.type === "message" && seen.push([name, i.topic, i.data]);
            await json.subscribe("x.*", keep("json"));
            await packed.subscribe("x.*", keep("msgpack"));
            await packed.publish("x.a", { n: 1, s: "é", f: 0.5, l: [true, null] });
            await json.publish("x.b", "text");
            await json.ping(); await packed.ping();
            await json.close(); await packed.close();
            return seen;
        }""",
        broker.url,
    )
    data = {"n": 1, "s": "é", "f": 0.5, "l": [True, None]}
    assert sorted(got, key=repr) == sorted(
        [
            ["json", "x.a", data],
            ["msgpack", "x.a", data],
            ["json", "x.b", "text"],
            ["msgpack", "x.b", "text"],
        ],
        key=repr,
    )


async def test_bad_input_is_refused_before_sending(
    start_broker: BrokerFactory, session: Session, pages: PageServer
) -> None:
    broker = await start_broker()
    page = await harness(session, pages)
    errors = await page.evaluate(
        """async (url) => {
            const { connect } = window.broker;
            const out = [];
            const attempt = async (f) => { try { await f(); out.push("ok"); } catch (e) { out.push(`${e.name}: ${e.message}`); } };
            await attempt(() => connect("http://[::1"));
            await attempt(() => connect("ftp://127.0.0.1/ws"));
            await attempt(() => connect(url, { encoding: "xml" }));
            await attempt(() => connect(url, { encoding: "msgpack", msgpack: {} }));
            await attempt(() => connect(url, { token: "a b" }));
            const client = await connect(url);
            await attempt(() => client.publish("t", NaN));
            await attempt(() => client.publish("t", undefined));
            await attempt(() => client.subscribe("t", { history: 0 }, () => {}));
            await attempt(() => client.history("t.*"));
            await attempt(() => client.subscribe("t", "not a function"));
            await client.close();
            await attempt(() => client.publish("t", 1));
            return out;
        }""",
        broker.url,
    )
    assert errors[0].startswith("TypeError") or errors[0].startswith("SyntaxError")
    assert errors[1] == "TypeError: not a ws:// or wss:// URL: ftp://127.0.0.1/ws"
    assert errors[2] == 'TypeError: encoding must be "json" or "msgpack"'
    assert errors[3].startswith('TypeError: encoding "msgpack" needs @msgpack/msgpack')
    assert errors[4].startswith("TypeError: token must be")
    assert errors[5] == "TypeError: data must be JSON-representable (NaN or infinite number)"
    assert errors[6].startswith("TypeError: data is required")
    assert errors[7] == "RangeError: history must be from 1 to 1000"
    assert errors[8] == "BadRequest: bad_request: wildcards are only allowed in subscriptions"
    assert errors[9] == "TypeError: handler must be a function"
    assert errors[10] == "Disconnected: connection closed (1000): client closed the connection"


# -- backpressure ----------------------------------------------------------------


async def test_a_stuck_page_is_told_what_the_broker_dropped(
    start_broker: BrokerFactory, session: Session
) -> None:
    """The page's main thread is stuck (a long task) while two topics keep
    publishing: its socket backs up, its queue (20 messages, drop-oldest)
    overflows. Once it runs again, every message it did not get is
    accounted for by the `dropped` items of its subscription, per topic,
    and the client's `dropped` events are the same notices."""
    broker = await start_broker({"queue": {"max_messages": 20}})
    gate = Gate()
    async with serve_pages({Gate.PATH: gate.route}) as pages:
        page = await harness(session, pages)
        await page.evaluate(
            """async (url) => {
                window.client = await window.broker.connect(url);
                await window.client.subscribe("big.*", window.record(window.client));
            }""",
            broker.url,
        )
        (conn,) = broker.connections
        feed = Identity("feed")
        payload = "x" * 4000
        published = {"big.a": 0, "big.b": 0}
        async with trio.open_nursery() as nursery:
            nursery.start_soon(gate.block, page)
            await gate.entered.wait()
            # Publish until the broker has dropped at least 50 for the page.
            while conn.outbox.dropped_total < 50:
                for topic in published:
                    published[topic] = await broker.publish(feed, topic, payload)
                await trio.lowlevel.checkpoint()  # the broker writes what fits
            gate.open()
        # The end: one more message each (the newest: drop-oldest keeps it).
        for topic in published:
            published[topic] = await broker.publish(feed, topic, "end")
        items = await page.wait_for(
            "() => window.items.filter((i) => i.data === 'end').length === 2 && window.items"
        )
    dropped = conn.outbox.dropped_total  # nothing more is published
    for topic, last in published.items():
        seqs = [i["seq"] for i in items if i["type"] == "message" and i["topic"] == topic]
        notices = [i["count"] for i in items if i["type"] == "dropped" and i["topic"] == topic]
        assert seqs == sorted(seqs) and seqs[-1] == last
        assert sum(notices) == last - len(seqs), topic  # every gap is in a notice
        assert all(count > 0 for count in notices)
    assert sum(i["count"] for i in items if i["type"] == "dropped") == dropped
    events = await page.evaluate("() => window.events")
    assert [e["detail"] for e in events] == [
        {"topic": i["topic"], "count": i["count"]} for i in items if i["type"] == "dropped"
    ]
    assert {e["event"] for e in events} == {"dropped"}
    await page.evaluate("() => window.client.close()")


@pytest.mark.parametrize("replay", ["history", "snapshot"])
async def test_a_replay_larger_than_the_queue_is_reported_to_its_subscription(
    start_broker: BrokerFactory, session: Session, pages: PageServer, replay: str
) -> None:
    """A subscription asks for a replay (50 stored messages, or a snapshot
    of 50 keys) that the connection's queue (10 messages) cannot hold: the
    broker drops the oldest 40 and writes its notice before the `ok` (the
    notices go ahead of queued frames). The subscription still gets it,
    first, then the 10 newest."""
    history = {"pattern": "t.>", "size": 100}
    if replay == "snapshot":
        history = {"pattern": "t.>", "size": 0, "snapshot": True}
    broker = await start_broker({"queue": {"max_messages": 10}, "history": [history]})
    feed = Identity("feed")
    for n in range(1, 51):
        await broker.publish(feed, "t.x", n, key=f"k{n}")
    page = await harness(session, pages)
    options = {"history": 50} if replay == "history" else {"snapshot": True}
    items = await page.evaluate(
        """async ([url, options]) => {
            const client = await window.broker.connect(url);
            window.client = client;
            const record = window.record(client);
            await client.subscribe("t.x", options, record);
            await client.ping();  // after the replay
            return window.items;
        }""",
        [broker.url, options],
    )
    assert items[0] == {"label": "", "type": "dropped", "topic": "t.x", "count": 40}
    assert [i["data"] for i in items[1:]] == list(range(41, 51))
    assert all(i["snapshot"] is (replay == "snapshot") for i in items[1:])
    assert await page.evaluate("() => window.events.map((e) => e.detail)") == [
        {"topic": "t.x", "count": 40}
    ]
    await page.evaluate("() => window.client.close()")


# -- reconnecting ----------------------------------------------------------------


async def test_reconnect_after_a_restart_resyncs(
    nursery: trio.Nursery, session: Session, pages: PageServer
) -> None:
    """The broker restarts (a new epoch): the page is told, in this order,
    interrupted, reconnected and resync, then gets the new epoch's messages."""
    server = Restartable(nursery, HISTORY)
    await server.start()
    page = await harness(session, pages)
    await page.evaluate(
        """async (url) => {
            const { connect } = window.broker;
            window.client = await connect(url, { reconnect: { initialDelay: 0.05, maxDelay: 0.2 } });
            await window.client.subscribe("trades.BTC", window.record(window.client));
            await window.client.publish("trades.BTC", "before");
        }""",
        server.url,
    )
    await page.wait_for("() => window.items.length === 1")
    await server.stop()
    await page.wait_for("() => window.items.some((i) => i.type === 'interrupted')")
    await server.start()
    await page.wait_for("() => window.client.connected")
    await page.evaluate("() => window.client.publish('trades.BTC', 'after')")
    items = await page.wait_for(
        "() => window.items.some((i) => i.data === 'after') && window.items"
    )
    kinds = [i["type"] for i in items]
    assert kinds == ["message", "interrupted", "reconnected", "resync", "message"]
    assert items[1]["code"] == 1001 and items[1]["reason"] == "server shutting down"
    assert items[3]["reason"] == "not_recovered" and items[3]["seq"] == 0
    assert items[4]["seq"] == 1 and items[4]["epoch"] == items[3]["epoch"]
    events = [e["event"] for e in await page.evaluate("() => window.events")]
    assert events[:2] == ["disconnected", "reconnecting"]
    # The resync comes with the resubscription, before the connection is
    # declared ready.
    assert events[-2:] == ["resync", "connected"]
    await page.evaluate("() => window.client.close()")
    assert await page.evaluate("() => window.leaks()") == {
        "timers": 0,
        "listeners": [],
        "sockets": 0,
    }


class Cable:
    """A TCP proxy between the page and the broker, standing for the
    network: it can be cut (every relayed connection is reset at once, no
    close frame, as when a network fails; new ones are refused until it is
    plugged back), frozen (connections stay open but nothing goes
    through, as for a laptop asleep or a dead route) or made to hang (cut,
    then new connections are accepted and never answered, as by a proxy
    whose upstream is gone; :attr:`open` counts them until the page closes
    them)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.plugged = True
        #: Connections relayed so far, and open now.
        self.relayed = 0
        self.open = 0
        self.hanging = False
        self._cut = trio.Event()
        self._flowing = trio.Event()
        self._flowing.set()

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._relay, listeners)

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    async def _relay(self, client: trio.SocketStream) -> None:
        if not self.plugged:
            await _reset(client)
            return
        if self.hanging:
            self.relayed += 1
            self.open += 1
            try:
                while await client.receive_some(65536):
                    pass  # read, never answered, until the page closes it
            except trio.BrokenResourceError:
                pass
            finally:
                self.open -= 1
            await trio.aclose_forcefully(client)
            return
        upstream = await trio.open_tcp_stream("127.0.0.1", self.target_port)
        cut = self._cut
        self.relayed += 1
        self.open += 1

        async def pump(source: trio.SocketStream, sink: trio.SocketStream) -> None:
            try:
                while data := await source.receive_some(65536):
                    await self._flowing.wait()
                    await sink.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            nursery.cancel_scope.cancel()

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(pump, client, upstream)
                nursery.start_soon(pump, upstream, client)
                await cut.wait()
                nursery.cancel_scope.cancel()
        finally:
            self.open -= 1
        await _reset(client)
        await _reset(upstream)

    def cut(self) -> None:
        self.plugged = False
        self._cut.set()
        self._cut = trio.Event()

    def plug(self) -> None:
        self.plugged = True

    def hang(self) -> None:
        self.cut()
        self.hanging = True
        self.plugged = True

    def freeze(self) -> None:
        self._flowing = trio.Event()

    def thaw(self) -> None:
        self._flowing.set()


async def _reset(stream: trio.SocketStream) -> None:
    """Close with a RST, not a FIN: the page sees 1006, no close frame."""
    stream.socket.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_LINGER, struct.pack("ii", 1, 0))
    await trio.aclose_forcefully(stream)


async def test_reconnect_after_the_network_drops_recovers_every_message(
    start_broker: BrokerFactory, nursery: trio.Nursery, session: Session, pages: PageServer
) -> None:
    """The network fails under a subscriber while messages keep coming; it
    comes back; the page ends with every message, once, in order, and no
    resync (the broker keeps history)."""
    broker = await start_broker(HISTORY)
    cable = Cable(broker.port)
    await nursery.start(cable.serve)
    page = await harness(session, pages)
    await page.evaluate(
        """async (url) => {
            const { connect } = window.broker;
            window.client = await connect(url, { reconnect: { initialDelay: 0.05, maxDelay: 0.3 } });
            const record = window.record(window.client);
            await window.client.subscribe("trades.>", record);
        }""",
        cable.url,
    )
    publisher = Identity("feed")
    for n in range(1, 51):
        await broker.publish(publisher, "trades.BTC", n)
    await page.wait_for("() => window.items.length === 50")
    cable.cut()
    await page.wait_for("() => window.items.some((i) => i.type === 'interrupted')")
    for n in range(51, 101):  # published while the page is away
        await broker.publish(publisher, "trades.BTC", n)
    cable.plug()
    await page.wait_for("() => window.client.connected")
    for n in range(101, 121):
        await broker.publish(publisher, "trades.BTC", n)
    items = await page.wait_for(
        "() => window.items.filter((i) => i.type === 'message').length >= 120 && window.items"
    )
    data = [i["data"] for i in items if i["type"] == "message"]
    assert data == list(range(1, 121))
    notices = [(i["type"], i.get("code")) for i in items if i["type"] != "message"]
    assert notices == [("interrupted", 1006), ("reconnected", None)]
    # WebSocket connections the broker accepted (the cable also relays the
    # client's plain fetch that tells a refused handshake from no route).
    await wait_until(lambda: broker.stats.accepted >= 2)
    assert broker.stats.accepted == 2
    await page.evaluate("() => window.client.close()")


async def test_offline_waits_for_online_then_reconnects_at_once(
    start_broker: BrokerFactory, nursery: trio.Nursery, session: Session, pages: PageServer
) -> None:
    """While the browser says it is offline the client makes no attempt;
    the `online` event makes it try at once, whatever the backoff."""
    broker = await start_broker(HISTORY)
    cable = Cable(broker.port)
    await nursery.start(cable.serve)
    page = await harness(session, pages)
    await page.evaluate(
        """async (url) => {
            const { connect } = window.broker;
            // A backoff far longer than the test once past the first attempt:
            // only `online` can bring it back quickly.
            window.client = await connect(url, { reconnect: { initialDelay: 0.01, maxDelay: 60, factor: 6000 } });
            window.record(window.client);
            await window.client.subscribe("trades.>", () => {});
        }""",
        cable.url,
    )
    await session.set_offline(True)
    cable.cut()
    await page.wait_for("() => window.events.some((e) => e.event === 'reconnecting')")
    # Waiting for `online`, with no timer: the first delay (10 ms at most)
    # is not running, and no attempt was made.
    waiting = await page.evaluate(
        "() => [navigator.onLine, window.client._offline, window.client._wake !== null,"
        " window.events.filter((e) => e.event === 'reconnecting').length]"
    )
    assert waiting == [False, True, True, 1]
    assert broker.stats.accepted == 1
    cable.plug()
    await session.set_offline(False)
    await page.wait_for("() => window.client.connected")
    # WebSocket connections the broker accepted (the cable also relays the
    # client's plain fetch that tells a refused handshake from no route).
    await wait_until(lambda: broker.stats.accepted >= 2)
    assert broker.stats.accepted == 2
    await page.evaluate("() => window.client.close()")


async def test_a_silent_connection_is_noticed_when_the_page_is_shown_again(
    start_broker: BrokerFactory, nursery: trio.Nursery, session: Session, pages: PageServer
) -> None:
    """A laptop wakes up: the page becomes visible, the client pings, and a
    connection that does not answer is dropped and replaced."""
    broker = await start_broker()
    cable = Cable(broker.port)
    await nursery.start(cable.serve)
    page = await harness(session, pages)
    await page.evaluate(
        """async (url) => {
            const { connect } = window.broker;
            window.client = await connect(url, { pingTimeout: 0.3, reconnect: { initialDelay: 0.05 } });
            window.record(window.client);
        }""",
        cable.url,
    )
    cable.freeze()  # the route is dead, the sockets still open
    await page.set_hidden(True)
    await page.set_hidden(False)
    await page.wait_for("() => window.events.some((e) => e.event === 'disconnected')")
    cable.thaw()
    events = await page.wait_for(
        "() => window.events.some((e) => e.event === 'connected') && window.events"
    )
    lost = next(e for e in events if e["event"] == "disconnected")
    assert lost["detail"] == {
        "code": 1006,
        "reason": "no answer to a ping within 0.3s",
        "reconnecting": True,
    }
    # WebSocket connections the broker accepted (the cable also relays the
    # client's plain fetch that tells a refused handshake from no route).
    await wait_until(lambda: broker.stats.accepted >= 2)
    assert broker.stats.accepted == 2
    await page.evaluate("() => window.client.close()")
    assert await page.evaluate("() => window.leaks()") == {
        "timers": 0,
        "listeners": [],
        "sockets": 0,
    }


async def test_close_while_reconnecting_to_a_dead_route_leaves_no_connection(
    start_broker: BrokerFactory, nursery: trio.Nursery, session: Session, pages: PageServer
) -> None:
    """The route to the broker dies with connections still accepted (a
    proxy whose upstream hangs): the reconnection attempt times out, and the
    client asks the address for a plain HTTP answer to tell a refusal from
    no route, which hangs too. close() then leaves no connection open: not
    the attempt, not that request."""
    broker = await start_broker({"limits": {"handshake_timeout": 60.0}})
    cable = Cable(broker.port)
    await nursery.start(cable.serve)
    page = await harness(session, pages)
    await page.evaluate(
        """async (url) => {
            const { connect } = window.broker;
            window.client = await connect(url, { connectTimeout: 0.3, reconnect: { initialDelay: 0.01 } });
            window.record(window.client);
        }""",
        cable.url,
    )
    cable.hang()  # the connection is lost; new ones are accepted, and hang
    # The attempt (a WebSocket) timed out and was closed; the plain request
    # hangs.
    await wait_until(lambda: cable.relayed >= 3 and cable.open == 1)
    await page.evaluate("() => window.client.close()")
    await wait_until(lambda: cable.open == 0, seconds=2)
    assert await page.evaluate("() => window.leaks()") == {
        "timers": 0,
        "listeners": [],
        "sockets": 0,
    }


# -- a resubscription answered unavailable -------------------------------------------
#
# The page's broker b logs in to the machine's Redis as an ACL user of the
# test's own; the test takes FCALL away from it, so that a sub that reads a
# position from Redis is answered `unavailable` (NOPERM), and kills b's
# fan-out link, so that b tells its subscribers to resume (1012). Broker a
# (Redis' default user) publishes meanwhile. See
# tests/test_client_resubscribe_unavailable.py for the Python client.

REDIS_HISTORY = {"history": [{"pattern": "t.>", "size": 100, "ttl": 60.0}]}


@pytest.fixture
async def redis_user() -> AsyncIterator[tuple[str, MachineUser]]:
    prefix = unique_prefix()
    try:
        async with machine_user(prefix) as user:
            yield prefix, user
    finally:
        await delete_prefix(MACHINE_URL, prefix)


async def redis_node(start_broker: BrokerFactory, prefix: str, url: str = MACHINE_URL) -> Broker:
    engine = {"engine": {"type": "redis", "url": url, "prefix": prefix}}
    broker = await start_broker({**engine, **REDIS_HISTORY})
    await wait_until(lambda: broker.readiness()[0])
    return broker


async def redis_outage(user: MachineUser, page: Page, interrupted: int) -> None:
    """b's user may not call the broker's function; b's fan-out link drops."""
    await user.deny("fcall")
    assert await user.kill_pubsub() == 1
    await page.wait_for(
        "(n) => window.items.filter((i) => i.type === 'interrupted' && i.code === 1012).length === n",
        interrupted,
    )


UNAVAILABLE = """(n) => window.events.filter((e) => e.event === "error" && e.label === "exact"
    && e.detail.name === "Unavailable").length >= n"""


@needs_machine_redis
async def test_a_resubscription_answered_unavailable_is_retried(
    start_broker: BrokerFactory,
    redis_user: tuple[str, MachineUser],
    session: Session,
    pages: PageServer,
) -> None:
    """The page's resubscriptions are answered `unavailable`: the client
    retries them (the same `since`) until b can answer, and the page gets
    what was published meanwhile, once, in order, and no resync."""
    prefix, user = redis_user
    a = await redis_node(start_broker, prefix)
    b = await redis_node(start_broker, prefix, user.url)
    feed = Identity("feed")
    page = await harness(session, pages)
    await page.evaluate(
        """async (url) => {
            const { connect } = window.broker;
            window.client = await connect(url, { reconnect: { initialDelay: 0.01, maxDelay: 0.05 } });
            await window.client.subscribe("t.a", window.record(window.client, "exact"));
            await window.client.subscribe("t.*", window.record(window.client, "pattern"));
        }""",
        b.url,
    )
    await a.publish(feed, "t.a", "a1")
    await a.publish(feed, "t.b", "b1")
    await page.wait_for("() => window.items.length === 3")
    await redis_outage(user, page, 2)
    # Both resubscriptions were refused, then refused again: retried.
    await page.wait_for(UNAVAILABLE, 4)
    assert await page.evaluate("() => window.client.connected") is True
    await a.publish(feed, "t.a", "a2")
    await a.publish(feed, "t.b", "b2")
    # A subscribe() of a pattern being retried waits for it, then shares it.
    await page.evaluate(
        """() => {
            window.joined = false;
            window.client.subscribe("t.a", window.record(window.client, "late"))
                .then(() => { window.joined = true; });
        }"""
    )
    await page.wait_for(UNAVAILABLE, 6)
    assert await page.evaluate("() => window.joined") is False
    await user.allow("fcall")
    await page.wait_for("() => window.items.filter((i) => i.type === 'reconnected').length === 2")
    await page.wait_for("() => window.joined")
    await a.publish(feed, "t.a", "a3")
    items = await page.wait_for(
        "() => window.items.filter((i) => i.data === 'a3').length === 3 && window.items"
    )

    def seen(label: str) -> list[tuple[str, Any]]:
        return [(i["type"], i.get("data")) for i in items if i["label"] == label]

    assert seen("exact") == [
        ("message", "a1"),
        ("interrupted", None),
        ("reconnected", None),
        ("message", "a2"),
        ("message", "a3"),
    ]
    assert seen("pattern") == [
        ("message", "a1"),
        ("message", "b1"),
        ("interrupted", None),
        ("reconnected", None),
        ("message", "a2"),
        ("message", "b2"),
        ("message", "a3"),
    ]
    # The late one gets what came after it joined: the replay may or may not
    # (it follows the ok that let it in), then live.
    assert seen("late")[-1] == ("message", "a3")
    assert set(seen("late")) <= {("message", "a2"), ("message", "a3")}
    errors = await page.evaluate(
        "() => window.events.filter((e) => e.event === 'error' && e.label === 'exact')"
    )
    assert all("NOPERM" in e["detail"]["message"] for e in errors), errors
    await page.evaluate("() => window.client.close()")
    assert await page.evaluate("() => window.leaks()") == {
        "timers": 0,
        "listeners": [],
        "sockets": 0,
    }


@needs_machine_redis
async def test_close_while_retrying_a_resubscription_leaves_nothing(
    start_broker: BrokerFactory,
    redis_user: tuple[str, MachineUser],
    session: Session,
    pages: PageServer,
) -> None:
    prefix, user = redis_user
    b = await redis_node(start_broker, prefix, user.url)
    page = await harness(session, pages)
    # Retries soon at first, then after up to 10 s, then up to 60 s.
    await page.evaluate(
        """async (url) => {
            const { connect } = window.broker;
            const reconnect = { initialDelay: 0.01, maxDelay: 60, factor: 1000 };
            window.client = await connect(url, { reconnect });
            await window.client.subscribe("t.a", window.record(window.client, "exact"));
        }""",
        b.url,
    )
    await redis_outage(user, page, 1)
    await page.wait_for(UNAVAILABLE, 2)
    await page.evaluate("() => window.client.close()", seconds=2)
    items = await page.evaluate("() => window.items")
    assert [i["type"] for i in items] == ["interrupted", "closed"]
    assert items[-1]["error"]["name"] == "Disconnected"
    assert await page.evaluate("() => window.leaks()") == {
        "timers": 0,
        "listeners": [],
        "sockets": 0,
    }
    await wait_until(lambda: not b.connections)


# -- tokens --------------------------------------------------------------------------

SECRET = "browser-test-secret-0123456789abcdef"
JWT_CONFIG: dict[str, Any] = {
    "plugins": {"enabled": ["jwt"]},
    "plugin": {"jwt": {"secret": SECRET, "algorithms": ["HS256"], "leeway": 0}},
}


def make_jwt(subject: str, lifetime: int) -> str:
    """A JWT valid for *lifetime* seconds, less the part of the current
    second already gone (``exp`` is a whole second)."""
    now = int(time.time())
    return jwt.encode(
        {"sub": subject, "iat": now, "exp": now + lifetime}, SECRET, algorithm="HS256"
    )


async def test_token_refresh_before_expiry(start_broker: BrokerFactory, session: Session) -> None:
    """getToken gives 3-second JWTs: the client presents a fresh one (`auth`)
    before each expires, and stays connected well past the first one."""
    broker = await start_broker(JWT_CONFIG)
    issued: list[str] = []

    async def token(request: Request) -> Response:
        issued.append(make_jwt("alice", 3))
        return Response(200, issued[-1].encode(), "text/plain")

    async with serve_pages({"/token": token}) as pages:
        page = await harness(session, pages)
        await page.evaluate(
            """async (url) => {
                const { connect } = window.broker;
                window.tokens = 0;
                const getToken = () => fetch("/token").then((r) => { window.tokens += 1; return r.text(); });
                window.client = await connect(url, { getToken });
                window.record(window.client);
                window.started = Date.now();
            }""",
            broker.url,
        )
        (conn,) = broker.connections
        first_expiry = jwt.decode(issued[0], options={"verify_signature": False})["exp"]
        # Two refreshes on the same connection, past the first token's expiry.
        await page.wait_for("() => window.tokens >= 3", seconds=8)
        await page.wait_for("(exp) => Date.now() / 1000 > exp + 0.2", first_expiry)
        assert await page.evaluate("() => window.client.connected") is True
        assert broker.connections == {conn}
        assert await page.evaluate("() => window.events.map((e) => e.event)") == []
        await page.evaluate("() => window.client.close()")


@pytest.mark.parametrize("skew", [-60, 60])
async def test_token_refresh_when_the_page_clock_is_off(
    start_broker: BrokerFactory, session: Session, skew: int
) -> None:
    """The page's clock is a minute behind (or ahead of) the token issuer's
    and the broker's, and getToken gives 3-second JWTs. The client times its
    refreshes by the token's own lifetime (exp - iat) where the page's clock
    cannot be right: behind, it would refresh after the broker closed the
    connection at expiry; ahead, every fresh token would look expired and be
    refreshed at once, again and again."""
    broker = await start_broker(JWT_CONFIG)
    issued: list[str] = []

    async def token(request: Request) -> Response:
        issued.append(make_jwt("alice", 3))
        return Response(200, issued[-1].encode(), "text/plain")

    async with serve_pages({"/token": token}) as pages:
        page = await harness(session, pages)
        await page.evaluate(
            """async ([url, skew]) => {
                const realNow = Date.now;
                window.realNow = () => realNow.call(Date);
                Date.now = () => realNow.call(Date) + skew * 1000;
                const { connect } = window.broker;
                window.tokens = 0;
                const getToken = () => fetch("/token").then((r) => { window.tokens += 1; return r.text(); });
                window.client = await connect(url, { getToken });
                window.record(window.client);
            }""",
            [broker.url, skew],
        )
        (conn,) = broker.connections
        first_expiry = jwt.decode(issued[0], options={"verify_signature": False})["exp"]
        # Past the first token's expiry (by the real clock) and the next one's.
        await page.wait_for("(exp) => window.realNow() / 1000 > exp + 3.2", first_expiry, seconds=8)
        assert await page.evaluate("() => window.client.connected") is True
        assert broker.connections == {conn}
        assert await page.evaluate("() => window.events.map((e) => e.event)") == []
        # About one refresh per 1.5 s (half of each token's 3 s), not a storm.
        assert 3 <= len(issued) <= 6, len(issued)
        await page.evaluate("() => window.client.close()")


async def test_expiry_without_get_token_closes_with_1008(
    start_broker: BrokerFactory, session: Session, pages: PageServer
) -> None:
    """A fixed token expires: the broker closes with 1008, the page sees it,
    and the client does not reconnect."""
    broker = await start_broker(JWT_CONFIG)
    page = await harness(session, pages)
    await page.evaluate(
        """async ([url, token]) => {
            const { connect } = window.broker;
            window.client = await connect(url, { token });
            await window.client.subscribe("a", window.record(window.client));
        }""",
        [broker.url, make_jwt("bob", 2)],
    )
    events = await page.wait_for(
        "() => window.events.some((e) => e.event === 'closed') && window.events", seconds=6
    )
    assert [e["event"] for e in events] == ["disconnected", "closed"]
    assert events[0]["detail"] == {
        "code": 1008,
        "reason": "authentication expired",
        "reconnecting": False,
    }
    items = await page.evaluate("() => window.items")
    assert items[-1]["type"] == "closed"
    assert items[-1]["error"]["name"] == "Disconnected"
    assert await page.evaluate("() => window.leaks()") == {
        "timers": 0,
        "listeners": [],
        "sockets": 0,
    }


# -- refusals ---------------------------------------------------------------------------


async def test_a_refused_handshake(
    start_broker: BrokerFactory, session: Session, pages: PageServer
) -> None:
    """A 401 at the handshake: a raw WebSocket sees error then close 1006,
    nothing more; the client rejects with a ConnectError that says the
    broker is up and refused (it answers plain HTTP)."""
    broker = await start_broker(TOKENS_CONFIG)
    page = await harness(session, pages)
    raw = await page.evaluate(
        """async (url) => new Promise((resolve) => {
            const seen = [];
            const ws = new WebSocket(url + "?token=wrong");
            ws.onerror = () => seen.push("error");
            ws.onclose = (e) => { seen.push(`close ${e.code} clean=${e.wasClean} reason=${JSON.stringify(e.reason)}`); resolve(seen); };
        })""",
        broker.url,
    )
    assert raw == ["error", 'close 1006 clean=false reason=""']
    refused = await page.evaluate(
        """async ([url, good]) => {
            const { connect } = window.broker;
            const out = {};
            try { await connect(url, { token: "wrong" }); } catch (e) {
                out.refused = { name: e.name, status: e.status, reachable: e.reachable, message: e.message };
            }
            try { await connect("ws://127.0.0.1:9/ws", { connectTimeout: 2 }); } catch (e) {
                out.unreachable = { name: e.name, reachable: e.reachable, message: e.message };
            }
            const client = await connect(url, { token: good });
            out.ok = client.connected;
            await client.close();
            out.leaks = window.leaks();
            return out;
        }""",
        [broker.url, TOKEN],
    )
    assert refused["refused"]["name"] == "ConnectError"
    assert refused["refused"]["status"] is None
    assert refused["refused"]["reachable"] is True
    assert "refused the WebSocket handshake" in refused["refused"]["message"]
    assert refused["unreachable"]["reachable"] is False
    assert "could not reach the broker" in refused["unreachable"]["message"]
    assert refused["ok"] is True
    assert refused["leaks"] == {"timers": 0, "listeners": [], "sockets": 0}
    assert broker.stats.rejected["auth_401"] == 2


async def test_after_a_resync_the_snapshot_comes_again(
    start_broker: BrokerFactory, nursery: trio.Nursery, session: Session, pages: PageServer
) -> None:
    """A subscription with `snapshot` misses keyed updates it cannot get
    back (no history kept, only the snapshot): after the reconnect the page
    gets a resync, then the snapshot with the newest value per key."""
    broker = await start_broker({"history": [{"pattern": "book.*", "size": 0, "snapshot": True}]})
    cable = Cable(broker.port)
    await nursery.start(cable.serve)
    feed = Identity("feed")
    await broker.publish(feed, "book.X", {"qty": 1}, key="a")
    page = await harness(session, pages)
    await page.evaluate(
        """async (url) => {
            const { connect } = window.broker;
            window.client = await connect(url, { reconnect: { initialDelay: 0.05, maxDelay: 0.3 } });
            await window.client.subscribe("book.X", { snapshot: true }, window.record(window.client));
        }""",
        cable.url,
    )
    await page.wait_for("() => window.items.length === 1")
    cable.cut()
    await page.wait_for("() => window.items.some((i) => i.type === 'interrupted')")
    await broker.publish(feed, "book.X", {"qty": 2}, key="a")
    await broker.publish(feed, "book.X", {"qty": 5}, key="b")
    cable.plug()
    items = await page.wait_for(
        "() => window.items.filter((i) => i.snapshot).length === 3 && window.items"
    )
    assert [(i["type"], i.get("key"), i.get("data")) for i in items] == [
        ("message", "a", {"qty": 1}),
        ("interrupted", None, None),
        ("reconnected", None, None),
        ("resync", None, None),
        ("message", "a", {"qty": 2}),
        ("message", "b", {"qty": 5}),
    ]
    assert items[3]["reason"] == "not_recovered"
    await page.evaluate("() => window.client.close()")
