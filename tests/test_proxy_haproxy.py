"""The broker behind a real HAProxy (Debian's package), started by each test.

As tests/test_proxy_nginx.py does for nginx: HAProxy runs in the foreground
as the test's subprocess on loopback, with the configuration docs/deploy.md
gives (only ports and the certificate path changed). In HTTP mode it
terminates TLS and appends ``X-Forwarded-For``; in TCP mode it passes TLS
through with a PROXY protocol version 2 header. Skipped without HAProxy;
.ci/run installs it.
"""

from __future__ import annotations

import os
import shutil
import ssl
from pathlib import Path

import pytest
import trustme

from tests.conftest import BrokerFactory
from tests.helpers import free_port, raw_connect
from tests.test_proxy_nginx import (
    ALICE,
    BOB,
    PROXY,
    adapt,
    broker_listener,
    deploy_block,
    run_server,
)
from tests.test_proxy_server import Seen, exchange, plugin, status, upgrade

HAPROXY = shutil.which("haproxy") or (
    "/usr/sbin/haproxy" if os.path.exists("/usr/sbin/haproxy") else None
)

pytestmark = pytest.mark.skipif(
    HAPROXY is None, reason="HAProxy is not installed (apt-get install haproxy; .ci/run does)"
)


@pytest.fixture
def haproxy_pem(ca: trustme.CA, tmp_path: Path) -> str:
    """HAProxy's ``crt`` file for 127.0.0.1: certificate chain and key in one."""
    cert = ca.issue_cert("127.0.0.1", "localhost")
    pem = tmp_path / "haproxy.pem"
    pem.write_bytes(
        b"".join(blob.bytes() for blob in cert.cert_chain_pems) + cert.private_key_pem.bytes()
    )
    return str(pem)


async def test_behind_haproxy_http_mode(
    start_broker: BrokerFactory, tmp_path: Path, haproxy_pem: str, client_ssl: ssl.SSLContext
) -> None:
    assert HAPROXY is not None
    seen = Seen()
    broker = await start_broker(
        {
            "listener": {**broker_listener("## nginx"), "allow_insecure": True},
            "limits": {"max_connections_per_ip": 2},
            "plugins": {"enabled": ["noauth", "seen"]},
        },
        factories=plugin(seen),
    )
    port = free_port()
    config = tmp_path / "haproxy.cfg"
    config.write_text(
        adapt(
            deploy_block("## HAProxy", "haproxy"),
            {
                "bind :443 ssl crt /etc/haproxy/broker.pem": f"bind 127.0.0.1:{port} ssl crt {haproxy_pem}",
                "server broker1 127.0.0.1:8765": f"server broker1 127.0.0.1:{broker.port}",
            },
        )
    )
    url = f"wss://127.0.0.1:{port}/ws"
    forged = [("X-Forwarded-For", "198.51.100.9")]
    async with (
        run_server([HAPROXY, "-db", "-f", str(config)], port, tmp_path / "haproxy.log"),
        raw_connect(url, ssl_context=client_ssl, source=ALICE) as alice,
        # A forged X-Forwarded-For comes first, HAProxy's own line last.
        raw_connect(url, ssl_context=client_ssl, source=ALICE, headers=forged),
    ):
        assert [h.peer for h in seen.handshakes] == [(ALICE, 0), (ALICE, 0)]
        assert seen.handshakes[1].headers["x-forwarded-for"] == f"198.51.100.9, {ALICE}"
        assert status(await exchange(port, upgrade(), source=ALICE, tls=client_ssl)) == 429
        async with raw_connect(url, ssl_context=client_ssl, source=BOB) as bob:
            await bob.send({"op": "ping", "id": 1})
            assert (await bob.recv())["op"] == "pong"
        await alice.send({"op": "ping", "id": 2})
        assert (await alice.recv())["op"] == "pong"
    assert seen.handshakes[2].peer == (BOB, 0)
    assert broker.stats.rejected["max_per_ip"] == 1


async def test_behind_haproxy_tcp_mode_with_proxy_protocol_v2(
    start_broker: BrokerFactory,
    tmp_path: Path,
    tls_files: dict[str, str],
    client_ssl: ssl.SSLContext,
    caplog: pytest.LogCaptureFixture,
) -> None:
    assert HAPROXY is not None
    caplog.set_level("DEBUG", "broker.server")
    listener = broker_listener("### nginx as a TCP proxy, with the PROXY protocol")
    seen = Seen()
    broker = await start_broker(
        {
            "listener": {
                **listener,
                "tls_cert": tls_files["tls_cert"],
                "tls_key": tls_files["tls_key"],
            },
            "plugins": {"enabled": ["noauth", "seen"]},
        },
        factories=plugin(seen),
    )
    port = free_port()
    # The TCP frontend, with the defaults of the documented HTTP configuration.
    http_mode = deploy_block("## HAProxy", "haproxy")
    defaults = http_mode[: http_mode.index("\nfrontend")]
    tcp_mode = adapt(
        deploy_block("## HAProxy", "haproxy", 1),
        {
            "bind :443": f"bind 127.0.0.1:{port}",
            "server broker1 127.0.0.1:8765 send-proxy-v2": (
                f"server broker1 127.0.0.1:{broker.port} send-proxy-v2"
            ),
        },
    )
    config = tmp_path / "haproxy.cfg"
    config.write_text(f"{defaults}\n\n{tcp_mode}")
    url = f"wss://127.0.0.1:{port}/ws"
    async with (
        run_server([HAPROXY, "-db", "-f", str(config)], port, tmp_path / "haproxy.log"),
        raw_connect(url, ssl_context=client_ssl, source=BOB) as bob,
    ):
        await bob.send({"op": "ping", "id": 1})
        assert (await bob.recv())["op"] == "pong"
    ((address, client_port),) = [h.peer for h in seen.handshakes]
    assert address == BOB and client_port != 0
    assert broker.stats.accepted == 1
    assert any(
        r.getMessage().startswith(f"PROXY v2 PROXY header from {PROXY}:")
        and f"client {BOB}:{client_port}" in r.getMessage()
        for r in caplog.records
    )
