"""Tests for broker.protocol: round trips in both encodings, and every way a
frame can be wrong."""

from __future__ import annotations

import json
import math
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.core.errors import CloseCode, ErrorCode, ProtocolError
from broker.core.protocol import (
    MAX_DATA_DEPTH,
    MAX_ID,
    MAX_ID_LENGTH,
    MAX_KEY_LENGTH,
    SUBPROTOCOLS,
    Command,
    Dropped,
    Encoding,
    Err,
    Event,
    Msg,
    Ok,
    Ping,
    Pong,
    Publish,
    Subscribe,
    Unsubscribe,
    decode_command,
    decode_event,
    encode_command,
    encode_dropped,
    encode_err,
    encode_msg,
    encode_ok,
    encode_pong,
)

ENCODINGS = [Encoding.JSON, Encoding.MSGPACK]


def encode(obj: Any, encoding: Encoding) -> str | bytes:
    """Serialize *obj* the way a (possibly sloppy) client would."""
    if encoding is Encoding.JSON:
        return json.dumps(obj)
    return msgpack.packb(obj, use_bin_type=True)  # type: ignore[no-any-return]


def load(payload: str | bytes) -> Any:
    if isinstance(payload, str):
        return json.loads(payload)
    return msgpack.unpackb(payload, raw=False)


def nested(depth: int, kind: str = "list") -> Any:
    """*depth* levels of lists (or objects) around a 1."""
    value: Any = 1
    for _ in range(depth):
        value = [value] if kind == "list" else {"k": value}
    return value


def bad_command(frame: str | bytes, encoding: Encoding) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        decode_command(frame, encoding)
    assert info.value.code is ErrorCode.BAD_REQUEST
    return info.value


def bad_event(frame: str | bytes, encoding: Encoding) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        decode_event(frame, encoding)
    assert info.value.code is ErrorCode.BAD_REQUEST
    return info.value


def test_subprotocols() -> None:
    assert SUBPROTOCOLS == {"broker.v1.json": Encoding.JSON, "broker.v1.msgpack": Encoding.MSGPACK}
    assert Encoding("json") is Encoding.JSON
    assert str(Encoding.MSGPACK) == "msgpack"


# --------------------------------------------------------------------------
# Round trips
# --------------------------------------------------------------------------

COMMANDS: list[Command] = [
    Subscribe(1, "trades.*"),
    Subscribe(None, "eth.>"),
    Subscribe("req-1", "a"),
    Unsubscribe(2, "trades.*"),
    Unsubscribe(None, "*.x.>"),
    Publish(3, "trades.BTC-USD", {"price": 64123.5, "qty": 2, "tags": ["a", None, True]}),
    Publish(None, "t", None),
    Publish(0, "t", "é日本😀", key="ключ"),
    Publish(MAX_ID, "a.b.c", [1, -1, 0.5, False, {}, []], key="k" * MAX_KEY_LENGTH),
    Publish("x" * MAX_ID_LENGTH, "t", {"é": {"nested": [{"deep": 1}]}}, key="k"),
    Publish(5, "t", -(2**63)),
    Publish(6, "t", 2**64 - 1),
    Publish(7, "t", nested(MAX_DATA_DEPTH)),
    Publish(8, "t", nested(MAX_DATA_DEPTH, "dict")),
    Ping(None),
    Ping(9),
    Ping("ping-1"),
]


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("command", COMMANDS, ids=repr)
def test_command_round_trip(command: Command, encoding: Encoding) -> None:
    payload = encode_command(command, encoding)
    assert isinstance(payload, str if encoding is Encoding.JSON else bytes)
    assert decode_command(payload, encoding) == command


