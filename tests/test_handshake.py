"""The opening handshake against wsproto's client, and bad requests."""

from __future__ import annotations

import pytest
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, RejectConnection, RejectData, Request

from broker.core.handshake import HandshakeError, HandshakeParser, accept_response, reject_response

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
