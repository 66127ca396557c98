"""The hand-written opening handshake (broker/core/handshake.py) against h11
plus wsproto's handshake rules, on generated requests.

Hypothesis builds requests from parts: the method, the HTTP version, the
target, and header fields (``Host``, ``Upgrade``, ``Connection``,
``Sec-WebSocket-Key``, ``Sec-WebSocket-Version``, ``Sec-WebSocket-Protocol``
and others) each absent, present or repeated, with valid and invalid values,
token lists, names in any case, in any order. The reference decision is
wsproto's server-side handshake (over h11) on the same request, with the
rules where the broker deliberately differs, each with its reason:

Where the broker is stricter (it refuses, wsproto accepts):

- HTTP/1.0: RFC 6455 section 4.1 requires HTTP/1.1 or higher;
- a target neither in origin-form nor an absolute ``http(s)`` URI (``*``,
  ``host:443``, a fragment): RFC 9112 section 3.2, and the broker compares
  the path as sent;
- ``Content-Length`` or ``Transfer-Encoding``: a body would be read as
  WebSocket frames;
- a ``Sec-WebSocket-Key`` that is not the base64 of 16 bytes (RFC 6455
  section 4.2.1 point 5; wsproto takes any value).

Where wsproto reads a repeated field as its last occurrence and the broker
as the list of all of them (RFC 9110 section 5.3: repeated fields combine
into one comma-separated list), the reference gets the request with those
fields combined (so ``Connection: keep-alive`` then ``Connection: Upgrade``
is an upgrade, and two ``Sec-WebSocket-Version: 13`` are ``13, 13``, not
13). And ``Upgrade`` is a list of protocols (RFC 9110 section 7.8; RFC 6455
section 4.1: its value "MUST include" ``websocket``), where wsproto wants
exactly ``websocket``: the reference gets ``Upgrade: websocket`` when the
list holds it.

(And wsproto keeps the empty elements of ``a,,b`` in the offered
subprotocols, where RFC 9110 section 5.6.1 has a recipient ignore them: the
reference drops them.)

For every request the decision (upgrade or refuse) must be the same, fed
in one piece or split anywhere; for an accepted one, the
``Sec-WebSocket-Accept`` must be wsproto's (and RFC 6455's SHA-1 of the key
and the GUID) and the offered subprotocols the same.

And the parser's reader for plain requests (no h11) against its h11 path,
on the same requests and on their bytes changed (line ends, control and
non-ASCII bytes, folded lines, a second ``Host``, a body's fields, a head
limit just under the request's size): the same request or the same refusal.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import itertools
from dataclasses import dataclass

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, Request
from wsproto.utilities import RemoteProtocolError

from broker.core.handshake import (
    MAX_REQUEST_HEAD,
    HandshakeError,
    HandshakeParser,
    NotAnUpgrade,
    UpgradeRequest,
    _parse_plain,
    accept_response,
    origin_form,
)

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

#: Fields whose repetitions wsproto reads as the last one only.
LIST_FIELDS = frozenset(
    {
        "connection",
        "upgrade",
        "sec-websocket-key",
        "sec-websocket-version",
        "sec-websocket-protocol",
    }
)


@dataclass(frozen=True)
class Generated:
    method: str
    version: str
    target: str
    #: (name as sent, value), in order.
    fields: tuple[tuple[str, str], ...]

    def render(self, fields: tuple[tuple[str, str], ...] | None = None) -> bytes:
        lines = [f"{self.method} {self.target} HTTP/{self.version}"]
        lines += [f"{name}: {value}" for name, value in (self.fields if fields is None else fields)]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def values(self, name: str) -> list[str]:
        return [v for n, v in self.fields if n.lower() == name]


# -- the reference: wsproto (over h11), and the documented differences ---------------


def tokens(value: str) -> list[str]:
    return [t.strip().lower() for t in value.split(",") if t.strip()]


def combined(request: Generated) -> tuple[tuple[str, str], ...]:
    """The fields as RFC 9110 5.3 reads them: each repeated list field
    combined into one, at its first place; ``Upgrade`` as a list."""
    out: list[tuple[str, str]] = []
    seen: set[str] = set()
    for name, value in request.fields:
        key = name.lower()
        if key not in LIST_FIELDS:
            out.append((name, value))
        elif key not in seen:
            seen.add(key)
            joined = ", ".join(request.values(key))
            if key == "upgrade" and "websocket" in tokens(joined):
                joined = "websocket"
            out.append((name, joined))
    return tuple(out)


@dataclass(frozen=True)
class Decision:
    accepted: bool
    accept_token: bytes | None = None
    subprotocols: tuple[str, ...] = ()


def response_header(response: bytes, name: bytes) -> bytes:
    for line in response.split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == name.lower():
            return value.strip()
    raise AssertionError(f"no {name!r} in {response!r}")


def wsproto_decision(data: bytes) -> Decision:
    server = WSConnection(ConnectionType.SERVER)
    try:
        server.receive_data(data)
        events = list(server.events())
    except (RemoteProtocolError, UnicodeError):
        return Decision(False)
    requests = [e for e in events if isinstance(e, Request)]
    if not requests:
        return Decision(False)
    response = server.send(AcceptConnection())
    return Decision(
        True,
        response_header(response, b"Sec-WebSocket-Accept"),
        # wsproto keeps the empty elements of "a,,b"; RFC 9110 5.6.1: a
        # recipient ignores them.
        tuple(p for p in requests[0].subprotocols if p),
    )


def broker_rules(request: Generated) -> bool:
    """The broker's own, stricter rules (see the module doc)."""
    if request.version != "1.1":
        return False
    if origin_form(request.target) is None:
        return False
    if request.values("content-length") or request.values("transfer-encoding"):
        return False
    try:
        key = base64.b64decode(", ".join(request.values("sec-websocket-key")), validate=True)
    except (ValueError, binascii.Error):
        return False
    return len(key) == 16


