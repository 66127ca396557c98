"""broker.tls.TLSStream: the server-side TLS stream behind wss://, alone and
through the broker.

The stream is tested against trio's own client-side SSLStream (strict: it
raises on an EOF without close_notify) over real loopback sockets, with
trustme certificates. Where a test needs the server's socket to back up, the
client's receive buffer is shrunk before it connects and the server's send
buffer after; where it needs a task to be stuck, it waits for
``trio.testing.wait_all_tasks_blocked()``, never for time.
"""

from __future__ import annotations

import contextlib
import logging
import random
import select
import socket
import ssl
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing
import trustme

from broker import Broker, CloseCode
from broker.io.tls import WRITE_CHUNK, TLSStream, joined, make_ssl_context
from broker.server.connection import Connection
from tests.conftest import CLOSE_TIMEOUT, BrokerFactory
from tests.helpers import (
    JSON,
    MSGPACK,
    WAIT,
    Client,
    RawClient,
    connect,
    mask_frame,
    raw_connect,
    wait_until,
)

ClientStream = trio.SSLStream[trio.SocketStream]

MIB = 1 << 20


def server_context(tls_files: dict[str, str], client_auth: str = "none") -> ssl.SSLContext:
    """The broker's own server context (make_ssl_context), optionally mTLS."""
    return make_ssl_context(
        tls_files["tls_cert"], tls_files["tls_key"], tls_files["ca"], client_auth
    )


def client_context(
    ca: trustme.CA, *, version: ssl.TLSVersion | None = None, cert: str | None = None
) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    if version is not None:
        ctx.minimum_version = ctx.maximum_version = version
    if cert is not None:
        ca.issue_cert(cert).configure_cert(ctx)
    return ctx


async def tcp_pair(
    *, client_rcvbuf: int | None = None, server_sndbuf: int | None = None
) -> tuple[trio.SocketStream, trio.SocketStream]:
    """(client, server) TCP streams connected over loopback."""
    (listener,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
    async with listener:
        sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_STREAM)
        if client_rcvbuf is not None:
            # Before connect(), so the window advertised in the SYN is small.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, client_rcvbuf)
        await sock.connect(listener.socket.getsockname())
        server = await listener.accept()
    if server_sndbuf is not None:
        server.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, server_sndbuf)
    return trio.SocketStream(sock), server


@asynccontextmanager
async def tls_pair(
    server_ctx: ssl.SSLContext,
    client_ctx: ssl.SSLContext,
    *,
    client_rcvbuf: int | None = None,
    server_sndbuf: int | None = None,
) -> AsyncIterator[tuple[TLSStream, ClientStream]]:
    """A TLSStream and a trio client SSLStream, handshake done."""
    client_tcp, server_tcp = await tcp_pair(
        client_rcvbuf=client_rcvbuf, server_sndbuf=server_sndbuf
    )
    server = TLSStream(server_tcp, server_ctx)
    client = trio.SSLStream(client_tcp, client_ctx, server_hostname="127.0.0.1")
    try:
        with trio.fail_after(WAIT):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(server.do_handshake)
                await client.do_handshake()
        yield server, client
    finally:
        await trio.aclose_forcefully(client)
        await server.aclose()


async def receive_exactly(
    stream: trio.abc.ReceiveStream, size: int, max_bytes: int = 65536
) -> bytes:
    chunks = bytearray()
    with trio.fail_after(WAIT * 2):
        while len(chunks) < size:
            data = await stream.receive_some(max_bytes)
            assert len(data) <= max_bytes
            assert data, f"EOF after {len(chunks)} of {size} bytes"
            chunks += data
    assert len(chunks) == size
    return bytes(chunks)


def noise(size: int, seed: int = 0) -> bytes:
    """Incompressible bytes, different per seed: a lost, doubled or swapped
    chunk cannot go unnoticed."""
    return random.Random(seed).randbytes(size)


def client_hello(ca: trustme.CA) -> bytes:
    """The first flight of a real TLS client."""
    outgoing = ssl.MemoryBIO()
    tls = client_context(ca).wrap_bio(ssl.MemoryBIO(), outgoing, server_hostname="127.0.0.1")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def reset(stream: trio.SocketStream) -> None:
    """Close with an RST instead of a FIN."""
    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    stream.socket.close()


