"""broker.core.proxy, sans-I/O: the PROXY protocol reader and the forwarded headers.

The cases follow HAProxy's ``doc/proxy-protocol.txt`` (sections 2.1 and 2.2,
quoted where they give examples) and RFC 7239; the differential tests
compare the reader with an independent implementation, the
``proxy-protocol`` package, on headers it builds.
"""

from __future__ import annotations

import re
import socket
from ipaddress import IPv4Address, IPv6Address

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from proxyprotocol.result import ProxyResultIPv4, ProxyResultIPv6
from proxyprotocol.tlv import ProxyProtocolTLV
from proxyprotocol.v1 import ProxyProtocolV1
from proxyprotocol.v2 import ProxyProtocolV2

from broker import config_from_dict
from broker.core.errors import ConfigError
from broker.core.proxy import (
    MAX_V1_LENGTH,
    MAX_V2_PAYLOAD,
    V2_SIGNATURE,
    ProxyHeader,
    ProxyHeaderReader,
    ProxyProtocolError,
    TrustedProxies,
    check_network,
    crc32c,
    forwarded_client,
    parse_forwarded,
    parse_node,
    parse_proxy_header,
    parse_x_forwarded_for,
    resolve_client,
)

#: What may follow a header on the wire: it must never be consumed.
AFTER = b"GET / HTTP/1.1\r\nHost: 192.168.0.11\r\n\r\n"


def v2(ver_cmd: int, fam: int, payload: bytes, *, size: int | None = None) -> bytes:
    """A version 2 header built by hand (size: the length field, if not len(payload))."""
    n = len(payload) if size is None else size
    return V2_SIGNATURE + bytes([ver_cmd, fam]) + n.to_bytes(2, "big") + payload


def tlv(kind: int, value: bytes) -> bytes:
    return bytes([kind]) + len(value).to_bytes(2, "big") + value


def ipv4_block(src: str, dst: str, sport: int, dport: int) -> bytes:
    return (
        IPv4Address(src).packed
        + IPv4Address(dst).packed
        + sport.to_bytes(2, "big")
        + dport.to_bytes(2, "big")
    )


def ipv6_block(src: str, dst: str, sport: int, dport: int) -> bytes:
    return (
        IPv6Address(src).packed
        + IPv6Address(dst).packed
        + sport.to_bytes(2, "big")
        + dport.to_bytes(2, "big")
    )


def read_all(data: bytes, chunks: list[int] | None = None) -> tuple[ProxyHeader, int]:
    """Feed *data* in pieces (sizes from *chunks*, else one byte at a time) as
    the accept path does; return the header and the bytes consumed."""
    reader = ProxyHeaderReader()
    consumed = 0
    i = 0
    sizes = iter(chunks or [])
    while reader.header is None:
        assert i < len(data), "the reader wants more than the whole input"
        n = next(sizes, 1)
        piece = data[i : i + n]
        used = reader.feed(piece)
        consumed += used
        assert used == len(piece) or reader.header is not None
        i += n
    return reader.header, consumed


# -- version 1 ------------------------------------------------------------------------


def test_v1_spec_example_before_an_http_request() -> None:
    # Section 2.1: "An example of such a line before an HTTP request".
    line = b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n"
    header = parse_proxy_header(line + AFTER)
    assert header == ProxyHeader(
        1, "proxy", ("192.168.0.1", 56324), ("192.168.0.11", 443), length=len(line)
    )


@pytest.mark.parametrize(
    ("line", "length"),
    [
        # Section 2.1, "The maximum line lengths the receiver must support".
        (b"PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n", 56),
        (b"PROXY TCP6 " + b":".join([b"ffff"] * 8) * 1 + b" " + b":".join([b"ffff"] * 8)
         + b" 65535 65535\r\n", 104),
        (b"PROXY UNKNOWN\r\n", 15),
        (b"PROXY UNKNOWN " + b":".join([b"ffff"] * 8) + b" " + b":".join([b"ffff"] * 8)
         + b" 65535 65535\r\n", 107),
    ],
)  # fmt: skip
def test_v1_spec_maximum_lengths(line: bytes, length: int) -> None:
    assert len(line) == length <= MAX_V1_LENGTH
    header, consumed = read_all(line + AFTER)
    assert consumed == header.length == length


