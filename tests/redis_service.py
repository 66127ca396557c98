"""Real Redis for the engine tests: the machine's, or processes of our own.

* :data:`MACHINE_REDIS` is the machine's Redis (127.0.0.1:6379); tests that
  use it take a key prefix of their own (:func:`unique_prefix`) and delete
  its keys afterwards (:func:`delete_prefix`). :data:`needs_machine_redis`
  skips them when it is not there. :func:`machine_user` gives a test an ACL
  user of its own there, whose rights it may take away and give back (a
  Redis that refuses one broker's commands, and no one else's).
* :class:`RedisProcess` runs ``redis-server`` on a free port in a temporary
  directory, for the tests that stop, kill, slow down or restart Redis; a
  Redis Cluster is three of them (:func:`open_cluster`).
* :func:`redis_command` sends one command with the engine's own connection.
* :class:`TlsFiles`: a CA, a server certificate for 127.0.0.1 and a client
  certificate (trustme), for a ``redis-server`` serving TLS only.

Every wait is on a process or a socket, bounded (no sleeps as synchronisation).
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import tempfile
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
import trustme

from broker.engine.redis.connection import RedisConnection, Target
from broker.engine.redis.resp import Value
from tests.helpers import free_port

MACHINE_REDIS = ("127.0.0.1", 6379)
REDIS_SERVER = shutil.which("redis-server")
REDIS_CLI = shutil.which("redis-cli")
#: Bound on starting a redis-server (and on one command).
WAIT = 10.0


def _machine_redis_down() -> str | None:
    try:
        with socket.create_connection(MACHINE_REDIS, timeout=1) as s:
            s.sendall(b"PING\r\n")
            if not s.recv(16).startswith(b"+PONG"):
                return "did not answer PING"
    except OSError as e:
        return str(e)
    return None


#: The machine's Redis (tests use key prefixes of their own on it).
MACHINE_URL = "redis://127.0.0.1:6379/0"
#: Why the machine's Redis cannot be used (None: it can).
MACHINE_REDIS_DOWN = _machine_redis_down()
needs_machine_redis = pytest.mark.skipif(
    MACHINE_REDIS_DOWN is not None,
    reason=f"Redis is not reachable at 127.0.0.1:6379: {MACHINE_REDIS_DOWN}",
)
needs_redis_server = pytest.mark.skipif(
    REDIS_SERVER is None or REDIS_CLI is None, reason="redis-server and redis-cli are not installed"
)


def unique_prefix() -> str:
    return f"tbtest:{uuid.uuid4().hex[:12]}:"


@dataclass(frozen=True)
class TlsFiles:
    """PEM files of a test CA, a server certificate (127.0.0.1, localhost)
    and a client certificate, all issued by it."""

    ca: str
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str

    @classmethod
    def make(cls, directory: Path) -> TlsFiles:
        ca = trustme.CA()
        paths = {name: str(directory / f"{name}.pem") for name in cls.__dataclass_fields__}
        ca.cert_pem.write_to_path(paths["ca"])
        for who, cert in (
            ("server", ca.issue_cert("127.0.0.1", "localhost")),
            ("client", ca.issue_cert("broker.example")),
        ):
            cert.cert_chain_pems[0].write_to_path(paths[f"{who}_cert"])
            cert.private_key_pem.write_to_path(paths[f"{who}_key"])
        return cls(**paths)

    def target(self, url: str) -> Target:
        return Target.from_url(
            url, tls_ca=self.ca, tls_cert=self.client_cert, tls_key=self.client_key
        )


async def redis_command(url: str | Target, *args: bytes | str | int) -> Value:
    """One command on a fresh connection to *url* (or *Target*)."""
    target = Target.from_url(url) if isinstance(url, str) else url
    async with trio.open_nursery() as nursery:
        conn = await nursery.start(RedisConnection(target).run, WAIT)
        try:
            with trio.fail_after(WAIT):
                return await conn.call(*args)
        finally:
            conn.close()


async def delete_prefix(url: str, prefix: str) -> None:
    """Delete every key of *prefix* (SCAN, then DEL)."""
    async with trio.open_nursery() as nursery:
        conn = await nursery.start(RedisConnection(Target.from_url(url)).run, WAIT)
        with trio.fail_after(WAIT):
            cursor: Value = b"0"
            while True:
                reply = await conn.call("SCAN", cursor, "MATCH", prefix + "*", "COUNT", 1000)
                assert isinstance(reply, list)
                cursor, keys = reply
                assert isinstance(keys, list)
                if keys:
                    await conn.call("DEL", *keys)
                if cursor == b"0":
                    break
        conn.close()


@dataclass(frozen=True)
class MachineUser:
    """An ACL user of a test's own on the machine's Redis: every command,
    every channel, the keys of its prefix."""

    name: str
    password: str

    @property
    def url(self) -> str:
        """The machine's Redis, logged in as this user."""
        return f"redis://{self.name}:{self.password}@{MACHINE_REDIS[0]}:{MACHINE_REDIS[1]}/0"

    async def deny(self, command: str) -> None:
        """Redis refuses *command* to this user from now on (``NOPERM``),
        on the connections it has open too."""
        await redis_command(MACHINE_URL, "ACL", "SETUSER", self.name, f"-{command}")

    async def allow(self, command: str) -> None:
        await redis_command(MACHINE_URL, "ACL", "SETUSER", self.name, f"+{command}")

    async def kill_pubsub(self) -> int:
        """Close this user's pub/sub connections (a broker's fan-out link);
        how many there were."""
        killed = await redis_command(
            MACHINE_URL, "CLIENT", "KILL", "USER", self.name, "TYPE", "pubsub"
        )
        assert isinstance(killed, int)
        return killed


