"""The WebSocket opening handshake, server side (RFC 6455 section 4.2), sans-I/O.

h11 parses the HTTP/1.1 request; this module checks that it is a valid
WebSocket upgrade and builds the responses: ``101 Switching Protocols`` with
``Sec-WebSocket-Accept``, or an HTTP error with a short plain-text reason.
Bytes the client sent after the request (allowed by HTTP, rare in practice)
are kept in :attr:`UpgradeRequest.trailing` for the frame parser.

What is refused, in this order:

- a request head (request line, header fields and the empty line that ends
  them) over :data:`MAX_REQUEST_HEAD` bytes: 431, however the bytes were
  split into reads (h11's own limit covers an incomplete head only: a
  complete one that arrives in a read past the limit is measured here);
- anything h11 cannot parse: 400 (or h11's status hint);
- a method other than ``GET``: 405; HTTP/1.0: 400;
- a request target that is neither origin-form (RFC 9112 section 3.2.1:
  ``/path`` then ``?query`` if any) nor an absolute ``http``/``https`` URI
  (absolute-form, which RFC 9112 section 3.2.2 says a server must accept
  and RFC 6455 section 4.2.1 allows: its path and query are the target,
  its host is not used): the authority-form (``host:443``), the asterisk
  form, other schemes and a fragment (``#``) are 400. ``//host/ws`` is
  origin-form, with the path ``//host/ws`` (never a host): the broker
  compares the path as sent with ``[listener] path``, so it is a 404 there;
- a body (``Content-Length``, ``Transfer-Encoding``): 400;
- no ``Upgrade: websocket`` with ``Connection: upgrade``: 426; a
  ``Sec-WebSocket-Version`` other than 13: 426; a ``Sec-WebSocket-Key``
  that is not 16 bytes in base64: 400.

**The common case without h11.** h11 takes about 25 µs to parse a request
(its state machine, its event objects and per-field validation), most of
the cost of a handshake. A request that arrives whole in the first read,
written the plain way (``GET target HTTP/1.1``, CRLF line ends, one
``Host``, every field name a token and every value printable ASCII, no
``Content-Length`` nor ``Transfer-Encoding``, a head within the limit), is
parsed by :func:`_parse_plain` with two regular expressions of h11's own
grammar, narrowed: what it accepts, h11 accepts too, with the same method,
target, version, fields and trailing bytes. Anything else, including every
request that should be refused, goes to h11 as before, so the answers and
their statuses do not change (``tests/test_handshake_differential.py``
compares both paths on generated requests).
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Final

import h11
from wsproto.utilities import generate_accept_token

__all__ = [
    "HandshakeError",
    "HandshakeParser",
    "NotAnUpgrade",
    "UpgradeRequest",
    "accept_response",
    "origin_form",
    "reject_response",
]

#: Largest request head accepted, in bytes (h11's own default, shared by
#: most servers): 16 KiB is accepted, one byte more is 431.
MAX_REQUEST_HEAD: Final = 16 * 1024


class HandshakeError(Exception):
    """The request is not an acceptable WebSocket upgrade.

    Attributes:
        status: the HTTP status to answer with.
        reason: a short explanation for the response body.
        headers: extra response headers (e.g. ``Sec-WebSocket-Version``).
    """

    def __init__(self, status: int, reason: str, headers: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__(f"{status}: {reason}")
        self.status = status
        self.reason = reason
        self.headers = headers


class NotAnUpgrade(HandshakeError):
    """A ``GET`` without ``Upgrade: websocket``: answered 426, unless the
    listener serves its *target* (``GET /client.js``, :mod:`broker.web`).

    Attributes:
        target: the request target (path and query string).
        request_headers: (lower-case name, value) pairs, in order.
    """

    def __init__(self, target: str, request_headers: tuple[tuple[str, str], ...]) -> None:
        super().__init__(
            426,
            "this endpoint speaks WebSocket only",
            (("Upgrade", "websocket"), ("Connection", "Upgrade")),
        )
        self.target = target
        self.request_headers = request_headers


@dataclass(frozen=True, slots=True)
class UpgradeRequest:
    """A valid WebSocket upgrade request.

    Attributes:
        target: the request target in origin-form (path, then ``?`` and the
            query if any), as sent (of an absolute-form target, its path and
            query).
        headers: (lower-case name, value) pairs, in order.
        key: the ``Sec-WebSocket-Key``.
        subprotocols: the offered ``Sec-WebSocket-Protocol`` values, in order.
        trailing: bytes received after the request head.
        fields: each field's value by lower-case name, a repeated field's
            values joined with ``", "`` (RFC 9110 section 5.3).
    """

    target: str
    headers: tuple[tuple[str, str], ...]
    key: str
    subprotocols: tuple[str, ...]
    trailing: bytes
    fields: Mapping[str, str] = field(default_factory=dict, repr=False)

    @property
    def path(self) -> str:
        """The target's path, as sent (never decoded nor normalised)."""
        return self.target.partition("?")[0]

    @property
    def query(self) -> str:
        """The target's query (after the first ``?``), ``""`` if none."""
        return self.target.partition("?")[2]


