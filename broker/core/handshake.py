"""The WebSocket opening handshake, server side (RFC 6455 section 4.2), sans-I/O.

h11 parses the HTTP/1.1 request (with its 16 KiB cap on the request head);
this module checks that it is a valid WebSocket upgrade and builds the
responses: ``101 Switching Protocols`` with ``Sec-WebSocket-Accept``, or an
HTTP error with a short plain-text reason. Bytes the client sent after the
request (allowed by HTTP, rare in practice) are kept in
:attr:`UpgradeRequest.trailing` for the frame parser.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
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
    "reject_response",
]

#: Largest request head accepted (h11's own default, shared by most servers).
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
        target: the request target (path and query string).
        headers: (lower-case name, value) pairs, in order.
        key: the ``Sec-WebSocket-Key``.
        subprotocols: the offered ``Sec-WebSocket-Protocol`` values, in order.
        trailing: bytes received after the request head.
    """

    target: str
    headers: tuple[tuple[str, str], ...]
    key: str
    subprotocols: tuple[str, ...]
    trailing: bytes


def _tokens(value: str) -> list[str]:
    return [t.strip().lower() for t in value.split(",") if t.strip()]


class HandshakeParser:
    """Feeds request bytes to h11 until a complete upgrade request is read."""

    def __init__(self) -> None:
        self._h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_HEAD)

    def feed(self, data: bytes | bytearray) -> UpgradeRequest | None:
        """Return the request once complete, None if more bytes are needed.

        Raises HandshakeError if the request is malformed or not an upgrade.
        An empty *data* means the client closed the connection.
        """
        self._h11.receive_data(bytes(data))
        try:
            event = self._h11.next_event()
        except h11.RemoteProtocolError as e:
            raise HandshakeError(e.error_status_hint, "malformed HTTP request") from None
        if event is h11.NEED_DATA:
            return None
        if isinstance(event, h11.ConnectionClosed):
            raise HandshakeError(400, "connection closed during the handshake")
        assert isinstance(event, h11.Request)
        return self._check(event)

    def _check(self, request: h11.Request) -> UpgradeRequest:
        headers = tuple(
            (name.decode("latin-1").lower(), value.decode("latin-1"))
            for name, value in request.headers
        )
        fields: dict[str, str] = {}
        for name, value in headers:
            fields[name] = f"{fields[name]}, {value}" if name in fields else value
        if request.method != b"GET":
            raise HandshakeError(405, "WebSocket upgrades use GET", (("Allow", "GET"),))
        if request.http_version != b"1.1":  # RFC 6455 4.1: HTTP/1.1 or higher
            raise HandshakeError(400, "WebSocket upgrades need HTTP/1.1")
        if "content-length" in fields or "transfer-encoding" in fields:
            # A body would be read as WebSocket frames.
            raise HandshakeError(400, "a WebSocket upgrade request has no body")
        if "websocket" not in _tokens(fields.get("upgrade", "")) or "upgrade" not in _tokens(
            fields.get("connection", "")
        ):
            raise NotAnUpgrade(request.target.decode("latin-1"), headers)
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
        # The bytes after the request head belong to the WebSocket
        # connection (RFC 6455 4.2.1: frames may follow at once). h11 has
        # paused on the upgrade and left them unprocessed in its buffer.
        trailing, _closed = self._h11.trailing_data
        return UpgradeRequest(
            target=request.target.decode("latin-1"),
            headers=headers,
            key=key,
            subprotocols=tuple(
                p.strip() for p in fields.get("sec-websocket-protocol", "").split(",") if p.strip()
            ),
            trailing=bytes(trailing),
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
