"""mTLS: the listener's client-certificate settings and the mtls plugin, with
trustme client certificates over real TLS connections."""

from __future__ import annotations

import datetime
import ssl
from pathlib import Path
from typing import Any

import pytest
import trio
import trustme
from broker_mtls import subject_of

from broker import ConfigError, PluginHost, config_from_dict
from tests.conftest import BrokerFactory
from tests.helpers import WAIT, connect, rejection
from tests.plugin_helpers import (
    SECRET,
    SeenIdentities,
    bearer,
    claims,
    hs256,
    plugin_factory,
    tls_listener,
)


def client_context(ca: trustme.CA, leaf: trustme.LeafCert | None) -> ssl.SSLContext:
    """Trusts the server's CA; presents *leaf* as the client certificate."""
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    if leaf is not None:
        leaf.configure_cert(ctx)
    return ctx


def mtls_config(
    tls_files: dict[str, str], client_auth: str, *enabled: str, **plugin: Any
) -> dict[str, Any]:
    return {
        "listener": tls_listener(
            tls_files, tls_client_ca=tls_files["ca"], tls_client_auth=client_auth
        ),
        "plugins": {"enabled": [*enabled, "mtls", "seen"]},
        "plugin": {"mtls": plugin},
    }


UPGRADE = (
    b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
    b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Sec-WebSocket-Version: 13\r\n\r\n"
)


async def refused_at_tls(port: int, ctx: ssl.SSLContext) -> None:
    """The TLS handshake fails: no HTTP answer ever comes.

    With TLS 1.3 the client finishes its side of the handshake before the
    server has checked the client certificate, so the refusal (an alert)
    shows when reading. trio-websocket's client would wait for its connect
    timeout there, hence the raw TLS stream.
    """
    stream = await trio.open_ssl_over_tcp_stream("127.0.0.1", port, ssl_context=ctx)
    with trio.fail_after(WAIT):
        try:
            await stream.do_handshake()
            await stream.send_all(UPGRADE)
            data = await stream.receive_some(1000)
        except trio.BrokenResourceError as e:
            cause = e.__cause__
            data = b""
        else:
            cause = None
        finally:
            await trio.aclose_forcefully(stream)
    # Either a TLS alert, or the connection closed without an HTTP answer.
    assert data == b"", data
    assert cause is None or isinstance(cause, ssl.SSLError), cause


async def test_a_verified_certificate_is_the_identity(
    start_broker: BrokerFactory, tls_files: dict[str, str], ca: trustme.CA
) -> None:
    seen = SeenIdentities()
    broker = await start_broker(
        mtls_config(tls_files, "required", roles={"ingest-1": ["publisher"]}),
        factories=plugin_factory("seen", seen),
    )
    not_after = datetime.datetime(2040, 1, 2, 3, 4, 5, tzinfo=datetime.UTC)
    leaf = ca.issue_cert("ingest-1.example.com", common_name="ingest-1", not_after=not_after)
    async with connect(broker.url, ssl_context=client_context(ca, leaf)) as c:
        await c.pub("market.x", 1)
    other = ca.issue_cert("other.example.com", common_name="svc-2")
    async with connect(broker.url, ssl_context=client_context(ca, other)) as c:
        await c.assert_alive()
    first, second = seen.identities
    assert first.subject == "ingest-1"
    assert first.roles == {"publisher"}
    assert first.plugin == "mtls"
    assert first.expires_at == not_after.timestamp()
    assert ["DNS", "ingest-1.example.com"] in first.claims["san"]
    assert second.subject == "svc-2"
    assert second.roles == frozenset()


