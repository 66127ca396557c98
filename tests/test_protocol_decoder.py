"""The msgspec decoder of broker.core.protocol against the decoder it replaced.

``decode_command`` decodes valid commands with msgspec and hands everything
else to the checks in Python. These property tests hold it to the decoder of
commit 0c0d2a8 (copied below as REFERENCE, unchanged but for its imports):
for random JSON and msgpack frames, valid and not, both accept the same
frames, decode them to equal commands whose ``data`` has the same types, and
refuse the others with the same ``ProtocolError`` (code, message,
request_id, close_code).

They also check the parts that make that true: the topic and pattern regular
expressions against ``broker.core.topics``, msgspec's JSON parser against the
``json`` module, and that valid commands do take the fast path.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import string
from collections.abc import Callable
from typing import Any, Final, NoReturn, assert_never
from unittest import mock

import msgpack
import msgspec
import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from broker.core import protocol
from broker.core.errors import CloseCode, ErrorCode, ProtocolError
from broker.core.protocol import (
    MAX_DATA_DEPTH,
    MAX_ID,
    MAX_ID_LENGTH,
    MAX_KEY_LENGTH,
    Auth,
    Command,
    Encoding,
    HistoryQuery,
    Ping,
    PresenceQuery,
    Publish,
    RequestId,
    Subscribe,
    Unsubscribe,
    decode_command,
    encode_command,
    encode_msg,
)
from broker.core.topics import MAX_TOKENS, TopicError, validate_pattern, validate_topic

ENCODINGS = [Encoding.JSON, Encoding.MSGPACK]

# ==========================================================================
# REFERENCE: decode_command as it was before msgspec (commit 0c0d2a8,
# broker/protocol.py), copied verbatim but for the imports above. Do not
# "fix" it: it is the behaviour the new decoder must keep.
# ==========================================================================

_MIN_INT: Final = -(2**63)
_MAX_INT: Final = 2**64 - 1

_SURROGATE_RE: Final = re.compile("[\ud800-\udfff]")

_ID_MESSAGE: Final = (
    f"id must be an integer from 0 to 2**53-1 or a string of 1 to {MAX_ID_LENGTH} characters"
)
_KEY_MESSAGE: Final = f"key must be a string of 1 to {MAX_KEY_LENGTH} characters"

_MISSING: Final[Any] = object()


class _ExtTypeError(Exception):
    """Raised from msgpack's ext_hook: ext types have no JSON equivalent."""


class _NotAllowedConstant(Exception):
    """Raised from json's parse_constant on NaN, Infinity and -Infinity."""


def _reject_ext(code: int, data: bytes) -> NoReturn:
    raise _ExtTypeError(code)


def _reject_constant(name: str) -> NoReturn:
    raise _NotAllowedConstant(name)


_json_decode: Final = json.JSONDecoder(parse_constant=_reject_constant).decode


def _bad(message: str, request_id: RequestId | None = None) -> ProtocolError:
    return ProtocolError(ErrorCode.BAD_REQUEST, message, request_id=request_id)


def _short(text: str, limit: int = 32) -> str:
    if len(text) > limit:
        return repr(text[:limit]) + "..."
    return repr(text)


def _has_surrogate(text: str) -> bool:
    return not text.isascii() and _SURROGATE_RE.search(text) is not None


def _load(frame: str | bytes, encoding: Encoding) -> Any:
    if encoding is Encoding.JSON:
        if not isinstance(frame, str):
            raise ProtocolError(
                ErrorCode.BAD_REQUEST,
                "binary frame on the JSON subprotocol",
                close_code=CloseCode.UNSUPPORTED_DATA,
            )
        try:
            return _json_decode(frame)
        except json.JSONDecodeError as exc:
            raise _bad(f"malformed JSON: {exc.msg} at position {exc.pos}") from None
        except _NotAllowedConstant as exc:
            raise _bad(f"malformed JSON: {exc} is not allowed") from None
        except RecursionError:
            raise _bad("malformed JSON: nested too deeply") from None
        except ValueError:
            raise _bad("malformed JSON: number too long") from None
    if isinstance(frame, str):
        raise ProtocolError(
            ErrorCode.BAD_REQUEST,
            "text frame on the msgpack subprotocol",
            close_code=CloseCode.UNSUPPORTED_DATA,
        )
    try:
        return msgpack.unpackb(frame, raw=False, strict_map_key=True, ext_hook=_reject_ext)
    except _ExtTypeError:
        raise _bad("malformed msgpack: ext types are not allowed") from None
    except msgpack.ExtraData:
        raise _bad("malformed msgpack: extra bytes after the object") from None
    except UnicodeDecodeError:
        raise _bad("malformed msgpack: a string is not valid UTF-8") from None
    except Exception:
        raise _bad("malformed msgpack") from None


class _Unrepresentable(Exception):
    """``data`` cannot be re-encoded in both encodings; args[0] is the message."""


_NOT_JSON: Final = "data must be JSON-representable ({})"
_TOO_DEEP: Final = f"data is nested deeper than {MAX_DATA_DEPTH} levels"
_INT_RANGE: Final = "data must be msgpack-representable (integer outside the 64-bit range)"
_SURROGATE: Final = _NOT_JSON.format("lone surrogate in a string")


