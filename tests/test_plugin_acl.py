"""The acl plugin: the containment matcher (against a brute-force reference),
placeholders that try to escape, configuration errors, and rules enforced
over real WSS connections."""

from __future__ import annotations

import itertools
import ssl
from collections.abc import Iterator
from typing import Any

import pytest
from broker_acl import ACL, create, render
from broker_acl.matcher import covers, intersects
from hypothesis import given, settings
from hypothesis import strategies as st

from broker import Action, ConfigError, Identity, PluginHost, config_from_dict
from broker.core.topics import MAX_TOKENS, pattern_matches
from tests.conftest import BrokerFactory
from tests.helpers import connect
from tests.plugin_helpers import (
    SECRET,
    as_user,
    bearer,
    claims,
    header_auth,
    hs256,
    tls_listener,
)

# -- the matcher against a brute-force reference ---------------------------------------

#: Tokens the generated patterns use; "c" is a token none of them names,
#: standing for every other token.
ALPHABET = ("a", "b", "c")
SMALL = 4  # longest topic considered by the property tests


def all_topics(max_tokens: int) -> Iterator[str]:
    for n in range(1, max_tokens + 1):
        for tokens in itertools.product(ALPHABET, repeat=n):
            yield ".".join(tokens)


TOPICS = list(all_topics(SMALL))


def reference(pattern: str, allow: list[str], deny: list[str]) -> bool:
    """Every topic (up to SMALL tokens) *pattern* matches is allowed and not denied."""
    return all(
        any(pattern_matches(a, t) for a in allow) and not any(pattern_matches(d, t) for d in deny)
        for t in TOPICS
        if pattern_matches(pattern, t)
    )


@st.composite
def patterns(draw: st.DrawFn) -> str:
    tokens = draw(st.lists(st.sampled_from(["a", "b", "*"]), min_size=1, max_size=3))
    if draw(st.booleans()):
        tokens.append(">")
    if len(tokens) > 3:
        tokens = tokens[-3:] if tokens[-1] == ">" else tokens[:3]
    return ".".join(tokens)


@settings(max_examples=500, deadline=None)
@given(patterns(), st.lists(patterns(), max_size=4), st.lists(patterns(), max_size=2))
def test_covers_agrees_with_brute_force(pattern: str, allow: list[str], deny: list[str]) -> None:
    assert covers(pattern, allow, deny, max_tokens=SMALL) == reference(pattern, allow, deny)


@settings(max_examples=300, deadline=None)
@given(patterns(), st.lists(patterns(), min_size=1, max_size=3))
def test_intersects_agrees_with_brute_force(pattern: str, others: list[str]) -> None:
    expected = any(
        pattern_matches(pattern, t) and any(pattern_matches(o, t) for o in others) for t in TOPICS
    )
    assert intersects(pattern, others, max_tokens=SMALL) == expected


@pytest.mark.parametrize(
    ("pattern", "allow", "expected"),
    [
        ("user.alice.orders", ["user.alice.orders"], True),
        ("user.*.orders", ["user.alice.orders"], False),
        ("user.*.orders", ["user.*.orders"], True),
        ("user.>", ["user.alice.>"], False),
        (">", ["user.alice.orders"], False),
        ("*.*", ["a.*", "*.b"], False),
        ("a.>", ["a.*", "a.*.>"], True),  # a union covers what neither part does
        ("a.>", ["a.*"], False),
        ("a.*.>", ["a.>"], True),
        ("a.>", ["a.*.>"], False),  # a.x is one token short
        ("*", ["a", "b"], False),
        ("trades.BTC-USD", ["trades.*", "nothing"], True),
        ("x", [], False),
        # No topic has more than MAX_TOKENS tokens: at the last position,
        # ">" can only stand for one token, as "*" does.
        (
            ".".join(["t"] * (MAX_TOKENS - 1) + [">"]),
            [".".join(["t"] * (MAX_TOKENS - 1) + ["*"])],
            True,
        ),
        (".".join(["t"] * (MAX_TOKENS - 1) + [">"]), [".".join(["t"] * MAX_TOKENS)], False),
    ],
)
def test_covers_examples(pattern: str, allow: list[str], expected: bool) -> None:
    assert covers(pattern, allow) is expected


def test_deny_wins_over_allow_in_covers() -> None:
    assert covers("chat.>", [">"])
    assert not covers("chat.>", [">"], ["chat.admin"])
    assert not covers(">", [">"], ["admin.>"])
    assert covers("chat.room1", [">"], ["admin.>"])


# -- placeholders ---------------------------------------------------------------------

