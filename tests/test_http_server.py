"""broker.io.http: HTTP/1.1 conformance over real sockets.

Requests are written byte for byte with ``trio.open_tcp_stream`` (framing
errors cannot be produced by a well-behaved client library); answers are
parsed by the small reader below. A differential check runs the stdlib's
``http.client`` against the same server.
"""

from __future__ import annotations

import http.client
import json
import ssl
from dataclasses import dataclass, field

import pytest
import trio
import trio.testing

from broker.io.http import HttpServer, Limits, Request, Response
from tests.helpers import wait_until

WAIT = 5.0


class Endpoint:
    """The endpoint under test: echoes the request as JSON, and records it.

    ``/fixed`` answers the same to every method, ``/slow`` never answers, ``/boom`` raises, ``/denied`` answers 401,
    ``/bye`` answers with ``close=True``.
    """

    def __init__(self) -> None:
        self.seen: list[Request] = []

    async def __call__(self, request: Request) -> Response:
        self.seen.append(request)
        if request.path == "/slow":
            await trio.sleep_forever()
        if request.path == "/boom":
            raise RuntimeError("boom")
        if request.path == "/fixed":
            return Response(200, b"the same body\n", "text/plain")
        if request.path == "/denied":
            return Response(401, b"who are you\n", "text/plain", (("WWW-Authenticate", "Bearer"),))
        echo = {
            "method": request.method,
            "target": request.target,
            "body": request.body.decode("latin-1"),
            "host": request.header("HOST"),
        }
        body = json.dumps(echo).encode()
        return Response(200, body, "application/json", close=request.path == "/bye")


@dataclass
class Served:
    server: HttpServer
    endpoint: Endpoint
    port: int
    tls: bool = False

    async def connect(self) -> trio.SocketStream:
        return await trio.open_tcp_stream("127.0.0.1", self.port)


async def serve(nursery: trio.Nursery, **limits: float) -> Served:
    endpoint = Endpoint()
    server = HttpServer(
        endpoint,
        Limits(**limits),  # type: ignore[arg-type]
        headers=(("Cache-Control", "no-store"),),
    )
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    nursery.start_soon(server.serve, listeners)
    return Served(server, endpoint, listeners[0].socket.getsockname()[1])


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes = b""
    raw_head: bytes = field(default=b"", repr=False)


def parse(data: bytes, *, head_only: tuple[int, ...] = ()) -> list[Answer]:
    """The responses in *data*, in order (the indexes in *head_only* answer a
    HEAD: no body follows, whatever Content-Length says)."""
    answers: list[Answer] = []
    while data:
        head, sep, data = data.partition(b"\r\n\r\n")
        assert sep, f"incomplete head: {head!r}"
        lines = head.decode("latin-1").split("\r\n")
        version, status, _ = lines[0].split(" ", 2)
        assert version == "HTTP/1.1"
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            assert name.lower() not in headers, f"{name} twice"
            headers[name.lower()] = value.strip()
        size = 0 if len(answers) in head_only else int(headers.get("content-length", "0"))
        assert len(data) >= size, "incomplete body"
        answers.append(Answer(int(status), headers, data[:size], head))
        data = data[size:]
    return answers


async def read_all(stream: trio.abc.Stream) -> bytes:
    """Everything the server sends until it closes (a reset fails the test:
    the answer must arrive before the close)."""
    data = b""
    with trio.fail_after(WAIT):
        while chunk := await stream.receive_some(65536):
            data += chunk
    return data


async def read_answers(
    stream: trio.abc.Stream, count: int, *, head_only: tuple[int, ...] = ()
) -> list[Answer]:
    """Exactly *count* responses, without waiting for the connection to close."""
    data = b""
    with trio.fail_after(WAIT):
        while True:
            try:
                answers = parse(data, head_only=head_only)
            except (AssertionError, ValueError):
                answers = []
            if len(answers) == count:
                return answers
            chunk = await stream.receive_some(65536)
            assert chunk, f"closed after {data!r}"
            data += chunk


