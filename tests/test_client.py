"""broker.client against a real broker: both encodings, plain and TLS.

Every wait is on a reply, a message or broker state, bounded by ``WAIT``.
"""

from __future__ import annotations

import logging
import math
import ssl
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from broker import Broker
from broker.client import (
    BadRequest,
    Client,
    ClientError,
    ConnectError,
    Disconnected,
    Dropped,
    Forbidden,
    Item,
    LimitExceeded,
    Message,
    ServerError,
    Subscription,
    open_client,
)
from broker.core.errors import ErrorCode
from tests.conftest import BrokerFactory
from tests.helpers import ENCODINGS, TOKEN, TOKENS_CONFIG, EncodingName, deny_factory

#: Bound on any single wait: a hang fails fast instead of at pytest-timeout.
WAIT = 10.0


@dataclass
class Endpoint:
    broker: Broker
    ssl_context: ssl.SSLContext | None

    @property
    def url(self) -> str:
        return self.broker.url


@pytest.fixture(params=["ws", "wss"])
async def endpoint(
    request: pytest.FixtureRequest,
    start_broker: BrokerFactory,
    tls_files: dict[str, str],
    client_ssl: ssl.SSLContext,
) -> Endpoint:
    """A broker over plain WebSocket or over TLS (trustme certificates)."""
    if request.param == "wss":
        tls = {"tls_cert": tls_files["tls_cert"], "tls_key": tls_files["tls_key"]}
        broker = await start_broker({"listener": tls})
        assert broker.url.startswith("wss://")
        return Endpoint(broker, client_ssl)
    return Endpoint(await start_broker(), None)


async def receive(subscription: Subscription) -> Item:
    with trio.fail_after(WAIT):
        return await subscription.receive()


# -- publish and subscribe ----------------------------------------------------


@ENCODINGS
async def test_publish_and_receive(endpoint: Endpoint, encoding: EncodingName) -> None:
    async with open_client(
        endpoint.url, encoding=encoding, ssl_context=endpoint.ssl_context
    ) as client:
        assert client.encoding == encoding
        async with client.subscribe("trades.*") as sub:
            assert sub.pattern == "trades.*"
            assert await client.publish("trades.BTC", {"price": 1.5}, key="k") == 1
            assert await client.publish("trades.BTC", [1, "x", None, True]) == 2
            assert await client.publish("trades.ETH", "hi") == 1
            assert await client.publish("other", None) == 1  # not matched
            assert await client.publish("trades.BTC", None) == 3
            received = [await receive(sub) for _ in range(4)]
    assert received == [
        Message("trades.BTC", 1, {"price": 1.5}, "k"),
        Message("trades.BTC", 2, [1, "x", None, True], None),
        Message("trades.ETH", 1, "hi", None),
        Message("trades.BTC", 3, None, None),
    ]


@ENCODINGS
async def test_publisher_and_subscriber_use_different_encodings(
    start_broker: BrokerFactory, encoding: EncodingName
) -> None:
    broker = await start_broker()
    other: EncodingName = "msgpack" if encoding == "json" else "json"
    async with (
        open_client(broker.url, encoding=encoding) as subscriber,
        open_client(broker.url, encoding=other) as publisher,
        subscriber.subscribe("t") as sub,
    ):
        assert await publisher.publish("t", {"nested": [{"a": 1}], "big": 2**63}) == 1
        assert await receive(sub) == Message("t", 1, {"nested": [{"a": 1}], "big": 2**63})


@ENCODINGS
async def test_overlapping_subscriptions_each_get_the_message(
    start_broker: BrokerFactory, encoding: EncodingName
) -> None:
    broker = await start_broker()
    async with (
        open_client(broker.url, encoding=encoding) as client,
        client.subscribe("a.*") as star,
        client.subscribe("a.>") as tail,
    ):
        delivered = broker.hub.delivered
        assert await client.publish("a.b", "both") == 1
        # The broker queued it once for this connection...
        assert broker.hub.delivered == delivered + 1
        # ...and the client handed the same Message to both subscriptions.
        from_star, from_tail = await receive(star), await receive(tail)
        assert from_star == from_tail == Message("a.b", 1, "both")
        assert from_star is from_tail
        await client.publish("a.b.c", "tail only")
        await client.publish("a.x", "both again")
        assert await receive(tail) == Message("a.b.c", 1, "tail only")
        assert await receive(tail) == Message("a.x", 1, "both again")
        assert await receive(star) == Message("a.x", 1, "both again")


