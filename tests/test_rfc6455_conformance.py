"""RFC 6455 conformance of the broker's WebSocket server, case by case.

In the spirit of the Autobahn testsuite's cases (framing, pings and pongs,
reserved bits, opcodes, fragmentation, UTF-8, close frames, the closing
handshake), adapted to a broker: it does not echo, so a case observes what
the server did through protocol round trips (a ``ping`` command answered by
a ``pong`` message, its ``id`` carrying the text under test) and control
frames (a ping frame answered by a pong frame with the same payload).

Each case is bytes the client writes (hand-built frames, several writes
where the split matters), what the client must then receive, and either
the connection still serving or the close code the RFC prescribes:

* 1002 for a framing violation (sections 5.2-5.5, 7.4.1);
* 1007 for text or a close reason that is not UTF-8 (8.1, 5.5.1);
* 1009 for a message over ``limits.max_message_size``;
* the client's own code echoed when it closes (5.5.1).

After a violation the client answers the broker's close frame, and the
broker must close the TCP connection at once (5.5.1, 7.1.1), well before its
close timeout: every failing case checks the time to EOF. The broker here
has a 5 s close timeout, so waiting for it cannot pass for promptness.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
import pytest
import trio
from wsproto.events import BytesMessage, CloseConnection, Pong, TextMessage

from broker import Broker
from tests.conftest import BrokerFactory
from tests.helpers import JSON, MSGPACK, RawClient, loads, raw_connect

#: limits.max_message_size of the brokers here: above 65535, so that the
#: 64-bit length form carries a message the broker accepts.
MAX = 100_000
#: The broker's closing-handshake timeout here, and how soon after the
#: client's close reply the TCP connection must end.
CLOSE_TIMEOUT = 5.0
PROMPT = 0.5

_OP_CONT, _OP_TEXT, _OP_BINARY, _OP_CLOSE, _OP_PING, _OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


def frame(
    opcode: int,
    payload: bytes = b"",
    *,
    fin: bool = True,
    rsv: int = 0,
    mask: bytes | None = None,
    masked: bool = True,
    form: int | None = None,
) -> bytes:
    """A client frame built by hand.

    *rsv* is the RSV1-3 bits (0x40, 0x20, 0x10); *mask* a fixed masking key
    (else a random one); *form* forces the length encoding: 7, 16 or 64 bits
    (else the shortest, as the RFC requires).
    """
    n = len(payload)
    if form is None:
        form = 7 if n < 126 else 16 if n < 65536 else 64
    flag = 0x80 if masked else 0
    head = bytes([(0x80 if fin else 0) | rsv | opcode])
    if form == 7:
        head += bytes([flag | n])
    elif form == 16:
        head += bytes([flag | 126]) + struct.pack("!H", n)
    else:
        head += bytes([flag | 127]) + struct.pack("!Q", n)
    if not masked:
        return head + payload
    key = os.urandom(4) if mask is None else mask
    stream = (key * (n // 4 + 1))[:n]
    body = (int.from_bytes(payload, "big") ^ int.from_bytes(stream, "big")).to_bytes(n, "big")
    return head + key + body


def text(payload: bytes, **kwargs: Any) -> bytes:
    return frame(_OP_TEXT, payload, **kwargs)


def ping_command(id: Any = 1, size: int | None = None) -> bytes:
    """A ``ping`` command as JSON text, padded with spaces to *size* bytes."""
    data = json.dumps({"op": "ping", "id": id}, ensure_ascii=False, separators=(",", ":")).encode()
    if size is not None:
        assert size >= len(data)
        data += b" " * (size - len(data))
    return data


def ping_command_msgpack(id: int, size: int) -> bytes:
    """A ``ping`` command as msgpack of exactly *size* bytes (an unknown
    ``pad`` field, ignored by the broker, takes the rest)."""
    base = len(msgpack.packb({"op": "ping", "id": id, "pad": b""}))
    for extra in (0, 1, 3):  # a longer bin header: 16-bit, 32-bit length
        data: bytes = msgpack.packb({"op": "ping", "id": id, "pad": b"x" * (size - base - extra)})
        if len(data) == size:
            return data
    raise AssertionError(f"no msgpack ping of {size} bytes")


def close_payload(code: int, reason: bytes = b"") -> bytes:
    return struct.pack("!H", code) + reason


PONG = {"op": "pong", "id": 1}

#: What the client must see: a protocol message (dict), or a pong frame
#: with this payload (bytes).
Expected = dict[str, Any] | bytes


@dataclass
class Case:
    id: str
    writes: Sequence[bytes]
    expect: Sequence[Expected] = ()
    #: The close code the broker must send; None: the connection goes on.
    close: int | None = None
    subprotocol: str = JSON


def params(cases: list[Case]) -> list[Any]:
    return [pytest.param(case, id=case.id) for case in cases]


@pytest.fixture
async def broker(start_broker: BrokerFactory) -> Broker:
    return await start_broker({"limits": {"max_message_size": MAX}}, close_timeout=CLOSE_TIMEOUT)


async def next_observation(client: RawClient) -> Expected | CloseConnection:
    """The next message or pong frame (pings from the broker are answered)."""
    while True:
        event = await client.next_event()
        if isinstance(event, (TextMessage, BytesMessage)):
            data = event.data
            obj = loads(data if isinstance(data, str) else bytes(data))
            assert isinstance(obj, dict)
            return obj
        if isinstance(event, Pong):
            return bytes(event.payload)
        if isinstance(event, CloseConnection):
            return event


async def expect_closed_promptly(client: RawClient) -> None:
    """The broker must close the TCP connection at once (it has sent and
    received a close frame): EOF well within the broker's close timeout."""
    start = trio.current_time()
    await client.read_until_eof(PROMPT)
    assert trio.current_time() - start < PROMPT


