"""GET /client.js on the WebSocket listener: the JavaScript client, with
cache headers; every other plain request keeps its 426."""

from __future__ import annotations

import json
import re
import ssl
from pathlib import Path

import h11
import pytest
import trio

from broker.core.version import VERSION
from broker.web import asset
from tests.conftest import BrokerFactory

CLIENT_JS = Path(__file__).resolve().parent.parent / "broker" / "web" / "client.js"


async def get(
    port: int,
    request: bytes,
    ssl_context: ssl.SSLContext | None = None,
) -> tuple[h11.Response, bytes]:
    """Send *request* raw; the response and its body, read until the broker closes."""
    stream: trio.abc.Stream = await trio.open_tcp_stream("127.0.0.1", port)
    if ssl_context is not None:
        stream = trio.SSLStream(stream, ssl_context, server_hostname="127.0.0.1")
    conn = h11.Connection(h11.CLIENT)
    received = b""
    with trio.fail_after(5):
        await stream.send_all(request)
        try:
            while data := await stream.receive_some(65536):
                received += data
        except trio.BrokenResourceError:
            pass  # TLS without close_notify
    await trio.aclose_forcefully(stream)
    conn.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(received)
    conn.receive_data(b"")
    response = conn.next_event()
    assert isinstance(response, h11.Response), received[:200]
    body = b""
    while isinstance(event := conn.next_event(), h11.Data):
        body += event.data
    return response, body


def header(response: h11.Response, name: str) -> str | None:
    for key, value in response.headers:
        if key.decode() == name.lower():
            return str(value.decode())
    return None


async def test_get_client_js(start_broker: BrokerFactory) -> None:
    broker = await start_broker()
    response, body = await get(broker.port, b"GET /client.js HTTP/1.1\r\nHost: x\r\n\r\n")
    assert response.status_code == 200
    assert body == CLIENT_JS.read_bytes()
    assert header(response, "content-type") == "text/javascript; charset=utf-8"
    assert header(response, "content-length") == str(len(body))
    assert header(response, "cache-control") == "no-cache"
    assert header(response, "access-control-allow-origin") == "*"
    assert header(response, "x-content-type-options") == "nosniff"
    assert header(response, "connection") == "close"
    etag = header(response, "etag")
    script = asset("client.js")
    assert script is not None and etag == script.etag
    assert etag.startswith('"') and etag.endswith('"')
    assert broker.stats.rejected == {}  # served, not refused

    # Revalidation: 304 without a body, for the same tag (weak or in a list).
    for value in (etag, f"W/{etag}", f'"other", {etag}', "*"):
        request = f"GET /client.js HTTP/1.1\r\nHost: x\r\nIf-None-Match: {value}\r\n\r\n"
        response, body = await get(broker.port, request.encode())
        assert (response.status_code, body) == (304, b""), value
        assert header(response, "etag") == etag
    stale = b'GET /client.js?v=2 HTTP/1.1\r\nHost: x\r\nIf-None-Match: "old"\r\n\r\n'
    response, body = await get(broker.port, stale)
    assert response.status_code == 200 and body == CLIENT_JS.read_bytes()


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", 426),
        (b"GET /client.jsx HTTP/1.1\r\nHost: x\r\n\r\n", 426),
        (b"GET /ws/client.js HTTP/1.1\r\nHost: x\r\n\r\n", 426),
        (b"HEAD /client.js HTTP/1.1\r\nHost: x\r\n\r\n", 405),
        (b"POST /client.js HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n", 405),
        (b"GET /client.js HTTP/1.0\r\n\r\n", 400),  # WebSocket needs HTTP/1.1
    ],
)
async def test_other_plain_requests_keep_their_answer(
    start_broker: BrokerFactory, request_bytes: bytes, status: int
) -> None:
    broker = await start_broker()
    response, _ = await get(broker.port, request_bytes)
    assert response.status_code == status
    assert broker.stats.rejected == {"bad_request": 1}


async def test_client_js_over_tls(
    start_broker: BrokerFactory, tls_files: dict[str, str], client_ssl: ssl.SSLContext
) -> None:
    broker = await start_broker(
        {"listener": {"tls_cert": tls_files["tls_cert"], "tls_key": tls_files["tls_key"]}}
    )
    response, body = await get(
        broker.port, b"GET /client.js HTTP/1.1\r\nHost: x\r\n\r\n", client_ssl
    )
    assert response.status_code == 200
    assert body == CLIENT_JS.read_bytes()


def test_versions_agree() -> None:
    """client.js, its package.json and the broker carry one version."""
    source = CLIENT_JS.read_text()
    match = re.search(r'export const VERSION = "([^"]+)";', source)
    assert match is not None and match.group(1) == VERSION
    package = json.loads((CLIENT_JS.parent / "package.json").read_text())
    assert package["version"] == VERSION
    assert package["types"] == "./client.d.ts" and package["main"] == "./client.js"
    assert set(package["files"]) == {"client.js", "client.d.ts"}