PER_USER = {
    "rules": [
        {
            "roles": ["user"],
            "subscribe": ["user.{sub}.orders", "user.{sub}.balances", "market.>"],
            "publish": ["user.{sub}.commands"],
            "deny_subscribe": ["user.{sub}.internal"],
        }
    ]
}


def acl(settings: dict[str, Any] = PER_USER) -> ACL:
    config = config_from_dict({"plugins": {"enabled": ["acl"]}, "plugin": {"acl": settings}})
    return create(settings, _context(config))


def _context(config: Any) -> Any:
    from broker import PluginContext

    return PluginContext("acl", config)


def user(sub: str, **claims: Any) -> Identity:
    return Identity(sub, frozenset({"user"}), claims)


@pytest.mark.parametrize(
    ("sub", "topic", "action", "expected"),
    [
        ("alice", "user.alice.orders", Action.SUBSCRIBE, True),
        ("alice", "user.alice.balances", Action.SUBSCRIBE, True),
        ("alice", "user.bob.orders", Action.SUBSCRIBE, False),
        ("alice", "user.*.orders", Action.SUBSCRIBE, False),
        ("alice", "user.alice.*", Action.SUBSCRIBE, False),  # also reaches .internal
        ("alice", "user.>", Action.SUBSCRIBE, False),
        ("alice", ">", Action.SUBSCRIBE, False),
        ("alice", "market.>", Action.SUBSCRIBE, True),
        ("alice", "market.BTC.trades", Action.SUBSCRIBE, True),
        ("alice", "user.alice.commands", Action.PUBLISH, True),
        ("alice", "user.bob.commands", Action.PUBLISH, False),
        ("alice", "user.alice.orders", Action.PUBLISH, False),
        ("alice", "user.alice.internal", Action.SUBSCRIBE, False),
    ],
)
def test_per_user_topics(sub: str, topic: str, action: Action, expected: bool) -> None:
    assert acl().decide(user(sub), action, topic) is expected


@pytest.mark.parametrize("sub", ["a.b", "*", ">", "", "a b", "a*", "user.x", "é", "{sub}"])
def test_a_subject_that_is_not_one_token_matches_nothing(sub: str) -> None:
    plugin = acl()
    identity = user(sub)
    # Its own streams do not exist, and it cannot reach anyone else's.
    for topic in [
        "user.a.b.orders",
        "user.a.orders",
        "user.b.orders",
        "user.x.orders",
        "user.*.orders",
        "user.>",
        "user.*.*.orders",
        ">",
    ]:
        assert plugin.decide(identity, Action.SUBSCRIBE, topic) is False, topic
    assert plugin.decide(identity, Action.PUBLISH, "user.a.b.commands") is False
    assert plugin.decide(identity, Action.PUBLISH, "user.a.commands") is False
    # The rest of its rules still work.
    assert plugin.decide(identity, Action.SUBSCRIBE, "market.>") is True
    assert render(("user", "{sub}", "orders"), identity, deny=False) is None


def test_an_invalid_placeholder_in_a_deny_rule_denies_the_whole_token() -> None:
    plugin = acl(
        {
            "rules": [
                {"roles": ["*"], "subscribe": ["feed.>"], "deny_subscribe": ["feed.{sub}.>"]},
            ]
        }
    )
    assert plugin.decide(user("alice"), Action.SUBSCRIBE, "feed.bob.x") is True
    assert plugin.decide(user("alice"), Action.SUBSCRIBE, "feed.alice.x") is False
    # "a.b" cannot be substituted: the deny covers feed.*.> instead (fail closed).
    assert plugin.decide(user("a.b"), Action.SUBSCRIBE, "feed.bob.x") is False
    assert plugin.decide(user("a.b"), Action.SUBSCRIBE, "feed.one") is True


def test_claim_placeholders() -> None:
    plugin = acl({"rules": [{"roles": ["user"], "subscribe": ["tenant.{claims.tenant}.>"]}]})
    assert plugin.decide(user("u", tenant="acme"), Action.SUBSCRIBE, "tenant.acme.x") is True
    assert plugin.decide(user("u", tenant="acme"), Action.SUBSCRIBE, "tenant.*.x") is False
    assert plugin.decide(user("u", tenant=42), Action.SUBSCRIBE, "tenant.42.x") is True
    assert plugin.decide(user("u", tenant="a.b"), Action.SUBSCRIBE, "tenant.a.b.x") is False
    assert plugin.decide(user("u", tenant=True), Action.SUBSCRIBE, "tenant.True.x") is False
    assert plugin.decide(user("u"), Action.SUBSCRIBE, "tenant.None.x") is False


