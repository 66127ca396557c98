"""``TLSStream`` (broker/io/tls.py) against ``trio.SSLStream(server_side=True,
https_compatible=True)``, the stream it replaced, on generated write and read
patterns over real loopback sockets with trustme certificates.

Hypothesis writes a script: the client sends data whose TLS records reach
the server cut anywhere (partial records, several records in one segment),
the server reads it with receive sizes from 1 byte up; the server sends
data larger than the socket buffers while the client is not reading yet
(partial writes: ``send_all`` must wait and finish once the client reads),
in TLS 1.2 or 1.3; and the stream ends one of five ways: a close_notify, a
TCP close without one (ragged EOF), a truncated record, a corrupted record,
or the server closing. The same script runs against both streams, and what
each side received and how each stream ended must be the same: the bytes,
``b""`` or :exc:`trio.BrokenResourceError` with the same OpenSSL reason.

The client is a small one on :class:`ssl.SSLObject` over the socket, so
that it writes exactly the ciphertext a case needs (cut, truncated,
corrupted) and tells a close_notify from a ragged EOF. Client-initiated
renegotiation (TLS 1.2) needs a client Python's ssl cannot be: OpenSSL's
``s_client`` (its ``R`` command) does it, against both streams.

One documented difference is checked as such: when the server closes,
``TLSStream`` sends a close_notify (if the socket takes it at once), where
``trio.SSLStream`` in https-compatible mode sends none.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import ssl
import subprocess
from dataclasses import dataclass, field
from typing import Literal

import pytest
import trio
import trio.testing
import trustme
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from broker.io.tls import TLSStream, make_ssl_context

Kind = Literal["TLSStream", "trio.SSLStream"]
KINDS: tuple[Kind, ...] = ("TLSStream", "trio.SSLStream")
Ending = Literal["close_notify", "ragged", "truncated", "corrupted", "server_close"]

WAIT = 10.0


@dataclass(frozen=True)
class Certs:
    server: ssl.SSLContext
    ca_file: str

    def client(self, tls13: bool) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=self.ca_file)
        version = ssl.TLSVersion.TLSv1_3 if tls13 else ssl.TLSVersion.TLSv1_2
        context.minimum_version = context.maximum_version = version
        return context


@pytest.fixture(scope="module")
def certs(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> Certs:
    directory = tmp_path_factory.mktemp("tls-differential")
    cert = ca.issue_cert("127.0.0.1")
    pem = directory / "server.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(pem))
    ca_file = directory / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    return Certs(make_ssl_context(str(pem), str(pem)), str(ca_file))


def pattern(size: int, seed: int) -> bytes:
    """*size* bytes that differ from one send to the next."""
    block = bytes((seed * 31 + i) % 251 for i in range(251))
    return (block * (size // 251 + 1))[:size]


# -- the client ---------------------------------------------------------------------------


class Client:
    """A TLS client on an SSLObject between two memory BIOs over a socket."""

    def __init__(self, tcp: trio.SocketStream, context: ssl.SSLContext) -> None:
        self.tcp = tcp
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_hostname="127.0.0.1")

    async def handshake(self) -> None:
        while True:
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                pass
            await self.flush()
            data = await self.tcp.receive_some(65536)
            if not data:
                raise EOFError("the server closed during the handshake")
            self.incoming.write(data)
        await self.flush()

    async def flush(self) -> None:
        if self.outgoing.pending:
            await self.tcp.send_all(self.outgoing.read())

    def seal(self, data: bytes) -> bytes:
        """*data* as TLS records (the ciphertext, not sent)."""
        view = memoryview(data)
        while view:
            view = view[self.tls.write(view) :]
        return self.outgoing.read()

    async def receive(self, size: int) -> bytes | Literal["close_notify", "ragged"]:
        while True:
            try:
                data = self.tls.read(size)
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLEOFError:
                return "ragged"
            else:
                # b"" is the close_notify (SSLObject suppresses SSLZeroReturnError).
                return data or "close_notify"
            raw = await self.tcp.receive_some(65536)
            if raw:
                self.incoming.write(raw)
            else:
                self.incoming.write_eof()

    def close_notify(self) -> bytes:
        with contextlib.suppress(ssl.SSLWantReadError):  # the server's is not awaited
            self.tls.unwrap()
        return self.outgoing.read()


# -- scripts ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ClientSends:
    size: int
    #: Where the ciphertext is cut into separate TCP writes, as fractions.
    cuts: tuple[float, ...]


@dataclass(frozen=True)
class ServerSends:
    size: int
    #: The client's receive sizes, in turn.
    reads: tuple[int, ...]


@dataclass(frozen=True)
class Script:
    tls13: bool
    steps: tuple[ClientSends | ServerSends, ...]
    #: The server's receive sizes, in turn (None: the default).
    server_reads: tuple[int | None, ...]
    ending: Ending
    #: For truncated and corrupted endings: the size of the last record's data.
    last: int = 100


@dataclass
class Outcome:
    server_received: bytearray = field(default_factory=bytearray)
    server_end: str = ""
    client_received: bytearray = field(default_factory=bytearray)
    client_end: str = ""
    sent_to_server: bytearray = field(default_factory=bytearray)
    sent_to_client: bytearray = field(default_factory=bytearray)


def describe(error: BaseException) -> str:
    """The kind of failure and OpenSSL's reason, without file and line."""
    cause = error.__cause__
    reason = getattr(cause, "reason", None) or type(cause).__name__
    return f"{type(error).__name__}({reason})"