def _check_data(value: Any, depth: int, text_escapes: bool) -> None:
    t = type(value)
    if t is str:
        if text_escapes and _has_surrogate(value):
            raise _Unrepresentable(_SURROGATE)
    elif t is int:
        if not _MIN_INT <= value <= _MAX_INT:
            raise _Unrepresentable(_INT_RANGE)
    elif t is float:
        if not math.isfinite(value):
            raise _Unrepresentable(_NOT_JSON.format("NaN or infinite number"))
    elif t is dict:
        if depth >= MAX_DATA_DEPTH:
            raise _Unrepresentable(_TOO_DEEP)
        for k, v in value.items():
            if type(k) is not str:
                raise _Unrepresentable(_NOT_JSON.format("map keys must be strings"))
            if text_escapes and _has_surrogate(k):
                raise _Unrepresentable(_SURROGATE)
            _check_data(v, depth + 1, text_escapes)
    elif t is list:
        if depth >= MAX_DATA_DEPTH:
            raise _Unrepresentable(_TOO_DEEP)
        for v in value:
            _check_data(v, depth + 1, text_escapes)
    elif value is not None and t is not bool:
        raise _Unrepresentable(_NOT_JSON.format(f"{t.__name__} is not allowed"))


def _read_id(obj: dict[Any, Any]) -> RequestId | None:
    request_id: object = obj.get("id")
    if request_id is None:
        return None
    if type(request_id) is int:
        if 0 <= request_id <= MAX_ID:
            return request_id
    elif type(request_id) is str and 0 < len(request_id) <= MAX_ID_LENGTH:
        if _has_surrogate(request_id):
            raise _bad("id must not contain lone surrogates")
        return request_id
    raise _bad(_ID_MESSAGE)


def reference_decode_command(frame: str | bytes, encoding: Encoding) -> Command:
    obj = _load(frame, encoding)
    if type(obj) is not dict:
        raise _bad("frame must be an object")
    request_id = _read_id(obj)
    op = obj.get("op", _MISSING)
    if op is _MISSING:
        raise _bad("missing field 'op'", request_id)
    if type(op) is not str:
        raise _bad("op must be a string", request_id)

    if op == "pub":
        topic = obj.get("topic", _MISSING)
        if topic is _MISSING:
            raise _bad("missing field 'topic'", request_id)
        try:
            validate_topic(topic)
        except TopicError as exc:
            raise _bad(str(exc), request_id) from None
        data = obj.get("data", _MISSING)
        if data is _MISSING:
            raise _bad("missing field 'data'", request_id)
        escapes = isinstance(frame, str) and "\\u" in frame
        try:
            _check_data(data, 0, escapes)
        except _Unrepresentable as exc:
            raise _bad(exc.args[0], request_id) from None
        key = obj.get("key")
        if key is not None:
            if type(key) is not str or not 0 < len(key) <= MAX_KEY_LENGTH:
                raise _bad(_KEY_MESSAGE, request_id)
            if _has_surrogate(key):
                raise _bad("key must not contain lone surrogates", request_id)
        return Publish(request_id, topic, data, key)

    if op == "sub" or op == "unsub":
        pattern = obj.get("topic", _MISSING)
        if pattern is _MISSING:
            raise _bad("missing field 'topic'", request_id)
        try:
            validate_pattern(pattern)
        except TopicError as exc:
            raise _bad(str(exc), request_id) from None
        if op == "sub":
            return Subscribe(request_id, pattern)
        return Unsubscribe(request_id, pattern)

    if op == "ping":
        return Ping(request_id)

    if op == "auth":
        token = obj.get("token", _MISSING)
        if token is _MISSING:
            raise _bad("missing field 'token'", request_id)
        if type(token) is not str or not token:
            raise _bad("token must be a non-empty string", request_id)
        if _has_surrogate(token):
            raise _bad("token must not contain lone surrogates", request_id)
        return Auth(request_id, token)

    raise _bad(f"unknown op {_short(op)}", request_id)


# ==========================================================================
# END OF REFERENCE
# ==========================================================================


def strict(value: Any) -> Any:
    """*value* with its exact types and dict order made comparable: 1, 1.0 and
    True differ, and so do 0.0 and -0.0, {"a":1,"b":2} and {"b":2,"a":1}."""
    t = type(value)
    if t is dict:
        return ("dict", tuple((strict(k), strict(v)) for k, v in value.items()))
    if t is list:
        return ("list", tuple(strict(v) for v in value))
    if t is float:
        return ("float", repr(value))
    return (t.__name__, repr(value))


def outcome(decode: Callable[[Any, Encoding], Command], frame: Any, encoding: Encoding) -> Any:
    """What *decode* makes of *frame*: the command, strictly, or the error."""
    try:
        command = decode(frame, encoding)
    except ProtocolError as e:
        return ("err", e.code, e.message, strict(e.request_id), e.close_code)
    fields = tuple(strict(getattr(command, f)) for f in command.__struct_fields__)
    return ("ok", type(command).__name__, fields)