def _tokens(value: str) -> list[str]:
    return [t.strip().lower() for t in value.split(",") if t.strip()]


#: h11's request-line (``_abnf.request_line``), narrowed to ``GET`` and HTTP/1.1.
_PLAIN_REQUEST_LINE: Final = re.compile(rb"GET ([\x21-\x7e]+) HTTP/1\.1")
#: h11's header-field (``_abnf.header_field``), its values narrowed to
#: printable ASCII (h11 also takes obs-text and control bytes other than NUL).
_PLAIN_FIELD: Final = re.compile(
    rb"([-!#$%&'*+.^_`|~0-9a-zA-Z]+):[ \t]*((?:[\x21-\x7e]+(?:[ \t]+[\x21-\x7e]+)*)?)[ \t]*"
)


def _parse_plain(
    data: bytes | bytearray, max_head: int
) -> tuple[bytes, tuple[tuple[str, str], ...], bytes] | None:
    """(target, fields, trailing bytes) of a request written the plain way,
    whole in *data*; None for anything else (h11 then decides).

    Accepted only what h11 accepts too, read the same way: the head ends at
    the first empty line (every line here ends with CRLF: a lone CR or LF
    fails the patterns, so h11, which also takes LF alone, finds the same
    end), field names lower-cased, values without the whitespace around
    them; exactly one ``Host`` (h11 wants one in HTTP/1.1); no
    ``Content-Length`` nor ``Transfer-Encoding`` (h11 validates those, then
    _check refuses them).
    """
    end = data.find(b"\r\n\r\n")
    if end < 0 or end + 4 > max_head:
        return None
    lines = bytes(data[:end]).split(b"\r\n")
    line = _PLAIN_REQUEST_LINE.fullmatch(lines[0])
    if line is None:
        return None
    fields = []
    hosts = 0
    for raw in lines[1:]:
        field = _PLAIN_FIELD.fullmatch(raw)
        if field is None:
            return None
        name = field[1].decode("ascii").lower()
        if name == "host":
            hosts += 1
        elif name == "content-length" or name == "transfer-encoding":
            return None
        fields.append((name, field[2].decode("ascii")))
    if hosts != 1:
        return None
    return line[1], tuple(fields), bytes(data[end + 4 :])


class HandshakeParser:
    """Feeds request bytes to h11 until a complete upgrade request is read
    (a plain request whole in the first bytes fed is read without h11).

    Args:
        max_head: the largest request head accepted, in bytes.
        plain: read a plain request whole in the first bytes without h11
            (False: always h11; the tests compare both).
    """

    def __init__(self, max_head: int = MAX_REQUEST_HEAD, *, plain: bool = True) -> None:
        self._max_head = max_head
        # Created on the first feed that needs it.
        self._h11: h11.Connection | None = None
        self._plain = plain
        #: Bytes fed so far (the head, and whatever came after it).
        self._received = 0

    def feed(self, data: bytes | bytearray) -> UpgradeRequest | None:
        """Return the request once complete, None if more bytes are needed.

        Raises HandshakeError if the request is malformed or not an upgrade.
        An empty *data* means the client closed the connection.
        """
        if self._h11 is None:
            if self._plain:
                plain = _parse_plain(data, self._max_head)
                if plain is not None:
                    target, fields, trailing = plain
                    return _check(b"GET", b"1.1", target, fields, trailing)
            # h11 refuses an incomplete head over the limit (431) as it arrives.
            self._h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=self._max_head)
        self._received += len(data)
        self._h11.receive_data(bytes(data))
        try:
            event = self._h11.next_event()
        except h11.RemoteProtocolError as e:
            if e.error_status_hint == 431:  # an incomplete head past the limit
                raise HandshakeError(431, self._too_large()) from None
            raise HandshakeError(e.error_status_hint, "malformed HTTP request") from None
        if event is h11.NEED_DATA:
            return None
        if isinstance(event, h11.ConnectionClosed):
            raise HandshakeError(400, "connection closed during the handshake")
        assert isinstance(event, h11.Request)
        # The head is what h11 consumed: everything fed minus what it left.
        trailing, _closed = self._h11.trailing_data
        if self._received - len(trailing) > self._max_head:
            raise HandshakeError(431, self._too_large())
        headers = tuple(
            (name.decode("latin-1").lower(), value.decode("latin-1"))
            for name, value in event.headers
        )
        return _check(event.method, event.http_version, event.target, headers, bytes(trailing))

    def _too_large(self) -> str:
        return f"request head larger than {self._max_head} bytes"