async def answer_close(client: RawClient, close: CloseConnection) -> None:
    """Send the client's close reply (the broker may have closed already,
    when the framing could not be followed)."""
    with contextlib.suppress(trio.BrokenResourceError):
        await client.send_raw(client.wsp.send(close.response()))


async def run_case(broker: Broker, case: Case) -> None:
    async with raw_connect(broker.url, case.subprotocol) as client:
        with trio.fail_after(5):
            for data in case.writes:
                await client.send_raw(data)
            for expected in case.expect:
                assert await next_observation(client) == expected
            if case.close is None:
                # Still serving, and nothing else was sent before this.
                ping = ping_command(id="alive")
                payload: bytes = ping
                opcode = _OP_TEXT
                if case.subprotocol == MSGPACK:
                    payload, opcode = msgpack.packb({"op": "ping", "id": "alive"}), _OP_BINARY
                await client.send_raw(frame(opcode, payload))
                assert await next_observation(client) == {"op": "pong", "id": "alive"}
                return
            close = await next_observation(client)
            assert isinstance(close, CloseConnection), close
            assert close.code == case.close, close
            await answer_close(client, close)
            await expect_closed_promptly(client)


# -- framing and payload lengths (Autobahn 1.x) ----------------------------------------

FRAMING = [
    *(
        Case(f"text-{size}", [text(ping_command(1, size))], [PONG])
        for size in (20, 125, 126, 127, 128, 65535, 65536, 65537, MAX)
    ),
    Case("text-over-max", [text(ping_command(1, MAX + 1))], close=1009),
    *(
        Case(
            f"binary-{size}",
            [frame(_OP_BINARY, ping_command_msgpack(1, size))],
            [PONG],
            subprotocol=MSGPACK,
        )
        for size in (30, 125, 126, 65535, 65536, MAX)
    ),
    Case(
        "binary-over-max",
        [frame(_OP_BINARY, ping_command_msgpack(1, MAX + 1))],
        close=1009,
        subprotocol=MSGPACK,
    ),
    Case("16-bit-form-for-7-bit-length", [text(ping_command(), form=16)], close=1002),
    Case("64-bit-form-for-7-bit-length", [text(ping_command(), form=64)], close=1002),
    Case("64-bit-form-for-16-bit-length", [text(ping_command(1, 300), form=64)], close=1002),
    Case(
        "64-bit-length-top-bit-set",
        [bytes([0x81, 0x80 | 127]) + struct.pack("!Q", 1 << 63) + b"\0\0\0\0"],
        close=1002,
    ),
    Case(
        "many-in-one-write",
        [b"".join(text(ping_command(i)) for i in range(3))],
        [{"op": "pong", "id": i} for i in range(3)],
    ),
    Case(
        "byte-by-byte",
        [bytes([b]) for b in text(ping_command(1, 200))],
        [PONG],
    ),
    Case("zero-masking-key", [text(ping_command(), mask=b"\0\0\0\0")], [PONG]),
    Case("unmasked-text", [text(ping_command(), masked=False)], close=1002),
    Case(
        "unmasked-after-a-message",
        [text(ping_command()) + text(ping_command(2), masked=False)],
        [PONG],
        close=1002,
    ),
    Case("unmasked-ping", [frame(_OP_PING, b"x", masked=False)], close=1002),
]