async def tcp_pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    """(client, server), with small buffers so that big writes wait."""
    (listener,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
    async with listener:
        sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect
        await sock.connect(listener.socket.getsockname())
        server = await listener.accept()
    server.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    return trio.SocketStream(sock), server


def server_stream(kind: Kind, tcp: trio.SocketStream, context: ssl.SSLContext) -> trio.abc.Stream:
    if kind == "TLSStream":
        return TLSStream(tcp, context)
    return trio.SSLStream(tcp, context, server_side=True, https_compatible=True)


async def handshake(server: trio.abc.Stream) -> None:
    assert isinstance(server, (TLSStream, trio.SSLStream))
    await server.do_handshake()


async def run(kind: Kind, script: Script, certs: Certs) -> Outcome:
    out = Outcome()
    client_tcp, server_tcp = await tcp_pair()
    server = server_stream(kind, server_tcp, certs.server)
    client = Client(client_tcp, certs.client(script.tls13))
    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(handshake, server)
            nursery.start_soon(client.handshake)
        reader_done = trio.Event()

        async def read_server(task_status: trio.TaskStatus[trio.CancelScope]) -> None:
            with trio.CancelScope() as scope:
                task_status.started(scope)
                sizes = script.server_reads or (None,)
                n = 0
                try:
                    while True:
                        size = sizes[n % len(sizes)]
                        n += 1
                        data = await server.receive_some(size)
                        if not data:
                            out.server_end = "eof"
                            break
                        assert size is None or len(data) <= size
                        out.server_received += data
                except trio.BrokenResourceError as e:
                    out.server_end = describe(e)
            reader_done.set()

        async with trio.open_nursery() as nursery:
            reader = await nursery.start(read_server)
            for i, step in enumerate(script.steps):
                if isinstance(step, ClientSends):
                    data = pattern(step.size, i)
                    out.sent_to_server += data
                    cipher = client.seal(data)
                    cuts = sorted({int(f * len(cipher)) for f in step.cuts} - {0})
                    for start, end in zip([0, *cuts], [*cuts, len(cipher)], strict=True):
                        await client_tcp.send_all(cipher[start:end])
                        await trio.testing.wait_all_tasks_blocked()  # the server has read it
                    assert out.server_received == out.sent_to_server
                else:
                    data = pattern(step.size, i)
                    out.sent_to_client += data
                    async with trio.open_nursery() as sending:
                        sending.start_soon(server.send_all, data)
                        await trio.testing.wait_all_tasks_blocked()  # blocked if it is big
                        got = bytearray()
                        n = 0
                        while len(got) < len(data):
                            received = await client.receive(step.reads[n % len(step.reads)])
                            n += 1
                            assert isinstance(received, bytes), received
                            got += received
                    out.client_received += got
            await finish(script, client, client_tcp, server, reader, reader_done, out)
    return out


async def finish(
    script: Script,
    client: Client,
    client_tcp: trio.SocketStream,
    server: trio.abc.Stream,
    reader: trio.CancelScope,
    reader_done: trio.Event,
    out: Outcome,
) -> None:
    ending = script.ending
    if ending == "server_close":
        reader.cancel()
        await reader_done.wait()
        await server.aclose()
        received = await client.receive(65536)
        assert not isinstance(received, bytes), received
        out.client_end = received
        await client_tcp.aclose()
        return
    if ending == "close_notify":
        await client_tcp.send_all(client.close_notify())
    elif ending in ("truncated", "corrupted"):
        data = pattern(script.last, 99)
        cipher = bytearray(client.seal(data))
        if ending == "truncated":
            cipher = cipher[: len(cipher) // 2]
        else:
            cipher[-1] ^= 0x01  # the record's authentication tag
        await client_tcp.send_all(bytes(cipher))
        await trio.testing.wait_all_tasks_blocked()
    await client_tcp.aclose()
    await reader_done.wait()
    await server.aclose()


# -- the differential test ------------------------------------------------------------


steps = st.one_of(
    st.builds(
        ClientSends,
        st.sampled_from([1, 100, 16_383, 16_384, 16_385, 40_000]),
        st.lists(st.floats(min_value=0.0, max_value=0.999), max_size=4).map(tuple),
    ),
    st.builds(
        ServerSends,
        st.sampled_from([1, 1000, 16_385, 100_000]),
        st.lists(st.sampled_from([7, 1000, 16_384, 65_536]), min_size=1, max_size=3).map(tuple),
    ),
)
scripts = st.builds(
    Script,
    tls13=st.booleans(),
    steps=st.lists(steps, max_size=4).map(tuple),
    server_reads=st.lists(
        st.sampled_from([None, 7, 1000, 16_384, 100_000]), min_size=1, max_size=3
    ).map(tuple),
    ending=st.sampled_from(["close_notify", "ragged", "truncated", "corrupted", "server_close"]),
    last=st.sampled_from([1, 100, 20_000]),
)


def run_both(script: Script, certs: Certs) -> dict[Kind, Outcome]:
    async def both() -> dict[Kind, Outcome]:
        return {kind: await run(kind, script, certs) for kind in KINDS}

    return trio.run(both)


@settings(
    max_examples=50,
    deadline=None,
    # No "explain" phase: its line tracing makes a failing example slow.
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink],
    suppress_health_check=[HealthCheck.too_slow],
)
@given(script=scripts)
def test_same_bytes_and_same_end_as_trio_sslstream(script: Script, certs: Certs) -> None:
    outcomes = run_both(script, certs)
    mine, trios = outcomes["TLSStream"], outcomes["trio.SSLStream"]
    # Everything sent arrived, on both.
    for outcome in (mine, trios):
        assert outcome.server_received.startswith(outcome.sent_to_server)
        assert outcome.client_received == outcome.sent_to_client
    assert mine.server_received == trios.server_received
    assert mine.server_end == trios.server_end, script
    assert mine.client_received == trios.client_received
    if script.ending == "server_close":
        # The documented difference: TLSStream says close_notify.
        assert (mine.client_end, trios.client_end) == ("close_notify", "ragged")
    else:
        assert mine.client_end == trios.client_end == ""


@pytest.mark.parametrize(
    ("ending", "server_end"),
    [
        ("close_notify", "eof"),
        ("ragged", "eof"),  # https-compatible: an EOF without close_notify ends the stream
        ("truncated", "eof"),
        ("corrupted", "BrokenResourceError(DECRYPTION_FAILED_OR_BAD_RECORD_MAC)"),
    ],
)
@pytest.mark.parametrize("tls13", [False, True])
@pytest.mark.parametrize("last", [100, 20_000])
def test_each_ending(certs: Certs, ending: Ending, server_end: str, tls13: bool, last: int) -> None:
    """The endings the generated scripts compare, with what both streams
    say. With ``last`` 20,000 the final data is two records that arrive
    together: a corrupted second one used to end TLSStream's stream as if
    cleanly, after the first one's data (OpenSSL reports the error once)."""
    steps = (ClientSends(5000, (0.5,)), ServerSends(100_000, (4096,)))
    script = Script(tls13, steps, (None,), ending, last)
    outcomes = run_both(script, certs)
    for outcome in outcomes.values():
        assert outcome.server_end == server_end
        assert outcome.server_received[:5000] == pattern(5000, 0)


# -- renegotiation, with OpenSSL's own client ----------------------------------------


async def renegotiate(kind: Kind, certs: Certs) -> tuple[bytes, str, bytes]:
    """``openssl s_client`` over TLS 1.2 sends a line, asks to renegotiate
    (``R``), then sends another: what the server received, how its stream
    ended, and what s_client printed."""
    (listener,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listener.socket.getsockname()[1]
    command = ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-tls1_2"]
    command += ["-CAfile", certs.ca_file, "-servername", "127.0.0.1"]
    process = await trio.lowlevel.open_process(
        command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    assert process.stdin is not None and process.stdout is not None
    printed = bytearray()
    received = bytearray()
    try:
        with trio.fail_after(WAIT):
            async with listener:
                tcp = await listener.accept()
            server = server_stream(kind, tcp, certs.server)
            await handshake(server)

            async def read_output() -> None:
                assert process.stdout is not None
                while chunk := await process.stdout.receive_some(65536):
                    printed.extend(chunk)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(read_output)
                await process.stdin.send_all(b"before\n")
                while b"before\n" not in received:
                    received += await server.receive_some(100)
                await process.stdin.send_all(b"R\n")
                try:
                    while data := await server.receive_some(100):
                        received += data
                        await process.stdin.send_all(b"after\n")
                    end = "eof"
                except trio.BrokenResourceError as e:
                    end = describe(e)
                await server.aclose()
                await process.stdin.aclose()
    finally:
        process.kill()
        await process.wait()
    return bytes(received), end, bytes(printed)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
async def test_client_initiated_renegotiation_is_refused_by_both(certs: Certs) -> None:
    results = {kind: await renegotiate(kind, certs) for kind in KINDS}
    for received, end, printed in results.values():
        assert received == b"before\n"  # nothing after the renegotiation request
        assert b"RENEGOTIATING" in printed
        assert b"no renegotiation" in printed  # the server's refusal, as s_client saw it
        assert end == "BrokenResourceError(SSLV3_ALERT_HANDSHAKE_FAILURE)"
    ((_, mine, _), (_, trios, _)) = results.values()
    assert mine == trios
