"""Protocol v1: a sans-I/O codec for the broker's wire format.

Like h11 and wsproto, this module does no I/O and knows nothing of trio: it
turns WebSocket message payloads into typed commands and events and back.
The caller owns the socket.

Two subprotocols carry the same messages (negotiated with
``Sec-WebSocket-Protocol``, see :data:`SUBPROTOCOLS`):

* ``broker.v1.json``: text frames, one JSON object each;
* ``broker.v1.msgpack``: binary frames, one msgpack map each, same keys.

Client to broker (:data:`Command`)::

    {"op": "sub",   "id": 1, "topic": "trades.*"}
    {"op": "unsub", "id": 2, "topic": "trades.*"}
    {"op": "pub",   "id": 3, "topic": "trades.BTC-USD", "data": {...}, "key": "k"}
    {"op": "ping",  "id": 4}
    {"op": "auth",  "id": 5, "token": "eyJ..."}   (refresh the credentials)
    {"op": "history",  "id": 6, "topic": "chat.room1", "limit": 50}
    {"op": "presence", "id": 7, "topic": "chat.room1"}

A ``sub`` may also carry ``since`` (resume from a position: ``{"epoch": E,
"seq": S}`` on a topic, ``{"cursor": C, "topics": {T: {"seq": S}, ...}}`` on
a pattern), ``history`` (replay the last N messages), ``snapshot`` and
``presence`` (see docs/history.md).

Broker to client (:data:`Event`)::

    {"op": "ok",      "id": 1}            (after a pub also "seq": 7)
    {"op": "err",     "id": 3, "code": "forbidden", "message": "..."}
    {"op": "pong",    "id": 4}
    {"op": "dropped", "topic": "trades.BTC-USD", "count": 12}
    {"op": "msg",     "topic": "trades.BTC-USD", "seq": 7, "data": {...}, "key": "k"}
    {"op": "join",    "topic": "chat.room1", "member": {"subject": "alice", ...}}
    {"op": "leave",   "topic": "chat.room1", "member": {"subject": "alice", ...}}

A ``msg`` with ``seq`` 1 also carries the ``epoch`` it starts; a snapshot
message carries ``"snapshot": true``. An ``ok`` carries the results of its
command: the position of a ``sub`` (``epoch``/``seq``, or ``cursor``), whether
it ``recovered``, the ``messages`` of a ``history``, the members of a
``presence``.

``id`` is optional everywhere and is echoed back so a client can match replies
to requests; ``key`` is optional on ``pub``/``msg``. A JSON ``null`` ``id`` or
``key`` means the same as an absent one. Unknown fields are ignored so that
newer clients can talk to older brokers.

Every message is published once but delivered in both encodings, so ``data``
must survive both: :func:`decode_command` rejects, on either subprotocol, any
``data`` that :func:`encode_msg` could not re-encode (bytes, msgpack ext
types, non-string map keys, NaN/infinity, integers outside the 64-bit range,
lone surrogates, nesting deeper than :data:`MAX_DATA_DEPTH`). Checking that
once at the door means the fan-out hot path can never fail.
"""

from __future__ import annotations

import enum
import json
import json.encoder
import math
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Final, NoReturn

import msgpack
import msgspec
from msgspec import Meta, Struct

from broker.core.errors import CloseCode, ErrorCode, ProtocolError
from broker.core.topics import (
    MAX_TOKENS,
    MAX_TOPIC_LENGTH,
    TopicError,
    is_pattern,
    pattern_matches,
    validate_pattern,
    validate_topic,
)

__all__ = [
    "DEFAULT_HISTORY_LIMIT",
    "MAX_DATA_DEPTH",
    "MAX_HISTORY_REQUEST",
    "MAX_ID",
    "MAX_ID_LENGTH",
    "MAX_KEY_LENGTH",
    "SUBPROTOCOLS",
    "Auth",
    "Command",
    "Dropped",
    "Encoding",
    "Err",
    "Event",
    "HistoryQuery",
    "Join",
    "Leave",
    "Msg",
    "Ok",
    "Payload",
    "Ping",
    "Pong",
    "Position",
    "PresenceQuery",
    "Publish",
    "RequestId",
    "Resume",
    "Subscribe",
    "Unsubscribe",
    "check_publish",
    "decode_command",
    "decode_event",
    "encode_command",
    "encode_dropped",
    "encode_err",
    "encode_member_event",
    "encode_msg",
    "encode_ok",
    "encode_pong",
    "encode_stored_msg",
]


class Encoding(enum.StrEnum):
    """How messages are serialized on one connection."""

    JSON = "json"
    MSGPACK = "msgpack"


#: ``Sec-WebSocket-Protocol`` values the broker accepts, and their encoding.
SUBPROTOCOLS: Final[dict[str, Encoding]] = {
    "broker.v1.json": Encoding.JSON,
    "broker.v1.msgpack": Encoding.MSGPACK,
}

#: A client-chosen request id, echoed back in ``ok``/``err``/``pong``.
RequestId = int | str
#: A message payload: ``str`` for JSON (text frame), ``bytes`` for msgpack
#: (binary frame). :mod:`broker.core.frames` wraps it into a WebSocket frame.
Payload = str | bytes

#: Longest ``key`` of a ``pub``, in characters.
MAX_KEY_LENGTH: Final = 256
#: Longest string ``id``, in characters.
MAX_ID_LENGTH: Final = 64
#: Largest integer ``id``: 2**53 - 1, so that JavaScript clients, whose numbers
#: are doubles, can echo every id exactly.
MAX_ID: Final = 2**53 - 1
#: Deepest nesting of lists/objects inside ``data``. Far beyond real payloads,
#: far below the interpreter's recursion limit, so neither the checks here nor
#: ``json.dumps`` in :func:`encode_msg` can hit a ``RecursionError``.
MAX_DATA_DEPTH: Final = 100

