"""Shared fixtures: a broker on a loopback port, and TLS material from trustme.

Rules for tests in this suite (after trio-websocket's): loopback only, port
0, real sockets; every wait is on an event or a message, never a sleep as
synchronisation; pytest-timeout (``timeout`` in pyproject.toml) fails a hung
test instead of stalling CI.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
import trio
import trustme

from broker import Broker, PluginHost, config_from_dict
from broker.plugin.host import PluginFactory

BrokerFactory = Callable[..., Awaitable[Broker]]

#: The closing-handshake bound of the brokers tests start (start_broker).
CLOSE_TIMEOUT = 0.5


def merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """Recursively merge config tables (extra wins)."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


@pytest.fixture
async def start_broker(nursery: trio.Nursery) -> AsyncIterator[BrokerFactory]:
    """Start a broker on 127.0.0.1:0 with config overrides; stopped at teardown."""
    brokers: list[Broker] = []

    async def start(
        config: Mapping[str, Any] | None = None,
        *,
        factories: Mapping[str, PluginFactory] | None = None,
        source: Path | None = None,
        **broker_options: Any,
    ) -> Broker:
        # Port 0 for the admin listener too: several brokers may run at once.
        base = {"listener": {"host": "127.0.0.1", "port": 0}, "admin": {"port": 0}}
        data = merge(base, config or {})
        cfg = config_from_dict(data, source=source)
        # Closing handshakes get 0.5 s instead of 2 s: a test that waits for
        # a client that never answers its close frame does not sit through 2 s.
        broker_options.setdefault("close_timeout", CLOSE_TIMEOUT)
        broker = Broker(
            cfg, plugins=PluginHost.from_config(cfg, factories=factories), **broker_options
        )
        await nursery.start(broker.serve)
        brokers.append(broker)
        return broker

    yield start
    for broker in brokers:
        broker.stop()


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def tls_files(ca: trustme.CA, tmp_path: Path) -> dict[str, str]:
    """Server certificate and key for 127.0.0.1/localhost, as files."""
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert_path = tmp_path / "server.pem"
    key_path = tmp_path / "server.key"
    cert.cert_chain_pems[0].write_to_path(str(cert_path))
    for blob in cert.cert_chain_pems[1:]:
        blob.write_to_path(str(cert_path), append=True)
    cert.private_key_pem.write_to_path(str(key_path))
    ca_path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_path))
    return {"tls_cert": str(cert_path), "tls_key": str(key_path), "ca": str(ca_path)}


@pytest.fixture
def client_ssl(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    return ctx
