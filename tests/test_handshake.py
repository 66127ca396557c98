"""The opening handshake against wsproto's client, and bad requests: in the
sans-I/O parser, and over real sockets through the broker."""

from __future__ import annotations

import pytest
import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, RejectConnection, RejectData, Request

from broker.core.handshake import (
    MAX_REQUEST_HEAD,
    HandshakeError,
    HandshakeParser,
    accept_response,
    reject_response,
)
from broker.server.broker import Broker
from tests.conftest import BrokerFactory
from tests.helpers import WAIT

GOOD = (
    b"GET /ws?token=t HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
)


def test_wsproto_client_completes_the_handshake() -> None:
    c = WSConnection(ConnectionType.CLIENT)
    data = c.send(Request(host="x", target="/ws?a=1", subprotocols=["b", "broker.v1.msgpack"]))
    parser = HandshakeParser()
    request = None
    for i in range(0, len(data), 5):
        request = parser.feed(data[i : i + 5]) or request
    assert request is not None
    assert request.target == "/ws?a=1"
    assert request.subprotocols == ("b", "broker.v1.msgpack")
    assert ("host", "x") in request.headers
    c.receive_data(accept_response(request.key, "broker.v1.msgpack"))
    (event,) = c.events()
    assert isinstance(event, AcceptConnection)
    assert event.subprotocol == "broker.v1.msgpack"


def test_rfc_example_accept_token() -> None:
    request = HandshakeParser().feed(GOOD + b"\r\n")
    assert request is not None
    assert b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=" in accept_response(
        request.key, None
    )


def test_trailing_bytes_are_kept() -> None:
    request = HandshakeParser().feed(GOOD + b"\r\n\x81\x80abcd")
    assert request is not None
    assert request.trailing == b"\x81\x80abcd"


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (b"POST /ws HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n", 405),
        (b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", 426),
        (GOOD.replace(b"Version: 13", b"Version: 8") + b"\r\n", 426),
        (GOOD.replace(b"dGhlIHNhbXBsZSBub25jZQ==", b"short") + b"\r\n", 400),
        (b"NOT HTTP\r\n\r\n", 400),
        (GOOD.replace(b"HTTP/1.1", b"HTTP/1.0") + b"\r\n", 400),
        (GOOD + b"Content-Length: 4\r\n\r\nbody", 400),
        (b"GET / HTTP/1.1\r\n" + b"X: " + b"a" * 20000, 431),  # head never ends
    ],
)
def test_bad_requests(data: bytes, status: int) -> None:
    with pytest.raises(HandshakeError) as info:
        HandshakeParser().feed(data)
    assert info.value.status == status


def test_client_sees_rejection_status_and_body() -> None:
    c = WSConnection(ConnectionType.CLIENT)
    c.send(Request(host="x", target="/ws"))
    c.receive_data(reject_response(401, "invalid token"))
    events = list(c.events())
    assert isinstance(events[0], RejectConnection)
    assert events[0].status_code == 401
    assert isinstance(events[1], RejectData)
    assert events[1].data == b"invalid token\n"


# -- the request head limit: exactly 16 KiB, however the head is split --------------


def upgrade(target: str = "/ws", *, size: int | None = None) -> bytes:
    """A valid upgrade request to *target*; with *size*, padded by one header
    field to exactly *size* bytes of head (the final empty line included)."""
    lines = [
        f"GET {target} HTTP/1.1",
        "Host: 127.0.0.1",
        "Upgrade: websocket",
        "Connection: Upgrade",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version: 13",
    ]
    head = "\r\n".join(lines) + "\r\n\r\n"
    if size is not None:
        pad = size - len(head) - len("X-Pad: \r\n")
        assert pad >= 0
        head = head[:-2] + "X-Pad: " + "a" * pad + "\r\n\r\n"
        assert len(head) == size
    return head.encode()


def feed(data: bytes, chunk: int | None) -> HandshakeParser:
    """Feed *data* in pieces of *chunk* bytes (all at once for None); the
    parser, or HandshakeError as soon as a piece is refused."""
    parser = HandshakeParser()
    step = chunk or len(data)
    for i in range(0, len(data), step):
        if parser.feed(data[i : i + step]) is not None:
            assert i + step >= len(data), "a request before all of it was fed"
    return parser


CHUNKS = pytest.mark.parametrize("chunk", [None, 1, 1000, 4096, 16_384, 16_385])


@CHUNKS
def test_a_head_of_exactly_16_kib_is_accepted(chunk: int | None) -> None:
    frame = b"\x88\x80abcd"  # a frame right behind the head: not counted
    data = upgrade(size=MAX_REQUEST_HEAD) + frame
    parser = HandshakeParser()
    step = chunk or len(data)
    for i in range(0, len(data), step):
        request = parser.feed(data[i : i + step])
        if request is not None:
            # What the parser kept, then what the broker reads next.
            assert request.trailing + data[i + step :] == frame
            return
    raise AssertionError("no request")