# msgpack integers are at most 64 bits; JSON ones are unbounded. An integer
# outside this range would make msgpack's Packer raise OverflowError.
_MIN_INT: Final = -(2**63)
_MAX_INT: Final = 2**64 - 1

_SURROGATE_RE: Final = re.compile("[\ud800-\udfff]")

#: Most messages a ``sub``'s ``history`` or a ``history`` command's ``limit`` asks for.
MAX_HISTORY_REQUEST: Final = 1000
#: Default ``limit`` of a ``history`` command.
DEFAULT_HISTORY_LIMIT: Final = 100
#: Longest ``cursor`` or ``epoch`` string a client may send back.
MAX_POSITION_LENGTH: Final = 128

_ID_MESSAGE: Final = (
    f"id must be an integer from 0 to 2**53-1 or a string of 1 to {MAX_ID_LENGTH} characters"
)
_KEY_MESSAGE: Final = f"key must be a string of 1 to {MAX_KEY_LENGTH} characters"


# --------------------------------------------------------------------------
# Commands (client -> broker)
# --------------------------------------------------------------------------


# msgspec Structs: built in C (a frozen dataclass pays four object.__setattr__
# calls), compared field by field, matched positionally (``__match_args__``).
# gc=False: a command never takes part in a reference cycle (its fields are
# strings, integers, None and a tree of JSON values), so the collector need not
# track it. Not frozen, so not hashable: nothing hashes commands.


class Publish(Struct, gc=False):
    """``pub``: publish *data* (any JSON value, ``None`` included) on *topic*."""

    id: RequestId | None
    topic: str
    data: Any
    key: str | None = None


class Position(Struct, frozen=True, gc=False):
    """Where a subscriber is on one topic: the engine's *epoch* and the last
    *seq* seen in it (0: nothing yet). An *epoch* of None (in a
    :class:`Resume` only) means "the epoch the topic had at the cursor"."""

    epoch: str | None
    seq: int


class Resume(Struct, frozen=True, gc=False):
    """Where a pattern subscriber is: the *cursor* its last ``ok`` gave, and
    the last position it saw on each topic it got messages of."""

    cursor: str
    topics: dict[str, Position]


class Subscribe(Struct, gc=False):
    """``sub``: deliver messages whose topic matches *pattern*.

    *since*: resume from a :class:`Position` (a topic) or a :class:`Resume`
    (a pattern); *history*: first replay up to that many latest messages;
    *snapshot*: first send the latest message per topic and key;
    *presence*: also get ``join``/``leave`` events of the topic.
    """

    id: RequestId | None
    pattern: str
    since: Position | Resume | None = None
    history: int | None = None
    snapshot: bool = False
    presence: bool = False

    @property
    def plain(self) -> bool:
        """True for a ``sub`` with none of the options."""
        return (
            self.since is None and self.history is None and not self.snapshot and not self.presence
        )


class Unsubscribe(Struct, gc=False):
    """``unsub``: stop a subscription made with the same *pattern*."""

    id: RequestId | None
    pattern: str


class HistoryQuery(Struct, gc=False):
    """``history``: stored messages of *topic*, without subscribing: after
    *since* if given (oldest first), else the latest *limit*."""

    id: RequestId | None
    topic: str
    since: Position | None = None
    limit: int = DEFAULT_HISTORY_LIMIT


class PresenceQuery(Struct, gc=False):
    """``presence``: who is subscribed to *topic*."""

    id: RequestId | None
    topic: str


class Ping(Struct, gc=False):
    """``ping``: ask for a ``pong`` (liveness check at the protocol level)."""

    id: RequestId | None


class Auth(Struct, gc=False):
    """``auth``: present a new *token* for this connection (e.g. a fresh JWT
    before the current one expires). The token stays out of ``repr()``."""

    id: RequestId | None
    token: str

    def __repr__(self) -> str:
        return f"Auth(id={self.id!r})"

    def __rich_repr__(self) -> list[tuple[str, Any]]:
        return [("id", self.id)]


#: Every command, a closed union: ``match command:`` with one ``case`` per
#: class and ``case _: typing.assert_never(command)`` is checked exhaustively.
Command = Publish | Subscribe | Unsubscribe | Auth | Ping | HistoryQuery | PresenceQuery


# --------------------------------------------------------------------------
# Events (broker -> client)
# --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Err:
    """A command failed. *code* is kept as a ``str`` (not :class:`ErrorCode`)
    so that a client does not break when a newer broker adds codes."""

    id: RequestId | None
    code: str
    message: str


@dataclass(frozen=True, slots=True)
class Pong:
    """Answer to a ``ping``."""

    id: RequestId | None


@dataclass(frozen=True, slots=True)
class Dropped:
    """The broker dropped *count* messages for subscription *topic* because
    the client did not read fast enough."""

    topic: str
    count: int


@dataclass(frozen=True, slots=True)
class Msg:
    """A published message. *seq* is the broker's per-topic sequence number;
    *epoch* is set on the first message of an epoch (``seq`` 1); *snapshot*
    marks a message sent as part of a snapshot, not live."""

    topic: str
    seq: int
    data: Any
    key: str | None = None
    epoch: str | None = None
    snapshot: bool = False


