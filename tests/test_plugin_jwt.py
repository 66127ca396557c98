"""The jwt plugin over real WSS connections: HS256, RS256 and ES256 (key
files and a JWKS with kid selection), every way a token can be wrong, the
roles claim, and living next to the tokens plugin."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import ssl
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jwt
import pytest
from broker_jwt import JWTAuth

from broker import ConfigError, PluginHost, config_from_dict
from tests.conftest import BrokerFactory
from tests.helpers import connect, rejection
from tests.plugin_helpers import (
    SECRET,
    Keys,
    SeenIdentities,
    bearer,
    claims,
    hs256,
    plugin_factory,
    tls_listener,
)


@pytest.fixture(scope="module")
def keys() -> Keys:
    return Keys()


@pytest.fixture
def key_files(keys: Keys, tmp_path: Path) -> dict[str, str]:
    return keys.write_public(tmp_path)


def jwt_config(tls_files: Mapping[str, str], **settings: Any) -> dict[str, Any]:
    return {
        "listener": tls_listener(tls_files),
        "plugins": {"enabled": ["jwt", "seen"]},
        "plugin": {"jwt": settings},
    }


async def accepted(url: str, token: str, client_ssl: ssl.SSLContext) -> None:
    async with connect(url, ssl_context=client_ssl, headers=bearer(token)) as c:
        await c.assert_alive()


async def refused(url: str, token: str, client_ssl: ssl.SSLContext) -> tuple[int, str]:
    e = await rejection(url, ssl_context=client_ssl, headers=bearer(token))
    assert e.body is not None
    return e.status_code, e.body.decode().strip()


def b64(obj: Any) -> str:
    data = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unsigned(payload: Mapping[str, Any]) -> str:
    """An ``alg: none`` token, built by hand."""
    return f"{b64({'alg': 'none', 'typ': 'JWT'})}.{b64(dict(payload))}."


def forge_hs256(payload: Mapping[str, Any], secret: bytes) -> str:
    """An HS256 token with any bytes as the secret (PyJWT refuses a PEM key)."""
    signing_input = f"{b64({'alg': 'HS256', 'typ': 'JWT'})}.{b64(dict(payload))}"
    mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(mac)}"


# -- HS256 ---------------------------------------------------------------------------------


async def test_hs256_identity_from_header_and_query(
    start_broker: BrokerFactory, tls_files: dict[str, str], client_ssl: ssl.SSLContext
) -> None:
    seen = SeenIdentities()
    broker = await start_broker(
        jwt_config(tls_files, secret=SECRET, audience="broker", issuer="https://id.test/"),
        factories=plugin_factory("seen", seen),
    )
    good = claims("alice", aud="broker", iss="https://id.test/", roles=["trader", "admin"])
    token = hs256(good)
    await accepted(broker.url, token, client_ssl)
    async with connect(f"{broker.url}?token={token}", ssl_context=client_ssl) as c:
        await c.assert_alive()
    first = seen.identities[0]
    assert first.subject == "alice"
    assert first.roles == {"trader", "admin"}
    assert first.plugin == "jwt"
    assert first.claims["aud"] == "broker"
    assert first.expires_at == good["exp"] + 5.0  # the default leeway


@pytest.mark.parametrize(
    ("payload", "secret", "reason"),
    [
        ({"aud": "broker", "iss": "https://id.test/"}, "another-secret-of-32-bytes-or-more!!", "invalid signature"),
        ({"aud": "other", "iss": "https://id.test/"}, SECRET, "invalid audience"),
        ({"iss": "https://id.test/"}, SECRET, "missing claim 'aud'"),
        ({"aud": "broker", "iss": "https://evil.test/"}, SECRET, "invalid issuer"),
        ({"aud": "broker", "iss": "https://id.test/", "exp": -60}, SECRET, "token expired"),
        ({"aud": "broker", "iss": "https://id.test/", "nbf": +60}, SECRET, "token not yet valid"),
        ({"aud": "broker", "iss": "https://id.test/", "sub": ""}, SECRET, "missing claim 'sub'"),
    ],
)  # fmt: skip
async def test_hs256_bad_tokens_are_401(
    start_broker: BrokerFactory,
    tls_files: dict[str, str],
    client_ssl: ssl.SSLContext,
    payload: dict[str, Any],
    secret: str,
    reason: str,
) -> None:
    broker = await start_broker(
        jwt_config(tls_files, secret=SECRET, audience="broker", issuer="https://id.test/"),
        factories=plugin_factory("seen", SeenIdentities()),
    )
    # exp and nbf are given relative to now (parameters are built at collection).
    now = int(time.time())
    payload = {k: now + v if k in ("exp", "nbf") else v for k, v in payload.items()}
    token = hs256({**claims("alice"), **payload}, secret)
    assert await refused(broker.url, token, client_ssl) == (401, reason)
    assert broker.stats.accepted == 0


async def test_alg_none_and_missing_exp_are_refused(
    start_broker: BrokerFactory, tls_files: dict[str, str], client_ssl: ssl.SSLContext
) -> None:
    broker = await start_broker(
        jwt_config(tls_files, secret=SECRET), factories=plugin_factory("seen", SeenIdentities())
    )
    assert await refused(broker.url, unsigned(claims()), client_ssl) == (
        401,
        "algorithm not allowed",
    )
    no_exp = {k: v for k, v in claims().items() if k != "exp"}
    assert await refused(broker.url, hs256(no_exp), client_ssl) == (401, "missing claim 'exp'")
    # HS512 needs a 64-byte secret (RFC 7518): not allowed with this 38-byte one.
    token = f"{b64({'alg': 'HS512', 'typ': 'JWT'})}.{b64(claims())}.{b64(bytes(64))}"
    assert await refused(broker.url, token, client_ssl) == (401, "algorithm not allowed")


async def test_leeway_tolerates_a_little_clock_skew(
    start_broker: BrokerFactory, tls_files: dict[str, str], client_ssl: ssl.SSLContext
) -> None:
    broker = await start_broker(
        jwt_config(tls_files, secret=SECRET, leeway=30),
        factories=plugin_factory("seen", SeenIdentities()),
    )
    await accepted(broker.url, hs256(claims(ttl=-10)), client_ssl)
    status, reason = await refused(broker.url, hs256(claims(ttl=-60)), client_ssl)
    assert (status, reason) == (401, "token expired")


async def test_scope_string_as_roles(
    start_broker: BrokerFactory, tls_files: dict[str, str], client_ssl: ssl.SSLContext
) -> None:
    seen = SeenIdentities()
    broker = await start_broker(
        jwt_config(tls_files, secret=SECRET, roles_claim="scope", subject_claim="client_id"),
        factories=plugin_factory("seen", seen),
    )
    token = hs256({**claims("ignored"), "client_id": "svc-1", "scope": "read write"})
    await accepted(broker.url, token, client_ssl)
    assert seen.identities[0].subject == "svc-1"
    assert seen.identities[0].roles == {"read", "write"}


# -- RS256 / ES256 -------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["rsa", "ec"])
async def test_public_key_file(
    start_broker: BrokerFactory,
    tls_files: dict[str, str],
    client_ssl: ssl.SSLContext,
    keys: Keys,
    key_files: dict[str, str],
    kind: str,
) -> None:
    broker = await start_broker(
        jwt_config(tls_files, public_key=key_files[kind]),
        factories=plugin_factory("seen", SeenIdentities()),
    )
    private, alg = (keys.rsa, "RS256") if kind == "rsa" else (keys.ec, "ES256")
    await accepted(broker.url, jwt.encode(claims(), private, algorithm=alg), client_ssl)
    # Signed by another key: bad signature.
    forged = jwt.encode(claims(), keys.other_rsa, algorithm="RS256")
    expected = "invalid signature" if kind == "rsa" else "algorithm not allowed"
    assert await refused(broker.url, forged, client_ssl) == (401, expected)
    # Algorithm confusion: an HS256 token "signed" with the public key as secret.
    confused = forge_hs256(claims(), Keys.pem(private))
    assert await refused(broker.url, confused, client_ssl) == (401, "algorithm not allowed")
    assert await refused(broker.url, unsigned(claims()), client_ssl) == (
        401,
        "algorithm not allowed",
    )


async def test_jwks_selects_the_key_by_kid(
    start_broker: BrokerFactory,
    tls_files: dict[str, str],
    client_ssl: ssl.SSLContext,
    keys: Keys,
    key_files: dict[str, str],
) -> None:
    broker = await start_broker(
        jwt_config(tls_files, jwks=key_files["jwks"], audience="broker"),
        factories=plugin_factory("seen", SeenIdentities()),
    )
    url, good = broker.url, claims(aud="broker")
    rs = jwt.encode(good, keys.rsa, algorithm="RS256", headers={"kid": "r1"})
    es = jwt.encode(good, keys.ec, algorithm="ES256", headers={"kid": "e1"})
    await accepted(url, rs, client_ssl)
    await accepted(url, es, client_ssl)
    cases = {
        "unknown key id": jwt.encode(good, keys.rsa, algorithm="RS256", headers={"kid": "zz"}),
        "token has no key id (kid)": jwt.encode(good, keys.rsa, algorithm="RS256"),
        # The right kid, signed by another key.
        "invalid signature": jwt.encode(
            good, keys.other_rsa, algorithm="RS256", headers={"kid": "r1"}
        ),
        # The RSA key's kid with an EC signature: the key decides the algorithm.
        "algorithm not allowed": jwt.encode(
            good, keys.ec, algorithm="ES256", headers={"kid": "r1"}
        ),
        "invalid audience": jwt.encode(
            claims(aud="x"), keys.rsa, algorithm="RS256", headers={"kid": "r1"}
        ),
    }
    for reason, token in cases.items():
        assert await refused(url, token, client_ssl) == (401, reason), reason
    # A bad JWT is refused even though it is "unknown": never waved through.
    assert broker.stats.accepted == 2


# -- next to other authentication plugins ---------------------------------------------------


@pytest.mark.parametrize("order", [["tokens", "jwt"], ["jwt", "tokens"]])
async def test_with_static_tokens_in_either_order(
    start_broker: BrokerFactory,
    tls_files: dict[str, str],
    client_ssl: ssl.SSLContext,
    order: list[str],
) -> None:
    seen = SeenIdentities()
    static = "a-static-token-for-the-ingest-service"
    broker = await start_broker(
        {
            "listener": tls_listener(tls_files),
            "plugins": {"enabled": [*order, "seen"]},
            "plugin": {
                "jwt": {"secret": SECRET},
                "tokens": {"tokens": [{"id": "ingest", "token": static, "roles": ["pub"]}]},
            },
        },
        factories=plugin_factory("seen", seen),
    )
    await accepted(broker.url, static, client_ssl)
    await accepted(broker.url, hs256(claims("alice")), client_ssl)
    assert [(i.subject, i.plugin) for i in seen.identities] == [
        ("ingest", "tokens"),
        ("alice", "jwt"),
    ]
    # Wrong static token, or a bad JWT: refused, whichever plugin is asked first.
    assert await refused(broker.url, "not-a-configured-token", client_ssl) == (
        401,
        "invalid token",
    )
    bad = hs256(claims(), "another-secret-of-32-bytes-or-more!!")
    assert await refused(broker.url, bad, client_ssl) == (401, "invalid signature")


async def test_query_token_can_be_turned_off(
    start_broker: BrokerFactory, tls_files: dict[str, str], client_ssl: ssl.SSLContext
) -> None:
    broker = await start_broker(
        jwt_config(tls_files, secret=SECRET, query_token=False),
        factories=plugin_factory("seen", SeenIdentities()),
    )
    e = await rejection(f"{broker.url}?token={hs256(claims())}", ssl_context=client_ssl)
    assert e.status_code == 401  # nobody recognised the credentials
    await accepted(broker.url, hs256(claims()), client_ssl)


# -- configuration -----------------------------------------------------------------------


def jwt_host(settings: dict[str, Any], tmp_path: Path) -> PluginHost:
    config = config_from_dict(
        {"plugins": {"enabled": ["jwt"]}, "plugin": {"jwt": settings}},
        source=tmp_path / "broker.toml",
    )
    return PluginHost.from_config(config)


@pytest.mark.parametrize(
    ("settings", "key", "reason"),
    [
        ({}, "plugin.jwt.secret", "exactly one of"),
        ({"secret": SECRET, "jwks": "x.json"}, "plugin.jwt.jwks", "exactly one of"),
        ({"secret": "short"}, "plugin.jwt.secret", "at least 32 bytes"),
        ({"secret": SECRET, "algorithms": ["RS256"]}, "plugin.jwt.algorithms", "cannot be verified"),
        ({"secret": SECRET, "algorithms": ["HS512"]}, "plugin.jwt.algorithms", "at least 64 bytes"),
        ({"secret": SECRET, "algorithms": ["none"]}, "plugin.jwt.algorithms[0]", "not supported"),
        ({"secret": SECRET, "algorithms": []}, "plugin.jwt.algorithms", "must not be empty"),
        ({"secret": SECRET, "leeway": -1}, "plugin.jwt.leeway", "between 0 and 300"),
        ({"secret": SECRET, "leeway": "5"}, "plugin.jwt.leeway", "expected a number"),
        ({"secret": SECRET, "audience": 3}, "plugin.jwt.audience", "expected a string or an array"),
        ({"secret": SECRET, "issuer": ""}, "plugin.jwt.issuer", "must not be empty"),
        ({"secret": SECRET, "query_token": "no"}, "plugin.jwt.query_token", "expected a boolean"),
        ({"secret": SECRET, "colour": 1}, "plugin.jwt.colour", "unknown key"),
        ({"public_key": "missing.pem"}, "plugin.jwt.public_key", "file not found"),
        ({"jwks": "missing.json"}, "plugin.jwt.jwks", "file not found"),
        # A key set from a URL (tests/test_jwt_jwks_url.py runs them).
        ({"secret": SECRET, "jwks_url": "https://id.test/certs"}, "plugin.jwt.jwks_url", "exactly one of"),
        ({"jwks_url": "http://id.test/certs"}, "plugin.jwt.jwks_url", "must be https://"),
        ({"jwks_url": "id.test/certs"}, "plugin.jwt.jwks_url", "must be an https:// URL"),
        ({"jwks_url": "https://u:p@id.test/certs"}, "plugin.jwt.jwks_url", "user info"),
        ({"discovery": True}, "plugin.jwt.discovery", "needs issuer"),
        ({"discovery": True, "issuer": "http://id.test"}, "plugin.jwt.issuer", "must be https://"),
        ({"discovery": True, "issuer": "https://id.test", "jwks_url": "https://id.test/c"}, "plugin.jwt.discovery", "exactly one of"),
        ({"jwks_url": "https://id.test/c", "algorithms": ["RS256", "HS256"]}, "plugin.jwt.algorithms", "HS256 needs a shared secret"),
        ({"jwks_url": "https://id.test/c", "jwks_refresh_min": 600, "jwks_refresh_max": 60}, "plugin.jwt.jwks_refresh_max", ">= jwks_refresh_min"),
        ({"jwks_url": "https://id.test/c", "jwks_refresh_min": 0.5}, "plugin.jwt.jwks_refresh_min", "between 1 and 86400"),
        ({"jwks_url": "https://id.test/c", "jwks_max_bytes": 10}, "plugin.jwt.jwks_max_bytes", "between 1024"),
        ({"jwks_url": "https://id.test/c", "jwks_timeout": 0}, "plugin.jwt.jwks_timeout", "must be > 0"),
        ({"jwks_url": "https://id.test/c", "jwks_startup": "later"}, "plugin.jwt.jwks_startup", "must be one of"),
        ({"jwks_url": "https://id.test/c", "jwks_ca_file": "missing.pem"}, "plugin.jwt.jwks_ca_file", "file not found"),
        ({"jwks_url": "https://id.test/c", "jwks_ca_file": "x.json"}, "plugin.jwt.jwks_ca_file", "cannot load"),
        ({"secret": SECRET, "jwks_ca_file": "x.json"}, "plugin.jwt.jwks_ca_file", "only applies with jwks_url"),
        ({"secret": SECRET, "allow_insecure_jwks": True}, "plugin.jwt.allow_insecure_jwks", "only applies with jwks_url"),
        ({"secret": SECRET, "token_cookie": "a b"}, "plugin.jwt.token_cookie", "must be a cookie name"),
        ({"secret": SECRET, "token_cookie": "broker_token"}, "plugin.jwt.token_cookie", "origin"),
    ],
)  # fmt: skip
def test_config_errors(settings: dict[str, Any], key: str, reason: str, tmp_path: Path) -> None:
    (tmp_path / "x.json").write_text("{}")  # a key file that exists: the next check applies
    with pytest.raises(ConfigError) as info:
        jwt_host(settings, tmp_path)
    assert info.value.key == key
    assert reason in info.value.reason


def test_key_files_are_checked(tmp_path: Path, keys: Keys) -> None:
    files = keys.write_public(tmp_path)
    (tmp_path / "bad.pem").write_text("not a key")
    (tmp_path / "bad.json").write_text("{")
    (tmp_path / "private.json").write_text(
        json.dumps({"keys": [json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(keys.rsa))]})
    )
    (tmp_path / "oct.json").write_text(json.dumps({"keys": [{"kty": "oct", "k": "abc"}]}))
    (tmp_path / "secret.txt").write_text(SECRET + "\n")
    for settings, reason in [
        ({"public_key": "bad.pem"}, "not a PEM public key"),
        ({"jwks": "bad.json"}, "not valid JSON"),
        ({"jwks": "private.json"}, "private key"),
        ({"jwks": "oct.json"}, "symmetric"),
    ]:
        with pytest.raises(ConfigError) as info:
            jwt_host(settings, tmp_path)
        assert reason in info.value.reason
    # Relative paths resolve from the configuration file's directory.
    host = jwt_host({"secret_file": "secret.txt"}, tmp_path)
    plugin = host.pm.get_plugin("jwt")
    assert isinstance(plugin, JWTAuth)
    assert plugin.key == SECRET.encode()
    assert plugin.algorithms == ["HS256"]  # 38 bytes: too short for HS384 and HS512
    plugin = jwt_host({"public_key": files["ec"]}, tmp_path).pm.get_plugin("jwt")
    assert isinstance(plugin, JWTAuth)
    assert plugin.algorithms == ["ES256"]