def event_payloads(encoding: Encoding) -> list[tuple[str | bytes, Event]]:
    return [
        (encode_ok(1, encoding), Ok(1)),
        (encode_ok(None, encoding), Ok(None)),
        (encode_ok("a", encoding, seq=42), Ok("a", 42)),
        (encode_ok(7, encoding, seq=0), Ok(7, 0)),
        (
            encode_err(2, ErrorCode.FORBIDDEN, "not allowed", encoding),
            Err(2, "forbidden", "not allowed"),
        ),
        (encode_err(None, ErrorCode.BAD_REQUEST, "é", encoding), Err(None, "bad_request", "é")),
        (encode_pong(3, encoding), Pong(3)),
        (encode_pong(None, encoding), Pong(None)),
        (encode_pong("p", encoding), Pong("p")),
        (encode_dropped("trades.*", 12, encoding), Dropped("trades.*", 12)),
        (encode_msg("a.b", 5, {"x": [1, 2.5]}, None, encoding), Msg("a.b", 5, {"x": [1, 2.5]})),
        (encode_msg("a.b", 6, None, "k", encoding), Msg("a.b", 6, None, "k")),
        (encode_msg("a", 0, "é😀", "ключ", encoding), Msg("a", 0, "é😀", "ключ")),
    ]


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_event_round_trip(encoding: Encoding) -> None:
    for payload, event in event_payloads(encoding):
        assert isinstance(payload, str if encoding is Encoding.JSON else bytes)
        assert decode_event(payload, encoding) == event


def test_events_agree_across_encodings() -> None:
    pairs = zip(event_payloads(Encoding.JSON), event_payloads(Encoding.MSGPACK), strict=True)
    for (as_json, _), (as_msgpack, _) in pairs:
        assert load(as_json) == load(as_msgpack)


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (encode_ok(5, Encoding.JSON), '{"op":"ok","id":5}'),
        (encode_ok(None, Encoding.JSON), '{"op":"ok"}'),
        (encode_ok(5, Encoding.JSON, seq=9), '{"op":"ok","id":5,"seq":9}'),
        (encode_pong("x", Encoding.JSON), '{"op":"pong","id":"x"}'),
        (encode_pong(None, Encoding.JSON), '{"op":"pong"}'),
        (
            encode_err(1, ErrorCode.RATE_LIMITED, 'slow "down"', Encoding.JSON),
            '{"op":"err","id":1,"code":"rate_limited","message":"slow \\"down\\""}',
        ),
        (
            encode_err(None, ErrorCode.INTERNAL, "boom", Encoding.JSON),
            '{"op":"err","code":"internal","message":"boom"}',
        ),
        (encode_dropped("a.*", 3, Encoding.JSON), '{"op":"dropped","topic":"a.*","count":3}'),
        (encode_command(Ping(None), Encoding.JSON), '{"op":"ping"}'),
        (
            encode_command(Publish(None, "t", 1), Encoding.JSON),
            '{"op":"pub","topic":"t","data":1}',
        ),
        (
            encode_command(Publish(4, "t", None, "k"), Encoding.JSON),
            '{"op":"pub","id":4,"topic":"t","data":null,"key":"k"}',
        ),
        (encode_command(Subscribe(None, "a.>"), Encoding.JSON), '{"op":"sub","topic":"a.>"}'),
        (encode_command(Unsubscribe(1, "a"), Encoding.JSON), '{"op":"unsub","id":1,"topic":"a"}'),
    ],
)
def test_exact_json(payload: str | bytes, expected: str) -> None:
    assert payload == expected


def test_msgpack_omits_absent_fields() -> None:
    assert load(encode_ok(None, Encoding.MSGPACK)) == {"op": "ok"}
    assert load(encode_command(Ping(None), Encoding.MSGPACK)) == {"op": "ping"}
    assert load(encode_command(Publish(None, "t", 1), Encoding.MSGPACK)) == {
        "op": "pub",
        "topic": "t",
        "data": 1,
    }
    assert load(encode_msg("t", 1, 2, None, Encoding.MSGPACK)) == {
        "op": "msg",
        "topic": "t",
        "seq": 1,
        "data": 2,
    }


MSG_CASES: list[tuple[str, int, Any, str | None]] = [
    ("trades.BTC-USD", 1, {"price": 1.5, "side": "buy"}, None),
    ("a", 0, None, None),
    ("a.b", 2**40, [1, "two", 3.0, True, None, {}], "key-1"),
    ("user:42.orders", 7, {"é": "日本語", "emoji": "😀", "ctl": '\n\t"\\\u0000'}, "ключ"),
    ("x", 3, "\u2028\u2029", 'k"\\'),
    ("x", 4, -(2**63), None),
    ("x", 5, 2**64 - 1, None),
    ("x", 6, nested(MAX_DATA_DEPTH), None),
]