@dataclass(frozen=True, slots=True)
class Ok:
    """The command with this *id* succeeded, and what it found.

    Attributes:
        seq: a ``pub``: the message's seq. A ``sub`` on a topic with history,
            or a ``history``: the topic's latest seq (with *epoch*).
        epoch: the topic's epoch (``sub`` on a topic, ``history``).
        cursor: a ``sub`` on a pattern: where to resume from next time.
        recovered: a ``sub`` with ``since`` (or a ``history`` with ``since``):
            True when nothing was missed.
        lost: a pattern's recovery: topics it could not replay.
        unknown: a pattern's recovery: messages of topics the broker no
            longer knows may have been missed.
        messages: a ``history``: the messages, oldest first.
        more: a ``history``: more messages follow the last one returned.
        count: a ``presence``: members (distinct identities) subscribed.
        connections: a ``presence``: connections subscribed.
        members: a ``presence``: the members, when no more than the cap.
    """

    id: RequestId | None
    seq: int | None = None
    epoch: str | None = None
    cursor: str | None = None
    recovered: bool | None = None
    lost: tuple[str, ...] = ()
    unknown: bool = False
    messages: tuple[Msg, ...] = ()
    more: bool = False
    count: int | None = None
    connections: int | None = None
    members: tuple[dict[str, Any], ...] | None = None


@dataclass(frozen=True, slots=True)
class Join:
    """*member* (``subject``, ``connections`` and the fields the presence
    rule shows) subscribed to *topic*: its first connection there."""

    topic: str
    member: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Leave:
    """*member*'s last connection subscribed to *topic* has gone."""

    topic: str
    member: dict[str, Any]


Event = Ok | Err | Pong | Dropped | Msg | Join | Leave


# --------------------------------------------------------------------------
# Low-level (de)serialization
# --------------------------------------------------------------------------

# Sentinel for "field absent": ``None`` is a legal value of ``data``.
_MISSING: Final[Any] = object()


class _ExtTypeError(Exception):
    """Raised from msgpack's ext_hook: ext types have no JSON equivalent."""


class _NotAllowedConstant(Exception):
    """Raised from json's parse_constant on NaN, Infinity and -Infinity."""


def _reject_ext(code: int, data: bytes) -> NoReturn:
    raise _ExtTypeError(code)


def _reject_constant(name: str) -> NoReturn:
    # Python's json accepts these non-standard literals by default; we would
    # then re-emit them (or fail with allow_nan=False) on the way out.
    raise _NotAllowedConstant(name)


# One decoder/encoder built up front: json.loads/json.dumps with non-default
# arguments would build a new JSONDecoder/JSONEncoder on every call.
_json_decode: Final = json.JSONDecoder(parse_constant=_reject_constant).decode
_json_encode: Final = json.JSONEncoder(
    separators=(",", ":"), ensure_ascii=False, allow_nan=False
).encode
# The C string encoder used by _json_encode itself (ensure_ascii=False flavour).
_json_string: Final = json.encoder.encode_basestring

# Reused for every message: cheaper than msgpack.packb, which builds a Packer
# per call. A Packer is not reentrant, but it never calls back into Python
# here (no ``default`` hook) and the broker is single-threaded. With
# autoreset (the default) pack() returns the bytes and clears the buffer,
# also when it raises.
_packer: Final = msgpack.Packer(use_bin_type=True)
_pack: Final[Callable[[Any], bytes]] = _packer.pack


def _bad(message: str, request_id: RequestId | None = None) -> ProtocolError:
    return ProtocolError(ErrorCode.BAD_REQUEST, message, request_id=request_id)


def _short(text: str, limit: int = 32) -> str:
    """repr() of client text for an error message: quoted, escaped, bounded."""
    if len(text) > limit:
        return repr(text[:limit]) + "..."
    return repr(text)


def _has_surrogate(text: str) -> bool:
    # isascii() is O(1) for str, so the common case costs nothing.
    return not text.isascii() and _SURROGATE_RE.search(text) is not None


def _load(frame: str | bytes, encoding: Encoding) -> Any:
    """Deserialize one payload, mapping every failure to a ProtocolError."""
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
            # Not a JSONDecodeError: int() refused a huge literal
            # (sys.get_int_max_str_digits()).
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
        # msgpack raises a zoo of types (ValueError, OutOfData, StackError,
        # FormatError, TypeError...) whose texts are not meant for clients.
        raise _bad("malformed msgpack") from None


class _Unrepresentable(Exception):
    """``data`` cannot be re-encoded in both encodings; args[0] is the message."""


_NOT_JSON: Final = "data must be JSON-representable ({})"
_TOO_DEEP: Final = f"data is nested deeper than {MAX_DATA_DEPTH} levels"
_INT_RANGE: Final = "data must be msgpack-representable (integer outside the 64-bit range)"
_SURROGATE: Final = _NOT_JSON.format("lone surrogate in a string")


def _check_data(value: Any, depth: int, text_escapes: bool) -> None:
    """Raise _Unrepresentable unless *value* encodes in JSON and msgpack.

    Recursive, bounded by MAX_DATA_DEPTH. Dispatch on the exact type: both
    decoders only produce exact built-in types, and ``bool`` must not pass as
    ``int``. *text_escapes* enables the lone-surrogate check, needed only when
    the JSON text contained ``\\u`` escapes (valid UTF-8 cannot encode a
    surrogate, and msgpack strings are strictly UTF-8 decoded).
    """
    t = type(value)
    if t is str:
        if text_escapes and _has_surrogate(value):
            raise _Unrepresentable(_SURROGATE)
    elif t is int:
        # JSON integers are unbounded; msgpack's Packer would raise
        # OverflowError outside this range.
        if not _MIN_INT <= value <= _MAX_INT:
            raise _Unrepresentable(_INT_RANGE)
    elif t is float:
        # From msgpack, or from an overflowing JSON literal such as 1e400.
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
        # bytes, msgpack Timestamp (ext -1 bypasses ext_hook), ...
        raise _Unrepresentable(_NOT_JSON.format(f"{t.__name__} is not allowed"))


