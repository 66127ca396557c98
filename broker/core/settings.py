"""Typed settings: how ``broker.toml`` and every ``[plugin.NAME]`` table are read.

A table is described by a frozen dataclass; :func:`parse` checks a parsed
TOML table against it and returns an instance, so the rest of the code reads
typed attributes (``settings.port``) that ``mypy --strict`` checks::

    from dataclasses import dataclass
    from typing import Annotated

    from broker.core.settings import File, Meta, parse

    @dataclass(frozen=True, kw_only=True)
    class AuditSettings:
        path: Annotated[str, File(exists=False), Meta(min_length=1)]
        topics: Annotated[tuple[TopicPattern, ...], Meta(min_length=1)] = (">",)
        include_data: bool = False

    s = parse(AuditSettings, settings, source=context.config.source)

Field types: ``bool``, ``int``, ``float`` (an integer is accepted, ``5``
means ``5.0``; never a boolean, ``nan`` or ``inf``), ``str``, a
``Literal`` of strings, an :class:`enum.Enum` (by value), ``tuple[X, ...]``
and ``frozenset[X]`` (arrays), ``dict[str, X]`` (a table of any keys), a
nested dataclass (a table), ``X | None`` (``None`` as a default: TOML has
no null), unions (the first type that fits) and ``object`` (any value).
``Annotated`` adds constraints: :class:`Meta` (bounds, non-empty),
:class:`Check` (a function raising :class:`ValueError`), :class:`File` and
:class:`Dir` (a path, resolved from the configuration file's directory).

A field without a default is required. Unknown keys are refused, with a
"did you mean" when one is close. A class may define ``validate(self)`` for
checks that span fields; :func:`parse` calls the ``validate`` of the class
and of each base that defines one (bases first) and prefixes the key of the
:class:`~broker.core.errors.ConfigError` it raises (relative to the table, ``""``
for the table itself). Errors name the whole key: ``queue.rules[2].policy:
must be one of ...``, and a plugin's are prefixed with ``plugin.NAME.`` by
the plugin host.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import math
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Final, Literal, TypeVar, Union

from broker.core.errors import ConfigError
from broker.core.topics import validate_pattern

__all__ = [
    "NON_EMPTY",
    "Check",
    "Dir",
    "File",
    "Meta",
    "NonEmptyStr",
    "Port",
    "Seconds",
    "TopicPattern",
    "did_you_mean",
    "join_key",
    "parse",
    "parse_settings",
]

T = TypeVar("T")


@dataclasses.dataclass(frozen=True, slots=True)
class Meta:
    """Bounds of a number, or the least length of a string, array or table.

    *hint* is added to the reason of a bound that fails (``"0: no limit"``).
    """

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    min_length: int | None = None
    hint: str = ""


@dataclasses.dataclass(frozen=True, slots=True)
class Check:
    """Calls *func* with the converted value; a ValueError's text is the reason."""

    func: Callable[[Any], object]


@dataclasses.dataclass(frozen=True, slots=True)
class File:
    """A file path: made absolute from the configuration file's directory, and
    (unless *exists* is false) it must name an existing file. ``""`` is unset."""

    exists: bool = True


@dataclasses.dataclass(frozen=True, slots=True)
class Dir:
    """A directory path, resolved like :class:`File`; it must exist."""


#: Strings, arrays and tables that must not be empty.
NON_EMPTY: Final = Meta(min_length=1)
NonEmptyStr = Annotated[str, NON_EMPTY]
#: A duration in seconds, > 0.
Seconds = Annotated[float, Meta(gt=0)]
Port = Annotated[int, Meta(ge=0, le=65535)]
TopicPattern = Annotated[str, Check(validate_pattern)]


def join_key(prefix: str, key: str) -> str:
    """``prefix.key`` (``prefix[0]`` for an index, either alone if the other is empty)."""
    if not prefix or not key:
        return prefix or key
    return prefix + key if key.startswith("[") else f"{prefix}.{key}"


def parse(cls: type[T], data: object, *, prefix: str = "", source: Path | None = None) -> T:
    """Check *data* (a TOML table) against the dataclass *cls* and build it.

    Args:
        prefix: the key of the table, for errors (``""`` in a plugin: the
            plugin host adds ``plugin.NAME``).
        source: the configuration file; :class:`File` and :class:`Dir`
            paths are resolved from its directory.

    Raises:
        ConfigError: naming the full key and the reason.
    """
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    try:
        return typing.cast(T, _Reader(source).table(cls, data, prefix))
    except _WrongType as e:
        raise ConfigError(e.key, e.reason) from None


#: :func:`parse`, as :mod:`broker` exports it for plugin authors.
parse_settings: Final = parse


# -- the reader ---------------------------------------------------------------------


class _WrongType(ConfigError):
    """The value is not of the field's type (a union tries its next type)."""


_hints: dict[type, dict[str, Any]] = {}


def _show(value: object) -> str:
    if isinstance(value, Mapping):
        return "a table"
    if isinstance(value, list | tuple):
        return "an array"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def _kind(tp: Any) -> str:
    """What a value of type *tp* is called in TOML, for "expected ..." reasons."""
    origin = typing.get_origin(tp)
    if origin is Annotated:
        return _kind(typing.get_args(tp)[0])
    if origin in (tuple, frozenset):
        item = typing.get_args(tp)[0]
        return "an array of tables" if dataclasses.is_dataclass(item) else "an array"
    if origin in (dict, Mapping) or dataclasses.is_dataclass(tp):
        return "a table"
    if origin in (Union, types.UnionType):
        return " or ".join(_kind(a) for a in typing.get_args(tp) if a is not type(None))
    if origin is Literal or (isinstance(tp, type) and issubclass(tp, enum.Enum)):
        return "a string"
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}
    return names.get(tp, getattr(tp, "__name__", str(tp)))


