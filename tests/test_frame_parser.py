"""The inbound frame parser against frames built by wsproto's client."""

from __future__ import annotations

import os
import struct
import tracemalloc

import pytest
from hypothesis import given
from hypothesis import strategies as st
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, BytesMessage, CloseConnection, Request, TextMessage
from wsproto.events import Ping as WsPing
from wsproto.events import Pong as WsPong

from broker.core import frame_parser
from broker.core.errors import CloseCode
from broker.core.frame_parser import Close, FrameError, FrameParser, Ping, Pong


def client() -> WSConnection:
    c = WSConnection(ConnectionType.CLIENT)
    s = WSConnection(ConnectionType.SERVER)
    s.receive_data(c.send(Request(host="x", target="/ws")))
    list(s.events())
    c.receive_data(s.send(AcceptConnection()))
    list(c.events())
    return c


def masked(first: int, payload: bytes, *, length: int | None = None) -> bytes:
    """A hand-built masked frame (for inputs wsproto refuses to produce)."""
    mask = os.urandom(4)
    n = len(payload) if length is None else length
    if n < 126:
        head = bytes((first, 0x80 | n))
    elif n <= 0xFFFF:
        head = bytes((first, 0x80 | 126)) + struct.pack("!H", n)
    else:
        head = bytes((first, 0x80 | 127)) + struct.pack("!Q", n)
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return head + mask + body


@pytest.mark.parametrize("size", [0, 1, 125, 126, 127, 65535, 65536, 70000])
def test_text_and_binary_of_every_length_class(size: int) -> None:
    c = client()
    text = "é" * (size // 2) + "x" * (size % 2)
    blob = os.urandom(size)
    data = c.send(TextMessage(data=text)) + c.send(BytesMessage(data=blob))
    assert FrameParser(1 << 20).feed(data) == [text, blob]


def test_byte_at_a_time_and_many_per_read() -> None:
    c = client()
    msgs = [f"message {i}" * (i % 7) for i in range(50)]
    data = b"".join(c.send(TextMessage(data=m)) for m in msgs)
    parser = FrameParser(1 << 20)
    out = []
    for i in range(len(data)):
        out += parser.feed(data[i : i + 1])
    assert out == msgs
    assert FrameParser(1 << 20).feed(data) == msgs


def test_a_parser_between_whole_frames_holds_no_buffer() -> None:
    """Every connection has a parser, and most are idle: between reads that
    end on a frame boundary, it holds nothing of its own (no empty buffer),
    also once a frame split across reads has been completed."""
    c = client()
    frame = c.send(TextMessage(data="hello" * 10))
    parsers = [FrameParser(1000) for _ in range(1000)]
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        for parser in parsers:
            assert parser.feed(frame) == ["hello" * 10]
            assert parser.feed(frame[:3]) == []  # split mid-header...
            assert parser.feed(frame[3:] + frame) == ["hello" * 10] * 2  # ...and completed
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    held = _parser_bytes(before, after) / len(parsers)
    assert held < 8, f"{held:.0f} B per parser"
    # (and before any input)
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        parsers = [FrameParser(1000) for _ in range(1000)]
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    held = _parser_bytes(before, after) / len(parsers)
    assert held < 8, f"{held:.0f} B per new parser"


def _parser_bytes(before: tracemalloc.Snapshot, after: tracemalloc.Snapshot) -> int:
    """Bytes allocated between the snapshots by frame_parser.py and still held."""
    return sum(
        stat.size_diff
        for stat in after.compare_to(before, "filename")
        if stat.traceback[0].filename == frame_parser.__file__
    )


def test_fragments_with_interleaved_control_frames() -> None:
    c = client()
    data = (
        c.send(TextMessage(data="hel", message_finished=False))
        + c.send(WsPing(payload=b"p"))
        + c.send(TextMessage(data="lo", message_finished=True))
        + c.send(WsPong(payload=b"q"))
    )
    assert FrameParser(100).feed(data) == [Ping(b"p"), "hello", Pong(b"q")]


def test_close_with_and_without_code_and_nothing_after() -> None:
    c = client()
    parser = FrameParser(100)
    events = parser.feed(c.send(CloseConnection(code=1001, reason="bye")) + b"junk")
    assert events == [Close(1001, "bye")]
    assert parser.feed(b"more junk") == []
    assert FrameParser(100).feed(masked(0x88, b"")) == [Close(1005, "")]


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (bytes((0x81, 0x05)) + b"hello", CloseCode.PROTOCOL_ERROR),  # unmasked
        (masked(0x81 | 0x40, b"x"), CloseCode.PROTOCOL_ERROR),  # RSV1
        (masked(0x83, b"x"), CloseCode.PROTOCOL_ERROR),  # reserved data opcode
        (masked(0x8B, b"x"), CloseCode.PROTOCOL_ERROR),  # reserved control opcode
        (masked(0x80, b"x"), CloseCode.PROTOCOL_ERROR),  # continuation first
        (masked(0x01, b"a") + masked(0x81, b"b"), CloseCode.PROTOCOL_ERROR),  # new msg in frag
        (masked(0x09, b"x"), CloseCode.PROTOCOL_ERROR),  # fragmented ping
        (masked(0x89, b"x" * 126), CloseCode.PROTOCOL_ERROR),  # long ping
        (masked(0x81, b"\xff\xfe"), CloseCode.INVALID_PAYLOAD),  # bad UTF-8
        (masked(0x01, b"\xe2\x82") + masked(0x80, b"\x28"), CloseCode.INVALID_PAYLOAD),
        (masked(0x88, b"\x03"), CloseCode.PROTOCOL_ERROR),  # 1-byte close
        (masked(0x88, struct.pack("!H", 1005)), CloseCode.PROTOCOL_ERROR),
        (masked(0x88, struct.pack("!H", 999)), CloseCode.PROTOCOL_ERROR),
        (masked(0x88, struct.pack("!H", 1000) + b"\xff"), CloseCode.INVALID_PAYLOAD),
        (masked(0x82, b"", length=2**63), CloseCode.PROTOCOL_ERROR),  # length MSB set
    ],
)
def test_violations_give_the_close_code(data: bytes, code: CloseCode) -> None:
    with pytest.raises(FrameError) as info:
        FrameParser(1000).feed(data)
    assert info.value.code == code


