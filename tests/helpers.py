"""Wire-level test clients for the broker, written as a foreign client would be.

* :class:`Client` wraps a ``trio_websocket`` connection and speaks the
  protocol with plain ``json``/``msgpack``: no ``broker.client`` code.
* :class:`RawClient` does the WebSocket handshake itself with a wsproto state
  machine over a raw TCP socket (or TLS over one, for ``wss://``). It can
  send hand-built frames (invalid UTF-8...), shrink its receive buffer before
  connecting and simply stop reading, which makes a slow consumer the broker
  cannot push data to.
"""

from __future__ import annotations

import json
import os
import socket
import ssl
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any, Literal
from urllib.parse import urlsplit

import msgpack
import pytest
import trio
import trio_websocket
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    Ping,
    RejectConnection,
    Request,
    TextMessage,
)

from broker import Action, Broker, Identity, PluginContext, PluginHost, config_from_dict, hookimpl
from broker.plugin.host import PluginFactory
from tests.conftest import CLOSE_TIMEOUT, merge

JSON = "broker.v1.json"
MSGPACK = "broker.v1.msgpack"

#: Generous bound on any single wait in these tests: a hang fails fast.
WAIT = 5.0


def dumps(obj: Any, subprotocol: str | None = JSON) -> str | bytes:
    """Encode a command as the given subprotocol puts it on the wire."""
    if subprotocol == MSGPACK:
        packed: bytes = msgpack.packb(obj, use_bin_type=True)
        return packed
    return json.dumps(obj)


def loads(payload: str | bytes) -> Any:
    """Decode a broker frame: str is JSON (text frame), bytes is msgpack."""
    if isinstance(payload, str):
        return json.loads(payload)
    return msgpack.unpackb(payload, raw=False)


async def wait_until(predicate: Callable[[], bool], seconds: float = WAIT) -> None:
    """Poll broker state (where no event exists to wait on) in a bounded loop."""
    with trio.fail_after(seconds):
        while not predicate():  # noqa: ASYNC110 - no event to wait on
            await trio.sleep(0.005)


class Client:
    """A protocol client over a ``trio_websocket`` connection."""

    def __init__(self, ws: trio_websocket.WebSocketConnection, subprotocol: str | None) -> None:
        self.ws = ws
        self.subprotocol = subprotocol

    async def send(self, obj: Any) -> None:
        await self.ws.send_message(dumps(obj, self.subprotocol))

    async def recv(self, seconds: float = WAIT) -> dict[str, Any]:
        with trio.fail_after(seconds):
            message = await self.ws.get_message()
        if self.subprotocol == MSGPACK:
            assert isinstance(message, bytes), "msgpack subprotocol must use binary frames"
        else:
            assert isinstance(message, str), "JSON subprotocol must use text frames"
        obj = loads(message)
        assert isinstance(obj, dict)
        return obj

    async def request(self, obj: Any) -> dict[str, Any]:
        await self.send(obj)
        return await self.recv()

    async def sub(self, pattern: str, id: int | str = "s") -> None:
        reply = await self.request({"op": "sub", "id": id, "topic": pattern})
        assert reply == {"op": "ok", "id": id}, reply

    async def pub(self, topic: str, data: Any, id: int | str = "p", **extra: Any) -> int:
        reply = await self.request({"op": "pub", "id": id, "topic": topic, "data": data, **extra})
        assert reply["op"] == "ok" and reply["id"] == id, reply
        seq = reply["seq"]
        assert isinstance(seq, int)
        return seq

    async def assert_alive(self, id: int | str = "alive") -> None:
        """ping -> pong: the connection still works and nothing else is pending."""
        reply = await self.request({"op": "ping", "id": id})
        assert reply == {"op": "pong", "id": id}, reply

    async def expect_close(self, seconds: float = WAIT) -> trio_websocket.CloseReason:
        """Read until the broker closes; return its close reason."""
        with trio.fail_after(seconds):
            while True:
                try:
                    await self.ws.get_message()
                except trio_websocket.ConnectionClosed as e:
                    reason = e.reason
                    break
        assert reason is not None
        return reason


@asynccontextmanager
async def connect(
    url: str,
    subprotocol: str | None = JSON,
    *,
    headers: Sequence[tuple[bytes, bytes]] = (),
    **kwargs: Any,
) -> AsyncIterator[Client]:
    """Open a :class:`Client`; *subprotocol* None proposes none."""
    async with trio_websocket.open_websocket_url(
        url,
        subprotocols=[subprotocol] if subprotocol else None,
        extra_headers=list(headers),
        connect_timeout=WAIT,
        disconnect_timeout=WAIT,
        **kwargs,
    ) as ws:
        try:
            assert ws.subprotocol == subprotocol
            yield Client(ws, subprotocol)
        finally:
            # trio-websocket's reader may be stuck handing over a message the
            # test did not read (its queue holds one): closing the queue frees
            # it, or its aclose waits for it for ever once the socket is gone.
            await ws._recv_channel.aclose()
            # trio-websocket's client leaves its socket open when the broker
            # closed first (it waits for a TCP close it never acts on).
            await trio.aclose_forcefully(ws._stream)


