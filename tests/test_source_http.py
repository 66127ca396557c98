"""The http source: the publish API on a loopback port, with good and bad requests.

Requests are written by an h11 client (or by hand, for the malformed ones)
over real sockets; every publish is checked at a subscribed broker client.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import ssl
from collections.abc import Mapping
from typing import Any

import h11
import pytest
import trio
from broker_http import HttpSource, create

from broker import Action, Broker, ConfigError, Identity, PluginContext, config_from_dict, hookimpl
from tests.conftest import BrokerFactory
from tests.helpers import connect, wait_until

KEY = "backend-key-0123456789"
READER_KEY = "reader-key-0123456789"
JSON_TYPE = ("content-type", "application/json")


class Rules:
    """Authorization and validation for the tests: readers may not publish;
    orders.* must carry a status."""

    def __init__(self) -> None:
        self.published: list[tuple[str, str, int]] = []

    @hookimpl
    def broker_authorize(self, identity: Identity, action: Action, topic: str) -> bool | None:
        if action is Action.PUBLISH and ("reader" in identity.roles or topic.startswith("admin")):
            return False
        return None

    @hookimpl
    def broker_validate(self, topic: str, data: Any) -> str | None:
        if topic.startswith("orders.") and not (isinstance(data, dict) and "status" in data):
            return "orders need a status"
        return None

    @hookimpl
    def broker_published(self, identity: Identity, topic: str, seq: int) -> None:
        self.published.append((identity.subject, topic, seq))


async def start(start_broker: BrokerFactory, **extra: Any) -> tuple[Broker, HttpSource, Rules]:
    rules = Rules()

    def rules_factory(settings: Mapping[str, Any], context: PluginContext) -> Rules:
        return rules

    table: dict[str, Any] = {
        "port": 0,
        "keys": [
            {"id": "backend", "sha256": hashlib.sha256(KEY.encode()).hexdigest(), "roles": ["svc"]},
            {"id": "reader", "key": READER_KEY, "roles": ["reader"]},
        ],
        "max_body_size": 1024,
        "max_batch": 3,
        "backoff_min": 0.01,
        "backoff_max": 0.02,
    }
    table.update(extra)
    broker = await start_broker(
        {"plugins": {"enabled": ["noauth", "rules", "http"]}, "plugin": {"http": table}},
        factories={"http": create, "rules": rules_factory},
    )
    sup = broker.sources[0]
    await wait_until(lambda: sup.state == "running")
    source = sup.source
    assert isinstance(source, HttpSource)
    return broker, source, rules


class Http:
    """An HTTP/1.1 client connection (h11), kept alive between requests."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.conn = h11.Connection(h11.CLIENT)

    @classmethod
    async def open(cls, port: int) -> Http:
        return cls(await trio.open_tcp_stream("127.0.0.1", port))

    async def _next(self) -> Any:
        while True:
            event = self.conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            self.conn.receive_data(await self.stream.receive_some(65536))

    async def send_head(self, method: str, target: str, headers: list[tuple[str, str]]) -> None:
        fields = [("host", "127.0.0.1"), *headers]
        await self.stream.send_all(
            self.conn.send(h11.Request(method=method, target=target, headers=fields))
        )

    async def response(self) -> tuple[int, dict[str, str], Any]:
        with trio.fail_after(5):
            head = await self._next()
            while isinstance(head, h11.InformationalResponse):
                head = await self._next()
            assert isinstance(head, h11.Response), head
            body = b""
            while True:
                event = await self._next()
                if isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    break
        headers = {k.decode(): v.decode() for k, v in head.headers}
        if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
            self.conn.start_next_cycle()
        return head.status_code, headers, json.loads(body) if body else None

    async def request(
        self,
        method: str,
        target: str,
        body: Any = None,
        *,
        key: str | None = KEY,
        headers: list[tuple[str, str]] | None = None,
        raw: bytes | None = None,
    ) -> tuple[int, dict[str, str], Any]:
        data = raw if raw is not None else (b"" if body is None else json.dumps(body).encode())
        fields = list(headers if headers is not None else [JSON_TYPE])
        if key is not None:
            fields.append(("authorization", f"Bearer {key}"))
        fields.append(("content-length", str(len(data))))
        await self.send_head(method, target, fields)
        if data:
            await self.stream.send_all(self.conn.send(h11.Data(data=data)))
        await self.stream.send_all(self.conn.send(h11.EndOfMessage()))
        return await self.response()

    async def aclose(self) -> None:
        await self.stream.aclose()


