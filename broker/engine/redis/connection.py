"""One connection to a Redis server, on trio: pipelined commands and pushes.

:class:`RedisConnection` speaks RESP3 (``HELLO 3``) over TCP, TLS or a Unix
socket. Any number of tasks may send commands at once (:meth:`call`): each
command is queued, a writer task sends whatever is queued in one write, a
reader task hands each reply to the command that waits for it (Redis answers
in order). So concurrent publishes share round trips: that is the engine's
pipelining. Push messages (pub/sub deliveries) go to :attr:`on_push` as they
are parsed, and :attr:`on_batch` is called after each socket read: the
engine's fan-out reader delivers a whole read's messages, then flushes once.

Nothing here grows without bound on its own: the reader reads only as fast
as the pushes are handled (a slow node makes Redis buffer, and Redis drops a
subscriber whose buffer passes ``client-output-buffer-limit``), and the
number of commands in flight is the caller's to bound (the engine does).

:meth:`RedisConnection.run` owns the connection: the caller starts it in a
nursery (``conn = await nursery.start(RedisConnection(target).run, timeout)``),
it returns once the connection is closed or lost, never raising after it
started: every waiting command then gets :class:`ConnectionLost`, and
:attr:`RedisConnection.closed` is set.

This module was written instead of using coredis for the engine's hot paths:
measured on this project's 2-CPU machine, a coredis command costs 1.5-2.3x
the client CPU of this one at the connection level and 10-19x through the
client API, and coredis keeps push messages in an unbounded buffer
(docs/performance.md, "The Redis client"; bench/redis_client_cost.py).
"""

from __future__ import annotations

import logging
import math
import ssl
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import trio

from broker.core.errors import ConfigError
from broker.engine.redis.resp import Parser, ProtocolError, Push, ReplyError, Value, pack

__all__ = ["ConnectionFailed", "ConnectionLost", "RedisConnection", "Reply", "Target"]

log = logging.getLogger("broker.engine.redis")

#: Bytes asked of the socket per read.
READ_SIZE = 1 << 16


class ConnectionLost(Exception):
    """The connection closed before the reply came (it may or may not have
    been executed)."""


class ConnectionFailed(Exception):
    """The connection could not be opened (network, TLS, authentication)."""


@dataclass(frozen=True, slots=True)
class Target:
    """Where a Redis server is and how to log in; :attr:`label` never shows
    the password."""

    host: str = "127.0.0.1"
    port: int = 6379
    #: A Unix socket path instead of host and port.
    path: str | None = None
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: ssl.SSLContext | None = None
    client_name: str | None = None

    @property
    def label(self) -> str:
        where = f"unix:{self.path}" if self.path else f"{self.host}:{self.port}"
        return f"{where}/{self.db}" if self.db else where

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        password: str | None = None,
        tls_ca: str = "",
        tls_cert: str = "",
        tls_key: str = "",
        client_name: str | None = None,
    ) -> Target:
        """``redis://[user[:password]@]host[:port][/db]``, ``rediss://...``
        or ``unix://[user[:password]@]/path[?db=N]``. *password* (from a
        file) is used when the URL has none; with ``rediss://``, the server
        is verified with *tls_ca* (default: the system's CAs), and
        *tls_cert* and *tls_key* are the client certificate, if any."""
        parts = urlsplit(url)
        username = unquote(parts.username) if parts.username else None
        secret = unquote(parts.password) if parts.password is not None else password
        query = parse_qs(parts.query)
        if parts.scheme == "unix":
            db = int(query.get("db", ["0"])[0])
            return cls(
                path=unquote(parts.path),
                db=db,
                username=username,
                password=secret,
                client_name=client_name,
            )
        path = parts.path.strip("/")
        db = int(path) if path else int(query.get("db", ["0"])[0])
        tls = None
        if parts.scheme == "rediss":
            tls = _tls_context(tls_ca, tls_cert, tls_key)
        return cls(
            host=parts.hostname or "127.0.0.1",
            port=parts.port or 6379,
            db=db,
            username=username,
            password=secret,
            tls=tls,
            client_name=client_name,
        )

    def with_address(self, host: str, port: int) -> Target:
        """The same login at another address (a Redis Cluster node)."""
        return Target(
            host=host,
            port=port,
            username=self.username,
            password=self.password,
            tls=self.tls,
            client_name=self.client_name,
        )


def _tls_context(ca: str, cert: str, key: str) -> ssl.SSLContext:
    """The client TLS context for a ``rediss://`` Redis; a file it cannot
    use is a :class:`ConfigError` naming the ``[engine]`` key and the file."""
    try:
        context = ssl.create_default_context(cafile=ca or None)
    except (OSError, ssl.SSLError) as e:
        raise ConfigError("engine.tls_ca", f"{ca}: {e}") from None
    if cert:
        try:
            context.load_cert_chain(cert, key or None)
        except (OSError, ssl.SSLError) as e:
            raise ConfigError("engine.tls_cert", f"{cert} (key {key}): {e}") from None
    return context