# -- the stream ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "version", [ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2], ids=["tls1.3", "tls1.2"]
)
async def test_handshake_and_data_both_ways(
    tls_files: dict[str, str], ca: trustme.CA, version: ssl.TLSVersion
) -> None:
    async with tls_pair(server_context(tls_files), client_context(ca, version=version)) as (
        server,
        client,
    ):
        assert client.version() == {"TLSv1_3": "TLSv1.3", "TLSv1_2": "TLSv1.2"}[version.name]
        assert server.getpeercert() is None  # no client certificate asked for
        await server.send_all(b"hello from the server")
        assert await receive_exactly(client, 21) == b"hello from the server"
        await client.send_all(b"hello from the client")
        assert await receive_exactly(server, 21) == b"hello from the client"
        # The direct write: all of it taken at once, nothing kept.
        assert server.send_nowait(b"direct") is True
        assert server.unsent == 0
        assert await receive_exactly(client, 6) == b"direct"
        # Bigger than a TLS record, both ways.
        big = noise(200_000)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.send_all, big)
            assert await receive_exactly(client, len(big)) == big
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.send_all, big)
            assert await receive_exactly(server, len(big)) == big
        # In pieces smaller than a record (the rest waits in the stream).
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.send_all, big)
            assert await receive_exactly(server, len(big), max_bytes=7000) == big


async def test_receive_nowait(tls_files: dict[str, str], client_ssl: ssl.SSLContext) -> None:
    async with tls_pair(server_context(tls_files), client_ssl) as (server, client):
        assert server.receive_nowait() is None  # nothing sent yet
        await client.send_all(b"ping")
        await trio.lowlevel.wait_readable(server.transport_stream.socket)
        assert server.receive_nowait() == b"ping"
        assert server.receive_nowait() is None
        # Several records, gathered by receive_some.
        for part in (b"a" * 100, b"b" * 100, b"c" * 100):
            await client.send_all(part)
        data = await receive_exactly(server, 300)
        assert data == b"a" * 100 + b"b" * 100 + b"c" * 100
        await client.transport_stream.aclose()  # gone without close_notify
        await trio.lowlevel.wait_readable(server.transport_stream.socket)
        assert server.receive_nowait() == b""


@pytest.mark.skipif(not hasattr(select, "epoll"), reason="edge-triggered epoll is Linux's")
@pytest.mark.parametrize("max_bytes", [65536, 7000, 100])
async def test_receive_nowait_returns_none_only_on_an_empty_socket(
    tls_files: dict[str, str], client_ssl: ssl.SSLContext, max_bytes: int
) -> None:
    """What the broker's read poller relies on (broker.io.poller): a reader
    that parks on an edge-triggered epoll after ``receive_nowait`` returned
    None is woken by the next data. So None must mean the socket's last read
    found it empty, with nothing left in the stream (ciphertext kept back,
    plaintext inside the SSLObject) even when *max_bytes* cuts records."""
    async with tls_pair(server_context(tls_files), client_ssl) as (server, client):
        epoll = select.epoll()
        try:
            epoll.register(server.fileno(), select.EPOLLIN | select.EPOLLET)
            assert server.fileno() == server.transport_stream.socket.fileno()
            big = noise(300_000, seed=7)
            received = bytearray()
            with trio.fail_after(WAIT * 2):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(client.send_all, big)
                    while len(received) < len(big):
                        data = server.receive_nowait(max_bytes)
                        if data is None:
                            # Parked: only a new edge wakes it.
                            while not epoll.poll(0):
                                await trio.lowlevel.wait_readable(epoll.fileno())
                            continue
                        assert data and len(data) <= max_bytes
                        received += data
            assert received == big
            assert server.receive_nowait(max_bytes) is None
        finally:
            epoll.close()


