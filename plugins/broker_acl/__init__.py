"""acl: topic access rules from broker.toml, with per-user topics.

Configuration::

    [plugins]
    enabled = ["jwt", "acl"]

    [plugin.acl]
    default = "deny"          # what no rule allows: "deny" (default) or "defer"

    [[plugin.acl.rules]]
    roles = ["trader"]        # who: identities with any of these roles...
    subscribe = ["market.>", "user.{sub}.orders", "user.{sub}.balances"]
    publish = ["user.{sub}.commands"]

    [[plugin.acl.rules]]
    subjects = ["ingest"]     # ...or with one of these subjects ("*": everyone)
    publish = ["market.>"]

    [[plugin.acl.rules]]
    roles = ["*"]
    deny_subscribe = ["internal.>"]
    deny_publish = ["internal.>"]

Every rule that applies to an identity contributes its patterns; a **deny**
pattern wins over every allow. A publish to topic T is allowed when an
applicable ``publish`` pattern matches T and no ``deny_publish`` pattern
does. A subscription to pattern P is allowed only when **every** topic P can
match is allowed (see :mod:`broker_acl.matcher`): ``user.*.orders`` is
refused to a user allowed ``user.{sub}.orders``, and so is ``>``.

Placeholders ``{sub}`` (or ``{subject}``), ``{plugin}`` and ``{claims.NAME}``
stand for the identity's fields, as whole tokens only. A value that is not a
valid single token (empty, or containing ``.``, ``*``, ``>``, spaces or any
other character outside the topic charset) can never widen a rule: an allow
pattern using it matches nothing, and a deny pattern using it denies as if
the placeholder were ``*``.

With ``default = "deny"`` the plugin answers False (deny wins) for anything
no rule allows, whatever ``[authorization] default`` says; with
``"defer"`` it answers None instead, leaving those to other plugins and
``[authorization] default``. Denials answer the client ``err``
``forbidden`` and are counted (``ACL.denied``, and the broker's
``stats.forbidden``).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Final, Literal

from broker import (
    Action,
    ConfigError,
    Identity,
    PluginContext,
    TopicError,
    hookimpl,
    parse_settings,
    validate_pattern,
)
from broker.settings import Check, NonEmptyStr

from .matcher import covers, intersects, matches_any

__all__ = [
    "ACL",
    "RULE_SETTINGS",
    "SETTINGS",
    "Rule",
    "RuleSettings",
    "Settings",
    "create",
    "render",
    "template",
]

log = logging.getLogger("broker.plugins.acl")

_TOKEN: Final = re.compile(r"[A-Za-z0-9_\-:]+")
_BRACES: Final = re.compile(r"\{[^{}]*\}")
_PLACEHOLDER: Final = re.compile(r"\{(sub|subject|plugin|claims\.[A-Za-z0-9_\-:]+)\}")
_LISTS: Final = ("subscribe", "publish", "deny_subscribe", "deny_publish")

#: A pattern template: literal tokens, wildcards, and placeholders (kept
#: with their braces, e.g. "{sub}").
Template = tuple[str, ...]


def _field(identity: Identity, name: str) -> str | None:
    """The identity's value for placeholder *name*, if it is a valid token."""
    value: object
    if name in ("sub", "subject"):
        value = identity.subject
    elif name == "plugin":
        value = identity.plugin
    else:
        value = identity.claims.get(name.removeprefix("claims."))
        if type(value) is int:
            value = str(value)
    if isinstance(value, str) and _TOKEN.fullmatch(value):
        return value
    return None


def render(template: Template, identity: Identity, *, deny: bool) -> str | None:
    """The pattern *template* stands for, for *identity*.

    A placeholder whose value is not one valid token makes an allow pattern
    match nothing (None) and a deny pattern deny that whole token (``*``).
    """
    tokens = []
    for token in template:
        if token.startswith("{"):
            value = _field(identity, token[1:-1])
            if value is None:
                if not deny:
                    return None
                value = "*"
            tokens.append(value)
        else:
            tokens.append(token)
    return ".".join(tokens)


@dataclass(frozen=True, slots=True)
class Rule:
    """One ``[[plugin.acl.rules]]`` entry."""

    subjects: frozenset[str]
    roles: frozenset[str]
    subscribe: tuple[Template, ...] = ()
    publish: tuple[Template, ...] = ()
    deny_subscribe: tuple[Template, ...] = ()
    deny_publish: tuple[Template, ...] = ()

    def applies_to(self, identity: Identity) -> bool:
        return (
            "*" in self.subjects
            or "*" in self.roles
            or identity.subject in self.subjects
            or not self.roles.isdisjoint(identity.roles)
        )


