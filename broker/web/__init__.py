"""The browser side, shipped as package data: the JavaScript client and the
admin console's page.

* ``client.js`` (an ES module, no build step) and ``client.d.ts``, its types;
  ``package.json`` publishes them to npm. The WebSocket listener serves
  ``GET /client.js`` (see :func:`client_script_response`); docs/browser.md
  is the guide.
* ``console/``: the admin listener's page at ``GET /`` (docs/operations.md).

This module only reads the files and answers for them; it does no I/O of
its own beyond reading package data once, and knows nothing of the server.
"""

from __future__ import annotations

import base64
import functools
import hashlib
from dataclasses import dataclass
from http import HTTPStatus
from importlib import resources
from typing import Final

import h11

__all__ = [
    "CLIENT_SCRIPT_PATH",
    "Asset",
    "asset",
    "client_script_response",
    "not_modified",
]

#: Where the WebSocket listener serves the client.
CLIENT_SCRIPT_PATH: Final = "/client.js"

_TYPES: Final = {
    ".js": "text/javascript; charset=utf-8",
    ".ts": "text/plain; charset=utf-8",
    ".json": "application/json",
    ".html": "text/html; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}

#: The files that may be served, by name relative to this package.
ASSETS: Final = frozenset(
    {
        "client.js",
        "client.d.ts",
        "console/index.html",
        "console/console.js",
        "console/console.css",
    }
)


@dataclass(frozen=True, slots=True)
class Asset:
    """One static file: its bytes, type and entity tag.

    Attributes:
        name: the path relative to ``broker/web``.
        body: the file's content.
        content_type: the ``Content-Type`` to send.
        etag: a strong entity tag (quoted) derived from the content, so a
            new version of the broker gets its client fetched again.
    """

    name: str
    body: bytes
    content_type: str
    etag: str


@functools.cache
def asset(name: str) -> Asset | None:
    """The asset *name* (``"client.js"``, ``"console/index.html"``...), or
    None when there is no such asset. Read once, then kept."""
    if name not in ASSETS:
        return None
    body = resources.files(__name__).joinpath(name).read_bytes()
    digest = base64.urlsafe_b64encode(hashlib.sha256(body).digest()[:12]).decode()
    suffix = name[name.rfind(".") :]
    return Asset(name, body, _TYPES.get(suffix, "application/octet-stream"), f'"{digest}"')


def not_modified(etag: str, if_none_match: str | None) -> bool:
    """Whether an ``If-None-Match`` header value matches *etag* (RFC 9110
    13.1.2: weak comparison, ``*`` matches any)."""
    if if_none_match is None:
        return False
    tags = [t.strip() for t in if_none_match.split(",")]
    return any(t == "*" or t.removeprefix("W/") == etag for t in tags)


#: Headers of the client script: revalidated on every use (a 304 costs a
#: few bytes), so a page never runs a client older than its broker; any
#: page may import it (module scripts are fetched with CORS).
CLIENT_SCRIPT_HEADERS: Final = (
    ("Cache-Control", "no-cache"),
    ("Access-Control-Allow-Origin", "*"),
    ("X-Content-Type-Options", "nosniff"),
)


def client_script_response(target: str, headers: tuple[tuple[str, str], ...]) -> bytes | None:
    """The whole HTTP/1.1 answer to a plain ``GET`` of *target* on the
    WebSocket listener: the client script (200, or 304 when
    ``If-None-Match`` matches) for ``/client.js`` (any query string), None
    for any other target. *headers* are the request's, names in lower case.
    The answer closes the connection."""
    if target.partition("?")[0] != CLIENT_SCRIPT_PATH:
        return None
    script = asset("client.js")
    assert script is not None
    if_none_match = next((v for k, v in headers if k == "if-none-match"), None)
    status = 304 if not_modified(script.etag, if_none_match) else 200
    fields = [
        ("Content-Type", script.content_type),
        ("ETag", script.etag),
        *CLIENT_SCRIPT_HEADERS,
        ("Connection", "close"),
    ]
    body = b""
    if status == 200:
        body = script.body
        fields.append(("Content-Length", str(len(body))))
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")  # h11 answers requests only
    conn.next_event()
    head = conn.send(
        h11.Response(status_code=status, reason=HTTPStatus(status).phrase.encode(), headers=fields)
    )
    assert head is not None
    return head + body
