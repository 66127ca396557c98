"""schema: JSON Schema and size limits per topic pattern.

Configuration::

    [plugin.schema]
    max_bytes = 65536                  # every message (0: no limit, the default)

    [[plugin.schema.rules]]
    pattern = "orders.>"
    schema = "schemas/order.json"      # relative to broker.toml
    max_bytes = 4096

    [[plugin.schema.rules]]
    pattern = "chat.*"
    max_bytes = 1024                   # a size limit alone

For each message the **first** rule whose pattern matches its topic applies
(file order, as for ``[[queue.rules]]``); topics no rule matches only get
the top-level ``max_bytes``. The size of a message is the length in bytes of
its ``data`` encoded as compact JSON (UTF-8), whichever encoding the
publisher used, so the limit means the same on both subprotocols. A message
over it is refused with ``too_large``; one that does not match its schema
with ``invalid`` and the JSON path of the first error, e.g.
``$.price: must be number``. The same checks apply to messages that sources
publish in-process.

Schemas are read and compiled once, when the plugin is created (at start,
and again whenever the broker re-creates its plugins, i.e. on a reload).
Drafts 4, 6 and 7 are supported (draft 7 when ``$schema`` is absent); a
schema is first checked against its draft's metaschema (with
``jsonschema``), then compiled to Python code with ``fastjsonschema``, which
validates a typical message some 20 times faster than ``jsonschema`` does
(see docs/plugins.md). ``$ref`` may only point inside the schema itself
(``#/definitions/...``): the broker never fetches anything. ``format`` is
asserted (``date-time``, ``email``, ...), and ``default`` never fills in
anything: messages are delivered exactly as published.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Final

import fastjsonschema
import jsonschema

from broker import (
    ConfigError,
    ErrorCode,
    Identity,
    PluginContext,
    Refusal,
    hookimpl,
    parse_settings,
    pattern_matches,
)
from broker.settings import NON_EMPTY, File, Meta, TopicPattern

__all__ = [
    "RULE_SETTINGS",
    "SETTINGS",
    "RuleSettings",
    "SchemaRule",
    "SchemaValidator",
    "Settings",
    "create",
    "json_path",
]
#: Topics whose rule is remembered; the cache is emptied when full.
CACHE_SIZE: Final = 4096
#: Longest reason sent back to a publisher.
MAX_REASON: Final = 200

_SUPPORTED_DRAFTS: Final = ("draft4", "draft6", "draft7")
_IDENTIFIER: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_encode: Final = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode

Validate = Any  # a compiled fastjsonschema validator: Callable[[Any], Any]


@dataclass(frozen=True, slots=True)
class SchemaRule:
    """One ``[[plugin.schema.rules]]`` entry, compiled."""

    pattern: str
    validate: Validate | None
    max_bytes: int
    source: str = ""


def json_path(data: Any, path: list[str]) -> str:
    """A JSONPath (``$.a[0]['b c']``) for fastjsonschema's error *path*.

    fastjsonschema names array indexes and object keys alike as strings
    (``['data', 'tags', '1']``), so the data is walked to tell them apart.
    """
    out = "$"
    node = data
    for part in path[1:]:  # path[0] is "data", the root
        if isinstance(node, list):
            try:
                index = int(part)
                node = node[index]
            except (ValueError, IndexError):
                return out
            out += f"[{index}]"
            continue
        if _IDENTIFIER.fullmatch(part):
            out += f".{part}"
        else:
            out += "[" + json.dumps(part, ensure_ascii=False).replace('"', "'") + "]"
        node = node.get(part) if isinstance(node, dict) else None
    return out


class SchemaValidator:
    """Rejects messages that break their topic's schema or size limit."""

    def __init__(self, rules: list[SchemaRule], *, max_bytes: int = 0) -> None:
        self.rules = rules
        self.max_bytes = max_bytes
        self._cache: dict[str, SchemaRule | None] = {}

    def rule_for(self, topic: str) -> SchemaRule | None:
        try:
            return self._cache[topic]
        except KeyError:
            pass
        rule = next((r for r in self.rules if pattern_matches(r.pattern, topic)), None)
        if len(self._cache) >= CACHE_SIZE:
            self._cache.clear()
        self._cache[topic] = rule
        return rule

    def check(self, topic: str, data: Any) -> Refusal | None:
        rule = self.rule_for(topic)
        limit = rule.max_bytes if rule is not None and rule.max_bytes else self.max_bytes
        if limit:
            size = len(_encode(data).encode("utf-8", "surrogatepass"))
            if size > limit:
                return Refusal(
                    ErrorCode.TOO_LARGE, f"data is {size} bytes, more than {limit} on {topic}"
                )
        if rule is None or rule.validate is None:
            return None
        try:
            rule.validate(data)
        except fastjsonschema.JsonSchemaValueException as e:
            path = json_path(data, list(e.path or ["data"]))
            detail = e.message
            if e.name and detail.startswith(e.name):
                detail = detail[len(e.name) :].strip()
            reason = f"{path}: {detail}"
            if len(reason) > MAX_REASON:
                reason = reason[: MAX_REASON - 3] + "..."
            return Refusal(ErrorCode.INVALID, reason)
        return None

    @hookimpl
    def broker_validate(self, identity: Identity, topic: str, data: Any) -> Refusal | None:
        return self.check(topic, data)


