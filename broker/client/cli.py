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
import collections
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
    Interrupted,
    Item,
    Join,
    Leave,
    Message,
    Reconnected,
    Resync,
    ServerError,
    Subscription,
    open_client,
)
from broker.core.protocol import MAX_HISTORY_REQUEST, Encoding
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
            reconnect=False,  # one publish: a lost connection is a failure
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
    """``broker sub PATTERN... [-n N] [--history N] [--no-reconnect]``: print
    messages as JSON lines.

    Each :class:`~broker.client.Message` is one line
    ``{"topic": ..., "seq": ..., "data": ...[, "key": ...]}`` (plus
    ``"snapshot": true`` on snapshot messages) and each :class:`~broker.client.Dropped` notice
    ``{"dropped": topic, "count": n}``, flushed as it comes. A message
    matching several of the patterns is printed once.

    A lost connection is reconnected (unless ``--no-reconnect``), with one
    line on stderr when it is lost (``broker: disconnected: ...;
    reconnecting``), one when it is back (``broker: reconnected``) and one per
    :class:`~broker.client.Resync` (``broker: resync TOPIC: recovered=false
    epoch=E seq=S reason=R``): messages of TOPIC may have been missed.

    Args:
        args: parsed options: ``pattern`` (a list), ``count`` (exit after
            that many messages; 0 means never), ``history`` (replay that many
            stored messages per pattern first; ``None``: none),
            ``no_reconnect``, ``url``, ``token``, ``encoding``, ``cafile``.

    Returns:
        The exit status: 0 after ``count`` messages, 1 refused or
        disconnected for good (with ``--no-reconnect``, on any disconnection),
        2 bad usage, 130 interrupted (the normal way to stop ``count = 0``).
    """
    history: int | None = getattr(args, "history", None)
    try:
        target = _target(args)
        if args.count < 0:
            raise _UsageError("--count must be >= 0")
        if history is not None and not 1 <= history <= MAX_HISTORY_REQUEST:
            raise _UsageError(f"--history must be from 1 to {MAX_HISTORY_REQUEST}")
    except _UsageError as e:
        _error(str(e))
        return 2
    options = _SubOptions(
        count=args.count,
        history=history,
        reconnect=not getattr(args, "no_reconnect", False),
    )
    try:
        return _run(_sub, target, list(args.pattern), options)
    except BrokenPipeError:
        # The reader went away (`broker sub ... | head -1`): exit quietly,
        # and keep the interpreter's final flush from complaining again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1


@dataclass(frozen=True, slots=True)
class _SubOptions:
    count: int
    history: int | None
    reconnect: bool


async def _sub(target: _Target, patterns: list[str], options: _SubOptions) -> int:
    try:
        async with (
            open_client(
                target.url,
                token=target.token,
                encoding=target.encoding,
                ssl_context=target.ssl_context,
                reconnect=options.reconnect,
            ) as client,
            contextlib.AsyncExitStack() as stack,
        ):
            subscriptions = [
                await stack.enter_async_context(client.subscribe(pattern, history=options.history))
                for pattern in patterns
            ]
            await _print_items(subscriptions, options.count)
    except (ConnectError, ServerError, Disconnected) as e:
        return _report(e, target.url)
    return 0


def _line(item: Message | Dropped | Join | Leave) -> str:
    fields: dict[str, Any]
    if isinstance(item, Dropped):
        fields = {"dropped": item.topic, "count": item.count}
    elif isinstance(item, Join | Leave):
        fields = {type(item).__name__.lower(): item.topic, "member": item.member}
    else:
        fields = {"topic": item.topic, "seq": item.seq, "data": item.data}
        if item.key is not None:
            fields["key"] = item.key
        if item.snapshot:
            fields["snapshot"] = True
    return json.dumps(fields, ensure_ascii=False)