def _check(
    method: bytes,
    http_version: bytes,
    raw_target: bytes,
    headers: tuple[tuple[str, str], ...],
    trailing: bytes,
) -> UpgradeRequest:
    """The upgrade request, or the HandshakeError that refuses it."""
    fields: dict[str, str] = {}
    for name, value in headers:
        if name in fields:
            # Cookie fields join with "; " (RFC 9113 8.2.3), so that
            # Handshake.cookie reads the pairs of every one of them.
            value = f"{fields[name]}{'; ' if name == 'cookie' else ', '}{value}"
        fields[name] = value
    if method != b"GET":
        raise HandshakeError(405, "WebSocket upgrades use GET", (("Allow", "GET"),))
    if http_version != b"1.1":  # RFC 6455 4.1: HTTP/1.1 or higher
        raise HandshakeError(400, "WebSocket upgrades need HTTP/1.1")
    target = origin_form(raw_target.decode("latin-1"))
    if target is None:
        # authority-form, asterisk-form, another scheme, or a fragment
        raise HandshakeError(
            400,
            "the request target must be a path (origin-form: /path?query) "
            "or an http(s) URI (absolute-form)",
        )
    if "content-length" in fields or "transfer-encoding" in fields:
        # A body would be read as WebSocket frames.
        raise HandshakeError(400, "a WebSocket upgrade request has no body")
    if "websocket" not in _tokens(fields.get("upgrade", "")) or "upgrade" not in _tokens(
        fields.get("connection", "")
    ):
        raise NotAnUpgrade(raw_target.decode("latin-1"), headers)
    if fields.get("sec-websocket-version", "").strip() != "13":
        raise HandshakeError(
            426, "unsupported WebSocket version", (("Sec-WebSocket-Version", "13"),)
        )
    key = fields.get("sec-websocket-key", "").strip()
    try:
        if len(base64.b64decode(key, validate=True)) != 16:
            raise ValueError
    except (ValueError, binascii.Error):
        raise HandshakeError(400, "invalid Sec-WebSocket-Key") from None
    # The bytes after the request head (*trailing*) belong to the
    # WebSocket connection (RFC 6455 4.2.1: frames may follow at once).
    # h11 has paused on the upgrade and left them unprocessed (or h11 was
    # not needed: _parse_plain).
    return UpgradeRequest(
        target=target,
        headers=headers,
        key=key,
        subprotocols=tuple(
            p.strip() for p in fields.get("sec-websocket-protocol", "").split(",") if p.strip()
        ),
        trailing=trailing,
        fields=fields,
    )


def accept_response(key: str, subprotocol: str | None) -> bytes:
    """The ``101 Switching Protocols`` response completing the handshake."""
    lines = [
        "HTTP/1.1 101 Switching Protocols",
        "Upgrade: websocket",
        "Connection: Upgrade",
        "Sec-WebSocket-Accept: " + generate_accept_token(key.encode()).decode("ascii"),
    ]
    if subprotocol is not None:
        lines.append(f"Sec-WebSocket-Protocol: {subprotocol}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _phrase(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


def reject_response(status: int, reason: str, headers: tuple[tuple[str, str], ...] = ()) -> bytes:
    """An HTTP error response with *reason* as a text/plain body; closes."""
    conn = h11.Connection(h11.SERVER)
    body = (reason + "\n").encode()
    conn.receive_data(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")  # h11 answers requests only
    conn.next_event()
    head = conn.send(
        h11.Response(
            status_code=status,
            reason=_phrase(status),
            headers=[
                ("Content-Type", "text/plain; charset=utf-8"),
                ("Content-Length", str(len(body))),
                ("Connection", "close"),
                *headers,
            ],
        )
    )
    assert head is not None
    return head + body


def origin_form(target: str) -> str | None:
    """*target* as origin-form (``/path?query``), or None if it is not a
    request target a WebSocket server takes.

    An absolute ``http``/``https`` URI (absolute-form) gives its path and
    query (an empty path is ``/``); its authority must be present and is
    otherwise not used. Nothing is decoded or normalised.
    """
    if "#" in target:
        return None
    if target.startswith("/"):
        return target
    scheme, sep, rest = target.partition("://")
    if not sep or scheme.lower() not in ("http", "https"):
        return None
    authority, slash, path = rest.partition("/")
    authority = authority.partition("?")[0]
    if not authority or "@" in authority:
        return None
    if slash:
        return "/" + path
    _, question, query = rest.partition("?")
    return "/" + question + query