async def exchange(served: Served, raw: bytes) -> tuple[list[Answer], float]:
    """Send *raw* on a new connection; the answers until the server closes it,
    and how long that took."""
    started = trio.current_time()  # before the server can accept and start its clock
    stream = await served.connect()
    async with stream:
        await stream.send_all(raw)
        data = await read_all(stream)
    return parse(data), trio.current_time() - started


def get(target: str = "/", *extra: str) -> bytes:
    return "\r\n".join([f"GET {target} HTTP/1.1", "Host: x", *extra, "", ""]).encode()


def post(target: str, body: bytes, *extra: str) -> bytes:
    head = [f"POST {target} HTTP/1.1", "Host: x", f"Content-Length: {len(body)}", *extra, "", ""]
    return "\r\n".join(head).encode() + body


def echoed(answer: Answer) -> dict[str, str]:
    assert answer.status == 200, answer
    result: dict[str, str] = json.loads(answer.body)
    return result


# -- keep-alive and pipelining -----------------------------------------------------


async def test_keep_alive_serves_requests_one_after_another(nursery: trio.Nursery) -> None:
    served = await serve(nursery)
    stream = await served.connect()
    async with stream:
        for n in range(3):
            await stream.send_all(post(f"/n/{n}", str(n).encode() * 3))
            (answer,) = await read_answers(stream, 1)
            assert echoed(answer) == {
                "method": "POST",
                "target": f"/n/{n}",
                "body": str(n) * 3,
                "host": "x",
            }
            assert "connection" not in answer.headers
            assert answer.headers["cache-control"] == "no-store"
            assert answer.headers["content-type"] == "application/json"
            assert answer.raw_head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert served.server.requests == 3
    await wait_until(lambda: served.server.connections == 0)


async def test_pipelined_requests_are_answered_in_order(nursery: trio.Nursery) -> None:
    served = await serve(nursery)
    chunked = (
        b"POST /chunked HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3\r\nabc\r\n2;ext=1\r\nde\r\n0\r\nTrailer: t\r\n\r\n"
    )
    stream = await served.connect()
    async with stream:
        await stream.send_all(get("/a") + post("/b", b"body") + chunked + get("/c"))
        answers = await read_answers(stream, 4)
    assert [echoed(a)["target"] for a in answers] == ["/a", "/b", "/chunked", "/c"]
    assert [echoed(a)["body"] for a in answers] == ["", "body", "abcde", ""]


async def test_a_request_split_across_many_writes(nursery: trio.Nursery) -> None:
    served = await serve(nursery)
    raw = post("/split", b"0123456789")
    stream = await served.connect()
    async with stream:
        for i in range(len(raw)):
            await stream.send_all(raw[i : i + 1])
        (answer,) = await read_answers(stream, 1)
    assert echoed(answer)["body"] == "0123456789"


# -- framing (RFC 9112) ----------------------------------------------------------------

SMUGGLED = get("/smuggled")


@pytest.mark.parametrize(
    "head",
    [
        "Content-Length: 5\r\nTransfer-Encoding: chunked",
        "Transfer-Encoding: chunked\r\nContent-Length: 5",
        "Content-Length: 0\r\nTransfer-Encoding: chunked",
        "Content-length: 5\r\ntransfer-encoding: CHUNKED",
    ],
)
async def test_content_length_with_transfer_encoding_is_400_and_close(
    nursery: trio.Nursery, head: str
) -> None:
    served = await serve(nursery)
    raw = f"POST / HTTP/1.1\r\nHost: x\r\n{head}\r\n\r\n".encode() + b"0\r\n\r\n" + SMUGGLED
    (answer,), _ = await exchange(served, raw)
    assert (answer.status, answer.headers["connection"]) == (400, "close")
    assert b"Transfer-Encoding" in answer.body
    assert served.endpoint.seen == []  # neither the request nor what it smuggles