def test_v1_tcp6_and_unknown() -> None:
    header = parse_proxy_header(b"PROXY TCP6 2001:db8::1 2001:DB8::2 1 65535\r\n")
    assert header.source == ("2001:db8::1", 1)
    assert header.destination == ("2001:db8::2", 65535)
    # UNKNOWN: the rest of the line is ignored, the real endpoints apply.
    assert parse_proxy_header(b"PROXY UNKNOWN whatever is here\r\n").source is None
    # An IPv4-mapped IPv6 address is the IPv4 address.
    mapped = parse_proxy_header(b"PROXY TCP6 ::ffff:192.0.2.7 ::1 1000 443\r\n")
    assert mapped.source == ("192.0.2.7", 1000)


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        (b"PROXY TCP4 192.168.0.01 192.168.0.11 56324 443\r\n", "not IPv4"),  # heading zero
        (b"PROXY TCP4 192.168.0.1 192.168.0.11 056324 443\r\n", "port"),  # heading zero
        (b"PROXY TCP4 192.168.0.1 192.168.0.11 65536 443\r\n", "port"),
        (b"PROXY TCP4 192.168.0.1 192.168.0.11 -1 443\r\n", "port"),
        (b"PROXY TCP4 256.168.0.1 192.168.0.11 1 443\r\n", "not IPv4"),
        (b"PROXY TCP4 ::1 ::1 1 443\r\n", "not IPv4"),
        (b"PROXY TCP6 192.168.0.1 192.168.0.11 1 443\r\n", "not IPv6"),
        (b"PROXY TCP6 fe80::1%eth0 ::1 1 443\r\n", "not IPv6"),
        (b"PROXY TCP6 1:2:3:4:5:6:7:8:9 ::1 1 443\r\n", "not IPv6"),
        (b"PROXY TCP4  192.168.0.1 192.168.0.11 1 443\r\n", "SOURCE DESTINATION"),
        (b"PROXY TCP4 192.168.0.1 192.168.0.11 1\r\n", "SOURCE DESTINATION"),
        (b"PROXY TCP4 192.168.0.1 192.168.0.11 1 443 \r\n", "SOURCE DESTINATION"),
        (b"PROXY TCP5 192.168.0.1 192.168.0.11 1 443\r\n", "TCP5"),
        (b"PROXY \r\n", "''"),
        (b"PROXY TCP4 192.168.0.1 192.168.0.11 1 443\n", "LF without CR"),
        (b"PROXY TCP4 192.168.0.1\r192.168.0.11 1 443\r\n", "CR not followed by LF"),
        (b"PROXY TCP4 192.168.0.1 192.168.0.11 1 443\r\r\n", "CR not followed by LF"),
        (b"PROXY UNKNOWN \xff\r\n", "US-ASCII"),
        (b"proxy TCP4 192.168.0.1 192.168.0.11 1 443\r\n", "does not start"),
        (b"PROXY UNKNOWN " + b"f" * 94 + b"\r\n", "no CRLF in its first 107"),  # 110 bytes
    ],
)
def test_v1_malformed(line: bytes, reason: str) -> None:
    with pytest.raises(ProxyProtocolError, match=reason.replace("(", r"\(")):
        parse_proxy_header(line)


def test_v1_without_crlf_is_refused_at_107_bytes() -> None:
    reader = ProxyHeaderReader()
    assert reader.feed(b"PROXY UNKNOWN " + b"x" * 92) == 106
    with pytest.raises(ProxyProtocolError, match="no CRLF"):
        reader.feed(b"x")


# -- version 2 ------------------------------------------------------------------------


def test_v2_tcp4_with_tlvs() -> None:
    tlvs = (
        tlv(0x01, b"h2")  # ALPN
        + tlv(0x02, b"broker.example")  # AUTHORITY
        + tlv(0x04, b"\0\0\0")  # NOOP
        + tlv(0x05, b"id-42")  # UNIQUE_ID
        + tlv(0x20, b"\x01\0\0\0\0" + tlv(0x21, b"TLSv1.3"))  # SSL, with a sub-TLV
        + tlv(0xE0, b"")  # custom, empty
    )
    data = v2(0x21, 0x11, ipv4_block("203.0.113.7", "10.0.0.1", 51000, 443) + tlvs)
    header, consumed = read_all(data + AFTER, [5, 7, 3, 20, 100])
    assert consumed == len(data) == header.length
    assert header.version == 2 and header.command == "proxy"
    assert header.source == ("203.0.113.7", 51000)
    assert header.destination == ("10.0.0.1", 443)
    assert header.tlv(0x01) == b"h2"
    assert header.tlv(0x02) == b"broker.example"
    assert header.tlv(0x05) == b"id-42"
    assert header.tlv(0x20) == b"\x01\0\0\0\0" + tlv(0x21, b"TLSv1.3")
    assert header.tlv(0xE0) == b""
    assert header.tlv(0x30) is None
    assert [t for t, _ in header.tlvs] == [0x01, 0x02, 0x04, 0x05, 0x20, 0xE0]


