"""Expiring identities and the ``auth`` op: the close at expiry (with and
without pings), refreshing before it (a test plugin, then real JWTs), and
the protocol codec of ``auth``."""

from __future__ import annotations

import math
import ssl
import time
from typing import Any

import pytest
import trio

from broker import (
    Action,
    ClientInfo,
    Handshake,
    Identity,
    Reject,
    hookimpl,
)
from broker.core.errors import ErrorCode, ProtocolError
from broker.core.protocol import Auth, Encoding, decode_command, encode_command
from tests.conftest import BrokerFactory
from tests.helpers import WAIT, connect, wait_until
from tests.plugin_helpers import SECRET, bearer, claims, hs256, plugin_factory, tls_listener

# -- the protocol ------------------------------------------------------------------------


@pytest.mark.parametrize("encoding", list(Encoding))
def test_auth_round_trip(encoding: Encoding) -> None:
    command = Auth(7, "eyJ.a.b")
    assert decode_command(encode_command(command, encoding), encoding) == command
    assert "eyJ" not in repr(command)  # tokens stay out of logs and reprs


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        ('{"op":"auth","id":1}', "missing field 'token'"),
        ('{"op":"auth","id":1,"token":""}', "token must be a non-empty string"),
        ('{"op":"auth","id":1,"token":5}', "token must be a non-empty string"),
        ('{"op":"auth","id":1,"token":"\\ud800"}', "token must not contain lone surrogates"),
    ],
)
def test_bad_auth_commands(frame: str, message: str) -> None:
    with pytest.raises(ProtocolError) as info:
        decode_command(frame, Encoding.JSON)
    assert info.value.code is ErrorCode.BAD_REQUEST
    assert info.value.message == message
    assert info.value.request_id == 1


# -- the broker, with a test plugin ---------------------------------------------------------


class Expiring:
    """Identities from ``?sub=&ttl=&role=``; refresh tokens are ``SUB:TTL[:ROLE]``."""

    def __init__(self) -> None:
        self.refreshed: list[tuple[str, str]] = []

    @hookimpl
    def broker_authenticate(self, handshake: Handshake) -> Identity:
        q = handshake.query
        ttl = float(q["ttl"][0]) if "ttl" in q else math.inf
        return Identity(
            q.get("sub", ("alice",))[0],
            frozenset(q.get("role", ())),
            expires_at=time.time() + ttl if ttl != math.inf else None,
        )

    @hookimpl
    def broker_refresh(self, identity: Identity, token: str) -> Identity | Reject | None:
        self.refreshed.append((identity.subject, token))
        if token == "boom":
            raise RuntimeError("plugin bug")
        if token == "unknown":
            return None
        if token == "bad":
            return Reject(401, "bad token")
        sub, ttl, *role = token.split(":")
        return Identity(sub, frozenset(role), expires_at=time.time() + float(ttl))

    @hookimpl
    def broker_authorize(self, identity: Identity, action: Action, topic: str) -> bool:
        return action is Action.SUBSCRIBE or "pub" in identity.roles


def expiring_config(**limits: Any) -> dict[str, Any]:
    return {"plugins": {"enabled": ["expiring"]}, "limits": limits}


@pytest.mark.parametrize("ping_interval", [0, 20.0])
async def test_closed_with_1008_when_the_identity_expires(
    start_broker: BrokerFactory, ping_interval: float
) -> None:
    broker = await start_broker(
        expiring_config(ping_interval=ping_interval),
        factories=plugin_factory("expiring", Expiring()),
    )
    async with (
        connect(f"{broker.url}?ttl=0.3") as short,
        connect(f"{broker.url}?ttl=30") as long,
        connect(broker.url) as forever,
    ):
        start = time.time()
        reason = await short.expect_close(WAIT)
        assert (reason.code, reason.reason) == (1008, "authentication expired")
        assert 0.2 < time.time() - start < 1.5
        await long.assert_alive()
        await forever.assert_alive()
    assert broker.stats.expired == 1


async def test_an_identity_already_expired_is_closed_at_once(start_broker: BrokerFactory) -> None:
    broker = await start_broker(expiring_config(), factories=plugin_factory("expiring", Expiring()))
    async with connect(f"{broker.url}?ttl=-1") as c:
        reason = await c.expect_close(WAIT)
    assert reason.code == 1008


async def test_refresh_replaces_the_identity_and_its_expiry(start_broker: BrokerFactory) -> None:
    plugin = Expiring()
    broker = await start_broker(expiring_config(), factories=plugin_factory("expiring", plugin))
    async with connect(f"{broker.url}?ttl=0.4") as c:
        (conn,) = broker.connections
        reply = await c.request({"op": "auth", "id": 1, "token": "alice:60:pub"})
        assert reply == {"op": "ok", "id": 1}
        assert conn.identity.subject == "alice"
        assert conn.identity.roles == {"pub"}
        assert conn.identity.plugin == "expiring"  # filled in, as for authenticate
        assert conn.info.identity is conn.identity
        # Past the first expiry: still connected.
        await trio.sleep(0.6)
        await c.assert_alive()
        assert plugin.refreshed == [("alice", "alice:60:pub")]


async def test_refresh_clears_the_publish_authorization_cache(
    start_broker: BrokerFactory,
) -> None:
    broker = await start_broker(expiring_config(), factories=plugin_factory("expiring", Expiring()))
    async with connect(f"{broker.url}?ttl=60") as c:
        reply = await c.request({"op": "pub", "id": 1, "topic": "t", "data": 1})
        assert reply["code"] == "forbidden"
        assert await c.request({"op": "auth", "id": 2, "token": "alice:60:pub"}) == {
            "op": "ok",
            "id": 2,
        }
        await c.pub("t", 1)  # the new role is seen: the cached "no" was dropped
        assert await c.request({"op": "auth", "id": 3, "token": "alice:60"}) == {
            "op": "ok",
            "id": 3,
        }
        reply = await c.request({"op": "pub", "id": 4, "topic": "t", "data": 1})
        assert reply["code"] == "forbidden"