@pytest.mark.parametrize("chunk", [65536, 1000])
async def test_a_client_that_stops_reading(
    tls_files: dict[str, str], ca: trustme.CA, chunk: int
) -> None:
    """Direct writes until the socket backs up, then an awaiting one. A
    chunk of 1000 bytes is a subscriber's usual batch (one TLS record, the
    one-piece path of send_nowait); 65536 takes several records."""
    data = noise(8 * MIB if chunk > 16384 else MIB)
    async with tls_pair(
        server_context(tls_files), client_context(ca), client_rcvbuf=4096, server_sndbuf=16384
    ) as (server, client):
        # Direct writes until the kernel buffers are full.
        offset = 0
        while server.send_nowait(data[offset : offset + chunk]):
            offset += chunk
            assert offset < len(data), "the socket never backed up"
            assert server.unsent == 0
        offset += chunk
        # What is kept is the ciphertext of that last chunk at most (plus
        # the TLS record overhead): never more than what was sent.
        assert 0 < server.unsent <= chunk + 1024
        # The rest through an awaiting send, which writes what is kept first.
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.send_all, data[offset:])
            await trio.testing.wait_all_tasks_blocked()
            assert server.unsent > 0  # stuck: the client reads nothing
            with pytest.raises(trio.BusyResourceError):
                server.send_nowait(b"x")
            with pytest.raises(trio.BusyResourceError):
                await server.send_all(b"x")
            # Now the client reads: every byte, in order.
            assert await receive_exactly(client, len(data)) == data
        assert server.unsent == 0
        assert server.send_nowait(b"after") is True
        assert await receive_exactly(client, 5) == b"after"


def test_joined_is_the_join_and_reuses_the_last_one() -> None:
    """joined() hands every TLS subscriber of a fan-out the same bytes for
    the same frames, and the right bytes for any other batch."""
    a, b, c = b"frame-a", b"frame-b", b"frame-c"
    assert joined([a]) is a
    first = joined([a, b])
    assert first == a + b
    assert joined([a, b]) is first  # the same frames: joined once
    assert joined([bytes(a), bytes(b)]) is first  # equal frames, other objects
    assert joined([b, a]) == b + a
    assert joined([a, b, c]) == a + b + c
    # The caller may reuse its list: what was kept is a copy of it.
    parts = [a, c]
    assert joined(parts) == a + c
    parts[1] = b
    assert joined(parts) == a + b
    parts.append(c)
    assert joined(parts) == a + b + c


async def test_a_cancelled_send_all_leaves_the_stream_usable(
    tls_files: dict[str, str], ca: trustme.CA
) -> None:
    data = noise(4 * MIB)
    async with tls_pair(
        server_context(tls_files), client_context(ca), client_rcvbuf=4096, server_sndbuf=16384
    ) as (server, client):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.send_all, data)
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
        assert server.unsent > 0
        # Cancelled, but all of it was encrypted: it goes out before the tail.
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.send_all, b"tail")
            assert await receive_exactly(client, len(data) + 4) == data + b"tail"


async def test_receiving_and_sending_in_two_tasks(
    tls_files: dict[str, str], client_ssl: ssl.SSLContext
) -> None:
    """A reader task and a writer task share the stream (the broker's case):
    both directions at once, the server mixing direct and awaiting writes."""
    up, down = noise(3 * MIB, seed=1), noise(3 * MIB, seed=2)
    got_up = bytearray()

    async def server_reads(server: TLSStream) -> None:
        while len(got_up) < len(up):
            data = await server.receive_some()
            assert data
            got_up.extend(data)

    async def server_writes(server: TLSStream) -> None:
        for i in range(0, len(down), 50_000):
            if not server.send_nowait(down[i : i + 50_000]):
                await server.send_all(b"")  # what was kept
            if i % 500_000 == 0:
                await trio.lowlevel.checkpoint()

    async def client_writes(client: ClientStream) -> None:
        for i in range(0, len(up), 70_000):
            await client.send_all(up[i : i + 70_000])

    async with tls_pair(server_context(tls_files), client_ssl) as (server, client):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server_reads, server)
            nursery.start_soon(server_writes, server)
            nursery.start_soon(client_writes, client)
            assert await receive_exactly(client, len(down)) == down
        assert bytes(got_up) == up
        assert server.unsent == 0


async def test_one_receiver_and_one_sender_at_a_time(
    tls_files: dict[str, str], client_ssl: ssl.SSLContext
) -> None:
    async with (
        tls_pair(server_context(tls_files), client_ssl) as (server, client),
        trio.open_nursery() as nursery,
    ):
        nursery.start_soon(server.receive_some)
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(trio.BusyResourceError):
            await server.receive_some()
        with pytest.raises(trio.BusyResourceError):
            server.receive_nowait()
        await client.send_all(b"x")


async def test_client_certificate(tls_files: dict[str, str], ca: trustme.CA) -> None:
    ctx = server_context(tls_files, "required")
    async with tls_pair(ctx, client_context(ca, cert="ingest-1.example.org")) as (server, _):
        cert = server.getpeercert()
        assert cert is not None
        assert ("DNS", "ingest-1.example.org") in cert["subjectAltName"]


