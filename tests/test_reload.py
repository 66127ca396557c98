"""Reloading the configuration (SIGHUP, ``systemctl reload``) without dropping clients.

In a ``broker serve`` subprocess over WSS: a SIGHUP that rotates the
certificate (a new connection sees the new one), tightens the ACL (the next
subscribe follows the new rule) and adds a rate limit keeps every client
connected; an invalid file keeps the running configuration. In process:
what changes live, what needs a restart, and that ``check-config`` refuses
what a reload would.
"""

from __future__ import annotations

import logging
import ssl
import sys
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trustme

from broker import (
    Broker,
    Identity,
    PluginContext,
    PluginHost,
    SourcesContext,
    hookimpl,
    load_config,
)
from broker.cli import main
from broker.ops.reload import prepare, reload_broker
from broker.sources import Publisher
from tests.helpers import connect, free_port
from tests.service import open_notify_socket, run_broker

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")

SECRET_TOKEN = "never-log-this-token-0123456789"


def write_cert(ca: trustme.CA, directory: Path) -> tuple[Path, Path, bytes]:
    """Issue a server certificate into directory/server.pem and server.key
    (overwriting, as a renewal does); return the paths and its DER bytes."""
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert_path, key_path = directory / "server.pem", directory / "server.key"
    cert_path.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    key_path.write_bytes(cert.private_key_pem.bytes())
    der = ssl.PEM_cert_to_DER_cert(cert.cert_chain_pems[0].bytes().decode())
    return cert_path, key_path, der


async def peer_certificate(port: int, context: ssl.SSLContext) -> bytes:
    stream = await trio.open_ssl_over_tcp_stream("127.0.0.1", port, ssl_context=context)
    async with stream:
        await stream.do_handshake()
        der = stream.getpeercert(binary_form=True)
    assert der is not None
    return bytes(der)


# -- a broker process reloaded with SIGHUP ----------------------------------------------


def service_toml(port: int, *, acl_deny: str = "", ratelimit: str = "", extra: str = "") -> str:
    return f"""
[listener]
host = "127.0.0.1"
port = {port}
tls_cert = "server.pem"
tls_key = "server.key"

[admin]
port = 0

[plugins]
enabled = ["noauth", "acl", "ratelimit"]

[plugin.ratelimit]
{ratelimit or "publish_rate = 0"}

[[plugin.acl.rules]]
subjects = ["*"]
subscribe = [">"]
publish = [">"]
{acl_deny}
{extra}
"""


async def test_sighup_over_wss_keeps_clients_and_applies_cert_acl_and_rate_limit(
    tmp_path: Path, ca: trustme.CA, client_ssl: ssl.SSLContext
) -> None:
    port = free_port()
    url = f"wss://127.0.0.1:{port}/ws"
    _, _, first_cert = write_cert(ca, tmp_path)
    config = tmp_path / "broker.toml"
    config.write_text(service_toml(port))
    async with open_notify_socket() as notify, run_broker(config, notify) as broker:
        assert await peer_certificate(port, client_ssl) == first_cert
        async with connect(url, ssl_context=client_ssl) as client:
            await client.sub("secret.a", id="before")
            for i in range(3):  # no rate limit yet
                await client.pub("open.x", i, id=f"p{i}")

            # Renew the certificate in place, deny secret.>, limit publishing.
            _, _, second_cert = write_cert(ca, tmp_path)
            assert second_cert != first_cert
            config.write_text(
                service_toml(
                    port,
                    acl_deny='deny_subscribe = ["secret.>"]',
                    ratelimit="publish_rate = 0.01\npublish_burst = 1",
                )
            )
            ready = await broker.reload()
            assert "last reload refused" not in ready["STATUS"]

            await client.assert_alive()  # still connected, same TLS session
            refused = await client.request({"op": "sub", "id": "after", "topic": "secret.b"})
            assert refused["code"] == "forbidden"
            await client.pub("open.x", "one", id="p3")  # the burst: one
            limited = await client.request({"op": "pub", "id": "p4", "topic": "open.x", "data": 2})
            assert limited["code"] == "rate_limited"
            # A new connection gets the new certificate.
            assert await peer_certificate(port, client_ssl) == second_cert

            # An invalid file is refused as a whole: the running config stays.
            config.write_text(service_toml(port) + "\n[limits]\nmax_conections = 5\n")
            ready = await broker.reload()
            assert "last reload refused: limits.max_conections: unknown key" in ready["STATUS"]
            refused = await client.request({"op": "sub", "id": "again", "topic": "secret.c"})
            assert refused["code"] == "forbidden"  # the ACL of the last good file
            assert await peer_certificate(port, client_ssl) == second_cert
            await client.assert_alive()
        assert await broker.stop() == 0
    log = broker.log_text()
    assert "reload refused, the running configuration stays in force: " in log
    assert "limits.max_conections: unknown key" in log
    assert "TLS certificate and key reloaded" in log
    assert "changed plugin.acl, plugin.ratelimit" in log