async def post(port: int, body: Any = None, **kwargs: Any) -> tuple[int, dict[str, str], Any]:
    client = await Http.open(port)
    try:
        return await client.request("POST", "/api/publish", body, **kwargs)
    finally:
        await client.aclose()


async def test_publish_answers_with_the_seq(start_broker: BrokerFactory) -> None:
    broker, source, rules = await start(start_broker)
    async with connect(broker.url) as client:
        await client.sub("orders.*")
        status, headers, body = await post(
            source.port, {"topic": "orders.42", "data": {"status": "shipped"}, "key": "42"}
        )
        assert (status, body) == (200, {"topic": "orders.42", "seq": 1})
        assert headers["content-type"] == "application/json"
        assert await client.recv() == {
            "op": "msg",
            "topic": "orders.42",
            "seq": 1,
            "data": {"status": "shipped"},
            "key": "42",
        }
        status, _, body = await post(source.port, {"topic": "orders.42", "data": {"status": "x"}})
        assert body == {"topic": "orders.42", "seq": 2}
    assert rules.published == [("backend", "orders.42", 1), ("backend", "orders.42", 2)]


async def test_batch_publishes_each_and_reports_each(start_broker: BrokerFactory) -> None:
    broker, source, _ = await start(start_broker)
    async with connect(broker.url) as client:
        await client.sub(">")
        batch = [
            {"topic": "a.b", "data": 1},
            {"topic": "admin.x", "data": 2},
            {"topic": "a.b", "data": 3, "key": "k"},
        ]
        status, _, body = await post(source.port, batch)
        assert status == 200
        assert body == {
            "results": [
                {"topic": "a.b", "seq": 1},
                {
                    "topic": "admin.x",
                    "error": {"code": "forbidden", "message": "not allowed to publish to admin.x"},
                },
                {"topic": "a.b", "seq": 2},
            ],
            "errors": 1,
        }
        assert [(await client.recv())["data"] for _ in range(2)] == [1, 3]


async def test_keep_alive_and_x_api_key(start_broker: BrokerFactory) -> None:
    _, source, _ = await start(start_broker)
    http = await Http.open(source.port)
    try:
        for n in (1, 2, 3):
            status, headers, body = await http.request(
                "POST",
                "/api/publish",
                {"topic": "t", "data": n},
                key=None,
                headers=[JSON_TYPE, ("x-api-key", KEY)],
            )
            assert (status, body["seq"]) == (200, n)
            assert "connection" not in headers
        # An error that did not need the body does not cost the connection either.
        status, _, _ = await http.request("GET", "/api/publish")
        assert status == 405
        status, _, body = await http.request("POST", "/api/publish", {"topic": "t", "data": 4})
        assert body == {"topic": "t", "seq": 4}
    finally:
        await http.aclose()
    assert source.requests == 5


async def test_expect_100_continue(start_broker: BrokerFactory) -> None:
    _, source, _ = await start(start_broker)
    http = await Http.open(source.port)
    try:
        data = json.dumps({"topic": "t", "data": "x"}).encode()
        await http.send_head(
            "POST",
            "/api/publish",
            [
                JSON_TYPE,
                ("authorization", f"Bearer {KEY}"),
                ("expect", "100-continue"),
                ("content-length", str(len(data))),
            ],
        )
        with trio.fail_after(5):
            event = await http._next()
        assert isinstance(event, h11.InformationalResponse) and event.status_code == 100
        await http.stream.send_all(
            http.conn.send(h11.Data(data=data)) + http.conn.send(h11.EndOfMessage())
        )
        status, _, body = await http.response()
        assert (status, body) == (200, {"topic": "t", "seq": 1})
    finally:
        await http.aclose()