async def test_a_missing_client_certificate_fails_the_handshake(
    tls_files: dict[str, str], client_ssl: ssl.SSLContext
) -> None:
    client_tcp, server_tcp = await tcp_pair()
    server = TLSStream(server_tcp, server_context(tls_files, "required"))
    client = trio.SSLStream(client_tcp, client_ssl, server_hostname="127.0.0.1")
    client_error: list[BaseException | None] = []

    async def client_side() -> None:
        # TLS 1.3: the client is done before the server checks its
        # certificate, and learns of the refusal when it reads.
        try:
            await client.do_handshake()
            await client.receive_some()
        except trio.BrokenResourceError as e:
            client_error.append(e.__cause__)

    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client_side)
            with pytest.raises(trio.BrokenResourceError) as info:
                await server.do_handshake()
            assert isinstance(info.value.__cause__, ssl.SSLError)
            with pytest.raises(trio.BrokenResourceError):
                await server.send_all(b"x")
            await server.aclose()
    # The alert was sent: the client knows why.
    (cause,) = client_error
    assert isinstance(cause, ssl.SSLError)
    assert "CERTIFICATE_REQUIRED" in str(cause)
    await trio.aclose_forcefully(client)


async def test_streams_share_the_outgoing_bio_and_never_mix_their_bytes(
    tls_files: dict[str, str], ca: trustme.CA, client_ssl: ssl.SSLContext
) -> None:
    """The streams of a thread share one pair of BIOs and take their bytes
    out in the same step: receives that stop at max_bytes with ciphertext
    left, a stream backed up with ciphertext kept, one writing directly, a
    batch larger than one encryption step, a handshake that fails with an
    alert and others that succeed, all interleaved, and each side gets its
    own bytes and nothing else (a stray record or alert from another
    connection would break its TLS)."""
    context = server_context(tls_files)
    async with (
        tls_pair(context, client_context(ca), client_rcvbuf=4096, server_sndbuf=16384) as (
            slow,
            slow_client,
        ),
        tls_pair(context, client_ssl) as (fast, fast_client),
    ):
        assert slow._out is fast._out and slow._in is fast._in  # one pair for the thread
        # Receives that stop at max_bytes keep the rest of the ciphertext
        # back while another stream receives and handshakes.
        up, other_up = noise(300_000, seed=5), noise(50_000, seed=6)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fast_client.send_all, up)
            nursery.start_soon(slow_client.send_all, other_up)
            got = await receive_exactly(fast, 1000, max_bytes=1000)
            async with tls_pair(context, client_ssl) as (other, other_client):
                await other_client.send_all(b"hello")
                assert await receive_exactly(other, 5) == b"hello"
            assert await receive_exactly(slow, len(other_up), max_bytes=7000) == other_up
            got += await receive_exactly(fast, len(up) - 1000, max_bytes=3000)
        assert got == up
        big = noise(2 * MIB, seed=3)
        offset = 0
        while slow.send_nowait(big[offset : offset + 1000]):
            offset += 1000
        offset += 1000
        assert slow.unsent > 0
        expected = bytearray()
        for i in range(10):
            data = noise(100 * (i + 1), seed=10 + i)
            assert fast.send_nowait(data)
            expected += data
            if i == 3:
                # A client without the certificate a context requires: the
                # server's handshake fails and produces an alert.
                client_tcp, server_tcp = await tcp_pair()
                refused = TLSStream(server_tcp, server_context(tls_files, "required"))
                client = trio.SSLStream(client_tcp, client_ssl, server_hostname="127.0.0.1")

                async def client_side(client: trio.SSLStream[trio.SocketStream]) -> None:
                    with contextlib.suppress(trio.BrokenResourceError):
                        await client.do_handshake()
                        await client.receive_some()

                with trio.fail_after(WAIT):
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(client_side, client)
                        with pytest.raises(trio.BrokenResourceError):
                            await refused.do_handshake()
                await refused.aclose()
                await trio.aclose_forcefully(client)
            if i == 6:
                async with tls_pair(context, client_ssl) as (other, other_client):
                    await other.send_all(b"another connection")
                    assert await receive_exactly(other_client, 18) == b"another connection"
        huge = noise(WRITE_CHUNK + 12345, seed=4)  # more than one encryption step
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fast.send_all, huge)
            assert await receive_exactly(fast_client, len(expected) + len(huge)) == expected + huge
        async with trio.open_nursery() as nursery:
            nursery.start_soon(slow.send_all, big[offset:])
            assert await receive_exactly(slow_client, len(big)) == big
        assert slow.unsent == fast.unsent == 0