def test_v2_tcp6_and_mapped() -> None:
    header = parse_proxy_header(v2(0x21, 0x21, ipv6_block("2001:db8::7", "2001:db8::1", 1, 2)))
    assert header.source == ("2001:db8::7", 1) and header.destination == ("2001:db8::1", 2)
    mapped = parse_proxy_header(v2(0x21, 0x21, ipv6_block("::ffff:192.0.2.9", "::1", 3, 4)))
    assert mapped.source == ("192.0.2.9", 3)


def test_v2_local_command_keeps_the_connection_address() -> None:
    # "The receiver must accept this connection as valid and must use the
    # real connection endpoints and discard the protocol block including the
    # family", and must skip `len` bytes even for LOCAL.
    for fam, payload in [
        (0x00, b""),
        (0x11, ipv4_block("192.0.2.1", "10.0.0.1", 1, 2) + tlv(0x04, b"")),
        (0x00, b"anything at all"),
    ]:
        data = v2(0x20, fam, payload)
        header, consumed = read_all(data + AFTER)
        assert header == ProxyHeader(2, "local", None, None, length=len(data))
        assert consumed == len(data)


@pytest.mark.parametrize(
    ("fam", "payload"),
    [
        (0x00, b""),  # AF_UNSPEC
        (0x10, b"\0" * 12),  # AF_INET, unspecified transport
        (0x12, ipv4_block("192.0.2.1", "10.0.0.1", 53, 53)),  # UDP over IPv4
        (0x22, ipv6_block("2001:db8::1", "2001:db8::2", 53, 53)),  # UDP over IPv6
        (0x31, b"/run/client.sock".ljust(108, b"\0") + b"/run/b.sock".ljust(108, b"\0")),
        (0x32, b"\0" * 216 + tlv(0x02, b"x")),  # UNIX datagram
    ],
)
def test_v2_unsupported_families_fall_back_to_the_connection_address(
    fam: int, payload: bytes
) -> None:
    # "A receiver is not required to implement other ones, provided that it
    # automatically falls back to the UNSPEC mode for the valid combinations".
    header = parse_proxy_header(v2(0x21, fam, payload) + AFTER)
    assert header.command == "proxy" and header.source is None
    assert header.length == 16 + len(payload)


def test_v2_crc32c() -> None:
    # RFC 3720 appendix B.4 check values, and the usual "123456789".
    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c(bytes(32)) == 0x8A9136AA
    assert crc32c(b"\xff" * 32) == 0x62A8AB43
    assert crc32c(bytes(range(32))) == 0x46DD794E
    # Built by the proxy-protocol package with the crc32c package (an
    # independent implementation): ALPN "h2" and a CRC32C TLV.
    independent = (
        b"\r\n\r\n\x00\r\nQUIT\n!\x11\x00\x18\x01\x02\x03\x04\x05\x06\x07\x08\x00\x05\x01\xbb"
        b"\x01\x00\x02h2\x03\x00\x04\xbe\xf8\xa6\xf9"
    )
    assert parse_proxy_header(independent).source == ("1.2.3.4", 5)
    corrupted = bytearray(independent)
    corrupted[19] ^= 1  # the source address
    with pytest.raises(ProxyProtocolError, match="CRC32C"):
        parse_proxy_header(bytes(corrupted))