@pytest.mark.parametrize(
    ("fields", "status"),
    [
        (["Content-Length: 5", "Content-Length: 5"], 400),  # equal, but twice
        (["Content-Length: 5, 5"], 400),
        (["Content-Length: 5", "Content-Length: 6"], 400),
        (["Content-Length: abc"], 400),
        (["Content-Length: -5"], 400),
        (["Content-Length: +5"], 400),
        (["Content-Length: 0x5"], 400),
        (["Content-Length: 5 5"], 400),
        (["Content-Length : 5"], 400),  # white space before the colon
        (["Transfer-Encoding: gzip, chunked"], 501),
        (["Transfer-Encoding: chunked", "Transfer-Encoding: chunked"], 501),
    ],
)
async def test_bad_framing_is_refused_and_closed(
    nursery: trio.Nursery, fields: list[str], status: int
) -> None:
    served = await serve(nursery)
    raw = "\r\n".join(["POST / HTTP/1.1", "Host: x", *fields, "", ""]).encode() + b"hello"
    answers, _ = await exchange(served, raw + SMUGGLED)
    assert [(a.status, a.headers["connection"]) for a in answers] == [(status, "close")]
    assert served.endpoint.seen == []


async def test_transfer_encoding_in_http_1_0_is_400(nursery: trio.Nursery) -> None:
    served = await serve(nursery)
    raw = b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    (answer,), _ = await exchange(served, raw)
    assert answer.status == 400
    assert served.endpoint.seen == []


async def test_bad_chunk_is_400(nursery: trio.Nursery) -> None:
    served = await serve(nursery)
    raw = b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n"
    (answer,), _ = await exchange(served, raw)
    assert (answer.status, answer.headers["connection"]) == (400, "close")


async def test_garbage_is_400(nursery: trio.Nursery) -> None:
    served = await serve(nursery)
    (answer,), _ = await exchange(served, b"NOT HTTP AT ALL\r\n\r\n")
    assert (answer.status, answer.headers["connection"]) == (400, "close")
    assert answer.headers["content-type"].startswith("text/plain")
    assert answer.headers["cache-control"] == "no-store"


# -- limits ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "size",
    [
        1500,  # the whole head arrives in one read: measured by the server
        40_000,  # more than a read: h11 gives up on the incomplete head
    ],
)
async def test_oversize_head_is_431(nursery: trio.Nursery, size: int) -> None:
    served = await serve(nursery, max_head_size=1024)
    (answer,), _ = await exchange(served, get("/", "X-Big: " + "a" * size))
    assert (answer.status, answer.headers["connection"]) == (431, "close")
    # A head just within the limit is served.
    (answer,), _ = await exchange(served, get("/", "Connection: close", "X-Big: " + "a" * 900))
    assert answer.status == 200


def sized_get(size: int) -> bytes:
    """A GET whose head (the final empty line included) is exactly *size* bytes."""
    base = get("/sized", "Connection: close")
    pad = size - len(base) - len("X-Pad: \r\n")
    raw = base[:-2] + b"X-Pad: " + b"a" * pad + b"\r\n\r\n"
    assert len(raw) == size
    return raw


@pytest.mark.parametrize("chunk", [None, 1000])
async def test_head_limit_is_exact_whatever_the_writes(
    nursery: trio.Nursery, chunk: int | None
) -> None:
    """16,384 bytes of head are served, one more is 431: in one write (read
    in pieces by the server) and in 1,000-byte writes."""
    served = await serve(nursery)  # the default max_head_size, 16 KiB

    async def status(raw: bytes) -> int:
        stream = await served.connect()
        async with stream:
            step = chunk or len(raw)
            for i in range(0, len(raw), step):
                await stream.send_all(raw[i : i + step])
            (answer,) = parse(await read_all(stream))
        return answer.status

    assert await status(sized_get(16_384)) == 200
    for size in (16_385, 16_451, 20_480):
        assert await status(sized_get(size)) == 431
    assert [r.target for r in served.endpoint.seen] == ["/sized"]


async def test_declared_oversize_body_is_413_before_it_is_sent(nursery: trio.Nursery) -> None:
    served = await serve(nursery, max_body_size=100)
    stream = await served.connect()
    async with stream:
        # Only the head is sent: the answer must not wait for the body, and no
        # 100 Continue is sent for a body that will be refused.
        await stream.send_all(
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 101\r\nExpect: 100-continue\r\n\r\n"
        )
        (answer,) = parse(await read_all(stream))
    assert (answer.status, answer.headers["connection"]) == (413, "close")
    assert answer.body == b"body larger than 100 bytes\n"