@pytest.mark.parametrize(("topic", "seq", "data", "key"), MSG_CASES)
def test_encode_msg_json_equals_json_dumps(
    topic: str, seq: int, data: Any, key: str | None
) -> None:
    obj: dict[str, Any] = {"op": "msg", "topic": topic, "seq": seq, "data": data}
    if key is not None:
        obj["key"] = key
    payload = encode_msg(topic, seq, data, key, Encoding.JSON)
    assert isinstance(payload, str)
    assert json.loads(payload) == obj
    # Byte for byte, too: compact separators, unicode kept as is.
    assert payload == json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


@pytest.mark.parametrize(("topic", "seq", "data", "key"), MSG_CASES)
def test_encode_msg_msgpack(topic: str, seq: int, data: Any, key: str | None) -> None:
    obj: dict[str, Any] = {"op": "msg", "topic": topic, "seq": seq, "data": data}
    if key is not None:
        obj["key"] = key
    payload = encode_msg(topic, seq, data, key, Encoding.MSGPACK)
    assert isinstance(payload, bytes)
    assert payload == msgpack.packb(obj, use_bin_type=True)
    assert decode_event(payload, Encoding.MSGPACK) == Msg(topic, seq, data, key)


def test_unicode_is_preserved() -> None:
    data = {"名前": "😀 é ñ ß ключ", "list": ["\u00e9", "e\u0301"]}
    payload = encode_msg("t", 1, data, "ключ", Encoding.JSON)
    assert isinstance(payload, str)
    assert "😀" in payload  # not \ud83d\ude00
    assert "\\u" not in payload
    assert decode_event(payload, Encoding.JSON) == Msg("t", 1, data, "ключ")
    for encoding in ENCODINGS:
        command = decode_command(encode_command(Publish(1, "t", data, "ключ"), encoding), encoding)
        assert isinstance(command, Publish)
        assert command.data == data
        assert command.key == "ключ"


def test_escaped_surrogate_pair_is_fine() -> None:
    # Encoders with ensure_ascii (Python's default) send astral characters as
    # a \u surrogate pair; json decodes the pair into one code point.
    frame = '{"op":"pub","topic":"t","data":"\\ud83d\\ude00","key":"\\ud83d\\ude00"}'
    assert decode_command(frame, Encoding.JSON) == Publish(None, "t", "😀", "😀")


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_unknown_fields_are_ignored(encoding: Encoding) -> None:
    extra = {
        "v": 2,
        "trace": {"span": [1, 2]},
        "data2": b"x" if encoding is Encoding.MSGPACK else "x",
    }
    frame = encode({"op": "ping", "id": 1, **extra}, encoding)
    assert decode_command(frame, encoding) == Ping(1)
    frame = encode({"op": "pub", "topic": "t", "data": 1, "future": True}, encoding)
    assert decode_command(frame, encoding) == Publish(None, "t", 1)
    frame = encode({"op": "msg", "topic": "t", "seq": 1, "data": 2, "x": 3}, encoding)
    assert decode_event(frame, encoding) == Msg("t", 1, 2)


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_null_id_and_key_mean_absent(encoding: Encoding) -> None:
    assert decode_command(encode({"op": "ping", "id": None}, encoding), encoding) == Ping(None)
    frame = encode({"op": "pub", "id": None, "topic": "t", "data": None, "key": None}, encoding)
    assert decode_command(frame, encoding) == Publish(None, "t", None, None)


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("data", [None, 0, "", [], {}, False])
def test_falsy_data_is_data(encoding: Encoding, data: Any) -> None:
    frame = encode({"op": "pub", "topic": "t", "data": data}, encoding)
    command = decode_command(frame, encoding)
    assert isinstance(command, Publish)
    assert command.data == data
    assert type(command.data) is type(data)