def _with_crc(block: bytes) -> bytes:
    data = v2(0x21, 0x11, block + tlv(0x03, b"\0\0\0\0"))
    return data[:-4] + crc32c(data).to_bytes(4, "big")


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (v2(0x11, 0x11, bytes(12)), "version 1"),
        (v2(0x31, 0x11, bytes(12)), "version 3"),
        (v2(0x22, 0x11, bytes(12)), "command 0x2"),
        (v2(0x2F, 0x11, bytes(12)), "command 0xf"),
        (v2(0x21, 0x41, bytes(12)), "0x41 are not defined"),
        (v2(0x21, 0x13, bytes(12)), "0x13 are not defined"),
        (v2(0x21, 0x11, bytes(8)), "AF_INET address block needs 12 bytes, has 8"),
        (v2(0x21, 0x21, bytes(12)), "AF_INET6 address block needs 36 bytes, has 12"),
        (v2(0x21, 0x31, bytes(200)), "AF_UNIX address block needs 216"),
        (v2(0x21, 0x11, bytes(12) + b"\x01\x00"), "inside a TLV"),
        (v2(0x21, 0x11, bytes(12) + b"\x01\x00\x05abc"), "overruns the header"),
        (v2(0x21, 0x11, bytes(12) + tlv(0x03, b"\0\0")), "CRC32C TLV has 2 bytes"),
        (v2(0x21, 0x11, bytes(12) + tlv(0x03, bytes(4))), "fails its CRC32C"),
        (_with_crc(bytes(12) + tlv(0x03, bytes(4))), "two CRC32C"),
    ],
)
def test_v2_malformed(data: bytes, reason: str) -> None:
    with pytest.raises(ProxyProtocolError, match=reason):
        parse_proxy_header(data)


def test_v2_crc_helper_builds_a_valid_header() -> None:
    # The helper used above is itself right: one CRC TLV verifies.
    header = parse_proxy_header(_with_crc(ipv4_block("192.0.2.1", "10.0.0.1", 7, 8)))
    assert header.source == ("192.0.2.1", 7)


def test_v2_oversized_header_is_refused_before_its_payload_arrives() -> None:
    reader = ProxyHeaderReader()
    fixed = V2_SIGNATURE + b"\x21\x11" + (MAX_V2_PAYLOAD + 1).to_bytes(2, "big")
    with pytest.raises(ProxyProtocolError, match=f"at most {MAX_V2_PAYLOAD}"):
        reader.feed(fixed)
    # The largest accepted size is accepted.
    big = v2(0x21, 0x11, ipv4_block("192.0.2.1", "10.0.0.1", 1, 2) + tlv(0x04, b"\0" * 4081))
    assert len(big) == 16 + MAX_V2_PAYLOAD
    assert parse_proxy_header(big).source == ("192.0.2.1", 1)


# -- framing: truncation, pieces, what is not a header ------------------------------


@pytest.mark.parametrize(
    "data",
    [
        b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n",
        v2(0x21, 0x11, ipv4_block("192.0.2.1", "10.0.0.1", 1, 2) + tlv(0x01, b"h2")),
    ],
)
def test_truncated_header_waits_and_then_is_refused_as_truncated(data: bytes) -> None:
    for cut in range(len(data)):
        reader = ProxyHeaderReader()
        assert reader.feed(data[:cut]) == cut
        assert reader.header is None
        if cut:
            with pytest.raises(ProxyProtocolError, match="truncated"):
                parse_proxy_header(data[:cut])


@pytest.mark.parametrize(
    ("data", "at"),
    [
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", 1),  # a TLS ClientHello
        (b"GET /ws HTTP/1.1\r\n", 1),  # an HTTP request
        (b"PROXZ TCP4", 5),
        (b"\r\n\r\n\x00\r\nQUIZ\n!\x11\x00\x0c", 11),
        (b"\r\n\r\n", None),  # could still be v2: waits
    ],
)
def test_what_is_not_a_header_is_refused_as_soon_as_it_can_be_told(
    data: bytes, at: int | None
) -> None:
    reader = ProxyHeaderReader()
    for i in range(len(data)):
        if at is not None and i + 1 == at:
            with pytest.raises(ProxyProtocolError, match="does not start with a PROXY"):
                reader.feed(data[i : i + 1])
            return
        assert reader.feed(data[i : i + 1]) == 1
    assert at is None and reader.header is None