async def test_chunked_oversize_body_is_413_once_it_passes_the_limit(
    nursery: trio.Nursery,
) -> None:
    served = await serve(nursery, max_body_size=100)
    stream = await served.connect()
    async with stream:
        await stream.send_all(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        await stream.send_all(b"50\r\n" + b"x" * 80 + b"\r\n")
        await stream.send_all(b"50\r\n" + b"x" * 80 + b"\r\n")  # 160 > 100; no end chunk
        (answer,) = parse(await read_all(stream))
    assert answer.status == 413
    # Exactly at the limit is fine.
    (answer,), _ = await exchange(served, post("/", b"y" * 100, "Connection: close"))
    assert echoed(answer)["body"] == "y" * 100


async def test_request_timeout_is_408_and_close(nursery: trio.Nursery) -> None:
    served = await serve(nursery, request_timeout=0.3, idle_timeout=5)
    # A head that never ends, and a body that never ends.
    for raw in (b"GET / HTTP/1.1\r\nHost: x\r\n", post("/", b"0123456789")[:-5]):
        (answer,), took = await exchange(served, raw)
        assert (answer.status, answer.headers["connection"]) == (408, "close")
        assert 0.3 <= took < 0.3 + WAIT / 2
    assert served.endpoint.seen == []


async def test_an_endpoint_that_does_not_answer_in_time_loses_the_connection(
    nursery: trio.Nursery,
) -> None:
    served = await serve(nursery, request_timeout=0.3)
    answers, took = await exchange(served, get("/slow"))
    assert answers == []
    assert took >= 0.3
    await wait_until(lambda: served.server.connections == 0)


async def test_idle_connections_are_closed_without_an_answer(nursery: trio.Nursery) -> None:
    served = await serve(nursery, idle_timeout=0.3, request_timeout=5)
    # Never a request:
    answers, took = await exchange(served, b"")
    assert answers == []
    assert 0.3 <= took < WAIT / 2
    # Idle after one:
    answers, took = await exchange(served, get("/once"))
    assert [echoed(a)["target"] for a in answers] == ["/once"]
    assert 0.3 <= took < WAIT / 2


async def open_from(ip: str, port: int) -> trio.SocketStream:
    """A connection to 127.0.0.1:*port* from the loopback address *ip*
    (127.0.0.0/8 is all loopback on Linux: distinct client addresses)."""
    sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_STREAM)
    await sock.bind((ip, 0))
    await sock.connect(("127.0.0.1", port))
    return trio.SocketStream(sock)


async def kept_alive(served: Served, ip: str = "127.0.0.1") -> trio.SocketStream:
    """A connection that made one request and is now idle, kept alive."""
    stream = await open_from(ip, served.port)
    await stream.send_all(get("/held"))
    await read_answers(stream, 1)
    return stream


async def in_body(served: Served, ip: str = "127.0.0.1") -> trio.SocketStream:
    """A connection whose request body is half sent: busy, not evictable."""
    stream = await open_from(ip, served.port)
    requests = served.server.requests
    await stream.send_all(post("/body", b"0123456789")[:-5])
    await wait_until(lambda: served.server.requests > requests)
    return stream


async def answered(served: Served, ip: str = "127.0.0.1", target: str = "/new") -> Answer:
    """One request on a new connection from *ip*, closed after the answer."""
    stream = await open_from(ip, served.port)
    async with stream:
        await stream.send_all(get(target, "Connection: close"))
        (answer,) = parse(await read_all(stream))
    return answer