@pytest.mark.parametrize("case", params(FRAMING))
async def test_framing_and_lengths(broker: Broker, case: Case) -> None:
    await run_case(broker, case)


# -- pings and pongs, control frame limits (Autobahn 2.x) ------------------------------

CONTROL = [
    Case("ping-empty", [frame(_OP_PING)], [b""]),
    Case("ping-text-payload", [frame(_OP_PING, b"Hello, world!")], [b"Hello, world!"]),
    Case("ping-binary-payload", [frame(_OP_PING, bytes(range(125)))], [bytes(range(125))]),
    Case("ping-126", [frame(_OP_PING, b"x" * 126)], close=1002),
    Case("pong-126", [frame(_OP_PONG, b"x" * 126)], close=1002),
    Case("ping-16-bit-form", [frame(_OP_PING, b"x", form=16)], close=1002),
    Case("unsolicited-pong", [frame(_OP_PONG, b"unsolicited")], []),
    Case("unsolicited-pong-then-ping", [frame(_OP_PONG) + frame(_OP_PING, b"p")], [b"p"]),
    Case(
        "ten-pings-one-write",
        [b"".join(frame(_OP_PING, b"%d" % i) for i in range(10))],
        [b"%d" % i for i in range(10)],
    ),
    Case(
        "ten-pings-ten-writes",
        [frame(_OP_PING, b"%d" % i) for i in range(10)],
        [b"%d" % i for i in range(10)],
    ),
    Case("fragmented-ping", [frame(_OP_PING, b"a", fin=False) + frame(_OP_CONT, b"b")], close=1002),
    Case("fragmented-pong", [frame(_OP_PONG, b"a", fin=False) + frame(_OP_CONT, b"b")], close=1002),
]


@pytest.mark.parametrize("case", params(CONTROL))
async def test_control_frames(broker: Broker, case: Case) -> None:
    await run_case(broker, case)


# -- reserved bits and opcodes (Autobahn 3.x, 4.x) -------------------------------------

RESERVED = [
    *(
        Case(f"rsv-{rsv:#x}-text", [text(ping_command(), rsv=rsv)], close=1002)
        for rsv in (0x40, 0x20, 0x10, 0x70)
    ),
    Case(
        "rsv-after-a-message",
        [text(ping_command()) + text(ping_command(2), rsv=0x20) + frame(_OP_PING)],
        [PONG],
        close=1002,
    ),
    Case("rsv-ping", [frame(_OP_PING, b"x", rsv=0x40)], close=1002),
    Case("rsv-close", [frame(_OP_CLOSE, close_payload(1000), rsv=0x10)], close=1002),
    *(
        Case(f"opcode-{op:#x}", [frame(op, b"")], close=1002)
        for op in (3, 4, 5, 6, 7, 0xB, 0xC, 0xD, 0xE, 0xF)
    ),
    *(
        Case(
            f"opcode-{op:#x}-with-payload-after-a-message",
            [text(ping_command()) + frame(op, b"reserved") + frame(_OP_PING)],
            [PONG],
            close=1002,
        )
        for op in (5, 0xD)
    ),
]


@pytest.mark.parametrize("case", params(RESERVED))
async def test_reserved_bits_and_opcodes(broker: Broker, case: Case) -> None:
    await run_case(broker, case)


# -- fragmentation (Autobahn 5.x) ------------------------------------------------------

_CMD = ping_command()


def fragments(payload: bytes, sizes: Sequence[int], opcode: int = _OP_TEXT) -> list[bytes]:
    """*payload* cut into fragments of *sizes* (the last one takes the rest)."""
    out = []
    pos = 0
    for i, size in enumerate([*sizes, len(payload)]):
        part = payload[pos : pos + size] if i < len(sizes) else payload[pos:]
        pos += len(part)
        last = i == len(sizes)
        out.append(frame(opcode if i == 0 else _OP_CONT, part, fin=last))
    return out


