"""Parse the WebSocket frames a client sends (RFC 6455 section 5), sans-I/O.

:class:`FrameParser` takes the bytes read from a connection after the opening
handshake and returns complete messages and control frames. It enforces what
a server must check, and reports each violation as a :class:`FrameError`
carrying the close code to answer with:

* every client frame is masked (5.1) -> else 1002;
* RSV bits are clear, as no extension is negotiated (5.2) -> else 1002;
* known opcodes only; control frames final and at most 125 bytes (5.5) -> 1002;
* payload lengths in their shortest form, and a 64-bit length's top bit
  clear (5.2) -> 1002;
* continuation frames only inside a fragmented message, and no new data
  message inside one (5.4) -> 1002;
* a message larger than ``max_message_size`` bytes -> 1009, detected from the
  frame header, before its payload is buffered;
* text and close reasons are valid UTF-8 (8.1) -> else 1007; a fragmented
  text message fails at the first fragment that makes it invalid (a code
  point may be split across fragments);
* close codes are ones a peer may send (7.4) -> else 1002.

After a violation the server fails the connection (7.1.7): it sends its
close frame and reads no further messages. The parser then only looks for
the client's answering close frame, skipping every other frame unread, so
that the server can close the TCP connection as soon as that close arrives
(5.5.1) instead of waiting for a timeout.

Unmasking is ``apply_mask`` from the ``websockets`` package's C speedups
(about 0.2 µs for a 130-byte payload); where that extension is missing, one
big-integer XOR over the payload (about 0.7 µs), which gives the same bytes
(tests/test_frame_parser.py compares the two).
"""

from __future__ import annotations

import codecs
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from broker.core.errors import CloseCode

__all__ = ["Close", "FrameError", "FrameParser", "Ping", "Pong"]

_OP_CONT: Final = 0x0
_OP_TEXT: Final = 0x1
_OP_BINARY: Final = 0x2
_OP_CLOSE: Final = 0x8
_OP_PING: Final = 0x9
_OP_PONG: Final = 0xA
#: The first byte of a final ping or pong frame (no RSV bits).
_PING_OR_PONG: Final = frozenset({0x80 | _OP_PING, 0x80 | _OP_PONG})
_U16: Final = struct.Struct("!H")
_U64: Final = struct.Struct("!Q")

#: Close codes a peer may put on the wire (RFC 6455 7.4.1 and the IANA
#: registry); 1005, 1006 and 1015 are for local reporting only.
_SENDABLE_CODES: Final = frozenset(
    {1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014}
)


class FrameError(Exception):
    """The client broke the framing rules; close the connection with ``code``.

    ``events`` holds what the same :meth:`FrameParser.feed` call completed
    before the violation: the client sent those first, so they are handled
    before the connection is closed. ``closing`` is True when the client's
    close frame has been seen already (the offending frame was one, or it
    came in the same bytes): the closing handshake needs no further reading.
    """

    def __init__(self, code: CloseCode, reason: str) -> None:
        super().__init__(f"{int(code)}: {reason}")
        self.code = code
        self.reason = reason
        self.events: list[FrameEvent] = []
        self.closing = False


@dataclass(frozen=True, slots=True)
class Ping:
    payload: bytes


@dataclass(frozen=True, slots=True)
class Pong:
    payload: bytes


@dataclass(frozen=True, slots=True)
class Close:
    """The client's close frame; ``code`` is 1005 when it carried none."""

    code: int
    reason: str


#: What :meth:`FrameParser.feed` returns: a complete text (``str``) or binary
#: (``bytes``) message, or a control frame.
FrameEvent = str | bytes | Ping | Pong | Close


_utf8_decoder: Final = codecs.getincrementaldecoder("utf-8")


def _unmask_int(
    data: bytes | bytearray | memoryview, mask: bytes | bytearray | memoryview
) -> bytes:
    """Unmask *data* in pure Python: one big-integer XOR, in C inside CPython."""
    n = len(data)
    if n == 0:
        return b""
    key = (bytes(mask) * ((n + 3) >> 2))[:n]
    return (int.from_bytes(data, "little") ^ int.from_bytes(key, "little")).to_bytes(n, "little")