def test_who_a_rule_applies_to() -> None:
    plugin = acl(
        {
            "rules": [
                {"subjects": ["ingest"], "publish": ["market.>"]},
                {"roles": ["admin"], "subscribe": [">"]},
                {"subjects": ["*"], "subscribe": ["public.>"]},
            ]
        }
    )
    ingest, admin, nobody = Identity("ingest"), Identity("x", frozenset({"admin"})), Identity("n")
    assert plugin.decide(ingest, Action.PUBLISH, "market.BTC") is True
    assert plugin.decide(admin, Action.PUBLISH, "market.BTC") is False
    assert plugin.decide(admin, Action.SUBSCRIBE, ">") is True
    assert plugin.decide(nobody, Action.SUBSCRIBE, "public.news") is True
    assert plugin.decide(nobody, Action.SUBSCRIBE, ">") is False


def test_default_defer_leaves_unmatched_to_others() -> None:
    plugin = acl(
        {
            "default": "defer",
            "rules": [{"roles": ["*"], "deny_publish": ["ro.>"], "deny_subscribe": ["secret.>"]}],
        }
    )
    assert plugin.decide(Identity("x"), Action.PUBLISH, "ro.a") is False
    assert plugin.decide(Identity("x"), Action.PUBLISH, "rw.a") is None
    assert plugin.decide(Identity("x"), Action.SUBSCRIBE, ">") is False  # reaches secret.>
    assert plugin.decide(Identity("x"), Action.SUBSCRIBE, "ro.>") is None


async def test_denials_are_counted() -> None:
    config = config_from_dict(
        {"plugins": {"enabled": ["acl"]}, "plugin": {"acl": PER_USER}},
    )
    host = PluginHost.from_config(config)  # through its entry point
    plugin = host.pm.get_plugin("acl")
    assert isinstance(plugin, ACL)
    assert not await host.authorize(user("alice"), Action.SUBSCRIBE, "user.*.orders")
    assert await host.authorize(user("alice"), Action.SUBSCRIBE, "user.alice.orders")
    assert plugin.denied == {"subscribe": 1}


@pytest.mark.parametrize(
    ("settings", "key", "reason"),
    [
        ({"colour": 1}, "plugin.acl.colour", "unknown key"),
        ({"default": "allow"}, "plugin.acl.default", "deny, defer"),
        ({"rules": {}}, "plugin.acl.rules", "expected an array of tables, got a table"),
        ({"rules": [1]}, "plugin.acl.rules[0]", "expected a table, got 1"),
        ({"rules": [{"subscribe": ["a"]}]}, "plugin.acl.rules[0]", "roles or subjects"),
        ({"rules": [{"roles": ["r"]}]}, "plugin.acl.rules[0]", "at least one of"),
        (
            {"rules": [{"roles": "r", "publish": ["a"]}]},
            "plugin.acl.rules[0].roles",
            "expected an array",
        ),
        (
            {"rules": [{"roles": ["r"], "publish": "a"}]},
            "plugin.acl.rules[0].publish",
            "expected an array",
        ),
        (
            {"rules": [{"roles": ["r"], "publish": ["a..b"]}]},
            "plugin.acl.rules[0].publish[0]",
            "invalid token",
        ),
        (
            {"rules": [{"roles": ["r"], "subscribe": ["user-{sub}"]}]},
            "plugin.acl.rules[0].subscribe[0]",
            "whole token",
        ),
        (
            {"rules": [{"roles": ["r"], "subscribe": ["user.{name}"]}]},
            "plugin.acl.rules[0].subscribe[0]",
            "unknown placeholder {name}",
        ),
        (
            {"rules": [{"roles": ["r"], "subscribe": ["user.{sub}x.{claims.a}"]}]},
            "plugin.acl.rules[0].subscribe[0]",
            "whole token",
        ),
        (
            {"rules": [{"roles": ["r"], "subscribe": [">.a"]}]},
            "plugin.acl.rules[0].subscribe[0]",
            "last token",
        ),
        ({"rules": [{"roles": ["r"], "sub": ["a"]}]}, "plugin.acl.rules[0].sub", "unknown key"),
    ],
)
def test_config_errors_name_the_key(settings: dict[str, Any], key: str, reason: str) -> None:
    config = config_from_dict({"plugins": {"enabled": ["acl"]}, "plugin": {"acl": settings}})
    with pytest.raises(ConfigError) as info:
        PluginHost.from_config(config)
    assert info.value.key == key
    assert reason in info.value.reason


# -- over WSS -----------------------------------------------------------------------------