async def rejection(url: str, **kwargs: Any) -> trio_websocket.ConnectionRejected:
    """Connect expecting the broker to refuse the handshake; return the refusal."""
    try:
        async with connect(url, **kwargs):
            pass
    except trio_websocket.ConnectionRejected as e:
        return e
    raise AssertionError("the handshake was accepted")


def mask_frame(opcode: int, payload: bytes, *, fin: bool = True) -> bytes:
    """A client (masked) frame built by hand, so it can carry anything."""
    mask = os.urandom(4)
    n = len(payload)
    head = bytes([(0x80 if fin else 0) | opcode])
    if n < 126:
        head += bytes([0x80 | n])
    elif n <= 0xFFFF:
        head += bytes([0x80 | 126]) + n.to_bytes(2, "big")
    else:
        head += bytes([0x80 | 127]) + n.to_bytes(8, "big")
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return head + mask + masked


class RawClient:
    """A WebSocket client on a bare TCP socket, driven by wsproto."""

    def __init__(
        self,
        stream: trio.SocketStream,
        ws: WSConnection,
        subprotocol: str | None,
        tls: trio.SSLStream[trio.SocketStream] | None = None,
    ):
        self.stream = stream  # the TCP connection
        #: What is written and read: the TCP stream, or TLS over it.
        self.io: trio.abc.Stream = tls if tls is not None else stream
        self.wsp = ws
        self.subprotocol = subprotocol
        self._events: list[Event] = []
        self._parts: list[Any] = []
        self.eof = False

    @classmethod
    async def open(
        cls,
        url: str,
        subprotocol: str | None = JSON,
        *,
        rcvbuf: int | None = None,
        ssl_context: ssl.SSLContext | None = None,
        source: str | None = None,
        prefix: bytes = b"",
        headers: Sequence[tuple[str, str]] = (),
    ) -> RawClient:
        """Connect to a ``ws://`` URL, or to a ``wss://`` one with *ssl_context*.

        *source* binds the socket to that address first (``127.0.0.2``: a
        different client address on loopback); *prefix* is sent before
        anything else (a PROXY protocol header); *headers* are added to the
        request.
        """
        parts = urlsplit(url)
        assert parts.hostname is not None and parts.port is not None
        sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_STREAM)
        if rcvbuf is not None:
            # Before connect(), so the window advertised in the SYN is small.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        if source is not None:
            await sock.bind((source, 0))
        await sock.connect((parts.hostname, parts.port))
        stream = trio.SocketStream(sock)
        if prefix:
            await stream.send_all(prefix)
        tls = None
        if ssl_context is not None:
            tls = trio.SSLStream(stream, ssl_context, server_hostname=parts.hostname)
        ws = WSConnection(ConnectionType.CLIENT)
        self = cls(stream, ws, subprotocol, tls)
        request = Request(
            host=parts.netloc,
            target=(parts.path or "/") + (f"?{parts.query}" if parts.query else ""),
            subprotocols=[subprotocol] if subprotocol else [],
            extra_headers=[(k.encode(), v.encode()) for k, v in headers],
        )
        await self.io.send_all(ws.send(request))
        event = await self.next_event()
        if not isinstance(event, AcceptConnection):
            await self.aclose()
            raise AssertionError(f"handshake not accepted: {event!r}")
        return self

    async def send_raw(self, data: bytes) -> None:
        await self.io.send_all(data)

    async def send(self, obj: Any) -> None:
        payload = dumps(obj, self.subprotocol)
        if isinstance(payload, str):
            data = self.wsp.send(TextMessage(data=payload))
        else:
            data = self.wsp.send(BytesMessage(data=payload))
        await self.io.send_all(data)

    async def next_event(self, *, answer_pings: bool = True) -> Event:
        """The next wsproto event, messages reassembled; None-free: raises on EOF."""
        while True:
            while self._events:
                event = self._events.pop(0)
                if isinstance(event, (TextMessage, BytesMessage)):
                    self._parts.append(event.data)
                    if not event.message_finished:
                        continue
                    if isinstance(event, TextMessage):
                        event = TextMessage(data="".join(self._parts))
                    else:
                        event = BytesMessage(data=b"".join(self._parts))
                    self._parts = []
                elif isinstance(event, Ping) and answer_pings:
                    await self.io.send_all(self.wsp.send(event.response()))
                return event
            data = await self.io.receive_some(65536)
            if not data:
                self.eof = True
                raise EOFError("the broker closed the TCP connection")
            self.wsp.receive_data(bytes(data))
            self._events.extend(self.wsp.events())

    async def recv(self, seconds: float = WAIT) -> dict[str, Any]:
        """The next protocol message (pings are answered and skipped)."""
        with trio.fail_after(seconds):
            while True:
                event = await self.next_event()
                if isinstance(event, (TextMessage, BytesMessage)):
                    data = event.data
                    obj = loads(data if isinstance(data, str) else bytes(data))
                    assert isinstance(obj, dict)
                    return obj
                if isinstance(event, Ping):
                    continue
                raise AssertionError(f"expected a message, got {event!r}")

    async def expect_close(self, seconds: float = WAIT) -> CloseConnection:
        """Skip messages until a close frame; return it."""
        with trio.fail_after(seconds):
            while True:
                event = await self.next_event()
                if isinstance(event, CloseConnection):
                    return event
                if isinstance(event, RejectConnection):
                    raise AssertionError(f"unexpected {event!r}")

    async def read_until_eof(self, seconds: float = WAIT) -> list[Event]:
        """Everything the broker still sends until it drops the TCP connection."""
        events: list[Event] = []
        with trio.fail_after(seconds):
            try:
                while True:
                    events.append(await self.next_event())
            except (EOFError, trio.BrokenResourceError):
                pass
        return events

    async def aclose(self) -> None:
        if self.io is self.stream:
            await self.stream.aclose()
        else:  # no close_notify: the broker may not be reading any more
            await trio.aclose_forcefully(self.io)