def test_bytearray_frame_on_msgpack() -> None:
    frame = bytearray(msgpack.packb({"op": "ping", "id": 1}))
    assert decode_command(frame, Encoding.MSGPACK) == Ping(1)  # type: ignore[arg-type]


# JSON values that both encodings must carry unchanged: exactly the data
# decode_command accepts (64-bit ints, finite floats, no surrogates).
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None)
@given(data=json_values, key=st.none() | st.text(min_size=1, max_size=MAX_KEY_LENGTH))
def test_accepted_data_always_reencodes(data: Any, key: str | None) -> None:
    # What the broker accepts on either side, encode_msg can send to both.
    for source in ENCODINGS:
        command = decode_command(encode_command(Publish(1, "a.b", data, key), source), source)
        assert isinstance(command, Publish)
        for target in ENCODINGS:
            payload = encode_msg(command.topic, 1, command.data, command.key, target)
            assert decode_event(payload, target) == Msg("a.b", 1, data, key)


# --------------------------------------------------------------------------
# Bad commands, both encodings
# --------------------------------------------------------------------------

BAD_ID_MESSAGE = "id must be an integer from 0 to 2**53-1 or a string of 1 to 64 characters"

# (frame object, part of the message, expected request_id)
BAD_OBJECTS: list[tuple[Any, str, int | str | None]] = [
    ([{"op": "ping"}], "frame must be an object", None),
    (42, "frame must be an object", None),
    (1.5, "frame must be an object", None),
    ("ping", "frame must be an object", None),
    (None, "frame must be an object", None),
    (True, "frame must be an object", None),
    # op
    ({"id": 1}, "missing field 'op'", 1),
    ({}, "missing field 'op'", None),
    ({"op": 5, "id": 2}, "op must be a string", 2),
    ({"op": None, "id": 2}, "op must be a string", 2),
    ({"op": ["ping"], "id": "r"}, "op must be a string", "r"),
    ({"op": "bogus", "id": 3}, "unknown op 'bogus'", 3),
    ({"op": "PING", "id": 3}, "unknown op 'PING'", 3),
    ({"op": "", "id": 3}, "unknown op ''", 3),
    ({"op": "x" * 1000, "id": 3}, "unknown op '" + "x" * 32 + "'...", 3),
    # id (never readable, so never echoed)
    ({"op": "ping", "id": True}, BAD_ID_MESSAGE, None),
    ({"op": "ping", "id": False}, BAD_ID_MESSAGE, None),
    ({"op": "ping", "id": 1.0}, BAD_ID_MESSAGE, None),
    ({"op": "ping", "id": 1.5}, BAD_ID_MESSAGE, None),
    ({"op": "ping", "id": -1}, BAD_ID_MESSAGE, None),
    ({"op": "ping", "id": MAX_ID + 1}, BAD_ID_MESSAGE, None),
    ({"op": "ping", "id": 2**63}, BAD_ID_MESSAGE, None),
    ({"op": "ping", "id": -(2**63)}, BAD_ID_MESSAGE, None),
    ({"op": "ping", "id": ""}, BAD_ID_MESSAGE, None),
    ({"op": "ping", "id": "x" * (MAX_ID_LENGTH + 1)}, BAD_ID_MESSAGE, None),
    ({"op": "ping", "id": [1]}, BAD_ID_MESSAGE, None),
    ({"op": "ping", "id": {"a": 1}}, BAD_ID_MESSAGE, None),
    ({"op": "bogus", "id": 1.5}, BAD_ID_MESSAGE, None),  # the id is checked first
    # sub / unsub
    ({"op": "sub", "id": 4}, "missing field 'topic'", 4),
    ({"op": "sub", "id": 4, "pattern": "a"}, "missing field 'topic'", 4),
    ({"op": "sub", "id": 4, "topic": 5}, "pattern must be a string", 4),
    ({"op": "sub", "id": 4, "topic": None}, "pattern must be a string", 4),
    ({"op": "sub", "id": 4, "topic": ["a"]}, "pattern must be a string", 4),
    ({"op": "sub", "id": 4, "topic": ""}, "pattern is empty", 4),
    ({"op": "sub", "id": 4, "topic": "a..b"}, "invalid token ''", 4),
    ({"op": "sub", "id": 4, "topic": "a b"}, "invalid token 'a b'", 4),
    ({"op": "sub", "id": 4, "topic": "a.>.b"}, "'>' is only allowed as the last token", 4),
    ({"op": "sub", "id": "s", "topic": ">.a"}, "'>' is only allowed as the last token", "s"),
    ({"op": "sub", "id": 4, "topic": "a*"}, "invalid token 'a*'", 4),
    ({"op": "sub", "id": 4, "topic": "a" * 257}, "pattern is longer than 256", 4),
    ({"op": "unsub", "id": 5}, "missing field 'topic'", 5),
    ({"op": "unsub", "id": 5, "topic": 1}, "pattern must be a string", 5),
    ({"op": "unsub", "id": 5, "topic": "a.>.b"}, "'>' is only allowed as the last token", 5),
    # pub: topic
    ({"op": "pub", "id": 6, "data": 1}, "missing field 'topic'", 6),
    ({"op": "pub", "id": 6, "topic": 7, "data": 1}, "topic must be a string", 6),
    ({"op": "pub", "id": 6, "topic": None, "data": 1}, "topic must be a string", 6),
    ({"op": "pub", "id": 6, "topic": "", "data": 1}, "topic is empty", 6),
    ({"op": "pub", "id": 6, "topic": "a.*", "data": 1}, "wildcards are only allowed", 6),
    ({"op": "pub", "id": 6, "topic": "a.>", "data": 1}, "wildcards are only allowed", 6),
    ({"op": "pub", "id": 6, "topic": ">", "data": 1}, "wildcards are only allowed", 6),
    ({"op": "pub", "id": 6, "topic": "a b", "data": 1}, "topic must be dot-separated", 6),
    ({"op": "pub", "id": 6, "topic": "a.", "data": 1}, "topic must be dot-separated", 6),
    ({"op": "pub", "id": 6, "topic": "é", "data": 1}, "topic must be dot-separated", 6),
    # pub: data
    ({"op": "pub", "id": 7, "topic": "t"}, "missing field 'data'", 7),
    ({"op": "pub", "id": 7, "topic": "t", "Data": 1}, "missing field 'data'", 7),
    (
        {"op": "pub", "id": 7, "topic": "t", "data": nested(MAX_DATA_DEPTH + 1)},
        f"data is nested deeper than {MAX_DATA_DEPTH} levels",
        7,
    ),
    (
        {"op": "pub", "id": 7, "topic": "t", "data": nested(MAX_DATA_DEPTH + 1, "dict")},
        f"data is nested deeper than {MAX_DATA_DEPTH} levels",
        7,
    ),
    # pub: key
    ({"op": "pub", "id": 8, "topic": "t", "data": 1, "key": 5}, "key must be a string", 8),
    ({"op": "pub", "id": 8, "topic": "t", "data": 1, "key": True}, "key must be a string", 8),
    ({"op": "pub", "id": 8, "topic": "t", "data": 1, "key": ["k"]}, "key must be a string", 8),
    ({"op": "pub", "id": 8, "topic": "t", "data": 1, "key": ""}, "key must be a string", 8),
    (
        {"op": "pub", "id": 8, "topic": "t", "data": 1, "key": "k" * (MAX_KEY_LENGTH + 1)},
        "key must be a string of 1 to 256 characters",
        8,
    ),
]


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize(("obj", "message", "request_id"), BAD_OBJECTS)
def test_bad_command(
    obj: Any, message: str, request_id: int | str | None, encoding: Encoding
) -> None:
    error = bad_command(encode(obj, encoding), encoding)
    assert message in error.message
    assert error.request_id == request_id
    assert type(error.request_id) is type(request_id)
    assert error.close_code is None