@pytest.mark.parametrize(
    ("token", "message"),
    [
        ("bob:60", "the token is for another subject"),
        ("bad", "bad token"),
        ("unknown", "token refresh is not supported"),
        ("boom", "authentication error"),
    ],
)
async def test_refused_refreshes_keep_the_old_identity(
    start_broker: BrokerFactory, token: str, message: str
) -> None:
    broker = await start_broker(expiring_config(), factories=plugin_factory("expiring", Expiring()))
    async with connect(f"{broker.url}?ttl=60") as c:
        (conn,) = broker.connections
        before = conn.identity
        reply = await c.request({"op": "auth", "id": 1, "token": token})
        assert reply == {"op": "err", "id": 1, "code": "unauthorized", "message": message}
        assert conn.identity is before
        await c.assert_alive()


async def test_refresh_without_a_refresh_plugin(start_broker: BrokerFactory) -> None:
    broker = await start_broker()  # noauth only
    async with connect(broker.url) as c:
        reply = await c.request({"op": "auth", "id": 1, "token": "x"})
        assert reply == {
            "op": "err",
            "id": 1,
            "code": "unauthorized",
            "message": "token refresh is not supported",
        }
        await c.assert_alive()


async def test_slow_refresh_times_out(start_broker: BrokerFactory) -> None:
    class Slow:
        @hookimpl
        async def broker_refresh(self, identity: Identity, token: str) -> Identity:
            await trio.sleep_forever()
            raise AssertionError("unreachable")

    broker = await start_broker(
        {"plugins": {"enabled": ["noauth", "slow"]}, "limits": {"auth_timeout": 0.2}},
        factories=plugin_factory("slow", Slow()),
    )
    async with connect(broker.url) as c:
        reply = await c.request({"op": "auth", "id": 1, "token": "x"})
        assert reply["code"] == "unauthorized"
        assert reply["message"] == "authentication timed out"


# -- with real JWTs ------------------------------------------------------------------------


def soon() -> int:
    """A JWT ``exp`` (whole seconds) between 0.5 and 1.5 seconds from now."""
    now = time.time()
    return math.floor(now) + (1 if now % 1 < 0.5 else 2)


def jwt_config(tls_files: dict[str, str]) -> dict[str, Any]:
    return {
        "listener": tls_listener(tls_files),
        "limits": {"ping_interval": 0},  # the expiry does not depend on pings
        "plugins": {"enabled": ["jwt", "seen"]},
        "plugin": {"jwt": {"secret": SECRET, "leeway": 0}},
    }


class Seen:
    def __init__(self) -> None:
        self.gone: list[tuple[int, str]] = []

    @hookimpl
    def broker_disconnected(self, client: ClientInfo, code: int, reason: str) -> None:
        self.gone.append((code, reason))


async def test_jwt_expiry_closes_the_connection(
    start_broker: BrokerFactory, tls_files: dict[str, str], client_ssl: ssl.SSLContext
) -> None:
    seen = Seen()
    broker = await start_broker(jwt_config(tls_files), factories=plugin_factory("seen", seen))
    exp = soon()
    token = hs256({**claims("alice"), "exp": exp})
    async with connect(broker.url, ssl_context=client_ssl, headers=bearer(token)) as c:
        await c.sub("t")
        reason = await c.expect_close(WAIT)
        closed_at = time.time()
    assert (reason.code, reason.reason) == (1008, "authentication expired")
    assert exp <= closed_at < exp + 0.5
    await wait_until(lambda: seen.gone == [(1008, "authentication expired")])


async def test_jwt_refresh_before_expiry_keeps_the_connection(
    start_broker: BrokerFactory, tls_files: dict[str, str], client_ssl: ssl.SSLContext
) -> None:
    broker = await start_broker(jwt_config(tls_files), factories=plugin_factory("seen", Seen()))
    exp = soon()
    first = hs256({**claims("alice"), "exp": exp})
    async with connect(broker.url, ssl_context=client_ssl, headers=bearer(first)) as c:
        (conn,) = broker.connections
        # Refusals first: another subject, an expired token, a bad signature.
        for token, message in [
            (hs256(claims("bob")), "the token is for another subject"),
            (hs256(claims("alice", ttl=-5)), "token expired"),
            (hs256(claims("alice"), "another-secret-of-32-bytes-or-more!!"), "invalid signature"),
            ("not-a-jwt", "not a JWT"),
        ]:
            reply = await c.request({"op": "auth", "id": "r", "token": token})
            assert reply == {"op": "err", "id": "r", "code": "unauthorized", "message": message}
        fresh = {**claims("alice"), "exp": exp + 60}
        reply = await c.request({"op": "auth", "id": 1, "token": hs256(fresh)})
        assert reply == {"op": "ok", "id": 1}
        assert conn.identity.expires_at == exp + 60
        # Let the first token's expiry pass: the connection stays.
        await trio.sleep(max(0.0, exp - time.time() + 0.2))
        await c.assert_alive()
    assert broker.stats.expired == 0


async def test_python_client_refresh(start_broker: BrokerFactory) -> None:
    from broker.client import Unauthorized, open_client

    broker = await start_broker(expiring_config(), factories=plugin_factory("expiring", Expiring()))
    async with open_client(f"{broker.url}?ttl=60") as client:
        await client.refresh("alice:120:pub")
        (conn,) = broker.connections
        assert conn.identity.roles == {"pub"}
        with pytest.raises(Unauthorized, match="another subject"):
            await client.refresh("bob:60")
