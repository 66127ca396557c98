"""Behind a proxy: who the client is, from the PROXY protocol or a forwarded header.

A proxy in front of the broker (nginx, HAProxy, a cloud load balancer) hides
the client's address: the broker's TCP peer is the proxy. Proxies tell the
address in one of two ways, both parsed here, sans-I/O:

* **The PROXY protocol** (HAProxy's, versions 1 and 2): a header the proxy
  writes at the very start of the TCP connection, before anything the
  client sent (so before the TLS ClientHello too). :class:`ProxyHeaderReader`
  is fed bytes and consumes exactly the header's: what follows belongs to
  TLS or HTTP. Reference: HAProxy's ``doc/proxy-protocol.txt``.
* **A forwarded header** in the HTTP request: ``X-Forwarded-For`` (a list of
  addresses) or ``Forwarded`` (RFC 7239, ``for=`` parameters). Each proxy
  appends the address it received the request from, so the list ends with
  the most recent hops, and anything to their left may have been written by
  the client itself. :func:`resolve_client` therefore walks the list from
  the right, past the trusted proxies, and takes the first address that is
  not one.

Either is believed only from the peers in ``[listener] trusted_proxies``
(:class:`TrustedProxies`); :mod:`broker.server.broker` applies them.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final, Literal

__all__ = [
    "MAX_V1_LENGTH",
    "MAX_V2_PAYLOAD",
    "V2_SIGNATURE",
    "Address",
    "ForwardedHeader",
    "ProxyHeader",
    "ProxyHeaderReader",
    "ProxyProtocolError",
    "TrustedProxies",
    "check_network",
    "crc32c",
    "forwarded_client",
    "parse_forwarded",
    "parse_node",
    "parse_proxy_header",
    "parse_x_forwarded_for",
    "resolve_client",
]

#: (IP address, port); the port is 0 where the proxy did not tell it.
Address = tuple[str, int]

#: The request headers a proxy may name the client in (``[listener] forwarded_header``).
ForwardedHeader = Literal["x-forwarded-for", "forwarded", "none"]

#: The first 12 bytes of a version 2 header.
V2_SIGNATURE: Final = b"\r\n\r\n\x00\r\nQUIT\n"
#: A version 1 header starts with these 6 bytes.
V1_PREFIX: Final = b"PROXY "
#: Longest version 1 line, CRLF included (the spec's worst case).
MAX_V1_LENGTH: Final = 107
#: Fixed part of a version 2 header: signature, version and command,
#: family and transport, length.
V2_FIXED: Final = 16
#: Most bytes after the fixed part of a version 2 header (address block and
#: TLVs) that the broker accepts; the spec allows 65,535, senders use far
#: fewer (an AF_UNIX address block, the largest, is 216).
MAX_V2_PAYLOAD: Final = 4096

#: TLV types (section 2.2 of the spec).
PP2_TYPE_CRC32C: Final = 0x03

_LOCAL: Final = 0x0
_PROXY: Final = 0x1
#: Address block length per family (AF_INET, AF_INET6, AF_UNIX).
_ADDRESS_LENGTH: Final = {0x1: 12, 0x2: 36, 0x3: 216}
_FAMILY_NAMES: Final = {0x0: "AF_UNSPEC", 0x1: "AF_INET", 0x2: "AF_INET6", 0x3: "AF_UNIX"}

_V1_IPV4: Final = re.compile(r"(?:0|[1-9][0-9]{0,2})(?:\.(?:0|[1-9][0-9]{0,2})){3}")
_V1_IPV6: Final = re.compile(r"[0-9A-Fa-f:.]+")
_V1_PORT: Final = re.compile(r"0|[1-9][0-9]{0,4}")


class ProxyProtocolError(ValueError):
    """Not a valid PROXY protocol header: the connection must be dropped."""


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """A PROXY protocol header.

    Attributes:
        version: 1 (text) or 2 (binary).
        command: ``"proxy"``, a connection relayed for a client, or
            ``"local"`` (version 2 only), one the proxy opened for itself
            (a health check).
        source: the client's (address, port); None when the header gives
            none to use (``LOCAL``, ``UNKNOWN``, ``AF_UNSPEC``, ``AF_UNIX``,
            UDP): the connection's own peer address applies then.
        destination: the address the client connected to, when given.
        tlvs: version 2 type-length-value extensions, (type, value), in
            order.
        length: the header's size in bytes.
    """

    version: Literal[1, 2]
    command: Literal["proxy", "local"]
    source: Address | None
    destination: Address | None
    tlvs: tuple[tuple[int, bytes], ...] = ()
    length: int = 0

    def tlv(self, kind: int) -> bytes | None:
        """The value of the first TLV of type *kind*, if any."""
        for t, value in self.tlvs:
            if t == kind:
                return value
        return None


class ProxyHeaderReader:
    """Reads one PROXY protocol header (version 1 or 2) from the bytes fed to it.

    :meth:`feed` consumes only the header's bytes and says how many it
    took: the caller peeks at the socket (``MSG_PEEK``), feeds what it saw,
    then removes the consumed bytes from the socket, so that what follows
    the header stays there for TLS or HTTP. Bytes may come in any pieces.
    Anything that is not a valid header raises :exc:`ProxyProtocolError` as
    soon as it can be told (a TLS ClientHello or an HTTP request at the
    first byte).
    """

    __slots__ = ("_buffer", "header")

    def __init__(self) -> None:
        self._buffer = bytearray()
        #: The header, once complete.
        self.header: ProxyHeader | None = None

    @property
    def wanted(self) -> int:
        """Most bytes that may still belong to the header: how much to peek at."""
        buf = self._buffer
        n = len(buf)
        if self.header is not None:
            return 0
        if n >= V2_FIXED and buf.startswith(V2_SIGNATURE):
            return V2_FIXED + int.from_bytes(buf[14:16], "big") - n
        if n >= len(V1_PREFIX) and buf.startswith(V1_PREFIX):
            return MAX_V1_LENGTH - n
        return V2_FIXED - n

    def feed(self, data: bytes | bytearray | memoryview) -> int:
        """Take *data*; return how many of its bytes belong to the header.

        Once the header is complete (:attr:`header` is set), the bytes after
        it are not consumed; until then, every byte fed is.

        Raises:
            ProxyProtocolError: the bytes are not a valid header.
        """
        if self.header is not None:
            return 0
        before = len(self._buffer)
        self._buffer += data
        header = self._parse()
        if header is None:
            return len(data)
        self.header = header
        del self._buffer[header.length :]
        return header.length - before

    def _parse(self) -> ProxyHeader | None:
        buf = self._buffer
        k = min(len(buf), len(V1_PREFIX))
        if buf[:k] == V1_PREFIX[:k]:
            return _parse_v1(buf) if len(buf) > k else None
        k = min(len(buf), len(V2_SIGNATURE))
        if buf[:k] == V2_SIGNATURE[:k]:
            return _parse_v2(buf)
        raise ProxyProtocolError("the connection does not start with a PROXY protocol header")


def parse_proxy_header(data: bytes) -> ProxyHeader:
    """The header at the start of *data*, which must hold all of it.

    Raises:
        ProxyProtocolError: invalid, or truncated.
    """
    reader = ProxyHeaderReader()
    reader.feed(data)
    if reader.header is None:
        raise ProxyProtocolError("truncated PROXY protocol header")
    return reader.header


# -- version 1: one line of text ------------------------------------------------------


def _parse_v1(buf: bytearray) -> ProxyHeader | None:
    lf = buf.find(b"\n")
    if lf < 0:
        cr = buf.find(b"\r")
        if 0 <= cr < len(buf) - 1:
            raise ProxyProtocolError("PROXY v1 line has a CR not followed by LF")
        if len(buf) >= MAX_V1_LENGTH:
            raise ProxyProtocolError(
                f"PROXY v1 line has no CRLF in its first {MAX_V1_LENGTH} bytes"
            )
        return None
    if lf + 1 > MAX_V1_LENGTH:
        raise ProxyProtocolError(f"PROXY v1 line has no CRLF in its first {MAX_V1_LENGTH} bytes")
    if buf[lf - 1] != 0x0D:
        raise ProxyProtocolError("PROXY v1 line ends with LF without CR")
    raw = bytes(buf[: lf - 1])
    if b"\r" in raw:
        raise ProxyProtocolError("PROXY v1 line has a CR not followed by LF")
    try:
        line = raw.decode("ascii")
    except UnicodeDecodeError:
        raise ProxyProtocolError("PROXY v1 line is not US-ASCII") from None
    parts = line.split(" ")
    protocol = parts[1]
    if protocol == "UNKNOWN":
        # The rest of the line, if any, is to be ignored (section 2.1).
        return ProxyHeader(1, "proxy", None, None, length=lf + 1)
    if protocol not in ("TCP4", "TCP6"):
        raise ProxyProtocolError(f"PROXY v1 protocol {protocol!r} is not TCP4, TCP6 or UNKNOWN")
    if len(parts) != 6:
        raise ProxyProtocolError(
            f"PROXY v1 line is not 'PROXY {protocol} SOURCE DESTINATION SPORT DPORT'"
        )
    source = (_v1_ip(parts[2], protocol), _v1_port(parts[4]))
    destination = (_v1_ip(parts[3], protocol), _v1_port(parts[5]))
    return ProxyHeader(1, "proxy", source, destination, length=lf + 1)


def _v1_ip(text: str, protocol: str) -> str:
    try:
        if protocol == "TCP4":
            if _dotted_quad(text) is None:
                raise ValueError
            return text
        if not _V1_IPV6.fullmatch(text) or ":" not in text:
            raise ValueError
        return _canonical(ipaddress.IPv6Address(text))
    except ValueError:
        family = "IPv4" if protocol == "TCP4" else "IPv6"
        raise ProxyProtocolError(f"PROXY v1 {protocol} address {text!r} is not {family}") from None


def _dotted_quad(text: str) -> str | None:
    """*text* if it is an IPv4 address in canonical dotted-quad form (four
    numbers up to 255, no heading zeros), else None. Much cheaper than
    :class:`ipaddress.IPv4Address`, on the path of every connection."""
    if _V1_IPV4.fullmatch(text) and all(int(part) <= 255 for part in text.split(".")):
        return text
    return None


def _v1_port(text: str) -> int:
    if not _V1_PORT.fullmatch(text) or int(text) > 65535:
        raise ProxyProtocolError(f"PROXY v1 port {text!r} is not a number from 0 to 65535")
    return int(text)


# -- version 2: binary -------------------------------------------------------------------


def _parse_v2(buf: bytearray) -> ProxyHeader | None:
    if len(buf) < V2_FIXED:
        return None
    version, command = buf[12] >> 4, buf[12] & 0xF
    family, transport = buf[13] >> 4, buf[13] & 0xF
    size = int.from_bytes(buf[14:16], "big")
    if version != 2:
        raise ProxyProtocolError(f"PROXY protocol version {version} (after the v2 signature)")
    if command not in (_LOCAL, _PROXY):
        raise ProxyProtocolError(f"PROXY v2 command {command:#x} is neither LOCAL nor PROXY")
    if family > 0x3 or transport > 0x2:
        raise ProxyProtocolError(f"PROXY v2 family and transport {buf[13]:#04x} are not defined")
    if size > MAX_V2_PAYLOAD:
        raise ProxyProtocolError(
            f"PROXY v2 header announces {size} bytes after its first 16; "
            f"at most {MAX_V2_PAYLOAD} are accepted"
        )
    end = V2_FIXED + size
    if len(buf) < end:
        return None
    header = bytes(buf[:end])
    if command == _LOCAL:
        # The proxy's own connection (a health check): the address block
        # and all that follows are to be ignored (section 2.2).
        return ProxyHeader(2, "local", None, None, length=end)
    if family == 0x0 or transport == 0x0:
        # AF_UNSPEC or an unspecified transport: no address to use.
        return ProxyHeader(2, "proxy", None, None, length=end)
    need = _ADDRESS_LENGTH[family]
    if size < need:
        raise ProxyProtocolError(
            f"PROXY v2 {_FAMILY_NAMES[family]} address block needs {need} bytes, has {size}"
        )
    tlvs = _tlvs(header, V2_FIXED + need)
    source = destination = None
    if transport == 0x1 and family in (0x1, 0x2):  # TCP over IPv4 or IPv6
        n = 4 if family == 0x1 else 16
        block = header[V2_FIXED : V2_FIXED + need]
        ports = block[2 * n :]
        source = (_packed_ip(block[:n]), int.from_bytes(ports[0:2], "big"))
        destination = (_packed_ip(block[n : 2 * n]), int.from_bytes(ports[2:4], "big"))
    # UDP and AF_UNIX fall back to the connection's own address, as the
    # spec asks of a receiver that does not support them.
    return ProxyHeader(2, "proxy", source, destination, tlvs, end)


def _packed_ip(packed: bytes) -> str:
    return _canonical(ipaddress.ip_address(packed))


def _tlvs(header: bytes, start: int) -> tuple[tuple[int, bytes], ...]:
    """The TLVs from *start* to the end of *header*; checks a CRC32C TLV."""
    found: list[tuple[int, bytes]] = []
    crc_at: int | None = None
    i = start
    while i < len(header):
        if len(header) - i < 3:
            raise ProxyProtocolError("PROXY v2 header ends inside a TLV's type and length")
        kind = header[i]
        n = int.from_bytes(header[i + 1 : i + 3], "big")
        if i + 3 + n > len(header):
            raise ProxyProtocolError(f"PROXY v2 TLV {kind:#04x} of {n} bytes overruns the header")
        if kind == PP2_TYPE_CRC32C:
            if n != 4:
                raise ProxyProtocolError(f"PROXY v2 CRC32C TLV has {n} bytes instead of 4")
            if crc_at is not None:
                raise ProxyProtocolError("PROXY v2 header has two CRC32C TLVs")
            crc_at = i + 3
        found.append((kind, header[i + 3 : i + 3 + n]))
        i += 3 + n
    if crc_at is not None:
        expected = int.from_bytes(header[crc_at : crc_at + 4], "big")
        zeroed = header[:crc_at] + b"\0\0\0\0" + header[crc_at + 4 :]
        if crc32c(zeroed) != expected:
            raise ProxyProtocolError("PROXY v2 header fails its CRC32C checksum")
    return tuple(found)


def _crc32c_table() -> tuple[int, ...]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return tuple(table)


_CRC32C_TABLE: Final = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli, RFC 4960 appendix B) of *data*."""
    crc = 0xFFFFFFFF
    table = _CRC32C_TABLE
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