FRAGMENTATION = [
    Case("two-fragments", [b"".join(fragments(_CMD, [5]))], [PONG]),
    Case("two-fragments-two-writes", fragments(_CMD, [5]), [PONG]),
    Case("one-byte-fragments", fragments(_CMD, [1] * (len(_CMD) - 1)), [PONG]),
    Case(
        "empty-fragments",
        [
            frame(_OP_TEXT, b"", fin=False),
            frame(_OP_CONT, b"", fin=False),
            frame(_OP_CONT, _CMD, fin=False),
            frame(_OP_CONT, b""),
        ],
        [PONG],
    ),
    Case(
        "ping-between-fragments",
        [fragments(_CMD, [5])[0] + frame(_OP_PING, b"in") + fragments(_CMD, [5])[1]],
        [b"in", PONG],
    ),
    Case(
        "ping-between-fragments-separate-writes",
        [fragments(_CMD, [5])[0], frame(_OP_PING, b"in"), fragments(_CMD, [5])[1]],
        [b"in", PONG],
    ),
    Case(
        "pings-and-pongs-between-one-byte-fragments",
        [
            part + frame(_OP_PING, b"%d" % i) + frame(_OP_PONG)
            for i, part in enumerate(fragments(_CMD, [1] * 4))
        ],
        [b"0", b"1", b"2", b"3", PONG, b"4"],
    ),
    Case(
        "binary-fragments",
        fragments(msgpack.packb({"op": "ping", "id": 1}), [2, 3], _OP_BINARY),
        [PONG],
        subprotocol=MSGPACK,
    ),
    Case("continuation-first-final", [frame(_OP_CONT, _CMD)], close=1002),
    Case("continuation-first-not-final", [frame(_OP_CONT, _CMD, fin=False)], close=1002),
    Case("continuation-first-empty", [frame(_OP_CONT, b"")], close=1002),
    Case(
        "continuation-after-a-complete-message",
        [text(_CMD) + frame(_OP_CONT, _CMD)],
        [PONG],
        close=1002,
    ),
    Case(
        "text-inside-a-fragmented-message",
        [frame(_OP_TEXT, b"{", fin=False) + text(_CMD)],
        close=1002,
    ),
    Case(
        "binary-inside-a-fragmented-message",
        [frame(_OP_TEXT, b"{", fin=False) + frame(_OP_BINARY, b"x")],
        close=1002,
    ),
    Case(
        "fragments-over-max",
        [
            frame(_OP_TEXT, b" " * 60_000, fin=False),
            frame(_OP_CONT, b" " * 40_000, fin=False),
            frame(_OP_CONT, b" " * 1),
        ],
        close=1009,
    ),
    Case(
        "fragments-up-to-max",
        [
            frame(_OP_TEXT, b" " * 60_000, fin=False),
            frame(_OP_CONT, b" " * (40_000 - len(_CMD)), fin=False),
            frame(_OP_CONT, _CMD),
        ],
        [PONG],
    ),
]


@pytest.mark.parametrize("case", params(FRAGMENTATION))
async def test_fragmentation(broker: Broker, case: Case) -> None:
    await run_case(broker, case)


async def test_a_close_between_fragments_is_answered(broker: Broker) -> None:
    """Control frames may come between fragments (5.4), a close too: the
    broker answers it and closes at once; the unfinished message is dropped."""
    async with raw_connect(broker.url) as client:
        first, _ = fragments(_CMD, [5])
        await client.send_raw(first + frame(_OP_CLOSE, close_payload(1000, b"bye")))
        close = await next_observation(client)
        assert isinstance(close, CloseConnection) and close.code == 1000
        await expect_closed_promptly(client)


# -- UTF-8 (Autobahn 6.x) --------------------------------------------------------------

VALID_TEXT = {
    "greek": "κόσμε",
    "2-byte": "\u0080\u07ff",
    "3-byte": "\u0800\uffff\ufffd",
    "4-byte": "𝄞\U0010ffff",
    "bom": "\ufeff",
}

