"""One accepted client: its reader, its outbound queue and how it is written.

The connection's own task is its **reader**: it reads from the socket, parses
frames (:mod:`broker.frame_parser`), decodes commands (:mod:`broker.protocol`)
and runs each to completion (authorize, validate, publish, reply). Commands of
one client are handled in order.

Writing is separate from reading and never makes a publisher wait:

* Everything owed to the client (replies, messages, pings, pongs)
  is queued in its :class:`~broker.outbox.Outbox`, in order, and the
  connection is marked dirty with the :class:`~broker.hub.Hub`.
* Whoever queued it (the publisher's reader, a source, the heartbeat) calls
  :meth:`Hub.flush` once its batch is done; for a plain TCP connection
  :meth:`Connection.flush` then writes everything queued straight to the
  socket with one non-blocking ``writev`` -- no task switch, one system call
  for many frames (the way nats-server flushes its clients).
* A TLS connection (``wss://``) is written the same way, through
  :meth:`broker.tls.TLSStream.send_nowait`: the batch is encrypted in one
  go and the ciphertext written with one non-blocking ``os.write``.
* Only when the kernel buffer is full (a subscriber that reads slowly or not
  at all) does the connection start its **writer** task, which waits for the
  socket to become writable, writes what a direct write left (plain TCP: the
  rest of the batch, ``_unsent``; TLS: the ciphertext the stream kept) and
  drains the queue; until it finishes, flushes leave that connection to it,
  so frames never reorder. Meanwhile the queue's policy bounds what
  accumulates; what a write has taken but the socket not accepted counts
  against the same bound (``Outbox.in_flight``).

:meth:`Connection.close` records the close code and cancels the reader;
:meth:`Connection.run` then removes the subscriptions, drains (for a graceful
close, bounded by ``limits.drain_timeout``), sends the close frame, waits
briefly for the client's, and closes the socket.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any, Final

import trio

from .auth import Action, ClientInfo, Identity, Refusal, Reject
from .errors import CloseCode, ErrorCode, ProtocolError
from .frame_parser import Close, FrameError, FrameParser, Ping, Pong
from .frames import close_frame, frame, ping_frame, pong_frame
from .outbox import Outbox
from .protocol import (
    Auth,
    Encoding,
    Publish,
    RequestId,
    Subscribe,
    Unsubscribe,
    decode_command,
    encode_dropped,
    encode_err,
    encode_ok,
    encode_pong,
)
from .tls import TLSStream

if TYPE_CHECKING:
    from .server import Broker

__all__ = ["Connection"]

log = logging.getLogger("broker.connection")

#: How long the closing handshake may take before the socket is closed.
CLOSE_TIMEOUT: Final = 2.0
#: The shared empty cache of a connection that has not published yet.
_NO_CACHE: Final[dict[str, bool]] = {}
#: Most topics whose publish authorization a connection remembers.
PUBLISH_CACHE_SIZE: Final = 1024
#: Bytes asked of the kernel per read.
RECEIVE_SIZE: Final = 65536
#: Deliveries after which a reader flushes even in the middle of a read, so a
#: large burst of publishes does not hold every subscriber's first frame back.
FLUSH_EVERY: Final = 20_000
#: A flush about to write this many sockets or more waits up to FLUSH_DEFER
#: seconds for more input first (see Connection._reader).
DEFER_MIN_DIRTY: Final = 64
FLUSH_DEFER: Final = 0.0002
#: ...but only after a batch of at least this many messages (sustained load).
DEFER_MIN_MESSAGES: Final = 32
#: Reads processed back to back (without blocking) before a flush.
MAX_READS_PER_FLUSH: Final = 16
#: Most buffers in one writev (Linux IOV_MAX is 1024).
MAX_IOV: Final = 512

_WOULD_BLOCK: Final = (BlockingIOError, InterruptedError)

#: The ``result`` label of broker_publishes_total for a refused ``pub``.


class Connection:
    """A client connection after a successful handshake.

    Args:
        broker: the broker it belongs to.
        stream: the connection's stream: a SocketStream, or a TLSStream over one.
        conn_id: the id used in log lines.
        identity: who it authenticated as.
        encoding: JSON or msgpack, from the subprotocol.
        peer: the client's (address, port).
    """

    # Slots: one of these lives per connection (tens of thousands); an
    # instance __dict__ would cost about a kilobyte more each.
    __slots__ = (
        "_broken",
        "_drain",
        "_fd",
        "_finishing",
        "_no_more",
        "_nursery",
        "_peer_closed",
        "_publish_allowed",
        "_publish_generation",
        "_scope",
        "_tls",
        "_unsent",
        "_writer_running",
        "_writing",
        "broker",
        "bytes_in",
        "bytes_out",
        "close_code",
        "close_reason",
        "dirty",
        "encoding",
        "id",
        "identity",
        "info",
        "last_seen",
        "outbox",
        "parser",
        "peer",
        "ping_outstanding",
        "stream",
        "subscriptions",
    )

    def __init__(
        self,
        broker: Broker,
        stream: trio.SocketStream | TLSStream,
        *,
        conn_id: str,
        identity: Identity,
        encoding: Encoding,
        peer: tuple[str, int],
    ) -> None:
        self.broker = broker
        self.stream: trio.SocketStream | TLSStream = stream
        # Direct writes: to this file descriptor for plain TCP (else -1), or
        # through the TLS stream's send_nowait (else None).
        if isinstance(stream, TLSStream):
            self._tls: TLSStream | None = stream
            self._fd = -1
        else:
            self._tls = None
            self._fd = stream.socket.fileno()
        self.id = conn_id
        self.identity = identity
        self.encoding = encoding
        self.peer = peer
        self.info = ClientInfo(conn_id, identity, peer, encoding.value)
        config = broker.config
        max_messages, max_bytes = broker.config.queue.connection_limits()
        self.outbox = Outbox(
            max_messages=max_messages,
            max_bytes=max_bytes,
            max_replies=broker.config.limits.max_replies,
        )
        self.parser = FrameParser(config.limits.max_message_size)
        self.subscriptions: set[str] = set()
        self.close_code: int | None = None
        self.close_reason = ""
        #: trio.current_time() of the last bytes received; the heartbeat
        #: drops connections that stay silent too long.
        self.last_seen = trio.current_time()
        self.ping_outstanding = False
        self.dirty = False  # queued in the hub's list of connections to flush
        self._drain = False
        self._scope: trio.CancelScope | None = None
        self._nursery: trio.Nursery | None = None
        self._writer_running = False
        self._unsent = b""  # plain TCP: the tail of a partial direct write; goes out first
        self._writing = False  # an awaiting write is in progress
        self._broken = False  # the socket failed or a write was cut mid-frame
        self._peer_closed = False
        self._finishing = False
        self._no_more = False  # closing without a drain: take no new frames
        self._publish_allowed: dict[str, bool] = _NO_CACHE  # own dict on first publish
        self._publish_generation = -1
        #: WebSocket bytes read and written (before TLS), for metrics.
        self.bytes_in = 0
        self.bytes_out = 0

    def __repr__(self) -> str:
        return f"<Connection {self.id} {self.identity.subject}@{self.peer[0]}:{self.peer[1]}>"

    # -- called by the hub and others (synchronous) ---------------------------

    def wake(self) -> None:
        """Frames were queued: have the next :meth:`Hub.flush` write them."""
        if not self.dirty:
            self.dirty = True
            self.broker.hub.dirty.append(self)

    def slow_consumer(self) -> None:
        if self.close_code is None:
            log.warning(
                "%s slow consumer disconnected: queue full (%d messages, %d bytes)",
                self.id,
                self.outbox.stats().messages,
                self.outbox.queued_bytes,
            )
        # What is queued is not written; the close frame is tried (a slow
        # reader may still get it), for CLOSE_TIMEOUT at most.
        self.close(CloseCode.POLICY_VIOLATION, "slow consumer: outbound queue full")

    def close(self, code: int, reason: str, *, drain: bool = False) -> None:
        """Start closing: the first call decides the code and reason.

        With *drain*, frames already queued are written first (bounded by
        ``limits.drain_timeout``).
        """
        if self.close_code is None:
            self.close_code = code
            self.close_reason = reason
            self._drain = drain
            # No new messages for a connection that is closing.
            self._unsubscribe_all()
        if self._scope is not None:
            self._scope.cancel()

    def flush(self) -> None:
        """Write what is queued now, without blocking (see the module doc)."""
        if self._writer_running:
            return  # it takes what is queued once the socket drains
        if self._finishing or (self.close_code is not None and not self._drain):
            # run()'s finish owns the socket now, or the connection is closing
            # without a drain: what is queued is not written.
            return
        if not self._write_nowait():
            self._start_writer()

    def send_ping(self) -> None:
        """Queue a ping (the heartbeat calls this, then flushes)."""
        self.ping_outstanding = True
        self._reply_frame(ping_frame())

    # -- writing -----------------------------------------------------------------

    def _next_parts(self) -> list[bytes]:
        outbox = self.outbox
        drops = outbox.take_drops()
        if not drops:  # the common case
            return outbox.take(self.broker.config.limits.write_batch_bytes)
        parts = [
            frame(encode_dropped(topic, count, self.encoding)) for topic, count in drops.items()
        ]
        parts += outbox.take(self.broker.config.limits.write_batch_bytes)
        return parts

    def _write_nowait(self) -> bool:
        """Write queued frames directly; False if the socket would block."""
        if self._broken:
            return True
        if self._tls is not None:
            return self._send_nowait_tls(self._tls)
        outbox = self.outbox
        while True:
            if self._unsent:
                parts = [self._unsent]
                self._unsent = b""
            elif outbox.pending():
                parts = self._next_parts()
            else:
                outbox.in_flight = 0
                return True
            try:
                if len(parts) == 1:
                    written = os.write(self._fd, parts[0])
                else:
                    # writev takes at most IOV_MAX buffers; join the rest.
                    if len(parts) > MAX_IOV:
                        parts = [*parts[: MAX_IOV - 1], b"".join(parts[MAX_IOV - 1 :])]
                    written = os.writev(self._fd, parts)
            except _WOULD_BLOCK:
                written = 0
            except OSError as e:
                self._fail(e)
                return True
            self.bytes_out += written
            total = sum(map(len, parts))
            if written < total:
                self._unsent = _tail(parts, written)
                outbox.in_flight = len(self._unsent)
                return False

    def _send_nowait_tls(self, tls: TLSStream) -> bool:
        """:meth:`_write_nowait` for TLS: each batch encrypted in one piece."""
        outbox = self.outbox
        while outbox.pending():
            parts = self._next_parts()
            data = parts[0] if len(parts) == 1 else b"".join(parts)
            try:
                done = tls.send_nowait(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
                self._fail(e)
                return True
            # Counted once encrypted: what the socket has not taken yet is
            # held by the stream and goes out first (see _write_some).
            self.bytes_out += len(data)
            if not done:
                outbox.in_flight = tls.unsent
                return False
        outbox.in_flight = 0
        return True

    def _start_writer(self) -> None:
        nursery = self._nursery
        if nursery is None or self._writer_running:
            return
        self._writer_running = True
        nursery.start_soon(self._writer)

    async def _writer(self) -> None:
        """Write what is queued with awaiting writes, while the socket is
        backed up (or to drain on close); ends once nothing is left."""
        try:
            while await self._write_some():
                pass
        except Exception as e:
            log.exception("%s writer failed", self.id)
            self._fail(e)
        finally:
            self._writer_running = False
            if self._writing:
                # Cancelled part-way through send_all: the peer may hold half
                # a frame, so nothing more may be written, not even a close.
                self._broken = True

    async def _write_some(self) -> bool:
        """One awaiting write of what is queued; False when nothing was left."""
        if self._broken:
            return False
        if self._unsent:
            data = self._unsent
        elif self._no_more:
            # Only what a direct write started may still go out (TLS: the
            # ciphertext the stream holds), so the close frame can follow.
            if self._tls is None or not self._tls.unsent:
                return False
            data = b""
        else:
            parts = self._next_parts()
            if not parts and (self._tls is None or not self._tls.unsent):
                return False
            # TLS: send_all writes the ciphertext the stream holds first.
            data = parts[0] if len(parts) == 1 else b"".join(parts)
            del parts  # the frames themselves need not outlive the write
        self._unsent = b""
        self._writing = True
        outbox = self.outbox
        outbox.in_flight = len(data) + (self._tls.unsent if self._tls is not None else 0)
        try:
            await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
            self._fail(e)
            return False
        self._writing = False
        outbox.in_flight = 0
        self.bytes_out += len(data)
        return True

    def _fail(self, error: BaseException) -> None:
        if not self._broken:
            log.debug("%s write failed: %r", self.id, error)
        self._broken = True
        self._unsent = b""
        self.outbox.in_flight = 0
        self.close(CloseCode.ABNORMAL, "connection lost")

    # -- the connection's task -----------------------------------------------------

    async def run(self, initial: bytes = b"") -> None:
        """Serve the client until it or the broker closes the connection.

        *initial* is data that arrived with the handshake request.
        """
        plugins = self.broker.plugins
        limits = self.broker.config.limits
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                with trio.CancelScope() as scope:
                    self._scope = scope
                    if self.close_code is not None:  # closed before we started
                        scope.cancel()
                    await plugins.connected(self.info)
                    try:
                        await self._reader(initial)
                    except Exception:
                        log.exception("%s internal error", self.id)
                        self.close(CloseCode.INTERNAL_ERROR, "internal error", drain=True)
                self._scope = None
                self._unsubscribe_all()
                self.broker.hub.flush()  # what this reader queued for others
                if self._drain and not self._broken:
                    # Let the writer finish what is queued, for a bounded time;
                    # cancelling it mid-write would cost the close frame.
                    nursery.cancel_scope.deadline = trio.current_time() + limits.drain_timeout
                    self._start_writer()  # unless it is running
                else:
                    # Queued frames are not written, but a write in progress
                    # gets CLOSE_TIMEOUT to end, so that the close frame can
                    # follow it (a slow consumer may still read its 1008).
                    self._no_more = True
                    nursery.cancel_scope.deadline = trio.current_time() + CLOSE_TIMEOUT
        finally:
            self._scope = None
            self._nursery = None
            self._finishing = True
            self._unsubscribe_all()
            with trio.move_on_after(CLOSE_TIMEOUT, shield=True):
                await self._finish()
            code = self.close_code if self.close_code is not None else CloseCode.NORMAL
            if plugins.pm.hook.broker_disconnected.get_hookimpls():
                with trio.move_on_after(CLOSE_TIMEOUT, shield=True):
                    await plugins.disconnected(self.info, int(code), self.close_reason)

    def _unsubscribe_all(self) -> None:
        hub = self.broker.hub
        for pattern in self.subscriptions:
            hub.unsubscribe(pattern, self)
        self.subscriptions.clear()

    async def _finish(self) -> None:
        """Send the close frame and wait briefly for the client's; close the socket."""
        stream = self.stream
        try:
            if self._writing:
                self._broken = True  # cut mid-write by the drain deadline
            if not self._broken:
                if self._unsent:  # finish the frame a direct write cut short
                    await stream.send_all(self._unsent)
                    self._unsent = b""
                # (TLS: send_all writes the ciphertext the stream holds first.)
                code = self.close_code if self.close_code is not None else CloseCode.NORMAL
                closing = close_frame(int(code), self.close_reason)
                if self._fd >= 0:
                    # Plain TCP: one non-blocking write (send_all for a rest).
                    try:
                        closing = closing[os.write(self._fd, closing) :]
                    except _WOULD_BLOCK:
                        pass
                    except OSError as e:
                        raise trio.BrokenResourceError from e
                if closing:
                    await stream.send_all(closing)
                if not self._peer_closed:
                    await self._await_close()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            if isinstance(stream, trio.SocketStream):
                stream.socket.close()  # nothing to flush: no need to await
            else:
                await trio.aclose_forcefully(stream)  # close_notify, if it fits

    async def _await_close(self) -> None:
        """After our close frame: read until the client's, or until it hangs up."""
        while True:
            data = await self.stream.receive_some(RECEIVE_SIZE)
            if not data:
                return
            try:
                events = self.parser.feed(data)
            except FrameError:
                return
            if any(isinstance(e, Close) for e in events):
                return

    async def _reader(self, initial: bytes | bytearray) -> None:
        stream = self.stream
        parser = self.parser
        hub = self.broker.hub
        data = initial
        reads = 0
        handled = 0  # messages since the last flush
        while True:
            if data:
                self.last_seen = trio.current_time()
                self.bytes_in += len(data)
                # Any traffic shows the client is alive; a new ping may go out
                # the next time it falls silent.
                self.ping_outstanding = False
                violation: FrameError | None = None
                try:
                    events = parser.feed(data)
                except FrameError as e:
                    events, violation = e.events, e  # handle what came before it
                for event in events:
                    if isinstance(event, (str, bytes)):
                        handled += 1
                        await self._command(event)
                        if hub.pending > FLUSH_EVERY:
                            hub.flush()
                    elif isinstance(event, Ping):
                        self._reply_frame(pong_frame(event.payload))
                    elif isinstance(event, Pong):
                        self.ping_outstanding = False
                    else:
                        assert isinstance(event, Close)
                        self._peer_closed = True
                        code = event.code if event.code != 1005 else CloseCode.NORMAL
                        self.close(code, event.reason)
                        return
                    if self.close_code is not None:
                        return
                if violation is not None:
                    log.info("%s closing (%d): %s", self.id, violation.code, violation.reason)
                    self.close(violation.code, violation.reason, drain=True)
                    return
                # Adaptive batching: before flushing, take what input is
                # already waiting (one more non-blocking read, and more while
                # reads come back full), so that under load each subscriber
                # gets many frames per write; idle, it costs one EAGAIN.
                # Bounded, so others get their turn and latency stays low.
                if (
                    (len(data) >= RECEIVE_SIZE or reads == 0)
                    and (self._fd >= 0 or self._tls is not None)
                    and reads < MAX_READS_PER_FLUSH
                    and hub.pending < FLUSH_EVERY
                ):
                    reads += 1
                    ahead: bytes | None
                    if self._tls is not None:
                        try:
                            ahead = self._tls.receive_nowait(RECEIVE_SIZE)
                        except (trio.BrokenResourceError, trio.ClosedResourceError):
                            ahead = b""
                    else:
                        try:
                            ahead = os.read(self._fd, RECEIVE_SIZE)
                        except _WOULD_BLOCK:
                            ahead = None
                        except OSError:
                            ahead = None  # the next receive_some reports it
                    if ahead:
                        data = ahead
                        continue
                    if ahead is not None:
                        self._broken = True  # closed without a close frame
                        self.close(CloseCode.ABNORMAL, "connection lost")
                        return
                if (
                    handled >= DEFER_MIN_MESSAGES
                    and len(hub.dirty) >= DEFER_MIN_DIRTY
                    and reads < MAX_READS_PER_FLUSH
                    and hub.pending < FLUSH_EVERY
                ):
                    # Under sustained load (many messages in this batch), a
                    # flush to many sockets is about to go out with a frame or
                    # two each: give the publisher FLUSH_DEFER to send more,
                    # so that the same writes carry more frames. A sporadic
                    # publish is flushed at once.
                    reads += 1
                    more: bytes | bytearray = b""
                    with trio.move_on_after(FLUSH_DEFER):
                        try:
                            more = await stream.receive_some(RECEIVE_SIZE)
                        except (trio.BrokenResourceError, trio.ClosedResourceError):
                            more = b""
                            self._broken = True
                        if not more:
                            self._broken = True
                            self.close(CloseCode.ABNORMAL, "connection lost")
                            return
                    if more:
                        data = more
                        continue
                hub.flush()
            reads = 0
            handled = 0
            # Hold nothing while waiting (an idle connection's whole cost).
            data = b""
            events = []
            if self._fd >= 0:
                # Plain TCP: read the descriptor, and wait on it when empty.
                # Idle, a connection is then suspended in wait_readable alone:
                # through SocketStream.receive_some it would also hold four
                # more suspended frames (~1.5 KB, measured with tracemalloc).
                empty = False
                try:
                    data = os.read(self._fd, RECEIVE_SIZE)
                except _WOULD_BLOCK:
                    empty = True  # wait outside the handler: no exception kept
                except OSError:
                    data = b""
                if empty:
                    try:
                        await trio.lowlevel.wait_readable(self._fd)
                    except trio.ClosedResourceError:
                        data = b""
                    else:
                        continue
                elif data:
                    # a checkpoint per read, as trio's own receive_some makes
                    await trio.lowlevel.checkpoint()
            else:
                try:
                    data = await stream.receive_some(RECEIVE_SIZE)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    self._broken = True
                    self.close(CloseCode.ABNORMAL, "connection lost")
                    return
            if not data:
                self._broken = True  # TCP closed without a close frame
                self.close(CloseCode.ABNORMAL, "connection lost")
                return

    # -- commands ----------------------------------------------------------------

    async def _command(self, message: str | bytes) -> None:
        try:
            command = decode_command(message, self.encoding)
            if isinstance(command, Publish):
                await self._publish(command)
            elif isinstance(command, Subscribe):
                await self._subscribe(command)
            elif isinstance(command, Unsubscribe):
                await self._unsubscribe(command)
            elif isinstance(command, Auth):
                await self._refresh(command)
            else:
                self._reply(encode_pong(command.id, self.encoding))
        except ProtocolError as e:
            if e.close_code is not None:
                log.info("%s closing (%d): %s", self.id, e.close_code, e.message)
                self.close(e.close_code, e.message, drain=True)
                return
            self._error(e.request_id, e.code, e.message)

    def _reply_frame(self, data: bytes) -> None:
        if self.outbox.push_reply(data):
            self.wake()
        else:
            log.warning("%s closing: %d replies unread", self.id, self.outbox.max_replies)
            self.close(CloseCode.POLICY_VIOLATION, "too many unread replies")

    def _reply(self, payload: str | bytes) -> None:
        self._reply_frame(frame(payload))

    def _error(self, request_id: RequestId | None, code: ErrorCode, message: str) -> None:
        self._reply(encode_err(request_id, code, message, self.encoding))

    def _refuse(self, request_id: RequestId | None, refusal: Refusal) -> None:
        """Answer a plugin's refusal; count it; close if it says so."""
        stats = self.broker.stats
        if refusal.code is ErrorCode.FORBIDDEN:
            stats.forbidden += 1
        elif refusal.code is ErrorCode.RATE_LIMITED:
            stats.rate_limited += 1
        elif refusal.code in (ErrorCode.INVALID, ErrorCode.TOO_LARGE):
            stats.invalid += 1
        self._error(request_id, refusal.code, refusal.message)
        if refusal.close:
            log.info("%s closing (1008): %s", self.id, refusal.message)
            self.close(CloseCode.POLICY_VIOLATION, refusal.message, drain=True)

    async def _refresh(self, command: Auth) -> None:
        """``auth``: replace the identity by the one a new token proves (same subject)."""
        broker = self.broker
        old = self.identity
        deadline = trio.current_time() + broker.config.limits.auth_timeout
        decision = await broker.plugins.refresh(old, command.token, deadline)
        if isinstance(decision, Reject):
            log.info("%s refresh refused for %s: %s", self.id, old.subject, decision.reason)
            self._error(command.id, ErrorCode.UNAUTHORIZED, decision.reason)
            return
        if self.close_code is not None:
            return
        self.identity = decision
        self.info = ClientInfo(self.id, decision, self.peer, self.encoding.value)
        # Decisions were made for the old identity (roles may have changed).
        self._publish_allowed.clear()
        broker.identity_changed()
        log.info("%s refreshed its credentials (%s)", self.id, decision.subject)
        self._reply(encode_ok(command.id, self.encoding))

    async def _subscribe(self, command: Subscribe) -> None:
        pattern = command.pattern
        broker = self.broker
        if pattern in self.subscriptions:
            self._reply(encode_ok(command.id, self.encoding))
            return
        limit = broker.config.limits.max_subscriptions
        if len(self.subscriptions) >= limit:
            self._error(command.id, ErrorCode.LIMIT, f"too many subscriptions (max {limit})")
            return
        decision = await broker.plugins.authorize_detail(
            self.identity, Action.SUBSCRIBE, pattern, client=self.info
        )
        if decision is not True:
            log.info("%s subscribe to %s refused for %s", self.id, pattern, self.identity.subject)
            if decision is False:
                decision = Refusal(ErrorCode.FORBIDDEN, f"not allowed to subscribe to {pattern}")
            self._refuse(command.id, decision)
            return
        if self.close_code is not None:
            return
        self.subscriptions.add(pattern)
        broker.hub.subscribe(pattern, self)
        self._reply(encode_ok(command.id, self.encoding))
        await broker.plugins.notify("broker_subscribed", client=self.info, pattern=pattern)

    async def _unsubscribe(self, command: Unsubscribe) -> None:
        pattern = command.pattern
        if pattern not in self.subscriptions:
            self._error(command.id, ErrorCode.BAD_REQUEST, f"not subscribed to {pattern}")
            return
        self.subscriptions.discard(pattern)
        self.broker.hub.unsubscribe(pattern, self)
        self._reply(encode_ok(command.id, self.encoding))
        await self.broker.plugins.notify("broker_unsubscribed", client=self.info, pattern=pattern)

    async def _may_publish(self, topic: str) -> Refusal | None:
        """None if this connection may publish to *topic*, else why not."""
        plugins = self.broker.plugins
        cache = self._publish_allowed
        if self._publish_generation != plugins.generation:
            cache.clear()
            self._publish_generation = plugins.generation
        allowed = cache.get(topic)
        if allowed is None:
            decision = await plugins.authorize_detail(
                self.identity, Action.PUBLISH, topic, client=self.info
            )
            if isinstance(decision, Refusal):
                return decision  # a plugin's own refusal is never cached
            allowed = decision
            if cache is _NO_CACHE:
                cache = self._publish_allowed = {}
            elif len(cache) >= PUBLISH_CACHE_SIZE:
                cache.clear()
            cache[topic] = allowed
        if allowed:
            return None
        return Refusal(ErrorCode.FORBIDDEN, f"not allowed to publish to {topic}")

    async def _publish(self, command: Publish) -> None:
        broker = self.broker
        topic = command.topic
        data: Any = command.data
        refusal = await self._may_publish(topic)
        if refusal is None:
            refusal = await broker.validate_publish(self.identity, topic, data, self.info)
        if refusal is not None:
            broker.count_publish(refusal)
            self._refuse(command.id, refusal)
            return
        seq = await broker.backplane.publish(topic, data, command.key)
        broker.count_publish(None)
        if command.id is not None:
            self._reply(encode_ok(command.id, self.encoding, seq=seq))
        if broker.plugins.observes_published:
            await broker.plugins.notify(
                "broker_published",
                identity=self.identity,
                topic=topic,
                seq=seq,
                data=data,
                key=command.key,
            )


def _tail(parts: list[bytes], written: int) -> bytes:
    """What a write of *parts* left unwritten after *written* bytes, joined.

    One copy of the rest, skipping the parts already written whole (no copy
    of the whole batch first).
    """
    for i, part in enumerate(parts):
        if written < len(part):
            return b"".join([memoryview(part)[written:], *parts[i + 1 :]])
        written -= len(part)
    return b""