async def test_leaving_subscribe_unsubscribes(start_broker: BrokerFactory) -> None:
    broker = await start_broker()
    router = broker.hub.router
    async with open_client(broker.url) as client:
        async with client.subscribe("a.*") as sub:
            assert len(router.match("a.b")) == 1
        assert router.match("a.b") == ()
        assert router.pattern_count == 0
        with pytest.raises(trio.ClosedResourceError):
            await sub.receive()
        # Nothing published on a.b meanwhile reaches a later subscription.
        await client.publish("a.b", "unseen")
        async with client.subscribe("x") as later:
            await client.publish("x", "seen")
            assert await receive(later) == Message("x", 1, "seen")


async def test_same_pattern_twice_unsubscribes_when_the_last_leaves(
    start_broker: BrokerFactory,
) -> None:
    broker = await start_broker()
    router = broker.hub.router
    async with open_client(broker.url) as client, client.subscribe("p") as outer:
        async with client.subscribe("p") as inner:
            await client.publish("p", 1)
            assert await receive(inner) == Message("p", 1, 1)
        assert len(router.match("p")) == 1  # the outer block still holds it
        await client.publish("p", 2)
        assert await receive(outer) == Message("p", 1, 1)
        assert await receive(outer) == Message("p", 2, 2)
    assert router.pattern_count == 0


async def test_concurrent_requests_get_their_own_answers(start_broker: BrokerFactory) -> None:
    broker = await start_broker()
    seqs: list[int | None] = []

    async def publish(client: Client) -> None:
        seqs.append(await client.publish("t", "x"))

    async with open_client(broker.url) as client:
        with trio.fail_after(WAIT):
            async with trio.open_nursery() as nursery:
                for _ in range(50):
                    nursery.start_soon(publish, client)
                    nursery.start_soon(client.ping)
    assert sorted(s for s in seqs if s is not None) == list(range(1, 51))


async def test_ping_returns_round_trip_seconds(start_broker: BrokerFactory) -> None:
    broker = await start_broker()
    async with open_client(broker.url) as client:
        with trio.fail_after(WAIT):
            rtt = await client.ping()
    assert isinstance(rtt, float)
    assert 0 < rtt < WAIT


async def test_slow_subscription_gets_dropped_notice(start_broker: BrokerFactory) -> None:
    # A subscription that is not read fills up; the reader then waits, TCP
    # pushes back, and the broker's drop-oldest queue reports what it dropped.
    broker = await start_broker({"queue": {"max_messages": 4}})
    payload = "x" * 60_000
    async with (
        open_client(broker.url, queue_size=1) as subscriber,
        open_client(broker.url) as publisher,
        subscriber.subscribe("big.*") as sub,
    ):
        (conn,) = [c for c in broker.connections if c.subscriptions == {"big.*"}]
        published = 0
        with trio.fail_after(WAIT):
            while not conn.outbox.dropped_total:
                published = await publisher.publish("big.data", payload) or 0
                assert published < 5000, "the broker never dropped anything"
        received = dropped = 0
        while received + dropped < published:
            item = await receive(sub)
            if isinstance(item, Dropped):
                assert item.topic == "big.data"
                dropped += item.count
            else:
                assert isinstance(item, Message)
                assert item.topic == "big.data"
                assert item.data == payload
                received += 1
        assert dropped == conn.outbox.dropped_total > 0
        assert received + dropped == published


@pytest.mark.parametrize("replay", ["history", "snapshot"])
async def test_a_replay_larger_than_the_queue_is_reported_to_its_subscription(
    start_broker: BrokerFactory, replay: str
) -> None:
    # The replay (50 stored messages, or a snapshot of 50 keys) does not fit
    # the connection's queue (10): the broker drops the oldest 40 and, as
    # notices go ahead of queued frames, writes the notice before the ok.
    # The subscription still gets it, first, then the 10 newest.
    rule: dict[str, object] = {"pattern": "t.>", "size": 100}
    if replay == "snapshot":
        rule = {"pattern": "t.>", "size": 0, "snapshot": True}
    broker = await start_broker({"queue": {"max_messages": 10}, "history": [rule]})
    async with open_client(broker.url) as client:
        for n in range(1, 51):
            await client.publish("t.x", n, key=f"k{n}")
        history = 50 if replay == "history" else None
        async with client.subscribe("t.x", history=history, snapshot=history is None) as sub:
            assert await receive(sub) == Dropped("t.x", 40)
            for n in range(41, 51):
                item = await receive(sub)
                assert isinstance(item, Message) and item.data == n
                assert item.snapshot is (replay == "snapshot")


# -- errors --------------------------------------------------------------------


