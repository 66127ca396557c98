"""``broker serve`` as systemd runs it, for the operations tests.

* :class:`NotifySocket` is a fake ``$NOTIFY_SOCKET``: a Unix datagram socket
  (a filesystem path, or an abstract ``@name``) whose datagrams are parsed
  into ``KEY=VALUE`` dicts, in arrival order. Tests wait on it, as systemd
  does: a broker is up when ``READY=1`` arrives, a reload is done at the
  ``READY=1`` after ``RELOADING=1``.
* :func:`run_broker` starts ``python -m broker serve -c FILE`` with that
  socket (and optionally sockets passed the systemd way), waits for
  ``READY=1``, and kills the process at the end if it is still running.
* :func:`http_get` is a minimal HTTP/1.1 client (h11) for the admin endpoints.

No sleeps: every wait is on a datagram, a process or a socket, bounded by
``WAIT``.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import h11
import trio

#: Bound on one wait (a subprocess starts an interpreter).
WAIT = 10.0

Notification = dict[str, str]


class NotifySocket:
    """A fake ``$NOTIFY_SOCKET`` collecting the datagrams sent to it."""

    def __init__(self, sock: trio.socket.SocketType, address: str) -> None:
        self.sock = sock
        #: The value to put in ``$NOTIFY_SOCKET``.
        self.address = address
        #: Every datagram received, parsed, in order.
        self.messages: list[Notification] = []
        self._changed = trio.Event()

    async def _receive(self) -> None:
        while True:
            data = await self.sock.recv(65536)
            fields = dict(line.split("=", 1) for line in data.decode().split("\n") if "=" in line)
            self.messages.append(fields)
            self._changed.set()
            self._changed = trio.Event()

    async def wait_for(
        self, predicate: Callable[[Notification], bool], start: int = 0, seconds: float = WAIT
    ) -> int:
        """The index of the first message from *start* on matching *predicate*."""
        with trio.fail_after(seconds):
            while True:
                for i in range(start, len(self.messages)):
                    if predicate(self.messages[i]):
                        return i
                await self._changed.wait()

    async def wait_key(self, key: str, value: str = "1", start: int = 0) -> int:
        return await self.wait_for(lambda m: m.get(key) == value, start)

    def keys(self) -> list[str]:
        """``KEY=VALUE`` of the state messages (not STATUS/MONOTONIC_USEC), in order."""
        out = []
        for message in self.messages:
            for key in ("READY", "RELOADING", "STOPPING", "WATCHDOG"):
                if key in message:
                    out.append(f"{key}={message[key]}")
        return out


@asynccontextmanager
async def open_notify_socket(*, abstract: bool = False) -> AsyncIterator[NotifySocket]:
    """A bound datagram socket receiving in the background."""
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    directory = None
    try:
        if abstract:
            name = f"trio-broker-test-{os.getpid()}-{id(sock)}"
            await sock.bind("\0" + name)
            address = "@" + name
        else:
            # A short path: sun_path holds 108 bytes.
            directory = tempfile.mkdtemp(prefix="tb-")
            address = os.path.join(directory, "notify")
            await sock.bind(address)
        notify = NotifySocket(sock, address)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(notify._receive)
            yield notify
            nursery.cancel_scope.cancel()
    finally:
        sock.close()
        if directory is not None:
            shutil.rmtree(directory, ignore_errors=True)


@dataclass
class BrokerProcess:
    process: trio.Process
    notify: NotifySocket
    log: Path
    #: Index of the READY=1 that ended the start.
    ready_at: int = 0
    extra: dict[str, object] = field(default_factory=dict)

    def log_text(self) -> str:
        return self.log.read_text()

    async def reload(self) -> Notification:
        """SIGHUP, then wait for RELOADING=1 and the READY=1 after it."""
        import signal

        start = len(self.notify.messages)
        self.process.send_signal(signal.SIGHUP)
        reloading = await self.notify.wait_key("RELOADING", start=start)
        ready = await self.notify.wait_key("READY", start=reloading + 1)
        return self.notify.messages[ready]

    async def stop(self) -> int:
        import signal

        self.process.send_signal(signal.SIGTERM)
        with trio.fail_after(WAIT):
            return await self.process.wait()


#: Sockets for a child: ``fd`` numbers in this process, passed as 3, 4, ...
LAUNCHER = """
import fcntl, os, sys
fds = [int(x) for x in sys.argv[1].split(",") if x]
# Copies out of the way of 3, 4, ... first, then into place.
high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in fds]
for fd in fds:
    os.close(fd)