def _read_id(obj: dict[Any, Any]) -> RequestId | None:
    """The command's ``id``, validated; None when absent or null."""
    request_id: object = obj.get("id")
    if request_id is None:
        return None
    # type() rather than isinstance(): bool is an int subclass, and an id of
    # true would be a client bug worth reporting.
    if type(request_id) is int:
        if 0 <= request_id <= MAX_ID:
            return request_id
    elif type(request_id) is str and 0 < len(request_id) <= MAX_ID_LENGTH:
        if _has_surrogate(request_id):
            raise _bad("id must not contain lone surrogates")
        return request_id
    raise _bad(_ID_MESSAGE)


# --------------------------------------------------------------------------
# Broker side: decode commands, encode events
# --------------------------------------------------------------------------


# -- The fast path: msgspec decodes straight into typed frames ----------------
#
# msgspec parses and validates in one pass, in C, into the tagged Structs
# below; decode_command then matches the topic (or pattern) and walks data
# for what the types cannot say. Together they accept a subset of what the
# checks of _decode_checked accept, never more: whatever they refuse is
# decoded again by _decode_checked, which has the final word and the precise
# error message. So the two paths cannot disagree on what is valid, only on
# how fast it is: the slow path runs for bad input and for a few rare valid
# forms: a frame with fields the protocol does not know (see _Frame), an
# ``op`` given twice, a field given twice whose first value is invalid.

_FrameId = (
    Annotated[int, Meta(ge=0, le=MAX_ID)]
    | Annotated[str, Meta(min_length=1, max_length=MAX_ID_LENGTH)]
    | None
)
# Length limits are the Structs' (cheap in msgspec); the grammar of
# broker.topics is one regular expression each, matched in Python after
# decoding: msgspec's Meta(pattern=...) costs twice as much per call. Equal
# to validate_topic/validate_pattern on every string (the tests check it).
_FrameName = Annotated[str, Meta(max_length=MAX_TOPIC_LENGTH)]
_TOKEN: Final = r"[A-Za-z0-9_\-:]+"
_topic_match: Final = re.compile(rf"{_TOKEN}(?:\.{_TOKEN}){{0,{MAX_TOKENS - 1}}}").fullmatch
_pattern_match: Final = re.compile(
    rf"(?:(?:{_TOKEN}|\*)\.){{0,{MAX_TOKENS - 1}}}(?:{_TOKEN}|\*|>)"
).fullmatch
_FrameKey = Annotated[str, Meta(min_length=1, max_length=MAX_KEY_LENGTH)] | None


# data, typed: JSON values nested at most _TYPED_DEPTH levels, integers in
# the int64 range, finite floats. msgspec checks all of that while it parses
# (and refuses bin, ext types, timestamps and non-string keys from msgpack),
# so a pub whose data fits needs no walk in Python. Each level doubles the
# decoder's type tree (built at import: 6 levels, a few milliseconds); data
# nested deeper, or holding an integer from 2**63 to 2**64-1, is decoded
# again as _DeepPubFrame.
_TYPED_DEPTH: Final = 6


def _typed_data(levels: int) -> Any:
    scalar: Any = (
        None
        | bool
        | Annotated[int, Meta(ge=_MIN_INT, le=2**63 - 1)]  # msgspec: no uint64 bound
        | Annotated[float, Meta(ge=-sys.float_info.max, le=sys.float_info.max)]
        | str
    )
    value = scalar
    for _ in range(levels):
        value = scalar | list[value] | dict[str, value]  # type: ignore[valid-type]
    return value


if TYPE_CHECKING:
    _TypedData = Any
else:
    _TypedData = _typed_data(_TYPED_DEPTH)


class _Frame(Struct, tag_field="op", forbid_unknown_fields=True, gc=False):
    """A command as it is on the wire. Unknown fields are refused here (and
    then accepted by the slow path): msgspec skips them without the checks
    _load makes on every value (msgpack ext types and invalid UTF-8, JSON
    integers longer than 4300 digits). Required fields come first, as msgspec
    wants; the public classes keep ``id`` first."""


class _PubFrame(_Frame, tag="pub"):
    topic: _FrameName  # and _topic_match
    data: _TypedData
    id: _FrameId = None
    key: _FrameKey = None


class _DeepPubFrame(_Frame, tag="pub"):
    """A pub whose data _PubFrame refused: any value, for _json_data_ok or
    _msgpack_data_ok to check."""

    topic: _FrameName  # and _topic_match
    data: Any
    id: _FrameId = None
    key: _FrameKey = None


class _SubFrame(_Frame, tag="sub"):
    topic: _FrameName  # and _pattern_match
    id: _FrameId = None


class _UnsubFrame(_Frame, tag="unsub"):
    topic: _FrameName  # and _pattern_match
    id: _FrameId = None


class _PingFrame(_Frame, tag="ping"):
    id: _FrameId = None


class _AuthFrame(_Frame, tag="auth"):
    token: Annotated[str, Meta(min_length=1)]
    id: _FrameId = None


_AnyFrame = _PubFrame | _SubFrame | _UnsubFrame | _PingFrame | _AuthFrame

_json_frame: Final = msgspec.json.Decoder(_AnyFrame).decode
_msgpack_frame: Final = msgspec.msgpack.Decoder(_AnyFrame).decode
_json_deep_pub: Final = msgspec.json.Decoder(_DeepPubFrame).decode
_msgpack_deep_pub: Final = msgspec.msgpack.Decoder(_DeepPubFrame).decode
# A module global: Encoding.JSON, an enum class attribute, is slower to get.
_JSON: Final = Encoding.JSON


_isfinite: Final = math.isfinite