async def test_per_user_streams_over_wss(
    start_broker: BrokerFactory, tls_files: dict[str, str], client_ssl: ssl.SSLContext
) -> None:
    broker = await start_broker(
        {
            "listener": tls_listener(tls_files),
            "plugins": {"enabled": ["headerauth", "acl"]},
            "plugin": {"acl": PER_USER},
        },
        factories=header_auth(),
    )
    url = broker.url
    async with (
        connect(url, ssl_context=client_ssl, headers=as_user("alice", "user")) as alice,
        connect(url, ssl_context=client_ssl, headers=as_user("bob", "user")) as bob,
        connect(url, ssl_context=client_ssl, headers=as_user("a.b", "user")) as dotted,
        connect(url, ssl_context=client_ssl, headers=as_user("*", "user")) as star,
        connect(url, ssl_context=client_ssl, headers=as_user(">", "user")) as gt,
        connect(url, ssl_context=client_ssl, headers=as_user("", "user")) as empty,
    ):
        await alice.sub("user.alice.orders")
        # Reaching another user's stream, directly or through a wildcard.
        for pattern in ["user.bob.orders", "user.*.orders", "user.>", ">", "*.alice.orders"]:
            reply = await alice.request({"op": "sub", "id": pattern, "topic": pattern})
            assert reply == {
                "op": "err",
                "id": pattern,
                "code": "forbidden",
                "message": f"not allowed to subscribe to {pattern}",
            }
        # Subjects that try to be wildcards or several tokens get nothing.
        for client, pattern in [
            (dotted, "user.a.b.orders"),
            (dotted, "user.a.*"),
            (star, "user.*.orders"),
            (gt, "user.>"),
            (gt, "user.>.orders"),
            (empty, "user..orders"),
        ]:
            reply = await client.request({"op": "sub", "id": 1, "topic": pattern})
            assert reply["op"] == "err", (pattern, reply)
            assert reply["code"] in ("forbidden", "bad_request"), reply
        for client in (dotted, star, gt, empty):
            reply = await client.request({"op": "sub", "id": 2, "topic": "user.*.orders"})
            assert reply["code"] == "forbidden"
            await client.sub("market.>")  # what their rules allow still works
        # Bob's own commands, not alice's.
        reply = await bob.request(
            {"op": "pub", "id": 3, "topic": "user.alice.commands", "data": {}}
        )
        assert reply["code"] == "forbidden"
        await bob.pub("user.bob.commands", {"buy": 1})
        # What reaches alice's stream reaches alice only.
        await bob.sub("user.bob.orders")
        await alice.assert_alive()
        await bob.assert_alive()
    # 5 + 4 (two of the six were bad requests) + 4 + 1
    assert broker.stats.forbidden == 14


@pytest.mark.parametrize("sub", ["a.b", "*", ">", "user.bob"])
async def test_jwt_subjects_cannot_widen_rules(
    start_broker: BrokerFactory,
    tls_files: dict[str, str],
    client_ssl: ssl.SSLContext,
    sub: str,
) -> None:
    """The identity comes from a real JWT, as it would in production."""
    broker = await start_broker(
        {
            "listener": tls_listener(tls_files),
            "plugins": {"enabled": ["jwt", "acl"]},
            "plugin": {"jwt": {"secret": SECRET}, "acl": PER_USER},
        }
    )
    token = hs256(claims(sub, roles=["user"]))
    async with (
        connect(broker.url, ssl_context=client_ssl, headers=bearer(token)) as c,
        connect(
            broker.url, ssl_context=client_ssl, headers=bearer(hs256(claims("bob", roles=["user"])))
        ) as bob,
    ):
        await bob.sub("user.bob.orders")  # a proper user reaches their own stream
        for pattern in [
            f"user.{sub}.orders" if sub not in ("*", ">") else "user.*.orders",
            "user.bob.orders",
            "user.*.orders",
            "user.>",
            ">",
        ]:
            reply = await c.request({"op": "sub", "id": 1, "topic": pattern})
            assert reply["op"] == "err", (pattern, reply)
        reply = await c.request(
            {"op": "pub", "id": 2, "topic": "user.bob.commands", "data": {"sell": "all"}}
        )
        assert reply["code"] == "forbidden"
        await c.sub("market.>")


def test_the_search_is_bounded_and_fails_closed() -> None:
    allow = [f"a.{i}.>" for i in range(50)] + ["a.*.x.>"]
    assert not covers("a.*.>", allow)  # a.other.y is not allowed
    assert covers("a.7.>", allow)
    # Out of budget: denied rather than searched on.
    assert not covers("a.7.>", allow, max_states=3)
