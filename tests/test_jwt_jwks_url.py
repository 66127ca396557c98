"""The jwt plugin with an identity provider's key set: ``jwks_url`` and OIDC
discovery, against a local HTTPS provider (tests/idp.py, trustme
certificate, real sockets): key rotation picked up without a reload, the
refetch rate, a provider that goes down or misbehaves (errors, 10 MB,
a body that never ends), how the broker reports it (/readyz, /metrics,
/api/stats, logs), start-up and reload."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import jwt
import pytest
import trio
import trio.testing
import trustme
from broker_jwt import JWTAuth
from broker_jwt.remote import RemoteKeys

from broker import Broker, ConfigError, load_config
from broker.ops.reload import reload_broker
from broker.plugin.services import ServiceState
from tests.conftest import BrokerFactory
from tests.helpers import connect, rejection
from tests.idp import DISCOVERY_PATH, HUGE, IdentityProvider, PrivateKey, identity_provider
from tests.plugin_helpers import Keys, bearer, claims
from tests.test_admin import get, scrape, value

AUDIENCE = "broker"


@pytest.fixture(scope="module")
def keys() -> Keys:
    return Keys()


@pytest.fixture
async def idp(ca: trustme.CA, keys: Keys) -> Any:
    async with identity_provider(ca) as provider:
        provider.set_keys({"A": keys.rsa}, alg="RS256")
        yield provider


def jwt_config(idp: IdentityProvider, ca_file: str, **settings: Any) -> dict[str, Any]:
    table = {"jwks_url": idp.jwks_url, "jwks_ca_file": ca_file, "audience": AUDIENCE}
    return {"plugins": {"enabled": ["jwt"]}, "plugin": {"jwt": {**table, **settings}}}


def token(key: PrivateKey, kid: str | None, alg: str = "RS256", **extra: Any) -> str:
    headers = {"kid": kid} if kid is not None else None
    return jwt.encode(claims(aud=AUDIENCE, **extra), key, algorithm=alg, headers=headers)


def remote_keys(broker: Broker) -> RemoteKeys:
    plugin = broker.plugins.pm.get_plugin("jwt")
    assert isinstance(plugin, JWTAuth) and isinstance(plugin.key, RemoteKeys)
    return plugin.key


async def accepted(broker: Broker, jwt_token: str) -> None:
    async with connect(broker.url, headers=bearer(jwt_token)) as c:
        await c.assert_alive()


async def refused(broker: Broker, jwt_token: str) -> tuple[int, str]:
    e = await rejection(broker.url, headers=bearer(jwt_token))
    assert e.body is not None
    return e.status_code, e.body.decode().strip()


# -- rotation and the refetch rate -------------------------------------------------------


async def test_a_rotated_key_is_fetched_once_and_accepted_without_a_reload(
    start_broker: BrokerFactory, idp: IdentityProvider, keys: Keys, tls_files: dict[str, str]
) -> None:
    broker = await start_broker(jwt_config(idp, tls_files["ca"]))
    assert idp.count() == 1  # fetched before the broker accepted anyone
    await accepted(broker, token(keys.rsa, "A"))
    assert idp.count() == 1  # served from the cache
    # The provider rotates: B replaces A.
    idp.set_keys({"B": keys.other_rsa}, alg="RS256")
    await accepted(broker, token(keys.other_rsa, "B"))
    assert idp.count() == 2  # one refetch, for the unknown kid
    await accepted(broker, token(keys.other_rsa, "B"))
    assert idp.count() == 2
    # A is gone from the set: refused, and no further refetch (the rate).
    assert await refused(broker, token(keys.rsa, "A")) == (401, "unknown key id")
    assert idp.count() == 2
    remote = remote_keys(broker)
    assert (remote.refetches, remote.throttled) == (1, 1)


async def test_unknown_kids_refetch_at_most_once_per_interval(
    start_broker: BrokerFactory, idp: IdentityProvider, keys: Keys, tls_files: dict[str, str]
) -> None:
    broker = await start_broker(jwt_config(idp, tls_files["ca"], jwks_refetch_interval=3600))
    for i in range(20):
        assert await refused(broker, token(keys.rsa, f"made-up-{i}")) == (401, "unknown key id")
    # One refetch for the first made-up kid; the other 19 found it too recent.
    assert idp.count() == 2
    found = await scrape(broker)
    labels = {"plugin": "jwt", "service": "jwks"}
    assert value(found, "broker_plugin_jwks_refetches_total", **labels) == 1
    assert value(found, "broker_plugin_jwks_refetches_throttled_total", **labels) == 19
    assert value(found, "broker_plugin_jwks_fetches_total", **labels) == 2
    assert value(found, "broker_plugin_jwks_keys", **labels) == 1
    # A real key still works meanwhile, from the cache.
    await accepted(broker, token(keys.rsa, "A"))
    assert idp.count() == 2


async def test_handshakes_during_a_refetch_wait_for_that_one(
    start_broker: BrokerFactory, idp: IdentityProvider, keys: Keys, tls_files: dict[str, str]
) -> None:
    broker = await start_broker(jwt_config(idp, tls_files["ca"]))
    idp.set_keys({"A": keys.rsa, "B": keys.other_rsa}, alg="RS256")
    b = token(keys.other_rsa, "B")
    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(accepted, broker, b)
    assert idp.count() == 2  # five handshakes, one refetch


async def test_max_age_schedules_the_refresh(
    start_broker: BrokerFactory, idp: IdentityProvider, keys: Keys, tls_files: dict[str, str]
) -> None:
    """A refresh comes after Cache-Control: max-age (bounded), without any
    token asking: a rotated key is then known before anyone presents it."""
    idp.cache_control = "public, max-age=1"
    broker = await start_broker(jwt_config(idp, tls_files["ca"], jwks_refresh_min=1))
    remote = remote_keys(broker)
    idp.set_keys({"B": keys.other_rsa}, alg="RS256")
    with trio.fail_after(10):
        while remote.ring is None or "B" not in remote.ring.kids:
            await remote.fetched.wait()
    await accepted(broker, token(keys.other_rsa, "B"))
    assert remote.refetches == 0  # the schedule fetched it, not the token


@pytest.mark.parametrize(
    ("cache_control", "expected"),
    [
        ("max-age=120", 120.0),
        ("max-age=5", 60.0),  # jwks_refresh_min
        ("max-age=999999", 3600.0),  # jwks_refresh_max
        ("no-store", 60.0),
        (None, 3600.0),  # no max-age: jwks_refresh_max
    ],
)
async def test_max_age_is_bounded(
    start_broker: BrokerFactory,
    idp: IdentityProvider,
    tls_files: dict[str, str],
    cache_control: str | None,
    expected: float,
) -> None:
    idp.cache_control = cache_control
    broker = await start_broker(jwt_config(idp, tls_files["ca"]))
    detail = remote_keys(broker).status().detail
    next_in = detail["next_fetch_in"]
    assert isinstance(next_in, float)
    assert expected - 5 < next_in <= expected


async def test_an_etag_revalidates_without_the_body(
    start_broker: BrokerFactory, idp: IdentityProvider, keys: Keys, tls_files: dict[str, str]
) -> None:
    idp.etag = '"v1"'
    broker = await start_broker(jwt_config(idp, tls_files["ca"]))
    remote = remote_keys(broker)
    # An unknown kid: the provider answers 304 Not Modified; the keys stay.
    assert await refused(broker, token(keys.rsa, "Z")) == (401, "unknown key id")
    assert idp.count() == 2
    assert remote.fetches == 2 and remote.failures == 0
    await accepted(broker, token(keys.rsa, "A"))


# -- a provider that fails ----------------------------------------------------------------


async def test_provider_down_cached_keys_still_serve_and_the_failure_shows(
    start_broker: BrokerFactory,
    idp: IdentityProvider,
    keys: Keys,
    tls_files: dict[str, str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    broker = await start_broker(jwt_config(idp, tls_files["ca"]))
    idp.stop()
    caplog.set_level(logging.WARNING, "broker.plugins.jwt")
    # A key of the cache: accepted without asking the provider.
    await accepted(broker, token(keys.rsa, "A"))
    # An unknown kid: the refetch fails; refused, the cache stays.
    assert await refused(broker, token(keys.rsa, "Z")) == (401, "unknown key id")
    await accepted(broker, token(keys.rsa, "A"))
    # Ready (the cache serves), with the failure under "ready".
    status, _, body = await get(broker, "/readyz")
    lines = body.decode().splitlines()
    assert status == 200 and lines[0] == "ready"
    assert re.fullmatch(
        rf"plugin jwt/jwks: cannot refresh the signing keys for \d+ s \(1 failed attempts, "
        rf"the last: {re.escape(idp.jwks_url)}: ConnectError: .*\); using the 1 keys fetched "
        r"\d+ s ago",
        lines[1],
    ), lines[1]
    found = await scrape(broker)
    labels = {"plugin": "jwt", "service": "jwks"}
    assert value(found, "broker_plugin_jwks_fetch_failures_total", **labels) == 1
    assert value(found, "broker_plugin_service_up", **labels) == 0
    assert value(found, "broker_plugin_service_ready", **labels) == 1
    assert value(found, "broker_ready") == 1
    status, _, stats = await get(broker, "/api/stats")
    (service,) = json.loads(stats)["services"]
    assert service["plugin"] == "jwt" and service["state"] == "running"
    assert service["detail"]["consecutive_failures"] == 1
    assert service["detail"]["kids"] == ["A"]
    assert "ConnectError" in service["detail"]["last_error"]
    assert any("cannot fetch the signing keys" in r.getMessage() for r in caplog.records)


async def test_an_error_status_is_a_failure(
    start_broker: BrokerFactory, idp: IdentityProvider, keys: Keys, tls_files: dict[str, str]
) -> None:
    broker = await start_broker(jwt_config(idp, tls_files["ca"]))
    idp.mode = "error"
    assert await refused(broker, token(keys.rsa, "Z")) == (401, "unknown key id")
    remote = remote_keys(broker)
    assert remote.last_error == f"{idp.jwks_url} answered 503 Service Unavailable"
    await accepted(broker, token(keys.rsa, "A"))


@pytest.mark.parametrize("mode", ["huge", "huge_chunked"])
async def test_a_10_mb_answer_is_cut_off(
    start_broker: BrokerFactory,
    idp: IdentityProvider,
    keys: Keys,
    tls_files: dict[str, str],
    mode: Any,
) -> None:
    broker = await start_broker(jwt_config(idp, tls_files["ca"]))
    idp.mode = mode
    assert await refused(broker, token(keys.rsa, "Z")) == (401, "unknown key id")
    remote = remote_keys(broker)
    assert remote.last_error is not None
    if mode == "huge":  # Content-Length says it: refused before the body
        assert f"a response of {HUGE} bytes, over jwks_max_bytes (1048576)" in remote.last_error
    else:  # chunked: cut off once past the limit
        assert "response over jwks_max_bytes (1048576), cut off" in remote.last_error
    await accepted(broker, token(keys.rsa, "A"))


async def test_an_answer_that_never_finishes_is_cut_off(
    start_broker: BrokerFactory, idp: IdentityProvider, keys: Keys, tls_files: dict[str, str]
) -> None:
    broker = await start_broker(jwt_config(idp, tls_files["ca"], jwks_timeout=0.5))
    idp.mode = "never_finishes"
    started = trio.current_time()
    # The handshake waits for the refetch, which the deadline ends.
    assert await refused(broker, token(keys.rsa, "Z")) == (401, "unknown key id")
    assert trio.current_time() - started < 5  # auth_timeout: the refetch did not run into it
    remote = remote_keys(broker)
    assert remote.last_error == f"{idp.jwks_url}: no complete answer within 0.5 s, cut off"
    await accepted(broker, token(keys.rsa, "A"))


# -- keys the plugin cannot use, algorithms ------------------------------------------------


async def test_unsupported_keys_are_skipped_with_a_log_line(
    start_broker: BrokerFactory,
    idp: IdentityProvider,
    keys: Keys,
    tls_files: dict[str, str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    good = idp.jwks["keys"][0]
    idp.jwks = {
        "keys": [
            {"kty": "oct", "k": "c2VjcmV0", "kid": "sym"},
            {**good, "kid": "private", "d": "AQAB"},
            {"kty": "OKP", "crv": "X25519", "x": "AAAA", "kid": "x25519"},
            {"kty": "EC", "crv": "secp256k1", "x": "AAAA", "y": "AAAA", "kid": "k1"},
            {"kty": "RSA", "n": "AQAB", "kid": "broken"},
            {**good, "kid": "rs1", "alg": "RS1"},
            {**good, "kid": "enc", "use": "enc"},  # an encryption key: silently not ours
            "not a key",
            good,
        ]
    }
    caplog.set_level(logging.WARNING, "broker.plugins.jwt")
    broker = await start_broker(jwt_config(idp, tls_files["ca"]))
    await accepted(broker, token(keys.rsa, "A"))
    skipped = [
        r.getMessage() for r in caplog.records if "key left out of the JWKS" in r.getMessage()
    ]
    assert len(skipped) == 7, skipped
    for reason in (
        "keys[0] (kid 'sym'): symmetric keys are not accepted",
        "keys[1] (kid 'private') is a private key",
        "keys[2] (kid 'x25519'): unsupported key type 'OKP' (curve 'X25519')",
        "keys[3] (kid 'k1'): unsupported key type 'EC' (curve 'secp256k1')",
        "keys[4] (kid 'broken'): unusable",
        "keys[5] (kid 'rs1'): unsupported algorithm 'RS1'",
        "keys[7]: must be an object",
    ):
        assert any(reason in line for line in skipped), reason
    found = await scrape(broker)
    assert value(found, "broker_plugin_jwks_keys_skipped", plugin="jwt", service="jwks") == 7


async def test_the_algorithm_comes_from_the_key_and_the_configuration(
    start_broker: BrokerFactory, idp: IdentityProvider, keys: Keys, tls_files: dict[str, str]
) -> None:
    # "A" declares RS256; "N" declares nothing, so it verifies whatever of
    # the configured algorithms an RSA key can.
    rs256, plain = idp.jwks["keys"][0], {**idp.jwks["keys"][0], "kid": "N"}
    del plain["alg"]
    idp.jwks = {"keys": [rs256, plain]}
    broker = await start_broker(
        jwt_config(idp, tls_files["ca"], algorithms=["RS256", "PS256", "ES256"])
    )
    await accepted(broker, token(keys.rsa, "A", "RS256"))
    # The same key, signing PS256 under kid A: A is an RS256 key.
    assert await refused(broker, token(keys.rsa, "A", "PS256")) == (401, "algorithm not allowed")
    await accepted(broker, token(keys.rsa, "N", "PS256"))
    await accepted(broker, token(keys.rsa, "N", "RS256"))
    # ES256 is configured, but no EC key has that kid.
    assert await refused(broker, token(keys.ec, "N", "ES256")) == (401, "algorithm not allowed")
    # Not configured at all: refused before any key is looked at.
    assert await refused(broker, token(keys.rsa, "N", "RS512")) == (401, "algorithm not allowed")
    forged = jwt.encode(claims(aud=AUDIENCE), "k" * 32, algorithm="HS256", headers={"kid": "A"})
    assert await refused(broker, forged) == (401, "algorithm not allowed")


# -- OpenID Connect discovery -------------------------------------------------------------


async def test_discovery_finds_the_key_set_and_checks_iss(
    start_broker: BrokerFactory, idp: IdentityProvider, keys: Keys, tls_files: dict[str, str]
) -> None:
    config = jwt_config(idp, tls_files["ca"], issuer=idp.issuer, discovery=True)
    del config["plugin"]["jwt"]["jwks_url"]
    broker = await start_broker(config)
    assert idp.requests == [DISCOVERY_PATH, "/realms/test/certs"]
    await accepted(broker, token(keys.rsa, "A", iss=idp.issuer))
    assert await refused(broker, token(keys.rsa, "A", iss="https://evil.example/realms/test")) == (
        401,
        "invalid issuer",
    )
    assert await refused(broker, token(keys.rsa, "A")) == (401, "missing claim 'iss'")
    # An unknown kid refetches the key set, not the discovery document.
    assert await refused(broker, token(keys.rsa, "Z", iss=idp.issuer)) == (401, "unknown key id")
    assert idp.requests == [DISCOVERY_PATH, "/realms/test/certs", "/realms/test/certs"]


async def test_a_discovery_document_for_another_issuer_is_refused(
    start_broker: BrokerFactory, idp: IdentityProvider, tls_files: dict[str, str]
) -> None:
    idp.claimed_issuer = "https://evil.example/realms/test"
    config = jwt_config(idp, tls_files["ca"], issuer=idp.issuer, discovery=True)
    del config["plugin"]["jwt"]["jwks_url"]
    with pytest.raises(ConfigError) as info:
        await start_broker(config)
    assert info.value.key == "plugin.jwt.issuer"
    assert info.value.reason.startswith(
        f"cannot load the signing keys: {idp.issuer}/.well-known/openid-configuration names "
        "the issuer 'https://evil.example/realms/test', not the configured"
    )
    assert idp.requests == [DISCOVERY_PATH]  # the key set it names was never fetched


# -- start-up, TLS, reload ----------------------------------------------------------------


async def test_start_fails_naming_the_key_and_the_url(
    start_broker: BrokerFactory, idp: IdentityProvider, tls_files: dict[str, str]
) -> None:
    idp.stop()
    with pytest.raises(ConfigError) as info:
        await start_broker(jwt_config(idp, tls_files["ca"]))
    assert info.value.key == "plugin.jwt.jwks_url"
    assert info.value.reason.startswith(
        f"cannot load the signing keys: {idp.jwks_url}: ConnectError"
    )


async def test_tls_is_verified_against_the_system_store_by_default(
    start_broker: BrokerFactory, idp: IdentityProvider, tls_files: dict[str, str]
) -> None:
    config = jwt_config(idp, tls_files["ca"])
    del config["plugin"]["jwt"]["jwks_ca_file"]  # the test CA is not in the system's store
    with pytest.raises(ConfigError) as info:
        await start_broker(config)
    assert "CERTIFICATE_VERIFY_FAILED" in info.value.reason


async def test_plain_http_with_allow_insecure_jwks(
    start_broker: BrokerFactory, ca: trustme.CA, keys: Keys
) -> None:
    async with identity_provider(ca, insecure=True) as idp:
        idp.set_keys({"A": keys.rsa})
        table = {"jwks_url": idp.jwks_url, "audience": AUDIENCE, "allow_insecure_jwks": True}
        broker = await start_broker({"plugins": {"enabled": ["jwt"]}, "plugin": {"jwt": table}})
        await accepted(broker, token(keys.rsa, "A"))


async def test_wait_startup_is_not_ready_until_the_keys_load(
    start_broker: BrokerFactory, idp: IdentityProvider, keys: Keys, tls_files: dict[str, str]
) -> None:
    idp.stop()
    broker = await start_broker(
        jwt_config(idp, tls_files["ca"], jwks_startup="wait", jwks_refresh_min=1)
    )
    status, _, body = await get(broker, "/readyz")
    assert status == 503
    assert body.decode().startswith(
        f"plugin jwt/jwks: no signing keys yet: {idp.jwks_url}: ConnectError"
    )
    found = await scrape(broker)
    assert value(found, "broker_plugin_service_ready", plugin="jwt", service="jwks") == 0
    assert await refused(broker, token(keys.rsa, "A")) == (503, "signing keys not available")
    async with trio.open_nursery() as nursery:
        await idp.start(nursery)
        remote = remote_keys(broker)
        with trio.fail_after(10):  # the retries come within a second or so
            while remote.ring is None:
                await remote.fetched.wait()
        status, _, body = await get(broker, "/readyz")
        assert (status, body) == (200, b"ready\n")
        await accepted(broker, token(keys.rsa, "A"))
        nursery.cancel_scope.cancel()


async def test_a_reload_fetches_before_the_swap_and_stops_the_old_service(
    start_broker: BrokerFactory,
    idp: IdentityProvider,
    keys: Keys,
    tls_files: dict[str, str],
    tmp_path: Path,
) -> None:
    path = tmp_path / "broker.toml"

    def write(**settings: Any) -> None:
        table = jwt_config(idp, tls_files["ca"], **settings)["plugin"]["jwt"]
        lines = "".join(f"{k} = {json.dumps(v)}\n" for k, v in table.items())
        path.write_text(
            '[listener]\nhost = "127.0.0.1"\nport = 0\n[admin]\nport = 0\n'
            f'[plugins]\nenabled = ["jwt"]\n[plugin.jwt]\n{lines}'
        )

    write()
    config = load_config(path)
    broker = await start_broker(
        {"plugins": {"enabled": ["jwt"]}, "plugin": {"jwt": dict(config.plugins.settings["jwt"])}},
        source=path,
    )
    old = broker.services[0]
    write(leeway=10)
    result = await reload_broker(broker)
    assert result.ok, result.error
    assert idp.count() == 2  # the new plugin's own fetch, before it served
    await trio.testing.wait_all_tasks_blocked()  # the old service sees its cancellation
    assert old.state is ServiceState.STOPPED
    assert broker.services[0].state is ServiceState.RUNNING
    await accepted(broker, token(keys.rsa, "A"))
    # The provider is down: the new plugins cannot load their keys, so the
    # reload is refused and the running ones keep serving.
    idp.stop()
    before = remote_keys(broker)
    write(leeway=20)
    result = await reload_broker(broker)
    assert not result.ok
    assert result.error is not None and "plugin.jwt.jwks_url: cannot load" in result.error
    assert remote_keys(broker) is before
    assert broker.services[0].state is ServiceState.RUNNING
    await accepted(broker, token(keys.rsa, "A"))
    # jwks_startup = "wait" would start the new plugin without keys: a
    # ready broker is not made unready by a reload either.
    write(leeway=20, jwks_startup="wait")
    result = await reload_broker(broker)
    assert not result.ok and result.error is not None
    assert result.error.startswith("plugin jwt/jwks: no signing keys yet: ")
    assert result.error.endswith(" (the running plugins stay in force)")
    assert remote_keys(broker) is before
    await trio.testing.wait_all_tasks_blocked()
    assert [r.state for r in broker.services] == [ServiceState.RUNNING]
    await accepted(broker, token(keys.rsa, "A"))


def test_check_config_does_not_fetch(tmp_path: Path, tls_files: dict[str, str]) -> None:
    """``broker check-config`` validates the table only: no request leaves."""
    from broker.ops.reload import prepare

    path = tmp_path / "broker.toml"
    path.write_text(
        '[plugins]\nenabled = ["jwt"]\n[plugin.jwt]\n'
        'jwks_url = "https://127.0.0.1:9/certs"\naudience = "x"\n'
        f"jwks_ca_file = {json.dumps(tls_files['ca'])}\n"
    )
    prepared = prepare(path)
    plugin = prepared.plugins.pm.get_plugin("jwt")
    assert isinstance(plugin, JWTAuth) and isinstance(plugin.key, RemoteKeys)
    assert plugin.key.ring is None and plugin.key.fetches == plugin.key.failures == 0