class ACL:
    """Authorizes publishes and subscriptions against the configured rules."""

    def __init__(self, rules: list[Rule], *, default_deny: bool = True) -> None:
        self.rules = rules
        self.default_deny = default_deny
        #: Denials since start, by action.
        self.denied: collections.Counter[str] = collections.Counter()

    def patterns(self, identity: Identity, action: Action) -> tuple[list[str], list[str]]:
        """The (allow, deny) patterns that apply to *identity* for *action*."""
        allow: list[str] = []
        deny: list[str] = []
        for rule in self.rules:
            if not rule.applies_to(identity):
                continue
            if action is Action.PUBLISH:
                allowing, denying = rule.publish, rule.deny_publish
            else:
                allowing, denying = rule.subscribe, rule.deny_subscribe
            for template in allowing:
                pattern = render(template, identity, deny=False)
                if pattern is not None:
                    allow.append(pattern)
            for template in denying:
                pattern = render(template, identity, deny=True)
                assert pattern is not None
                deny.append(pattern)
        return allow, deny

    def decide(self, identity: Identity, action: Action, topic: str) -> bool | None:
        """True (allowed), False (denied) or None (no rule decides, default defer)."""
        allow, deny = self.patterns(identity, action)
        if action is Action.PUBLISH:
            if matches_any(deny, topic):
                return False
            if matches_any(allow, topic):
                return True
        else:
            if deny and intersects(topic, deny):
                return False  # some topic it could match is denied
            if allow and covers(topic, allow):
                return True  # every topic it could match is allowed
        return False if self.default_deny else None

    @hookimpl
    def broker_authorize(self, identity: Identity, action: Action, topic: str) -> bool | None:
        decision = self.decide(identity, action, topic)
        if decision is False:
            self.denied[action.value] += 1
            log.info("denied %s %s to %s", action.value, topic, identity.subject)
        return decision


def template(text: str) -> Template:
    """*text* as a pattern template; ValueError (the reason) if it is not one."""
    # Placeholders may contain dots ({claims.tenant}): set them aside before
    # splitting the pattern into tokens.
    found = iter(_BRACES.findall(text))
    masked = _BRACES.sub("\0", text)
    tokens = []
    plain = []
    for token in masked.split("."):
        if token == "\0":
            placeholder = next(found)
            if not _PLACEHOLDER.fullmatch(placeholder):
                raise ValueError(
                    f"unknown placeholder {placeholder} in {text!r}: use {{sub}}, "
                    "{subject}, {plugin} or {claims.NAME}"
                )
            tokens.append(placeholder)
            plain.append("x")
        elif "\0" in token or "{" in token or "}" in token:
            raise ValueError(
                f"placeholders must be whole tokens, as in user.{{sub}}.orders: {text!r}"
            )
        else:
            tokens.append(token)
            plain.append(token)
    try:
        validate_pattern(".".join(plain))
    except TopicError as e:
        raise ValueError(f"{text!r}: {e}") from None
    return tuple(tokens)


#: A pattern with placeholders, as written.
PatternTemplate = Annotated[str, Check(template)]
Templates = tuple[PatternTemplate, ...]


@dataclass(frozen=True, kw_only=True)
class RuleSettings:
    """One ``[[plugin.acl.rules]]`` table."""

    subjects: frozenset[NonEmptyStr] = frozenset()
    roles: frozenset[NonEmptyStr] = frozenset()
    subscribe: Templates = ()
    publish: Templates = ()
    deny_subscribe: Templates = ()
    deny_publish: Templates = ()

    def validate(self) -> None:
        if not self.subjects and not self.roles:
            raise ConfigError("", 'give roles or subjects ("*" for everyone)')
        if not any((self.subscribe, self.publish, self.deny_subscribe, self.deny_publish)):
            raise ConfigError("", f"give at least one of {', '.join(_LISTS)}")

    def rule(self) -> Rule:
        def compiled(texts: Templates) -> tuple[Template, ...]:
            return tuple(template(text) for text in texts)

        return Rule(
            self.subjects,
            self.roles,
            compiled(self.subscribe),
            compiled(self.publish),
            compiled(self.deny_subscribe),
            compiled(self.deny_publish),
        )


@dataclass(frozen=True, kw_only=True)
class Settings:
    """``[plugin.acl]``."""

    default: Literal["deny", "defer"] = "deny"
    rules: tuple[RuleSettings, ...] = ()


#: The keys of [plugin.acl] and of each [[plugin.acl.rules]] entry.
SETTINGS: Final = frozenset(f.name for f in dataclasses.fields(Settings))
RULE_SETTINGS: Final = frozenset(f.name for f in dataclasses.fields(RuleSettings))


def create(settings: Mapping[str, Any], context: PluginContext) -> ACL:
    """Plugin factory (entry point ``acl``)."""
    s = parse_settings(Settings, settings)
    return ACL([r.rule() for r in s.rules], default_deny=s.default == "deny")