def test_too_big_is_detected_from_the_header_alone() -> None:
    parser = FrameParser(1000)
    header_only = masked(0x82, b"", length=10_000)[:8]  # header + mask, no payload yet
    with pytest.raises(FrameError) as info:
        parser.feed(header_only)
    assert info.value.code == CloseCode.MESSAGE_TOO_BIG


def test_too_big_counts_all_fragments() -> None:
    parser = FrameParser(10)
    parser.feed(masked(0x02, b"x" * 6))
    with pytest.raises(FrameError) as info:
        parser.feed(masked(0x80, b"x" * 6))
    assert info.value.code == CloseCode.MESSAGE_TOO_BIG


def test_valid_application_close_codes() -> None:
    for code in (1000, 1011, 3000, 4999):
        assert FrameParser(10).feed(masked(0x88, struct.pack("!H", code))) == [Close(code, "")]


def test_messages_before_a_violation_are_kept() -> None:
    c = client()
    data = c.send(TextMessage(data="first")) + masked(0x81, b"\xff")
    with pytest.raises(FrameError) as info:
        FrameParser(100).feed(data)
    assert info.value.events == ["first"]
    assert info.value.code == CloseCode.INVALID_PAYLOAD


@pytest.mark.parametrize(
    "data",
    [
        bytes((0x81, 0x80 | 126)) + struct.pack("!H", 5) + b"\0\0\0\0hello",
        bytes((0x81, 0x80 | 127)) + struct.pack("!Q", 5) + b"\0\0\0\0hello",
        bytes((0x82, 0x80 | 127)) + struct.pack("!Q", 0xFFFF) + b"\0\0\0\0",
    ],
    ids=["16-bit for 5", "64-bit for 5", "64-bit for 65535"],
)
def test_a_length_not_in_its_shortest_form_is_a_protocol_error(data: bytes) -> None:
    """RFC 6455 5.2: "the minimal number of bytes MUST be used to encode the
    length" (wsproto refuses such frames too)."""
    with pytest.raises(FrameError) as info:
        FrameParser(1 << 20).feed(data)
    assert (info.value.code, info.value.reason) == (1002, "payload length not minimal")