@pytest.mark.parametrize(
    ("frame", "encoding", "message"),
    [
        (b'{"op":"ping"}', Encoding.JSON, "binary frame on the JSON subprotocol"),
        (b"", Encoding.JSON, "binary frame on the JSON subprotocol"),
        (bytearray(b'{"op":"ping"}'), Encoding.JSON, "binary frame on the JSON subprotocol"),
        ('{"op":"ping"}', Encoding.MSGPACK, "text frame on the msgpack subprotocol"),
        ("", Encoding.MSGPACK, "text frame on the msgpack subprotocol"),
    ],
)
def test_wrong_frame_type_closes(frame: Any, encoding: Encoding, message: str) -> None:
    for decode in (decode_command, decode_event):
        with pytest.raises(ProtocolError) as info:
            decode(frame, encoding)
        assert info.value.code is ErrorCode.BAD_REQUEST
        assert info.value.message == message
        assert info.value.close_code is CloseCode.UNSUPPORTED_DATA
        assert info.value.request_id is None


# --------------------------------------------------------------------------
# Bad commands, JSON only
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("frame", "message", "request_id"),
    [
        ("", "malformed JSON: Expecting value at position 0", None),
        ("   ", "malformed JSON: Expecting value", None),
        ("{", "malformed JSON: Expecting property name", None),
        ('{"op":"ping"', "malformed JSON: Expecting ',' delimiter", None),
        ("{'op':'ping'}", "malformed JSON: Expecting property name", None),
        ('{"op":"ping"} {}', "malformed JSON: Extra data at position 14", None),
        ('{"op":"ping",}', "malformed JSON", None),
        ('{"op":"ping","id":01}', "malformed JSON", None),
        (
            '{"op":"pub","topic":"t","data":"\x01"}',
            "malformed JSON: Invalid control character",
            None,
        ),
        ('{"op":"pub","topic":"t","data":NaN}', "malformed JSON: NaN is not allowed", None),
        (
            '{"op":"pub","topic":"t","data":[Infinity]}',
            "malformed JSON: Infinity is not allowed",
            None,
        ),
        (
            '{"op":"pub","topic":"t","data":-Infinity}',
            "malformed JSON: -Infinity is not allowed",
            None,
        ),
        ('{"op":"ping","id":NaN}', "malformed JSON: NaN is not allowed", None),
        ('{"op":"ping","id":' + "9" * 5000 + "}", "malformed JSON: number too long", None),
        ("[" * 100_000 + "]" * 100_000, "malformed JSON: nested too deeply", None),
        # Valid JSON that would not survive re-encoding.
        (
            '{"op":"pub","id":1,"topic":"t","data":1e400}',
            "data must be JSON-representable (NaN or infinite number)",
            1,
        ),
        (
            '{"op":"pub","id":1,"topic":"t","data":[-1' + "0" * 400 + ".5]}",
            "data must be JSON-representable (NaN or infinite number)",
            1,
        ),
        (
            '{"op":"pub","id":1,"topic":"t","data":18446744073709551616}',
            "data must be msgpack-representable (integer outside the 64-bit range)",
            1,
        ),
        (
            '{"op":"pub","id":1,"topic":"t","data":{"a":-9223372036854775809}}',
            "data must be msgpack-representable (integer outside the 64-bit range)",
            1,
        ),
        (
            '{"op":"pub","id":1,"topic":"t","data":"\\ud800"}',
            "data must be JSON-representable (lone surrogate in a string)",
            1,
        ),
        (
            '{"op":"pub","id":1,"topic":"t","data":{"\\udfff":1}}',
            "data must be JSON-representable (lone surrogate in a string)",
            1,
        ),
        (
            '{"op":"pub","id":1,"topic":"t","data":["ok","x\\ude00y"]}',
            "data must be JSON-representable (lone surrogate in a string)",
            1,
        ),
        (
            '{"op":"pub","id":1,"topic":"t","data":1,"key":"\\ud83d"}',
            "key must not contain lone surrogates",
            1,
        ),
        ('{"op":"ping","id":"\\udc00"}', "id must not contain lone surrogates", None),
        ('{"op":"ping","id":1e2}', BAD_ID_MESSAGE, None),
    ],
)
def test_bad_json_command(frame: str, message: str, request_id: int | None) -> None:
    error = bad_command(frame, Encoding.JSON)
    assert error.message.startswith(message)
    assert error.request_id == request_id
    assert error.close_code is None