def _json_data_ok(value: Any, depth: int) -> bool:
    """True if _check_data accepts data that msgspec decoded from JSON.

    msgspec's JSON parser already refuses NaN/Infinity literals, numbers that
    overflow a double (``1e400``) and lone surrogates (escaped or not), and
    yields only the exact built-in types; left to test are integers outside
    the 64-bit range and nesting beyond MAX_DATA_DEPTH. Scalars inside a
    container are tested inline: no call per value.
    """
    t = type(value)
    if t is dict:
        values: Any = value.values()
    elif t is list:
        values = value
    elif t is int:
        return True if _MIN_INT <= value <= _MAX_INT else False  # noqa: SIM210 (Any, not bool)
    else:
        return True
    if depth >= MAX_DATA_DEPTH:
        return False
    depth += 1
    for v in values:
        t = type(v)
        if t is int:
            if not _MIN_INT <= v <= _MAX_INT:
                return False
        elif (t is dict or t is list) and not _json_data_ok(v, depth):
            return False
    return True


def _msgpack_data_ok(value: Any, depth: int) -> bool:
    """True if _check_data accepts data msgspec decoded from msgpack.

    The same test, as a boolean, for msgspec's types: ``bytes`` (bin),
    ``msgspec.msgpack.Ext`` (ext types), ``datetime`` (the timestamp ext) and
    non-string map keys are refused, and so are NaN, infinities and nesting
    beyond MAX_DATA_DEPTH. Integers need no test: msgpack has none outside
    the 64-bit range; strings neither: msgspec decodes them strictly.
    """
    t = type(value)
    if t is dict:
        for k in value:
            if type(k) is not str:
                return False
        values: Any = value.values()
    elif t is list:
        values = value
    elif t is float:
        return _isfinite(value)
    else:
        return t is str or t is int or t is bool or value is None
    if depth >= MAX_DATA_DEPTH:
        return False
    depth += 1
    for v in values:
        t = type(v)
        if t is str or t is int or t is bool or v is None:
            continue
        if t is float:
            if not _isfinite(v):
                return False
        elif not _msgpack_data_ok(v, depth):
            return False
    return True


def decode_command(frame: str | bytes, encoding: Encoding) -> Command:
    """Parse one client message.

    *frame* is the message payload as the WebSocket layer delivered it: a
    ``str`` for a text message, ``bytes`` for a binary one. Fields the
    protocol does not know are ignored (forward compatibility); a ``null``
    ``id`` or ``key`` counts as absent. ``data`` is made of the built-in
    ``dict``, ``list``, ``str``, ``int``, ``float``, ``bool`` and ``None``.

    A valid command is decoded by msgspec in one pass. Anything msgspec or the
    topic and data checks after it refuse is decoded again, by the checks in
    Python that find the precise error (or, for the rare valid frames the
    fast path leaves out, the command): the same answer as before msgspec,
    slower.

    Raises:
        ProtocolError: with ``code`` BAD_REQUEST for anything invalid. Once
            the ``id`` has been read, it is set as ``request_id`` so the
            ``err`` reply can be correlated. A frame of the wrong type for the
            subprotocol also sets ``close_code`` UNSUPPORTED_DATA: the client
            speaks something else entirely, so the connection is closed.
    """
    if encoding is _JSON:
        if not isinstance(frame, str):
            return _decode_checked(frame, encoding)  # raises, to close
        try:
            wire = _json_frame(frame)
        except Exception as exc:  # see _decode_deep
            return _decode_deep(frame, encoding, exc)
    else:
        if isinstance(frame, str):
            return _decode_checked(frame, encoding)  # raises, to close
        try:
            wire = _msgpack_frame(frame)
        except Exception as exc:
            return _decode_deep(frame, encoding, exc)
    if type(wire) is _PubFrame:
        if _topic_match(wire.topic) is not None:
            return Publish(wire.id, wire.topic, wire.data, wire.key)
    elif type(wire) is _SubFrame:
        if _pattern_match(wire.topic) is not None:
            return Subscribe(wire.id, wire.topic)
    elif type(wire) is _UnsubFrame:
        if _pattern_match(wire.topic) is not None:
            return Unsubscribe(wire.id, wire.topic)
    elif type(wire) is _PingFrame:
        return Ping(wire.id)
    elif type(wire) is _AuthFrame:
        return Auth(wire.id, wire.token)
    return _decode_checked(frame, encoding)


def _decode_deep(frame: str | bytes, encoding: Encoding, exc: Exception) -> Command:
    """The frame msgspec refused with *exc*: a pub with deep data, or bad.

    msgspec.ValidationError at ``$.data`` (or inside it) may be data nested
    deeper than the typed frame goes, or an integer from 2**63 up: decode
    as _DeepPubFrame and walk data in Python. Anything else (DecodeError
    for malformed input, ValidationError elsewhere, RecursionError,
    UnicodeEncodeError for a str holding a lone surrogate, TypeError for an
    odd frame type) goes to the checked path, which decides.
    """
    if type(exc) is msgspec.ValidationError and "`$.data" in str(exc):
        try:
            # The frame type matches the encoding here (decode_command saw to it).
            if isinstance(frame, str):
                wire = _json_deep_pub(frame)
                data_ok = _json_data_ok(wire.data, 0)
            else:
                wire = _msgpack_deep_pub(frame)
                data_ok = _msgpack_data_ok(wire.data, 0)
        except Exception:
            pass
        else:
            if data_ok and _topic_match(wire.topic) is not None:
                return Publish(wire.id, wire.topic, wire.data, wire.key)
    return _decode_checked(frame, encoding)