async def test_a_newcomer_takes_the_slot_of_the_longest_idle_connection(
    nursery: trio.Nursery,
) -> None:
    served = await serve(nursery, max_connections=3)
    oldest, middle = await kept_alive(served), await kept_alive(served)
    never = await served.connect()  # connected, never sent a byte: idle too
    await trio.testing.wait_all_tasks_blocked()
    # Full: the newcomer is served, and the connection that has waited
    # longest for a request is closed without an answer.
    assert echoed(await answered(served))["target"] == "/new"
    assert await read_all(oldest) == b""
    assert served.server.evicted == 1
    # The others are untouched: the kept-alive one still serves requests.
    await middle.send_all(get("/again"))
    (answer,) = await read_answers(middle, 1)
    assert echoed(answer)["target"] == "/again"
    # Full again: next in line is the one that never sent anything (idle
    # since before middle's last request).
    filler = await kept_alive(served)
    assert echoed(await answered(served))["target"] == "/new"
    assert await read_all(never) == b""
    assert served.server.evicted == 2
    for stream in (oldest, middle, never, filler):
        await stream.aclose()
    await wait_until(lambda: served.server.connections == 0)


async def test_503_only_when_every_connection_is_busy(nursery: trio.Nursery) -> None:
    served = await serve(nursery, max_connections=2)
    first, second = await in_body(served), await in_body(served)
    answer = await answered(served)
    assert (answer.status, answer.headers["connection"]) == (503, "close")
    assert answer.body == b"too many connections\n"
    assert served.server.evicted == 0
    # A body completes: that connection is idle again, so it gives way.
    await first.send_all(b"56789")
    (done,) = await read_answers(first, 1)
    assert echoed(done)["body"] == "0123456789"
    assert echoed(await answered(served))["target"] == "/new"
    assert await read_all(first) == b""
    for stream in (first, second):
        await stream.aclose()


async def test_a_slow_head_gives_way_when_none_is_idle(nursery: trio.Nursery) -> None:
    served = await serve(nursery, max_connections=2, header_timeout=5)
    busy = await in_body(served)
    slow = await served.connect()
    await slow.send_all(b"GET /slow-head HTTP/1.1\r\nHost: x\r\n")  # never ends
    await trio.testing.wait_all_tasks_blocked()
    assert echoed(await answered(served))["target"] == "/new"
    (refused,) = parse(await read_all(slow))
    assert (refused.status, refused.headers["connection"]) == (503, "close")
    for stream in (busy, slow):
        await stream.aclose()


async def test_a_slow_head_is_cut_by_the_header_timeout(nursery: trio.Nursery) -> None:
    served = await serve(nursery, header_timeout=0.3, request_timeout=5)
    stream = await served.connect()
    async with stream:
        started = trio.current_time()
        await stream.send_all(b"GET / HTTP/1.1\r\n")
        await stream.send_all(b"Host: x\r\n")  # ... and never the end
        (answer,) = parse(await read_all(stream))
    assert (answer.status, answer.headers["connection"]) == (408, "close")
    assert answer.body == b"request head timed out\n"
    assert 0.3 <= trio.current_time() - started < WAIT / 2
    assert served.endpoint.seen == []


async def test_max_connections_per_ip(nursery: trio.Nursery) -> None:
    """One address holds at most its share: its newcomers take the slots of
    its own idle connections, never another address's, and are refused
    (429) when all of its connections are busy; other addresses are served."""
    served = await serve(nursery, max_connections=10, max_connections_per_ip=2)
    other = await kept_alive(served, "127.0.0.3")
    a1, a2 = await kept_alive(served, "127.0.0.2"), await kept_alive(served, "127.0.0.2")
    assert echoed(await answered(served, "127.0.0.2"))["target"] == "/new"
    assert await read_all(a1) == b""  # its own oldest gave way
    busy = [await in_body(served, "127.0.0.2")]
    busy.append(await in_body(served, "127.0.0.2"))  # takes a2's slot
    assert await read_all(a2) == b""
    answer = await answered(served, "127.0.0.2")
    assert (answer.status, answer.headers["connection"]) == (429, "close")
    assert answer.body == b"too many connections from this address\n"
    # Other addresses are not affected, and the idle one was not taken.
    assert echoed(await answered(served, "127.0.0.1"))["target"] == "/new"
    await other.send_all(get("/still"))
    (answer,) = await read_answers(other, 1)
    assert echoed(answer)["target"] == "/still"
    assert served.server.evicted == 2
    for stream in (other, a1, a2, *busy):
        await stream.aclose()
    await wait_until(lambda: served.server.connections == 0)


