"""The hand-written RESP3 parser and packer (broker/engine/redis/resp.py).

Conformance: the cases of the RESP3 specification
(https://github.com/redis/redis-specification/blob/master/protocol/RESP3.md),
each also fed split at every byte boundary and one byte at a time, and the
malformed inputs that must raise :class:`ProtocolError` rather than give a
value.

Differential: hypothesis builds RESP3 values, encodes them, and feeds the
bytes in random chunks both to :class:`Parser` and to hiredis's reader (the C
parser of redis-py and coredis' predecessor); the two must decode the same
values. Where they represent a value differently, :func:`common` maps both to
one form:

- hiredis gives push messages and sets as plain lists: our :class:`Push` and
  set lists compare as lists;
- hiredis gives a big number (``(``) as its decimal bytes, we give an int:
  the generator makes big numbers only outside the signed 64-bit range
  (where ``:`` integers cannot be), so an int that large on our side is
  compared as its decimal bytes;
- an error is compared as its message (``hiredis.ReplyError`` against our
  :class:`ReplyError`);
- maps are generated with distinct keys (the only maps Redis sends): after a
  repeated key hiredis pairs keys with the wrong values.

hiredis reads neither bulk errors (``!``) nor attributes as RESP3 means them
(it refuses ``!`` and hands an attribute over as a reply of its own): those
two are covered by the conformance cases only. coredis's own parser is not
used as a second reference: it refuses ``!`` and ``|`` too, and turns sets
into Python sets and errors into exception classes, which would compare
less than hiredis does.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import hiredis
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.engine.redis.resp import Parser, ProtocolError, Push, ReplyError, Value, pack

# -- helpers ---------------------------------------------------------------------------


def tagged(value: Value) -> object:
    """A value with its type spelled out, so that ``True`` is not ``1``,
    ``Push`` is not ``list`` and an error compares by its message."""
    if isinstance(value, Push):
        return ("push", [tagged(v) for v in value])
    if isinstance(value, list):
        return ("list", [tagged(v) for v in value])
    if isinstance(value, dict):
        return ("map", [(tagged(k), tagged(v)) for k, v in value.items()])
    if isinstance(value, ReplyError):
        return ("error", value.message, value.code)
    if isinstance(value, bool):
        return ("bool", value)
    if isinstance(value, int):
        return ("int", value)
    if isinstance(value, float):
        return ("double", "nan" if math.isnan(value) else value)
    if isinstance(value, bytes):
        return ("bytes", value)
    assert value is None, value
    return ("null",)


def splits(data: bytes) -> Iterator[list[bytes]]:
    """``data`` whole, in two parts at every boundary, and byte by byte."""
    yield [data]
    for i in range(1, len(data)):
        yield [data[:i], data[i:]]
    yield [data[i : i + 1] for i in range(len(data))]


def parse(chunks: list[bytes]) -> list[Value]:
    parser = Parser()
    out: list[Value] = []
    for chunk in chunks:
        parser.feed(chunk)
        out += parser.replies()
    return out


# -- conformance -------------------------------------------------------------------------

INF = float("inf")

CASES: list[tuple[bytes, Value]] = [
    # Simple strings, errors, integers (RESP2 and RESP3)
    (b"+OK\r\n", b"OK"),
    (b"+\r\n", b""),
    (b"-ERR this is the error description\r\n", ReplyError("ERR this is the error description")),
    (b"-WRONGTYPE Operation against a key\r\n", ReplyError("WRONGTYPE Operation against a key")),
    (b":1234\r\n", 1234),
    (b":-5\r\n", -5),
    (b":0\r\n", 0),
    (b":9223372036854775807\r\n", 2**63 - 1),
    # Bulk strings: binary safe, empty, null
    (b"$11\r\nhelloworld!\r\n", b"helloworld!"),
    (b"$4\r\na\r\nb\r\n", b"a\r\nb"),
    (b"$0\r\n\r\n", b""),
    (b"$-1\r\n", None),
    # Arrays: null, empty, nested, mixed
    (b"*-1\r\n", None),
    (b"*0\r\n", []),
    (b"*2\r\n$3\r\nfoo\r\n$3\r\nbar\r\n", [b"foo", b"bar"]),
    (b"*3\r\n:1\r\n:2\r\n:3\r\n", [1, 2, 3]),
    (
        b"*2\r\n*3\r\n:1\r\n:2\r\n:3\r\n*2\r\n+Hello\r\n-World\r\n",
        [[1, 2, 3], [b"Hello", ReplyError("World")]],
    ),
    (b"*3\r\n$3\r\nfoo\r\n$-1\r\n$3\r\nbar\r\n", [b"foo", None, b"bar"]),
    (b"*1\r\n*0\r\n", [[]]),
    (b"*2\r\n*1\r\n*1\r\n:1\r\n:2\r\n", [[[1]], 2]),
    # RESP3 null, booleans
    (b"_\r\n", None),
    (b"#t\r\n", True),
    (b"#f\r\n", False),
    # Doubles: the spec's forms
    (b",1.23\r\n", 1.23),
    (b",10\r\n", 10.0),
    (b",-1.5\r\n", -1.5),
    (b",inf\r\n", INF),
    (b",-inf\r\n", -INF),
    (b",nan\r\n", math.nan),
    (b",1.5e3\r\n", 1500.0),
    (b",1.5E-3\r\n", 0.0015),
    (b",-2e+2\r\n", -200.0),
    # Big numbers
    (
        b"(3492890328409238509324850943850943825024385\r\n",
        3492890328409238509324850943850943825024385,
    ),
    (
        b"(-3492890328409238509324850943850943825024385\r\n",
        -3492890328409238509324850943850943825024385,
    ),
    # Bulk errors
    (b"!21\r\nSYNTAX invalid syntax\r\n", ReplyError("SYNTAX invalid syntax")),
    (b"!12\r\nERR a\r\nb c d\r\n", ReplyError("ERR a\r\nb c d")),
    # Verbatim strings: the format and its colon are dropped
    (b"=15\r\ntxt:Some string\r\n", b"Some string"),
    (b"=4\r\nmkd:\r\n", b""),
    # Maps: in order; keys that cannot be dict keys give the flat list
    (b"%2\r\n+first\r\n:1\r\n+second\r\n:2\r\n", {b"first": 1, b"second": 2}),
    (b"%0\r\n", {}),
    (b"%1\r\n:1\r\n%1\r\n+a\r\n#t\r\n", {1: {b"a": True}}),
    (b"%1\r\n*1\r\n:1\r\n+v\r\n", [[1], b"v"]),
    # Sets
    (b"~5\r\n+orange\r\n+apple\r\n#t\r\n:100\r\n:999\r\n", [b"orange", b"apple", True, 100, 999]),
    (b"~0\r\n", []),
    # Attributes: read and dropped, wherever they are
    (
        b"|1\r\n+key-popularity\r\n%2\r\n$1\r\na\r\n,0.1923\r\n$1\r\nb\r\n,0.0012\r\n"
        b"*2\r\n:2039123\r\n:9543892\r\n",
        [2039123, 9543892],
    ),
    (b"*3\r\n:1\r\n:2\r\n|1\r\n+ttl\r\n:3600\r\n:3\r\n", [1, 2, 3]),
    (b"|0\r\n:7\r\n", 7),
    (b"%1\r\n|1\r\n+a\r\n+b\r\n+k\r\n+v\r\n", {b"k": b"v"}),
    # Pushes
    (
        b">4\r\n+pubsub\r\n+message\r\n+somechannel\r\n+this is the message\r\n",
        Push([b"pubsub", b"message", b"somechannel", b"this is the message"]),
    ),
    (b">3\r\n$9\r\nsubscribe\r\n$1\r\nc\r\n:1\r\n", Push([b"subscribe", b"c", 1])),
]


@pytest.mark.parametrize(("data", "expected"), CASES, ids=[repr(c[0])[:40] for c in CASES])
def test_spec_case(data: bytes, expected: Value) -> None:
    want = [tagged(expected)]
    for chunks in splits(data):
        assert [tagged(v) for v in parse(chunks)] == want, chunks


def test_pipelined_replies_come_out_in_order_whatever_the_chunks() -> None:
    data = b"".join(c[0] for c in CASES)
    want = [tagged(c[1]) for c in CASES]
    for chunks in splits(data):
        assert [tagged(v) for v in parse(chunks)] == want


def test_a_partial_reply_waits_for_the_rest() -> None:
    parser = Parser()
    parser.feed(b"*2\r\n$5\r\nhel")
    assert parser.replies() == []
    parser.feed(b"lo\r\n:1\r\n+next")
    assert parser.replies() == [[b"hello", 1]]
    parser.feed(b"\r\n")
    assert parser.replies() == [b"next"]


BAD: list[bytes] = [
    b"@foo\r\n",  # no such type
    b"\r\n",  # no type at all
    b"$abc\r\n",  # non-numeric lengths
    b"*x\r\n",
    b"%\r\n",
    b"$ 3\r\nfoo\r\n",  # what int() would take
    b"$+3\r\nfoo\r\n",
    b"*1_0\r\n",
    b":12a\r\n",  # a bad integer
    b":\r\n",
    b"(1 \r\n",
    b"$-2\r\n",  # negative lengths other than -1
    b"*-2\r\n",
    b"%-5\r\n",
    b"~-2\r\n",
    b">-3\r\n",
    b"!-2\r\n",
    b"$3\r\nfooXY",  # missing CRLF after a bulk string
    b"$3\r\nfoo\n\r",
    b"!3\r\nERRxx",
    b"=6\r\ntxt:abXX",
    b"=2\r\nab\r\n",  # verbatim without its format
    b"=6\r\ntxtabc\r\n",
    b"#x\r\n",  # booleans
    b"#\r\n",
    b"#tt\r\n",
    b"_x\r\n",  # null with content
    b",\r\n",  # doubles
    b",abc\r\n",
    b",1_0\r\n",
    b", 1\r\n",
    b"$?\r\n;4\r\nHell\r\n;0\r\n",  # streamed strings: not supported, refused
    b"*?\r\n:1\r\n.\r\n",
    b"*2\r\n:1\r\n@\r\n",  # a bad value inside an aggregate
]


@pytest.mark.parametrize("data", BAD, ids=[repr(b)[:30] for b in BAD])
def test_malformed_input_raises_protocol_error(data: bytes) -> None:
    for chunks in splits(data):
        with pytest.raises(ProtocolError):
            parse(chunks)


def test_replies_before_the_malformed_one_are_not_at_stake() -> None:
    parser = Parser()
    parser.feed(b"+OK\r\n")
    assert parser.replies() == [b"OK"]
    parser.feed(b"$-7\r\n")
    with pytest.raises(ProtocolError, match="bad length"):
        parser.replies()


def test_a_large_reply_in_many_reads() -> None:
    blob = bytes(range(256)) * 1024
    data = b"*2\r\n$%d\r\n%b\r\n$1\r\nx\r\n" % (len(blob), blob)
    chunks = [data[i : i + 1000] for i in range(0, len(data), 1000)]
    assert parse(chunks) == [[blob, b"x"]]


# -- differential against hiredis ------------------------------------------------------

#: hiredis's "nothing yet", distinct from a ``#f`` reply.
NOTHING = object()


class Encoded:
    """A generated RESP3 value as bytes."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def __repr__(self) -> str:
        return f"Encoded({self.data!r})"