def test_a_code_point_may_be_split_across_fragments() -> None:
    euro = "€".encode()  # 3 bytes
    parser = FrameParser(100)
    assert parser.feed(masked(0x01, b"a" + euro[:1])) == []
    assert parser.feed(masked(0x00, euro[1:2])) == []
    assert parser.feed(masked(0x80, euro[2:] + b"b")) == ["a€b"]


def test_invalid_utf8_fails_at_its_fragment_not_at_the_end() -> None:
    parser = FrameParser(100)
    assert parser.feed(masked(0x01, "κό".encode())) == []
    with pytest.raises(FrameError) as info:
        parser.feed(masked(0x00, b"\xed\xa0\x80"))  # a surrogate, in a middle fragment
    assert info.value.code == CloseCode.INVALID_PAYLOAD


def test_a_truncated_code_point_at_the_end_of_a_message_is_invalid() -> None:
    parser = FrameParser(100)
    parser.feed(masked(0x01, b"ok"))
    with pytest.raises(FrameError) as info:
        parser.feed(masked(0x80, "€".encode()[:2]))
    assert info.value.code == CloseCode.INVALID_PAYLOAD


def test_after_a_violation_only_the_close_frame_is_looked_for() -> None:
    """The rest of the offending frame and any other frame are skipped
    unchecked; the client's close frame is returned, wherever it is split."""
    parser = FrameParser(1000)
    bad_then = masked(0x82, b"x" * 5000)  # too big: detected in the header
    junk = masked(0x81, b"\xff") + masked(0xC1, b"rsv") + bytes((0x81, 0x03)) + b"abc"
    close = masked(0x88, struct.pack("!H", 1000) + b"bye")
    with pytest.raises(FrameError) as info:
        parser.feed(bad_then[:10])
    assert info.value.code == CloseCode.MESSAGE_TOO_BIG and not info.value.closing
    rest = bad_then[10:] + junk + close
    out = []
    for i in range(0, len(rest), 7):
        out += parser.feed(rest[i : i + 7])
    assert out == [Close(1000, "bye")]
    assert parser.closed and parser.feed(close) == []


@pytest.mark.parametrize(
    "bad",
    [
        masked(0x81, b"\xff"),  # payload error: read whole
        masked(0xC1, b"x"),  # header error: skipped by its length
        bytes((0x81, 0x02)) + b"hi",  # unmasked: skipped without a mask
    ],
    ids=["utf8", "rsv", "unmasked"],
)
def test_a_close_frame_in_the_same_bytes_as_the_violation_is_seen(bad: bytes) -> None:
    parser = FrameParser(1000)
    with pytest.raises(FrameError) as info:
        parser.feed(bad + masked(0x88, b""))
    assert info.value.closing and parser.closed


@pytest.mark.parametrize(
    "close",
    [
        masked(0x88, b"\x03"),
        masked(0x88, struct.pack("!H", 1005)),
        masked(0x88, struct.pack("!H", 1000) + b"\xff"),
        masked(0x08, b""),  # fragmented
        bytes((0x88, 0x00)),  # unmasked
    ],
    ids=["1-byte", "1005", "bad reason", "fragmented", "unmasked"],
)
def test_a_bad_close_frame_is_still_the_client_closing(close: bytes) -> None:
    with pytest.raises(FrameError) as info:
        FrameParser(1000).feed(close)
    assert info.value.closing


def test_a_length_with_its_top_bit_set_loses_the_framing() -> None:
    parser = FrameParser(1000)
    with pytest.raises(FrameError):
        parser.feed(masked(0x82, b"", length=2**63))
    assert parser.feed(masked(0x88, b"")) == []  # not a frame boundary any more


@given(
    data=st.binary(max_size=300), mask=st.binary(min_size=4, max_size=4), start=st.integers(0, 7)
)
def test_c_unmasking_gives_the_bytes_of_the_pure_python_one(
    data: bytes, mask: bytes, start: int
) -> None:
    """The parser unmasks with websockets' C helper; the fallback (one
    big-integer XOR) must give the same bytes, from bytes or a memoryview
    slice of a larger buffer, as the parser passes them."""
    buf = bytes(start) + mask + data
    view = memoryview(buf)
    payload, key = view[start + 4 :], view[start : start + 4]
    assert frame_parser._unmask is not frame_parser._unmask_int  # the C helper is in use
    expected = bytes(b ^ mask[i % 4] for i, b in enumerate(data))
    assert frame_parser._unmask(payload, key) == expected
    assert frame_parser._unmask_int(payload, key) == expected
    assert frame_parser._unmask(data, mask) == expected