def test_json_error_messages_stay_short() -> None:
    error = bad_command('{"op":"' + "x" * 100_000 + '"}', Encoding.JSON)
    assert len(error.message) < 100
    error = bad_command("[" * 100_000, Encoding.JSON)
    assert len(error.message) < 100


# --------------------------------------------------------------------------
# Bad commands, msgpack only
# --------------------------------------------------------------------------

PUB = {"op": "pub", "id": 9, "topic": "t"}


@pytest.mark.parametrize(
    ("frame", "message", "request_id"),
    [
        (b"", "malformed msgpack", None),
        (b"\xc1", "malformed msgpack", None),  # the one never-used type byte
        (b"\x82\xa2op\xa4ping", "malformed msgpack", None),  # truncated map
        (b"\xa4pi", "malformed msgpack", None),  # truncated str
        (b"\x91" * 5000 + b"\x01", "malformed msgpack", None),  # nested beyond msgpack's stack
        (msgpack.packb({1: 2}), "malformed msgpack", None),  # int map key
        (msgpack.packb({"op": "ping", "id": 1}) + b"\x00", "malformed msgpack: extra bytes", None),
        (msgpack.packb({"op": "ping"}) * 2, "malformed msgpack: extra bytes", None),
        (b"\x81\xa2op\xa4pi\xffg", "malformed msgpack: a string is not valid UTF-8", None),
        (
            b"\x81\xa2op\xa3\xed\xa0\x80",  # a surrogate, UTF-8 encoded (CESU-8)
            "malformed msgpack: a string is not valid UTF-8",
            None,
        ),
        (
            msgpack.packb(
                {"op": "pub", "id": 1, "topic": "t", "data": "\ud800"},
                unicode_errors="surrogatepass",
            ),
            "malformed msgpack: a string is not valid UTF-8",
            None,
        ),
        (
            msgpack.packb({**PUB, "data": msgpack.ExtType(5, b"x")}),
            "malformed msgpack: ext types are not allowed",
            None,
        ),
        (
            msgpack.packb({"op": "ping", "id": msgpack.ExtType(1, b"")}),
            "malformed msgpack: ext types are not allowed",
            None,
        ),
        # Valid msgpack that JSON subscribers could not receive.
        (
            msgpack.packb({**PUB, "data": b"raw"}),
            "data must be JSON-representable (bytes is not allowed)",
            9,
        ),
        (
            msgpack.packb({**PUB, "data": {"a": [1, {"b": b""}]}}),
            "data must be JSON-representable (bytes is not allowed)",
            9,
        ),
        (
            msgpack.packb({**PUB, "data": {b"k": 1}}),
            "data must be JSON-representable (map keys must be strings)",
            9,
        ),
        (
            msgpack.packb({**PUB, "data": msgpack.Timestamp(1, 0)}),
            "data must be JSON-representable (Timestamp is not allowed)",
            9,
        ),
        (
            msgpack.packb({**PUB, "data": float("nan")}),
            "data must be JSON-representable (NaN or infinite number)",
            9,
        ),
        (
            msgpack.packb({**PUB, "data": [1.0, float("-inf")]}),
            "data must be JSON-representable (NaN or infinite number)",
            9,
        ),
        (msgpack.packb({**PUB, "topic": b"t", "data": 1}), "topic must be a string", 9),
        (msgpack.packb({**PUB, "data": 1, "key": b"k"}), "key must be a string", 9),
        (msgpack.packb({"op": b"ping", "id": 9}), "op must be a string", 9),
        (msgpack.packb({"op": "ping", "id": b"9"}), BAD_ID_MESSAGE, None),
        (msgpack.packb({b"op": "ping", "id": 9}), "missing field 'op'", 9),
    ],
)
def test_bad_msgpack_command(frame: bytes, message: str, request_id: int | None) -> None:
    error = bad_command(frame, Encoding.MSGPACK)
    assert error.message.startswith(message)
    assert error.request_id == request_id
    assert error.close_code is None