@pytest.mark.parametrize("how", ["close", "partial-hello", "reset"])
async def test_a_peer_that_vanishes_mid_handshake(
    tls_files: dict[str, str], ca: trustme.CA, how: str
) -> None:
    client_tcp, server_tcp = await tcp_pair()
    server = TLSStream(server_tcp, server_context(tls_files))
    if how != "close":
        await client_tcp.send_all(client_hello(ca)[:40])
    if how == "reset":
        reset(client_tcp)
    else:
        await client_tcp.aclose()
    with trio.fail_after(WAIT), pytest.raises(trio.BrokenResourceError) as info:
        await server.do_handshake()
    assert isinstance(info.value.__cause__, (ssl.SSLError, OSError))
    with pytest.raises(trio.BrokenResourceError):
        await server.receive_some()
    await server.aclose()
    with pytest.raises(trio.ClosedResourceError):
        await server.receive_some()


async def test_a_handshake_cut_by_a_timeout_breaks_the_stream(tls_files: dict[str, str]) -> None:
    client_tcp, server_tcp = await tcp_pair()
    server = TLSStream(server_tcp, server_context(tls_files))
    with trio.move_on_after(0.05) as scope:  # the broker's handshake_timeout
        await server.do_handshake()  # the client never says hello
    assert scope.cancelled_caught
    with pytest.raises(trio.BrokenResourceError):
        server.send_nowait(b"x")
    await server.aclose()
    await client_tcp.aclose()


@pytest.mark.parametrize("first", ["read", "write"])
async def test_a_peer_that_vanishes_mid_stream(
    tls_files: dict[str, str], client_ssl: ssl.SSLContext, first: str
) -> None:
    async with tls_pair(server_context(tls_files), client_ssl) as (server, client):
        await server.send_all(b"x")
        assert await receive_exactly(client, 1) == b"x"
        reset(client.transport_stream)
        await trio.lowlevel.wait_readable(server.transport_stream.socket)  # the RST is in
        if first == "read":
            with pytest.raises(trio.BrokenResourceError) as info:
                await server.receive_some()
        else:
            with pytest.raises(trio.BrokenResourceError) as info:
                server.send_nowait(b"y")
        assert isinstance(info.value.__cause__, OSError)
        # Broken for good, whichever way it is used next.
        with pytest.raises(trio.BrokenResourceError):
            await server.send_all(b"z")
        with pytest.raises(trio.BrokenResourceError):
            await server.receive_some()


async def test_close_notify_from_the_client(
    tls_files: dict[str, str], client_ssl: ssl.SSLContext
) -> None:
    async with tls_pair(server_context(tls_files), client_ssl) as (server, client):
        await client.send_all(b"last")
        await client.aclose()  # close_notify, then the socket
        assert await receive_exactly(server, 4) == b"last"
        with trio.fail_after(WAIT):
            assert await server.receive_some() == b""
            assert await server.receive_some() == b""  # and it stays ended


async def test_close_notify_from_the_server(
    tls_files: dict[str, str], client_ssl: ssl.SSLContext
) -> None:
    async with tls_pair(server_context(tls_files), client_ssl) as (server, client):
        await server.send_all(b"bye")
        await server.aclose()
        assert await receive_exactly(client, 3) == b"bye"
        # The strict client raises on an EOF without close_notify: this is
        # a clean end.
        with trio.fail_after(WAIT):
            assert await client.receive_some() == b""


async def test_ragged_eof_is_the_end_of_the_stream(
    tls_files: dict[str, str], client_ssl: ssl.SSLContext
) -> None:
    async with tls_pair(server_context(tls_files), client_ssl) as (server, client):
        await client.send_all(b"last")
        await client.transport_stream.aclose()  # no close_notify
        assert await receive_exactly(server, 4) == b"last"
        with trio.fail_after(WAIT):
            assert await server.receive_some() == b""  # as https_compatible=True