async def test_required_refuses_no_certificate_and_unverified_ones(
    start_broker: BrokerFactory, tls_files: dict[str, str], ca: trustme.CA
) -> None:
    broker = await start_broker(
        mtls_config(tls_files, "required"), factories=plugin_factory("seen", SeenIdentities())
    )
    stranger_ca = trustme.CA()
    expired = ca.issue_cert(
        "old.example.com",
        common_name="old",
        not_before=datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC),
        not_after=datetime.datetime(2020, 2, 1, tzinfo=datetime.UTC),
    )
    await refused_at_tls(broker.port, client_context(ca, None))
    await refused_at_tls(broker.port, client_context(ca, stranger_ca.issue_cert("x.example.com")))
    await refused_at_tls(broker.port, client_context(ca, expired))
    # ...and a good one still gets in.
    good = ca.issue_cert("ok.example.com", common_name="ok")
    async with connect(broker.url, ssl_context=client_context(ca, good)) as c:
        await c.assert_alive()
    assert broker.stats.accepted == 1


async def test_optional_leaves_clients_without_a_certificate_to_jwt(
    start_broker: BrokerFactory, tls_files: dict[str, str], ca: trustme.CA
) -> None:
    seen = SeenIdentities()
    config = mtls_config(tls_files, "optional", "jwt")
    config["plugin"]["jwt"] = {"secret": SECRET}
    broker = await start_broker(config, factories=plugin_factory("seen", seen))
    browser = client_context(ca, None)
    async with connect(broker.url, ssl_context=browser, headers=bearer(hs256(claims("web")))):
        pass
    leaf = ca.issue_cert("svc.example.com", common_name="svc")
    async with connect(broker.url, ssl_context=client_context(ca, leaf)) as c:
        await c.assert_alive()
    assert [(i.subject, i.plugin) for i in seen.identities] == [("web", "jwt"), ("svc", "mtls")]
    # Neither a certificate nor a token: 401 from the broker.
    assert (await rejection(broker.url, ssl_context=browser)).status_code == 401
    # A certificate from another CA is still refused by TLS, even when optional.
    await refused_at_tls(broker.port, client_context(ca, trustme.CA().issue_cert("x.test")))


async def test_subject_from_a_san_and_an_allow_list(
    start_broker: BrokerFactory, tls_files: dict[str, str], ca: trustme.CA
) -> None:
    seen = SeenIdentities()
    broker = await start_broker(
        mtls_config(tls_files, "required", subject="email", subjects=["alice@example.com"]),
        factories=plugin_factory("seen", seen),
    )
    alice = ca.issue_cert("alice@example.com", common_name="Alice Doe")
    async with connect(broker.url, ssl_context=client_context(ca, alice)) as c:
        await c.assert_alive()
    assert seen.identities[0].subject == "alice@example.com"
    mallory = ca.issue_cert("mallory@example.com")
    e = await rejection(broker.url, ssl_context=client_context(ca, mallory))
    assert (e.status_code, e.body) == (403, b"client certificate not allowed\n")
    no_email = ca.issue_cert("host.example.com")
    e = await rejection(broker.url, ssl_context=client_context(ca, no_email))
    assert (e.status_code, e.body) == (403, b"client certificate has no usable subject\n")


async def test_required_setting_of_the_plugin(
    start_broker: BrokerFactory, tls_files: dict[str, str], ca: trustme.CA
) -> None:
    config = mtls_config(tls_files, "optional", "jwt", required=True)
    config["plugin"]["jwt"] = {"secret": SECRET}
    broker = await start_broker(config, factories=plugin_factory("seen", SeenIdentities()))
    e = await rejection(
        broker.url, ssl_context=client_context(ca, None), headers=bearer(hs256(claims()))
    )
    assert (e.status_code, e.body) == (401, b"client certificate required\n")


def test_subject_of() -> None:
    cert: dict[str, Any] = {
        "subject": ((("countryName", "FR"),), (("commonName", "svc"),)),
        "subjectAltName": (("DNS", "a.test"), ("email", "x@test"), ("URI", "spiffe://t/s")),
    }
    assert subject_of(cert) == "svc"
    assert subject_of(cert, "dns") == "a.test"
    assert subject_of(cert, "email") == "x@test"
    assert subject_of(cert, "uri") == "spiffe://t/s"
    assert subject_of({"subject": ()}, "cn") is None