def _decode_checked(frame: str | bytes, encoding: Encoding) -> Command:
    """decode_command with every check in Python and the precise error message.

    The reference the fast path defers to (and the decoder before msgspec):
    parse with ``json``/``msgpack``, then look at each field in turn.
    """
    obj = _load(frame, encoding)
    if type(obj) is not dict:
        raise _bad("frame must be an object")
    # Read the id before anything else so that every later error carries it.
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
        # Surrogates can only enter through \u escapes of a JSON text: real
        # text frames are valid UTF-8 (wsproto checks), msgpack strings are
        # decoded strictly.
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
            return _read_subscribe(obj, request_id, pattern)
        return Unsubscribe(request_id, pattern)

    if op == "history":
        topic = _read_topic(obj, request_id)
        since = obj.get("since")
        position = None if since is None else _read_position(since, request_id, "since")
        limit = _read_count(obj, "limit", request_id)
        return HistoryQuery(
            request_id, topic, position, DEFAULT_HISTORY_LIMIT if limit is None else limit
        )

    if op == "presence":
        return PresenceQuery(request_id, _read_topic(obj, request_id))

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


def _read_topic(obj: dict[Any, Any], request_id: RequestId | None) -> str:
    topic = obj.get("topic", _MISSING)
    if topic is _MISSING:
        raise _bad("missing field 'topic'", request_id)
    try:
        return validate_topic(topic)
    except TopicError as exc:
        raise _bad(str(exc), request_id) from None


def _read_count(obj: dict[Any, Any], name: str, request_id: RequestId | None) -> int | None:
    """An optional count of 1 to MAX_HISTORY_REQUEST (null: absent)."""
    value = obj.get(name)
    if value is None:
        return None
    if type(value) is not int or not 0 < value <= MAX_HISTORY_REQUEST:
        raise _bad(f"{name} must be an integer from 1 to {MAX_HISTORY_REQUEST}", request_id)
    return value


def _read_flag(obj: dict[Any, Any], name: str, request_id: RequestId | None) -> bool:
    value = obj.get(name, False)
    if value is None:
        return False
    if type(value) is not bool:
        raise _bad(f"{name} must be true or false", request_id)
    return value


def _read_epoch(value: object, request_id: RequestId | None, where: str) -> str:
    if type(value) is not str or not 0 < len(value) <= MAX_POSITION_LENGTH:
        raise _bad(f"{where} must be a string of 1 to {MAX_POSITION_LENGTH} characters", request_id)
    if _has_surrogate(value):
        raise _bad(f"{where} must not contain lone surrogates", request_id)
    return value


def _read_seq(value: object, request_id: RequestId | None, where: str) -> int:
    if type(value) is not int or not 0 <= value <= _MAX_INT:
        raise _bad(f"{where} must be a non-negative integer", request_id)
    return value


def _read_position(
    value: object, request_id: RequestId | None, where: str, *, epoch_required: bool = True
) -> Position:
    if type(value) is not dict:
        raise _bad(f"{where} must be an object with epoch and seq", request_id)
    epoch = value.get("epoch")
    if epoch is None and not epoch_required:
        text = None
    else:
        text = _read_epoch(epoch, request_id, f"{where}.epoch")
    return Position(text, _read_seq(value.get("seq"), request_id, f"{where}.seq"))


def _read_subscribe(obj: dict[Any, Any], request_id: RequestId | None, pattern: str) -> Subscribe:
    """A ``sub``'s options (see :class:`Subscribe`), checked."""
    since_value = obj.get("since")
    since: Position | Resume | None = None
    if since_value is not None:
        if not is_pattern(pattern):
            since = _read_position(since_value, request_id, "since")
        else:
            if type(since_value) is not dict or "cursor" not in since_value:
                raise _bad(
                    "since on a pattern must be an object with cursor (and topics)", request_id
                )
            cursor = _read_epoch(since_value["cursor"], request_id, "since.cursor")
            topics_value = since_value.get("topics")
            if topics_value is None:
                topics_value = {}
            if type(topics_value) is not dict:
                raise _bad("since.topics must be an object of topic: {seq}", request_id)
            topics: dict[str, Position] = {}
            for topic, position in topics_value.items():
                try:
                    validate_topic(topic)
                except TopicError as exc:
                    raise _bad(f"since.topics: {exc}", request_id) from None
                if not pattern_matches(pattern, topic):
                    raise _bad(f"since.topics: {topic} does not match {pattern}", request_id)
                topics[topic] = _read_position(
                    position, request_id, f"since.topics[{topic}]", epoch_required=False
                )
            since = Resume(cursor, topics)
    history = _read_count(obj, "history", request_id)
    if since is not None and history is not None:
        raise _bad("since and history cannot be combined", request_id)
    return Subscribe(
        request_id,
        pattern,
        since,
        history,
        _read_flag(obj, "snapshot", request_id),
        _read_flag(obj, "presence", request_id),
    )


def check_publish(topic: object, data: Any, key: object = None) -> None:
    """Check a publish that did not come through :func:`decode_command`.

    For in-process publishers (sources, the HTTP API): the same rules as a
    ``pub``: a valid topic, a key of 1 to :data:`MAX_KEY_LENGTH` characters or
    ``None``, and ``data`` representable in both encodings. Lone surrogates
    are always looked for, since *data* may come from anywhere.

    Raises:
        ProtocolError: BAD_REQUEST, with the same messages as a ``pub``.
    """
    try:
        validate_topic(topic)
    except TopicError as exc:
        raise _bad(str(exc)) from None
    if key is not None:
        if type(key) is not str or not 0 < len(key) <= MAX_KEY_LENGTH:
            raise _bad(_KEY_MESSAGE)
        if _has_surrogate(key):
            raise _bad("key must not contain lone surrogates")
    try:
        _check_data(data, 0, True)
    except _Unrepresentable as exc:
        raise _bad(exc.args[0]) from None