@ENCODINGS
async def test_publish_to_invalid_topic_is_bad_request(
    start_broker: BrokerFactory, encoding: EncodingName
) -> None:
    broker = await start_broker()
    async with open_client(broker.url, encoding=encoding) as client:
        for topic in ("a..b", "", "a b", "x" * 300):
            with pytest.raises(BadRequest) as info:
                await client.publish(topic, 1)
            assert info.value.code == "bad_request"
        with pytest.raises(BadRequest, match="wildcards are only allowed in subscriptions"):
            await client.publish("a.*", 1)
        with pytest.raises(BadRequest, match="wildcards"):
            await client.publish("a.>", 1)
        # The connection is still usable.
        assert await client.publish("a.b", 1) == 1


async def test_subscribe_to_invalid_pattern_is_bad_request(start_broker: BrokerFactory) -> None:
    broker = await start_broker()
    async with open_client(broker.url) as client:
        for pattern in ("a.>.b", "a*", ""):
            with pytest.raises(BadRequest):
                async with client.subscribe(pattern):
                    pytest.fail("subscribed to an invalid pattern")
        assert broker.hub.router.pattern_count == 0


async def test_unencodable_data_raises_locally(start_broker: BrokerFactory) -> None:
    broker = await start_broker()
    async with open_client(broker.url) as client:
        with pytest.raises(ValueError, match="not JSON compliant"):
            await client.publish("t", math.nan)
        with pytest.raises(TypeError):
            await client.publish("t", {1, 2})
        assert await client.publish("t", 1) == 1


@ENCODINGS
async def test_denied_by_plugin_is_forbidden(
    start_broker: BrokerFactory, encoding: EncodingName
) -> None:
    broker = await start_broker(
        {"plugins": {"enabled": ["deny", "noauth"]}}, factories={"deny": deny_factory}
    )
    async with open_client(broker.url, encoding=encoding) as client:
        with pytest.raises(Forbidden) as info:
            await client.publish("secret.plans", "x")
        assert info.value.code == "forbidden"
        assert "secret.plans" in info.value.message
        with pytest.raises(Forbidden):
            async with client.subscribe("secret.*"):
                pytest.fail("subscribed to a forbidden pattern")
        assert broker.hub.router.pattern_count == 0
        assert await client.publish("public", "x") == 1


async def test_too_many_subscriptions_is_limit_exceeded(start_broker: BrokerFactory) -> None:
    broker = await start_broker({"limits": {"max_subscriptions": 2}})
    async with (
        open_client(broker.url) as client,
        client.subscribe("a"),
        client.subscribe("b"),
    ):
        with pytest.raises(LimitExceeded) as info:
            async with client.subscribe("c"):
                pytest.fail("subscribed beyond the limit")
        assert info.value.code == "limit"
        assert isinstance(info.value, ServerError)
        assert isinstance(info.value, ClientError)