@asynccontextmanager
async def machine_user(prefix: str) -> AsyncIterator[MachineUser]:
    """A :class:`MachineUser` for the keys of *prefix*, deleted at the end."""
    user = MachineUser(prefix.replace(":", "-").strip("-"), uuid.uuid4().hex)
    await redis_command(
        MACHINE_URL,
        "ACL",
        "SETUSER",
        user.name,
        "reset",
        "on",
        f">{user.password}",
        f"~{prefix}*",
        "&*",
        "+@all",
    )
    try:
        yield user
    finally:
        with trio.CancelScope(shield=True):
            await redis_command(MACHINE_URL, "ACL", "DELUSER", user.name)


class RedisProcess:
    """One ``redis-server`` of a test's own (no persistence unless asked);
    with *tls*, it serves TLS only (client certificates optional)."""

    def __init__(
        self, directory: Path, port: int | None = None, *extra: str, tls: TlsFiles | None = None
    ) -> None:
        self.directory = directory
        self.port = port or free_port()
        self.extra = extra
        self.tls = tls
        self.process: trio.Process | None = None

    @property
    def url(self) -> str:
        scheme = "rediss" if self.tls is not None else "redis"
        return f"{scheme}://127.0.0.1:{self.port}/0"

    @property
    def target(self) -> Target:
        """How the tests reach it (the default user; the client certificate)."""
        return self.tls.target(self.url) if self.tls is not None else Target.from_url(self.url)

    async def command(self, *args: bytes | str | int) -> Value:
        return await redis_command(self.target, *args)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> None:
        assert REDIS_SERVER is not None
        tls = self.tls
        listen = ["--port", str(self.port)]
        if tls is not None:
            listen = ["--port", "0", "--tls-port", str(self.port)]
            listen += ["--tls-cert-file", tls.server_cert, "--tls-key-file", tls.server_key]
            listen += ["--tls-ca-cert-file", tls.ca, "--tls-auth-clients", "optional"]
        argv = [
            REDIS_SERVER,
            *listen,
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.directory),
            "--daemonize",
            "no",
            "--enable-debug-command",
            "local",
            *self.extra,
        ]
        log = (self.directory / f"redis-{self.port}.log").open("ab")
        self.process = await trio.lowlevel.open_process(
            argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log
        )
        log.close()
        await self.wait_ready()

    async def wait_ready(self) -> None:
        """Poll (bounded: an external process) until it answers PING."""
        with trio.fail_after(WAIT):
            while True:
                assert self.process is not None and self.process.returncode is None, self.log_text()
                try:
                    if await self.command("PING") == b"PONG":
                        return
                except Exception:
                    pass
                await trio.sleep(0.02)

    def log_text(self) -> str:
        path = self.directory / f"redis-{self.port}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    async def kill(self) -> None:
        """SIGKILL: everything in memory is gone."""
        process = self.process
        assert process is not None
        process.send_signal(signal.SIGKILL)
        with trio.fail_after(WAIT):
            await process.wait()
        self.process = None

    async def restart(self) -> None:
        await self.kill()
        await self.start()

    async def stop(self) -> None:
        if self.process is not None and self.process.returncode is None:
            await self.kill()