def _line(kind: bytes, text: bytes) -> Encoded:
    return Encoded(kind + text + b"\r\n")


def _blob(kind: bytes, payload: bytes) -> Encoded:
    return Encoded(b"%b%d\r\n%b\r\n" % (kind, len(payload), payload))


def _aggregate(kind: bytes, items: list[Encoded]) -> Encoded:
    return Encoded(b"%b%d\r\n" % (kind, len(items)) + b"".join(i.data for i in items))


line_text = st.binary(max_size=20).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))
error_text = st.text(
    st.characters(codec="ascii", exclude_characters="\r\n"), min_size=1, max_size=20
).map(str.encode)
int64 = st.integers(-(2**63), 2**63 - 1)
big = st.one_of(
    st.integers(min_value=2**64, max_value=10**60),
    st.integers(min_value=-(10**60), max_value=-(2**64)),
)


def _double(x: float) -> bytes:
    if math.isnan(x):
        return b"nan"
    if math.isinf(x):
        return b"inf" if x > 0 else b"-inf"
    return repr(x).encode()


doubles = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True).map(_double),
    st.floats(allow_nan=False, allow_infinity=False).map(lambda x: b"%e" % x),
    st.integers(-(10**6), 10**6).map(lambda n: b"%d" % n),
)

scalars = st.one_of(
    line_text.map(lambda t: _line(b"+", t)),
    error_text.map(lambda t: _line(b"-", t)),
    int64.map(lambda n: _line(b":", b"%d" % n)),
    big.map(lambda n: _line(b"(", b"%d" % n)),
    st.binary(max_size=40).map(lambda b: _blob(b"$", b)),
    st.just(Encoded(b"$-1\r\n")),
    st.just(Encoded(b"_\r\n")),
    st.booleans().map(lambda v: Encoded(b"#t\r\n" if v else b"#f\r\n")),
    doubles.map(lambda t: _line(b",", t)),
    st.tuples(st.sampled_from([b"txt:", b"mkd:"]), st.binary(max_size=20)).map(
        lambda fp: _blob(b"=", fp[0] + fp[1])
    ),
)
#: Map keys that both sides can make dict keys, with the key they decode to.
keys = st.one_of(
    st.binary(max_size=10).map(lambda b: (b, _blob(b"$", b))),
    line_text.map(lambda t: (t, _line(b"+", t))),
    int64.map(lambda n: (n, _line(b":", b"%d" % n))),
)