for i, fd in enumerate(high):
    os.dup2(fd, 3 + i)
    os.close(fd)
os.environ["LISTEN_PID"] = str(os.getpid())  # exec keeps the pid
os.execv(sys.executable, [sys.executable, *sys.argv[2:]])
"""


@asynccontextmanager
async def run_broker(
    config: Path,
    notify: NotifySocket,
    *,
    env: Mapping[str, str] | None = None,
    listen_fds: Sequence[int] = (),
    fd_names: Sequence[str] | None = None,
    wait_ready: bool = True,
) -> AsyncIterator[BrokerProcess]:
    """``python -m broker serve -c CONFIG`` under a fake systemd."""
    environ = {
        k: v for k, v in os.environ.items() if not k.startswith(("LISTEN_", "WATCHDOG_", "NOTIFY_"))
    }
    environ["NOTIFY_SOCKET"] = notify.address
    environ.update(env or {})
    argv = [sys.executable, "-m", "broker", "serve", "-c", str(config)]
    pass_fds: tuple[int, ...] = ()
    if listen_fds:
        environ["LISTEN_FDS"] = str(len(listen_fds))
        if fd_names is not None:
            environ["LISTEN_FDNAMES"] = ":".join(fd_names)
        argv = [sys.executable, "-c", LAUNCHER, ",".join(map(str, listen_fds)), *argv[1:]]
        pass_fds = tuple(listen_fds)
    log = config.parent / "stderr.log"
    start = len(notify.messages)
    with log.open("wb") as stderr:
        process = await trio.lowlevel.open_process(
            argv, stdin=subprocess.DEVNULL, stderr=stderr, env=environ, pass_fds=pass_fds
        )
    running = BrokerProcess(process, notify, log)
    try:
        if wait_ready:
            with trio.fail_after(WAIT):
                async with trio.open_nursery() as nursery:

                    async def exited() -> None:
                        await process.wait()
                        raise AssertionError(
                            f"broker exited {process.returncode}:\n{log.read_text()}"
                        )

                    nursery.start_soon(exited)
                    running.ready_at = await notify.wait_key("READY", start=start)
                    nursery.cancel_scope.cancel()
        yield running
    finally:
        if process.returncode is None:
            process.kill()
        with trio.move_on_after(5, shield=True):
            await process.wait()


async def http_get(
    host: str, port: int, target: str, headers: Sequence[tuple[str, str]] = (), method: str = "GET"
) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 request; (status, headers, body)."""
    conn = h11.Connection(h11.CLIENT)
    with trio.fail_after(WAIT):
        stream = await trio.open_tcp_stream(host, port)
        async with stream:
            request = h11.Request(
                method=method,
                target=target,
                headers=[("Host", f"{host}:{port}"), ("Connection", "close"), *headers],
            )
            await stream.send_all(conn.send(request) + (conn.send(h11.EndOfMessage()) or b""))
            status = 0
            response_headers: dict[str, str] = {}
            body = bytearray()
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await stream.receive_some(65536))
                elif isinstance(event, h11.Response):
                    status = event.status_code
                    response_headers = {k.decode(): v.decode() for k, v in event.headers}
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                    return status, response_headers, bytes(body)


def listening_socket(host: str = "127.0.0.1") -> socket.socket:
    """A listening TCP socket on a free port, as a .socket unit would pass it."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    sock.listen(128)
    return sock