def test_wanted_never_reaches_past_the_header() -> None:
    reader = ProxyHeaderReader()
    assert reader.wanted == 16
    reader.feed(b"PROXY ")
    assert reader.wanted == MAX_V1_LENGTH - 6
    reader = ProxyHeaderReader()
    data = v2(0x21, 0x11, bytes(12) + tlv(0x01, b"h2"))
    reader.feed(data[:16])
    assert reader.wanted == len(data) - 16
    reader.feed(data[16:] + b"more")
    assert reader.header is not None and reader.wanted == 0
    assert reader.feed(b"later") == 0


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_any_split_gives_the_same_header_and_consumes_exactly_it(data: st.DataObject) -> None:
    wire = data.draw(
        st.sampled_from(
            [
                b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n",
                b"PROXY TCP6 2001:db8::1 ::1 1 2\r\n",
                b"PROXY UNKNOWN\r\n",
                v2(0x21, 0x11, ipv4_block("192.0.2.1", "10.0.0.1", 1, 2) + tlv(0x05, b"u")),
                v2(0x21, 0x21, ipv6_block("2001:db8::1", "::1", 1, 2)),
                v2(0x20, 0x00, b""),
            ]
        )
    )
    chunks = data.draw(st.lists(st.integers(1, 40), min_size=1, max_size=60))
    whole = parse_proxy_header(wire + AFTER)
    header, consumed = read_all(wire + AFTER, chunks)
    assert header == whole and consumed == len(wire)


@settings(max_examples=300, deadline=None)
@given(
    base=st.sampled_from(
        [
            b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n",
            v2(0x21, 0x11, ipv4_block("192.0.2.1", "10.0.0.1", 1, 2) + tlv(0x01, b"h2")),
        ]
    ),
    flips=st.lists(st.tuples(st.integers(0, 60), st.integers(0, 255)), max_size=4),
)
def test_mutated_headers_are_refused_or_parsed_never_crash(
    base: bytes, flips: list[tuple[int, int]]
) -> None:
    wire = bytearray(base + AFTER)
    for at, value in flips:
        wire[at % len(wire)] = value
    reader = ProxyHeaderReader()
    try:
        consumed = reader.feed(bytes(wire))
    except ProxyProtocolError:
        return
    if reader.header is None:
        assert consumed == len(wire)
    else:
        assert consumed == reader.header.length <= len(wire)


# -- differential: the proxy-protocol package builds, this reader reads -----------------

_ipv4 = st.integers(0, 2**32 - 1).map(IPv4Address)
_ipv6 = st.integers(0, 2**128 - 1).map(IPv6Address).filter(lambda ip: ip.ipv4_mapped is None)
_port = st.integers(0, 65535)
# TLV types the package treats as opaque bytes (not CRC32C, which needs the
# crc32c package, nor SSL, which it decodes).
_tlvs = st.dictionaries(
    st.sampled_from([0x01, 0x02, 0x04, 0x05, 0x30, 0xE0, 0xE5, 0xF0]),
    st.binary(max_size=40),
    max_size=4,
)


@settings(max_examples=200, deadline=None)
@given(
    v6=st.booleans(),
    data=st.data(),
    tlvs=_tlvs,
    version=st.sampled_from([1, 2]),
)
def test_differential_against_the_proxy_protocol_package(
    v6: bool, data: st.DataObject, tlvs: dict[int, bytes], version: int
) -> None:
    ips = _ipv6 if v6 else _ipv4
    src, dst = data.draw(ips), data.draw(ips)
    sport, dport = data.draw(_port), data.draw(_port)
    kind = ProxyResultIPv6 if v6 else ProxyResultIPv4
    tlv_block = ProxyProtocolTLV(init=tlvs) if version == 2 else ProxyProtocolTLV()
    result = kind((src, sport), (dst, dport), protocol=socket.SOCK_STREAM, tlv=tlv_block)  # type: ignore[arg-type]
    codec = ProxyProtocolV2() if version == 2 else ProxyProtocolV1()
    wire = codec.pack(result)
    ours = parse_proxy_header(wire + AFTER)
    assert ours.version == version and ours.length == len(wire)
    assert ours.source == (str(src), sport)
    assert ours.destination == (str(dst), dport)
    assert dict(ours.tlvs) == (tlvs if version == 2 else {})
    # And the package reads the same bytes the same way.
    theirs = codec.unpack(wire)
    assert (str(theirs.source[0]), theirs.source[1]) == ours.source  # type: ignore[index]


