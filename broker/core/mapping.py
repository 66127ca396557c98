"""Templates that map an upstream message (decoded JSON) to a topic, key and data.

Sans-I/O, like :mod:`broker.core.topics`: no trio, no sockets.

A **template** is literal text with placeholders in braces. A placeholder is
a **path** into the message, dot-separated: object keys by name, array
elements by index (negative counts from the end); an empty path ``{}`` is
the whole message. Filters follow a ``|``::

    "eth.logs.{params.result.address|lower}"
    "trades.{data.s}"                        # {"data": {"s": "BTCUSDT"}}
    "book.{symbol}.{changes.0.0}"            # first element of the first array
    "{{literal braces}}"                     # {{ and }} stand for { and }

Filters: ``lower``, ``upper``, and ``token``, which replaces every character
that may not appear in a topic token (anything but letters, digits, ``_``,
``-`` and ``:``; the dot included) by ``_``, so ``XBT/USD`` becomes
``XBT_USD``.

A placeholder inside text takes a scalar: a string as it is, a number as
JSON writes it, ``true``/``false``; ``null``, objects and arrays are
errors. A **data** template made of one placeholder and nothing else
(``"{params.result}"``) yields the value itself, whatever its type, so it
selects a sub-object.

A :class:`MessageMapping` combines a topic template (required), an optional
key template, an optional data template (default: the whole message) and
optional ``match`` conditions (path = value) that select which messages it
applies to. :meth:`MessageMapping.apply` raises :class:`MappingError` when a
path is missing or the topic it renders is not a valid topic; sources count
and log those messages and go on.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Final

from broker.core.errors import ConfigError
from broker.core.protocol import MAX_KEY_LENGTH
from broker.core.settings import NON_EMPTY, Check
from broker.core.topics import TopicError, validate_topic

__all__ = [
    "FILTERS",
    "MappingError",
    "MappingSettings",
    "Mappings",
    "MatchMappingSettings",
    "MessageMapping",
    "Template",
    "TemplateText",
    "select",
]

_NOT_TOKEN: Final = re.compile(r"[^A-Za-z0-9_\-:]")
_PATH_SEGMENT: Final = re.compile(r"[^.{}|]+")
_INDEX: Final = re.compile(r"-?[0-9]+")

#: The filters a placeholder may apply, by name.
FILTERS: Final[dict[str, Callable[[str], str]]] = {
    "lower": str.lower,
    "upper": str.upper,
    "token": lambda text: _NOT_TOKEN.sub("_", text),
}

_MISSING: Final[Any] = object()


class MappingError(ValueError):
    """A message could not be mapped; the text says which path or topic failed."""


def _short(text: str, limit: int = 80) -> str:
    return repr(text) if len(text) <= limit else repr(text[:limit]) + "..."


@dataclass(frozen=True, slots=True)
class _Field:
    path: tuple[str, ...]
    filters: tuple[Callable[[str], str], ...]
    text: str  # as written, for error messages

    def lookup(self, root: Any) -> Any:
        value = root
        for i, segment in enumerate(self.path):
            if type(value) is dict:
                value = value.get(segment, _MISSING)
            elif type(value) is list and _INDEX.fullmatch(segment):
                index = int(segment)
                value = value[index] if -len(value) <= index < len(value) else _MISSING
            else:
                value = _MISSING
            if value is _MISSING:
                where = ".".join(self.path[: i + 1])
                raise MappingError(f"no value at {where}")
        return value


def _scalar_text(value: Any, field: _Field) -> str:
    t = type(value)
    if t is str:
        return str(value)
    if t is bool:
        return "true" if value else "false"
    if t is int or t is float:
        return json.dumps(value)
    name = {dict: "an object", list: "an array", type(None): "null"}.get(t, t.__name__)
    raise MappingError(f"{{{field.text}}} is {name}, not a string or a number")


class Template:
    """A compiled template (see the module doc for the syntax).

    Raises:
        ValueError: for a syntax error (an unclosed brace, an empty path
            segment, an unknown filter).
    """

    __slots__ = ("_parts", "text")

    def __init__(self, text: str) -> None:
        self.text = text
        parts: list[str | _Field] = []
        literal: list[str] = []
        i = 0
        n = len(text)
        while i < n:
            c = text[i]
            if c == "{":
                if text.startswith("{{", i):
                    literal.append("{")
                    i += 2
                    continue
                end = text.find("}", i + 1)
                if end < 0:
                    raise ValueError(f"unclosed '{{' at position {i}")
                if literal:
                    parts.append("".join(literal))
                    literal = []
                parts.append(_parse_field(text[i + 1 : end]))
                i = end + 1
            elif c == "}":
                if not text.startswith("}}", i):
                    raise ValueError(f"single '}}' at position {i} (write '}}}}' for a brace)")
                literal.append("}")
                i += 2
            else:
                literal.append(c)
                i += 1
        if literal:
            parts.append("".join(literal))
        self._parts: tuple[str | _Field, ...] = tuple(parts)

    def __repr__(self) -> str:
        return f"Template({self.text!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Template) and other.text == self.text

    def __hash__(self) -> int:
        return hash(self.text)

    @property
    def whole_value(self) -> bool:
        """True if the template is a single placeholder without filters."""
        return (
            len(self._parts) == 1
            and isinstance(self._parts[0], _Field)
            and not self._parts[0].filters
        )

    def render(self, root: Any) -> str:
        """The text, every placeholder replaced (scalars only)."""
        out: list[str] = []
        for part in self._parts:
            if isinstance(part, str):
                out.append(part)
                continue
            text = _scalar_text(part.lookup(root), part)
            for f in part.filters:
                text = f(text)
            out.append(text)
        return "".join(out)

    def value(self, root: Any) -> Any:
        """For data: a lone placeholder's value as it is, else :meth:`render`."""
        if self.whole_value:
            field = self._parts[0]
            assert isinstance(field, _Field)
            return field.lookup(root)
        return self.render(root)