# -- configuration ---------------------------------------------------------------


class _NoRemoteRefs(dict[str, Any]):
    """fastjsonschema's ref handlers: claims every URI scheme, fetches nothing."""

    def __contains__(self, scheme: object) -> bool:
        return True

    def __getitem__(self, scheme: str) -> Any:
        return _refuse_remote


def _refuse_remote(uri: str) -> Any:
    raise fastjsonschema.JsonSchemaDefinitionException(
        f"$ref {uri!r} points outside the schema; only local references (#/...) are supported"
    )


def compile_schema(schema: object) -> Validate:
    """Check *schema* against its metaschema, then compile it (ValueError if bad)."""
    if not isinstance(schema, dict | bool):
        raise ValueError("a schema must be a JSON object")
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft7Validator)
    draft = cls.__name__.removesuffix("Validator").lower()
    if draft not in _SUPPORTED_DRAFTS:
        raise ValueError(f"{draft} is not supported; use draft-04, -06 or -07")
    try:
        cls.check_schema(schema)
    except jsonschema.SchemaError as e:
        where = "/".join(str(p) for p in e.absolute_path) or "(root)"
        raise ValueError(f"invalid schema at {where}: {e.message}") from None
    try:
        return fastjsonschema.compile(schema, handlers=_NoRemoteRefs(), use_default=False)
    except fastjsonschema.JsonSchemaDefinitionException as e:
        raise ValueError(str(e)) from None


#: Bytes of a message's data; 0 is no limit.
Size = Annotated[int, Meta(ge=0, hint="0: no limit")]


@dataclass(frozen=True, kw_only=True)
class RuleSettings:
    """One ``[[plugin.schema.rules]]`` table."""

    pattern: TopicPattern
    #: A JSON file, relative to broker.toml.
    schema: Annotated[str, NON_EMPTY, File()] | None = None
    max_bytes: Size = 0

    def validate(self) -> None:
        if self.schema is None and not self.max_bytes:
            raise ConfigError("", "give schema, max_bytes or both")

    def rule(self) -> SchemaRule:
        """The compiled rule; ConfigError (key ``schema``) if the schema is bad."""
        if self.schema is None:
            return SchemaRule(self.pattern, None, self.max_bytes)
        path = self.schema
        try:
            schema = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ConfigError("schema", f"{path}: not valid JSON: {e}") from None
        try:
            validate = compile_schema(schema)
        except ValueError as e:
            raise ConfigError("schema", f"{path}: {e}") from None
        return SchemaRule(self.pattern, validate, self.max_bytes, path)


@dataclass(frozen=True, kw_only=True)
class Settings:
    """``[plugin.schema]``."""

    max_bytes: Size = 0
    rules: tuple[RuleSettings, ...] = ()


#: The keys of [plugin.schema] and of each [[plugin.schema.rules]] entry.
SETTINGS: Final = frozenset(f.name for f in dataclasses.fields(Settings))
RULE_SETTINGS: Final = frozenset(f.name for f in dataclasses.fields(RuleSettings))


def create(settings: Mapping[str, Any], context: PluginContext) -> SchemaValidator:
    """Plugin factory (entry point ``schema``)."""
    s = parse_settings(Settings, settings, source=context.config.source)
    rules = []
    for i, rule in enumerate(s.rules):
        try:
            rules.append(rule.rule())
        except ConfigError as e:
            raise ConfigError(f"rules[{i}].{e.key}", e.reason) from None
    return SchemaValidator(rules, max_bytes=s.max_bytes)
