"""Pattern containment for topic ACLs, sound and complete.

The question an ACL must answer for a subscription is not "does the pattern
look like an allowed one" but "is **every** topic the pattern can match
allowed, and none denied?". ``user.*.orders`` is not allowed by
``user.alice.orders`` (it also matches ``user.bob.orders``); ``a.>`` *is*
allowed by ``a.*`` plus ``a.*.>`` together, though by neither alone.

:func:`covers` decides it exactly, for topics of at most
:data:`~broker.core.topics.MAX_TOKENS` tokens (the only topics there are). A
pattern is read as a regular language over tokens: a literal token, ``*``
(any one token) and ``>`` (one or more, rewritten here as ``*`` followed by
``#``, "zero or more"). The search walks the subscription pattern token by
token, carrying the positions still alive in every allow and deny pattern
(Brzozowski derivatives). At each step the tokens that can make a
difference are the literals at the head of some live pattern; every other
token behaves the same, so one symbol, :data:`OTHER`, stands for all of
them (there are always infinitely many such tokens). A topic the
subscription matches that no allow pattern matches, or that a deny pattern
matches, is a counterexample: the answer is False. States are memoised, so
the work is bounded by (positions in the pattern) x (sets of live positions)
x (depth), small for real rule sets; past :data:`MAX_STATES` the answer is
False, which is always safe (deny).

Pure: no I/O, no trio. Patterns must be valid (see
:func:`broker.core.topics.validate_pattern`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Final

from broker import MAX_TOKENS, pattern_matches

__all__ = ["OTHER", "covers", "intersects", "matches_any"]

#: Stands for every token that is not a literal of a live pattern (never a
#: real token: tokens are not empty).
OTHER: Final = ""
_ZERO_OR_MORE: Final = "#"  # never a real token either (not in the token charset)
#: Search states explored at most before giving up with False (deny): a
#: bound on the work one subscription can cost, whatever the rules.
MAX_STATES: Final = 100_000

Compiled = tuple[str, ...]
#: (index of a pattern, position in it)
_Live = frozenset[tuple[int, int]]


def _compile(pattern: str) -> Compiled:
    tokens = pattern.split(".")
    if tokens[-1] == ">":
        return (*tokens[:-1], "*", _ZERO_OR_MORE)
    return tuple(tokens)


def _step(p: Compiled, i: int, symbol: str) -> int:
    """Position after reading one token *symbol* at position *i*; -1 if dead."""
    if i >= len(p):
        return -1
    head = p[i]
    if head == _ZERO_OR_MORE:
        return i
    if head == "*" or head == symbol:
        return i + 1
    return -1


def _accepts(p: Compiled, i: int) -> bool:
    """Whether the tokens read so far are a whole match."""
    return i == len(p) or (i == len(p) - 1 and p[i] == _ZERO_OR_MORE)


def _literal_heads(patterns: Sequence[Compiled], live: _Live) -> set[str]:
    heads = set()
    for k, i in live:
        p = patterns[k]
        if i < len(p) and p[i] != "*" and p[i] != _ZERO_OR_MORE:
            heads.add(p[i])
    return heads


def covers(
    pattern: str,
    allow: Iterable[str],
    deny: Iterable[str] = (),
    *,
    max_tokens: int = MAX_TOKENS,
    max_states: int = MAX_STATES,
) -> bool:
    """True if every topic *pattern* matches is matched by some *allow*
    pattern and by no *deny* pattern.

    Only topics of at most *max_tokens* tokens are considered (all there
    are). *pattern* may be a plain topic. Sound: never True when a
    counterexample exists; and exact (never False when none does) unless
    the search needs more than *max_states* states.
    """
    s = _compile(pattern)
    allows = [_compile(a) for a in allow]
    denies = [_compile(d) for d in deny]
    # Tokens of s still to read (without the final "zero or more").
    rest = [sum(1 for t in s[i:] if t != _ZERO_OR_MORE) for i in range(len(s) + 1)]
    start = (
        0,
        frozenset((k, 0) for k in range(len(allows))),
        frozenset((k, 0) for k in range(len(denies))),
        0,
    )
    seen: set[tuple[int, _Live, _Live, int]] = set()
    stack = [start]
    while stack:
        state = stack.pop()
        if state in seen:
            continue
        seen.add(state)
        if len(seen) > max_states:
            return False
        si, live_a, live_d, depth = state
        if depth and _accepts(s, si):
            # The tokens read so far form a topic the subscription matches.
            if not any(_accepts(allows[k], i) for k, i in live_a):
                return False
            if any(_accepts(denies[k], i) for k, i in live_d):
                return False
        if depth == max_tokens or si == len(s):
            continue
        if not live_a and depth + rest[si] <= max_tokens:
            return False  # s can still complete a topic, and nothing allows it
        head = s[si]
        if head == "*" or head == _ZERO_OR_MORE:
            symbols = _literal_heads(allows, live_a) | _literal_heads(denies, live_d)
            symbols.add(OTHER)
        else:
            symbols = {head}
        for symbol in symbols:
            next_a = frozenset((k, n) for k, i in live_a if (n := _step(allows[k], i, symbol)) >= 0)
            next_d = frozenset((k, n) for k, i in live_d if (n := _step(denies[k], i, symbol)) >= 0)
            stack.append((_step(s, si, symbol), next_a, next_d, depth + 1))
    return True


def intersects(pattern: str, others: Iterable[str], *, max_tokens: int = MAX_TOKENS) -> bool:
    """True if some topic matches both *pattern* and one of *others*."""
    return not covers(pattern, (">",), others, max_tokens=max_tokens)


def matches_any(patterns: Iterable[str], topic: str) -> bool:
    """True if one of *patterns* matches the concrete *topic*."""
    return any(pattern_matches(p, topic) for p in patterns)