@CHUNKS
@pytest.mark.parametrize("size", [MAX_REQUEST_HEAD + 1, 16_451, 20_480, 20_481, 40_000])
def test_a_head_one_byte_over_16_kib_is_431(chunk: int | None, size: int) -> None:
    with pytest.raises(HandshakeError) as info:
        feed(upgrade(size=size), chunk)
    assert info.value.status == 431
    assert info.value.reason == "request head larger than 16384 bytes"


# -- the request target: origin-form, the path as sent ------------------------------


@pytest.mark.parametrize(
    "target",
    [
        "ws://127.0.0.1/ws",  # absolute-form takes http(s) only
        "ftp://127.0.0.1/ws",
        "http:///ws",  # no authority
        "http://user@127.0.0.1/ws",  # userinfo (RFC 9110 4.2.4)
        "http://127.0.0.1/ws#fragment",
        "127.0.0.1:8765",  # authority-form
        "*",  # asterisk-form
        "/ws#fragment",
        "ws",
    ],
)
def test_a_target_not_in_origin_form_is_400(target: str) -> None:
    with pytest.raises(HandshakeError) as info:
        HandshakeParser().feed(upgrade(target))
    assert info.value.status == 400
    assert "origin-form" in info.value.reason


@pytest.mark.parametrize(
    ("target", "path", "query"),
    [
        ("/ws", "/ws", ""),
        ("/ws?token=a?b&c=d", "/ws", "token=a?b&c=d"),
        ("//evil.example/ws", "//evil.example/ws", ""),  # a path, never a host
        ("//evil.example/ws?x=/ws", "//evil.example/ws", "x=/ws"),
        ("/%77s", "/%77s", ""),  # not decoded
        ("/ws/../ws", "/ws/../ws", ""),  # not normalised
        # absolute-form (RFC 9112 3.2.2, RFC 6455 4.2.1): path and query
        ("http://127.0.0.1:8765/ws", "/ws", ""),
        ("HTTPS://broker.example/ws?token=t", "/ws", "token=t"),
        ("http://broker.example//evil/ws", "//evil/ws", ""),
        ("http://broker.example", "/", ""),
        ("http://broker.example?x=1", "/", "x=1"),
    ],
)
def test_path_and_query_are_split_as_sent(target: str, path: str, query: str) -> None:
    request = HandshakeParser().feed(upgrade(target))
    assert request is not None
    assert (request.path, request.query) == (path, query)
    if target.startswith("/"):
        assert request.target == target


# -- the same over a real socket, through the broker -------------------------------


async def answer_status(broker: Broker, data: bytes, chunk: int | None = None) -> int:
    """Send *data* to the broker's WebSocket port (in writes of *chunk*
    bytes), return the status of its answer."""
    stream = await trio.open_tcp_stream(*broker.addresses[0])
    async with stream:
        with trio.fail_after(WAIT):
            step = chunk or len(data)
            for i in range(0, len(data), step):
                try:
                    await stream.send_all(data[i : i + step])
                except trio.BrokenResourceError:
                    break  # refused before the end (an incomplete head past the limit)
            answer = b""
            while b"\r\n\r\n" not in answer:
                received = await stream.receive_some(65536)
                assert received, f"closed after {answer!r}"
                answer += received
    return int(answer.split(b" ", 2)[1])


@pytest.mark.parametrize("chunk", [None, 1000])
async def test_head_limit_over_a_socket(start_broker: BrokerFactory, chunk: int | None) -> None:
    broker = await start_broker()
    assert await answer_status(broker, upgrade(size=MAX_REQUEST_HEAD), chunk) == 101
    for size in (MAX_REQUEST_HEAD + 1, 16_451, 20_480):
        assert await answer_status(broker, upgrade(size=size), chunk) == 431
    assert broker.stats.rejected["bad_request"] == 3


@pytest.mark.parametrize(
    ("target", "status"),
    [
        ("//evil.example/ws", 404),
        ("//evil.example/ws?x=1", 404),
        ("/ws/", 404),
        ("/WS", 404),
        ("/%77s", 404),
        ("http://127.0.0.1/ws", 101),  # absolute-form: its path
        ("http://127.0.0.1//evil.example/ws", 404),
        ("ws://127.0.0.1/ws", 400),
        ("127.0.0.1:8765", 400),
        ("*", 400),
        ("/ws#x", 400),
        ("/ws?x=//evil.example/", 101),
    ],
)
async def test_the_path_must_match_exactly(
    start_broker: BrokerFactory, target: str, status: int
) -> None:
    broker = await start_broker()
    assert await answer_status(broker, upgrade(target)) == status
    if status == 404:
        assert broker.stats.rejected["path"] == 1
