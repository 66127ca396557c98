"""``broker pub`` and ``broker sub``: the command-line client.

Both take the options added by :func:`broker.cli._parser`: ``--url``,
``--token`` (falling back to ``$BROKER_TOKEN``), ``--encoding`` and
``--cafile`` (CA certificates to trust for ``wss://``; without it the
system's trust store is used).

Exit codes, as for the rest of ``broker``: 0 success, 1 runtime failure
(cannot connect, the broker refused, the connection was lost), 2 bad usage
(a URL that is not ``ws://``/``wss://``, an unreadable ``--cafile``, data
that cannot be encoded), 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import ssl
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, NoReturn
from urllib.parse import urlsplit

import trio

from broker.client.client import (
    ConnectError,
    Disconnected,
    Dropped,
    Message,
    ServerError,
    Subscription,
    open_client,
)
from broker.core.outbox import OTHER_TOPICS
from broker.core.protocol import Encoding
from broker.core.topics import pattern_matches

__all__ = ["run_pub", "run_sub"]

#: Exit status after Ctrl-C (128 + SIGINT), as shells report it.
INTERRUPTED = 130


class _UsageError(Exception):
    """Bad command-line input: reported, exit status 2."""


@dataclass(frozen=True, slots=True)
class _Target:
    """Where and how to connect, from the common options."""

    url: str
    token: str | None
    encoding: Encoding
    ssl_context: ssl.SSLContext | None


def _target(args: argparse.Namespace) -> _Target:
    url: str = args.url
    scheme = urlsplit(url).scheme
    if scheme not in ("ws", "wss"):
        raise _UsageError(f"--url must be a ws:// or wss:// URL, not {url!r}")
    token: str | None = args.token or os.environ.get("BROKER_TOKEN") or None
    if token is not None and not all("!" <= c <= "~" for c in token):
        raise _UsageError("the token must be printable ASCII without spaces")
    context: ssl.SSLContext | None = None
    if scheme == "wss" and args.cafile:
        try:
            context = ssl.create_default_context(cafile=args.cafile)
        except (OSError, ssl.SSLError) as e:
            raise _UsageError(f"cannot load --cafile {args.cafile}: {e}") from None
    return _Target(url, token, Encoding(args.encoding), context)


def _error(text: str) -> None:
    print(f"broker: {text}", file=sys.stderr)


def _report(exc: ConnectError | ServerError | Disconnected, url: str) -> int:
    if isinstance(exc, ServerError):
        _error(f"{exc.code}: {exc.message}")
    elif isinstance(exc, ConnectError):
        _error(f"cannot connect to {url}: {exc}")
    else:
        _error(f"disconnected: {exc}")
    return 1


def _run(async_fn: Callable[..., Awaitable[int]], *args: Any) -> int:
    """trio.run(), with Ctrl-C as exit status 130 rather than a traceback."""
    try:
        status: int = trio.run(async_fn, *args)
    except KeyboardInterrupt:
        return INTERRUPTED
    except BaseExceptionGroup as group:
        if group.subgroup(KeyboardInterrupt) is not None:
            return INTERRUPTED
        raise
    return status


def _parse_data(text: str) -> Any:
    """A JSON value, or *text* itself when it is not one (``hello``)."""

    def no_constants(name: str) -> NoReturn:
        raise ValueError(name)  # NaN/Infinity: not JSON, send the word as text

    try:
        return json.loads(text, parse_constant=no_constants)
    except ValueError:  # JSONDecodeError included
        return text


# --------------------------------------------------------------------------
# pub
# --------------------------------------------------------------------------


def run_pub(args: argparse.Namespace) -> int:
    """``broker pub TOPIC DATA [--key K]``: publish one message, print ``seq N``.

    Args:
        args: parsed options: ``topic``, ``data`` (JSON text; anything that
            is not valid JSON is sent as a string), ``key``, ``url``,
            ``token``, ``encoding``, ``cafile``.

    Returns:
        The exit status: 0 published, 1 refused or not connected (the reason
        on stderr, ``broker: <code>: <message>`` for an ``err``), 2 bad
        usage, 130 interrupted.
    """
    try:
        target = _target(args)
    except _UsageError as e:
        _error(str(e))
        return 2
    return _run(_pub, target, args.topic, _parse_data(args.data), args.key)


async def _pub(target: _Target, topic: str, data: Any, key: str | None) -> int:
    try:
        async with open_client(
            target.url,
            token=target.token,
            encoding=target.encoding,
            ssl_context=target.ssl_context,
        ) as client:
            seq = await client.publish(topic, data, key=key)
    except (ConnectError, ServerError, Disconnected) as e:
        return _report(e, target.url)
    except (ValueError, TypeError, OverflowError) as e:
        _error(f"cannot encode the data as {target.encoding.value}: {e}")
        return 2
    print(f"seq {seq}")
    return 0


# --------------------------------------------------------------------------
# sub
# --------------------------------------------------------------------------


def run_sub(args: argparse.Namespace) -> int:
    """``broker sub PATTERN... [-n N]``: print messages as JSON lines.

    Each :class:`~broker.client.Message` is one line
    ``{"topic": ..., "seq": ..., "data": ...[, "key": ...]}`` and each
    :class:`~broker.client.Dropped` notice ``{"dropped": topic, "count": n}``,
    flushed as it comes. A message matching several of the patterns is
    printed once.

    Args:
        args: parsed options: ``pattern`` (a list), ``count`` (exit after
            that many messages; 0 means never), ``url``, ``token``,
            ``encoding``, ``cafile``.

    Returns:
        The exit status: 0 after ``count`` messages, 1 refused or
        disconnected, 2 bad usage, 130 interrupted (the normal way to stop
        ``count = 0``).
    """
    try:
        target = _target(args)
        if args.count < 0:
            raise _UsageError("--count must be >= 0")
    except _UsageError as e:
        _error(str(e))
        return 2
    try:
        return _run(_sub, target, list(args.pattern), args.count)
    except BrokenPipeError:
        # The reader went away (`broker sub ... | head -1`): exit quietly,
        # and keep the interpreter's final flush from complaining again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1


async def _sub(target: _Target, patterns: list[str], count: int) -> int:
    try:
        async with (
            open_client(
                target.url,
                token=target.token,
                encoding=target.encoding,
                ssl_context=target.ssl_context,
            ) as client,
            contextlib.AsyncExitStack() as stack,
        ):
            subscriptions = [
                await stack.enter_async_context(client.subscribe(pattern)) for pattern in patterns
            ]
            await _print_items(subscriptions, count)
    except (ConnectError, ServerError, Disconnected) as e:
        return _report(e, target.url)
    return 0


def _line(item: Message | Dropped) -> str:
    fields: dict[str, Any]
    if isinstance(item, Dropped):
        fields = {"dropped": item.topic, "count": item.count}
    else:
        fields = {"topic": item.topic, "seq": item.seq, "data": item.data}
        if item.key is not None:
            fields["key"] = item.key
    return json.dumps(fields, ensure_ascii=False)


def _copies(item: Message | Dropped, patterns: list[str]) -> int:
    """How many of the subscriptions receive *item* (the client's fan-out rule)."""
    if isinstance(item, Dropped) and item.topic == OTHER_TOPICS:
        return len(patterns)
    return sum(1 for p in patterns if pattern_matches(p, item.topic))


async def _print_items(subscriptions: list[Subscription], count: int) -> None:
    """Print what the subscriptions receive, each item once, until *count* messages.

    Raises:
        Disconnected: the connection closed.
        BrokenPipeError: stdout was closed.
    """
    patterns = [s.pattern for s in subscriptions]
    send, receive = trio.open_memory_channel[Message | Dropped](0)
    failures: list[Disconnected] = []

    async def forward(
        subscription: Subscription, send: trio.MemorySendChannel[Message | Dropped]
    ) -> None:
        async with send:
            try:
                async for item in subscription:
                    await send.send(item)
            except Disconnected as e:
                failures.append(e)

    # The client hands the same object to every matching subscription, so a
    # duplicate is recognised by identity. Each entry keeps its item alive
    # (its id cannot be reused) until all its copies have been seen.
    copies_left: dict[int, tuple[Message | Dropped, int]] = {}
    printed = 0
    broken_pipe = done = False
    async with trio.open_nursery() as nursery:
        async with send:
            for subscription in subscriptions:
                nursery.start_soon(forward, subscription, send.clone())
        async with receive:
            async for item in receive:
                seen = copies_left.pop(id(item), None)
                if seen is not None:  # a copy of an item already printed
                    if seen[1] > 1:
                        copies_left[id(item)] = (item, seen[1] - 1)
                    continue
                copies = _copies(item, patterns)
                if copies > 1:
                    copies_left[id(item)] = (item, copies - 1)
                try:
                    sys.stdout.write(_line(item) + "\n")
                    sys.stdout.flush()
                except BrokenPipeError:
                    broken_pipe = True
                    nursery.cancel_scope.cancel()
                    break
                if isinstance(item, Message):
                    printed += 1
                    if printed == count:
                        done = True
                        nursery.cancel_scope.cancel()
                        break
    if done:
        return
    if broken_pipe:
        raise BrokenPipeError  # outside the nursery, so not wrapped in a group
    if failures:
        raise failures[0]