def _with_id(fields: dict[str, Any], id: RequestId | None, encoding: Encoding) -> Payload:
    # Not the hot path: clarity over speed. "id" goes second, after "op".
    if id is not None:
        fields = {"op": fields.pop("op"), "id": id, **fields}
    if encoding is Encoding.JSON:
        return _json_encode(fields)
    return _pack(fields)


def encode_ok(
    id: RequestId | None,
    encoding: Encoding,
    *,
    seq: int | None = None,
    fields: dict[str, Any] | None = None,
) -> Payload:
    """``{"op":"ok","id":N}`` (no ``id`` when *id* is None).

    For a ``pub``, *seq* is the sequence number the message got; it is added
    as ``"seq":S`` so the publisher learns where its message landed. *fields*
    are a command's results (see :class:`Ok`), added as they are.
    """
    if seq is None and fields is None:
        return _with_id({"op": "ok"}, id, encoding)
    out: dict[str, Any] = {"op": "ok"}
    if seq is not None:
        out["seq"] = seq
    if fields:
        out.update(fields)
    return _with_id(out, id, encoding)


def encode_member_event(op: str, topic: str, member: dict[str, Any], encoding: Encoding) -> Payload:
    """``{"op":"join"|"leave","topic":T,"member":{...}}``."""
    return _with_id({"op": op, "topic": topic, "member": member}, None, encoding)


def encode_stored_msg(
    topic: str,
    seq: int,
    data: Any,
    key: str | None,
    encoding: Encoding,
    *,
    epoch: str | None = None,
    snapshot: bool = False,
) -> Payload:
    """A ``msg`` with the optional fields: ``"epoch"`` (set on ``seq`` 1, the
    first message of an epoch) and ``"snapshot": true``. Off the hot path
    except once per epoch; otherwise like :func:`encode_msg`."""
    fields: dict[str, Any] = {"op": "msg", "topic": topic, "seq": seq, "data": data}
    if key is not None:
        fields["key"] = key
    if epoch is not None:
        fields["epoch"] = epoch
    if snapshot:
        fields["snapshot"] = True
    return _with_id(fields, None, encoding)


def encode_err(id: RequestId | None, code: ErrorCode, message: str, encoding: Encoding) -> Payload:
    """``{"op":"err","id":N,"code":C,"message":M}`` (no ``id`` when None)."""
    return _with_id({"op": "err", "code": str(code), "message": message}, id, encoding)


def encode_pong(id: RequestId | None, encoding: Encoding) -> Payload:
    """``{"op":"pong","id":N}`` (no ``id`` when *id* is None)."""
    return _with_id({"op": "pong"}, id, encoding)


def encode_dropped(topic: str, count: int, encoding: Encoding) -> Payload:
    """``{"op":"dropped","topic":T,"count":N}``."""
    return _with_id({"op": "dropped", "topic": topic, "count": count}, None, encoding)


class _MsgFrame(Struct, tag="msg", tag_field="op", omit_defaults=True, gc=False):
    """``msg`` as msgspec encodes it: the map {"op", "topic", "seq", "data"}
    and "key" unless None, in that order; the same bytes as _pack of that dict
    (the tests check it), in half the time."""

    topic: str
    seq: int
    data: Any
    key: str | None = None


_msgpack_msg: Final = msgspec.msgpack.Encoder().encode


def encode_msg(topic: str, seq: int, data: Any, key: str | None, encoding: Encoding) -> Payload:
    """``{"op":"msg","topic":T,"seq":S,"data":D}``, plus ``"key"`` when not None.

    The hot path: called once per published message and encoding, never per
    subscriber. *topic* must have passed :func:`~broker.core.topics.validate_topic`
    and *data* :func:`decode_command` (or be equally tame); then this cannot
    fail.
    """
    if encoding is Encoding.JSON:
        # The json module, not msgspec's encoder, though that one is 3 to 9
        # times faster here: it would change the text clients get (exponents
        # spelled 1e16 and 1e-7, not 1e+16 and 1e-07) and write NaN as null
        # where this raises.
        # A validated topic is ASCII letters, digits, '_', '-', ':' and '.':
        # nothing JSON would escape, so it goes in verbatim.
        # A string (text, or JSON a publisher serialized itself) goes straight
        # to the C string encoder: the same text as through JSONEncoder.encode,
        # without its Python layer.
        body = _json_string(data) if data.__class__ is str else _json_encode(data)
        if key is None:
            return f'{{"op":"msg","topic":"{topic}","seq":{seq},"data":{body}}}'
        return (
            f'{{"op":"msg","topic":"{topic}","seq":{seq},"data":{body},"key":{_json_string(key)}}}'
        )
    return _msgpack_msg(_MsgFrame(topic, seq, data, key))


# --------------------------------------------------------------------------
# Client side: encode commands, decode events
# --------------------------------------------------------------------------


