"""Behind a proxy, over real sockets: ``trusted_proxies``, forwarded headers and the PROXY protocol.

The test acts as the proxy: it connects from 127.0.0.1 (trusted) and sends
what nginx or HAProxy would; other loopback source addresses (127.0.0.2,
127.0.0.3) are clients that are not proxies. tests/test_proxy_nginx.py does
the same through a real nginx.
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping, Sequence
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from broker import Broker, ClientInfo, Handshake, Identity, PluginContext, Reject, hookimpl
from broker.core.proxy import V2_SIGNATURE
from broker.ops.reload import reload_broker
from broker.plugin.host import PluginFactory
from tests.conftest import BrokerFactory
from tests.helpers import TOKEN, WAIT, raw_connect, wait_until
from tests.test_reload import BASE, serve_file

PROXY = "127.0.0.1"
CLIENT = "127.0.0.2"
OTHER = "127.0.0.3"


class Seen:
    """A test plugin recording what authentication and observers are shown."""

    def __init__(self) -> None:
        self.handshakes: list[Handshake] = []
        self.clients: list[ClientInfo] = []

    @hookimpl
    def broker_authenticate(self, handshake: Handshake) -> Identity | Reject | None:
        self.handshakes.append(handshake)
        # Admits everyone: noauth refuses what a proxy forwards, as it must.
        return Identity("anonymous", plugin="seen")

    @hookimpl
    def broker_connected(self, client: ClientInfo) -> None:
        self.clients.append(client)


def plugin(seen: Seen) -> Mapping[str, PluginFactory]:
    def create(settings: Mapping[str, Any], context: PluginContext) -> Seen:
        return seen

    return {"seen": create}


def config(listener: Mapping[str, Any], **tables: Any) -> dict[str, Any]:
    return {"listener": dict(listener), "plugins": {"enabled": ["noauth", "seen"]}, **tables}


async def start(
    start_broker: BrokerFactory, listener: Mapping[str, Any], **tables: Any
) -> tuple[Broker, Seen]:
    seen = Seen()
    broker = await start_broker(config(listener, **tables), factories=plugin(seen))
    return broker, seen


def upgrade(path: str = "/ws", headers: Sequence[tuple[str, str]] = ()) -> bytes:
    lines = [
        f"GET {path} HTTP/1.1",
        "Host: broker",
        "Upgrade: websocket",
        "Connection: Upgrade",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version: 13",
        *(f"{k}: {v}" for k, v in headers),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def exchange(
    port: int,
    data: bytes | Sequence[bytes],
    *,
    source: str = PROXY,
    tls: ssl.SSLContext | None = None,
    eof: bool = False,
) -> bytes:
    """Connect from *source* to *port*, send *data* (pieces in order; with *eof*, then
    end the sending side), and return what the broker answers until it
    closes the connection or a response head has come (b"" when it closes
    without a word)."""
    sock = trio.socket.socket()
    await sock.bind((source, 0))
    await sock.connect(("127.0.0.1", port))
    stream: trio.abc.Stream = trio.SocketStream(sock)
    pieces = [data] if isinstance(data, bytes) else list(data)
    answer = b""
    with trio.fail_after(WAIT):
        try:
            for i, piece in enumerate(pieces):
                if tls is not None and i == len(pieces) - 1:
                    # The PROXY header went in the clear; TLS comes after it.
                    stream = trio.SSLStream(stream, tls, server_hostname="127.0.0.1")
                await stream.send_all(piece)
            if eof:
                assert isinstance(stream, trio.SocketStream)
                await stream.send_eof()
            while b"\r\n\r\n" not in answer:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    break
                answer += chunk
        except (trio.BrokenResourceError, ConnectionResetError):
            pass
        finally:
            await trio.aclose_forcefully(stream)
    return answer


def status(answer: bytes) -> int:
    assert answer.startswith(b"HTTP/1.1 "), answer
    return int(answer[9:12])


def v1(source: str, sport: int, port: int) -> bytes:
    return f"PROXY TCP4 {source} 127.0.0.1 {sport} {port}\r\n".encode()


def v2(source: str, sport: int, port: int, *, local: bool = False, tlvs: bytes = b"") -> bytes:
    block = (
        IPv4Address(source).packed
        + IPv4Address("127.0.0.1").packed
        + sport.to_bytes(2, "big")
        + port.to_bytes(2, "big")
        + tlvs
    )
    ver_cmd = 0x20 if local else 0x21
    return V2_SIGNATURE + bytes([ver_cmd, 0x11]) + len(block).to_bytes(2, "big") + block


# -- forwarded headers ---------------------------------------------------------------------


@pytest.mark.parametrize("trusted", [True, False])
async def test_default_noauth_refuses_what_a_proxy_forwards(
    start_broker: BrokerFactory, trusted: bool
) -> None:
    """The built-in defaults (noauth) behind a proxy on loopback: anonymous
    access stays local, whether or not the proxy is trusted."""
    listener = {"trusted_proxies": [PROXY]} if trusted else {}
    broker = await start_broker({"listener": listener})
    answer = await exchange(broker.port, upgrade(headers=[("X-Forwarded-For", "203.0.113.7")]))
    assert status(answer) == 403
    assert b"anonymous access" in answer
    assert status(await exchange(broker.port, upgrade())) == 101  # a local client


async def test_x_forwarded_for_from_a_trusted_proxy_names_the_client(
    start_broker: BrokerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    broker, seen = await start(start_broker, {"trusted_proxies": ["127.0.0.1/32"]})
    caplog.set_level("INFO", "broker.server")
    # What nginx's $proxy_add_x_forwarded_for makes of a client that sent
    # its own X-Forwarded-For: the client's claim, then the real address.
    xff = [("X-Forwarded-For", "6.6.6.6, 203.0.113.7")]
    async with raw_connect(broker.url, source=PROXY, headers=xff) as c:
        await c.send({"op": "ping", "id": 1})
        assert (await c.recv())["op"] == "pong"
        (conn,) = broker.connections
        assert conn.peer == ("203.0.113.7", 0)
    assert seen.handshakes[0].peer == ("203.0.113.7", 0)
    assert seen.handshakes[0].headers["x-forwarded-for"] == "6.6.6.6, 203.0.113.7"
    assert seen.clients[0].peer == ("203.0.113.7", 0)
    assert any(
        "connected from 203.0.113.7:0 via 127.0.0.1:" in r.getMessage() for r in caplog.records
    )
    await wait_until(lambda: not broker._per_ip)


async def test_forwarded_headers_from_anyone_else_are_ignored(
    start_broker: BrokerFactory,
) -> None:
    broker, seen = await start(start_broker, {"trusted_proxies": [PROXY]})
    xff = [("X-Forwarded-For", "203.0.113.7"), ("Forwarded", "for=203.0.113.8")]
    async with raw_connect(broker.url, source=CLIENT, headers=xff):
        pass
    assert seen.handshakes[0].peer[0] == CLIENT
    # No trusted_proxies at all: the same from the proxy's own address.
    broker, seen = await start(start_broker, {})
    async with raw_connect(broker.url, source=PROXY, headers=xff):
        pass
    assert seen.handshakes[0].peer[0] == PROXY


async def test_forwarded_header_rfc7239(start_broker: BrokerFactory) -> None:
    broker, seen = await start(
        start_broker, {"trusted_proxies": [PROXY], "forwarded_header": "forwarded"}
    )
    headers = [
        ("X-Forwarded-For", "198.51.100.1"),  # not the one configured: ignored
        ("Forwarded", 'for="[2001:db8:cafe::17]:4711";proto=https'),
    ]
    async with raw_connect(broker.url, source=PROXY, headers=headers):
        pass
    assert seen.handshakes[0].peer == ("2001:db8:cafe::17", 4711)
    # A Forwarded header that does not parse names nobody beyond the proxy.
    async with raw_connect(broker.url, source=PROXY, headers=[("Forwarded", 'for="x')]):
        pass
    assert seen.handshakes[1].peer[0] == PROXY


async def test_per_ip_limit_applies_to_the_forwarded_address(
    start_broker: BrokerFactory,
) -> None:
    broker, _ = await start(
        start_broker, {"trusted_proxies": [PROXY]}, limits={"max_connections_per_ip": 1}
    )
    a = [("X-Forwarded-For", "203.0.113.7")]
    b = [("X-Forwarded-For", "203.0.113.8")]
    async with raw_connect(broker.url, source=PROXY, headers=a):
        # A second connection of the same client is one too many...
        answer = await exchange(broker.port, upgrade(headers=a))
        assert status(answer) == 429 and b"too many connections" in answer
        # ... while another client, through the same proxy, gets in.
        # The proxy's own connections (no client named) are exempt.
        async with (
            raw_connect(broker.url, source=PROXY, headers=b),
            raw_connect(broker.url, source=PROXY),
            raw_connect(broker.url, source=PROXY),
        ):
            assert broker._per_ip == {"203.0.113.7": 1, "203.0.113.8": 1, PROXY: 2}
    assert broker.stats.rejected["max_per_ip"] == 1
    await wait_until(lambda: not broker._per_ip)


async def test_per_ip_limit_of_a_direct_client_is_unchanged(start_broker: BrokerFactory) -> None:
    # A peer that is not a trusted proxy is never exempt, whatever it sends.
    broker, _ = await start(
        start_broker, {"trusted_proxies": [PROXY]}, limits={"max_connections_per_ip": 1}
    )
    async with raw_connect(broker.url, source=CLIENT):
        answer = await exchange(
            broker.port, upgrade(headers=[("X-Forwarded-For", "203.0.113.9")]), source=CLIENT
        )
        assert status(answer) == 429


async def test_allow_insecure_with_trusted_proxies_serves_the_proxies_only(
    start_broker: BrokerFactory,
) -> None:
    broker, _ = await start(start_broker, {"trusted_proxies": [PROXY], "allow_insecure": True})
    answer = await exchange(broker.port, upgrade(), source=CLIENT)
    assert status(answer) == 403 and b"trusted proxies" in answer
    assert broker.stats.rejected["not_proxied"] == 1
    async with raw_connect(broker.url, source=PROXY, headers=[("X-Forwarded-For", CLIENT)]) as c:
        await c.send({"op": "ping", "id": 1})
        assert (await c.recv())["op"] == "pong"


# -- the PROXY protocol -------------------------------------------------------------------

PROXY_PROTOCOL = {"trusted_proxies": [PROXY], "proxy_protocol": True}


@pytest.mark.parametrize("version", [1, 2])
async def test_proxy_protocol_names_the_client(start_broker: BrokerFactory, version: int) -> None:
    broker, seen = await start(start_broker, PROXY_PROTOCOL)
    header = (v1 if version == 1 else v2)("203.0.113.9", 40001, broker.port)
    async with raw_connect(broker.url, source=PROXY, prefix=header) as c:
        await c.send({"op": "ping", "id": 1})
        assert (await c.recv())["op"] == "pong"
        assert broker._per_ip == {"203.0.113.9": 1}
    assert seen.handshakes[0].peer == ("203.0.113.9", 40001)
    assert seen.clients[0].peer == ("203.0.113.9", 40001)


async def test_proxy_protocol_header_split_across_writes(start_broker: BrokerFactory) -> None:
    broker, seen = await start(start_broker, PROXY_PROTOCOL)
    header = v2("203.0.113.9", 40002, broker.port, tlvs=b"\x05\x00\x03abc")
    pieces = [header[:5], header[5:14], header[14:20], header[20:] + upgrade()[:10], upgrade()[10:]]
    answer = b""
    sock = trio.socket.socket()
    await sock.bind((PROXY, 0))
    await sock.connect(("127.0.0.1", broker.port))
    async with trio.SocketStream(sock) as stream:
        stream.setsockopt(trio.socket.IPPROTO_TCP, trio.socket.TCP_NODELAY, 1)
        for piece in pieces:
            await stream.send_all(piece)
            # Let the broker read each piece on its own, most likely (the
            # reader's handling of every split is tested in test_proxy.py).
            await trio.testing.wait_all_tasks_blocked(cushion=0.005)
        with trio.fail_after(WAIT):
            while b"\r\n\r\n" not in answer:
                answer += await stream.receive_some(4096)
    assert status(answer) == 101
    assert seen.handshakes[0].peer == ("203.0.113.9", 40002)


async def test_proxy_protocol_local_is_the_proxy_itself(start_broker: BrokerFactory) -> None:
    broker, seen = await start(start_broker, PROXY_PROTOCOL, limits={"max_connections_per_ip": 1})
    # A health check: LOCAL (v2) or UNKNOWN (v1); exempt from the per-IP cap.
    local = v2("0.0.0.0", 0, 0, local=True)
    async with (
        raw_connect(broker.url, source=PROXY, prefix=local),
        raw_connect(broker.url, source=PROXY, prefix=b"PROXY UNKNOWN\r\n"),
    ):
        pass
    assert [h.peer[0] for h in seen.handshakes] == [PROXY, PROXY]


async def test_proxy_protocol_before_tls(
    start_broker: BrokerFactory, tls_files: dict[str, str], client_ssl: ssl.SSLContext
) -> None:
    # The PROXY header comes first on the wire, before the TLS ClientHello.
    listener = {
        **PROXY_PROTOCOL,
        "tls_cert": tls_files["tls_cert"],
        "tls_key": tls_files["tls_key"],
    }
    broker, seen = await start(start_broker, listener)
    header = v1("203.0.113.10", 40003, broker.port)
    async with raw_connect(broker.url, source=PROXY, prefix=header, ssl_context=client_ssl) as c:
        await c.send({"op": "ping", "id": 1})
        assert (await c.recv())["op"] == "pong"
    assert seen.handshakes[0].peer == ("203.0.113.10", 40003)
    assert seen.handshakes[0].tls
    # Without the header, the ClientHello itself is refused as not one.
    assert await exchange(broker.port, [b"", b"x"], tls=client_ssl) == b""
    assert broker.stats.rejected["proxy_protocol"] == 1


async def test_proxy_protocol_per_ip_limit_and_forwarded_headers(
    start_broker: BrokerFactory,
) -> None:
    listener = {**PROXY_PROTOCOL, "trusted_proxies": [PROXY, "10.0.0.0/8"]}
    broker, seen = await start(start_broker, listener, limits={"max_connections_per_ip": 1})
    header = v1("203.0.113.11", 1, broker.port)
    async with raw_connect(broker.url, source=PROXY, prefix=header):
        assert status(await exchange(broker.port, header + upgrade())) == 429
    # A PROXY header naming another trusted proxy: its forwarded header counts...
    xff = [("X-Forwarded-For", "198.51.100.5")]
    async with raw_connect(broker.url, source=PROXY, prefix=v1("10.1.2.3", 2, 1), headers=xff):
        pass
    assert seen.handshakes[-1].peer == ("198.51.100.5", 0)
    # ... one naming a client does not: the client could have written it.
    async with raw_connect(broker.url, source=PROXY, prefix=v1("203.0.113.12", 3, 1), headers=xff):
        pass
    assert seen.handshakes[-1].peer == ("203.0.113.12", 3)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (upgrade(), "proxy_protocol"),  # no header at all
        (b"PROXY TCP4 203.0.113.1 127.0.0.1 1 99999\r\n" + upgrade(), "proxy_protocol"),
        (V2_SIGNATURE + b"\x21\x11\x00\x04" + bytes(4) + upgrade(), "proxy_protocol"),
        (V2_SIGNATURE + b"\x21\x11\xff\xff", "proxy_protocol"),  # oversized
        (b"PROXY TCP4 203.0.113.1", "proxy_protocol"),  # truncated, then closed
        (b"", "closed"),  # a TCP health check: connect and close
    ],
    ids=["no header", "bad v1", "short v2", "oversized v2", "truncated", "closed"],
)
async def test_proxy_protocol_bad_headers_are_refused_without_an_answer(
    start_broker: BrokerFactory, data: bytes, reason: str
) -> None:
    broker, seen = await start(start_broker, PROXY_PROTOCOL)
    assert await exchange(broker.port, data, eof=True) == b""
    await wait_until(lambda: broker.stats.rejected[reason] == 1)
    assert not seen.handshakes
    await wait_until(lambda: not broker._per_ip and not broker.sockets_open)


async def test_proxy_protocol_from_an_untrusted_peer_is_refused(
    start_broker: BrokerFactory,
) -> None:
    broker, seen = await start(start_broker, PROXY_PROTOCOL)
    header = v1("203.0.113.1", 1, broker.port)
    assert await exchange(broker.port, header + upgrade(), source=CLIENT) == b""
    assert broker.stats.rejected["untrusted_proxy"] == 1
    assert not seen.handshakes


async def test_proxy_protocol_header_counts_against_the_handshake_timeout(
    start_broker: BrokerFactory,
) -> None:
    broker, _ = await start(start_broker, PROXY_PROTOCOL, limits={"handshake_timeout": 0.3})
    sock = trio.socket.socket()
    await sock.bind((PROXY, 0))
    await sock.connect(("127.0.0.1", broker.port))
    async with trio.SocketStream(sock) as stream:
        await stream.send_all(b"PROXY TCP4 203.0.113.1 ")
        with trio.fail_after(WAIT):
            assert await stream.receive_some(100) == b""
    assert broker.stats.rejected["handshake_timeout"] == 1


async def test_reload_applies_trusted_proxies_to_new_connections(tmp_path: Path) -> None:
    path = tmp_path / "broker.toml"
    # An authentication plugin: noauth refuses what a proxy forwards.
    base = BASE + (
        '[plugins]\nenabled = ["tokens"]\n'
        f'[plugin.tokens]\ntokens = [{{ id = "alice", token = "{TOKEN}" }}]\n'
    )
    path.write_text(base)
    xff = [("X-Forwarded-For", "203.0.113.7"), ("Authorization", f"Bearer {TOKEN}")]
    async with (
        serve_file(path) as broker,
        raw_connect(broker.url, source=PROXY, headers=xff) as before,
    ):
        await before.send({"op": "ping", "id": 1})
        await before.recv()
        path.write_text(base.replace("[admin]", 'trusted_proxies = ["127.0.0.1"]\n[admin]'))
        result = await reload_broker(broker)
        assert result.ok and result.changed == ("listener.trusted_proxies",)
        async with raw_connect(broker.url, source=PROXY, headers=xff) as after:
            await after.send({"op": "ping", "id": 1})
            await after.recv()
            # The open connection keeps the address it was accepted with.
            assert sorted(c.peer[0] for c in broker.connections) == [PROXY, "203.0.113.7"]


async def test_silent_sockets_over_the_per_ip_cap_hold_no_slots(
    start_broker: BrokerFactory,
) -> None:
    """One address opening many sockets and sending nothing: those over its
    cap are refused at once (429, written before its request), so they do
    not keep another address's client out of ``max_connections`` while they
    wait for a handshake timeout."""
    broker, _ = await start(
        start_broker,
        {},
        limits={"max_connections": 20, "max_connections_per_ip": 10, "handshake_timeout": 30.0},
    )
    silent: list[trio.SocketStream] = []
    try:
        for _ in range(40):
            sock = trio.socket.socket()
            await sock.bind((OTHER, 0))
            await sock.connect(("127.0.0.1", broker.port))
            silent.append(trio.SocketStream(sock))
        # The 30 over the cap are answered and closed, not held.
        await wait_until(lambda: broker.stats.rejected["max_per_ip"] == 30)
        await wait_until(lambda: broker._sockets_open - broker._lingering <= 10)
        with trio.fail_after(2):  # well under the silent ones' handshake timeout
            async with raw_connect(broker.url, source=CLIENT) as client:
                await client.send({"op": "ping", "id": 1})
                assert (await client.recv())["op"] == "pong"
        # What one of the refused ones reads: the 429.
        answer = b""
        with trio.fail_after(WAIT):
            while chunk := await silent[-1].receive_some(4096):
                answer += chunk
        assert status(answer) == 429
    finally:
        for stream in silent:
            await trio.aclose_forcefully(stream)