def _resync_line(item: Resync) -> str:
    parts = [f"resync {item.topic}: recovered=false"]
    if item.epoch is not None:
        parts.append(f"epoch={item.epoch}")
    if item.seq is not None:
        parts.append(f"seq={item.seq}")
    if item.lost:
        parts.append(f"lost={','.join(item.lost)}")
    if item.unknown:
        parts.append("unknown=true")
    parts.append(f"reason={item.reason}")
    return " ".join(parts)


#: Topics whose last printed seq is remembered, to print each message once.
_PRINTED_TOPICS = 10_000
#: Notices (shared by the subscriptions) remembered, to print each once.
_SEEN_NOTICES = 1024


class _Printer:
    """Prints what the subscriptions yield, each message once.

    The client hands the same object to every matching subscription; but a
    message replayed after a reconnect may reach two overlapping patterns as
    two objects. So a message is skipped when it is the object last printed
    for its topic, or when its seq is not above the last printed one (unless
    it starts an epoch, or a resync said the numbering restarted).
    """

    def __init__(self) -> None:
        self._printed: collections.OrderedDict[str, tuple[int, Message]] = collections.OrderedDict()
        self._notices: collections.OrderedDict[int, Item] = collections.OrderedDict()
        self._reconnecting = False

    def _first_copy(self, item: Item) -> bool:
        key = id(item)
        if self._notices.get(key) is item:
            return False
        self._notices[key] = item  # kept alive, so its id is not reused meanwhile
        if len(self._notices) > _SEEN_NOTICES:
            self._notices.popitem(last=False)
        return True

    def _new_message(self, item: Message) -> bool:
        last = self._printed.get(item.topic)
        if last is not None and (last[1] is item or (item.epoch is None and item.seq <= last[0])):
            return False
        self._printed[item.topic] = (item.seq, item)
        self._printed.move_to_end(item.topic)
        if len(self._printed) > _PRINTED_TOPICS:
            self._printed.popitem(last=False)
        return True

    def _forget(self, topic_or_pattern: str) -> None:
        for topic in [t for t in self._printed if pattern_matches(topic_or_pattern, t)]:
            del self._printed[topic]

    def handle(self, item: Item) -> bool:
        """Print *item* unless it was already; True for a message printed."""
        if isinstance(item, Message):
            if not self._new_message(item):
                return False
            sys.stdout.write(_line(item) + "\n")
            sys.stdout.flush()
            return True
        if not self._first_copy(item):
            return False
        if isinstance(item, Interrupted):
            if not self._reconnecting:
                self._reconnecting = True
                _error(f"disconnected: {Disconnected(item.code, item.reason)}; reconnecting")
        elif isinstance(item, Reconnected):
            if self._reconnecting:
                self._reconnecting = False
                _error("reconnected")
        elif isinstance(item, Resync):
            self._forget(item.topic)
            _error(_resync_line(item))
        else:
            sys.stdout.write(_line(item) + "\n")
            sys.stdout.flush()
        return False


async def _print_items(subscriptions: list[Subscription], count: int) -> None:
    """Print what the subscriptions receive, each item once, until *count* messages.

    Raises:
        Disconnected: the client is closed.
        ServerError: the broker refused a resubscription.
        BrokenPipeError: stdout was closed.
    """
    printer = _Printer()
    send, receive = trio.open_memory_channel[Item](0)
    failures: list[Disconnected | ServerError] = []

    async def forward(subscription: Subscription, send: trio.MemorySendChannel[Item]) -> None:
        async with send:
            try:
                async for item in subscription:
                    await send.send(item)
            except (Disconnected, ServerError) as e:
                failures.append(e)

    printed = 0
    broken_pipe = done = False
    async with trio.open_nursery() as nursery:
        async with send:
            for subscription in subscriptions:
                nursery.start_soon(forward, subscription, send.clone())
        async with receive:
            async for item in receive:
                try:
                    is_message = printer.handle(item)
                except BrokenPipeError:
                    broken_pipe = True
                    nursery.cancel_scope.cancel()
                    break
                if is_message:
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