def test_msgpack_float32_and_big_ints_are_fine() -> None:
    frame = msgpack.packb({**PUB, "data": [0.5, 2**64 - 1, -(2**63)]}, use_single_float=True)
    command = decode_command(frame, Encoding.MSGPACK)
    assert isinstance(command, Publish)
    assert command.data == [0.5, 2**64 - 1, -(2**63)]


def test_nan_never_reaches_the_wire() -> None:
    # Defense in depth: the JSON encoder itself refuses NaN too.
    with pytest.raises(ValueError, match="JSON compliant"):
        encode_msg("t", 1, math.nan, None, Encoding.JSON)


# --------------------------------------------------------------------------
# Bad events (client side)
# --------------------------------------------------------------------------

BAD_EVENTS: list[tuple[Any, str]] = [
    ([], "frame must be an object"),
    ("msg", "frame must be an object"),
    ({"id": 1}, "missing field 'op'"),
    ({"op": 1}, "op must be a string"),
    ({"op": "nope"}, "unknown op 'nope'"),
    ({"op": "ok", "id": 1.5}, "id must be an integer or a string"),
    ({"op": "ok", "id": True}, "id must be an integer or a string"),
    ({"op": "ok", "id": 1, "seq": "1"}, "seq must be a non-negative integer"),
    ({"op": "pong", "id": [1]}, "id must be an integer or a string"),
    ({"op": "err", "id": 1, "message": "m"}, "missing field 'code'"),
    ({"op": "err", "id": 1, "code": "c"}, "missing field 'message'"),
    ({"op": "err", "id": 1, "code": 5, "message": "m"}, "code must be a string"),
    ({"op": "dropped", "count": 1}, "missing field 'topic'"),
    ({"op": "dropped", "topic": "t"}, "missing field 'count'"),
    ({"op": "dropped", "topic": "t", "count": -1}, "count must be a non-negative integer"),
    ({"op": "dropped", "topic": "t", "count": True}, "count must be a non-negative integer"),
    ({"op": "msg", "seq": 1, "data": 1}, "missing field 'topic'"),
    ({"op": "msg", "topic": 1, "seq": 1, "data": 1}, "topic must be a string"),
    ({"op": "msg", "topic": "t", "data": 1}, "missing field 'seq'"),
    ({"op": "msg", "topic": "t", "seq": 1.0, "data": 1}, "seq must be a non-negative integer"),
    ({"op": "msg", "topic": "t", "seq": 1}, "missing field 'data'"),
    ({"op": "msg", "topic": "t", "seq": 1, "data": 1, "key": 2}, "key must be a string"),
]


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize(("obj", "message"), BAD_EVENTS)
def test_bad_event(obj: Any, message: str, encoding: Encoding) -> None:
    error = bad_event(encode(obj, encoding), encoding)
    assert error.message == message
    assert error.close_code is None