class _Reader:
    def __init__(self, source: Path | None) -> None:
        self.base = source.parent if source is not None else None

    def table(self, cls: type, data: object, prefix: str) -> object:
        if not isinstance(data, Mapping):
            raise _WrongType(prefix or "settings", f"expected a table, got {_show(data)}")
        hints = _hints.get(cls)
        if hints is None:
            hints = _hints[cls] = typing.get_type_hints(cls, include_extras=True)
        fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
        for name in sorted(data):
            if name not in fields:
                raise ConfigError(join_key(prefix, str(name)), _unknown(name, data, fields))
        values: dict[str, object] = {}
        for name, f in fields.items():
            if name in data:
                values[name] = self.value(hints[name], data[name], join_key(prefix, name))
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(join_key(prefix, name), "required")
        obj = cls(**values)
        for klass in reversed(cls.__mro__):
            validate = klass.__dict__.get("validate")
            if validate is not None:
                try:
                    validate(obj)
                except ConfigError as e:
                    raise ConfigError(join_key(prefix, e.key), e.reason) from None
        return obj

    def value(self, tp: Any, value: object, key: str) -> object:
        origin = typing.get_origin(tp)
        args = typing.get_args(tp)
        if origin is Annotated:
            result = self.value(args[0], value, key)
            for meta in tp.__metadata__:
                result = self.constrain(meta, result, key)
            return result
        if tp is object:
            return value
        if dataclasses.is_dataclass(tp):
            return self.table(typing.cast(type, tp), value, key)
        if origin in (Union, types.UnionType):
            return self.union(tp, args, value, key)
        if origin is Literal:
            if not isinstance(value, str) or value not in args:
                raise _WrongType(key, f"must be one of {', '.join(map(str, args))}")
            return value
        if isinstance(tp, type) and issubclass(tp, enum.Enum):
            choices = [m.value for m in tp]
            if value not in choices:
                raise _WrongType(key, f"must be one of {', '.join(map(str, choices))}")
            return tp(value)
        if origin in (tuple, frozenset):
            if not isinstance(value, list):
                raise _WrongType(key, f"expected {_kind(tp)}, got {_show(value)}")
            items = [self.value(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)]
            return tuple(items) if origin is tuple else frozenset(items)
        if origin in (dict, Mapping):
            if not isinstance(value, Mapping):
                raise _WrongType(key, f"expected {_kind(tp)}, got {_show(value)}")
            return {str(k): self.value(args[1], v, join_key(key, str(k))) for k, v in value.items()}
        return _scalar(tp, value, key)

    def union(self, tp: Any, args: tuple[Any, ...], value: object, key: str) -> object:
        options = [arg for arg in args if arg is not type(None)]
        for arg in options:
            try:
                return self.value(arg, value, key)
            except _WrongType as e:
                if e.key != key or len(options) == 1:
                    raise
        raise _WrongType(key, f"expected {_kind(tp)}, got {_show(value)}")

    def constrain(self, meta: object, value: Any, key: str) -> object:
        if isinstance(meta, Meta):
            _bounds(meta, value, key)
        elif isinstance(meta, Check):
            try:
                meta.func(value)
            except ValueError as e:
                raise ConfigError(key, str(e)) from None
        elif isinstance(meta, File | Dir) and value:
            path = Path(value)
            if self.base is not None and not path.is_absolute():
                path = (self.base / path).resolve()
            if isinstance(meta, Dir) and not path.is_dir():
                raise ConfigError(key, f"not a directory: {path}")
            if isinstance(meta, File) and meta.exists and not path.is_file():
                raise ConfigError(key, f"file not found: {path}")
            return str(path)
        return value


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """``"; did you mean `x`?"`` for the choice closest to *name*, or ``""``."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f"; did you mean `{close[0]}`?" if close else ""


def _unknown(name: object, data: Mapping[Any, Any], fields: Mapping[str, object]) -> str:
    what = "unknown table" if isinstance(data[name], Mapping) else "unknown key"
    return what + did_you_mean(str(name), fields)


def _scalar(tp: Any, value: object, key: str) -> object:
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    ok = isinstance(value, tp) and not (tp is not bool and isinstance(value, bool))
    if not ok:
        raise _WrongType(key, f"expected {_kind(tp)}, got {_show(value)}")
    if tp is float and not math.isfinite(typing.cast(float, value)):
        raise ConfigError(key, "must be a finite number")
    return value


def _bounds(meta: Meta, value: Any, key: str) -> None:
    if meta.min_length is not None and len(value) < meta.min_length:
        if meta.min_length == 1:
            raise ConfigError(key, "must not be empty")
        unit = " characters" if isinstance(value, str) else " entries"
        raise ConfigError(key, f"must have at least {meta.min_length}{unit}")
    reason = ""
    if meta.ge is not None and meta.le is not None:
        if not meta.ge <= value <= meta.le:
            reason = f"must be between {_number(meta.ge)} and {_number(meta.le)}"
    elif meta.ge is not None and value < meta.ge:
        reason = f"must be >= {_number(meta.ge)}"
    elif meta.le is not None and value > meta.le:
        reason = f"must be <= {_number(meta.le)}"
    if meta.gt is not None and value <= meta.gt:
        reason = f"must be > {_number(meta.gt)}"
    if reason:
        raise ConfigError(key, f"{reason} ({meta.hint})" if meta.hint else reason)
