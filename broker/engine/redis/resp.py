"""RESP3, the Redis protocol, without I/O: commands to bytes, bytes to replies.

:func:`pack` encodes commands (arrays of bulk strings). :class:`Parser` is
fed what the socket gives and returns each complete reply in order. It is
incremental: a large reply arriving in many reads is parsed once, piece by
piece, never re-read from its start. Values come out as Python objects:

* simple and bulk strings, verbatim strings: ``bytes``;
* integers and big numbers: ``int``; doubles: ``float``; booleans: ``bool``;
  null: ``None``;
* arrays and sets: ``list``; maps: ``dict`` (a map whose keys cannot be
  dict keys comes out as a flat ``list``);
* push messages (pub/sub): :class:`Push`, a ``list``;
* errors (simple or blob): a :class:`ReplyError` *value*, not raised, so
  that each of several pipelined requests gets its own answer;
* attributes are read and dropped.

A reply the parser cannot understand raises :class:`ProtocolError`: the
connection is no longer usable.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

__all__ = ["ProtocolError", "Push", "ReplyError", "Value", "pack"]

Value = object

_CRLF: Final = b"\r\n"
#: Consumed bytes are dropped from the buffer once there are this many.
_COMPACT_AT: Final = 1 << 16


class ReplyError(Exception):
    """An error reply (``-ERR ...``); its first word is :attr:`code`."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message
        self.code = message.split(" ", 1)[0]


class ProtocolError(Exception):
    """The server sent something that is not RESP3."""


class Push(list[Value]):
    """A push message (``>``): pub/sub deliveries and (un)subscribe notices."""


def pack(args: Iterable[bytes | str | int]) -> bytes:
    """One command as RESP: an array of bulk strings."""
    parts: list[bytes] = []
    for arg in args:
        if isinstance(arg, str):
            arg = arg.encode()
        elif isinstance(arg, int):
            arg = b"%d" % arg
        parts.append(b"$%d\r\n%b\r\n" % (len(arg), arg))
    return b"*%d\r\n" % len(parts) + b"".join(parts)


class _Frame:
    """An aggregate being filled: its kind and the values still expected."""

    __slots__ = ("items", "kind", "remaining")

    def __init__(self, kind: int, remaining: int) -> None:
        self.kind = kind
        self.remaining = remaining
        self.items: list[Value] = []

    def build(self) -> Value:
        kind, items = self.kind, self.items
        if kind == 0x3E:  # '>'
            return Push(items)
        if kind == 0x25 or kind == 0x7C:  # '%' map, '|' attribute
            pairs = zip(items[::2], items[1::2], strict=True)
            try:
                value: Value = dict(pairs)
            except TypeError:
                value = items
            return _ATTRIBUTE if kind == 0x7C else value
        return items


#: What an attribute (``|``) turns into: dropped when attached.
_ATTRIBUTE: Final = object()

_AGGREGATES: Final = frozenset(b"*~>%|")
_MAPS: Final = frozenset(b"%|")


class Parser:
    """Incremental RESP3 parser: :meth:`feed` bytes, take the :meth:`replies`."""

    __slots__ = ("_buf", "_pos", "_stack")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._pos = 0
        self._stack: list[_Frame] = []

    def feed(self, data: bytes | bytearray) -> None:
        self._buf += data

    def replies(self) -> list[Value]:
        """Every reply completed by what was fed so far, in order."""
        out: list[Value] = []
        buf = self._buf
        pos = self._pos
        stack = self._stack
        size = len(buf)
        while pos < size:
            end = buf.find(_CRLF, pos)
            if end < 0:
                break
            kind = buf[pos]
            value: Value
            if kind == 0x24 or kind == 0x3D or kind == 0x21:  # '$' bulk, '=' verbatim, '!' error
                length = _int(buf, pos + 1, end)
                if length < 0:
                    if length != -1:
                        raise ProtocolError(f"bad length {bytes(buf[pos:end])!r}")
                    value = None
                    pos = end + 2
                else:
                    start = end + 2
                    stop = start + length
                    if stop + 2 > size:
                        break  # the rest of the string has not arrived
                    if buf[stop] != 0x0D or buf[stop + 1] != 0x0A:
                        raise ProtocolError(
                            f"no CRLF after the {length} bytes of {bytes(buf[pos:end])!r}"
                        )
                    blob = bytes(buf[start:stop])
                    pos = stop + 2
                    if kind == 0x24:
                        value = blob
                    elif kind == 0x3D:
                        if length < 4 or blob[3] != 0x3A:  # "txt:" or "mkd:"
                            raise ProtocolError(f"verbatim string without its format: {blob[:8]!r}")
                        value = blob[4:]
                    else:
                        value = ReplyError(blob.decode("utf-8", "replace"))
            elif kind == 0x2B:  # '+'
                value = bytes(buf[pos + 1 : end])
                pos = end + 2
            elif kind == 0x2D:  # '-'
                value = ReplyError(buf[pos + 1 : end].decode("utf-8", "replace"))
                pos = end + 2
            elif kind == 0x3A or kind == 0x28:  # ':' integer, '(' big number
                value = _int(buf, pos + 1, end)
                pos = end + 2
            elif kind in _AGGREGATES:
                count = _int(buf, pos + 1, end)
                if count < -1:
                    raise ProtocolError(f"bad length {bytes(buf[pos:end])!r}")
                pos = end + 2
                if count > 0:
                    stack.append(_Frame(kind, count * 2 if kind in _MAPS else count))
                    continue
                value = None if count < 0 else _Frame(kind, 0).build()
            elif kind == 0x5F:  # '_' null
                if end != pos + 1:
                    raise ProtocolError(f"bad null {bytes(buf[pos:end])!r}")
                value = None
                pos = end + 2
            elif kind == 0x23:  # '#' boolean
                flag = buf[pos + 1 : end]
                if flag == b"t":
                    value = True
                elif flag == b"f":
                    value = False
                else:
                    raise ProtocolError(f"bad boolean {bytes(buf[pos:end])!r}")
                pos = end + 2
            elif kind == 0x2C:  # ',' double
                text = buf[pos + 1 : end]
                try:
                    if not _plain(text):
                        raise ValueError
                    value = float(text)
                except ValueError:
                    raise ProtocolError(f"bad double {bytes(buf[pos:end])!r}") from None
                pos = end + 2
            else:
                raise ProtocolError(f"unknown reply type {bytes(buf[pos : pos + 1])!r}")
            # Attach the value to the aggregate it belongs to (completing
            # aggregates on the way up), or hand it out.
            while True:
                if value is _ATTRIBUTE:
                    break
                if not stack:
                    out.append(value)
                    break
                top = stack[-1]
                top.items.append(value)
                top.remaining -= 1
                if top.remaining:
                    break
                stack.pop()
                value = top.build()
        if pos >= _COMPACT_AT or (pos and pos == size):
            del buf[:pos]
            pos = 0
        self._pos = pos
        return out


def _int(buf: bytearray, start: int, end: int) -> int:
    text = buf[start:end]
    try:
        if not _plain(text) or text[0] == 0x2B:  # no "+1" either
            raise ValueError
        return int(text)
    except ValueError:
        raise ProtocolError(f"bad integer {bytes(text)!r}") from None


def _plain(text: bytearray) -> bool:
    """Not empty, no space around it, no ``_``: the forms int() and float()
    take that RESP does not ("1_0", " 1")."""
    return bool(text) and text[0] > 0x20 and text[-1] > 0x20 and 0x5F not in text