@pytest.mark.parametrize(
    ("frame", "encoding", "message"),
    [
        ("{", Encoding.JSON, "malformed JSON"),
        ('{"op":"msg","topic":"t","seq":1,"data":NaN}', Encoding.JSON, "malformed JSON"),
        (b"\xc1", Encoding.MSGPACK, "malformed msgpack"),
        (msgpack.packb({"op": "ok"}) + b"\x00", Encoding.MSGPACK, "malformed msgpack"),
    ],
)
def test_malformed_event(frame: str | bytes, encoding: Encoding, message: str) -> None:
    assert bad_event(frame, encoding).message.startswith(message)


def test_encode_command_rejects_non_commands() -> None:
    with pytest.raises(TypeError):
        encode_command(Ok(1), Encoding.JSON)  # type: ignore[arg-type]


@given(st.text(), st.one_of(st.none(), st.text(min_size=1, max_size=20)))
def test_a_string_payload_is_encoded_as_json_encodes_it(text: str, key: str | None) -> None:
    """encode_msg's shortcut for str data gives the text JSONEncoder gives."""
    expected = {"op": "msg", "topic": "t", "seq": 7, "data": text}
    if key is not None:
        expected["key"] = key
    compact = json.dumps(expected, separators=(",", ":"), ensure_ascii=False)
    assert encode_msg("t", 7, text, key, Encoding.JSON) == compact