_unmask: Callable[[bytes | bytearray | memoryview, bytes | bytearray | memoryview], bytes]
try:
    # The websockets package's C helper, made for exactly this: 3.5 times
    # faster than the XOR above on a 130-byte message (docs/performance.md).
    # (Its stub types the mask as bytes; the C code takes any buffer, as
    # the test checks.)
    from websockets.speedups import apply_mask as _unmask  # type: ignore[assignment]
except ImportError:  # pragma: no cover - the extension is built for CPython on common platforms
    _unmask = _unmask_int


class FrameParser:
    """Incremental parser for the frames of one client connection.

    Args:
        max_message_size: the largest message, in bytes after reassembly of
            fragments, that is accepted.
    """

    __slots__ = (
        "_buf",
        "_decoder",
        "_opcode",
        "_parts",
        "_size",
        "_skip",
        "_text",
        "closed",
        "failed",
        "lost",
        "max_message_size",
    )

    def __init__(self, max_message_size: int) -> None:
        self.max_message_size = max_message_size
        # The start of a frame that a read cut short: None when there is
        # none, as almost always between reads (an empty bytearray kept by
        # every idle connection costs 56 B).
        self._buf: bytearray | None = None
        # The fragments of a fragmented binary or text (decoded) message: None
        # but while one is reassembled (few clients fragment; every
        # connection has a parser).
        self._parts: list[bytes] | None = None
        self._text: list[str] | None = None
        self._decoder: codecs.IncrementalDecoder | None = None  # for _text
        self._size = 0
        self._opcode: int | None = None  # of the fragmented message in progress
        #: The client's close frame was seen: further bytes are ignored.
        self.closed = False
        #: A violation was raised: only a close frame is looked for.
        self.failed = False
        self._skip = 0  # after a violation: bytes of a frame still to skip
        #: After a violation: the bytes cannot be followed as frames (a
        #: length no frame can have), so no close frame will be seen.
        self.lost = False

    def feed(self, data: bytes | bytearray) -> list[FrameEvent]:
        """Add bytes read from the socket; return the events they complete.

        Raises FrameError on a violation. After it, the parser skips frames
        until the client's close frame, and returns only that :class:`Close`
        (its code, and its reason if valid UTF-8; nothing else is checked).
        After a :class:`Close` event, further bytes are ignored.
        """
        if self.closed:
            return []
        if self.failed:
            return self._scan(data)
        buf = self._buf
        # Headers are read and payloads sliced from the bytes themselves:
        # indexing and slicing bytes is cheaper than through a memoryview,
        # and the copy of a payload slice costs less than the view object.
        if buf:
            buf += data
            view: bytes | bytearray = buf
        else:
            view = data
        events: list[FrameEvent] = []
        pos = start = 0
        end = len(view)
        try:
            while end - pos >= 2:
                start = pos
                b0 = view[pos]
                b1 = view[pos + 1]
                if b0 & 0x70:
                    raise FrameError(CloseCode.PROTOCOL_ERROR, "reserved bits set")
                if not b1 & 0x80:
                    raise FrameError(CloseCode.PROTOCOL_ERROR, "client frames must be masked")
                fin = b0 & 0x80
                opcode = b0 & 0x0F
                length = b1 & 0x7F
                head = pos + 2
                if length == 126:
                    if end - head < 2:
                        break
                    length = _U16.unpack_from(view, head)[0]
                    if length < 126:
                        raise FrameError(CloseCode.PROTOCOL_ERROR, "payload length not minimal")
                    head += 2
                elif length == 127:
                    if end - head < 8:
                        break
                    length = _U64.unpack_from(view, head)[0]
                    if length >> 63:
                        raise FrameError(CloseCode.PROTOCOL_ERROR, "invalid payload length")
                    if length <= 0xFFFF:
                        raise FrameError(CloseCode.PROTOCOL_ERROR, "payload length not minimal")
                    head += 8
                if opcode >= _OP_CLOSE:
                    if opcode > _OP_PONG:
                        raise FrameError(CloseCode.PROTOCOL_ERROR, f"unknown opcode {opcode}")
                    if not fin or length > 125:
                        raise FrameError(
                            CloseCode.PROTOCOL_ERROR, "control frames must be final and short"
                        )
                elif fin and opcode == _OP_TEXT and self._opcode is None:
                    # The common case, inline: a whole text message in one frame.
                    if length > self.max_message_size:
                        raise FrameError(
                            CloseCode.MESSAGE_TOO_BIG,
                            f"message larger than {self.max_message_size} bytes",
                        )
                    if end - head < 4 + length:
                        break
                    pos = head + 4 + length
                    payload = _unmask(view[head + 4 : pos], view[head : head + 4])
                    try:
                        events.append(payload.decode("utf-8"))
                    except UnicodeDecodeError:
                        raise FrameError(
                            CloseCode.INVALID_PAYLOAD, "text message is not valid UTF-8"
                        ) from None
                    continue
                else:
                    self._check_data_frame(opcode, length)
                if end - head < 4 + length:
                    break
                payload = _unmask(view[head + 4 : head + 4 + length], view[head : head + 4])
                pos = head + 4 + length
                if opcode >= _OP_CLOSE:
                    event = self._control(opcode, payload)
                    events.append(event)
                    if isinstance(event, Close):
                        self.closed = True
                        break
                    continue
                message = self._data(opcode, fin, payload)
                if message is not None:
                    events.append(message)
        except FrameError as e:
            e.events = events
            # What follows the offending frame (pos is past it if its payload
            # was the problem, else at its start: then it is skipped).
            rest = bytes(view[pos if pos > start else start : end])
            self._fail(rest, e, view[start] & 0x0F == _OP_CLOSE)
            raise
        if buf:
            if pos < end:
                del buf[:pos]
            else:
                self._buf = None
        elif pos < end:
            self._buf = bytearray(data[pos:])
        return events

    def feed_controls(self, data: bytes | bytearray) -> list[FrameEvent] | None:
        """:meth:`feed` *data* if it is whole ping and pong frames only
        (each final, masked, at most 125 bytes of payload: nothing
        :meth:`feed` could refuse) and the parser holds nothing (no frame
        cut short, no fragmented message, no violation or close seen): their
        :class:`Ping` and :class:`Pong` events. Otherwise None, with nothing
        fed: the caller feeds *data* as usual.

        A dormant connection answers a heartbeat this way without a task of
        its own (:meth:`broker.server.connection.Connection.readable`).
        """
        if self._buf is not None or self._opcode is not None or self.failed or self.closed:
            return None
        pos = 0
        end = len(data)
        while pos < end:
            if end - pos < 2 or data[pos] not in _PING_OR_PONG:
                return None
            b1 = data[pos + 1]
            if not b1 & 0x80 or b1 & 0x7F > 125:
                return None
            pos += 6 + (b1 & 0x7F)  # two bytes of header, four of mask, the payload
        if pos != end:
            return None
        return self.feed(data)

    def _check_data_frame(self, opcode: int, length: int) -> None:
        if opcode == _OP_CONT:
            if self._opcode is None:
                raise FrameError(CloseCode.PROTOCOL_ERROR, "continuation frame without a message")
        elif opcode in (_OP_TEXT, _OP_BINARY):
            if self._opcode is not None:
                raise FrameError(
                    CloseCode.PROTOCOL_ERROR, "new message inside a fragmented message"
                )
        else:
            raise FrameError(CloseCode.PROTOCOL_ERROR, f"unknown opcode {opcode}")
        if self._size + length > self.max_message_size:
            raise FrameError(
                CloseCode.MESSAGE_TOO_BIG,
                f"message larger than {self.max_message_size} bytes",
            )

    def _data(self, opcode: int, fin: int, payload: bytes) -> str | bytes | None:
        if opcode != _OP_CONT and fin:
            return self._complete(opcode, payload)  # the common case: one frame
        if opcode != _OP_CONT:
            self._opcode = opcode
            if opcode == _OP_TEXT:
                self._decoder = _utf8_decoder()
        self._size += len(payload)
        decoder = self._decoder
        if decoder is not None:
            # Text is decoded fragment by fragment: invalid UTF-8 fails the
            # connection at the fragment that makes it invalid (a code point
            # split across fragments waits for its last byte).
            if self._text is None:
                self._text = []
            try:
                self._text.append(decoder.decode(payload, bool(fin)))
            except UnicodeDecodeError:
                raise FrameError(
                    CloseCode.INVALID_PAYLOAD, "text message is not valid UTF-8"
                ) from None
        else:
            if self._parts is None:
                self._parts = []
            self._parts.append(payload)
        if not fin:
            return None
        self._opcode = None
        self._size = 0
        if decoder is not None:
            self._decoder = None
            text = "".join(self._text or ())
            self._text = None
            return text
        data = b"".join(self._parts or ())
        self._parts = None
        return data

    @staticmethod
    def _complete(opcode: int, data: bytes) -> str | bytes:
        if opcode == _OP_BINARY:
            return data
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            raise FrameError(CloseCode.INVALID_PAYLOAD, "text message is not valid UTF-8") from None

    @staticmethod
    def _control(opcode: int, payload: bytes) -> Ping | Pong | Close:
        if opcode == _OP_PING:
            return Ping(payload)
        if opcode == _OP_PONG:
            return Pong(payload)
        if not payload:
            return Close(1005, "")
        if len(payload) == 1:
            raise FrameError(CloseCode.PROTOCOL_ERROR, "close frame with a 1-byte payload")
        code = _U16.unpack_from(payload)[0]
        if code not in _SENDABLE_CODES and not 3000 <= code <= 4999:
            raise FrameError(CloseCode.PROTOCOL_ERROR, f"invalid close code {code}")
        try:
            reason = payload[2:].decode("utf-8")
        except UnicodeDecodeError:
            raise FrameError(CloseCode.INVALID_PAYLOAD, "close reason is not valid UTF-8") from None
        return Close(code, reason)

    # -- after a violation -----------------------------------------------------------

    def _fail(self, rest: bytes, error: FrameError, close: bool) -> None:
        """Enter the failed state, *rest* being the bytes from the offending
        frame on (or after it, if it was read whole); note in *error* if the
        client's close frame was the offending frame (*close*) or is in *rest*."""
        self.failed = True
        self._parts = self._text = None
        self._decoder = None
        self._buf = None
        if close:
            # The offending frame is the client's close frame itself (a bad
            # code or reason, too long, fragmented): the client is closing.
            self.closed = error.closing = True
            return
        if self._scan(rest):
            error.closing = True

    def _scan(self, data: bytes | bytearray) -> list[FrameEvent]:
        """Failed state: skip frames, unchecked, until a close frame.

        Keeps at most an incomplete frame header or close frame between
        calls; the bytes of skipped payloads are dropped as they come.
        """
        if self.lost:
            return []
        buf = self._buf
        if buf is None:
            buf = self._buf = bytearray()
        buf += data
        pos = 0
        end = len(buf)
        events: list[FrameEvent] = []
        while True:
            if self._skip:
                n = min(self._skip, end - pos)
                pos += n
                self._skip -= n
                if self._skip:
                    break
            if end - pos < 2:
                break
            opcode = buf[pos] & 0x0F
            length = buf[pos + 1] & 0x7F
            head = pos + 2
            if length == 126:
                if end - head < 2:
                    break
                length = _U16.unpack_from(buf, head)[0]
                head += 2
            elif length == 127:
                if end - head < 8:
                    break
                length = _U64.unpack_from(buf, head)[0]
                head += 8
                if length >> 63:
                    # No frame is that long: the bytes are not frames.
                    self.lost = True
                    pos = end
                    break
            masked = buf[pos + 1] & 0x80
            if masked:
                head += 4
            if end - head < 0:
                break
            if opcode != _OP_CLOSE or length > 125:
                pos = head
                self._skip = length
                continue
            if end - head < length:
                break
            payload = bytes(buf[head : head + length])
            if masked:
                payload = _unmask(payload, bytes(buf[head - 4 : head]))
            self.closed = True
            pos = end
            if len(payload) < 2:
                events.append(Close(1005, ""))
            else:
                reason = payload[2:].decode("utf-8", "replace")
                events.append(Close(_U16.unpack_from(payload)[0], reason))
            break
        if pos < end:
            del buf[:pos]
        else:
            self._buf = None
        return events