def reference(request: Generated) -> Decision:
    decision = wsproto_decision(request.render(combined(request)))
    if decision.accepted and not broker_rules(request):
        return Decision(False)
    return decision


def broker_decision(data: bytes, splits: list[int]) -> Decision:
    parser = HandshakeParser()
    cuts = sorted({0, len(data), *(s for s in splits if 0 < s < len(data))})
    request: UpgradeRequest | None = None
    try:
        for start, end in itertools.pairwise(cuts):
            request = parser.feed(data[start:end])
            if request is not None:
                break
    except HandshakeError:
        return Decision(False)
    assert request is not None, "a complete head, but no decision"
    token = response_header(accept_response(request.key, None), b"Sec-WebSocket-Accept")
    return Decision(True, token, request.subprotocols)


# -- generated requests ----------------------------------------------------------------


def any_case(draw: st.DrawFn, name: str) -> str:
    """*name* with each letter in either case."""
    mask = draw(st.integers(min_value=0, max_value=(1 << len(name)) - 1))
    return "".join(c.upper() if mask >> i & 1 else c.lower() for i, c in enumerate(name))


def token_list(choices: list[str]) -> st.SearchStrategy[str]:
    """1 to 3 tokens, with the separators clients use (and some they should not)."""
    return st.builds(
        lambda parts, sep: sep.join(parts),
        st.lists(st.sampled_from(choices), min_size=1, max_size=3),
        st.sampled_from([", ", ",", " ,  ", ",,"]),
    )


