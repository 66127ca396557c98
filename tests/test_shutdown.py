"""``broker serve`` in a subprocess: signals drain and stop it, bad config exits 2."""

from __future__ import annotations

import importlib.util
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
import trio_websocket

from broker import Broker, CloseCode, config_from_dict
from tests.conftest import CLOSE_TIMEOUT, BrokerFactory
from tests.helpers import WAIT, connect, free_port, raw_connect, wait_until

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")


def serve_command(config: Path) -> list[str]:
    if importlib.util.find_spec("broker.__main__") is not None:
        return [sys.executable, "-m", "broker", "serve", "-c", str(config)]
    # Until broker/__main__.py exists: the same entry point.
    return [
        sys.executable,
        "-c",
        "from broker.cli import main; raise SystemExit(main())",
        "serve",
        "-c",
        str(config),
    ]


@asynccontextmanager
async def serve(tmp_path: Path, toml: str) -> AsyncIterator[tuple[trio.Process, str, Path]]:
    """Run ``broker serve`` on a free loopback port; yield (process, url, log file)."""
    port = free_port()
    config = tmp_path / "broker.toml"
    # The admin listener on port 0 too, so that runs never collide.
    config.write_text(f'[listener]\nhost = "127.0.0.1"\nport = {port}\n{toml}\n[admin]\nport = 0\n')
    log = tmp_path / "stderr.log"
    with log.open("wb") as stderr:
        process = await trio.lowlevel.open_process(
            serve_command(config), stdin=subprocess.DEVNULL, stderr=stderr
        )
    try:
        url = f"ws://127.0.0.1:{port}/ws"
        # Ready when a whole WebSocket handshake succeeds (a bare TCP connect
        # that hangs up would leave the broker a pending handshake: see
        # test_socket_closed_before_the_handshake_does_not_delay_shutdown).
        with trio.fail_after(10):
            while True:
                try:
                    async with connect(url) as probe:
                        await probe.assert_alive()
                    break
                except trio_websocket.HandshakeError:
                    assert process.poll() is None, log.read_text()
                    await trio.sleep(0.02)
        yield process, url, log
    finally:
        if process.returncode is None:
            process.kill()
        with trio.move_on_after(5, shield=True):
            await process.wait()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_signal_drains_and_exits_0(tmp_path: Path, signum: signal.Signals) -> None:
    async with serve(tmp_path, "") as (process, url, log):
        async with connect(url) as sub, connect(url) as pub:
            await sub.sub("t")
            await pub.pub("t", "before")
            assert (await sub.recv())["data"] == "before"
            process.send_signal(signum)
            reason = await sub.expect_close()
            assert reason.code == 1001
            assert reason.reason == "server shutting down"
            assert (await pub.expect_close()).code == 1001
        with trio.fail_after(WAIT):
            assert await process.wait() == 0
    text = log.read_text()
    assert f"{signum.name}: draining and stopping" in text
    assert re.search(r"shutting down: closing \d+ connections", text)
    assert "stopped" in text


async def test_no_new_connections_while_stopping(tmp_path: Path) -> None:
    async with serve(tmp_path, "") as (process, url, _):
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(WAIT):
            assert await process.wait() == 0
        with pytest.raises(trio_websocket.HandshakeError):
            async with connect(url):
                pass


async def test_queued_messages_are_drained_before_the_close(tmp_path: Path) -> None:
    async with serve(tmp_path, "") as (process, url, _):
        async with connect(url) as sub, connect(url) as pub:
            await sub.sub("t")
            for i in range(50):
                await pub.send({"op": "pub", "topic": "t", "data": i})
            await pub.assert_alive()  # all 50 routed before the signal
            process.send_signal(signal.SIGTERM)
            got = []
            with trio.fail_after(WAIT):
                while True:
                    try:
                        got.append((await sub.recv())["data"])
                    except trio_websocket.ConnectionClosed as e:
                        reason = e.reason
                        break
            assert got == list(range(50))
            assert reason is not None
            assert reason.code == 1001
        with trio.fail_after(WAIT):
            assert await process.wait() == 0


