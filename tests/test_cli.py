"""The ``broker`` command as a user runs it: real subprocesses (``python -m
broker``) against an in-process broker.

The only polling is on broker state (has the subprocess subscribed yet?),
bounded by ``WAIT``; nothing sleeps to synchronise.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import trio

from broker import Broker
from broker.client import Message, Subscription, open_client
from tests.conftest import BrokerFactory
from tests.helpers import (
    ENCODINGS,
    TOKEN,
    TOKENS_CONFIG,
    EncodingName,
    Restartable,
    connect,
    deny_factory,
)

#: Bound on any single wait (a subprocess starts a Python interpreter).
WAIT = 30.0


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "BROKER_TOKEN"}
    env.update(extra)
    return env


async def run_cli(
    *args: str, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[bytes]:
    with trio.fail_after(WAIT):
        return await trio.run_process(
            [sys.executable, "-m", "broker", *args],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env=cli_env() if env is None else env,
        )


class Running:
    """A ``broker`` subprocess whose output is collected in the background."""

    def __init__(self, process: trio.Process) -> None:
        self.process = process
        self.stdout = bytearray()
        self.stderr = bytearray()
        self.finished = trio.Event()

    async def collect(self) -> None:
        async def read(stream: Any, into: bytearray) -> None:
            async for chunk in stream:
                into += chunk

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(read, self.process.stdout, self.stdout)
                nursery.start_soon(read, self.process.stderr, self.stderr)
            await self.process.wait()
        finally:
            if self.process.returncode is None:  # the test failed or timed out
                self.process.kill()
            self.finished.set()

    async def wait(self) -> int:
        with trio.fail_after(WAIT):
            await self.finished.wait()
        assert self.process.returncode is not None
        return self.process.returncode

    def lines(self) -> list[Any]:
        return [json.loads(line) for line in self.stdout.decode().splitlines()]


async def start_cli(nursery: trio.Nursery, *args: str) -> Running:
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "broker", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=cli_env(),
    )
    running = Running(process)
    nursery.start_soon(running.collect)
    return running


async def wait_until(condition: Callable[[], bool], running: Running) -> None:
    """Poll broker state until *condition* holds; fail early if the CLI exited."""
    with trio.fail_after(WAIT):
        while not condition():
            assert not running.finished.is_set(), running.stderr.decode()
            await trio.sleep(0.01)  # polling state, not sleeping to synchronise


async def receive(subscription: Subscription) -> Any:
    with trio.fail_after(WAIT):
        return await subscription.receive()


# -- pub -------------------------------------------------------------------------


@ENCODINGS
async def test_pub_prints_seq(start_broker: BrokerFactory, encoding: EncodingName) -> None:
    broker = await start_broker()
    async with open_client(broker.url) as client, client.subscribe("t.*") as sub:
        done = await run_cli(
            "pub", "t.x", '{"a": [1, 2]}', "--key", "k", "--url", broker.url, "--encoding", encoding
        )
        assert (done.returncode, done.stdout, done.stderr) == (0, b"seq 1\n", b"")
        assert await receive(sub) == Message("t.x", 1, {"a": [1, 2]}, "k")
        # Not JSON: sent as a string.
        done = await run_cli("pub", "t.x", "hello", "--url", broker.url, "--encoding", encoding)
        assert (done.returncode, done.stdout) == (0, b"seq 2\n")
        assert await receive(sub) == Message("t.x", 2, "hello")


async def test_pub_over_wss_with_cafile(
    start_broker: BrokerFactory, tls_files: dict[str, str]
) -> None:
    tls = {"tls_cert": tls_files["tls_cert"], "tls_key": tls_files["tls_key"]}
    broker = await start_broker({"listener": tls})
    assert broker.url.startswith("wss://")
    done = await run_cli("pub", "t", "1", "--url", broker.url, "--cafile", tls_files["ca"])
    assert (done.returncode, done.stdout, done.stderr) == (0, b"seq 1\n", b"")


async def test_pub_forbidden_topic_fails(start_broker: BrokerFactory) -> None:
    broker = await start_broker(
        {"plugins": {"enabled": ["deny", "noauth"]}}, factories={"deny": deny_factory}
    )
    done = await run_cli("pub", "secret.x", "1", "--url", broker.url)
    assert done.returncode == 1
    assert done.stdout == b""
    assert done.stderr.decode() == "broker: forbidden: not allowed to publish to secret.x\n"


@pytest.mark.parametrize("topic", ["a..b", "a.*"])
async def test_pub_invalid_topic_fails(start_broker: BrokerFactory, topic: str) -> None:
    broker = await start_broker()
    done = await run_cli("pub", topic, "1", "--url", broker.url)
    assert done.returncode == 1
    assert done.stderr.decode().startswith("broker: bad_request: ")


async def test_pub_token_from_option_or_environment(start_broker: BrokerFactory) -> None:
    broker = await start_broker(TOKENS_CONFIG)
    done = await run_cli("pub", "t", "1", "--url", broker.url, "--token", "not-the-token-0000")
    assert done.returncode == 1
    stderr = done.stderr.decode()
    assert stderr.startswith("broker: cannot connect to ")
    assert "401" in stderr
    assert "invalid token" in stderr
    done = await run_cli("pub", "t", "1", "--url", broker.url, "--token", TOKEN)
    assert (done.returncode, done.stdout) == (0, b"seq 1\n")
    done = await run_cli("pub", "t", "2", "--url", broker.url, env=cli_env(BROKER_TOKEN=TOKEN))
    assert (done.returncode, done.stdout) == (0, b"seq 2\n")


async def test_pub_nothing_listening_fails() -> None:
    sock = trio.socket.socket()
    await sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    done = await run_cli("pub", "t", "1", "--url", f"ws://127.0.0.1:{port}/ws")
    assert done.returncode == 1
    assert "cannot connect" in done.stderr.decode()
    assert "refused" in done.stderr.decode().lower()


async def test_pub_bad_url_is_usage_error() -> None:
    done = await run_cli("pub", "t", "1", "--url", "http://127.0.0.1:1/ws")
    assert done.returncode == 2
    assert "ws://" in done.stderr.decode()


# -- sub -------------------------------------------------------------------------


@ENCODINGS
async def test_sub_prints_json_lines_and_exits_after_count(
    start_broker: BrokerFactory, nursery: trio.Nursery, encoding: EncodingName
) -> None:
    broker = await start_broker()
    # Overlapping patterns: a.b matches both but is printed once.
    sub = await start_cli(
        nursery, "sub", "a.*", "a.>", "--count", "2", "--url", broker.url, "--encoding", encoding
    )
    await wait_until(lambda: broker.hub.router.pattern_count == 2, sub)
    async with open_client(broker.url) as client:
        await client.publish("a.b", {"n": 1}, key="k")
        await client.publish("a.b.c", [2])
    assert await sub.wait() == 0, sub.stderr.decode()
    assert sub.lines() == [
        {"topic": "a.b", "seq": 1, "data": {"n": 1}, "key": "k"},
        {"topic": "a.b.c", "seq": 1, "data": [2]},
    ]
    assert broker.hub.router.pattern_count == 0


async def test_sub_over_wss_with_cafile(
    start_broker: BrokerFactory, nursery: trio.Nursery, tls_files: dict[str, str]
) -> None:
    tls = {"tls_cert": tls_files["tls_cert"], "tls_key": tls_files["tls_key"]}
    broker = await start_broker({"listener": tls})
    sub = await start_cli(
        nursery, "sub", "t", "-n", "1", "--url", broker.url, "--cafile", tls_files["ca"]
    )
    await wait_until(lambda: broker.hub.router.pattern_count == 1, sub)
    await publish_with_tls(broker, tls_files["ca"], "t", "x")
    assert await sub.wait() == 0, sub.stderr.decode()
    assert sub.lines() == [{"topic": "t", "seq": 1, "data": "x"}]


async def publish_with_tls(broker: Broker, cafile: str, topic: str, data: Any) -> None:
    context = ssl.create_default_context(cafile=cafile)
    async with open_client(broker.url, ssl_context=context) as client:
        await client.publish(topic, data)


async def test_sub_ctrl_c_exits_130(start_broker: BrokerFactory, nursery: trio.Nursery) -> None:
    broker = await start_broker()
    sub = await start_cli(nursery, "sub", "t", "--url", broker.url)
    await wait_until(lambda: broker.hub.router.pattern_count == 1, sub)
    sub.process.send_signal(signal.SIGINT)
    assert await sub.wait() == 130
    assert b"Traceback" not in sub.stderr


async def test_sub_no_reconnect_broker_shutdown_exits_1(
    start_broker: BrokerFactory, nursery: trio.Nursery
) -> None:
    broker = await start_broker()
    sub = await start_cli(nursery, "sub", "t", "--no-reconnect", "--url", broker.url)
    await wait_until(lambda: broker.hub.router.pattern_count == 1, sub)
    broker.stop()
    assert await sub.wait() == 1
    assert sub.stderr.decode() == (
        "broker: disconnected: connection closed (1001): server shutting down\n"
    )


@pytest.mark.parametrize("history", [False, True])
async def test_sub_reconnects_across_a_broker_restart(nursery: trio.Nursery, history: bool) -> None:
    config = {"history": [{"pattern": "t", "size": 10}]} if history else {}
    restartable = Restartable(nursery, config)
    broker = await restartable.start()
    sub = await start_cli(nursery, "sub", "t", "-n", "2", "--url", restartable.url)
    await wait_until(lambda: broker.hub.router.pattern_count == 1, sub)
    await publish(broker, "t", "before")
    await wait_until(lambda: b"before" in sub.stdout, sub)
    await restartable.stop()
    broker = await restartable.start()  # same port, new broker: seqs start again
    await wait_until(lambda: broker.hub.router.pattern_count == 1, sub)
    await publish(broker, "t", "after")
    assert await sub.wait() == 0, sub.stderr.decode()
    assert sub.lines() == [
        {"topic": "t", "seq": 1, "data": "before"},
        {"topic": "t", "seq": 1, "data": "after"},
    ]
    disconnected, reconnected, resync = sub.stderr.decode().splitlines()
    assert disconnected == (
        "broker: disconnected: connection closed (1001): server shutting down; reconnecting"
    )
    assert reconnected == "broker: reconnected"
    if history:
        # The restarted broker lost its history (a new epoch): not recovered.
        assert re.fullmatch(
            r"broker: resync t: recovered=false epoch=\S+ seq=0 reason=not_recovered", resync
        ), resync
    else:
        # No history on the broker: what was published meanwhile is lost.
        assert resync == "broker: resync t: recovered=false reason=no_history"


async def test_sub_ctrl_c_while_reconnecting_exits_130(nursery: trio.Nursery) -> None:
    restartable = Restartable(nursery)
    broker = await restartable.start()
    sub = await start_cli(nursery, "sub", "t", "--url", restartable.url)
    await wait_until(lambda: broker.hub.router.pattern_count == 1, sub)
    await restartable.stop()
    await wait_until(lambda: b"reconnecting" in sub.stderr, sub)
    sub.process.send_signal(signal.SIGINT)
    assert await sub.wait() == 130
    assert b"Traceback" not in sub.stderr


async def test_sub_history_replays_stored_messages_first(
    start_broker: BrokerFactory, nursery: trio.Nursery
) -> None:
    broker = await start_broker({"history": [{"pattern": "t", "size": 10}]})
    for n in range(1, 4):
        await publish(broker, "t", n)
    sub = await start_cli(nursery, "sub", "t", "--history", "2", "-n", "3", "--url", broker.url)
    await wait_until(lambda: broker.hub.router.pattern_count == 1, sub)
    await publish(broker, "t", 4)
    assert await sub.wait() == 0, sub.stderr.decode()
    assert [line["seq"] for line in sub.lines()] == [2, 3, 4]
    assert sub.stderr == b""


async def test_sub_recovers_what_was_published_while_disconnected(
    start_broker: BrokerFactory, nursery: trio.Nursery
) -> None:
    broker = await start_broker({"history": [{"pattern": "t.>", "size": 100}]})
    # Overlapping patterns: both resubscriptions replay t.a; printed once.
    sub = await start_cli(nursery, "sub", "t.a", "t.*", "-n", "5", "--url", broker.url)
    await wait_until(lambda: broker.hub.router.pattern_count == 2, sub)
    async with open_client(broker.url) as client:
        await client.publish("t.a", 1)
        await wait_until(lambda: sub.stdout.count(b"\n") == 1, sub)
        (conn,) = [c for c in broker.connections if c.subscriptions]
        conn.close(1001, "kicked")  # nothing more is queued for it from here on
        for topic, n in [("t.a", 2), ("t.b", 1), ("t.a", 3), ("t.a", 4)]:
            await client.publish(topic, n)
        assert await sub.wait() == 0, sub.stderr.decode()
    # Each message once; in order per topic (the two subscriptions' replays
    # may interleave topics differently from the publish order).
    printed = [(line["topic"], line["seq"]) for line in sub.lines()]
    assert [seq for topic, seq in printed if topic == "t.a"] == [1, 2, 3, 4]
    assert [seq for topic, seq in printed if topic == "t.b"] == [1]
    assert sub.stderr.decode().splitlines() == [
        "broker: disconnected: connection closed (1001): kicked; reconnecting",
        "broker: reconnected",
    ]


@pytest.mark.parametrize("value", ["0", "1001"])
async def test_sub_history_out_of_range_is_usage_error(value: str) -> None:
    done = await run_cli("sub", "t", "--history", value, "--url", "ws://127.0.0.1:1/ws")
    assert done.returncode == 2
    assert done.stderr.decode() == "broker: --history must be from 1 to 1000\n"


async def publish(broker: Broker, topic: str, data: Any) -> None:
    async with open_client(broker.url, reconnect=False) as client:
        await client.publish(topic, data)


async def test_sub_forbidden_pattern_fails(start_broker: BrokerFactory) -> None:
    broker = await start_broker(
        {"plugins": {"enabled": ["deny", "noauth"]}}, factories={"deny": deny_factory}
    )
    done = await run_cli("sub", "public", "secret.*", "--url", broker.url)
    assert done.returncode == 1
    assert done.stderr.decode() == "broker: forbidden: not allowed to subscribe to secret.*\n"
    assert broker.hub.router.pattern_count == 0


# -- check-config ------------------------------------------------------------------


async def test_check_config_accepts_a_good_file(tmp_path: Path) -> None:
    path = tmp_path / "broker.toml"
    path.write_text('[limits]\nmax_subscriptions = 10\n\n[queue]\npolicy = "conflate"\n')
    done = await run_cli("check-config", "-c", str(path))
    assert (done.returncode, done.stderr) == (0, b"")
    assert done.stdout.decode() == f"{path}: OK\n"


async def test_check_config_names_an_unknown_key(tmp_path: Path) -> None:
    path = tmp_path / "broker.toml"
    path.write_text("[limits]\nmax_subscriptionz = 10\n")
    done = await run_cli("check-config", "-c", str(path))
    assert done.returncode == 2
    assert done.stdout == b""
    stderr = done.stderr.decode()
    assert "limits.max_subscriptionz" in stderr
    assert "unknown key" in stderr


async def test_check_config_and_serve_suggest_the_table_meant(tmp_path: Path) -> None:
    path = tmp_path / "broker.toml"
    path.write_text("[listner]\nport = 9000\n")
    for command in ("check-config", "serve"):
        done = await run_cli(command, "-c", str(path))
        assert done.returncode == 2
        assert done.stderr.decode() == (
            "broker: configuration error: listner: unknown table; did you mean `listener`?\n"
        )


# -- help ----------------------------------------------------------------------------


async def test_help_is_plain_text() -> None:
    done = await run_cli("--help")
    assert done.returncode == 0
    text = done.stdout.decode()
    assert "The broker command: serve, check-config, pub, sub." in text
    assert "``" not in text


@pytest.mark.parametrize("command", ["pub", "sub"])
async def test_client_help_shows_the_default_url(command: str) -> None:
    done = await run_cli(command, "--help")
    assert done.returncode == 0
    # argparse wraps lines where it likes.
    assert "--url URL broker URL (default ws://127.0.0.1:8765/ws)" in " ".join(
        done.stdout.decode().split()
    )


async def test_serve_help_lists_the_overrides() -> None:
    done = await run_cli("serve", "--help")
    text = " ".join(done.stdout.decode().split())
    for flag, key in [("--host", "listener.host"), ("--port", "listener.port")]:
        assert f"{flag} " in text and f"overrides {key}" in text
    assert "--admin-port PORT health and metrics port (overrides admin.port" in text


# -- serve ---------------------------------------------------------------------------

LISTENING = re.compile(r"INFO broker\.server: listening on 127\.0\.0\.1:(\d+)/ws ")
ADMIN = re.compile(r"INFO broker\.server: admin HTTP on 127\.0\.0\.1:(\d+) ")


async def test_serve_flags_override_the_file(tmp_path: Path, nursery: trio.Nursery) -> None:
    # The file's ports are taken (by this test): only the flags' make it start.
    with held_port() as (taken, _), held_port() as (admin_taken, _):
        path = tmp_path / "broker.toml"
        path.write_text(f"[listener]\nport = {taken}\n\n[admin]\nport = {admin_taken}\n")
        serving = await start_cli(
            nursery, "serve", "-c", str(path), "--port", "0", "--admin-port", "0"
        )
        await wait_until(lambda: b"INFO broker: ready" in serving.stderr, serving)
    log = serving.stderr.decode()
    port = int(must(LISTENING.search(log)).group(1))
    admin_port = int(must(ADMIN.search(log)).group(1))
    assert port not in (0, taken) and admin_port not in (0, admin_taken, port)
    async with connect(f"ws://127.0.0.1:{port}/ws") as client:
        await client.sub("t")
        # A close without a reason: the disconnect line has no stray space.
        await client.ws.aclose(1001)
    await wait_until(lambda: b" disconnected (" in serving.stderr, serving)
    disconnected = serving.stderr.decode()
    assert re.search(r"^INFO broker\.server: c1 disconnected \(1001\)$", disconnected, re.M)
    serving.process.send_signal(signal.SIGTERM)
    assert await serving.wait() == 0, serving.stderr.decode()


@pytest.mark.parametrize(
    ("options", "taken_key", "where"),
    [
        ((), "listener.port", "listener.port in {file}"),
        ((), "admin.port", "admin.port in {file}"),
        (("--port", "{port}"), None, "listener.port, set by --port"),
        (("--admin-port", "{port}"), None, "admin.port, set by --admin-port"),
    ],
)
async def test_serve_port_in_use_names_the_address_and_the_key(
    tmp_path: Path, options: tuple[str, ...], taken_key: str | None, where: str
) -> None:
    with held_port() as (port, _):
        ports = {"listener.port": 0, "admin.port": 0}
        if taken_key is not None:
            ports[taken_key] = port
        path = tmp_path / "broker.toml"
        path.write_text(
            f"[listener]\nport = {ports['listener.port']}\n\n[admin]\nport = {ports['admin.port']}\n"
        )
        args = [option.format(port=port) for option in options]
        done = await run_cli("serve", "-c", str(path), *args)
    assert done.returncode == 1
    # Nothing claims to listen: every listener is bound before any is announced.
    assert done.stderr.decode() == (
        f"ERROR broker: cannot serve: cannot listen on 127.0.0.1:{port}: "
        f"{os.strerror(errno.EADDRINUSE)} ({where.format(file=path)})\n"
    )


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (
            ("--port", "70000"),
            "broker serve: error: argument --port: must be from 0 to 65535 (0: any free port), "
            "not 70000\n",
        ),
        (
            ("--admin-port", "http"),
            "broker serve: error: argument --admin-port: not a port number: 'http'\n",
        ),
        (
            ("--host", "0.0.0.0"),
            "broker: configuration error: --host: plain ws:// on non-loopback address "
            "'0.0.0.0': configure tls_cert and tls_key, or set allow_insecure = true "
            "(e.g. behind a TLS proxy)\n",
        ),
    ],
)
async def test_serve_bad_flags_are_named(args: tuple[str, ...], error: str) -> None:
    done = await run_cli("serve", *args)
    assert done.returncode == 2
    assert done.stderr.decode().splitlines(keepends=True)[-1] == error


@contextlib.contextmanager
def held_port() -> Iterator[tuple[int, socket.socket]]:
    """A loopback port that stays taken (listening) for the block."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1], sock


def must(match: re.Match[str] | None) -> re.Match[str]:
    assert match is not None
    return match