def same_as_reference(frame: Any, encoding: Encoding) -> Any:
    expected = outcome(reference_decode_command, frame, encoding)
    assert outcome(decode_command, frame, encoding) == expected
    return expected


# --------------------------------------------------------------------------
# Strategies: command-shaped frames, valid and not
# --------------------------------------------------------------------------

TOKEN_CHARS = string.ascii_letters + string.digits + "_-:"
tokens = st.text(TOKEN_CHARS, min_size=1, max_size=6)
valid_topics = st.lists(tokens, min_size=1, max_size=MAX_TOKENS).map(".".join)
valid_patterns = st.lists(tokens | st.just("*"), min_size=1, max_size=MAX_TOKENS).flatmap(
    lambda toks: st.sampled_from([toks, [*toks[:-1], ">"]]).map(".".join)
)
# Near misses: the topic alphabet plus the characters that make them invalid.
topic_like = st.text(TOKEN_CHARS[:3] + TOKEN_CHARS[-3:] + ".*> é\n\t", max_size=12)
long_names = st.integers(MAX_TOKENS - 1, MAX_TOKENS + 1).map(lambda n: ".".join(["a"] * n)) | (
    st.integers(250, 260).map(lambda n: "a" * n)
)
non_strings = st.none() | st.integers(-3, 3) | st.booleans() | st.lists(st.just("a"), max_size=1)
topics = valid_topics | valid_patterns | topic_like | long_names | non_strings

ids = (
    st.none()
    | st.integers(-2, 2)
    | st.integers(MAX_ID - 1, MAX_ID + 1)
    | st.integers(-(2**64), 2**65)
    | st.booleans()
    | st.floats(allow_nan=True)
    | st.just("")
    | st.text(max_size=3)
    | st.integers(MAX_ID_LENGTH - 1, MAX_ID_LENGTH + 1).map(lambda n: "i" * n)
    | st.just("😀" * MAX_ID_LENGTH)
    | st.just("\ud800")
    | st.lists(st.integers(0, 9), max_size=1)
)
keys = (
    st.none()
    | st.just("")
    | st.text(max_size=3)
    | st.integers(MAX_KEY_LENGTH - 1, MAX_KEY_LENGTH + 1).map(lambda n: "k" * n)
    | st.just("ключ😀")
    | st.just("\udc00")
    | st.integers(0, 2)
    | st.booleans()
)
tokens_field = (
    st.none() | st.text(max_size=3) | st.just("eyJ.a.b") | st.just("\ud83d") | st.integers()
)
ops = (
    st.sampled_from(["pub", "sub", "unsub", "ping", "auth"])
    | st.sampled_from(["PUB", "pong", "", "x" * 40])
    | non_strings
)

scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.integers()  # also beyond the 64-bit range
    | st.sampled_from([2**63 - 1, 2**63, 2**64 - 1, 2**64, -(2**63), -(2**63) - 1])
    | st.floats()  # NaN and infinities too
    | st.text(max_size=6)
    | st.sampled_from(["\ud800", "a\udfffb", "😀", "\x00", "\u2028"])
)


valid_ids = st.none() | st.integers(0, MAX_ID) | st.text(min_size=1, max_size=MAX_ID_LENGTH)
valid_keys = st.none() | st.text(min_size=1, max_size=MAX_KEY_LENGTH)
valid_data = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


valid_publishes = st.builds(Publish, valid_ids, valid_topics, valid_data, valid_keys)
valid_subscribes = st.builds(Subscribe, valid_ids, valid_patterns) | st.builds(
    Unsubscribe, valid_ids, valid_patterns
)
valid_auths = st.builds(Auth, valid_ids, st.text(min_size=1))
valid_commands = valid_publishes | valid_subscribes | valid_auths | st.builds(Ping, valid_ids)


def containers(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.lists(inner, max_size=3) | st.dictionaries(
        st.text(max_size=3) | st.just("\ud800"), inner, max_size=3
    )


json_data = st.recursive(scalars, containers, max_leaves=12)


def nest(depth: int, kind: str) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value] if kind == "list" else {"k": value}
    return value


deep_data = st.builds(
    nest, st.integers(MAX_DATA_DEPTH - 1, MAX_DATA_DEPTH + 2), st.sampled_from(["list", "dict"])
)

# What only msgpack can carry: bin, ext types, timestamps, non-string keys.
msgpack_only = (
    st.binary(max_size=3)
    | st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=2))
    | st.builds(msgpack.Timestamp, st.integers(0, 2**32 - 1), st.just(0))
    | st.dictionaries(st.integers(0, 3) | st.binary(max_size=2), st.integers(0, 3), max_size=2)
)
msgpack_data = st.recursive(scalars | msgpack_only, containers, max_leaves=12)

unknown_fields = st.dictionaries(
    st.sampled_from(["v", "trace", "Data", "pattern"]), json_data, max_size=2
)