async def test_listen_address_change_is_logged_as_needing_a_restart(tmp_path: Path) -> None:
    port = free_port()
    config = tmp_path / "broker.toml"
    config.write_text(f'[listener]\nhost = "127.0.0.1"\nport = {port}\n[admin]\nport = 0\n')
    async with open_notify_socket() as notify, run_broker(config, notify) as broker:
        async with connect(f"ws://127.0.0.1:{port}/ws") as client:
            config.write_text(
                f'[listener]\nhost = "127.0.0.1"\nport = {free_port()}\n'
                '[admin]\nport = 0\n[log]\nlevel = "debug"\n'
            )
            await broker.reload()
            await client.assert_alive()
        # Still on the old port, and the rest of the file applied.
        async with connect(f"ws://127.0.0.1:{port}/ws") as client:
            await client.assert_alive()
        assert await broker.stop() == 0
    log = broker.log_text()
    assert "listener.port changed but needs a restart" in log
    assert "changed log.level" in log
    assert "DEBUG " in log  # the new level is in force


# -- in process --------------------------------------------------------------------


@asynccontextmanager
async def serve_file(path: Path) -> AsyncIterator[Broker]:
    broker = Broker(load_config(path))
    async with trio.open_nursery() as nursery:
        await nursery.start(broker.serve)
        yield broker
        broker.stop()


BASE = "[listener]\nport = 0\n[admin]\nport = 0\n"