# -- feed_controls: a dormant connection's pings and pongs ---------------------------


def test_feed_controls_takes_whole_pings_and_pongs() -> None:
    c = client()
    data = c.send(WsPing(b"a")) + c.send(WsPong(b"")) + c.send(WsPing(b"x" * 125))
    parser = FrameParser(100)
    assert parser.feed_controls(data) == [Ping(b"a"), Pong(b""), Ping(b"x" * 125)]
    # ...and the parser goes on as before.
    assert parser.feed(c.send(TextMessage(data="after"))) == ["after"]
    assert parser.feed_controls(b"") == []


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(client().send(WsPing(b"ab"))[:3], id="a-ping-cut-short"),
        pytest.param(client().send(WsPing(b"a")) + b"\x89", id="a-ping-and-a-byte"),
        pytest.param(client().send(WsPing(b"a")) + client().send(TextMessage(data="m")), id="msg"),
        pytest.param(client().send(CloseConnection(1000)), id="close"),
        pytest.param(masked(0x09, b"p"), id="ping-not-final"),
        pytest.param(masked(0xC9, b"p"), id="rsv-bit"),
        pytest.param(b"\x89\x01p", id="unmasked"),
        pytest.param(masked(0x8A, b"p" * 126), id="too-long"),
    ],
)
def test_feed_controls_leaves_anything_else_to_feed(data: bytes) -> None:
    """None, and nothing fed: feed then sees the bytes (and refuses what
    it must) exactly as a fresh parser does."""
    parser, fresh = FrameParser(100), FrameParser(100)
    assert parser.feed_controls(data) is None

    def outcome(p: FrameParser) -> object:
        try:
            return p.feed(data)
        except FrameError as e:
            return (e.code, e.reason, e.events)

    assert outcome(parser) == outcome(fresh)


def test_feed_controls_waits_for_a_frame_or_message_in_progress() -> None:
    c = client()
    ping = c.send(WsPing(b"p"))
    cut = FrameParser(100)
    assert cut.feed(c.send(TextMessage(data="half"))[:3]) == []
    assert cut.feed_controls(ping) is None  # the rest of a frame comes first
    fragmented = FrameParser(100)
    assert fragmented.feed(masked(0x01, b"frag")) == []  # a text message begun
    assert fragmented.feed_controls(ping) is None
    assert fragmented.feed(ping + masked(0x80, b"ment")) == [Ping(b"p"), "fragment"]
    failed = FrameParser(100)
    with pytest.raises(FrameError):
        failed.feed(b"\x81\x01x")  # unmasked
    assert failed.feed_controls(ping) is None


@given(
    st.lists(
        st.tuples(st.sampled_from([0x89, 0x8A, 0x09, 0x81, 0x88, 0xC9]), st.binary(max_size=130)),
        max_size=4,
    ),
    st.integers(min_value=0, max_value=8),
)
def test_feed_controls_agrees_with_feed(frames: list[tuple[int, bytes]], cut: int) -> None:
    """Any frames, possibly cut short: feed_controls either gives what feed
    gives (whole pings and pongs only) or None with the parser untouched."""
    data = b"".join(masked(first, payload) for first, payload in frames)
    data = data[: len(data) - cut] if cut < len(data) else data
    parser, reference = FrameParser(1000), FrameParser(1000)
    try:
        expected: object = reference.feed(data)
    except FrameError as e:
        expected = (e.code, e.reason)
    got = parser.feed_controls(data)
    if got is None:
        try:
            again: object = parser.feed(data)
        except FrameError as e:
            again = (e.code, e.reason)
        assert again == expected
    else:
        assert got == expected
        assert all(isinstance(e, (Ping, Pong)) for e in got)
        assert all(first in (0x89, 0x8A) and len(p) <= 125 for first, p in frames)