async def test_use_after_close(tls_files: dict[str, str], client_ssl: ssl.SSLContext) -> None:
    async with tls_pair(server_context(tls_files), client_ssl) as (server, _):
        await server.aclose()
        await server.aclose()  # idempotent
        with pytest.raises(trio.ClosedResourceError):
            await server.send_all(b"x")
        with pytest.raises(trio.ClosedResourceError):
            server.send_nowait(b"x")
        with pytest.raises(trio.ClosedResourceError):
            await server.receive_some()
        with pytest.raises(trio.ClosedResourceError):
            server.receive_nowait()
        with pytest.raises(trio.ClosedResourceError):
            await server.wait_send_all_might_not_block()
        with pytest.raises(trio.ClosedResourceError):
            await server.do_handshake()


@pytest.mark.parametrize("blocked", ["receive", "send"])
async def test_close_wakes_a_blocked_task(
    tls_files: dict[str, str], ca: trustme.CA, blocked: str
) -> None:
    async with tls_pair(
        server_context(tls_files), client_context(ca), client_rcvbuf=4096, server_sndbuf=16384
    ) as (server, _):
        big = noise(4 * MIB)

        async def send_big() -> None:
            await server.send_all(big)

        operation: Callable[[], Awaitable[Any]]
        operation = server.receive_some if blocked == "receive" else send_big

        async def expect_closed() -> None:
            with pytest.raises(trio.ClosedResourceError):
                await operation()

        with trio.fail_after(WAIT):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(expect_closed)
                await trio.testing.wait_all_tasks_blocked()
                await server.aclose()


