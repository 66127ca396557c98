"""The opening handshake: authentication plugins, hooks, limits, timeouts, TLS.

Test plugins are registered through ``factories=`` exactly as an entry point
would be, and record what the broker passes them.
"""

from __future__ import annotations

import hashlib
import ssl
from collections.abc import Mapping
from typing import Any

import pytest
import trio
import trio_websocket
from wsproto.events import Ping

from broker import (
    ANONYMOUS,
    Action,
    Broker,
    ClientInfo,
    ConfigError,
    Handshake,
    Identity,
    Reject,
    config_from_dict,
    hookimpl,
)
from broker.plugin.host import PluginContext, PluginFactory
from tests.conftest import BrokerFactory
from tests.helpers import (
    MSGPACK,
    WAIT,
    connect,
    raw_connect,
    rejection,
    wait_until,
)

TOKEN = "correct-horse-battery-staple"
TOKENS_CONFIG: dict[str, Any] = {
    "plugins": {"enabled": ["tokens"]},
    "plugin": {"tokens": {"tokens": [{"id": "svc", "token": TOKEN, "roles": ["r"]}]}},
}


def factory(plugin: object) -> Mapping[str, PluginFactory]:
    """Register *plugin* as ``test`` (called by the broker like an entry point)."""

    def create(settings: Mapping[str, Any], context: PluginContext) -> object:
        return plugin

    return {"test": create}