async def test_config_error_exits_2_naming_the_key(tmp_path: Path) -> None:
    config = tmp_path / "broker.toml"
    config.write_text('[listener]\nhost = "127.0.0.1"\nport = 0\n\n[limits]\nmax_conections = 5\n')
    with trio.fail_after(10):
        result = await trio.run_process(
            serve_command(config), capture_stdout=True, capture_stderr=True, check=False
        )
    assert result.returncode == 2
    stderr = result.stderr.decode()
    assert "limits.max_conections" in stderr
    assert "unknown key" in stderr


async def test_plugin_config_error_exits_2(tmp_path: Path) -> None:
    config = tmp_path / "broker.toml"
    config.write_text(
        '[listener]\nhost = "127.0.0.1"\nport = 0\n\n[plugins]\nenabled = ["tokens"]\n\n'
        '[plugin.tokens]\ntokens = [{ id = "a", token = "short" }]\n'
    )
    with trio.fail_after(10):
        result = await trio.run_process(
            serve_command(config), capture_stdout=True, capture_stderr=True, check=False
        )
    assert result.returncode == 2
    assert "plugin.tokens.tokens[0].token" in result.stderr.decode()


async def test_socket_closed_before_the_handshake_does_not_delay_shutdown(
    tmp_path: Path,
) -> None:
    # E.g. a load balancer's TCP health check: connect, then close.
    async with serve(tmp_path, "[limits]\ndrain_timeout = 0.5\n") as (process, url, _):
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.aclose()
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(1):
            assert await process.wait() == 0


async def test_second_signal_stops_without_waiting(tmp_path: Path) -> None:
    async with serve(tmp_path, "") as (process, url, log):
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        # A client in the middle of its handshake: the drain waits for it.
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(b"GET /ws HTTP/1.1\r\n")
            process.send_signal(signal.SIGTERM)
            await wait_until(lambda: "shutting down" in log.read_text())
            assert process.poll() is None
            process.send_signal(signal.SIGTERM)
            with trio.fail_after(WAIT):
                assert await process.wait() == 0
    assert "second SIGTERM: stopping now" in log.read_text()


async def test_stop_with_a_slow_consumer_is_bounded() -> None:
    """In-process: a subscriber whose socket is full gets drain_timeout to take
    its queue, then the close frame and CLOSE_TIMEOUT to answer it; stop()
    returns within that bound, and the others get 1001 at once."""
    config = config_from_dict(
        {
            "listener": {"port": 0},
            "admin": {"port": 0},
            "queue": {"max_messages": 10, "max_bytes": 100_000},
            "limits": {"drain_timeout": 0.5},
        }
    )
    broker = Broker(config, close_timeout=CLOSE_TIMEOUT)
    async with trio.open_nursery() as nursery:
        await nursery.start(broker.serve)
        async with raw_connect(broker.url, rcvbuf=4096) as slow, connect(broker.url) as pub:
            await slow.send({"op": "sub", "id": 1, "topic": "t"})
            assert await slow.recv() == {"op": "ok", "id": 1}
            with trio.fail_after(WAIT):
                while broker.hub.overflows == 0:
                    await pub.pub("t", "x" * 8192)
            start = trio.current_time()
            broker.stop()
            assert (await pub.expect_close()).code == 1001
            await slow.read_until_eof()
    # serve() has returned: the nursery is done.
    assert trio.current_time() - start < 0.5 + CLOSE_TIMEOUT + 0.5
    assert not broker.connections


async def test_drain_writes_a_message_routed_just_before_the_close(
    start_broker: BrokerFactory,
) -> None:
    broker = await start_broker()
    async with connect(broker.url) as sub:
        await sub.sub("t")
        (conn,) = broker.connections
        # What Broker._drain does to a connection that a message was just
        # routed to (nothing in between lets its writer run).
        broker.hub.deliver("t", 1, "last words", None)
        conn.close(CloseCode.GOING_AWAY, "server shutting down", drain=True)
        assert await sub.recv() == {"op": "msg", "topic": "t", "seq": 1, "data": "last words"}
        assert (await sub.expect_close()).code == 1001