#: Invalid UTF-8 byte sequences (Markus Kuhn's test file, as Autobahn's 6.x).
INVALID_UTF8 = {
    "surrogate-in-greek": b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5\xed\xa0\x80edited",
    "lone-continuation": b"\x80",
    "lone-continuation-bf": b"\xbf",
    "lonely-start": b"\xc0 ",
    "overlong-slash-2": b"\xc0\xaf",
    "overlong-slash-3": b"\xe0\x80\xaf",
    "overlong-slash-4": b"\xf0\x80\x80\xaf",
    "over-u10ffff": b"\xf4\x90\x80\x80",
    "high-surrogate": b"\xed\xa0\x80",
    "low-surrogate": b"\xed\xbf\xbf",
    "fe": b"\xfe",
    "ff": b"\xff",
    "5-byte": b"\xf8\x88\x80\x80\x80",
    "truncated-3-byte": b"\xe2\x82",
    "truncated-4-byte": b"\xf0\x9d\x84",
}


def command_with(raw: bytes) -> bytes:
    """A ``ping`` command whose ``id`` string holds *raw* bytes as they are."""
    return b'{"op":"ping","id":"' + raw + b'"}'


def split_everywhere(payload: bytes) -> list[list[bytes]]:
    """*payload* as two fragments, cut at every position."""
    return [
        [frame(_OP_TEXT, payload[:i], fin=False), frame(_OP_CONT, payload[i:])]
        for i in range(len(payload) + 1)
    ]


UTF8 = [
    *(
        Case(f"valid-{name}", [text(command_with(s.encode()))], [{"op": "pong", "id": s}])
        for name, s in VALID_TEXT.items()
    ),
    *(
        Case(
            f"valid-4-byte-split-at-{i}",
            writes,
            [{"op": "pong", "id": "a𝄞b"}],
        )
        for i, writes in enumerate(split_everywhere(command_with("a𝄞b".encode())))
        if 20 <= i <= 24  # before, inside and after the 4-byte code point
    ),
    *(
        Case(f"invalid-{name}", [text(command_with(raw))], close=1007)
        for name, raw in INVALID_UTF8.items()
    ),
    *(
        Case(
            f"invalid-{name}-in-the-last-fragment",
            [frame(_OP_TEXT, b'{"op":"ping","id":"', fin=False), frame(_OP_CONT, raw + b'"}')],
            close=1007,
        )
        for name, raw in INVALID_UTF8.items()
    ),
    Case(
        "invalid-split-across-fragments",
        [frame(_OP_TEXT, b'{"op":"ping","id":"\xf4', fin=False), frame(_OP_CONT, b'\x90"}')],
        close=1007,
    ),
    Case(
        "truncated-at-the-end-of-fragments",
        [frame(_OP_TEXT, b'{"op":"ping","id":"x"}', fin=False), frame(_OP_CONT, b"\xe2\x82")],
        close=1007,
    ),
]


@pytest.mark.parametrize("case", params(UTF8))
async def test_utf8(broker: Broker, case: Case) -> None:
    await run_case(broker, case)


@pytest.mark.parametrize("raw", list(INVALID_UTF8.values())[:6], ids=list(INVALID_UTF8)[:6])
async def test_invalid_utf8_fails_fast(broker: Broker, raw: bytes) -> None:
    """Invalid UTF-8 in a middle fragment closes with 1007 at once: the
    broker does not wait for the message's last fragment (8.1: "MUST Fail
    the WebSocket Connection" when it finds the stream is not UTF-8). A
    sequence cut short by the end of a fragment is only invalid later."""
    async with raw_connect(broker.url) as client:
        await client.send_raw(frame(_OP_TEXT, b'{"op":"ping","id":"', fin=False))
        await client.send_raw(frame(_OP_CONT, raw + b"more", fin=False))  # not the last
        close = await next_observation(client)
        assert isinstance(close, CloseConnection) and close.code == 1007, close
        await answer_close(client, close)
        await expect_closed_promptly(client)


# -- close frames (Autobahn 7.x) -------------------------------------------------------

VALID_CODES = [1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014]
VALID_CODES += [3000, 3999, 4000, 4999]
INVALID_CODES = [0, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535]


async def read_raw_frame(client: RawClient) -> tuple[int, bytes]:
    """The broker's next frame read straight off the socket (not through
    wsproto, which refuses close codes such as 1014 that the IANA registry
    has since added): its opcode and payload."""
    data = b""
    while True:
        if len(data) >= 2 and len(data) >= 2 + (data[1] & 0x7F):
            assert data[1] < 126, "a short frame was expected"
            return data[0] & 0x0F, data[2 : 2 + data[1]]
        more = await client.io.receive_some(4096)
        assert more, "EOF before a whole frame"
        data += more