VALID_KEY = st.binary(min_size=16, max_size=16).map(lambda b: base64.b64encode(b).decode())
KEYS = st.one_of(
    VALID_KEY,
    VALID_KEY,
    st.binary(min_size=0, max_size=24)
    .filter(lambda b: len(b) != 16)
    .map(lambda b: base64.b64encode(b).decode()),  # base64, not 16 bytes
    VALID_KEY.map(lambda k: k.rstrip("=")),  # no padding
    VALID_KEY.map(lambda k: k[:-3] + "!" + k[-2:]),  # not base64
    st.sampled_from(["", "dGhlIHNhbXBsZSBub25jZQ==", "dGhlIHNhbXBsZSBub25jZQ"]),
)
VERSIONS = st.sampled_from(["13", "13", "8", "14", "013", "13.0", ""])
UPGRADES = token_list(["websocket", "WebSocket", "WEBSOCKET", "h2c", "foo"])
CONNECTIONS = token_list(["Upgrade", "upgrade", "UPGRADE", "keep-alive", "close"])
PROTOCOLS = token_list(["broker.v1.json", "broker.v1.msgpack", "chat", "x.y"])
SAFE_EXTRAS = [
    ("Origin", "http://example.com"),
    ("User-Agent", "generated/1.0"),
    ("Sec-WebSocket-Extensions", "permessage-deflate; client_max_window_bits"),
    ("Cookie", "a=b"),
]
EXTRAS = [*SAFE_EXTRAS, ("Content-Length", "0"), ("Transfer-Encoding", "chunked")]
ONE = st.just(1)
#: How many times a field is there: 0, 1 or 2, weighted.
USUAL = st.sampled_from([0] + [1] * 10 + [2] * 2)
RARE = st.sampled_from([0] * 4 + [1] * 4 + [2])

#: Each part of a request: (as a valid upgrade has it, anything).
FIELDS = {
    "Host": (
        (st.just("127.0.0.1:8765"), ONE),
        (st.just("127.0.0.1:8765"), st.sampled_from([0] + [1] * 12 + [2])),
    ),
    "Upgrade": (
        (st.sampled_from(["websocket", "WebSocket", "websocket, h2c"]), ONE),
        (UPGRADES, USUAL),
    ),
    "Connection": (
        (st.sampled_from(["Upgrade", "keep-alive, Upgrade", "upgrade"]), ONE),
        (CONNECTIONS, USUAL),
    ),
    "Sec-WebSocket-Key": ((VALID_KEY, ONE), (KEYS, USUAL)),
    "Sec-WebSocket-Version": ((st.just("13"), ONE), (VERSIONS, USUAL)),
    "Sec-WebSocket-Protocol": ((PROTOCOLS, RARE), (PROTOCOLS, RARE)),
}
METHODS = (st.just("GET"), st.sampled_from(["GET", "POST", "HEAD", "get"]))
HTTP_VERSIONS = (st.just("1.1"), st.sampled_from(["1.1", "1.0"]))
TARGETS = (
    st.sampled_from(["/ws", "/ws?token=a&b=/c", "//evil.example/ws"]),
    st.sampled_from(["/ws", "//evil.example/ws", "http://h/ws", "*", "/ws#f", "h:443"]),
)
PARTS = [*FIELDS, "extras", "method", "version", "target"]


@st.composite
def requests(draw: st.DrawFn) -> Generated:
    """A valid upgrade with none, one, two or all of its parts drawn from
    anything (so that both outcomes are frequent)."""
    wild_count = draw(st.sampled_from([0] * 5 + [1] * 8 + [2] * 3 + [len(PARTS)] * 4))
    wild = set(draw(st.permutations(PARTS))[:wild_count])
    fields: list[tuple[str, str]] = []
    for name, (good, anything) in FIELDS.items():
        values, count = anything if name in wild else good
        for _ in range(draw(count)):
            fields.append((any_case(draw, name), draw(values)))
    extras = EXTRAS if "extras" in wild else SAFE_EXTRAS
    for name, value in draw(st.lists(st.sampled_from(extras), max_size=2)):
        fields.append((any_case(draw, name), value))
    return Generated(
        method=draw(METHODS["method" in wild]),
        version=draw(HTTP_VERSIONS["version" in wild]),
        target=draw(TARGETS["target" in wild]),
        fields=tuple(draw(st.permutations(fields))),
    )