# -- forwarded headers ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "hops"),
    [
        # RFC 7239 section 4's examples.
        ('for="_gazonk"', [None]),
        ('For="[2001:db8:cafe::17]:4711"', [("2001:db8:cafe::17", 4711)]),
        ("for=192.0.2.60;proto=http;by=203.0.113.43", [("192.0.2.60", 0)]),
        ("for=192.0.2.43, for=198.51.100.17", [("192.0.2.43", 0), ("198.51.100.17", 0)]),
        # Section 6: node names and ports.
        ('for="192.0.2.43:47011"', [("192.0.2.43", 47011)]),
        ('for="[2001:db8:cafe::17]:47011"', [("2001:db8:cafe::17", 47011)]),
        ('for="_hidden", for="_SEVKISEK"', [None, None]),
        ('for="192.0.2.43:_port"', [("192.0.2.43", 0)]),
        # Section 7.1: the lists of several proxies.
        (
            'for=192.0.2.43,for="[2001:db8:cafe::17]",for=unknown',
            [("192.0.2.43", 0), ("2001:db8:cafe::17", 0), None],
        ),
        # An element without for, empty elements, quoted pairs, case.
        ("proto=https;by=10.0.0.1, , for=192.0.2.1", [None, ("192.0.2.1", 0)]),
        ('FOR="\\1\\92.0.2.1" ; Proto=https', [("192.0.2.1", 0)]),
        ("", []),
    ],
)
def test_forwarded_rfc7239_examples(value: str, hops: list[tuple[str, int] | None]) -> None:
    assert parse_forwarded(value) == hops


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ('for="192.0.2.1', "unterminated"),
        ('for="192.0.2.1\\', "unterminated"),
        ("for", "expected name=value"),
        ("for=", "expected a token"),
        ("=192.0.2.1", "expected name=value"),
        ("for=[2001:db8::1]", "expected a token"),  # IPv6 must be quoted
        ("for=192.0.2.1;for=192.0.2.2", "twice"),
        ("for=192.0.2.1 by=10.0.0.1", "unexpected 'b'"),
        ('for="192.0.2.1"x', "unexpected 'x'"),
    ],
)
def test_forwarded_malformed(value: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        parse_forwarded(value)


def test_forwarded_and_x_forwarded_for_agree() -> None:
    # RFC 7239 section 7.4, the transition example.
    assert parse_x_forwarded_for("192.0.2.43, 2001:db8:cafe::17") == parse_forwarded(
        'for=192.0.2.43, for="[2001:db8:cafe::17]"'
    )


@pytest.mark.parametrize(
    ("text", "node"),
    [
        ("203.0.113.7", ("203.0.113.7", 0)),
        (" 203.0.113.7 ", ("203.0.113.7", 0)),
        ("203.0.113.7:5555", ("203.0.113.7", 5555)),
        ("2001:DB8::1", ("2001:db8::1", 0)),
        ("[2001:db8::1]", ("2001:db8::1", 0)),
        ("[2001:db8::1]:443", ("2001:db8::1", 443)),
        ("::ffff:203.0.113.7", ("203.0.113.7", 0)),
        ("unknown", None),
        ("_hidden", None),
        ("", None),
        ("203.0.113.7:99999", None),
        ("203.0.113.7:", None),
        ("[2001:db8::1", None),
        ("[2001:db8::1]x", None),
        ("[203.0.113.7]", None),
        ("fe80::1%eth0", None),
        ("example.com", None),
        ("203.0.113.07", None),  # heading zero: octal to some parsers
        ("256.0.113.7", None),
        ("203.0.113", None),
        ("\uff11.2.3.4", None),  # a fullwidth digit
    ],
)
def test_parse_node(text: str, node: tuple[str, int] | None) -> None:
    assert parse_node(text) == node


def test_x_forwarded_for_list() -> None:
    assert parse_x_forwarded_for("203.0.113.7, unknown,, 10.0.0.2:80") == [
        ("203.0.113.7", 0),
        None,
        ("10.0.0.2", 80),
    ]


TRUSTED = TrustedProxies(["10.0.0.0/24", "127.0.0.1", "2001:db8:ffff::/48"])
NGINX = ("10.0.0.2", 50000)


@pytest.mark.parametrize(
    ("chain", "client"),
    [
        ([], NGINX),
        ([("203.0.113.7", 0)], ("203.0.113.7", 0)),
        # The client wrote the left part: only what trusted proxies appended counts.
        ([("6.6.6.6", 0), ("203.0.113.7", 0)], ("203.0.113.7", 0)),
        ([("203.0.113.7", 0), ("10.0.0.9", 0)], ("203.0.113.7", 0)),
        ([("6.6.6.6", 0), ("203.0.113.7", 0), ("10.0.0.9", 0)], ("203.0.113.7", 0)),
        # Every hop trusted: the left-most.
        ([("127.0.0.1", 0), ("10.0.0.9", 0)], ("127.0.0.1", 0)),
        # A hop that is not an address stops the walk at the proxy that wrote it.
        ([("203.0.113.7", 0), None], NGINX),
        ([("203.0.113.7", 0), None, ("10.0.0.9", 0)], ("10.0.0.9", 0)),
        ([("2001:db8:ffff::1", 0), ("2001:db8::7", 0)], ("2001:db8::7", 0)),
    ],
)
def test_resolve_client(chain: list[tuple[str, int] | None], client: tuple[str, int]) -> None:
    assert resolve_client(NGINX, chain, TRUSTED) == client


def test_forwarded_client() -> None:
    assert forwarded_client("x-forwarded-for", [], NGINX, TRUSTED) is None
    assert forwarded_client("none", ["203.0.113.7"], NGINX, TRUSTED) is None
    # Several header lines are one list, in order.
    lines = ["6.6.6.6", "203.0.113.7, 10.0.0.9"]
    assert forwarded_client("x-forwarded-for", lines, NGINX, TRUSTED) == ("203.0.113.7", 0)
    assert forwarded_client("forwarded", ['for="[2001:db8::7]:1"'], NGINX, TRUSTED) == (
        "2001:db8::7",
        1,
    )
    # A Forwarded value that does not parse names nobody beyond the proxy.
    assert forwarded_client("forwarded", ['for="203.0.113.7'], NGINX, TRUSTED) == NGINX


def test_trusted_proxies() -> None:
    assert "10.0.0.255" in TRUSTED and "10.0.1.0" not in TRUSTED
    assert "127.0.0.1" in TRUSTED and "127.0.0.2" not in TRUSTED
    assert "::ffff:10.0.0.3" in TRUSTED  # IPv4-mapped
    assert "2001:db8:ffff:1::1" in TRUSTED and "2001:db8::1" not in TRUSTED
    assert "not an address" not in TRUSTED
    assert 17 not in TRUSTED
    assert not TrustedProxies() and "127.0.0.1" not in TrustedProxies()
    assert TRUSTED
    # Answers are remembered for a bounded number of addresses, and stay right.
    trusted = TrustedProxies(["10.0.0.0/8"])
    for i in range(10_000):
        assert (f"10.0.{i // 256}.{i % 256}" in trusted) is True
        assert (f"11.0.{i // 256}.{i % 256}" in trusted) is False
    assert len(trusted._known) <= 4096


def test_check_network_reasons() -> None:
    assert str(check_network("10.0.0.5")) == "10.0.0.5/32"
    with pytest.raises(
        ValueError, match=re.escape("has host bits set; did you mean '10.0.0.0/24'?")
    ):
        check_network("10.0.0.1/24")
    with pytest.raises(ValueError, match="is not an IP address or network"):
        check_network("proxy.internal")


@pytest.mark.parametrize(
    ("listener", "key", "reason"),
    [
        ({"trusted_proxies": ["127.0.0.1", "10.0.0.1/24"]}, "listener.trusted_proxies[1]", "host bits"),
        ({"trusted_proxies": ["nginx"]}, "listener.trusted_proxies[0]", "not an IP address"),
        ({"trusted_proxies": "127.0.0.1"}, "listener.trusted_proxies", "expected an array"),
        ({"proxy_protocol": True}, "listener.proxy_protocol", "needs trusted_proxies"),
        ({"forwarded_header": "x-real-ip"}, "listener.forwarded_header", "must be one of"),
    ],
)  # fmt: skip
def test_config_errors_name_the_key(listener: dict[str, object], key: str, reason: str) -> None:
    with pytest.raises(ConfigError) as e:
        config_from_dict({"listener": listener})
    assert e.value.key == key and reason in e.value.reason


def test_config_accepts_proxies() -> None:
    cfg = config_from_dict(
        {
            "listener": {
                "trusted_proxies": ["127.0.0.1", "10.0.0.0/8", "::1"],
                "proxy_protocol": True,
                "forwarded_header": "forwarded",
            }
        }
    )
    assert cfg.listener.trusted_proxies == ("127.0.0.1", "10.0.0.0/8", "::1")
    assert cfg.listener.proxy_protocol and cfg.listener.forwarded_header == "forwarded"