async def test_unacknowledged_publish_errors_are_logged_and_kept(
    start_broker: BrokerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    broker = await start_broker(
        {"plugins": {"enabled": ["deny", "noauth"]}}, factories={"deny": deny_factory}
    )
    caplog.set_level(logging.WARNING, logger="broker.client")
    async with open_client(broker.url) as client:
        assert await client.publish("a..b", 1, ack=False) is None
        assert await client.publish("secret.x", 1, ack=False) is None
        assert await client.publish("fine", 1, ack=False) is None
        # Replies come in order: once the pong is here, so are the errors.
        with trio.fail_after(WAIT):
            await client.ping()
        errors = list(client.errors)
    assert [type(e) for e in errors] == [BadRequest, Forbidden]
    assert errors[1].message == "not allowed to publish to secret.x"
    warnings = [r for r in caplog.records if r.name == "broker.client"]
    assert [r.levelno for r in warnings] == [logging.WARNING, logging.WARNING]
    assert "forbidden: not allowed to publish to secret.x" in warnings[1].getMessage()


# -- connecting ----------------------------------------------------------------


async def test_bad_token_is_rejected_with_401(start_broker: BrokerFactory) -> None:
    broker = await start_broker(TOKENS_CONFIG)
    with pytest.raises(ConnectError) as info:
        async with open_client(broker.url, token="wrong-token-0123456789"):
            pytest.fail("connected with a bad token")
    assert info.value.status == 401
    assert info.value.reason == "invalid token"


@ENCODINGS
async def test_good_token_connects(start_broker: BrokerFactory, encoding: EncodingName) -> None:
    broker = await start_broker(TOKENS_CONFIG)
    async with open_client(broker.url, token=TOKEN, encoding=encoding) as client:
        assert await client.publish("t", "hello") == 1
        (conn,) = broker.connections
        assert conn.identity.subject == "alice"


async def test_wrong_path_is_rejected_with_404(start_broker: BrokerFactory) -> None:
    broker = await start_broker()
    url = broker.url.replace("/ws", "/nope")
    with pytest.raises(ConnectError) as info:
        async with open_client(url):
            pytest.fail("connected to a wrong path")
    assert info.value.status == 404
    assert "/nope" in info.value.reason


async def test_nothing_listening_is_connect_error() -> None:
    # A port that was just free: bind, note it, close.
    sock = trio.socket.socket()
    await sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    with trio.fail_after(WAIT), pytest.raises(ConnectError) as info:
        async with open_client(f"ws://127.0.0.1:{port}/ws"):
            pytest.fail("connected to a closed port")
    assert info.value.status is None
    assert "refused" in info.value.reason.lower()


async def test_untrusted_certificate_is_connect_error(
    start_broker: BrokerFactory, tls_files: dict[str, str]
) -> None:
    tls = {"tls_cert": tls_files["tls_cert"], "tls_key": tls_files["tls_key"]}
    broker = await start_broker({"listener": tls})
    # trio-websocket 0.12 reports the failed TLS handshake only as a timeout
    # (python-trio/trio-websocket#199), hence the short connect_timeout.
    with trio.fail_after(WAIT), pytest.raises(ConnectError) as info:
        async with open_client(
            broker.url, ssl_context=ssl.create_default_context(), connect_timeout=0.5
        ):
            pytest.fail("trusted a certificate from an unknown CA")
    assert info.value.status is None


async def test_invalid_arguments_raise_value_error() -> None:
    with pytest.raises(ValueError, match="ws:"):
        async with open_client("http://127.0.0.1:1/ws"):
            pass
    with pytest.raises(ValueError, match="token"):
        async with open_client("ws://127.0.0.1:1/ws", token="has space"):
            pass


async def test_exception_in_block_is_not_wrapped(start_broker: BrokerFactory) -> None:
    broker = await start_broker()
    with pytest.raises(KeyError, match="boom"):
        async with open_client(broker.url) as client, client.subscribe("t"):
            raise KeyError("boom")
    assert broker.hub.router.pattern_count == 0


async def test_cancelled_block_exits_cleanly(start_broker: BrokerFactory) -> None:
    broker = await start_broker()
    with trio.CancelScope() as scope:
        async with open_client(broker.url) as client, client.subscribe("t"):
            assert broker.hub.router.pattern_count == 1
            scope.cancel()
            await trio.sleep_forever()
    assert scope.cancelled_caught  # Cancelled came through, not an exception group
    assert client.closed
    # The broker notices the closed connection (or the unsub) on its own time.
    with trio.fail_after(WAIT):
        # Polling the broker's state, which has no event to wait on.
        while broker.hub.router.pattern_count or broker.connections:  # noqa: ASYNC110
            await trio.sleep(0.01)


# -- disconnection ---------------------------------------------------------------


@ENCODINGS
async def test_broker_shutdown_raises_disconnected_1001(
    endpoint: Endpoint, encoding: EncodingName
) -> None:
    # Without reconnect; with it, see test_client_reconnect.py.
    async with open_client(
        endpoint.url, encoding=encoding, ssl_context=endpoint.ssl_context, reconnect=False
    ) as client:
        async with client.subscribe("t") as sub:
            endpoint.broker.stop()
            with trio.fail_after(WAIT), pytest.raises(Disconnected) as info:
                await anext(sub)  # the iterator raises, it does not just stop
            assert info.value.code == 1001
            assert info.value.reason == "server shutting down"
        assert client.closed
        with pytest.raises(Disconnected) as again:
            await client.publish("t", 1)
        assert again.value.code == 1001
        with pytest.raises(Disconnected):
            async with client.subscribe("u"):
                pass


async def test_aclose_delivers_buffered_items_then_disconnected(
    start_broker: BrokerFactory,
) -> None:
    broker = await start_broker()
    async with open_client(broker.url) as client, client.subscribe("t") as sub:
        await client.publish("t", 1)
        await client.publish("t", 2)  # acknowledged after the message was sent to us
        await client.aclose()
        await client.aclose()  # idempotent
        assert await receive(sub) == Message("t", 1, 1)
        assert await receive(sub) == Message("t", 2, 2)
        with pytest.raises(Disconnected) as info:
            await receive(sub)
        assert info.value.code == 1000
        with pytest.raises(Disconnected):
            await client.ping()


@pytest.mark.parametrize("code", list(ErrorCode))
def test_every_error_code_has_its_exception_in_both_clients(code: ErrorCode) -> None:
    """A new err code reaches the Python client and the JavaScript one."""
    from broker.client.errors import ServerError, server_error

    error = server_error(code.value, "m")
    assert type(error) is not ServerError and isinstance(error, ServerError)
    script = (Path(__file__).parent.parent / "broker" / "web" / "client.js").read_text()
    table = script.split("const SERVER_ERRORS = {", 1)[1].split("};", 1)[0]
    assert f"  {code.value}: " in table