def with_test_plugin(extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    return {"plugins": {"enabled": ["noauth", "test"]}, **(extra or {})}


# -- authentication ---------------------------------------------------------------


async def test_noauth_on_loopback_is_anonymous(start_broker: BrokerFactory) -> None:
    seen: list[ClientInfo] = []

    class Observer:
        @hookimpl
        def broker_connected(self, client: ClientInfo) -> None:
            seen.append(client)

    broker = await start_broker(with_test_plugin(), factories=factory(Observer()))
    async with connect(broker.url) as c:
        await c.assert_alive()
    assert seen[0].identity == ANONYMOUS
    assert seen[0].identity.plugin == "noauth"


async def test_noauth_rejects_on_a_non_loopback_listener(start_broker: BrokerFactory) -> None:
    # 0.0.0.0 (with allow_insecure) is not loopback, though we reach it over 127.0.0.1.
    broker = await start_broker({"listener": {"host": "0.0.0.0", "allow_insecure": True}})
    url = f"ws://127.0.0.1:{broker.port}/ws"
    e = await rejection(url)
    assert e.status_code == 403
    assert e.body is not None and b"loopback" in e.body


@pytest.mark.parametrize("how", ["header", "query", "lowercase-scheme"])
async def test_tokens_plugin_accepts_the_token(start_broker: BrokerFactory, how: str) -> None:
    broker = await start_broker(TOKENS_CONFIG)
    url, headers = broker.url, [(b"Authorization", f"Bearer {TOKEN}".encode())]
    if how == "query":
        url, headers = f"{broker.url}?token={TOKEN}", []
    elif how == "lowercase-scheme":
        headers = [(b"authorization", f"bearer {TOKEN}".encode())]
    async with connect(url, headers=headers) as c:
        await c.assert_alive()
    assert broker.stats.accepted == 1


async def test_tokens_identity_reaches_hooks(start_broker: BrokerFactory) -> None:
    seen: list[Identity] = []

    class Observer:
        @hookimpl
        def broker_connected(self, client: ClientInfo) -> None:
            seen.append(client.identity)

    config = {
        "plugins": {"enabled": ["tokens", "test"]},
        "plugin": TOKENS_CONFIG["plugin"],
    }
    broker = await start_broker(config, factories=factory(Observer()))
    async with connect(broker.url, headers=[(b"Authorization", f"Bearer {TOKEN}".encode())]):
        pass
    assert seen == [Identity("svc", frozenset({"r"}), plugin="tokens")]


async def test_wrong_token_is_401_with_reason(start_broker: BrokerFactory) -> None:
    broker = await start_broker(TOKENS_CONFIG)
    e = await rejection(broker.url, headers=[(b"Authorization", b"Bearer wrong-token-123456")])
    assert e.status_code == 401
    assert e.body == b"invalid token\n"
    e = await rejection(f"{broker.url}?token=nope")
    assert e.status_code == 401
    assert e.body == b"invalid token\n"
    assert broker.stats.rejected["auth_401"] == 2


async def test_no_token_with_only_tokens_enabled_is_401(start_broker: BrokerFactory) -> None:
    broker = await start_broker(TOKENS_CONFIG)
    e = await rejection(broker.url)
    assert e.status_code == 401
    assert e.body is not None and b"credentials" in e.body
    # A non-bearer Authorization header carries no token either.
    e = await rejection(broker.url, headers=[(b"Authorization", b"Basic dXNlcjpwYXNz")])
    assert e.status_code == 401


async def test_no_token_falls_through_to_noauth(start_broker: BrokerFactory) -> None:
    config = {**TOKENS_CONFIG, "plugins": {"enabled": ["noauth", "tokens"]}}
    broker = await start_broker(config)
    async with connect(broker.url) as c:
        await c.assert_alive()
    # ...but a wrong token is not "no token".
    e = await rejection(f"{broker.url}?token=wrong")
    assert e.status_code == 401


async def test_sha256_configured_token(start_broker: BrokerFactory) -> None:
    digest = hashlib.sha256(b"a-secret-kept-out-of-the-config").hexdigest()
    config = {
        "plugins": {"enabled": ["tokens"]},
        "plugin": {"tokens": {"tokens": [{"id": "hashed", "sha256": digest.upper()}]}},
    }
    broker = await start_broker(config)
    headers = [(b"Authorization", b"Bearer a-secret-kept-out-of-the-config")]
    async with connect(broker.url, headers=headers) as c:
        await c.assert_alive()
    # The digest itself is not a token.
    e = await rejection(broker.url, headers=[(b"Authorization", f"Bearer {digest}".encode())])
    assert e.status_code == 401


async def test_authenticate_that_raises_is_403_and_broker_keeps_serving(
    start_broker: BrokerFactory,
) -> None:
    class Broken:
        @hookimpl
        def broker_authenticate(self, handshake: Handshake) -> Identity | None:
            if "boom" in handshake.query:
                raise RuntimeError("plugin bug")
            return None

    broker = await start_broker(with_test_plugin(), factories=factory(Broken()))
    async with connect(broker.url) as survivor:
        e = await rejection(broker.url + "?boom=1")
        assert e.status_code == 403
        assert e.body == b"authentication error\n"
        await survivor.assert_alive()
        async with connect(broker.url) as newcomer:
            await newcomer.assert_alive()


async def test_authenticate_returning_garbage_is_403(start_broker: BrokerFactory) -> None:
    class Garbage:
        @hookimpl
        def broker_authenticate(self, handshake: Handshake) -> object:
            return "yes please"

    broker = await start_broker(with_test_plugin(), factories=factory(Garbage()))
    assert (await rejection(broker.url)).status_code == 403


async def test_authenticate_reject_status_and_reason(start_broker: BrokerFactory) -> None:
    class Picky:
        @hookimpl
        def broker_authenticate(self, handshake: Handshake) -> Reject:
            return Reject(451, "not here")

    broker = await start_broker(with_test_plugin(), factories=factory(Picky()))
    e = await rejection(broker.url)
    assert e.status_code == 451
    assert e.body == b"not here\n"


async def test_async_authenticate_returning_identity(start_broker: BrokerFactory) -> None:
    seen: list[Identity] = []

    class AsyncAuth:
        @hookimpl
        async def broker_authenticate(self, handshake: Handshake) -> Identity:
            await trio.lowlevel.checkpoint()
            return Identity("alice", frozenset({"admin"}))

        @hookimpl
        def broker_connected(self, client: ClientInfo) -> None:
            seen.append(client.identity)

    broker = await start_broker(with_test_plugin(), factories=factory(AsyncAuth()))
    async with connect(broker.url) as c:
        await c.assert_alive()
    # The plugin name is filled in for it; noauth (trylast) was never asked.
    assert seen == [Identity("alice", frozenset({"admin"}), plugin="test")]


async def test_authenticate_past_auth_timeout_is_503(start_broker: BrokerFactory) -> None:
    class Slow:
        @hookimpl
        async def broker_authenticate(self, handshake: Handshake) -> Identity:
            await trio.sleep_forever()
            raise AssertionError("unreachable")

    broker = await start_broker(
        with_test_plugin({"limits": {"auth_timeout": 0.2}}), factories=factory(Slow())
    )
    with trio.fail_after(2):
        e = await rejection(broker.url)
    assert e.status_code == 503
    assert e.body is not None and b"timed out" in e.body


async def test_handshake_seen_by_authenticate(
    start_broker: BrokerFactory, tls_files: dict[str, str], client_ssl: ssl.SSLContext
) -> None:
    seen: list[Handshake] = []

    class Recorder:
        @hookimpl(tryfirst=True)
        def broker_authenticate(self, handshake: Handshake) -> None:
            seen.append(handshake)

    plain = await start_broker(with_test_plugin(), factories=factory(Recorder()))
    url = plain.url + "?token=abc&x=1&x=2"
    headers = [(b"X-Custom", b"One"), (b"X-Custom", b"Two"), (b"User-Agent", b"test-agent")]
    async with connect(url, MSGPACK, headers=headers) as c:
        local = c.ws.local
        await c.assert_alive()
    hs = seen[0]
    assert hs.path == "/ws"
    assert hs.query == {"token": ("abc",), "x": ("1", "2")}
    assert all(name == name.lower() for name in hs.headers)
    assert hs.headers["x-custom"] == "One, Two"
    assert hs.headers["user-agent"] == "test-agent"
    assert hs.peer == ("127.0.0.1", local.port)  # type: ignore[union-attr]
    assert hs.listener_host == "127.0.0.1"
    assert hs.listener_loopback is True
    assert hs.tls is False
    assert hs.peer_certificate is None
    assert hs.subprotocol == MSGPACK
    assert hs.bearer_token() == "abc"

    tls_config = with_test_plugin(
        {"listener": {"tls_cert": tls_files["tls_cert"], "tls_key": tls_files["tls_key"]}}
    )
    secure = await start_broker(tls_config, factories=factory(Recorder()))
    async with connect(secure.url, None, ssl_context=client_ssl) as c:
        await c.assert_alive()
    hs = seen[1]
    assert hs.tls is True
    assert hs.subprotocol is None
    assert hs.listener_loopback is True


# -- authorization and validation ------------------------------------------------


async def test_authorize_that_raises_fails_closed(start_broker: BrokerFactory) -> None:
    class Broken:
        @hookimpl
        def broker_authorize(self, identity: Identity, action: Action, topic: str) -> bool:
            if topic.startswith("secret"):
                raise RuntimeError("plugin bug")
            return True

    broker = await start_broker(with_test_plugin(), factories=factory(Broken()))
    async with connect(broker.url) as c:
        reply = await c.request({"op": "sub", "id": 1, "topic": "secret.>"})
        assert reply["op"] == "err" and reply["id"] == 1 and reply["code"] == "forbidden"
        reply = await c.request({"op": "pub", "id": 2, "topic": "secret.x", "data": 1})
        assert reply["op"] == "err" and reply["id"] == 2 and reply["code"] == "forbidden"
        await c.assert_alive()
        await c.sub("public")
    assert broker.stats.forbidden == 2
    assert broker.hub.published == 0


async def test_authorization_default_deny(start_broker: BrokerFactory) -> None:
    broker = await start_broker({"authorization": {"default": "deny"}})
    async with connect(broker.url) as c:
        reply = await c.request({"op": "sub", "id": 1, "topic": "a"})
        assert reply == {
            "op": "err",
            "id": 1,
            "code": "forbidden",
            "message": "not allowed to subscribe to a",
        }
        reply = await c.request({"op": "pub", "id": 2, "topic": "a", "data": 1})
        assert reply["code"] == "forbidden"
        # A pub without id is refused out loud too.
        await c.send({"op": "pub", "topic": "a", "data": 1})
        reply = await c.recv()
        assert reply["code"] == "forbidden" and "id" not in reply
        await c.assert_alive()
    assert broker.hub.router.pattern_count == 0


async def test_authorize_sees_identity_action_and_topic(start_broker: BrokerFactory) -> None:
    calls: list[tuple[str, Action, str]] = []

    class Rules:
        @hookimpl
        def broker_authorize(self, identity: Identity, action: Action, topic: str) -> bool | None:
            calls.append((identity.subject, action, topic))
            if topic.startswith("ro.") and action is Action.PUBLISH:
                return False
            return None  # no opinion: [authorization] default (allow)

    broker = await start_broker(with_test_plugin(), factories=factory(Rules()))
    async with connect(broker.url) as c:
        await c.sub("ro.*")
        for i in range(3):
            reply = await c.request({"op": "pub", "id": i, "topic": "ro.x", "data": 1})
            assert reply["code"] == "forbidden"
        await c.pub("rw.x", 1)
        await c.pub("rw.x", 2)
    # Publish decisions are cached per connection and topic.
    assert calls == [
        ("anonymous", Action.SUBSCRIBE, "ro.*"),
        ("anonymous", Action.PUBLISH, "ro.x"),
        ("anonymous", Action.PUBLISH, "rw.x"),
    ]


async def test_validate_reason_is_err_invalid(start_broker: BrokerFactory) -> None:
    class Schema:
        @hookimpl
        def broker_validate(self, identity: Identity, topic: str, data: Any) -> str | None:
            if not isinstance(data, dict) or "price" not in data:
                return "price is required"
            return None

    broker = await start_broker(with_test_plugin(), factories=factory(Schema()))
    async with connect(broker.url) as sub, connect(broker.url) as pub:
        await sub.sub("t")
        reply = await pub.request({"op": "pub", "id": 1, "topic": "t", "data": {"x": 1}})
        assert reply == {"op": "err", "id": 1, "code": "invalid", "message": "price is required"}
        await pub.pub("t", {"price": 1})
        assert (await sub.recv())["data"] == {"price": 1}
        await sub.assert_alive()  # the invalid one was never delivered
    assert broker.stats.invalid == 1


async def test_validate_that_raises_is_err_internal(start_broker: BrokerFactory) -> None:
    class Broken:
        @hookimpl
        async def broker_validate(self, identity: Identity, topic: str, data: Any) -> None:
            raise RuntimeError("plugin bug")

    broker = await start_broker(with_test_plugin(), factories=factory(Broken()))
    async with connect(broker.url) as c:
        reply = await c.request({"op": "pub", "id": 1, "topic": "t", "data": 1})
        assert reply == {"op": "err", "id": 1, "code": "internal", "message": "validation failed"}
        await c.assert_alive()
    assert broker.hub.published == 0


# -- observer hooks ---------------------------------------------------------------------


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.disconnected = trio.Event()

    @hookimpl
    def broker_connected(self, client: ClientInfo) -> None:
        self.calls.append(("connected", client))

    @hookimpl
    def broker_subscribed(self, client: ClientInfo, pattern: str) -> None:
        self.calls.append(("subscribed", client.id, pattern))

    @hookimpl
    async def broker_unsubscribed(self, client: ClientInfo, pattern: str) -> None:
        await trio.lowlevel.checkpoint()
        self.calls.append(("unsubscribed", client.id, pattern))

    @hookimpl
    def broker_published(
        self, identity: Identity, topic: str, seq: int, data: Any, key: str | None
    ) -> None:
        self.calls.append(("published", identity.subject, topic, seq, data, key))

    @hookimpl
    def broker_disconnected(self, client: ClientInfo, code: int, reason: str) -> None:
        self.calls.append(("disconnected", client.id, code, reason))
        self.disconnected.set()


async def test_observer_hooks_are_called_with_the_right_arguments(
    start_broker: BrokerFactory,
) -> None:
    rec = Recorder()
    broker = await start_broker(with_test_plugin(), factories=factory(rec))
    async with connect(broker.url, MSGPACK) as c:
        local = c.ws.local
        await c.sub("a.*")
        await c.sub("a.*")  # idempotent: no second notification
        assert await c.request({"op": "unsub", "id": 1, "topic": "a.*"}) == {"op": "ok", "id": 1}
        await c.pub("a.b", {"v": 1}, key="k")
        await c.send({"op": "pub", "topic": "a.b", "data": None})
        await c.assert_alive()  # every earlier command (and its hooks) is done
        await c.sub("keep")
        await c.ws.aclose(4000, "bye")
    with trio.fail_after(WAIT):
        await rec.disconnected.wait()
    kind, client = rec.calls[0]
    assert kind == "connected"
    assert isinstance(client, ClientInfo)
    assert client.identity == ANONYMOUS
    assert client.peer == ("127.0.0.1", local.port)  # type: ignore[union-attr]
    assert client.encoding == "msgpack"
    assert client.id.startswith("c")
    assert rec.calls[1:] == [
        ("subscribed", client.id, "a.*"),
        ("unsubscribed", client.id, "a.*"),
        ("published", "anonymous", "a.b", 1, {"v": 1}, "k"),
        ("published", "anonymous", "a.b", 2, None, None),
        ("subscribed", client.id, "keep"),
        # Not unsubscribed for "keep": a leaving client's subscriptions are not reported.
        ("disconnected", client.id, 4000, "bye"),
    ]
    await wait_until(lambda: not broker.connections)
    assert broker.hub.router.pattern_count == 0


async def test_disconnected_reports_a_broker_side_close(start_broker: BrokerFactory) -> None:
    rec = Recorder()
    broker = await start_broker(with_test_plugin(), factories=factory(rec))
    async with connect(broker.url) as c:
        await c.ws.send_message(b"binary on json")
        assert (await c.expect_close()).code == 1003
    with trio.fail_after(WAIT):
        await rec.disconnected.wait()
    assert rec.calls[-1][2:] == (1003, "binary frame on the JSON subprotocol")


async def test_disconnected_reports_1006_for_a_client_that_vanishes(
    start_broker: BrokerFactory,
) -> None:
    rec = Recorder()
    broker = await start_broker(with_test_plugin(), factories=factory(rec))
    async with raw_connect(broker.url) as raw:
        await raw.send({"op": "ping", "id": 1})
        assert await raw.recv() == {"op": "pong", "id": 1}
    # The TCP connection is gone without a closing handshake.
    with trio.fail_after(WAIT):
        await rec.disconnected.wait()
    assert rec.calls[-1][2] == 1006


async def test_raising_observers_do_not_disturb_delivery(start_broker: BrokerFactory) -> None:
    calls: list[str] = []

    class Raiser:
        def _boom(self, name: str) -> None:
            calls.append(name)
            raise RuntimeError(f"{name} failed")

        @hookimpl
        def broker_connected(self, client: ClientInfo) -> None:
            self._boom("connected")

        @hookimpl
        def broker_subscribed(self, client: ClientInfo, pattern: str) -> None:
            self._boom("subscribed")

        @hookimpl
        async def broker_unsubscribed(self, client: ClientInfo, pattern: str) -> None:
            self._boom("unsubscribed")

        @hookimpl
        def broker_published(self, topic: str) -> None:
            self._boom("published")

        @hookimpl
        def broker_disconnected(self, code: int) -> None:
            self._boom("disconnected")

    broker = await start_broker(with_test_plugin(), factories=factory(Raiser()))
    async with connect(broker.url) as sub, connect(broker.url, MSGPACK) as pub:
        await sub.sub("o")
        await sub.sub("other")
        assert await sub.request({"op": "unsub", "id": 1, "topic": "other"}) == {
            "op": "ok",
            "id": 1,
        }
        for i in range(3):
            assert await pub.pub("o", i) == i + 1
            assert await sub.recv() == {"op": "msg", "topic": "o", "seq": i + 1, "data": i}
        await sub.assert_alive()
        await pub.assert_alive()
    await wait_until(lambda: calls.count("disconnected") == 2)
    assert sorted(set(calls)) == [
        "connected",
        "disconnected",
        "published",
        "subscribed",
        "unsubscribed",
    ]


# -- connection limits and timeouts -------------------------------------------------------


async def test_max_connections(start_broker: BrokerFactory) -> None:
    broker = await start_broker({"limits": {"max_connections": 2}})
    async with connect(broker.url) as a, connect(broker.url) as b:
        e = await rejection(broker.url)
        assert e.status_code == 503
        assert e.body == b"too many connections\n"
        await a.assert_alive()
        await b.assert_alive()
    assert broker.stats.rejected["max_connections"] == 1


async def test_max_connections_per_ip(start_broker: BrokerFactory) -> None:
    broker = await start_broker({"limits": {"max_connections_per_ip": 1}})
    async with connect(broker.url) as a:
        e = await rejection(broker.url)
        assert e.status_code == 429
        assert e.body is not None and b"address" in e.body
        await a.assert_alive()
    # The slot is given back once the first client has gone.
    await connect_when_the_slot_is_free(broker, WAIT)


async def test_handshake_timeout_closes_a_silent_socket(start_broker: BrokerFactory) -> None:
    broker = await start_broker({"limits": {"handshake_timeout": 0.3}})
    stream = await trio.open_tcp_stream("127.0.0.1", broker.port)
    async with stream:
        start = trio.current_time()
        with trio.fail_after(1.5):
            assert await stream.receive_some(100) == b""
        assert trio.current_time() - start >= 0.25
    assert broker.stats.rejected["handshake_timeout"] == 1


async def test_handshake_timeout_covers_a_partial_request(start_broker: BrokerFactory) -> None:
    broker = await start_broker({"limits": {"handshake_timeout": 0.3}})
    stream = await trio.open_tcp_stream("127.0.0.1", broker.port)
    async with stream:
        # Trickle half a request: it never completes.
        await stream.send_all(b"GET /ws HTTP/1.1\r\nHost: x\r\n")
        with trio.fail_after(1.5):
            assert await stream.receive_some(100) == b""
    async with connect(broker.url) as c:
        await c.assert_alive()


async def connect_when_the_slot_is_free(broker: Broker, seconds: float) -> None:
    """Connect, retrying while the broker still answers 429 (bounded)."""
    with trio.fail_after(seconds):
        while True:
            try:
                async with connect(broker.url) as c:
                    await c.assert_alive()
                    return
            except trio_websocket.ConnectionRejected as e:
                status = e.status_code
            assert status == 429
            await trio.sleep(0.01)


async def test_socket_closed_before_the_handshake_is_freed_by_handshake_timeout(
    start_broker: BrokerFactory,
) -> None:
    broker = await start_broker({"limits": {"max_connections_per_ip": 1, "handshake_timeout": 0.3}})
    stream = await trio.open_tcp_stream("127.0.0.1", broker.port)
    await stream.aclose()
    await connect_when_the_slot_is_free(broker, 2)


async def test_socket_closed_before_the_handshake_frees_its_slot(
    start_broker: BrokerFactory,
) -> None:
    # E.g. a load balancer's TCP health check, or a port scan.
    broker = await start_broker({"limits": {"max_connections_per_ip": 1, "handshake_timeout": 3}})
    stream = await trio.open_tcp_stream("127.0.0.1", broker.port)
    await stream.aclose()
    await connect_when_the_slot_is_free(broker, 1)


async def test_ping_keeps_a_reading_client_connected(start_broker: BrokerFactory) -> None:
    broker = await start_broker({"limits": {"ping_interval": 0.2, "ping_timeout": 0.2}})
    async with connect(broker.url) as c:
        await c.sub("t")
        (conn,) = broker.connections
        # trio-websocket answers the pings while get_message() waits; several
        # intervals pass with nothing else on the wire.
        with trio.move_on_after(0.65):
            await c.ws.get_message()
            raise AssertionError("no message expected")
        await c.assert_alive()
        assert conn in broker.connections
        assert conn.close_code is None


async def test_ping_pong_seen_on_the_wire(start_broker: BrokerFactory) -> None:
    broker = await start_broker({"limits": {"ping_interval": 0.1, "ping_timeout": 0.2}})
    async with raw_connect(broker.url) as raw:
        pings = 0
        with trio.fail_after(WAIT):
            while pings < 3:
                if isinstance(await raw.next_event(answer_pings=True), Ping):
                    pings += 1
        await raw.send({"op": "ping", "id": 1})
        assert await raw.recv() == {"op": "pong", "id": 1}


async def test_client_that_never_answers_pings_is_dropped(start_broker: BrokerFactory) -> None:
    broker = await start_broker({"limits": {"ping_interval": 0.1, "ping_timeout": 0.2}})
    async with raw_connect(broker.url) as raw:
        await wait_until(lambda: len(broker.connections) == 1)
        (conn,) = broker.connections
        events = []
        with trio.fail_after(WAIT):
            try:
                while True:
                    events.append(await raw.next_event(answer_pings=False))
            except EOFError:
                pass
        assert any(isinstance(e, Ping) for e in events)
    await wait_until(lambda: not broker.connections)
    assert conn.close_code == 1008
    assert conn.close_reason == "ping timeout"


# -- TLS ------------------------------------------------------------------------------------


async def test_wss_end_to_end(
    start_broker: BrokerFactory, tls_files: dict[str, str], client_ssl: ssl.SSLContext
) -> None:
    broker = await start_broker(
        {"listener": {"tls_cert": tls_files["tls_cert"], "tls_key": tls_files["tls_key"]}}
    )
    assert broker.url.startswith("wss://127.0.0.1:")
    async with (
        connect(broker.url, ssl_context=client_ssl) as sub,
        connect(broker.url, MSGPACK, ssl_context=client_ssl) as pub,
    ):
        await sub.sub("secure.*")
        assert await pub.pub("secure.x", {"ok": True}) == 1
        assert await sub.recv() == {
            "op": "msg",
            "topic": "secure.x",
            "seq": 1,
            "data": {"ok": True},
        }


async def test_plain_ws_against_tls_port_fails(
    start_broker: BrokerFactory, tls_files: dict[str, str], client_ssl: ssl.SSLContext
) -> None:
    broker = await start_broker(
        {"listener": {"tls_cert": tls_files["tls_cert"], "tls_key": tls_files["tls_key"]}}
    )
    # A plain-text upgrade request is not TLS: the broker hangs up without
    # an HTTP answer. (trio-websocket's client would wait for connect_timeout
    # on that EOF, so the bytes are sent by hand.)
    stream = await trio.open_tcp_stream("127.0.0.1", broker.port)
    async with stream:
        await stream.send_all(
            b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            b"Sec-WebSocket-Version: 13\r\n\r\n"
        )
        with trio.fail_after(WAIT):
            assert await stream.receive_some(1000) == b""
    # A TLS client that does not trust the certificate fails its TLS handshake.
    tls = await trio.open_ssl_over_tcp_stream(
        "127.0.0.1", broker.port, ssl_context=ssl.create_default_context()
    )
    with trio.fail_after(WAIT), pytest.raises(trio.BrokenResourceError) as info:
        await tls.do_handshake()
    assert isinstance(info.value.__cause__, ssl.SSLCertVerificationError)
    await trio.aclose_forcefully(tls)
    # And the broker still serves proper clients.
    async with connect(broker.url, ssl_context=client_ssl) as c:
        await c.assert_alive()
    assert broker.stats.accepted == 1


def test_config_refuses_plain_ws_on_all_interfaces() -> None:
    with pytest.raises(ConfigError) as info:
        config_from_dict({"listener": {"host": "0.0.0.0"}})
    assert info.value.key == "listener.host"
    assert "listener.host" in str(info.value)
    assert "allow_insecure" in str(info.value)
    # Explicitly allowed, or loopback, is fine.
    config_from_dict({"listener": {"host": "0.0.0.0", "allow_insecure": True}})
    config_from_dict({"listener": {"host": "::1"}})
    config_from_dict({"listener": {"host": "localhost"}})