def encode_command(command: Command, encoding: Encoding) -> Payload:
    """Serialize *command* for the broker (``id``/``key`` omitted when None).

    No validation: the broker is the authority and answers with ``err``.

    Raises:
        ValueError, TypeError, OverflowError: *data* of a Publish cannot be
            serialized in *encoding* (e.g. NaN, a set, a huge int).
    """
    fields: dict[str, Any]
    if isinstance(command, Publish):
        fields = {"op": "pub", "topic": command.topic, "data": command.data}
        if command.key is not None:
            fields["key"] = command.key
    elif isinstance(command, Subscribe):
        fields = {"op": "sub", "topic": command.pattern}
        since = command.since
        if isinstance(since, Position):
            fields["since"] = _position_fields(since)
        elif isinstance(since, Resume):
            fields["since"] = {
                "cursor": since.cursor,
                "topics": {t: _position_fields(p) for t, p in since.topics.items()},
            }
        if command.history is not None:
            fields["history"] = command.history
        if command.snapshot:
            fields["snapshot"] = True
        if command.presence:
            fields["presence"] = True
    elif isinstance(command, HistoryQuery):
        fields = {"op": "history", "topic": command.topic, "limit": command.limit}
        if command.since is not None:
            fields["since"] = _position_fields(command.since)
    elif isinstance(command, PresenceQuery):
        fields = {"op": "presence", "topic": command.topic}
    elif isinstance(command, Unsubscribe):
        fields = {"op": "unsub", "topic": command.pattern}
    elif isinstance(command, Ping):
        fields = {"op": "ping"}
    elif isinstance(command, Auth):
        fields = {"op": "auth", "token": command.token}
    else:
        raise TypeError(f"not a command: {command!r}")
    return _with_id(fields, command.id, encoding)


def _position_fields(position: Position) -> dict[str, Any]:
    if position.epoch is None:
        return {"seq": position.seq}
    return {"epoch": position.epoch, "seq": position.seq}


def _event_id(obj: dict[Any, Any]) -> RequestId | None:
    request_id = obj.get("id")
    if request_id is None or type(request_id) in (int, str):
        return request_id
    raise _bad("id must be an integer or a string")


def _event_str(obj: dict[Any, Any], name: str) -> str:
    value = obj.get(name, _MISSING)
    if type(value) is not str:
        raise _bad(f"missing field {name!r}" if value is _MISSING else f"{name} must be a string")
    return value


def _event_int(obj: dict[Any, Any], name: str) -> int:
    value = obj.get(name, _MISSING)
    if type(value) is not int or value < 0:
        if value is _MISSING:
            raise _bad(f"missing field {name!r}")
        raise _bad(f"{name} must be a non-negative integer")
    return value


def _event_msg(obj: dict[Any, Any], topic: str) -> Msg:
    seq = _event_int(obj, "seq")
    data = obj.get("data", _MISSING)
    if data is _MISSING:
        raise _bad("missing field 'data'")
    key = obj.get("key")
    if key is not None and type(key) is not str:
        raise _bad("key must be a string")
    epoch = obj.get("epoch")
    if epoch is not None and type(epoch) is not str:
        raise _bad("epoch must be a string")
    return Msg(topic, seq, data, key, epoch, obj.get("snapshot") is True)


def _event_optional(obj: dict[Any, Any], name: str, kind: type) -> Any:
    value = obj.get(name)
    if value is not None and type(value) is not kind:
        raise _bad(f"{name} must be a {kind.__name__}")
    return value


def _event_ok(obj: dict[Any, Any]) -> Ok:
    """An ``ok`` with results (see :class:`Ok`)."""
    seq = None if obj.get("seq") is None else _event_int(obj, "seq")
    lost = obj.get("lost") or []
    if type(lost) is not list or not all(type(t) is str for t in lost):
        raise _bad("lost must be a list of topics")
    messages_value = obj.get("messages") or []
    if type(messages_value) is not list or not all(type(m) is dict for m in messages_value):
        raise _bad("messages must be a list of objects")
    # A history answer names its topic once, not in each message.
    messages = tuple(
        _event_msg(m, _event_str(m if "topic" in m else obj, "topic")) for m in messages_value
    )
    members_value = obj.get("members")
    members: tuple[dict[str, Any], ...] | None = None
    if members_value is not None:
        if type(members_value) is not list or not all(type(m) is dict for m in members_value):
            raise _bad("members must be a list of objects")
        members = tuple(members_value)
    return Ok(
        _event_id(obj),
        seq,
        _event_optional(obj, "epoch", str),
        _event_optional(obj, "cursor", str),
        _event_optional(obj, "recovered", bool),
        tuple(lost),
        obj.get("unknown") is True,
        messages,
        obj.get("more") is True,
        None if obj.get("count") is None else _event_int(obj, "count"),
        None if obj.get("connections") is None else _event_int(obj, "connections"),
        members,
    )


def decode_event(frame: str | bytes, encoding: Encoding) -> Event:
    """Parse one broker message (client side).

    Unknown fields are ignored. ``data`` is not checked beyond being present:
    the broker already did.

    Raises:
        ProtocolError: BAD_REQUEST when the frame is malformed; for a frame of
            the wrong type ``close_code`` is UNSUPPORTED_DATA, as on the
            broker side.
    """
    obj = _load(frame, encoding)
    if type(obj) is not dict:
        raise _bad("frame must be an object")
    op = obj.get("op", _MISSING)
    if op is _MISSING:
        raise _bad("missing field 'op'")
    if type(op) is not str:
        raise _bad("op must be a string")

    if op == "msg":
        return _event_msg(obj, _event_str(obj, "topic"))
    if op == "ok":
        if len(obj) <= 2 or (len(obj) == 3 and "seq" in obj and "id" in obj):
            if obj.get("seq") is None:
                return Ok(_event_id(obj))
            return Ok(_event_id(obj), _event_int(obj, "seq"))
        return _event_ok(obj)
    if op == "join" or op == "leave":
        member = obj.get("member")
        if type(member) is not dict:
            raise _bad("member must be an object")
        cls = Join if op == "join" else Leave
        return cls(_event_str(obj, "topic"), member)
    if op == "err":
        return Err(_event_id(obj), _event_str(obj, "code"), _event_str(obj, "message"))
    if op == "pong":
        return Pong(_event_id(obj))
    if op == "dropped":
        return Dropped(_event_str(obj, "topic"), _event_int(obj, "count"))
    raise _bad(f"unknown op {_short(op)}")