async def test_invalid_file_keeps_everything(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "broker.toml"
    path.write_text(BASE)
    async with serve_file(path) as broker:
        config, plugins, context = broker.config, broker.plugins, broker.ssl_context
        path.write_text(BASE + '[queue]\npolicy = "drop-everything"\n')
        result = await reload_broker(broker)
        assert not result.ok
        assert result.error is not None
        assert result.error.startswith("queue.policy: must be one of")
        assert broker.config is config
        assert broker.plugins is plugins
        assert broker.ssl_context is context
        assert broker.last_reload is result
        assert broker.metrics.reloads.labels("failed")._value.get() == 1
    assert "queue.policy: must be one of" in caplog.text


async def test_authorization_and_queue_rules_apply_to_open_connections(tmp_path: Path) -> None:
    path = tmp_path / "broker.toml"
    path.write_text(BASE)
    async with serve_file(path) as broker, connect(broker.url) as client:
        await client.sub("a.b", id=1)
        generation = broker.plugins.generation
        path.write_text(
            BASE
            + '[authorization]\ndefault = "deny"\n'
            + '[[queue.rules]]\npattern = "book.>"\npolicy = "conflate"\n'
        )
        result = await reload_broker(broker)
        assert result.ok
        assert result.changed == ("queue.rules", "authorization.default")
        assert broker.plugins.generation > generation  # cached decisions dropped
        reply = await client.request({"op": "pub", "id": 2, "topic": "a.b", "data": 1})
        assert reply["code"] == "forbidden"
        assert broker.hub.rule_for("book.x").policy == "conflate"
        await client.assert_alive()
        assert broker.metrics.reloads.labels("ok")._value.get() == 1


async def test_history_rules_apply_on_reload(tmp_path: Path) -> None:
    """A reload that adds a history rule starts keeping history for it; one
    that removes a rule forgets that topic's history, and a client resuming
    from the forgotten position is told it was not recovered."""
    path = tmp_path / "broker.toml"
    path.write_text(BASE)
    async with serve_file(path) as broker, connect(broker.url) as client:
        path.write_text(BASE + '[[history]]\npattern = "trades.>"\nsize = 10\n')
        result = await reload_broker(broker)
        assert result.ok and result.changed == ("history",)
        for i in range(3):
            await client.request({"op": "pub", "id": 10 + i, "topic": "trades.x", "data": i})
        ok = await client.request({"op": "sub", "id": 1, "topic": "trades.x", "history": 5})
        assert ok["seq"] == 3
        replayed = [await client.recv() for _ in range(3)]
        assert [m["data"] for m in replayed] == [0, 1, 2]
        position = {"epoch": ok["epoch"], "seq": 1}

        path.write_text(BASE)
        assert (await reload_broker(broker)).ok
        async with connect(broker.url) as late:
            ok = await late.request({"op": "sub", "id": 1, "topic": "trades.x", "since": position})
            assert ok["recovered"] is False
            # No rule covers the topic any more: no position to vouch for,
            # and no replay.
            assert ok == {"op": "ok", "id": 1, "recovered": False}
            await late.assert_alive()
        assert broker.engine.history_stats()["messages"] == 0


async def test_restart_only_keys_keep_their_running_values(tmp_path: Path) -> None:
    path = tmp_path / "broker.toml"
    path.write_text(BASE)
    async with serve_file(path) as broker:
        path.write_text(
            '[listener]\nport = 9\npath = "/other"\n[admin]\nport = 9\n[limits]\nmax_replies = 7\n'
        )
        result = await reload_broker(broker)
        assert result.ok
        assert result.restart_needed == ("listener.port", "listener.path", "admin.port")
        assert result.changed == ("limits.max_replies",)
        assert broker.config.listener.port == 0
        assert broker.config.listener.path == "/ws"
        assert broker.config.admin.port == 0
        assert broker.config.limits.max_replies == 7
        async with connect(broker.url) as client:  # still on /ws
            await client.assert_alive()


async def test_keys_set_on_the_command_line_are_kept_quietly(tmp_path: Path) -> None:
    """``broker serve --port P``: the file's port differs from the running
    one by design, so a reload keeps P without calling for a restart."""
    path = tmp_path / "broker.toml"
    path.write_text(BASE)  # running on port 0, as if --port 0 had been given
    async with serve_file(path) as broker:
        path.write_text("[listener]\nport = 9\n[admin]\nport = 0\n")
        result = await reload_broker(broker, pinned=("listener.port",))
        assert result.ok and result.restart_needed == ()
        assert broker.config.listener.port == 0  # the running value
        path.write_text('[listener]\nport = 9\npath = "/x"\n[admin]\nport = 0\n')
        result = await reload_broker(broker, pinned=("listener.port",))
        assert result.restart_needed == ("listener.path",)  # not set on the command line


async def test_turning_tls_on_needs_a_restart(tmp_path: Path, tls_files: dict[str, str]) -> None:
    path = tmp_path / "broker.toml"
    path.write_text(BASE)
    async with serve_file(path) as broker:
        path.write_text(
            BASE.replace(
                "port = 0\n[admin]",
                f'port = 0\ntls_cert = "{tls_files["tls_cert"]}"\n'
                f'tls_key = "{tls_files["tls_key"]}"\n[admin]',
                1,
            )
        )
        result = await reload_broker(broker)
        assert result.ok
        assert result.restart_needed == ("listener.tls_cert",)
        assert broker.ssl_context is None
        assert not broker.config.listener.tls


async def test_a_certificate_that_does_not_load_is_refused(
    tmp_path: Path, tls_files: dict[str, str], ca: trustme.CA
) -> None:
    path = tmp_path / "broker.toml"
    tls = f'tls_cert = "{tls_files["tls_cert"]}"\ntls_key = "{tls_files["tls_key"]}"\n'
    path.write_text(BASE.replace("port = 0\n[admin]", f"port = 0\n{tls}[admin]", 1))
    async with serve_file(path) as broker:
        context = broker.ssl_context
        # A renewal gone wrong: the key of another certificate.
        other = ca.issue_cert("example.org")
        other.private_key_pem.write_to_path(tls_files["tls_key"])
        result = await reload_broker(broker)
        assert not result.ok
        assert result.error is not None
        assert result.error.startswith("listener.tls_cert: cannot load the certificate and key")
        assert broker.ssl_context is context


async def test_plugin_settings_are_named_never_shown(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    path = tmp_path / "broker.toml"
    tokens = '[plugins]\nenabled = ["tokens"]\n[plugin.tokens]\ntokens = [{{ id = "a", token = "{}" }}]\n'
    path.write_text(BASE + tokens.format("first-token-0123456789"))
    async with serve_file(path) as broker:
        path.write_text(BASE + tokens.format(SECRET_TOKEN))
        result = await reload_broker(broker)
        assert result.changed == ("plugin.tokens",)
        path.write_text(BASE + tokens.format("short"))
        result = await reload_broker(broker)
        assert not result.ok
    assert "plugin.tokens.tokens[0].token" in caplog.text
    assert SECRET_TOKEN not in caplog.text
    assert "first-token" not in caplog.text


async def test_without_a_file_a_reload_is_a_no_op() -> None:
    broker = Broker(load_config(None))
    result = await reload_broker(broker)
    assert result.ok
    assert result.path is None


def test_prepare_validates_plugins_and_tls_like_a_start(tmp_path: Path) -> None:
    path = tmp_path / "broker.toml"
    path.write_text('[plugins]\nenabled = ["not-installed"]\n')
    with pytest.raises(Exception, match="not installed"):
        prepare(path)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('[plugins]\nenabled = ["tokens"]\n[plugin.tokens]\ntokens = []\n', "plugin.tokens.tokens"),
        ("[limits]\nmax_conections = 5\n", "limits.max_conections: unknown key"),
        ('[admin]\nhost = "0.0.0.0"\n', "admin.host"),
    ],
)
def test_check_config_refuses_what_a_reload_would(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str, message: str
) -> None:
    path = tmp_path / "broker.toml"
    path.write_text(content)
    assert main(["check-config", "-c", str(path)]) == 2
    assert message in capsys.readouterr().err


