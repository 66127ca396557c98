"""WebSocket frames the server sends: data frames built once for many connections,
and control frames.

A server never masks its frames (RFC 6455 section 5.1: "A server MUST NOT
mask any frames that it sends to the client"), so the bytes of a frame do not
depend on the connection. The broker therefore encodes each published message
once per encoding, frames it here once, and writes the very same ``bytes``
object to every subscriber, instead of letting each connection's wsproto
rebuild it.

Only complete, unfragmented, uncompressed data frames are built: FIN set,
RSV1-3 clear (no extension is negotiated), opcode text (0x1) or binary (0x2).
"""

from __future__ import annotations

import struct
from typing import Final

__all__ = ["binary_frame", "close_frame", "frame", "ping_frame", "pong_frame", "text_frame"]

# Byte 0 (RFC 6455 section 5.2): FIN (0x80) | RSV1-3 = 0 | opcode.
_FIN_TEXT: Final = 0x80 | 0x1
_FIN_BINARY: Final = 0x80 | 0x2

# Byte 1 is MASK (0, section 5.1) | payload length, which takes three forms
# (section 5.2): 0-125 in the 7 bits themselves; 126 then a 16-bit length;
# 127 then a 64-bit length (most significant bit 0). Multibyte lengths are in
# network byte order (section 5.2, "Payload length").
_LEN_16: Final = 126
_LEN_64: Final = 127
_HEADER_16: Final = struct.Struct("!BBH")
_HEADER_64: Final = struct.Struct("!BBQ")

# The 2-byte headers of short frames, the common case, precomputed.
_SHORT_TEXT: Final = tuple(bytes((_FIN_TEXT, n)) for n in range(_LEN_16))
_SHORT_BINARY: Final = tuple(bytes((_FIN_BINARY, n)) for n in range(_LEN_16))


def text_frame(payload: str) -> bytes:
    """A final text frame (opcode 0x1) carrying *payload* encoded as UTF-8."""
    data = payload.encode()
    n = len(data)  # the length on the wire is in bytes, not characters
    if n < _LEN_16:
        return _SHORT_TEXT[n] + data
    if n <= 0xFFFF:
        return _HEADER_16.pack(_FIN_TEXT, _LEN_16, n) + data
    return _HEADER_64.pack(_FIN_TEXT, _LEN_64, n) + data


def binary_frame(payload: bytes) -> bytes:
    """A final binary frame (opcode 0x2) carrying *payload*."""
    n = len(payload)
    if n < _LEN_16:
        return _SHORT_BINARY[n] + payload
    if n <= 0xFFFF:
        return _HEADER_16.pack(_FIN_BINARY, _LEN_16, n) + payload
    return _HEADER_64.pack(_FIN_BINARY, _LEN_64, n) + payload


def frame(payload: str | bytes) -> bytes:
    """A text frame for a ``str`` (JSON), a binary frame otherwise (msgpack)."""
    if isinstance(payload, str):
        return text_frame(payload)
    return binary_frame(payload)


# -- control frames (section 5.5): always final, payload at most 125 bytes --

_CLOSE: Final = 0x80 | 0x8
_PING: Final = 0x80 | 0x9
_PONG: Final = 0x80 | 0xA
_MAX_CONTROL: Final = 125


def _control(first: int, payload: bytes) -> bytes:
    if len(payload) > _MAX_CONTROL:
        raise ValueError("control frame payload is limited to 125 bytes")
    return bytes((first, len(payload))) + payload


def ping_frame(payload: bytes = b"") -> bytes:
    """A ping (opcode 0x9); the peer must answer with a pong echoing *payload*."""
    return _control(_PING, payload)


def pong_frame(payload: bytes = b"") -> bytes:
    """A pong (opcode 0xA) answering a ping with the same *payload*."""
    return _control(_PONG, payload)


def close_frame(code: int | None = None, reason: str = "") -> bytes:
    """A close frame (opcode 0x8, section 5.5.1) with an optional code and reason.

    The reason is cut, on a character boundary, to fit the 123 bytes that
    remain after the 2-byte code.
    """
    if code is None:
        return _control(_CLOSE, b"")
    data = reason.encode()
    if len(data) > _MAX_CONTROL - 2:
        data = data[: _MAX_CONTROL - 2].decode(errors="ignore").encode()
    return _control(_CLOSE, struct.pack("!H", code) + data)