def _parse_field(body: str) -> _Field:
    path_text, *filter_names = body.split("|")
    path_text = path_text.strip()
    path: tuple[str, ...] = ()
    if path_text:
        path = tuple(path_text.split("."))
        for segment in path:
            if not _PATH_SEGMENT.fullmatch(segment):
                raise ValueError(f"empty or invalid path segment in {{{body}}}")
    filters = []
    for name in filter_names:
        name = name.strip()
        if name not in FILTERS:
            raise ValueError(f"unknown filter {name!r} in {{{body}}} (known: {', '.join(FILTERS)})")
        filters.append(FILTERS[name])
    return _Field(path, tuple(filters), body)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    return bool(a == b)


@dataclass(frozen=True, slots=True)
class MessageMapping:
    """How one kind of upstream message becomes a publish.

    Attributes:
        topic: renders the topic; it must be a valid topic.
        key: renders the key (1 to 256 characters), or ``None`` for no key.
        data: the payload (:meth:`Template.value`), or ``None`` for the whole
            message.
        match: (path, value) pairs that must all hold for the mapping to
            apply; empty matches every message.
    """

    topic: Template
    key: Template | None = None
    data: Template | None = None
    match: tuple[tuple[_Field, Any], ...] = ()

    def matches(self, message: Any) -> bool:
        for field, expected in self.match:
            try:
                value = field.lookup(message)
            except MappingError:
                return False
            if not _same(value, expected):
                return False
        return True

    def apply(self, message: Any) -> tuple[str, Any, str | None]:
        """(topic, data, key) for *message*.

        Raises:
            MappingError: a path is missing or has the wrong type, or the
                topic or key rendered is not valid.
        """
        topic = self.topic.render(message)
        try:
            validate_topic(topic)
        except TopicError as e:
            raise MappingError(f"topic {_short(topic)}: {e}") from None
        key: str | None = None
        if self.key is not None:
            key = self.key.render(message)
            if not 0 < len(key) <= MAX_KEY_LENGTH:
                raise MappingError(f"key must be 1 to {MAX_KEY_LENGTH} characters")
        data = message if self.data is None else self.data.value(message)
        return topic, data, key


def select(mappings: Iterable[MessageMapping], message: Any) -> MessageMapping | None:
    """The first mapping whose ``match`` holds for *message*, or ``None``."""
    for mapping in mappings:
        if mapping.matches(message):
            return mapping
    return None


# -- settings -------------------------------------------------------------------------


def _check_template(text: str) -> None:
    Template(text)  # ValueError: a syntax error


#: A template in a settings table: checked when the settings are read.
TemplateText = Annotated[str, NON_EMPTY, Check(_check_template)]


def _template(text: str | None) -> Template | None:
    return None if text is None else Template(text)


def _flatten(prefix: str, table: Mapping[str, object], out: list[tuple[str, object]]) -> None:
    for name, value in table.items():
        path = f"{prefix}.{name}" if prefix else name
        if isinstance(value, Mapping):
            _flatten(path, value, out)
        else:
            out.append((path, value))


@dataclass(frozen=True, kw_only=True)
class MappingSettings:
    """A mapping's table: ``topic`` (required), ``key`` and ``data`` templates.

    A source whose messages have another natural payload overrides the
    ``data`` default in a subclass (``data: TemplateText | None = "{data}"``).
    """

    topic: TemplateText
    key: TemplateText | None = None
    data: TemplateText | None = None

    def conditions(self) -> tuple[tuple[_Field, Any], ...]:
        return ()

    def build(self) -> MessageMapping:
        """The compiled mapping (the templates were checked when read)."""
        topic = Template(self.topic)
        return MessageMapping(topic, _template(self.key), _template(self.data), self.conditions())


@dataclass(frozen=True, kw_only=True)
class MatchMappingSettings(MappingSettings):
    """A mapping's table with ``match`` conditions (path = value, nested
    tables meaning nested paths)."""

    match: dict[str, object] = dataclasses.field(default_factory=dict)

    def conditions(self) -> tuple[tuple[_Field, Any], ...]:
        pairs: list[tuple[str, object]] = []
        _flatten("", self.match, pairs)
        match: list[tuple[_Field, Any]] = []
        for path, value in pairs:
            if not isinstance(value, str | int | float | bool):
                raise ConfigError(f"match.{path}", "must be a string, a number or a boolean")
            try:
                match.append((_parse_field(path), value))
            except ValueError as e:
                raise ConfigError(f"match.{path}", str(e)) from None
        return tuple(match)

    def validate(self) -> None:
        self.conditions()


#: An array of mapping tables, at least one.
Mappings = Annotated[tuple[MatchMappingSettings, ...], NON_EMPTY]