@pytest.mark.parametrize(
    ("kwargs", "status", "code", "message"),
    [
        ({"raw": b'{"topic": "t", '}, 400, "bad_request", "malformed JSON"),
        ({"raw": b'{"topic": "t", "data": NaN}'}, 400, "bad_request", "NaN is not allowed"),
        ({"raw": b"\xff\xfe"}, 400, "bad_request", "malformed JSON"),
        ({"body": {"topic": "t"}}, 400, "bad_request", "missing field 'data'"),
        ({"body": {"data": 1}}, 400, "bad_request", "missing field 'topic'"),
        ({"body": {"topic": 5, "data": 1}}, 400, "bad_request", "topic must be a string"),
        ({"body": {"topic": "t", "data": 1, "key": 5}}, 400, "bad_request", "key must be a string"),
        ({"body": {"topic": "a b", "data": 1}}, 400, "bad_request", "topic must be dot-separated"),
        ({"body": {"topic": "t.*", "data": 1}}, 400, "bad_request", "wildcards"),
        ({"body": {"topic": "t", "data": 2**64}}, 400, "bad_request", "64-bit"),
        ({"body": "just a string"}, 400, "bad_request", "must be an object"),
        ({"body": []}, 400, "bad_request", "empty batch"),
        (
            {"body": [{"topic": "a", "data": 1}, {"topic": "b"}]},
            400,
            "bad_request",
            "[1]: missing field 'data'",
        ),
        (
            {"body": [{"topic": "t", "data": n} for n in range(4)]},
            413,
            "too_large",
            "more than 3 messages",
        ),
        ({"body": {"topic": "t", "data": 1}, "key": None}, 401, "unauthorized", "missing API key"),
        (
            {"body": {"topic": "t", "data": 1}, "key": "wrong-key-0123456789"},
            401,
            "unauthorized",
            "invalid API key",
        ),
        (
            {"body": {"topic": "t", "data": 1}, "headers": [("content-type", "text/plain")]},
            415,
            "bad_request",
            "Content-Type must be application/json",
        ),
        (
            {"body": {"topic": "t", "data": "x" * 2000}},
            413,
            "too_large",
            "body larger than 1024 bytes",
        ),
        (
            {"body": {"topic": "admin.users", "data": 1}},
            403,
            "forbidden",
            "not allowed to publish to admin.users",
        ),
        ({"body": {"topic": "t", "data": 1}, "key": READER_KEY}, 403, "forbidden", "not allowed"),
        (
            {"body": {"topic": "orders.1", "data": {"qty": 1}}},
            422,
            "invalid",
            "orders need a status",
        ),
    ],
)
async def test_bad_requests_get_a_4xx_json_error(
    start_broker: BrokerFactory, kwargs: dict[str, Any], status: int, code: str, message: str
) -> None:
    _, source, rules = await start(start_broker)
    got, headers, body = await post(source.port, **kwargs)
    assert got == status, body
    assert body["error"]["code"] == code
    assert message in body["error"]["message"]
    if status == 401:
        assert headers["www-authenticate"].startswith("Bearer")
    assert rules.published == []


async def test_wrong_path_and_method(start_broker: BrokerFactory) -> None:
    _, source, _ = await start(start_broker)
    http = await Http.open(source.port)
    try:
        status, _, body = await http.request("POST", "/api/other", {"topic": "t", "data": 1})
        assert (status, body["error"]["message"]) == (404, "no endpoint at /api/other")
        status, headers, _ = await http.request(
            "PUT", "/api/publish?x=1", {"topic": "t", "data": 1}
        )
        assert (status, headers["allow"]) == (405, "POST")
    finally:
        await http.aclose()


async def test_oversized_bodies_are_refused_before_or_while_reading(
    start_broker: BrokerFactory,
) -> None:
    _, source, _ = await start(start_broker)
    # Declared too large: refused on the headers alone.
    http = await Http.open(source.port)
    try:
        await http.send_head(
            "POST",
            "/api/publish",
            [JSON_TYPE, ("authorization", f"Bearer {KEY}"), ("content-length", "100000000")],
        )
        status, headers, body = await http.response()
        assert (status, body["error"]["code"], headers["connection"]) == (413, "too_large", "close")
    finally:
        await http.aclose()
    # Chunked: refused once the chunks pass the limit.
    http = await Http.open(source.port)
    try:
        await http.send_head(
            "POST",
            "/api/publish",
            [JSON_TYPE, ("authorization", f"Bearer {KEY}"), ("transfer-encoding", "chunked")],
        )
        await http.stream.send_all(http.conn.send(h11.Data(data=b"[" + b" " * 2000)))
        status, _, body = await http.response()
        assert (status, body["error"]["code"]) == (413, "too_large")
    finally:
        await http.aclose()