async def test_limits_may_change_between_connections(nursery: trio.Nursery) -> None:
    """Limits given as a function are read for each new connection."""
    limits = [Limits(max_connections=1)]
    endpoint = Endpoint()
    server = HttpServer(endpoint, lambda: limits[0])
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    nursery.start_soon(server.serve, listeners)
    served = Served(server, endpoint, listeners[0].socket.getsockname()[1])
    busy = await in_body(served)
    assert (await answered(served)).status == 503
    limits[0] = Limits(max_connections=2)
    assert echoed(await answered(served))["target"] == "/new"
    await busy.aclose()


async def test_a_client_that_vanishes_mid_body(nursery: trio.Nursery) -> None:
    served = await serve(nursery)
    stream = await served.connect()
    await stream.send_all(post("/", b"x" * 100)[:-60])
    await wait_until(lambda: served.server.requests == 1)
    await stream.aclose()
    await wait_until(lambda: served.server.connections == 0)
    assert served.endpoint.seen == []
    (answer,), _ = await exchange(served, get("/after", "Connection: close"))
    assert echoed(answer)["target"] == "/after"


# -- methods and connection management ---------------------------------------------


async def test_head_has_the_length_of_get_without_the_body(nursery: trio.Nursery) -> None:
    served = await serve(nursery)
    stream = await served.connect()
    async with stream:
        # HEAD then GET on one connection: nothing of HEAD's body may be sent,
        # or it would be read as the start of the second answer.
        head = get("/fixed").replace(b"GET", b"HEAD", 1)
        await stream.send_all(head + get("/fixed"))
        head_answer, get_answer = await read_answers(stream, 2, head_only=(0,))
    assert served.endpoint.seen[0].method == "HEAD"
    assert head_answer.status == 200
    assert head_answer.body == b""
    assert head_answer.headers["content-length"] == "14"
    assert (get_answer.status, get_answer.body) == (200, b"the same body\n")


async def test_connection_close_is_honoured(nursery: trio.Nursery) -> None:
    served = await serve(nursery)
    answers, _ = await exchange(served, get("/last", "Connection: close") + get("/never"))
    assert [(echoed(a)["target"], a.headers["connection"]) for a in answers] == [("/last", "close")]
    assert [r.target for r in served.endpoint.seen] == ["/last"]


async def test_http_1_0_is_answered_then_closed(nursery: trio.Nursery) -> None:
    served = await serve(nursery)
    (answer,), _ = await exchange(served, b"GET /old HTTP/1.0\r\n\r\n")
    assert echoed(answer)["target"] == "/old"
    assert answer.headers["connection"] == "close"


@pytest.mark.parametrize(
    ("target", "status"),
    [("/denied", 401), ("/boom", 500), ("/bye", 200)],
)
async def test_answers_that_close_the_connection(
    nursery: trio.Nursery, target: str, status: int
) -> None:
    """A 401 (an unauthenticated client holds no slot), a failing endpoint
    (500) and an endpoint's ``close=True``; what was pipelined behind them is
    not answered."""
    served = await serve(nursery)
    answers, _ = await exchange(served, get(target) + get("/next"))
    assert [(a.status, a.headers["connection"]) for a in answers] == [(status, "close")]
    assert [r.target for r in served.endpoint.seen] == [target]


async def test_expect_100_continue(nursery: trio.Nursery) -> None:
    served = await serve(nursery)
    stream = await served.connect()
    async with stream:
        await stream.send_all(
            b"POST /e HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n"
        )
        data = b""
        with trio.fail_after(WAIT):
            while b"\r\n\r\n" not in data:
                data += await stream.receive_some(4096)
        assert data == b"HTTP/1.1 100 \r\n\r\n"
        await stream.send_all(b"hello")
        (answer,) = await read_answers(stream, 1)
    assert echoed(answer)["body"] == "hello"