def read_password_file(path: str) -> str:
    """The first line of *path* (a password file)."""
    lines = Path(path).read_text(encoding="utf-8").splitlines() if path else []
    return lines[0] if lines else ""


class Reply:
    """The answer to one queued command, once it comes."""

    __slots__ = ("_event", "errors", "on_set", "value")

    def __init__(self) -> None:
        self._event = trio.Event()
        self.value: Value | BaseException = None
        #: Called (in the reader task) once the answer is in.
        self.on_set: Callable[[], None] | None = None
        #: A confirmation's (see RedisConnection.confirm): the error replies
        #: that came before its answer. None for any other command.
        self.errors: list[ReplyError] | None = None

    @property
    def ready(self) -> bool:
        """Whether the answer (or the connection's loss) is in."""
        return self._event.is_set()

    def set(self, value: Value | BaseException) -> None:
        self.value = value
        self._event.set()
        if self.on_set is not None:
            self.on_set()

    async def get(self) -> Value:
        await self._event.wait()
        value = self.value
        if isinstance(value, BaseException):
            raise value
        return value


class RedisConnection:
    """One RESP3 connection (see the module doc)."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self._stream: trio.abc.Stream | None = None
        self._parser = Parser()
        self._waiting: deque[Reply] = deque()
        self._out: list[bytes] = []
        self._wake = trio.Event()
        self._scope: trio.CancelScope | None = None
        self._closing = False  # close() was called: use it for nothing more
        #: Set once the connection is closed or lost (see :attr:`error`).
        self.closed = trio.Event()
        #: Why it was lost (None: closed on purpose, or still open).
        self.error: BaseException | None = None
        #: Called with each push message, in the reader task.
        self.on_push: Callable[[Push], None] | None = None
        #: Called after each read that brought push messages.
        self.on_batch: Callable[[], None] | None = None
        #: The server's ``run_id`` (see :meth:`server_run_id`).
        self.run_id = ""

    @property
    def usable(self) -> bool:
        """Open, and not being closed: from the moment :meth:`close` is
        called (its tasks end a little later), nothing is sent on it and
        the links count it as down."""
        return self._stream is not None and not self._closing and not self.closed.is_set()

    @property
    def pending(self) -> int:
        """Commands sent and not answered yet."""
        return len(self._waiting)

    # -- commands ----------------------------------------------------------------

    def request(self, *args: bytes | str | int) -> Reply:
        """Queue a command; its reply is awaited with ``await reply.get()``."""
        if not self.usable:
            raise ConnectionLost(self._lost_message())
        reply = Reply()
        self._waiting.append(reply)
        self._out.append(pack(args))
        self._wake.set()
        return reply

    async def call(self, *args: bytes | str | int) -> Value:
        """Send a command and return its reply; a :class:`ReplyError` reply
        is raised, as is :class:`ConnectionLost`."""
        value = await self.request(*args).get()
        if isinstance(value, ReplyError):
            raise value
        return value

    def send(self, *args: bytes | str | int) -> None:
        """Queue a command that gets no reply of its own (``SUBSCRIBE`` and
        the like in RESP3: their confirmations are pushes). Follow it with
        :meth:`confirm`: if Redis refuses it, its error is a reply."""
        if not self.usable:
            raise ConnectionLost(self._lost_message())
        self._out.append(pack(args))
        self._wake.set()

    def confirm(self) -> Reply:
        """A ``PING`` after commands :meth:`send` queued: its answer means
        Redis has handled them; the error replies of those it refused (an
        ACL that does not allow a channel) come before it and are gathered
        in the reply's ``errors``, so that no reply is taken for another's."""
        reply = self.request("PING")
        reply.errors = []
        return reply

    def close(self) -> None:
        """Close the connection; waiting commands get :class:`ConnectionLost`."""
        self._closing = True
        if self._scope is not None:
            self._scope.cancel()
        elif self._stream is None:
            self.closed.set()

    def _lost_message(self) -> str:
        reason = f": {_describe(self.error)}" if self.error else ""
        return f"connection to Redis at {self.target.label} closed{reason}"

    # -- life ----------------------------------------------------------------------

    async def run(
        self,
        connect_timeout: float,
        *,
        task_status: trio.TaskStatus[RedisConnection] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Connect, log in, report started, then serve until closed or lost."""
        target = self.target
        try:
            with trio.fail_after(connect_timeout):
                stream = await self._connect()
        except (OSError, trio.TooSlowError, ssl.SSLError, trio.BrokenResourceError) as e:
            self.error = e
            self.closed.set()
            raise ConnectionFailed(f"Redis at {target.label}: {_describe(e)}") from e
        self._stream = stream
        started = False
        failure: BaseException | None = None
        try:
            async with trio.open_nursery() as nursery:
                self._scope = nursery.cancel_scope
                nursery.start_soon(self._reader)
                nursery.start_soon(self._writer)
                try:
                    with trio.fail_after(connect_timeout):
                        await self._handshake()
                except (ReplyError, ConnectionLost, trio.TooSlowError) as e:
                    failure = e
                    nursery.cancel_scope.cancel()
                else:
                    started = True
                    task_status.started(self)
            if failure is not None:
                self.error = failure
                raise ConnectionFailed(
                    f"Redis at {target.label}: {_describe(failure)}"
                ) from failure
        finally:
            self._stream = None
            self._fail_all(ConnectionLost(self._lost_message()))
            self.closed.set()
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(stream)
            if started and self.error is not None:
                log.info("connection to Redis at %s lost: %s", target.label, _describe(self.error))

    async def _connect(self) -> trio.abc.Stream:
        target = self.target
        if target.path is not None:
            return await trio.open_unix_socket(target.path)
        stream: trio.abc.Stream = await trio.open_tcp_stream(target.host, target.port)
        if target.tls is not None:
            tls = trio.SSLStream(stream, target.tls, server_hostname=target.host)
            await tls.do_handshake()
            stream = tls
        return stream

    async def _handshake(self) -> None:
        target = self.target
        hello: list[bytes | str | int] = ["HELLO", 3]
        if target.password is not None:
            hello += ["AUTH", target.username or "default", target.password]
        if target.client_name:
            hello += ["SETNAME", target.client_name]
        await self.call(*hello)
        if target.db:
            await self.call("SELECT", target.db)

    async def server_run_id(self) -> str:
        """Ask the server its ``run_id`` (new at each start of the process)."""
        info = await self.call("INFO", "server")
        assert isinstance(info, bytes)
        for line in info.splitlines():
            if line.startswith(b"run_id:"):
                self.run_id = line[7:].decode().strip()
                return self.run_id
        raise ProtocolError("INFO server has no run_id")

    async def _reader(self) -> None:
        stream = self._stream
        assert stream is not None
        parser = self._parser
        waiting = self._waiting
        try:
            while True:
                data = await stream.receive_some(READ_SIZE)
                if not data:
                    raise ConnectionLost("the server closed the connection")
                parser.feed(data)
                pushed = False
                for value in parser.replies():
                    if type(value) is Push:
                        pushed = True
                        if self.on_push is not None:
                            self.on_push(value)
                    elif waiting:
                        reply = waiting.popleft()
                        errors = reply.errors
                        if (
                            errors is not None
                            and type(value) is ReplyError
                            and "'ping'" not in value.message
                        ):
                            # A sent command's refusal: its confirmation
                            # still comes.
                            errors.append(value)
                            waiting.appendleft(reply)
                        else:
                            reply.set(value)
                    else:
                        raise ProtocolError("a reply nobody asked for")
                if pushed and self.on_batch is not None:
                    self.on_batch()
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as e:
            self._lose(e)
        except (ConnectionLost, ProtocolError) as e:
            self._lose(e)

    async def _writer(self) -> None:
        stream = self._stream
        assert stream is not None
        try:
            while True:
                await self._wake.wait()
                self._wake = trio.Event()
                out = self._out
                if not out:
                    continue
                self._out = []
                await stream.send_all(out[0] if len(out) == 1 else b"".join(out))
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as e:
            self._lose(e)

    def _lose(self, error: BaseException) -> None:
        if self.error is None:
            self.error = error
        self._stream = None  # no longer usable: nothing new is queued on it
        self._fail_all(ConnectionLost(self._lost_message()))
        if self._scope is not None:
            self._scope.cancel()

    def _fail_all(self, error: BaseException) -> None:
        waiting = self._waiting
        while waiting:
            waiting.popleft().set(error)


def _describe(error: BaseException) -> str:
    if isinstance(error, trio.TooSlowError):
        return "timed out"
    if isinstance(error, ReplyError):
        return error.message
    if isinstance(error, ConnectionLost | ConnectionFailed):
        return str(error)
    cause = error.__cause__
    if isinstance(cause, ssl.SSLError):  # (trio.SSLStream's BrokenResourceError)
        return f"TLS: {cause}"
    text = str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


#: How long a node waits between attempts to reach Redis, at most.
BACKOFF_MAX = 2.0
BACKOFF_MIN = 0.05


def backoff(attempt: int) -> float:
    """Seconds before reconnect attempt *attempt* (1, 2, ...): doubling, capped."""
    return min(BACKOFF_MAX, BACKOFF_MIN * math.pow(2, max(0, attempt - 1)))