async def test_garbage_is_a_400_and_a_close(start_broker: BrokerFactory) -> None:
    _, source, _ = await start(start_broker)
    stream = await trio.open_tcp_stream("127.0.0.1", source.port)
    try:
        await stream.send_all(b"THIS IS NOT HTTP\r\n\r\n")
        with trio.fail_after(5):
            data = b""
            while chunk := await stream.receive_some(4096):
                data += chunk
        assert data.startswith(b"HTTP/1.1 400 ")
        assert b'"code":"bad_request"' in data
    finally:
        await stream.aclose()


async def read_until_closed(stream: trio.abc.Stream) -> bytes:
    data = b""
    with trio.fail_after(5):
        while chunk := await stream.receive_some(4096):
            data += chunk
    return data


async def test_content_length_with_transfer_encoding_is_refused(
    start_broker: BrokerFactory,
) -> None:
    """Request smuggling (RFC 9112 section 6.1): a request with both framings is
    400 and closes the connection. It used to be published and answered 200,
    the connection kept, and the bytes after the chunked body taken as the
    next request."""
    _, source, rules = await start(start_broker)
    message = json.dumps({"topic": "t", "data": 1}).encode()
    smuggled = (
        f"POST /api/publish HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {KEY}\r\n"
        f"content-type: application/json\r\ncontent-length: {len(message)}\r\n\r\n"
    ).encode() + message
    chunked = f"{len(message):x}\r\n".encode() + message + b"\r\n0\r\n\r\n"
    head = (
        f"POST /api/publish HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {KEY}\r\n"
        f"content-type: application/json\r\ncontent-length: {len(chunked)}\r\n"
        "transfer-encoding: chunked\r\n\r\n"
    ).encode()
    stream = await trio.open_tcp_stream("127.0.0.1", source.port)
    async with stream:
        await stream.send_all(head + chunked + smuggled)
        data = await read_until_closed(stream)
    assert data.startswith(b"HTTP/1.1 400 ")
    assert data.count(b"HTTP/1.1 ") == 1
    assert b"connection: close\r\n" in data.lower()
    assert b'"code":"bad_request"' in data
    assert rules.published == []


async def test_a_request_without_a_key_is_401_and_closes(start_broker: BrokerFactory) -> None:
    """An unauthenticated client holds no connection slot: every request is
    401 without a valid key, whatever its path or method (a wrong path used to
    be 404 first), and the connection is closed (it used to be kept)."""
    _, source, _ = await start(start_broker)
    for method, target in [("POST", "/api/publish"), ("GET", "/elsewhere")]:
        http = await Http.open(source.port)
        try:
            status, headers, body = await http.request(method, target, {"topic": "t"}, key=None)
            assert (status, body["error"]["code"]) == (401, "unauthorized")
            assert headers["connection"] == "close"
            with trio.fail_after(5):
                assert await http.stream.receive_some(4096) == b""
        finally:
            await http.aclose()