# -- trusted proxies ----------------------------------------------------------------------


def check_network(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """``[listener] trusted_proxies`` entry: an address or a network.

    Raises:
        ValueError: with a reason fit for a configuration error.
    """
    try:
        return ipaddress.ip_network(text)
    except ValueError as e:
        if "host bits set" in str(e):
            fixed = ipaddress.ip_network(text, strict=False)
            raise ValueError(f"{text!r} has host bits set; did you mean {str(fixed)!r}?") from None
        raise ValueError(
            f'{text!r} is not an IP address or network (e.g. "10.0.0.5" or "10.0.0.0/24")'
        ) from None


class TrustedProxies:
    """The addresses whose PROXY headers and forwarded headers are believed.

    ``address in trusted`` for an address string; an IPv4-mapped IPv6
    address (``::ffff:10.0.0.5``) is checked as the IPv4 address it maps.
    """

    __slots__ = ("_known", "_networks")

    def __init__(self, entries: Iterable[str] = ()) -> None:
        self._networks = tuple(check_network(e) for e in entries)
        #: Answers already given (parsing an address costs microseconds,
        #: and the same few proxies connect again and again).
        self._known: dict[str, bool] = {}

    def __bool__(self) -> bool:
        return bool(self._networks)

    def __contains__(self, address: object) -> bool:
        if not self._networks or not isinstance(address, str):
            return False
        known = self._known.get(address)
        if known is None:
            if len(self._known) >= _KNOWN_ADDRESSES:
                self._known.clear()
            known = self._known[address] = self._match(address)
        return known

    def _match(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in network for network in self._networks)


#: Most addresses a TrustedProxies remembers its answer for.
_KNOWN_ADDRESSES: Final = 4096


# -- forwarded headers ------------------------------------------------------------------


def _canonical(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


def _port(text: str) -> int | None:
    """A port (or an RFC 7239 obfuscated one, ``_x``, as 0); None if neither."""
    if text.isascii() and text.isdigit() and len(text) <= 5 and int(text) <= 65535:
        return int(text)
    if _OBFUSCATED.fullmatch(text):
        return 0
    return None


_OBFUSCATED: Final = re.compile(r"_[A-Za-z0-9._-]+")


def parse_node(text: str) -> Address | None:
    """An address as proxies write it, canonical; None if it is not one.

    Accepts ``192.0.2.1``, ``192.0.2.1:8080``, ``2001:db8::1``,
    ``[2001:db8::1]`` and ``[2001:db8::1]:8080`` (the port is 0 when
    absent or obfuscated); ``unknown``, an obfuscated name (``_hidden``)
    and anything else give None.
    """
    text = text.strip()
    port = 0
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            return None
        host, rest = text[1:end], text[end + 1 :]
        if rest:
            p = _port(rest[1:]) if rest.startswith(":") else None
            if p is None:
                return None
            port = p
        if ":" not in host:
            return None
    elif text.count(":") == 1:
        host, _, rest = text.partition(":")
        p = _port(rest)
        if p is None:
            return None
        port = p
    else:
        host = text
    if "%" in host or not host.isascii():
        return None
    if "." in host and ":" not in host:
        quad = _dotted_quad(host)
        return (quad, port) if quad is not None else None
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    return (_canonical(ip), port)


def parse_x_forwarded_for(value: str) -> list[Address | None]:
    """The hops of an ``X-Forwarded-For`` value, left (the first) to right.

    Empty list items are skipped; an item that is not an address is None.
    """
    return [parse_node(item) for item in value.split(",") if item.strip()]


_TCHAR: Final = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


def parse_forwarded(value: str) -> list[Address | None]:
    """The ``for=`` of each element of a ``Forwarded`` value (RFC 7239), left to right.

    An element without ``for``, or whose ``for`` is not an address
    (``unknown``, ``"_hidden"``), is None.

    Raises:
        ValueError: the value does not follow RFC 7239's grammar (an
            unterminated quoted string, a parameter without ``=``, an
            unquoted IPv6 address, a parameter given twice in an element).
    """
    hops: list[Address | None] = []
    element: dict[str, str] = {}
    i, n = 0, len(value)

    def close_element() -> None:
        if element:  # empty list elements are ignored (RFC 9110 section 5.6.1)
            node = element.get("for")
            hops.append(parse_node(node) if node is not None else None)
            element.clear()

    while True:
        while i < n and value[i] in " \t":
            i += 1
        if i == n:
            close_element()
            return hops
        if value[i] == ",":
            close_element()
            i += 1
            continue
        if value[i] == ";":
            i += 1
            continue
        name = _TCHAR.match(value, i)
        if name is None or name.end() >= n or value[name.end()] != "=":
            raise ValueError(f"expected name=value at offset {i}")
        i = name.end() + 1
        if i < n and value[i] == '"':
            i += 1
            chars: list[str] = []
            while True:
                if i >= n:
                    raise ValueError("unterminated quoted string")
                c = value[i]
                if c == '"':
                    i += 1
                    break
                if c == "\\":
                    if i + 1 >= n:
                        raise ValueError("unterminated quoted string")
                    c = value[i + 1]
                    i += 1
                chars.append(c)
                i += 1
            text = "".join(chars)
        else:
            token = _TCHAR.match(value, i)
            if token is None:
                raise ValueError(f"expected a token or a quoted string at offset {i}")
            text = token.group()
            i = token.end()
        key = name.group().lower()
        if key in element:
            raise ValueError(f"parameter {key!r} twice in one element")
        element[key] = text
        while i < n and value[i] in " \t":
            i += 1
        if i < n and value[i] not in ",;":
            raise ValueError(f"unexpected {value[i]!r} at offset {i}")


def resolve_client(
    hop: Address, chain: Sequence[Address | None], trusted: TrustedProxies
) -> Address:
    """The client's address: the right-most hop of *chain* that is not a trusted proxy.

    *hop* is the address the request came from (a trusted proxy); *chain*
    is what the forwarded header lists, left to right. Walking from the
    right, each trusted proxy hands over to the hop on its left: the first
    address that is not trusted is the client (what is further left may be
    the client's own invention). If every hop is trusted, the left-most is
    the client; a hop that is not an address (``unknown``, obfuscated,
    garbled) ends the walk at the trusted proxy that wrote it.
    """
    client = hop
    for node in reversed(chain):
        if node is None:
            return client
        client = node
        if node[0] not in trusted:
            return client
    return client


def forwarded_client(
    header: ForwardedHeader, values: Sequence[str], hop: Address, trusted: TrustedProxies
) -> Address | None:
    """The client named by *header* (its *values*, one per header line, in
    order) on a request from the trusted *hop*; None when the request has no
    such header (or *header* is ``"none"``).

    A ``Forwarded`` value that does not parse names no one beyond *hop*: the
    result is *hop*.
    """
    if header == "none" or not values:
        return None
    joined = ", ".join(values)
    if header == "x-forwarded-for":
        return resolve_client(hop, parse_x_forwarded_for(joined), trusted)
    try:
        chain = parse_forwarded(joined)
    except ValueError:
        return hop
    return resolve_client(hop, chain, trusted)