async def test_the_error_page_is_the_servers_choice(nursery: trio.Nursery) -> None:
    def page(status: int, reason: str) -> Response:
        return Response(status, json.dumps({"status": status, "reason": reason}).encode())

    endpoint = Endpoint()
    server = HttpServer(endpoint, error_page=page)
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    nursery.start_soon(server.serve, listeners)
    served = Served(server, endpoint, listeners[0].socket.getsockname()[1])
    (answer,), _ = await exchange(served, b"NOT HTTP\r\n\r\n")
    assert answer.status == 400
    assert json.loads(answer.body)["status"] == 400


def test_responses_are_final_statuses() -> None:
    with pytest.raises(ValueError, match="not a final status"):
        Response(101)


async def test_cancelling_the_server_closes_its_connections() -> None:
    server = HttpServer(Endpoint())
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.serve, listeners)
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(get("/kept"))
        await read_answers(stream, 1)
        nursery.cancel_scope.cancel()
    assert server.connections == 0
    assert await read_all(stream) == b""
    await stream.aclose()
    with pytest.raises(OSError, match="connect"):  # the listener is closed
        await trio.open_tcp_stream("127.0.0.1", port)


# -- TLS, and a differential check with the stdlib's client ---------------------------


async def test_over_tls(nursery: trio.Nursery, tls_files: dict[str, str]) -> None:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tls_files["tls_cert"], tls_files["tls_key"])
    endpoint = Endpoint()
    server = HttpServer(endpoint, Limits(idle_timeout=0.5))
    tcp = await trio.open_tcp_listeners(0, host="127.0.0.1")
    nursery.start_soon(server.serve, [trio.SSLListener(tcp[0], context, https_compatible=True)])
    port = tcp[0].socket.getsockname()[1]
    client = ssl.create_default_context(cafile=tls_files["ca"])
    stream = trio.SSLStream(
        await trio.open_tcp_stream("127.0.0.1", port), client, server_hostname="127.0.0.1"
    )
    async with stream:
        await stream.send_all(post("/tls", b"secret") + get("/again"))
        answers = await read_answers(stream, 2)
    assert [echoed(a)["body"] for a in answers] == ["secret", ""]
    # A client that never finishes its TLS handshake is dropped when idle.
    answers, took = await exchange(Served(server, endpoint, port), b"")
    assert answers == []
    assert took >= 0.5


def stdlib_client(port: int) -> list[tuple[int, str | None, bytes]]:
    """Requests on one kept-alive ``http.client`` connection."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=WAIT)
    out: list[tuple[int, str | None, bytes]] = []
    sockets = set()
    try:
        for method, target, body in [
            ("GET", "/one", None),
            ("POST", "/two", b"payload"),
            ("HEAD", "/three", None),
            ("PUT", "/four", b"x" * 5000),
        ]:
            conn.request(method, target, body=body)
            response = conn.getresponse()
            out.append((response.status, response.getheader("Content-Length"), response.read()))
            sockets.add(id(conn.sock))
        # A chunked body from a generator.
        conn.request("POST", "/five", body=iter([b"ab", b"cd"]), encode_chunked=True)
        response = conn.getresponse()
        out.append((response.status, response.getheader("Content-Length"), response.read()))
        sockets.add(id(conn.sock))
        assert len(sockets) == 1  # one connection, kept alive throughout
    finally:
        conn.close()
    return out


async def test_stdlib_http_client_agrees(nursery: trio.Nursery) -> None:
    served = await serve(nursery)
    results = await trio.to_thread.run_sync(stdlib_client, served.port)
    bodies = [json.loads(body) if body else None for _, _, body in results]
    assert [status for status, _, _ in results] == [200] * 5
    assert [b and (b["method"], b["target"], len(b["body"])) for b in bodies] == [
        ("GET", "/one", 0),
        ("POST", "/two", 7),
        None,  # HEAD: no body ...
        ("PUT", "/four", 5000),
        ("POST", "/five", 4),
    ]
    assert results[2][1] is not None and int(results[2][1]) > 0  # ... but its length
    assert served.server.requests == 5
    assert len({id(r) for r in served.endpoint.seen}) == 5
    await wait_until(lambda: served.server.connections == 0)