def _extend(children: st.SearchStrategy[Encoded]) -> st.SearchStrategy[Encoded]:
    items = st.lists(children, max_size=5)
    return st.one_of(
        st.tuples(st.sampled_from([b"*", b"~", b">"]), items).map(lambda ki: _aggregate(*ki)),
        # Distinct keys: Redis sends no others, and hiredis pairs keys and
        # values wrongly after a repeated key.
        st.lists(st.tuples(keys, children), max_size=4, unique_by=lambda kv: kv[0][0]).map(
            lambda pairs: Encoded(
                b"%%%d\r\n" % len(pairs) + b"".join(k[1].data + v.data for k, v in pairs)
            )
        ),
        st.just(Encoded(b"*-1\r\n")),
    )


# deferred: its repr stays short (hypothesis warns about the expanded one).
values = st.deferred(lambda: st.recursive(scalars, _extend, max_leaves=25))


def common(value: object) -> object:
    """Both parsers' output in one form (see the module doc)."""
    if isinstance(value, list):  # Push, arrays, sets
        return ("list", [common(v) for v in value])
    if isinstance(value, dict):
        return ("map", [(common(k), common(v)) for k, v in value.items()])
    if isinstance(value, (ReplyError, hiredis.ReplyError)):
        return ("error", str(value))
    if isinstance(value, bool):
        return ("bool", value)
    if isinstance(value, int):
        if not -(2**63) <= value < 2**63:
            return ("bytes", b"%d" % value)  # a big number: hiredis's form
        return ("int", value)
    if isinstance(value, float):
        return ("double", "nan" if math.isnan(value) else value)
    if isinstance(value, bytes):
        return ("bytes", value)
    assert value is None, value
    return ("null",)