def command_objects(data: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Dicts shaped like commands: each field present or not, valid or not."""
    fields = st.fixed_dictionaries(
        {"op": ops},
        optional={
            "id": ids,
            "topic": topics,
            "data": data | deep_data,
            "key": keys,
            "token": tokens_field,
        },
    )
    return st.builds(lambda f, extra: {**f, **extra}, fields, st.just({}) | unknown_fields)


def to_json(obj: Any, style: int) -> str:
    """Serialize like assorted clients: compact or not, ASCII-escaped or not."""
    if style == 0:
        return json.dumps(obj)
    if style == 1:
        return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
    return json.dumps(obj, indent="\t")


def to_msgpack(obj: Any, style: int) -> bytes:
    """Serialize like assorted clients: bin type or not, float32 or not."""
    try:
        return msgpack.packb(  # type: ignore[no-any-return]
            obj,
            use_bin_type=style != 1,
            use_single_float=style == 2,
            unicode_errors="surrogatepass",
        )
    except (OverflowError, ValueError, TypeError):
        assume(False)
        raise


def op_objects(data: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Frames with an op and only its fields, mostly valid: what the fast path
    sees, and the near misses it must pass on (one bad id, key, topic...)."""
    some_ids = valid_ids | ids
    return st.one_of(
        st.fixed_dictionaries(
            {"op": st.just("pub"), "topic": valid_topics | topics, "data": data},
            optional={"id": some_ids, "key": valid_keys | keys},
        ),
        st.fixed_dictionaries(
            {"op": st.sampled_from(["sub", "unsub"]), "topic": valid_patterns | topics},
            optional={"id": some_ids},
        ),
        st.fixed_dictionaries({"op": st.just("ping")}, optional={"id": some_ids}),
        st.fixed_dictionaries(
            {"op": st.just("auth"), "token": st.text(min_size=1) | tokens_field},
            optional={"id": some_ids},
        ),
    )


top_level = command_objects(json_data) | op_objects(json_data) | json_data


@settings(max_examples=600, deadline=None)
@given(obj=top_level, style=st.integers(0, 2))
def test_json_frames_decode_as_before(obj: Any, style: int) -> None:
    same_as_reference(to_json(obj, style), Encoding.JSON)


@settings(max_examples=600, deadline=None)
@given(
    obj=command_objects(msgpack_data) | op_objects(msgpack_data) | msgpack_data,
    style=st.integers(0, 2),
)
def test_msgpack_frames_decode_as_before(obj: Any, style: int) -> None:
    same_as_reference(to_msgpack(obj, style), Encoding.MSGPACK)


# Leaves that make data invalid (in one encoding or both).
bad_leaves = st.sampled_from(
    [2**64, -(2**63) - 1, 10**30, math.nan, -math.inf, "\ud800", "a\udfff"]
)
bad_msgpack_leaves = st.sampled_from(
    [
        b"x",
        msgpack.ExtType(1, b""),
        msgpack.Timestamp(1, 0),
        {1: 2},
        {b"k": 1},
        math.nan,
        math.inf,
        "\ud800",
    ]
)


@st.composite
def one_defect(
    draw: st.DrawFn, leaves: st.SearchStrategy[Any], values: st.SearchStrategy[Any]
) -> Any:
    """A valid command with one thing wrong (or odd but valid): the frames
    that test where the fast path stops best."""
    kind = draw(st.sampled_from(["id", "key", "topic", "data", "token", "drop", "extra", "op"]))
    # A command that has the field to spoil (else it would be an unknown one).
    if kind in ("key", "data"):
        commands: st.SearchStrategy[Command] = valid_publishes
    elif kind == "topic":
        commands = valid_publishes | valid_subscribes
    elif kind == "token":
        commands = valid_auths
    else:
        commands = valid_commands
    obj: dict[str, Any] = json.loads(encode_command(draw(commands), Encoding.JSON))
    if kind == "id":
        obj["id"] = draw(ids)
    elif kind == "key":
        obj["key"] = draw(keys)
    elif kind == "topic":
        obj["topic"] = draw(topics)
    elif kind == "data":
        leaf = draw(leaves)
        data = obj.get("data")
        obj["data"] = draw(
            st.sampled_from([leaf, [data, leaf], {"a": data, "b": [leaf]}, [[[leaf]]]])
        )
    elif kind == "token":
        obj["token"] = draw(tokens_field)
    elif kind == "drop":
        del obj[draw(st.sampled_from(sorted(obj)))]
    elif kind == "extra":
        obj[draw(st.sampled_from(["v", "x", "Data"]))] = draw(values)
    else:
        obj["op"] = draw(ops)
    return obj


@settings(max_examples=500, deadline=None)
@given(obj=one_defect(bad_leaves, json_data), style=st.integers(0, 2))
def test_json_near_misses_decode_as_before(obj: Any, style: int) -> None:
    same_as_reference(to_json(obj, style), Encoding.JSON)


@settings(max_examples=500, deadline=None)
@given(obj=one_defect(bad_msgpack_leaves, msgpack_data), style=st.integers(0, 2))
def test_msgpack_near_misses_decode_as_before(obj: Any, style: int) -> None:
    same_as_reference(to_msgpack(obj, style), Encoding.MSGPACK)


@settings(max_examples=400, deadline=None)
@given(
    obj=command_objects(json_data) | op_objects(json_data),
    encoding=st.sampled_from(ENCODINGS),
    edits=st.lists(
        st.tuples(st.integers(0, 10_000), st.integers(0, 3), st.integers(0, 255)), max_size=3
    ),
)
def test_damaged_frames_decode_as_before(
    obj: Any, encoding: Encoding, edits: list[tuple[int, int, int]]
) -> None:
    # Truncate, delete, duplicate or replace a few characters (bytes).
    frame: Any = to_json(obj, 1) if encoding is Encoding.JSON else to_msgpack(obj, 0)
    for at, how, code in edits:
        at %= len(frame) + 1
        piece = chr(code) if encoding is Encoding.JSON else bytes([code])
        if how == 0:
            frame = frame[:at]
        elif how == 1:
            frame = frame[:at] + frame[at + 1 :]
        elif how == 2:
            frame = frame[:at] + frame[at : at + 2] + frame[at:]
        else:
            frame = frame[:at] + piece + frame[at + 1 :]
    same_as_reference(frame, encoding)


pairs = st.lists(
    st.tuples(st.sampled_from(["op", "id", "topic", "data", "key", "token", "x"]), json_data),
    max_size=7,
)
op_pairs = st.lists(st.tuples(st.just("op"), ops), min_size=1, max_size=2)


@settings(max_examples=400, deadline=None)
@given(pairs=st.builds(lambda a, b: a + b, op_pairs, pairs), shuffle=st.randoms())
def test_duplicate_fields_decode_as_before(pairs: list[tuple[str, Any]], shuffle: Any) -> None:
    # json and msgpack keep the last of two equal keys; so must msgspec.
    shuffle.shuffle(pairs)
    text = "{" + ",".join(f"{json.dumps(k)}:{json.dumps(v)}" for k, v in pairs) + "}"
    same_as_reference(text, Encoding.JSON)
    packer = msgpack.Packer(unicode_errors="surrogatepass")
    try:
        frame = packer.pack_map_header(len(pairs)) + b"".join(
            packer.pack(k) + packer.pack(v) for k, v in pairs
        )
    except OverflowError:
        return
    same_as_reference(frame, Encoding.MSGPACK)


@settings(max_examples=300, deadline=None)
@given(frame=st.binary(max_size=40))
def test_random_bytes_decode_as_before(frame: bytes) -> None:
    same_as_reference(frame, Encoding.MSGPACK)
    same_as_reference(frame, Encoding.JSON)  # the wrong frame type


@settings(max_examples=300, deadline=None)
@given(frame=st.text(max_size=40))
def test_random_text_decodes_as_before(frame: str) -> None:
    same_as_reference(frame, Encoding.JSON)
    same_as_reference(frame, Encoding.MSGPACK)  # the wrong frame type


@pytest.mark.parametrize(
    "frame",
    [
        # Valid frames the fast path leaves to the checked one.
        '{"op":"ping","x":' + "9" * 5000 + "}",  # "number too long" anywhere
        '{"op":"ping","x":"\\ud800"}',  # lone surrogates are fine where unread
        '{"op":"ping","x":1e400}',
        '{"op":"ping","op":"pub","topic":"t","data":1}',  # the last op counts
        '{"op":"pub","topic":"a*","topic":"a","data":1}',  # the last topic counts
        '{"op":"pub","topic":"t","data":1,"data":[1]}',  # the last data counts
        '{"op":"pub","topic":"t","data":' + "[" * 99 + "]" * 99 + "}",
        '{"op":"pub","topic":"t","data":' + "[" * 101 + "]" * 101 + "}",
        '{"op":"pub","topic":"t","data":' + "[" * 900 + "]" * 900 + "}",
        '{"op":"pub","topic":"t","data":' + "[" * 1100 + "]" * 1100 + "}",
        '{"op":"pub","topic":"t","data":{"a":1,"b":2,"a":3}}',
        '{"op":"pub","topic":"t","data":[18446744073709551615,-9223372036854775808]}',
        '{"op":"pub","topic":"t","data":18446744073709551616}',
        '{"op":"pub","topic":"t","data":1E2}',
        '{"op":"pub","topic":"t","data":-0}',
        '{"op":"pub","topic":"t","data":"\x7f"}',
        '{"op":"p\\u0075b","topic":"t","data":1}',
        '{"op":"sub","topic":"a\\n"}',  # \Z, not $
        '{"op":"sub","topic":"a.>\\n"}',
        '{"op":"pub","topic":"a\\n","data":1}',
        '{"op":"ping","id":"\\ud83d\\ude00"}',
        '\ufeff{"op":"ping"}',
        '\f{"op":"ping"}',
        '{"op":"pub","topic":"t","data":"\ud800"}',  # a raw surrogate: direct calls only
    ],
)
def test_json_corner_cases(frame: str) -> None:
    same_as_reference(frame, Encoding.JSON)


@pytest.mark.parametrize(
    "frame",
    [
        msgpack.packb({"op": "ping", "x": msgpack.ExtType(1, b"")}),
        msgpack.packb({"op": "ping", "x": msgpack.Timestamp(1, 0)}),
        msgpack.packb({"op": "ping", "x": {1: 2}}),
        b"\x82\xa2op\xa4ping\xa1x\xa2\xff\xfe",  # invalid UTF-8 in an unknown field
        msgpack.packb({"op": "pub", "topic": "t", "data": [2**64 - 1, -(2**63)]}),
        msgpack.packb({"op": "pub", "topic": "t", "data": 0.1}, use_single_float=True),
        msgpack.packb({"op": "pub", "topic": "t", "data": float("nan")}, use_single_float=True),
        msgpack.packb({"op": "ping"}, use_bin_type=False),
        msgpack.packb({"op": "pub", "topic": "t", "data": "é"}, use_bin_type=False),
        msgpack.packb({"op": "pub", "topic": "t", "data": nest(MAX_DATA_DEPTH, "dict")}),
        msgpack.packb({"op": "pub", "topic": "t", "data": nest(MAX_DATA_DEPTH + 1, "dict")}),
        # Deeper than msgpack's Packer goes: arrays of one, by hand.
        b"\x83\xa2op\xa3pub\xa5topic\xa1t\xa4data" + b"\x91" * 2000 + b"\x01",
        b"\x82\xa2op\xa4ping\xa2op\xa3pub",  # op twice
        memoryview(msgpack.packb({"op": "ping", "id": 1})),
        bytearray(msgpack.packb({"op": "pub", "topic": "t", "data": [1]})),
    ],
)
def test_msgpack_corner_cases(frame: bytes) -> None:
    same_as_reference(frame, Encoding.MSGPACK)


# The second try (data nested deeper than the typed frame goes, or an
# integer from 2**63 up) walks data in Python: every bad value, at the top,
# inside, after a deep or a wide value, with good and bad topics.
DEEP = nest(protocol._TYPED_DEPTH + 1, "list")
WIDE = 2**63
BAD_LEAVES = {
    Encoding.JSON: [2**64, -(2**63) - 1, 10**40, nest(MAX_DATA_DEPTH + 1, "dict")],
    Encoding.MSGPACK: [
        b"x",
        msgpack.ExtType(1, b""),
        msgpack.Timestamp(1, 0),
        {1: 2},
        {b"k": 1},
        math.nan,
        -math.inf,
        nest(MAX_DATA_DEPTH + 1, "list"),
    ],
}


def second_try_cases() -> list[tuple[Encoding, Any]]:
    cases: list[tuple[Encoding, Any]] = []
    for encoding, leaves in BAD_LEAVES.items():
        cases += [(encoding, DEEP), (encoding, WIDE), (encoding, {"a": [WIDE, DEEP]})]
        for leaf in leaves:
            cases += [
                (encoding, leaf),
                (encoding, [leaf]),
                (encoding, {"a": leaf}),
                (encoding, [WIDE, leaf]),
                (encoding, {"d": DEEP, "x": [leaf]}),
                (encoding, [nest(protocol._TYPED_DEPTH, "dict"), leaf]),
            ]
    return cases


@pytest.mark.parametrize("topic", ["t", "a.*", "a..b", ""])
@pytest.mark.parametrize(("encoding", "data"), second_try_cases())
def test_second_try_decides_as_before(encoding: Encoding, data: Any, topic: str) -> None:
    obj = {"op": "pub", "id": 1, "topic": topic, "data": data}
    frame = json.dumps(obj) if encoding is Encoding.JSON else msgpack.packb(obj)
    same_as_reference(frame, encoding)


# --------------------------------------------------------------------------
# Valid commands take the fast path
# --------------------------------------------------------------------------


def depth(value: Any) -> int:
    """Levels of lists/objects: 0 for a scalar, 1 for [1] or {}."""
    if isinstance(value, list):
        return 1 + max(map(depth, value), default=0)
    if isinstance(value, dict):
        return 1 + max(map(depth, value.values()), default=0)
    return 0


def int64_only(value: Any) -> bool:
    if type(value) is int:
        return -(2**63) <= value < 2**63
    if isinstance(value, list):
        return all(map(int64_only, value))
    if isinstance(value, dict):
        return all(map(int64_only, value.values()))
    return True


def never(name: str) -> Callable[..., NoReturn]:
    def called(frame: Any, encoding: Encoding, *args: Any) -> NoReturn:
        raise AssertionError(f"{name} for {frame!r}")

    return called


@settings(max_examples=400, deadline=None)
@given(
    command=valid_commands
    | st.builds(
        Publish, valid_ids, valid_topics, deep_data | valid_data.map(lambda d: [[[[[[[d]]]]]]])
    ),
    encoding=st.sampled_from(ENCODINGS),
)
def test_valid_commands_take_the_fast_path(command: Command, encoding: Encoding) -> None:
    # Never the checked path; and unless data is deeper than the typed frame
    # goes or holds an integer from 2**63 up, not the second try either.
    frame = encode_command(command, encoding)
    data = command.data if isinstance(command, Publish) else None
    if depth(data) > MAX_DATA_DEPTH:
        return
    typed = depth(data) <= protocol._TYPED_DEPTH and int64_only(data)
    with (
        mock.patch.object(protocol, "_decode_checked", never("checked path")),
        mock.patch.object(protocol, "_decode_deep", never("second try"))
        if typed
        else contextlib.nullcontext(),
    ):
        decoded = decode_command(frame, encoding)
    assert decoded == command
    assert outcome(decode_command, frame, encoding) == outcome(
        reference_decode_command, frame, encoding
    )


def test_decoded_data_has_the_built_in_types() -> None:
    frame = '{"op":"pub","topic":"t","data":{"a":[1,2.5,"s",true,null,{}]}}'
    for encoding, payload in [
        (Encoding.JSON, frame),
        (Encoding.MSGPACK, msgpack.packb(json.loads(frame))),
    ]:
        command = decode_command(payload, encoding)
        assert isinstance(command, Publish)
        assert strict(command.data) == strict({"a": [1, 2.5, "s", True, None, {}]})


# --------------------------------------------------------------------------
# The parts: topic grammar, msgspec's JSON parser
# --------------------------------------------------------------------------

names = (
    st.text(TOKEN_CHARS[:2] + ".*>:-_ é\n", max_size=40)
    | valid_topics
    | valid_patterns
    | long_names
    | st.lists(tokens | st.sampled_from(["*", ">", "", "a*"]), max_size=18).map(".".join)
)


def accepts(check: Callable[[object], object], text: str) -> bool:
    try:
        check(text)
    except TopicError:
        return False
    return True


@settings(max_examples=1000, deadline=None)
@given(text=names)
def test_frame_checks_are_the_topic_grammar(text: str) -> None:
    # The length limit of the wire Structs, then the regular expression.
    name = msgspec.json.Decoder(protocol._FrameName)
    try:
        name.decode(json.dumps(text))
        short = True
    except msgspec.ValidationError:
        short = False
    topic = short and protocol._topic_match(text) is not None
    pattern = short and protocol._pattern_match(text) is not None
    assert topic == accepts(validate_topic, text)
    assert pattern == accepts(validate_pattern, text)


# JSON text generators: numbers in every spelling, strings with every kind of
# escape (lone surrogates too), the four whitespace characters and a few
# that are not, duplicate keys.
json_numbers = st.from_regex(
    r"\A-?(0|[1-9][0-9]{0,24})(\.[0-9]{1,20})?([eE][+-]?[0-9]{1,3})?\Z"
) | st.sampled_from(["01", "1.", ".5", "+1", "1e", "-", "NaN", "Infinity", "-Infinity", "1_0"])
escapes = st.sampled_from(["\\n", "\\t", "\\/", "\\\\", '\\"', "\\b", "\\f", "\\r", "\\x"])
unicode_escapes = st.integers(0, 0xFFFF).map(lambda c: f"\\u{c:04x}") | st.sampled_from(
    ["\\ud83d\\ude00", "\\ud800", "\\udfff", "\\ud83d\\u0041", "\\uD83D\\uDE00"]
)
raw_chars = st.characters(exclude_characters='"\\', exclude_categories=["Cs"])
json_strings = st.lists(raw_chars | escapes | unicode_escapes, max_size=6).map(
    lambda parts: '"' + "".join(parts) + '"'
)
spaces = st.sampled_from(["", "", " ", "\n", "\t", "\r", "\f", "\u00a0"])


def json_text(children: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    arrays = st.lists(children, max_size=4).map(lambda xs: "[" + ",".join(xs) + "]")
    member_keys = json_strings | st.sampled_from(['"a"', '"b"'])  # duplicates
    objects = st.lists(st.tuples(member_keys, spaces, children), max_size=4).map(
        lambda ms: "{" + ",".join(f"{k}{s}:{v}" for k, s, v in ms) + "}"
    )
    return st.builds(lambda a, x, b: a + x + b, spaces, arrays | objects, spaces)


json_documents = st.recursive(
    json_numbers | json_strings | st.sampled_from(["true", "false", "null"]),
    json_text,
    max_leaves=12,
)


def has_lone_surrogate_or_non_finite(value: Any) -> bool:
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, str):
        return _has_surrogate(value)
    if isinstance(value, list | tuple):
        return any(has_lone_surrogate_or_non_finite(v) for v in value)
    return False


# Objects as lists of (key, value) pairs: a duplicate key keeps both values.
_json_all_pairs: Final = json.JSONDecoder(object_pairs_hook=list).decode


@settings(max_examples=1500, deadline=None)
@given(text=json_documents)
@example(text='{"a":1,"a":2,"b":3}')
@example(text='{"a":NaN,"a":1}')
@example(text="[1e400,-1e400,1e-400,2.5e-324]")
@example(text='["\\ud800","\\udc00x","\\ud83d\\ude00"]')
@example(text="[NaN,Infinity,-Infinity]")
@example(text="[9007199254740993,1.7976931348623157e308,123456789012345678901234567890]")
@example(text="[0.1,0.30000000000000004,5e-324,1E+2,-0,-0.0]")
def test_msgspec_json_parses_as_the_json_module(text: str) -> None:
    """msgspec's parser accepts a subset of what ``json`` accepts, with the
    same values (types, dict order, last of duplicate keys, every float bit).
    What only ``json`` accepts are the non-standard NaN/Infinity literals,
    numbers that overflow a double (``json`` makes them infinite) and lone
    surrogates in strings; the broker refuses all three in ``data`` (before
    and after msgspec), and the fast path hands them to the checked one."""
    try:
        expected = json.loads(text)
    except (ValueError, RecursionError):
        expected = None
        json_ok = False
    else:
        json_ok = True
    try:
        got = msgspec.json.decode(text)
    except (msgspec.DecodeError, UnicodeEncodeError):
        assert not json_ok or has_lone_surrogate_or_non_finite(_json_all_pairs(text))
    else:
        assert json_ok
        assert strict(got) == strict(expected)


def test_msgspec_json_corner_cases() -> None:
    # Integers: both stop at Python's 4300-digit limit.
    assert msgspec.json.decode("9" * 4300) == json.loads("9" * 4300)
    with pytest.raises(msgspec.ValidationError):
        msgspec.json.decode("9" * 4301)
    with pytest.raises(ValueError, match="4300"):
        json.loads("9" * 4301)
    # Whitespace: RFC 8259's four only; no byte order mark.
    for text in ['\ufeff{"op":"ping"}', '\f{"op":"ping"}', '\u00a0{"op":"ping"}']:
        with pytest.raises(msgspec.DecodeError):
            msgspec.json.decode(text)
        with pytest.raises(json.JSONDecodeError):
            json.JSONDecoder().decode(text)


# --------------------------------------------------------------------------
# The closed union
# --------------------------------------------------------------------------


def describe(command: Command) -> str:
    """Exhaustive dispatch: mypy fails here if a command class is added to
    Command without a case."""
    match command:
        case Publish(topic=topic):
            return f"pub {topic}"
        case Subscribe(pattern=pattern):
            return f"sub {pattern}"
        case Unsubscribe(pattern=pattern):
            return f"unsub {pattern}"
        case Auth():
            return "auth"
        case Ping(request_id):
            return f"ping {request_id}"
        case HistoryQuery(topic=topic):
            return f"history {topic}"
        case PresenceQuery(topic=topic):
            return f"presence {topic}"
        case _:
            assert_never(command)


def test_commands_match_exhaustively() -> None:
    assert describe(Publish(1, "a.b", None)) == "pub a.b"
    assert describe(Subscribe(None, "a.*")) == "sub a.*"
    assert describe(Unsubscribe(None, "a.>")) == "unsub a.>"
    assert describe(Auth(2, "tok")) == "auth"
    assert describe(Ping(3)) == "ping 3"
    assert describe(HistoryQuery(4, "a.b")) == "history a.b"
    assert describe(PresenceQuery(5, "a.b")) == "presence a.b"
    assert repr(Auth(2, "secret-token")) == "Auth(id=2)"


# --------------------------------------------------------------------------
# encode_msg: msgpack bytes as the msgpack package makes them
# --------------------------------------------------------------------------


@settings(max_examples=400, deadline=None)
@given(data=valid_data, key=valid_keys, seq=st.integers(0, 2**64 - 1))
def test_encode_msg_msgpack_bytes_are_msgpacks(data: Any, key: str | None, seq: int) -> None:
    obj: dict[str, Any] = {"op": "msg", "topic": "a.b", "seq": seq, "data": data}
    if key is not None:
        obj["key"] = key
    assert encode_msg("a.b", seq, data, key, Encoding.MSGPACK) == msgpack.packb(
        obj, use_bin_type=True
    )
    assert encode_msg("a.b", seq, data, key, Encoding.JSON) == json.dumps(
        obj, separators=(",", ":"), ensure_ascii=False
    )


def _sized(n: int) -> list[Any]:
    return ["a" * n, "é" * n, list(range(n)), {str(i): i for i in range(n)}]


@pytest.mark.parametrize(
    "data",
    [
        # msgpack's format boundaries: fix/8/16/32 for str, fix/16/32 for
        # arrays and maps, every integer width on both sides, float64.
        *(v for n in (15, 16, 31, 32, 255, 256, 65535, 65536) for v in _sized(n)),
        [0, 127, 128, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**63 - 1, 2**63, 2**64 - 1],
        [-1, -32, -33, -128, -129, -32768, -32769, -(2**31), -(2**31) - 1, -(2**63)],
        [0.0, -0.0, 1.5, 5e-324, 1.7976931348623157e308, 3.0],
        [True, False, None, "", [], {}],
    ],
)
@pytest.mark.parametrize("key", [None, "k", "é" * MAX_KEY_LENGTH])
def test_encode_msg_msgpack_format_boundaries(data: Any, key: str | None) -> None:
    obj: dict[str, Any] = {"op": "msg", "topic": "t", "seq": 2**64 - 1, "data": data}
    if key is not None:
        obj["key"] = key
    payload = encode_msg("t", 2**64 - 1, data, key, Encoding.MSGPACK)
    assert payload == msgpack.packb(obj, use_bin_type=True)