GOOD = Generated(
    "GET",
    "1.1",
    "/ws",
    (
        ("Host", "127.0.0.1:8765"),
        ("Upgrade", "websocket"),
        ("Connection", "Upgrade"),
        ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ("Sec-WebSocket-Version", "13"),
    ),
)


def with_fields(*fields: tuple[str, str]) -> Generated:
    names = {n.lower() for n, _ in fields}
    kept = tuple(f for f in GOOD.fields if f[0].lower() not in names)
    return Generated(GOOD.method, GOOD.version, GOOD.target, kept + fields)


@settings(max_examples=500, deadline=None)
@given(request=requests(), splits=st.lists(st.integers(min_value=1, max_value=400), max_size=4))
@example(request=GOOD, splits=[])
@example(request=with_fields(("Connection", "keep-alive"), ("Connection", "Upgrade")), splits=[])
@example(request=with_fields(("Connection", "Upgrade"), ("Connection", "keep-alive")), splits=[7])
@example(request=with_fields(("Upgrade", "websocket, h2c")), splits=[])
@example(
    request=with_fields(("Sec-WebSocket-Version", "13"), ("Sec-WebSocket-Version", "13")), splits=[]
)
@example(request=with_fields(("Sec-WebSocket-Key", "short")), splits=[])
def test_same_decision_and_accept_token_as_wsproto(request: Generated, splits: list[int]) -> None:
    data = request.render()
    expected = reference(request)
    got = broker_decision(data, splits)
    assert got.accepted == expected.accepted, data
    if got.accepted:
        assert got.accept_token == expected.accept_token
        key = ", ".join(request.values("sec-websocket-key")).strip()
        assert got.accept_token == base64.b64encode(hashlib.sha1(key.encode() + GUID).digest())
        assert got.subprotocols == expected.subprotocols


# -- the documented differences, one by one -----------------------------------------------


@pytest.mark.parametrize(
    ("request_", "broker", "wsproto"),
    [
        # RFC 9110 5.3: the two fields are one list, holding "upgrade".
        (with_fields(("Connection", "Upgrade"), ("Connection", "keep-alive")), True, False),
        # RFC 6455 4.1: Upgrade "MUST include" websocket (a list).
        (with_fields(("Upgrade", "websocket, h2c")), True, False),
        # RFC 9110 5.3: "13, 13" is not version 13.
        (
            with_fields(("Sec-WebSocket-Version", "13"), ("Sec-WebSocket-Version", "13")),
            False,
            True,
        ),
        # RFC 6455 4.2.1: the key is the base64 of 16 bytes.
        (with_fields(("Sec-WebSocket-Key", "short")), False, True),
        # RFC 6455 4.1: HTTP/1.1 or higher.
        (Generated("GET", "1.0", "/ws", GOOD.fields), False, True),
        # RFC 9112 3.2: origin-form, or absolute-form (which both accept).
        (Generated("GET", "1.1", "h:443", GOOD.fields), False, True),
        (Generated("GET", "1.1", "http://h/ws", GOOD.fields), True, True),
        # A body would be read as frames.
        (with_fields(("Content-Length", "0")), False, True),
    ],
)
def test_documented_differences(request_: Generated, broker: bool, wsproto: bool) -> None:
    data = request_.render()
    assert wsproto_decision(data).accepted is wsproto
    assert broker_decision(data, []).accepted is broker
    assert reference(request_).accepted is broker


# -- the plain-request reader against h11 ------------------------------------------------
#
# HandshakeParser reads a plain request, whole in the first bytes fed, without
# h11 (core.handshake._parse_plain). Whatever the bytes, it must come to
# exactly what h11 comes to: the same UpgradeRequest, or the same refusal.