# -- configuration -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("listener", "key", "reason"),
    [
        ({"tls_client_auth": "required"}, "listener.tls_client_ca", "required when"),
        ({"tls_client_ca": "CA"}, "listener.tls_client_auth", "must be 'optional' or 'required'"),
        ({"tls_client_auth": "sometimes"}, "listener.tls_client_auth", "must be one of"),
        ({"tls_client_ca": "missing.pem"}, "listener.tls_client_ca", "file not found"),
    ],
)
def test_listener_errors(
    listener: dict[str, Any], key: str, reason: str, tls_files: dict[str, str]
) -> None:
    table = tls_listener(tls_files, **listener)
    if table.get("tls_client_ca") == "CA":
        table["tls_client_ca"] = tls_files["ca"]
    with pytest.raises(ConfigError) as info:
        config_from_dict({"listener": table})
    assert info.value.key == key
    assert reason in info.value.reason


def test_client_ca_needs_tls(tls_files: dict[str, str]) -> None:
    with pytest.raises(ConfigError) as info:
        config_from_dict(
            {"listener": {"tls_client_ca": tls_files["ca"], "tls_client_auth": "required"}}
        )
    assert (
        str(info.value) == "listener.tls_client_ca: client certificates need tls_cert and tls_key"
    )


def test_client_ca_path_is_relative_to_the_file(tls_files: dict[str, str], tmp_path: Path) -> None:
    ca_name = Path(tls_files["ca"]).name
    config = config_from_dict(
        {"listener": tls_listener(tls_files, tls_client_ca=ca_name, tls_client_auth="optional")},
        source=Path(tls_files["ca"]).parent / "broker.toml",
    )
    assert config.listener.tls_client_ca == tls_files["ca"]


def test_plugin_needs_client_certificates(tls_files: dict[str, str]) -> None:
    config = config_from_dict(
        {"listener": tls_listener(tls_files), "plugins": {"enabled": ["mtls"]}}
    )
    with pytest.raises(ConfigError) as info:
        PluginHost.from_config(config)
    assert info.value.key == "plugin.mtls"
    assert "tls_client_auth" in info.value.reason


@pytest.mark.parametrize(
    ("settings", "key"),
    [
        ({"subject": "serial"}, "plugin.mtls.subject"),
        ({"roles": ["a"]}, "plugin.mtls.roles"),
        ({"roles": {"svc": "publisher"}}, "plugin.mtls.roles.svc"),
        ({"subjects": "svc"}, "plugin.mtls.subjects"),
        ({"required": 1}, "plugin.mtls.required"),
        ({"colour": 1}, "plugin.mtls.colour"),
    ],
)
def test_plugin_config_errors(
    settings: dict[str, Any], key: str, tls_files: dict[str, str]
) -> None:
    config = config_from_dict(
        {
            "listener": tls_listener(
                tls_files, tls_client_ca=tls_files["ca"], tls_client_auth="required"
            ),
            "plugins": {"enabled": ["mtls"]},
            "plugin": {"mtls": settings},
        }
    )
    with pytest.raises(ConfigError) as info:
        PluginHost.from_config(config)
    assert info.value.key == key


@pytest.mark.parametrize(
    ("order", "winner"),
    [(["jwt", "mtls"], ("svc", "mtls")), (["mtls", "jwt"], ("web", "jwt"))],
)
async def test_with_both_credentials_the_last_listed_plugin_decides(
    start_broker: BrokerFactory,
    tls_files: dict[str, str],
    ca: trustme.CA,
    order: list[str],
    winner: tuple[str, str],
) -> None:
    seen = SeenIdentities()
    config = mtls_config(tls_files, "optional")
    config["plugins"]["enabled"] = [*order, "seen"]
    config["plugin"]["jwt"] = {"secret": SECRET}
    broker = await start_broker(config, factories=plugin_factory("seen", seen))
    leaf = ca.issue_cert("svc.example.com", common_name="svc")
    ctx = client_context(ca, leaf)
    async with connect(broker.url, ssl_context=ctx, headers=bearer(hs256(claims("web")))) as c:
        await c.assert_alive()
    assert [(i.subject, i.plugin) for i in seen.identities] == [winner]