async def test_https(
    start_broker: BrokerFactory, tls_files: dict[str, str], client_ssl: ssl.SSLContext
) -> None:
    broker, source, _ = await start(
        start_broker, tls_cert=tls_files["tls_cert"], tls_key=tls_files["tls_key"]
    )
    assert source.url.startswith("https://127.0.0.1:")
    message = json.dumps({"topic": "t", "data": "over tls"}).encode()
    request = (
        f"POST /api/publish HTTP/1.1\r\nhost: x\r\nx-api-key: {KEY}\r\nconnection: close\r\n"
        f"content-type: application/json\r\ncontent-length: {len(message)}\r\n\r\n"
    ).encode() + message
    async with connect(broker.url) as client:
        await client.sub("t")
        tcp = await trio.open_tcp_stream("127.0.0.1", source.port)
        # https_compatible: the server closes without a TLS close_notify, as
        # HTTPS servers do (the answer has its Content-Length).
        stream = trio.SSLStream(tcp, client_ssl, server_hostname="127.0.0.1", https_compatible=True)
        async with stream:
            await stream.send_all(request)
            data = await read_until_closed(stream)
        assert data.startswith(b"HTTP/1.1 200 ")
        assert data.endswith(b'{"topic":"t","seq":1}')
        assert (await client.recv())["data"] == "over tls"
    # Plain HTTP on the TLS port: the handshake fails, the connection is dropped.
    plain = await trio.open_tcp_stream("127.0.0.1", source.port)
    async with plain:
        await plain.send_all(request)
        with contextlib.suppress(trio.BrokenResourceError):
            assert b"HTTP/1.1" not in await read_until_closed(plain)


async def test_port_in_use_backs_off_then_serves(start_broker: BrokerFactory) -> None:
    first, source, _ = await start(start_broker)
    port = source.port
    second = await start_broker(
        {
            "plugins": {"enabled": ["noauth", "http"]},
            "plugin": {
                "http": {
                    "port": port,
                    "keys": [{"id": "x", "key": KEY}],
                    "backoff_min": 0.01,
                    "backoff_max": 0.02,
                }
            },
        },
        factories={"http": create},
    )
    sup = second.sources[0]
    await wait_until(lambda: sup.restarts >= 1)
    assert sup.state != "running"
    assert sup.last_error is not None and f"cannot listen on 127.0.0.1:{port}" in sup.last_error
    # The first broker goes away: the second one's API binds on a retry.
    first.stop()
    await wait_until(lambda: first.sources[0].state == "stopped")
    await wait_until(lambda: sup.state == "running")
    async with connect(second.url) as client:
        await client.sub("t")
        status, _, body = await post(port, {"topic": "t", "data": "after"})
        assert (status, body) == (200, {"topic": "t", "seq": 1})
        assert (await client.recv())["data"] == "after"


def make(settings: dict[str, Any], host: str = "127.0.0.1") -> object:
    config = config_from_dict({"plugins": {"enabled": ["http"]}})
    return create(settings, PluginContext("http", config))


@pytest.mark.parametrize(
    ("settings", "key", "reason"),
    [
        ({}, "keys", "required"),
        ({"keys": []}, "keys", "must not be empty"),
        ({"keys": [{"id": "a"}]}, "keys[0]", "give exactly one of key or sha256"),
        ({"keys": [{"id": "a", "key": "short"}]}, "keys[0].key", "at least 16"),
        ({"keys": [{"id": "a", "sha256": "abc"}]}, "keys[0].sha256", "64 hexadecimal"),
        ({"keys": [{"id": "a", "key": KEY}, {"id": "b", "key": KEY}]}, "keys[1]", "twice"),
        ({"keys": [{"key": KEY}]}, "keys[0].id", "required"),
        (
            {"keys": [{"id": "a", "key": KEY}], "host": "0.0.0.0"},
            "host",
            "plain HTTP on non-loopback",
        ),
        ({"keys": [{"id": "a", "key": KEY}], "path": "api"}, "path", "must start with '/'"),
        ({"keys": [{"id": "a", "key": KEY}], "port": 70000}, "port", "must be between 0 and 65535"),
        ({"keys": [{"id": "a", "key": KEY}], "subject": "x"}, "subject", "unknown key"),
        (
            {"keys": [{"id": "a", "key": KEY}], "tls_cert": "/nonexistent.pem"},
            "tls_cert",
            "file not found",
        ),
    ],
)
def test_bad_settings_name_the_key(settings: dict[str, Any], key: str, reason: str) -> None:
    with pytest.raises(ConfigError) as info:
        make(settings)
    assert info.value.key == key
    assert reason in info.value.reason


def test_non_loopback_allowed_with_allow_insecure() -> None:
    make({"keys": [{"id": "a", "key": KEY}], "host": "0.0.0.0", "allow_insecure": True})
