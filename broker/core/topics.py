"""Topic names and subscription patterns: parse, validate, match.

A *topic* is a dot-separated list of tokens, each made of ASCII letters,
digits, ``_``, ``-`` and ``:`` (``trades.BTC-USD``, ``user.42.orders``).
A *pattern* is a topic that may also use two wildcards, for subscriptions only:

* ``*`` matches exactly one token (``trades.*`` matches ``trades.BTC-USD``);
* ``>`` as the last token matches one or more tokens (``eth.>`` matches
  ``eth.blocks`` and ``eth.logs.0xabc``, but not ``eth``).

This module is pure: no I/O, no trio. Validation raises :class:`TopicError`
(a ``ValueError``) with a message fit to send to a client.
"""

from __future__ import annotations

import re
from typing import Final

__all__ = [
    "MAX_TOKENS",
    "MAX_TOPIC_LENGTH",
    "Pattern",
    "TopicError",
    "is_pattern",
    "pattern_matches",
    "validate_pattern",
    "validate_topic",
]

#: Longest topic or pattern, in characters. Long enough for a user id and an
#: address (``eth.logs.0x`` + 40 hex digits), short enough to keep routing
#: tables and log lines small.
MAX_TOPIC_LENGTH: Final = 256
#: Most tokens in one topic or pattern.
MAX_TOKENS: Final = 16

_TOKEN_RE: Final = re.compile(r"[A-Za-z0-9_\-:]+")
_TOPIC_RE: Final = re.compile(r"[A-Za-z0-9_\-:]+(?:\.[A-Za-z0-9_\-:]+)*")


class TopicError(ValueError):
    """A topic or pattern is not valid; the message says why."""


def _check_common(text: object, what: str) -> str:
    if not isinstance(text, str):
        raise TopicError(f"{what} must be a string")
    if not text:
        raise TopicError(f"{what} is empty")
    if len(text) > MAX_TOPIC_LENGTH:
        raise TopicError(f"{what} is longer than {MAX_TOPIC_LENGTH} characters")
    return text


def validate_topic(text: object) -> str:
    """Return *text* if it is a valid topic (no wildcards), else raise TopicError."""
    topic = _check_common(text, "topic")
    if _TOPIC_RE.fullmatch(topic) is None:
        if "*" in topic or ">" in topic:
            raise TopicError("wildcards are only allowed in subscriptions")
        raise TopicError("topic must be dot-separated tokens of letters, digits, '_', '-' or ':'")
    if topic.count(".") >= MAX_TOKENS:
        raise TopicError(f"topic has more than {MAX_TOKENS} tokens")
    return topic


def validate_pattern(text: object) -> str:
    """Return *text* if it is a valid subscription pattern, else raise TopicError."""
    pattern = _check_common(text, "pattern")
    tokens = pattern.split(".")
    if len(tokens) > MAX_TOKENS:
        raise TopicError(f"pattern has more than {MAX_TOKENS} tokens")
    last = len(tokens) - 1
    for i, token in enumerate(tokens):
        if token == "*":
            continue
        if token == ">":
            if i != last:
                raise TopicError("'>' is only allowed as the last token")
            continue
        if _TOKEN_RE.fullmatch(token) is None:
            raise TopicError(
                f"invalid token {token!r}: use letters, digits, '_', '-', ':' "
                "or a whole-token wildcard '*' / '>'"
            )
    return pattern


def is_pattern(text: str) -> bool:
    """True if *text* (already validated) contains a wildcard token."""
    return "*" in text or ">" in text


def pattern_matches(pattern: str, topic: str) -> bool:
    """True if the validated *pattern* matches the validated *topic*.

    This is the reference definition of matching; the router uses a trie that
    must agree with it (the tests check that property).
    """
    ptoks = pattern.split(".")
    ttoks = topic.split(".")
    for i, p in enumerate(ptoks):
        if p == ">":
            return len(ttoks) > i
        if i >= len(ttoks):
            return False
        if p != "*" and p != ttoks[i]:
            return False
    return len(ptoks) == len(ttoks)


class Pattern:
    """A validated pattern, pre-split for repeated matching (used by clients)."""

    __slots__ = ("text", "tokens")

    def __init__(self, text: str) -> None:
        self.text = validate_pattern(text)
        self.tokens = tuple(self.text.split("."))

    def matches(self, topic: str) -> bool:
        return pattern_matches(self.text, topic)

    def __repr__(self) -> str:
        return f"Pattern({self.text!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Pattern) and other.text == self.text

    def __hash__(self) -> int:
        return hash(self.text)
