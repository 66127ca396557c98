"""The jwt plugin's cookie token (``token_cookie``) from raw clients sending
the Cookie header, the origin allow-list it requires, how the handshake
reads cookies (Handshake.cookie, bearer_token), and that a token given in
the query string never reaches a log line on the handshake path. The same
cookie from a real Chromium page: tests/browser/test_browser_jwt_cookie.py."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from broker import ConfigError, Handshake, PluginHost, config_from_dict
from tests.conftest import BrokerFactory
from tests.helpers import raw_connect
from tests.plugin_helpers import SECRET, SeenIdentities, claims, hs256, plugin_factory
from tests.test_proxy_server import exchange, status, upgrade

APP = "https://app.example.com"


def handshake(headers: Mapping[str, str], query: Mapping[str, tuple[str, ...]] = {}) -> Handshake:
    return Handshake("/ws", query, headers, ("127.0.0.1", 1), "127.0.0.1", True, False)


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("broker_token=abc.def.ghi", "abc.def.ghi"),
        ("theme=dark; broker_token=abc.def.ghi; lang=en", "abc.def.ghi"),
        # Other applications' cookies that SimpleCookie refuses, given the
        # whole header, do not hide ours.
        ('prefs={"a": 1}; broker_token=t1', "t1"),
        ("a=b c; broker_token=t1", "t1"),
        ("flag; broker_token=t1", "t1"),
        ('q="unterminated; broker_token=t1', "t1"),
        ('broker_token="quoted\\054value"', "quoted,value"),
        ("broker_token=first; broker_token=second", "first"),
        ("broker_token=; broker_token=second", "second"),
        ("Broker_Token=other-case", None),
        ("xbroker_token=t1", None),
        ("", None),
    ],
)
def test_the_cookie_is_read_pair_by_pair(header: str, expected: str | None) -> None:
    assert handshake({"cookie": header}).cookie("broker_token") == expected


def test_explicit_tokens_win_over_the_cookie() -> None:
    cookie = {"cookie": "broker_token=from-cookie"}
    bearer = {"authorization": "Bearer from-header"}
    query = {"token": ("from-query",)}
    assert handshake({**cookie, **bearer}, query).bearer_token(cookie="broker_token") == (
        "from-header"
    )
    assert handshake(cookie, query).bearer_token(cookie="broker_token") == "from-query"
    assert handshake(cookie, query).bearer_token(cookie="broker_token", query=False) == (
        "from-cookie"
    )
    assert handshake(cookie).bearer_token() is None  # no cookie named: never read
    assert handshake({}, query).bearer_token(query=False) is None


def cookie_config(**jwt: Any) -> dict[str, Any]:
    return {
        "plugins": {"enabled": ["origin", "jwt", "seen"]},
        "plugin": {
            "origin": {"allowed": [APP]},
            "jwt": {"secret": SECRET, "token_cookie": "broker_token", "query_token": False, **jwt},
        },
    }


async def test_a_raw_client_authenticates_with_the_cookie(start_broker: BrokerFactory) -> None:
    seen = SeenIdentities()
    broker = await start_broker(cookie_config(), factories=plugin_factory("seen", seen))
    token = hs256(claims("alice", roles=["reader"]))
    headers = [("Origin", APP), ("Cookie", f"theme=dark; broker_token={token}")]
    async with raw_connect(broker.url, headers=headers) as client:
        await client.send({"op": "ping", "id": 1})
        assert (await client.recv())["op"] == "pong"
    assert [(i.subject, i.plugin, i.roles) for i in seen.identities] == [
        ("alice", "jwt", frozenset({"reader"}))
    ]
    # Two Cookie headers (as an HTTP/2 proxy may pass them on) are one list.
    headers = [("Origin", APP), ("Cookie", "theme=dark"), ("Cookie", f"broker_token={token}")]
    async with raw_connect(broker.url, headers=headers) as client:
        await client.send({"op": "ping", "id": 1})
        assert (await client.recv())["op"] == "pong"
    # A bad token in the cookie is refused like any other.
    bad = hs256(claims("alice"), "another-secret-of-32-bytes-or-more!!")
    answer = await exchange(
        broker.port, upgrade(headers=[("Cookie", f"broker_token={bad}")]), source="127.0.0.1"
    )
    assert status(answer) == 401 and answer.endswith(b"invalid signature\n")
    # query_token = false: ?token= is not looked at.
    answer = await exchange(broker.port, upgrade(f"/ws?token={token}"), source="127.0.0.1")
    assert status(answer) == 401 and answer.endswith(b"missing or invalid credentials\n")


async def test_another_sites_page_with_the_cookie_is_refused(start_broker: BrokerFactory) -> None:
    """What a browser does for a page of another site that opens a
    WebSocket to the broker: it attaches the visitor's cookie, and says
    where the page is from. The origin plugin refuses it first."""
    broker = await start_broker(cookie_config(), factories=plugin_factory("seen", SeenIdentities()))
    cookie = ("Cookie", f"broker_token={hs256(claims('alice'))}")
    forged = upgrade(headers=[("Origin", "https://evil.example"), cookie])
    answer = await exchange(broker.port, forged, source="127.0.0.1")
    assert status(answer) == 403 and answer.endswith(b"origin not allowed\n")
    assert broker.stats.rejected["auth_403"] == 1
    assert status(await exchange(broker.port, upgrade(headers=[("Origin", APP), cookie]))) == 101


@pytest.mark.parametrize(
    "plugins",
    [
        {"enabled": ["jwt"]},
        {"enabled": ["jwt", "origin"]},  # enabled, but its allow-list is empty
    ],
)
def test_a_cookie_without_an_origin_allow_list_does_not_start(
    plugins: dict[str, Any], tmp_path: Path
) -> None:
    config = config_from_dict(
        {
            "plugins": plugins,
            "plugin": {"jwt": {"secret": SECRET, "token_cookie": "broker_token"}},
        },
        source=tmp_path / "broker.toml",
    )
    with pytest.raises(ConfigError) as info:
        PluginHost.from_config(config)
    assert info.value.key == "plugin.jwt.token_cookie"
    assert "cross-site WebSocket hijacking" in info.value.reason
    assert '"origin" plugin' in info.value.reason


# -- no token in the logs -------------------------------------------------------------------


async def test_a_query_token_is_never_logged(
    start_broker: BrokerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """Every handshake outcome with ``?token=``, logged at debug level: the
    token appears in no message and no traceback."""
    caplog.set_level(logging.DEBUG)
    broker = await start_broker(
        {
            "plugins": {"enabled": ["jwt", "tokens"]},
            "plugin": {
                "jwt": {"secret": SECRET, "audience": "broker"},
                "tokens": {"tokens": [{"id": "svc", "token": "static-token-0123456789"}]},
            },
        }
    )
    good = hs256(claims("alice", aud="broker"))
    tokens = {
        "accepted": good,
        "bad signature": hs256(claims("alice", aud="broker"), "x" * 40),
        "expired": hs256(claims("alice", aud="broker", ttl=-100)),
        "wrong audience": hs256(claims("alice", aud="other")),
        "not a JWT": "not-a-jwt-but-a-secret-of-some-length",
        "broken JWT": good[:20] + "!!" + good[22:],
        "broken header": "eyJub3QganNvbg." + good.split(".", 1)[1],
        "static": "static-token-0123456789",
    }
    for token in tokens.values():
        await exchange(broker.port, upgrade(f"/ws?token={token}"), source="127.0.0.1")
        await exchange(broker.port, upgrade(f"/other?token={token}"), source="127.0.0.1")
        plain_get = f"GET /ws?token={token} HTTP/1.1\r\nHost: broker\r\n\r\n".encode()
        await exchange(broker.port, plain_get, source="127.0.0.1")
        script = f"GET /client.js?token={token} HTTP/1.1\r\nHost: broker\r\n\r\n".encode()
        await exchange(broker.port, script, source="127.0.0.1")
    assert broker.stats.accepted == 2  # the good JWT and the static token
    logged = [record.getMessage() for record in caplog.records]
    logged += [
        logging.Formatter().formatException(record.exc_info)
        for record in caplog.records
        if record.exc_info
    ]
    assert any("rejected 127.0.0.1" in line for line in logged)  # the lines are there
    for what, token in tokens.items():
        secret = token.rsplit(".", 1)[-1]  # a JWT's signature, or the whole token
        leaked = [line for line in logged if secret in line]
        assert not leaked, f"{what}: {leaked}"