@asynccontextmanager
async def open_redis(*extra: str, tls: TlsFiles | None = None) -> AsyncIterator[RedisProcess]:
    """A ``redis-server`` on a free port, killed at the end."""
    directory = Path(tempfile.mkdtemp(prefix="tb-redis-"))
    server = RedisProcess(directory, None, *extra, tls=tls)
    try:
        await server.start()
        yield server
    finally:
        with trio.CancelScope(shield=True):
            await server.stop()
        shutil.rmtree(directory, ignore_errors=True)


@asynccontextmanager
async def open_cluster(
    masters: int = 3, replicas: int = 0, *extra: str, tls: TlsFiles | None = None
) -> AsyncIterator[list[RedisProcess]]:
    """A Redis Cluster of *masters* (and *replicas* per master) on free
    ports; with *tls*, TLS only (the cluster bus and replication too)."""
    directory = Path(tempfile.mkdtemp(prefix="tb-cluster-"))
    servers: list[RedisProcess] = []
    try:
        for _ in range(masters * (1 + replicas)):
            port = cluster_port()
            node_dir = directory / str(port)
            node_dir.mkdir()
            server = RedisProcess(
                node_dir,
                port,
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                f"nodes-{port}.conf",
                "--cluster-node-timeout",
                "1000",
                # A replica takes over however old its copy (a test's cluster
                # is young; the default may refuse to fail over).
                "--cluster-replica-validity-factor",
                "0",
                *(("--tls-cluster", "yes", "--tls-replication", "yes") if tls else ()),
                *extra,
                tls=tls,
            )
            await server.start()
            servers.append(server)
        login = []
        if tls is not None:
            login = [
                "--tls",
                "--cacert",
                tls.ca,
                "--cert",
                tls.client_cert,
                "--key",
                tls.client_key,
            ]
        await cli(
            *login,
            "--cluster",
            "create",
            *(s.address for s in servers),
            "--cluster-replicas",
            str(replicas),
            "--cluster-yes",
        )
        await wait_cluster_ok(servers)
        yield servers
    finally:
        with trio.CancelScope(shield=True):
            for server in servers:
                await server.stop()
        shutil.rmtree(directory, ignore_errors=True)


def cluster_port() -> int:
    """A free port whose cluster bus port (+10000) is free and valid too."""
    while True:
        port = free_port()
        if port > 55535:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port


async def wait_cluster_ok(servers: Sequence[RedisProcess]) -> None:
    """Poll (bounded) until every running node says ``cluster_state:ok``."""
    with trio.fail_after(WAIT * 2):
        while True:
            states = []
            for server in servers:
                if server.process is None:
                    continue
                info = await server.command("CLUSTER", "INFO")
                assert isinstance(info, bytes)
                states.append(b"cluster_state:ok" in info)
            if all(states):
                return
            await trio.sleep(0.05)


async def cli(*args: str) -> str:
    """Run ``redis-cli`` (bounded); its output."""
    assert REDIS_CLI is not None
    with trio.fail_after(WAIT * 3):
        result = await trio.run_process(
            [REDIS_CLI, *args], capture_stdout=True, capture_stderr=True, check=False
        )
    out = result.stdout.decode(errors="replace") + result.stderr.decode(errors="replace")
    assert result.returncode == 0, out
    return out