def hiredis_parse(chunks: list[bytes]) -> list[object]:
    reader = hiredis.Reader(notEnoughData=NOTHING)
    out: list[object] = []
    for chunk in chunks:
        reader.feed(chunk)
        while (value := reader.gets()) is not NOTHING:
            out.append(value)
    return out


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


@settings(max_examples=300, deadline=None)
@given(st.lists(values, min_size=1, max_size=4), st.lists(st.integers(0, 10**6), max_size=12))
def test_same_values_as_hiredis(replies: list[Encoded], cuts: list[int]) -> None:
    data = b"".join(r.data for r in replies)
    chunks = chunked(data, cuts)
    ours = parse(chunks)
    theirs = hiredis_parse(chunks)
    assert len(ours) == len(replies)
    assert [common(v) for v in ours] == [common(v) for v in theirs]


def test_the_differential_sees_what_it_compares() -> None:
    # common() must not hide the differences it is not meant to hide.
    assert common(parse([b"#f\r\n"])) != common(parse([b":0\r\n"]))
    assert common(hiredis_parse([b"#f\r\n"])) == common(parse([b"#f\r\n"]))
    assert common(hiredis_parse([b"$1\r\n1\r\n"])) != common(parse([b":1\r\n"]))
    assert common(hiredis_parse([b"(%d\r\n" % 2**70])) == common(parse([b"(%d\r\n" % 2**70]))


# -- pack() -----------------------------------------------------------------------------

args = st.lists(st.one_of(st.binary(max_size=30), st.text(max_size=10), st.integers()), max_size=8)


def _as_bytes(arg: bytes | str | int) -> bytes:
    if isinstance(arg, str):
        return arg.encode()
    if isinstance(arg, int):
        return b"%d" % arg
    return arg


@settings(max_examples=200, deadline=None)
@given(st.lists(args, min_size=1, max_size=4), st.lists(st.integers(0, 10**6), max_size=6))
def test_pack_round_trips_through_hiredis(
    commands: list[list[bytes | str | int]], cuts: list[int]
) -> None:
    data = b"".join(pack(c) for c in commands)
    expected = [[_as_bytes(a) for a in c] for c in commands]
    chunks = chunked(data, cuts)
    assert hiredis_parse(chunks) == expected
    assert parse(chunks) == expected


def test_pack_spells_a_command_as_the_spec_does() -> None:
    assert pack([b"LLEN", "mylist", 7]) == b"*3\r\n$4\r\nLLEN\r\n$6\r\nmylist\r\n$1\r\n7\r\n"
    assert pack(["SET", "k", b""]) == b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$0\r\n\r\n"
