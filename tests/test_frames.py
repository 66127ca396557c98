"""Tests for broker.frames: our pre-built frames are exactly wsproto's.

The reference is a real wsproto server connection after a real handshake
with a wsproto client; the same client then parses our frames back.
"""

from __future__ import annotations

import pytest
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    Event,
    Message,
    Request,
    TextMessage,
)

from broker.core.frames import binary_frame, frame, text_frame

# Around every boundary of RFC 6455 section 5.2's three length encodings.
LENGTHS = [0, 1, 125, 126, 127, 65535, 65536, 70000]


def handshake() -> tuple[WSConnection, WSConnection]:
    """An open (server, client) pair of wsproto connections."""
    client = WSConnection(ConnectionType.CLIENT)
    server = WSConnection(ConnectionType.SERVER)
    server.receive_data(client.send(Request(host="localhost", target="/")))
    assert [type(e) for e in server.events()] == [Request]
    client.receive_data(server.send(AcceptConnection()))
    assert [type(e) for e in client.events()] == [AcceptConnection]
    return server, client


def received(client: WSConnection, data: bytes) -> list[Event]:
    client.receive_data(data)
    return list(client.events())


def reassemble(events: list[Event]) -> str | bytes:
    """One whole message from the events (wsproto may deliver it in parts)."""
    assert events
    assert all(isinstance(e, Message) for e in events)
    messages = [e for e in events if isinstance(e, Message)]
    assert [m.message_finished for m in messages] == [False] * (len(messages) - 1) + [True]
    parts = [m.data for m in messages]
    if isinstance(messages[0], TextMessage):
        assert all(isinstance(m, TextMessage) for m in messages)
        return "".join(str(p) for p in parts)
    assert all(isinstance(m, BytesMessage) for m in messages)
    return b"".join(bytes(p) for p in parts)


def text_of_bytes(n: int) -> str:
    """A str whose UTF-8 encoding is exactly *n* bytes, mixing widths."""
    pattern = "aé€😀"  # 1, 2, 3 and 4 bytes
    out: list[str] = []
    size = 0
    while size < n:
        for ch in pattern:
            w = len(ch.encode())
            if size + w <= n:
                out.append(ch)
                size += w
    return "".join(out)


@pytest.mark.parametrize("n", LENGTHS)
def test_text_frame_matches_wsproto(n: int) -> None:
    server, client = handshake()
    payload = "x" * n
    expected = server.send(TextMessage(data=payload))
    ours = text_frame(payload)
    assert ours == expected
    assert frame(payload) == expected
    assert reassemble(received(client, ours)) == payload


@pytest.mark.parametrize("n", LENGTHS)
def test_binary_frame_matches_wsproto(n: int) -> None:
    server, client = handshake()
    payload = bytes(i % 251 for i in range(n))
    expected = server.send(BytesMessage(data=payload))
    ours = binary_frame(payload)
    assert ours == expected
    assert frame(payload) == expected
    assert reassemble(received(client, ours)) == payload


@pytest.mark.parametrize("n", LENGTHS)
def test_multibyte_text_frame_matches_wsproto(n: int) -> None:
    # The length field counts UTF-8 bytes, not characters.
    server, client = handshake()
    payload = text_of_bytes(n)
    assert len(payload.encode()) == n
    expected = server.send(TextMessage(data=payload))
    ours = text_frame(payload)
    assert ours == expected
    assert reassemble(received(client, ours)) == payload


@pytest.mark.parametrize(
    "payload",
    ["é" * 63, "é" * 64, "€" * 42, "😀" * 31, "😀" * 32, "😀" * 16384, "日本語のテキスト"],
)
def test_unicode_around_boundaries(payload: str) -> None:
    server, client = handshake()
    assert text_frame(payload) == server.send(TextMessage(data=payload))
    assert reassemble(received(client, text_frame(payload))) == payload


@pytest.mark.parametrize(
    ("n", "header"),
    [
        (0, b"\x81\x00"),
        (125, b"\x81\x7d"),
        (126, b"\x81\x7e\x00\x7e"),
        (65535, b"\x81\x7e\xff\xff"),
        (65536, b"\x81\x7f\x00\x00\x00\x00\x00\x01\x00\x00"),
    ],
)
def test_header_bytes(n: int, header: bytes) -> None:
    # Independent of wsproto: the literal bytes of RFC 6455 section 5.2.
    assert text_frame("a" * n) == header + b"a" * n
    assert binary_frame(b"a" * n) == bytes([0x82]) + header[1:] + b"a" * n


def test_frame_dispatch_on_type() -> None:
    assert frame("ab")[0] == 0x81
    assert frame(b"ab")[0] == 0x82
    assert frame(bytearray(b"ab")) == b"\x82\x02ab"  # type: ignore[arg-type]


def test_many_frames_in_one_write() -> None:
    # The broker concatenates frames into a single send_all.
    _, client = handshake()
    blob = text_frame("one") + binary_frame(b"\x00two") + text_frame("é" * 200)
    events = received(client, blob)
    assert [(type(e), e.data) for e in events if isinstance(e, Message)] == [
        (TextMessage, "one"),
        (BytesMessage, b"\x00two"),
        (TextMessage, "é" * 200),
    ]