@pytest.mark.parametrize("code", VALID_CODES)
async def test_a_client_close_is_echoed_and_tcp_closed_at_once(broker: Broker, code: int) -> None:
    async with raw_connect(broker.url) as client:
        await client.send_raw(frame(_OP_CLOSE, close_payload(code, b"bye")))
        with trio.fail_after(5):
            opcode, payload = await read_raw_frame(client)
        assert (opcode, payload[:2]) == (_OP_CLOSE, close_payload(code))
        await expect_closed_promptly(client)


@pytest.mark.parametrize("code", INVALID_CODES)
async def test_a_close_with_an_invalid_code_is_a_protocol_error(broker: Broker, code: int) -> None:
    async with raw_connect(broker.url) as client:
        await client.send_raw(frame(_OP_CLOSE, close_payload(code)))
        close = await next_observation(client)
        assert isinstance(close, CloseConnection) and close.code == 1002, close
        # The client has sent its close: the broker does not wait for another.
        await expect_closed_promptly(client)


CLOSES = [
    Case("close-empty", [frame(_OP_CLOSE)], close=1000),
    Case("close-1-byte", [frame(_OP_CLOSE, b"\x03")], close=1002),
    Case("close-reason-123-bytes", [frame(_OP_CLOSE, close_payload(1000, b"x" * 123))], close=1000),
    Case(
        "close-reason-utf8", [frame(_OP_CLOSE, close_payload(1000, "κόσμε".encode()))], close=1000
    ),
    Case(
        "close-reason-invalid-utf8",
        [frame(_OP_CLOSE, close_payload(1000, b"\xce\xba\xe1\xbd\xb9\xed\xa0\x80"))],
        close=1007,
    ),
    Case("close-126-bytes", [frame(_OP_CLOSE, close_payload(1000, b"x" * 124))], close=1002),
    Case("close-fragmented", [frame(_OP_CLOSE, close_payload(1000), fin=False)], close=1002),
    Case("close-unmasked", [frame(_OP_CLOSE, close_payload(1000), masked=False)], close=1002),
    # Whatever follows the close frame is not read (5.5.1: no more data frames).
    Case("text-after-close", [frame(_OP_CLOSE, close_payload(1000)) + text(_CMD)], close=1000),
    # A reply queued in the same read as the client's close is not written:
    # the client is leaving (5.5.1 lets the close reply come first).
    Case("close-after-a-message", [text(_CMD) + frame(_OP_CLOSE, close_payload(1001))], close=1001),
]


@pytest.mark.parametrize("case", params(CLOSES))
async def test_close_frames(broker: Broker, case: Case) -> None:
    """The client closes (validly or not): the broker's close comes first,
    then EOF at once (run_case's reply goes to a closed socket, or is ignored)."""
    await run_case(broker, case)


# -- the closing handshake's TCP close timing ------------------------------------------


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (text(ping_command(), rsv=0x40), 1002),
        (text(command_with(b"\xff")), 1007),
        (text(ping_command(1, MAX + 1)), 1009),
    ],
    ids=["1002", "1007", "1009"],
)
async def test_tcp_closes_at_once_after_the_client_answers_a_broker_close(
    broker: Broker, data: bytes, code: int
) -> None:
    """The broker fails the connection (it sends the close first); once the
    client's close reply is in, the broker closes TCP at once (5.5.1: "After
    both sending and receiving a Close message ... MUST close the underlying
    TCP connection"), not after its close timeout (5 s here)."""
    async with raw_connect(broker.url) as client:
        await client.send_raw(data)
        close = await next_observation(client)
        assert isinstance(close, CloseConnection) and close.code == code
        (conn,) = broker.connections
        await client.send_raw(client.wsp.send(close.response()))
        await expect_closed_promptly(client)
        assert conn.close_code == code


async def test_a_client_that_never_answers_the_close_is_dropped_at_the_timeout(
    start_broker: BrokerFactory,
) -> None:
    """Without the client's close reply, the broker waits its close timeout
    (0.5 s here), then closes TCP: it does not drop the connection first."""
    broker = await start_broker(close_timeout=0.5)
    async with raw_connect(broker.url) as client:
        await client.send_raw(text(ping_command(), rsv=0x40))
        close = await next_observation(client)
        assert isinstance(close, CloseConnection) and close.code == 1002
        start = trio.current_time()
        await client.read_until_eof(3)
        assert 0.3 <= trio.current_time() - start < 3