#: Bytes that make a request less plain: line ends, controls, obs-text,
#: separators, whitespace.
ODD_BYTES = [b"\r", b"\n", b"\r\n", b"\x00", b"\x01", b"\x7f", b"\x80", b"\xff", b" ", b"\t", b":"]
#: Whole lines that h11 reads in its own way (or refuses).
ODD_LINES = [
    b" folded continuation",  # obs-fold: h11 joins it to the field before
    b"\tfolded",
    b"Host: other.example",  # a second Host
    b"Bad Name: x",
    b"Na(me: x",
    b": no name",
    b"X-Empty:",
    b"X-Spaces:   padded \t ",
    b"X-Obs-Text: caf\xc3\xa9",
    b"X-Control: a\x01b",
    b"Content-Length: 0",
    b"Content-Length: 00, 0",
    b"Transfer-Encoding: chunked",
    b"",  # an early end of the head
]


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A generated request's bytes, then changed at the byte level: a line
    end swapped, an odd byte or an odd line inserted, bytes after the head."""
    data = bytearray(draw(requests()).render())
    for _ in range(draw(st.integers(min_value=0, max_value=3))):
        kind = draw(st.sampled_from(["byte", "line", "line end", "none"]))
        if kind == "byte":
            at = draw(st.integers(min_value=0, max_value=len(data)))
            data[at:at] = draw(st.sampled_from(ODD_BYTES))
        elif kind == "line":
            ends = [i for i in range(len(data)) if data.startswith(b"\r\n", i)]
            at = draw(st.sampled_from(ends)) + 2
            data[at:at] = draw(st.sampled_from(ODD_LINES)) + b"\r\n"
        elif kind == "line end":
            ends = [i for i in range(len(data)) if data.startswith(b"\r\n", i)]
            at = draw(st.sampled_from(ends))
            data[at : at + 2] = draw(st.sampled_from([b"\n", b"\r", b"\r\r\n", b"\n\r"]))
    if draw(st.booleans()):
        data += draw(st.sampled_from([b"\x81\x85abcd", b"GET / HTTP/1.1\r\n\r\n", b"\r\n"]))
    return bytes(data)


def parse_outcome(data: bytes, *, plain: bool, max_head: int) -> object:
    """What HandshakeParser makes of *data* fed at once: the request (or None:
    incomplete), or the refusal with everything the broker answers with."""
    parser = HandshakeParser(max_head, plain=plain)
    try:
        return parser.feed(data)
    except NotAnUpgrade as e:
        return ("not an upgrade", e.status, e.reason, e.headers, e.target, e.request_headers)
    except HandshakeError as e:
        return (type(e), e.status, e.reason, e.headers)


@settings(max_examples=1500, deadline=None)
@given(data=st.one_of(requests().map(Generated.render), mutated()), small=st.booleans())
@example(data=GOOD.render(), small=False)
@example(data=GOOD.render() + b"\x81\x80abcd", small=False)
@example(data=GOOD.render().replace(b"Host", b"X-Host"), small=False)  # no Host
@example(data=b"\r\n" + GOOD.render(), small=False)
@example(data=GOOD.render().replace(b"\r\n", b"\n"), small=False)
@example(data=GOOD.render(), small=True)
def test_the_plain_reader_decides_as_h11_does(data: bytes, small: bool) -> None:
    # small: a head limit just under or over the request's own size.
    max_head = len(data) - 2 if small else MAX_REQUEST_HEAD
    plain = parse_outcome(data, plain=True, max_head=max_head)
    assert plain == parse_outcome(data, plain=False, max_head=max_head), data


def test_the_plain_reader_takes_the_common_request() -> None:
    """The request browsers and the clients send is read without h11 (the
    test above would pass if it never was)."""
    data = GOOD.render() + b"\x81\x80abcd"
    assert _parse_plain(data, MAX_REQUEST_HEAD) is not None
    request = HandshakeParser().feed(data)
    assert request is not None and request.trailing == b"\x81\x80abcd"
