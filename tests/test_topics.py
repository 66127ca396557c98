"""Tests for broker.topics: validation, matching and the Pattern class."""

from __future__ import annotations

import pytest

from broker.core.topics import (
    MAX_TOKENS,
    MAX_TOPIC_LENGTH,
    Pattern,
    TopicError,
    is_pattern,
    pattern_matches,
    validate_pattern,
    validate_topic,
)


def test_topic_error_is_value_error() -> None:
    assert issubclass(TopicError, ValueError)


@pytest.mark.parametrize(
    "topic",
    [
        "a",
        "trades.BTC-USD",
        "user.42.orders",
        "eth.logs.0xabc",
        "a_b:c-d.E9",
        ".".join(["t"] * MAX_TOKENS),
        "x" * MAX_TOPIC_LENGTH,
    ],
)
def test_valid_topics(topic: str) -> None:
    assert validate_topic(topic) == topic


@pytest.mark.parametrize(
    ("topic", "message"),
    [
        ("", "empty"),
        ("x" * (MAX_TOPIC_LENGTH + 1), "longer than"),
        (".".join(["t"] * (MAX_TOKENS + 1)), "more than"),
        ("a..b", "dot-separated"),
        (".a", "dot-separated"),
        ("a.", "dot-separated"),
        (".", "dot-separated"),
        ("a b", "dot-separated"),
        (" a", "dot-separated"),
        ("a\n", "dot-separated"),
        ("caf\u00e9", "dot-separated"),
        ("\u0661", "dot-separated"),  # ARABIC-INDIC DIGIT ONE is not an ASCII digit
        ("a/b", "dot-separated"),
        ("a.*", "wildcards"),
        ("a.>", "wildcards"),
        ("*", "wildcards"),
        ("a*", "wildcards"),
    ],
)
def test_invalid_topics(topic: str, message: str) -> None:
    with pytest.raises(TopicError, match=message):
        validate_topic(topic)


@pytest.mark.parametrize("value", [None, 1, b"a", ["a"]])
def test_topic_must_be_str(value: object) -> None:
    with pytest.raises(TopicError, match="must be a string"):
        validate_topic(value)
    with pytest.raises(TopicError, match="must be a string"):
        validate_pattern(value)


@pytest.mark.parametrize(
    "pattern",
    [
        "a",
        "a.b",
        "*",
        ">",
        "a.*",
        "a.>",
        "*.*.>",
        "a.*.c",
        "trades.*",
        ".".join(["*"] * MAX_TOKENS),
        ".".join(["*"] * (MAX_TOKENS - 1) + [">"]),
        "x" * MAX_TOPIC_LENGTH,
    ],
)
def test_valid_patterns(pattern: str) -> None:
    assert validate_pattern(pattern) == pattern


@pytest.mark.parametrize(
    ("pattern", "message"),
    [
        ("", "empty"),
        ("x" * (MAX_TOPIC_LENGTH + 1), "longer than"),
        (".".join(["*"] * (MAX_TOKENS + 1)), "more than"),
        ("a..b", "invalid token ''"),
        (".a", "invalid token ''"),
        ("a.", "invalid token ''"),
        ("a b", "invalid token 'a b'"),
        ("a.caf\u00e9", "invalid token"),
        ("a/b", "invalid token"),
        (">.a", "'>' is only allowed as the last token"),
        ("a.>.b", "'>' is only allowed as the last token"),
        ("a*", "invalid token 'a\\*'"),
        ("*a.b", "invalid token"),
        ("a.b>", "invalid token"),
        ("a.**", "invalid token"),
        ("a.>>", "invalid token"),
    ],
)
def test_invalid_patterns(pattern: str, message: str) -> None:
    with pytest.raises(TopicError, match=message):
        validate_pattern(pattern)


def test_is_pattern() -> None:
    assert is_pattern("a.*")
    assert is_pattern(">")
    assert is_pattern("a.*.>")
    assert not is_pattern("a.b")
    assert not is_pattern("a")


@pytest.mark.parametrize(
    ("pattern", "topic", "expected"),
    [
        # exact
        ("a", "a", True),
        ("a.b", "a.b", True),
        ("a.b", "a.c", False),
        ("a.b", "a", False),
        ("a", "a.b", False),
        ("a.b", "a.b.c", False),
        # '*' is exactly one token
        ("*", "a", True),
        ("*", "a.b", False),
        ("a.*", "a.b", True),
        ("a.*", "a", False),
        ("a.*", "a.b.c", False),
        ("*.b", "a.b", True),
        ("*.b", "a.c", False),
        ("a.*.c", "a.x.c", True),
        ("a.*.c", "a.x.d", False),
        # '>' is one or more trailing tokens
        (">", "a", True),
        (">", "a.b.c", True),
        ("a.>", "a.b", True),
        ("a.>", "a.b.c.d", True),
        ("a.>", "a", False),
        ("a.>", "b.c", False),
        ("*.>", "a", False),
        ("*.>", "a.b", True),
        ("a.*.>", "a.b.c", True),
        ("a.*.>", "a.b", False),
        # tokens compare case-sensitively and whole
        ("trades.BTC-USD", "trades.btc-usd", False),
        ("ab", "a", False),
    ],
)
def test_pattern_matches(pattern: str, topic: str, expected: bool) -> None:
    assert pattern_matches(pattern, topic) is expected
    assert Pattern(pattern).matches(topic) is expected


def test_pattern_class() -> None:
    p = Pattern("trades.*")
    assert p.text == "trades.*"
    assert p.tokens == ("trades", "*")
    assert repr(p) == "Pattern('trades.*')"
    assert p.matches("trades.BTC-USD")
    assert not p.matches("trades")


def test_pattern_equality_and_hash() -> None:
    assert Pattern("a.>") == Pattern("a.>")
    assert Pattern("a.>") != Pattern("a.*")
    assert Pattern("a") != "a"
    assert len({Pattern("a.*"), Pattern("a.*"), Pattern("b")}) == 2


def test_pattern_validates() -> None:
    with pytest.raises(TopicError, match="last token"):
        Pattern("a.>.b")