def test_check_config_loads_the_certificate(
    tmp_path: Path, tls_files: dict[str, str], ca: trustme.CA, capsys: pytest.CaptureFixture[str]
) -> None:
    ca.issue_cert("example.org").private_key_pem.write_to_path(tls_files["tls_key"])
    path = tmp_path / "broker.toml"
    path.write_text(
        f'[listener]\ntls_cert = "{tls_files["tls_cert"]}"\ntls_key = "{tls_files["tls_key"]}"\n'
    )
    assert main(["check-config", "-c", str(path)]) == 2
    assert "listener.tls_cert: cannot load the certificate and key" in capsys.readouterr().err


class Ticker:
    """A source that says it is running and then waits."""

    def __init__(self, topic: str) -> None:
        self.name = "ticker"
        self.identity = Identity("feeds:ticker")
        self.topic = topic

    async def run(self, publisher: Publisher) -> None:
        publisher.ready()
        await trio.sleep_forever()


class Feeds:
    def __init__(self, topic: str) -> None:
        self.topic = topic

    @hookimpl
    def broker_sources(self, broker: SourcesContext) -> list[Ticker]:
        return [Ticker(self.topic)]


def feeds_factory(settings: Mapping[str, Any], context: PluginContext) -> Feeds:
    return Feeds(str(settings.get("topic", "t")))


async def test_running_sources_need_a_restart_for_new_settings(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "broker.toml"
    plugins = '[plugins]\nenabled = ["noauth", "feeds"]\n[plugin.feeds]\ntopic = "{}"\n'
    path.write_text(BASE + plugins.format("a"))
    config = load_config(path)
    broker = Broker(
        config, plugins=PluginHost.from_config(config, factories={"feeds": feeds_factory})
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(broker.serve)
        (supervisor,) = broker.sources
        path.write_text(BASE + plugins.format("b"))
        result = await reload_broker(broker)  # the test plugin is found again
        assert result.ok
        assert result.changed == ("plugin.feeds",)
        assert result.restart_needed == ("plugin.feeds (its running sources)",)
        assert broker.sources == [supervisor]  # still the one source, untouched
        broker.stop()
    assert "plugin.feeds (its running sources) changed but needs a restart" in caplog.text