async def test_garbage_instead_of_a_client_hello(tls_files: dict[str, str]) -> None:
    client_tcp, server_tcp = await tcp_pair()
    server = TLSStream(server_tcp, server_context(tls_files))
    await client_tcp.send_all(b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    with trio.fail_after(WAIT), pytest.raises(trio.BrokenResourceError) as info:
        await server.do_handshake()
    assert isinstance(info.value.__cause__, ssl.SSLError)
    await server.aclose()
    with trio.fail_after(WAIT):
        assert await client_tcp.receive_some(1000) == b""  # no answer, as before
    await client_tcp.aclose()


# -- through the broker ---------------------------------------------------------------


def tls_listener(tls_files: dict[str, str]) -> dict[str, Any]:
    return {"tls_cert": tls_files["tls_cert"], "tls_key": tls_files["tls_key"]}


def find_connection(broker: Broker, raw: RawClient) -> Connection:
    port = raw.stream.socket.getsockname()[1]
    (conn,) = (c for c in broker.connections if c.peer[1] == port)
    return conn


async def test_garbage_handshakes_are_counted_as_before(
    start_broker: BrokerFactory, tls_files: dict[str, str], client_ssl: ssl.SSLContext
) -> None:
    broker = await start_broker({"listener": tls_listener(tls_files)})
    for garbage in (b"GET /ws HTTP/1.1\r\nHost: x\r\n\r\n", b"\x16\x03\x01\x00\x05hello"):
        stream = await trio.open_tcp_stream("127.0.0.1", broker.port)
        async with stream:
            await stream.send_all(garbage)
            with trio.fail_after(WAIT):
                while await stream.receive_some(4096):  # an alert, at most
                    pass
    await wait_until(lambda: broker.stats.rejected["tls"] == 2)
    async with connect(broker.url, ssl_context=client_ssl) as c:
        await c.assert_alive()
    assert broker.stats.accepted == 1
    assert dict(broker.stats.rejected) == {"tls": 2}


async def test_each_refused_tls_handshake_is_logged_at_info(
    start_broker: BrokerFactory, tls_files: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    """docs/configuration.md, [log] level: at info, one line per refused
    handshake; a failed TLS handshake is one, with the peer and the reason."""
    caplog.set_level(logging.INFO, logger="broker.server")
    broker = await start_broker({"listener": tls_listener(tls_files)})
    ports: list[int] = []

    async def refused(send: bytes | None = None) -> None:
        stream = await trio.open_tcp_stream("127.0.0.1", broker.port)
        ports.append(stream.socket.getsockname()[1])
        async with stream:
            if send is not None:
                await stream.send_all(send)
                with trio.fail_after(WAIT):
                    while await stream.receive_some(4096):  # an alert, at most
                        pass

    def untrusting() -> None:
        """The stdlib's client, which trusts no CA here: it refuses the
        broker's certificate with an alert (trio's client would not send it)."""
        with socket.create_connection(("127.0.0.1", broker.port), timeout=WAIT) as sock:
            ports.append(sock.getsockname()[1])
            context = ssl.create_default_context()
            with pytest.raises(ssl.SSLCertVerificationError):
                context.wrap_socket(sock, server_hostname="127.0.0.1")

    await refused(b"GET /ws HTTP/1.1\r\nHost: x\r\n\r\n")  # plain HTTP
    await wait_until(lambda: broker.stats.rejected["tls"] == 1)
    await trio.to_thread.run_sync(untrusting)
    await wait_until(lambda: broker.stats.rejected["tls"] == 2)
    await refused()  # connects, sends nothing, leaves
    await wait_until(lambda: broker.stats.rejected["tls"] == 3)
    lines = [
        r.getMessage()
        for r in caplog.records
        if r.name == "broker.server" and "TLS handshake" in r.getMessage()
    ]
    assert all(r.levelno == logging.INFO for r in caplog.records if "TLS" in r.getMessage())
    assert len(lines) == 3, lines
    reasons = []
    for line, port in zip(lines, ports, strict=True):
        prefix = f"refused TLS handshake from 127.0.0.1:{port}: "
        assert line.startswith(prefix), line
        reasons.append(line.removeprefix(prefix))
    assert "http request" in reasons[0] or "wrong version number" in reasons[0]
    assert "unknown ca" in reasons[1]
    assert reasons[2] == "the client closed the connection"
    assert all("_ssl.c" not in r and "[SSL:" not in r for r in reasons)


N = 2000
PAYLOAD = "x" * 4096
WINDOW = 8
SMALL_QUEUE: dict[str, Any] = {"max_messages": 10, "max_bytes": 100_000}


async def test_fan_out_over_wss_with_a_subscriber_that_stops_reading(
    start_broker: BrokerFactory, tls_files: dict[str, str], client_ssl: ssl.SSLContext
) -> None:
    """Readers in both encodings get everything in order; the one that stops
    reading gets its queue policy (drop-oldest), every message accounted for."""
    broker = await start_broker({"listener": tls_listener(tls_files), "queue": SMALL_QUEUE})
    url = broker.url
    async with (
        raw_connect(url, rcvbuf=4096, ssl_context=client_ssl) as slow,
        connect(url, JSON, ssl_context=client_ssl) as json_1,
        connect(url, JSON, ssl_context=client_ssl) as json_2,
        connect(url, MSGPACK, ssl_context=client_ssl) as msgpack_1,
        connect(url, MSGPACK, ssl_context=client_ssl) as pub,
    ):
        await slow.send({"op": "sub", "id": "slow", "topic": "feed.>"})
        assert await slow.recv() == {"op": "ok", "id": "slow"}
        slow_conn = find_connection(broker, slow)
        readers = [json_1, json_2, msgpack_1]
        for reader in readers:
            await reader.sub("feed.>")
        seqs: list[list[int]] = [[] for _ in readers]
        progress = trio.lowlevel.ParkingLot()
        max_queued = 0

        async def read(i: int, reader: Client) -> None:
            nonlocal max_queued
            while len(seqs[i]) < N:
                msg = await reader.recv()
                assert msg["op"] == "msg" and msg["topic"] == "feed.x", msg
                assert msg["data"] == {"n": msg["seq"], "pad": PAYLOAD}
                seqs[i].append(msg["seq"])
                max_queued = max(max_queued, len(slow_conn.outbox))
                progress.unpark_all()

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for i, reader in enumerate(readers):
                    nursery.start_soon(read, i, reader)
                for n in range(1, N + 1):
                    # Paced by the readers, whose own queues never overflow.
                    while min(map(len, seqs)) < n - WINDOW:
                        await progress.park()
                    await pub.send(
                        {"op": "pub", "topic": "feed.x", "data": {"n": n, "pad": PAYLOAD}}
                    )
        assert all(s == list(range(1, N + 1)) for s in seqs)
        assert max_queued <= SMALL_QUEUE["max_messages"]
        dropped_total = slow_conn.outbox.dropped_total
        assert dropped_total > 0
        await pub.assert_alive()

        # The slow one reads at last: what the kernel and its queue held, in
        # order, and a dropped notice for the rest.
        slow_seqs: list[int] = []
        dropped = 0
        with trio.fail_after(WAIT * 2):
            while len(slow_seqs) + dropped < N:
                msg = await slow.recv()
                if msg["op"] == "dropped":
                    dropped += msg["count"]
                else:
                    assert msg["data"] == {"n": msg["seq"], "pad": PAYLOAD}
                    slow_seqs.append(msg["seq"])
        assert dropped == dropped_total
        assert slow_seqs == sorted(set(slow_seqs))
        assert slow_seqs[0] == 1 and slow_seqs[-1] == N
        await slow.send({"op": "ping", "id": "end"})
        assert await slow.recv() == {"op": "pong", "id": "end"}


async def test_batched_fan_out_over_wss_keeps_each_subscribers_order(
    start_broker: BrokerFactory, tls_files: dict[str, str], client_ssl: ssl.SSLContext
) -> None:
    """Thousands of publishes in one burst: big batches, direct writes that
    back up and hand over to the writer task, in both encodings."""
    broker = await start_broker(
        {
            "listener": tls_listener(tls_files),
            "queue": {"max_messages": 10_000, "max_bytes": 10_000_000},
        }
    )
    n = 3000
    subprotocols = [JSON, JSON, MSGPACK, MSGPACK]
    subscribers = [
        await RawClient.open(broker.url, sp, ssl_context=client_ssl) for sp in subprotocols
    ]
    try:
        for i, sub in enumerate(subscribers):
            await sub.send({"op": "sub", "id": i, "topic": ">"})
            assert (await sub.recv())["op"] == "ok"
        burst = b"".join(
            mask_frame(0x1, b'{"op":"pub","topic":"t.%d","data":%d}' % (k % 3, k)) for k in range(n)
        )
        results: list[list[Any]] = [[] for _ in subscribers]

        async def collect(i: int, sub: RawClient) -> None:
            while len(results[i]) < n:
                msg = await sub.recv()
                assert msg["op"] == "msg", msg
                assert msg["topic"] == f"t.{msg['data'] % 3}"
                results[i].append(msg["data"])

        async with raw_connect(broker.url, ssl_context=client_ssl) as publisher:
            with trio.fail_after(30):
                async with trio.open_nursery() as nursery:
                    for i, sub in enumerate(subscribers):
                        nursery.start_soon(collect, i, sub)
                    await publisher.send_raw(burst)
                    await publisher.send({"op": "ping", "id": "done"})
                    assert await publisher.recv() == {"op": "pong", "id": "done"}
        for got in results:
            assert got == list(range(n))
    finally:
        for sub in subscribers:
            await sub.aclose()


async def test_drain_over_wss_then_the_close_frame(
    start_broker: BrokerFactory, tls_files: dict[str, str], client_ssl: ssl.SSLContext
) -> None:
    broker = await start_broker({"listener": tls_listener(tls_files)})
    async with connect(broker.url, ssl_context=client_ssl) as sub:
        await sub.sub("t")
        (conn,) = broker.connections
        for i in range(100):
            broker.hub.deliver("t", i + 1, i, None)
        conn.close(CloseCode.GOING_AWAY, "server shutting down", drain=True)
        for i in range(100):
            assert (await sub.recv())["data"] == i
        assert (await sub.expect_close()).code == 1001
    await wait_until(lambda: not broker.connections)
    assert broker.stats.bytes_out > 100 * 20


async def test_stop_with_a_slow_wss_consumer_is_bounded(
    start_broker: BrokerFactory, tls_files: dict[str, str], client_ssl: ssl.SSLContext
) -> None:
    """A TLS subscriber whose socket is full: drain_timeout, then the close
    attempt for CLOSE_TIMEOUT at most; the others get 1001 at once."""
    broker = await start_broker(
        {
            "listener": tls_listener(tls_files),
            "queue": SMALL_QUEUE,
            "limits": {"drain_timeout": 0.5},
        }
    )
    async with (
        raw_connect(broker.url, rcvbuf=4096, ssl_context=client_ssl) as slow,
        connect(broker.url, ssl_context=client_ssl) as pub,
    ):
        await slow.send({"op": "sub", "id": 1, "topic": "t"})
        assert await slow.recv() == {"op": "ok", "id": 1}
        slow_conn = find_connection(broker, slow)
        with trio.fail_after(WAIT):
            while broker.hub.overflows == 0:
                await pub.pub("t", "x" * 8192)
        assert slow_conn.writer.tls is not None and slow_conn.writer.tls.unsent > 0
        start = trio.current_time()
        broker.stop()
        assert (await pub.expect_close()).code == 1001
        await slow.read_until_eof(WAIT * 2)
        await wait_until(lambda: not broker.connections)
    assert trio.current_time() - start < 0.5 + CLOSE_TIMEOUT + 0.5
