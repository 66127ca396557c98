"""The plugin host without sockets: loading, order, async, fail-closed."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest
import trio

from broker import (
    ConfigError,
    Handshake,
    Identity,
    PluginContext,
    PluginError,
    PluginHost,
    Reject,
    config_from_dict,
    hookimpl,
)
from broker.core.values import Action
from broker.plugin.host import ValidationFailed

HS = Handshake(
    path="/ws",
    query={"token": ("q-token",)},
    headers={},
    peer=("127.0.0.1", 1234),
    listener_host="127.0.0.1",
    listener_loopback=True,
    tls=False,
)
ALICE = Identity("alice")
AUTH_TIMEOUT = 5.0


def by_timeout() -> float:
    """The deadline a broker passes: limits.auth_timeout from now."""
    return trio.current_time() + AUTH_TIMEOUT


def host_with(*plugins: object, default: str = "allow") -> PluginHost:
    host = PluginHost(default_allow=default == "allow")
    for i, plugin in enumerate(plugins):
        host.register(plugin, f"p{i}")
    return host


class Auth:
    def __init__(self, result: Any) -> None:
        self.result = result

    @hookimpl
    def broker_authenticate(self, handshake: Handshake) -> Any:
        if isinstance(self.result, Exception):
            raise self.result
        return self.result


class AsyncAuth(Auth):
    @hookimpl
    async def broker_authenticate(self, handshake: Handshake) -> Any:
        return self.result


class Authz:
    def __init__(self, result: Any) -> None:
        self.result = result

    @hookimpl
    def broker_authorize(self, identity: Identity, action: Action, topic: str) -> Any:
        if isinstance(self.result, Exception):
            raise self.result
        return self.result


async def test_first_authenticate_result_wins_in_call_order() -> None:
    # pluggy calls the last registered first.
    host = host_with(Auth(Identity("first")), Auth(None), Auth(Identity("last")))
    result = await host.authenticate(HS, by_timeout())
    assert isinstance(result, Identity)
    assert result.subject == "last"
    assert result.plugin == "p2"


async def test_async_authenticate_is_awaited() -> None:
    result = await host_with(AsyncAuth(Identity("bob"))).authenticate(HS, by_timeout())
    assert isinstance(result, Identity) and result.subject == "bob"


async def test_async_none_does_not_win() -> None:
    host = host_with(Auth(Identity("sync")), AsyncAuth(None))
    result = await host.authenticate(HS, by_timeout())
    assert isinstance(result, Identity) and result.subject == "sync"


async def test_no_opinion_is_401() -> None:
    result = await host_with(Auth(None)).authenticate(HS, by_timeout())
    assert result == Reject(401, "missing or invalid credentials")


@pytest.mark.parametrize("bad", [RuntimeError("boom"), "not an identity"])
async def test_authenticate_fails_closed(bad: Any, caplog: pytest.LogCaptureFixture) -> None:
    host = host_with(Auth(Identity("would-accept")), Auth(bad))
    result = await host.authenticate(HS, by_timeout())
    assert isinstance(result, Reject) and result.status == 403
    assert "p1" in caplog.text


class SlowAuth:
    """Answers *result* after *delay* seconds (of the test's clock)."""

    def __init__(self, delay: float, result: Any = None) -> None:
        self.delay = delay
        self.result = result

    @hookimpl
    async def broker_authenticate(self, handshake: Handshake) -> Any:
        await trio.sleep(self.delay)
        return self.result


async def test_authenticate_past_its_timeout_is_503(autojump_clock: trio.abc.Clock) -> None:
    start = trio.current_time()
    result = await host_with(SlowAuth(3600, Identity("late"))).authenticate(HS, by_timeout())
    assert result == Reject(503, "authentication timed out")
    assert trio.current_time() - start == pytest.approx(AUTH_TIMEOUT)


async def test_authenticate_timeout_is_for_all_implementations_together(
    autojump_clock: trio.abc.Clock,
) -> None:
    # Called last first: 3 s for no opinion, then 3 s more for an identity.
    host = host_with(SlowAuth(3, Identity("too late")), SlowAuth(3, None))
    assert await host.authenticate(HS, by_timeout()) == Reject(503, "authentication timed out")
    host = host_with(SlowAuth(2, Identity("in time")), SlowAuth(2, None))
    result = await host.authenticate(HS, by_timeout())
    assert isinstance(result, Identity) and result.subject == "in time"


async def test_a_plain_function_returning_an_awaitable_is_bounded_too(
    autojump_clock: trio.abc.Clock,
) -> None:
    class ReturnsCoroutine:
        @hookimpl
        def broker_authenticate(self, handshake: Handshake) -> Any:
            # A coroutine from a plain function: still awaited, still bounded.
            return trio.sleep_forever()  # noqa: ASYNC105

    result = await host_with(ReturnsCoroutine()).authenticate(HS, by_timeout())
    assert result == Reject(503, "authentication timed out")


async def test_refresh_past_its_timeout_is_refused(autojump_clock: trio.abc.Clock) -> None:
    class SlowRefresh:
        @hookimpl
        async def broker_refresh(self, identity: Identity, token: str) -> Any:
            await trio.sleep(3600)
            return identity

    result = await host_with(SlowRefresh()).refresh(ALICE, "t", by_timeout())
    assert result == Reject(503, "authentication timed out")


@pytest.mark.parametrize(
    ("answers", "default", "expected"),
    [
        ([None], "allow", True),
        ([None], "deny", False),
        ([True], "deny", True),
        ([True, False], "allow", False),  # deny wins whatever the order
        ([False, True], "allow", False),
        ([RuntimeError("x"), True], "allow", False),  # fail closed
        (["yes"], "allow", False),  # wrong type: fail closed
    ],
)
async def test_authorize_rules(answers: list[Any], default: str, expected: bool) -> None:
    host = host_with(*[Authz(a) for a in answers], default=default)
    assert await host.authorize(ALICE, Action.PUBLISH, "t") is expected


async def test_validate_first_reason_and_errors() -> None:
    class V:
        def __init__(self, result: Any) -> None:
            self.result = result

        @hookimpl
        async def broker_validate(self, topic: str, data: Any) -> Any:  # opt-in args
            if isinstance(self.result, Exception):
                raise self.result
            return self.result

    assert await host_with(V(None)).validate(ALICE, "t", 1) is None
    assert await host_with(V("too big"), V(None)).validate(ALICE, "t", 1) == "too big"
    with pytest.raises(ValidationFailed):
        await host_with(V(ValueError("x"))).validate(ALICE, "t", 1)
    host = host_with(V(None))
    assert host.has_validators
    assert not host_with().has_validators


async def test_observer_errors_are_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    calls: list[str] = []

    class Obs:
        @hookimpl
        def broker_subscribed(self, pattern: str) -> None:
            calls.append(pattern)
            raise RuntimeError("observer bug")

    host = host_with(Obs(), Obs())
    await host.notify("broker_subscribed", client=None, pattern="a.*")
    assert calls == ["a.*", "a.*"]
    assert "observer bug" in caplog.text


def test_misspelled_hook_is_refused() -> None:
    class Typo:
        @hookimpl
        def broker_autenticate(self, handshake: Handshake) -> None:
            return None

    with pytest.raises(PluginError, match="typo"):
        host_with().register(Typo(), "typo")


def test_from_config_uses_entry_points_and_settings() -> None:
    cfg = config_from_dict(
        {
            "plugins": {"enabled": ["tokens", "noauth"]},
            "plugin": {"tokens": {"tokens": [{"id": "a", "token": "0123456789abcdef"}]}},
        }
    )
    host = PluginHost.from_config(cfg)
    assert {name for name, _ in host.pm.list_name_plugin()} == {"tokens", "noauth"}


@pytest.mark.parametrize(
    ("settings", "key"),
    [
        ({"tokens": []}, "plugin.tokens.tokens"),
        ({"tokens": [{"id": "a", "token": "short"}]}, "plugin.tokens.tokens[0].token"),
        ({"tokens": [{"id": "a", "sha256": "zz"}]}, "plugin.tokens.tokens[0].sha256"),
        ({"tokens": [{"id": "a"}]}, "plugin.tokens.tokens[0]"),
        ({"tokens": [{"token": "0123456789abcdef"}]}, "plugin.tokens.tokens[0].id"),
        (
            {"tokens": [{"id": "a", "token": "0123456789abcdef", "x": 1}]},
            "plugin.tokens.tokens[0].x",
        ),
        ({"tokenz": 1}, "plugin.tokens.tokenz"),
    ],
)
def test_plugin_config_errors_name_the_key(settings: Mapping[str, Any], key: str) -> None:
    cfg = config_from_dict({"plugins": {"enabled": ["tokens"]}, "plugin": {"tokens": settings}})
    with pytest.raises(ConfigError) as info:
        PluginHost.from_config(cfg)
    assert info.value.key == key


def test_unknown_and_broken_plugins_stop_the_start() -> None:
    cfg = config_from_dict({"plugins": {"enabled": ["does-not-exist"]}})
    with pytest.raises(PluginError, match=r"does-not-exist.*not installed"):
        PluginHost.from_config(cfg)

    def broken(settings: Mapping[str, Any], context: PluginContext) -> object:
        raise RuntimeError("cannot open file")

    cfg = config_from_dict({"plugins": {"enabled": ["broken"]}})
    with pytest.raises(PluginError, match=r"broken.*cannot open file"):
        PluginHost.from_config(cfg, factories={"broken": broken})


async def test_tokens_plugin_matches_plain_and_hashed() -> None:
    import hashlib

    cfg = config_from_dict(
        {
            "plugins": {"enabled": ["tokens"]},
            "plugin": {
                "tokens": {
                    "tokens": [
                        {"id": "plain", "token": "plain-token-0123456", "roles": ["r"]},
                        {"id": "hashed", "sha256": hashlib.sha256(b"hashed-secret").hexdigest()},
                    ]
                }
            },
        }
    )
    host = PluginHost.from_config(cfg)

    def hs(headers: dict[str, str], query: dict[str, tuple[str, ...]]) -> Handshake:
        return Handshake("/ws", query, headers, ("127.0.0.1", 1), "127.0.0.1", True, False)

    who = await host.authenticate(
        hs({"authorization": "Bearer plain-token-0123456"}, {}), by_timeout()
    )
    assert isinstance(who, Identity) and who.subject == "plain" and who.roles == {"r"}
    who = await host.authenticate(hs({}, {"token": ("hashed-secret",)}), by_timeout())
    assert isinstance(who, Identity) and who.subject == "hashed" and who.plugin == "tokens"
    assert await host.authenticate(
        hs({"authorization": "Bearer wrong"}, {}), by_timeout()
    ) == Reject(401, "invalid token")
    assert (await host.authenticate(hs({}, {}), by_timeout())) == Reject(
        401, "missing or invalid credentials"
    )


async def test_noauth_only_on_loopback() -> None:
    host = PluginHost.from_config(config_from_dict({}))
    assert await host.authenticate(HS, by_timeout()) == Identity("anonymous", plugin="noauth")
    public = Handshake("/ws", {}, {}, ("10.0.0.1", 1), "0.0.0.0", False, False)
    result = await host.authenticate(public, by_timeout())
    assert isinstance(result, Reject) and result.status == 403


@pytest.mark.parametrize(
    ("peer", "headers"),
    [
        # a client a trusted proxy named
        (("203.0.113.7", 0), {}),
        # a proxy on loopback that the broker was not told to trust
        (("127.0.0.1", 5), {"x-forwarded-for": "203.0.113.7"}),
        (("127.0.0.1", 5), {"forwarded": "for=203.0.113.7"}),
    ],
)
async def test_noauth_refuses_clients_a_proxy_brings(
    peer: tuple[str, int], headers: dict[str, str]
) -> None:
    host = PluginHost.from_config(config_from_dict({}))
    forwarded = Handshake("/ws", {}, headers, peer, "127.0.0.1", True, False)
    result = await host.authenticate(forwarded, by_timeout())
    assert isinstance(result, Reject) and result.status == 403


@pytest.mark.parametrize("style", ["wrapper", "hookwrapper"])
def test_hook_wrappers_are_refused(style: str) -> None:
    class Wrapping:
        def broker_validate(self, topic: str) -> Any:
            return (yield)

        broker_validate = hookimpl(**{style: True})(broker_validate)  # type: ignore[call-overload]

    with pytest.raises(PluginError, match="wrappers are not supported"):
        host_with().register(Wrapping(), "w")
