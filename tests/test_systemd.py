"""systemd integration: sd_notify, the watchdog, socket activation.

The parsing of the environment is tested as pure functions; the protocol
with a real Unix datagram socket standing in for systemd's, and a real
``broker serve`` subprocess: READY=1 once it serves, STATUS= lines,
WATCHDOG=1 pings, RELOADING=1 + MONOTONIC_USEC then READY=1 around a reload,
STOPPING=1 at shutdown. Socket activation passes listening sockets to the
subprocess as fds 3, 4, ... with LISTEN_FDS/LISTEN_PID/LISTEN_FDNAMES.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from pathlib import Path
from typing import cast

import pytest
import trio
import trio_websocket
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, Request

from broker import Broker, config_from_dict
from broker.core.errors import ConfigError
from broker.ops.systemd import (
    ListenFd,
    Notifier,
    adopt_sockets,
    listen_fds,
    monotonic_usec,
    watchdog_interval,
)
from tests.helpers import connect, free_port
from tests.service import (
    WAIT,
    http_get,
    listening_socket,
    open_notify_socket,
    run_broker,
)

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="systemd protocols: Linux")


# -- listen_fds: a pure function of the environment ------------------------------------


def test_listen_fds_for_this_process() -> None:
    env = {"LISTEN_PID": "42", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "ws:admin", "OTHER": "x"}
    assert listen_fds(env, 42) == [ListenFd(3, "ws"), ListenFd(4, "admin")]
    assert env == {"OTHER": "x"}  # unset, like sd_listen_fds(1)


def test_listen_fds_meant_for_another_process() -> None:
    env = {"LISTEN_PID": "41", "LISTEN_FDS": "1"}
    assert listen_fds(env, 42) == []
    assert env == {}  # still unset: children must not see them


def test_listen_fds_can_keep_the_variables() -> None:
    env = {"LISTEN_PID": "42", "LISTEN_FDS": "1"}
    assert listen_fds(env, 42, unset=False) == [ListenFd(3, "unknown")]
    assert env == {"LISTEN_PID": "42", "LISTEN_FDS": "1"}


@pytest.mark.parametrize(
    "env",
    [
        {},
        {"LISTEN_FDS": "1"},
        {"LISTEN_PID": "42"},
        {"LISTEN_PID": "42", "LISTEN_FDS": "0"},
    ],
)
def test_no_sockets_passed(env: dict[str, str]) -> None:
    assert listen_fds(env, 42) == []


def test_names_that_do_not_match_the_count_are_unknown() -> None:
    env = {"LISTEN_PID": "7", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "ws"}
    assert listen_fds(env, 7) == [ListenFd(3, "unknown"), ListenFd(4, "unknown")]


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"LISTEN_PID": "x", "LISTEN_FDS": "1"}, "LISTEN_PID"),
        ({"LISTEN_PID": "7", "LISTEN_FDS": "two"}, "LISTEN_FDS"),
    ],
)
def test_malformed_variables_raise(env: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        listen_fds(env, 7)


# -- the watchdog interval ----------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "42"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "41"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval_is_half_of_watchdog_usec(
    env: dict[str, str], expected: float | None
) -> None:
    assert watchdog_interval(env, 42) == expected


# -- adopting passed sockets --------------------------------------------------------


def test_a_single_unnamed_socket_is_the_websocket_listener() -> None:
    with listening_socket() as sock:
        fd = os.dup(sock.fileno())
        os.set_inheritable(fd, True)
        adopted = adopt_sockets([ListenFd(fd, "unknown")])
        try:
            (ws,) = adopted["ws"]
            assert ws.getsockname() == sock.getsockname()
            assert not os.get_inheritable(fd)  # close-on-exec, like sd_listen_fds
        finally:
            for socks in adopted.values():
                for s in socks:
                    s.close()


def test_unknown_names_are_refused_when_several_sockets_are_passed() -> None:
    with listening_socket() as a, listening_socket() as b:
        fds = [ListenFd(a.fileno(), "ws"), ListenFd(b.fileno(), "metrics")]
        with pytest.raises(ValueError, match="FileDescriptorName"):
            adopt_sockets(fds)


def test_a_socket_that_is_not_listening_is_refused() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        with pytest.raises(ValueError, match="not listening"):
            adopt_sockets([ListenFd(sock.fileno(), "ws")])
        sock.getsockname()  # detached on refusal: still open here


def test_a_datagram_socket_is_refused() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        with pytest.raises(ValueError, match="not a TCP socket"):
            adopt_sockets([ListenFd(sock.fileno(), "ws")])


async def test_broker_serves_on_inherited_sockets_in_process() -> None:
    ws_sock, admin_sock = listening_socket(), listening_socket()
    ws_port, admin_port = ws_sock.getsockname()[1], admin_sock.getsockname()[1]
    # The configured ports are ignored in favour of the passed sockets.
    config = config_from_dict({"listener": {"port": 1}, "admin": {"port": 1}})
    broker = Broker(config, sockets={"ws": [ws_sock], "admin": [admin_sock]})
    async with trio.open_nursery() as nursery:
        await nursery.start(broker.serve)
        assert broker.addresses == [("127.0.0.1", ws_port)]
        assert broker.admin_addresses == [("127.0.0.1", admin_port)]
        async with connect(f"ws://127.0.0.1:{ws_port}/ws") as client:
            await client.assert_alive()
        status, _, body = await http_get("127.0.0.1", admin_port, "/healthz")
        assert (status, body) == (200, b"ok\n")
        broker.stop()
    assert ws_sock.fileno() == -1  # closed (never shut down) when the broker stopped


async def test_plain_ws_on_an_inherited_public_socket_is_refused() -> None:
    """The loopback rule applies to the socket actually served, not the config."""
    sock = socket.socket()
    sock.bind(("0.0.0.0", 0))
    sock.listen(1)
    broker = Broker(config_from_dict({"admin": {"enabled": False}}), sockets={"ws": [sock]})
    try:
        with pytest.RaisesGroup(pytest.RaisesExc(ConfigError, match="socket activation")):
            async with trio.open_nursery() as nursery:
                await nursery.start(broker.serve)
    finally:
        sock.close()


# -- sd_notify ----------------------------------------------------------------------


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
async def test_notifier_sends_datagrams(abstract: bool) -> None:
    async with open_notify_socket(abstract=abstract) as notify:
        notifier = Notifier(notify.address)
        before = monotonic_usec()
        assert notifier.ready("up")
        assert notifier.reloading()
        assert notifier.watchdog()
        assert notifier.stopping()
        notifier.close()
        await notify.wait_key("STOPPING")
    assert notify.keys() == ["READY=1", "RELOADING=1", "WATCHDOG=1", "STOPPING=1"]
    assert notify.messages[0]["STATUS"] == "up"
    assert before <= int(notify.messages[1]["MONOTONIC_USEC"]) <= monotonic_usec()


def test_notifier_without_systemd_does_nothing() -> None:
    env = {"PATH": "/bin"}
    notifier = Notifier.from_environ(env)
    assert not notifier.enabled
    assert not notifier.ready()
    assert not notifier.watchdog()


def test_notifier_takes_notify_socket_out_of_the_environment() -> None:
    env = {"NOTIFY_SOCKET": "@x"}
    assert Notifier.from_environ(env).enabled
    assert env == {}


def test_notifier_with_a_vanished_socket_fails_quietly(tmp_path: Path) -> None:
    assert not Notifier(str(tmp_path / "gone")).ready()


# -- the protocol as a broker subprocess speaks it ------------------------------------


def write_config(tmp_path: Path, port: int, extra: str = "") -> Path:
    config = tmp_path / "broker.toml"
    config.write_text(
        f'[listener]\nhost = "127.0.0.1"\nport = {port}\n\n[admin]\nport = 0\n{extra}'
    )
    return config


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
async def test_notify_sequence_of_a_broker_process(tmp_path: Path, abstract: bool) -> None:
    port = free_port()
    config = write_config(tmp_path, port)
    async with open_notify_socket(abstract=abstract) as notify:
        # WatchdogSec=0.2s: pings every 0.1 s.
        env = {"WATCHDOG_USEC": "200000"}
        async with run_broker(config, notify, env=env) as broker:
            ready = notify.messages[broker.ready_at]
            assert ready["STATUS"].startswith("0 connections, 0 subscriptions")
            async with connect(f"ws://127.0.0.1:{port}/ws") as client:
                await client.sub("a.b")
                status = await notify.wait_for(
                    lambda m: m.get("STATUS", "").startswith("1 connections, 1 subscriptions")
                )
                watchdog = await notify.wait_key("WATCHDOG", start=status)
                before = monotonic_usec()
                reloaded = await broker.reload()
                assert reloaded["READY"] == "1"
                await client.assert_alive()  # a reload drops no client
            code = await broker.stop()
        assert code == 0
        stopping = await notify.wait_key("STOPPING")
    assert broker.ready_at < status < watchdog < stopping
    keys = notify.keys()
    # State changes in order (watchdog pings anywhere after READY).
    states = [k for k in keys if not k.startswith("WATCHDOG")]
    assert states == ["READY=1", "RELOADING=1", "READY=1", "STOPPING=1"]
    assert keys.index("WATCHDOG=1") > keys.index("READY=1")
    reloading = next(m for m in notify.messages if "RELOADING" in m)
    assert before <= int(reloading["MONOTONIC_USEC"]) <= monotonic_usec()
    assert "NOTIFY_SOCKET" not in os.environ  # the test's own environment is untouched


async def test_no_ready_before_the_listener_is_bound(tmp_path: Path) -> None:
    """READY=1 means the port accepts connections."""
    port = free_port()
    config = write_config(tmp_path, port)
    async with open_notify_socket() as notify, run_broker(config, notify) as broker:
        # No retry loop: connecting right after READY=1 must work.
        async with connect(f"ws://127.0.0.1:{port}/ws") as client:
            await client.assert_alive()
        assert "ready" in broker.log_text()


async def test_without_notify_socket_nothing_is_sent(tmp_path: Path) -> None:
    """A plain start (no systemd): the broker runs, and the variable is absent."""
    port = free_port()
    config = write_config(tmp_path, port)
    async with open_notify_socket() as notify:
        env = {"NOTIFY_SOCKET": ""}
        async with run_broker(config, notify, env=env, wait_ready=False) as broker:
            with trio.fail_after(WAIT):
                while True:
                    try:
                        async with connect(f"ws://127.0.0.1:{port}/ws") as client:
                            await client.assert_alive()
                        break
                    except trio_websocket.HandshakeError:
                        assert broker.process.poll() is None, broker.log_text()
                        await trio.sleep(0.02)
            assert await broker.stop() == 0
    assert notify.messages == []


# -- socket activation with a subprocess ----------------------------------------------


async def test_socket_activation_serves_on_passed_sockets(tmp_path: Path) -> None:
    ws_sock, admin_sock = listening_socket(), listening_socket()
    ws_port, admin_port = ws_sock.getsockname()[1], admin_sock.getsockname()[1]
    # A port the broker could not bind (held by us): it must not try.
    with listening_socket() as taken:
        config = write_config(tmp_path, taken.getsockname()[1])
        async with open_notify_socket() as notify:
            fds = [ws_sock.fileno(), admin_sock.fileno()]
            async with run_broker(config, notify, listen_fds=fds, fd_names=["ws", "admin"]) as b:
                async with connect(f"ws://127.0.0.1:{ws_port}/ws") as client:
                    await client.assert_alive()
                status, _, body = await http_get("127.0.0.1", admin_port, "/readyz")
                assert (status, body) == (200, b"ready\n")
                assert await b.stop() == 0
        log = b.log_text()
    assert f"listening on 127.0.0.1:{ws_port}/ws (plain, loopback only, socket activation)" in log
    assert f"admin HTTP on 127.0.0.1:{admin_port}" in log
    ws_sock.close()
    admin_sock.close()


async def test_a_restart_loses_no_connection_attempt(tmp_path: Path) -> None:
    """The socket outlives the process: a client connecting while no broker
    runs is queued by the kernel and served by the next one."""
    ws_sock = listening_socket()
    port = ws_sock.getsockname()[1]
    config = write_config(tmp_path, port)
    async with open_notify_socket() as notify:
        async with run_broker(config, notify, listen_fds=[ws_sock.fileno()]) as first:
            async with connect(f"ws://127.0.0.1:{port}/ws") as client:
                await client.assert_alive()
            assert await first.stop() == 0
        # No broker runs now; the listening socket (held here, as systemd
        # holds it) still completes TCP handshakes into its backlog.
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            ws = WSConnection(ConnectionType.CLIENT)
            await stream.send_all(ws.send(Request(host=f"127.0.0.1:{port}", target="/ws")))
            async with run_broker(config, notify, listen_fds=[ws_sock.fileno()]) as second:
                with trio.fail_after(WAIT):
                    while not any(isinstance(e, AcceptConnection) for e in ws.events()):
                        data = await stream.receive_some(4096)
                        assert data, "the broker closed the queued connection"
                        ws.receive_data(data)
                await stream.aclose()  # so the drain need not wait for its close
                assert await second.stop() == 0
    ws_sock.close()


async def test_listen_fds_for_another_pid_are_ignored(tmp_path: Path) -> None:
    """LISTEN_PID naming another process: the broker binds its own port."""
    port = free_port()
    config = write_config(tmp_path, port)
    env = {"LISTEN_FDS": "1", "LISTEN_PID": "1"}
    async with open_notify_socket() as notify, run_broker(config, notify, env=env) as broker:
        async with connect(f"ws://127.0.0.1:{port}/ws") as client:
            await client.assert_alive()
        assert "socket activation" not in broker.log_text()


async def test_sighup_during_start_up_is_a_reload_after_ready(tmp_path: Path) -> None:
    """SIGHUP's default action terminates: once the broker runs (here: it
    has logged its listener, before READY=1), a SIGHUP is queued as a reload
    that follows READY=1."""
    port = free_port()
    config = write_config(tmp_path, port)
    async with (
        open_notify_socket() as notify,
        run_broker(config, notify, wait_ready=False) as broker,
    ):
        with trio.fail_after(WAIT):
            while "listening on" not in broker.log_text():  # noqa: ASYNC110
                await trio.sleep(0.01)
        broker.process.send_signal(signal.SIGHUP)
        ready = await notify.wait_key("READY")
        reloading = await notify.wait_key("RELOADING", start=ready)
        await notify.wait_key("READY", start=reloading)
        assert broker.process.poll() is None
        assert await broker.stop() == 0


# -- the watchdog only pings a healthy loop --------------------------------------------


class LaggingBroker:
    """What the watchdog task reads from a broker."""

    def __init__(self, lag: float) -> None:
        self.loop_lag = lag
        self.loop_lag_at: float | None = None


async def test_watchdog_withholds_pings_while_the_loop_lags(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from broker.cli import _watchdog

    broker = LaggingBroker(lag=1.0)
    async with open_notify_socket() as notify, trio.open_nursery() as nursery:
        notifier = Notifier(notify.address)
        nursery.start_soon(_watchdog, cast("Broker", broker), notifier, 0.01)
        with trio.fail_after(WAIT):
            while "withholding the watchdog ping" not in caplog.text:  # noqa: ASYNC110
                await trio.sleep(0.01)
        assert notify.messages == []
        broker.loop_lag = 0.001
        broker.loop_lag_at = trio.current_time()
        await notify.wait_key("WATCHDOG")
        # A lag monitor that stopped sampling (its samples grow old) is no
        # sign of health either.
        broker.loop_lag_at = trio.current_time() - 60
        count = len(caplog.records)
        with trio.fail_after(WAIT):
            while len(caplog.records) == count:  # noqa: ASYNC110
                await trio.sleep(0.01)
        assert "lag monitor stalled" in caplog.text
        nursery.cancel_scope.cancel()
