"""The origin plugin: browser origins allowed or refused with 403 before any
authentication plugin runs; clients without an Origin by configuration."""

from __future__ import annotations

import ssl
from typing import Any

import pytest
from broker_origin import normalize

from broker import ConfigError, PluginHost, config_from_dict
from tests.conftest import BrokerFactory
from tests.helpers import connect, rejection
from tests.plugin_helpers import SECRET, bearer, claims, hs256, tls_listener

ALLOWED = ["https://app.example.com", "https://*.example.org", "http://localhost:3000"]


def origin_config(tls_files: dict[str, str], **settings: Any) -> dict[str, Any]:
    return {
        "listener": tls_listener(tls_files),
        "plugins": {"enabled": ["jwt", "origin"]},
        "plugin": {"jwt": {"secret": SECRET}, "origin": {"allowed": ALLOWED, **settings}},
    }


def with_origin(origin: str | None) -> list[tuple[bytes, bytes]]:
    headers = bearer(hs256(claims()))
    if origin is not None:
        headers.append((b"Origin", origin.encode()))
    return headers


@pytest.mark.parametrize(
    "origin",
    [
        "https://app.example.com",
        "HTTPS://APP.EXAMPLE.COM",
        "https://app.example.com:443",
        "https://a.example.org",
        "https://a.b.example.org",
        "http://localhost:3000",
        None,
    ],
)
async def test_allowed_origins(
    start_broker: BrokerFactory,
    tls_files: dict[str, str],
    client_ssl: ssl.SSLContext,
    origin: str | None,
) -> None:
    broker = await start_broker(origin_config(tls_files))
    async with connect(broker.url, ssl_context=client_ssl, headers=with_origin(origin)) as c:
        await c.assert_alive()


@pytest.mark.parametrize(
    "origin",
    [
        "https://evil.example",
        "http://app.example.com",  # another scheme
        "https://app.example.com:8443",  # another port
        "https://app.example.com.evil.example",
        "https://example.org",  # the wildcard is for subdomains only
        "https://evilexample.org",
        "http://localhost",
        "null",
        "not an origin",
    ],
)
async def test_refused_origins_get_403_whatever_the_credentials(
    start_broker: BrokerFactory,
    tls_files: dict[str, str],
    client_ssl: ssl.SSLContext,
    origin: str,
) -> None:
    broker = await start_broker(origin_config(tls_files))
    # A valid token does not help: the origin is checked first (tryfirst).
    e = await rejection(broker.url, ssl_context=client_ssl, headers=with_origin(origin))
    assert (e.status_code, e.body) == (403, b"origin not allowed\n")
    assert broker.stats.rejected["auth_403"] == 1


async def test_clients_without_origin_can_be_refused(
    start_broker: BrokerFactory, tls_files: dict[str, str], client_ssl: ssl.SSLContext
) -> None:
    broker = await start_broker(origin_config(tls_files, allow_missing=False))
    e = await rejection(broker.url, ssl_context=client_ssl, headers=with_origin(None))
    assert (e.status_code, e.body) == (403, b"origin required\n")
    async with connect(
        broker.url, ssl_context=client_ssl, headers=with_origin("https://app.example.com")
    ) as c:
        await c.assert_alive()


async def test_the_origin_never_admits_by_itself(
    start_broker: BrokerFactory, tls_files: dict[str, str], client_ssl: ssl.SSLContext
) -> None:
    broker = await start_broker(origin_config(tls_files))
    e = await rejection(
        broker.url, ssl_context=client_ssl, headers=[(b"Origin", b"https://app.example.com")]
    )
    assert e.status_code == 401  # allowed origin, but no credentials


def test_normalize() -> None:
    assert normalize("HTTPS://App.Example.com:443/") == "https://app.example.com"
    assert normalize("http://h:80") == "http://h"
    assert normalize("http://h:8080") == "http://h:8080"
    assert normalize("null") == "null"
    assert normalize("https://") is None
    assert normalize("app.example.com") is None
    assert normalize("https://a/b") is None


@pytest.mark.parametrize(
    ("settings", "key"),
    [
        ({"allowed": "https://a"}, "plugin.origin.allowed"),
        ({"allowed": ["*"]}, "plugin.origin.allowed[0]"),
        ({"allowed": ["app.example.com"]}, "plugin.origin.allowed[0]"),
        ({"allow_missing": "yes"}, "plugin.origin.allow_missing"),
        ({"origins": []}, "plugin.origin.origins"),
    ],
)
def test_config_errors(settings: dict[str, Any], key: str) -> None:
    config = config_from_dict({"plugins": {"enabled": ["origin"]}, "plugin": {"origin": settings}})
    with pytest.raises(ConfigError) as info:
        PluginHost.from_config(config)
    assert info.value.key == key
