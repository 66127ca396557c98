"""Strict readers for a plugin's ``[plugin.NAME]`` table.

A plugin factory validates its own settings and raises
:class:`~broker.errors.ConfigError` with a key *relative to its table*
(the plugin host adds ``plugin.NAME.``). :class:`Settings` does the
bookkeeping the way ``broker.toml``'s own tables are read: each key is
popped with its type checked, a missing key takes its default, and
:meth:`Settings.finish` refuses whatever is left, so a typo is never
silently ignored::

    t = Settings(settings)
    host = t.text("host", "127.0.0.1")
    port = t.integer("port", 8080, minimum=0, maximum=65535)
    sources = [Settings(raw, f"sources[{i}]") for i, raw in enumerate(t.array("sources"))]
    t.finish()

Integers are refused where a float is expected only if they are booleans
(``5`` means ``5.0``); floats and booleans are refused where an integer is
expected.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Final

from broker.core.errors import ConfigError

__all__ = ["REQUIRED", "Settings"]


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


#: Default meaning "this key must be given".
REQUIRED: Final[Any] = _Required()


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class Settings:
    """Pops typed keys from one table; errors name ``prefix.key``."""

    def __init__(self, data: object, prefix: str = "") -> None:
        if not isinstance(data, Mapping):
            raise ConfigError(prefix or "settings", "must be a table")
        self.data = dict(data)
        self.prefix = prefix

    def key(self, name: str) -> str:
        """The error key of *name* in this table."""
        return f"{self.prefix}.{name}" if self.prefix else name

    def has(self, name: str) -> bool:
        return name in self.data

    def _pop(self, name: str, default: Any) -> Any:
        if name not in self.data:
            if default is REQUIRED:
                raise ConfigError(self.key(name), "required")
            return default
        return self.data.pop(name)

    def _fail(self, name: str, expected: str, value: object) -> ConfigError:
        return ConfigError(self.key(name), f"expected {expected}, got {_show(value)}")

    def text(self, name: str, default: Any = REQUIRED, *, empty: bool = False) -> Any:
        """A string (non-empty unless *empty*); *default* may be ``None``."""
        value = self._pop(name, default)
        if value is None and default is None:
            return None
        if not isinstance(value, str):
            raise self._fail(name, "a string", value)
        if not value and not empty:
            raise ConfigError(self.key(name), "must not be empty")
        return value

    def flag(self, name: str, default: Any = REQUIRED) -> Any:
        value = self._pop(name, default)
        if not isinstance(value, bool):
            raise self._fail(name, "true or false", value)
        return value

    def integer(
        self, name: str, default: Any = REQUIRED, *, minimum: int = 0, maximum: int | None = None
    ) -> Any:
        value = self._pop(name, default)
        if not isinstance(value, int) or isinstance(value, bool):
            raise self._fail(name, "an integer", value)
        if value < minimum:
            raise ConfigError(self.key(name), f"must be >= {minimum}")
        if maximum is not None and value > maximum:
            raise ConfigError(self.key(name), f"must be <= {maximum}")
        return value

    def number(self, name: str, default: Any = REQUIRED, *, zero: bool = False) -> Any:
        """A finite number of seconds (or similar): > 0, or >= 0 with *zero*."""
        value = self._pop(name, default)
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise self._fail(name, "a number", value)
        value = float(value)
        if not math.isfinite(value) or value < 0 or (value == 0 and not zero):
            raise ConfigError(self.key(name), f"must be {'>= 0' if zero else '> 0'}")
        return value

    def choice(self, name: str, choices: tuple[str, ...], default: Any = REQUIRED) -> Any:
        value = self.text(name, default)
        if value not in choices:
            raise ConfigError(self.key(name), f"must be one of {', '.join(choices)}")
        return value

    def array(self, name: str, default: Any = REQUIRED, *, empty: bool = True) -> Any:
        value = self._pop(name, default)
        if not isinstance(value, list):
            raise self._fail(name, "an array", value)
        if not value and not empty:
            raise ConfigError(self.key(name), "must not be empty")
        return value

    def strings(self, name: str, default: Any = REQUIRED, *, empty: bool = True) -> Any:
        """A list of non-empty strings, as a tuple."""
        value = self.array(name, default, empty=empty)
        if not all(isinstance(v, str) and v for v in value):
            raise ConfigError(self.key(name), "must be a list of non-empty strings")
        return tuple(value)

    def table(self, name: str, default: Any = REQUIRED) -> Any:
        value = self._pop(name, default)
        if not isinstance(value, Mapping):
            raise self._fail(name, "a table", value)
        return dict(value)

    def tables(self, name: str, default: Any = REQUIRED, *, empty: bool = True) -> list[Settings]:
        """An array of tables, each as a :class:`Settings` named ``name[i]``."""
        raw = self.array(name, default, empty=empty)
        return [Settings(item, f"{self.key(name)}[{i}]") for i, item in enumerate(raw)]

    def finish(self) -> None:
        """Refuse the keys nobody asked for."""
        if self.data:
            raise ConfigError(self.key(sorted(self.data)[0]), "unknown key")