@asynccontextmanager
async def raw_connect(
    url: str,
    subprotocol: str | None = JSON,
    *,
    rcvbuf: int | None = None,
    ssl_context: ssl.SSLContext | None = None,
    source: str | None = None,
    prefix: bytes = b"",
    headers: Sequence[tuple[str, str]] = (),
) -> AsyncIterator[RawClient]:
    client = await RawClient.open(
        url,
        subprotocol,
        rcvbuf=rcvbuf,
        ssl_context=ssl_context,
        source=source,
        prefix=prefix,
        headers=headers,
    )
    try:
        yield client
    finally:
        await client.aclose()


def free_port() -> int:
    """A loopback port that was free a moment ago (for subprocess brokers)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# -- shared by the client and CLI tests ----------------------------------------

EncodingName = Literal["json", "msgpack"]

ENCODINGS = pytest.mark.parametrize("encoding", ["json", "msgpack"])

TOKEN = "alice-token-0123456789"
TOKENS_CONFIG: dict[str, Any] = {
    "plugins": {"enabled": ["tokens"]},
    "plugin": {"tokens": {"tokens": [{"id": "alice", "token": TOKEN}]}},
}


class DenySecret:
    """Denies every publish and subscribe on topics starting with ``secret``."""

    @hookimpl
    def broker_authorize(self, identity: Identity, action: Action, topic: str) -> bool | None:
        return False if topic.startswith("secret") else None


def deny_factory(settings: Mapping[str, Any], context: PluginContext) -> DenySecret:
    return DenySecret()


class Restartable:
    """An in-process broker that can be stopped and started again on the
    same port (a restart, as clients see it). Each start is a new
    :class:`Broker` with its own state."""

    def __init__(self, nursery: trio.Nursery, config: Mapping[str, Any] | None = None) -> None:
        self.nursery = nursery
        self.config = dict(config or {})
        self.port = 0
        self.broker: Broker | None = None
        self._done: trio.Event | None = None

    async def start(
        self,
        extra: Mapping[str, Any] | None = None,
        *,
        factories: Mapping[str, PluginFactory] | None = None,
    ) -> Broker:
        base = {"listener": {"host": "127.0.0.1", "port": self.port}, "admin": {"port": 0}}
        cfg = config_from_dict(merge(merge(base, self.config), extra or {}))
        plugins = PluginHost.from_config(cfg, factories=factories)
        broker = Broker(cfg, plugins=plugins, close_timeout=CLOSE_TIMEOUT)
        done = trio.Event()

        async def serve(task_status: trio.TaskStatus[Broker]) -> None:
            try:
                await broker.serve(task_status=task_status)
            finally:
                done.set()

        await self.nursery.start(serve)
        self.broker, self._done, self.port = broker, done, broker.port
        return broker

    async def stop(self) -> None:
        """Stop the broker and wait until it has closed its port."""
        assert self.broker is not None and self._done is not None
        self.broker.stop()
        with trio.fail_after(WAIT):
            await self._done.wait()

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"
