"""One accepted client: its reader, and the life of the connection.

A connection is three parts, each in its own module:

* the **reader** (here): the connection's own task reads the socket, parses
  frames (:mod:`broker.core.frame_parser`), answers pings, hands each message to
  the session, and flushes the hub once a read's messages are handled;
* the **session** (:mod:`broker.server.session`): decodes and runs the commands,
  through :class:`~broker.server.session.SessionServices` only;
* the **writer** (:mod:`broker.io.writer`): writes what is queued in the
  connection's :class:`~broker.core.outbox.Outbox` to the socket.

The reader is a task only while the client talks. One that stays parked on
the broker's read poller through a sweep (a second or two without input) is
*retired*: its task ends and the connection goes dormant, registered with
the poller (see :mod:`broker.io.poller`), its session, subscriptions and
outbox in place. Input, or a close, wakes it: :meth:`Connection.wake` starts
a new task in the broker's handlers nursery, which continues
:meth:`Connection.run` where the last one stopped. WebSocket pings and
pongs alone (a heartbeat) are answered without one, in the poller's task
(:meth:`Connection.readable`).

:meth:`Connection.close` records the close code and cancels the reader;
:meth:`Connection.run` then removes the subscriptions, drains (for a graceful
close, bounded by ``limits.drain_timeout``), sends the close frame, waits
briefly for the client's (``close_timeout``), and closes the socket.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Awaitable, Callable
from collections.abc import Set as AbstractSet
from typing import Final

import trio

from broker.core.errors import CloseCode
from broker.core.frame_parser import Close, FrameError, FrameParser, Ping, Pong
from broker.core.frames import ping_frame, pong_frame
from broker.core.outbox import Outbox
from broker.core.protocol import Encoding
from broker.core.values import ClientInfo, Identity
from broker.io.poller import RETIRED, ReadPoller
from broker.io.tls import TLSStream
from broker.io.writer import SocketWriter
from broker.server.session import Session, SessionServices

__all__ = ["CLOSE_TIMEOUT", "Connection"]

log = logging.getLogger("broker.connection")

#: How long the closing handshake may take before the socket is closed (the
#: default of ``Connection(close_timeout=...)``).
CLOSE_TIMEOUT: Final = 2.0
#: Bytes asked of the kernel per read.
RECEIVE_SIZE: Final = 65536
#: Reads of nothing but pings and pongs a dormant connection handles in the
#: poller's task (Connection.readable) before it gets a task of its own.
QUICK_READS: Final = 4
#: Deliveries after which a reader flushes even in the middle of a read, so a
#: large burst of publishes does not hold every subscriber's first frame back.
FLUSH_EVERY: Final = 20_000
#: A flush about to write this many sockets or more waits up to FLUSH_DEFER
#: seconds for more input first (see Connection._batch).
DEFER_MIN_DIRTY: Final = 64
FLUSH_DEFER: Final = 0.0002
#: ...but only after a batch of at least this many messages (sustained load).
DEFER_MIN_MESSAGES: Final = 32
#: Reads processed back to back (without blocking) before a flush.
MAX_READS_PER_FLUSH: Final = 16
#: Fair reading: how much work one connection's input may do before its
#: reader lets the other tasks run (a checkpoint), in units where a frame
#: handled counts FRAME_COST and a delivery it queued counts 1 (about 2 µs
#: each, a frame about four times that): a millisecond or less. The batch goes
#: on after the checkpoint, so flushes still carry many frames each.
ROUND_BUDGET: Final = 512
FRAME_COST: Final = 4

_WOULD_BLOCK: Final = (BlockingIOError, InterruptedError)


class Connection:
    """A client connection after a successful handshake.

    Args:
        services: what its session may use of the broker.
        stream: the connection's stream: a SocketStream, or a TLSStream over one.
        conn_id: the id used in log lines.
        identity: who it authenticated as.
        encoding: JSON or msgpack, from the subprotocol.
        peer: the client's (address, port).
        nursery: where its writer task runs when it needs one (the broker's
            handlers nursery).
        poller: where its reader waits for its socket to become readable
            (None: ``trio.lowlevel.wait_readable``).
        resume: the task a dormant connection is woken into, in *nursery*,
            with input already read (it awaits :meth:`run` with it); None:
            the reader never retires.
        close_timeout: how long the closing handshake may take.
    """

    # Slots: one of these lives per connection (tens of thousands); an
    # instance __dict__ would cost about a kilobyte more each.
    __slots__ = (
        "_asleep",
        "_close_timeout",
        "_drain",
        "_finishing",
        "_hub",
        "_nursery",
        "_peer_closed",
        "_poller",
        "_resume",
        "_scope",
        "_services",
        "_started",
        "bytes_in",
        "close_code",
        "close_reason",
        "dirty",
        "encoding",
        "id",
        "last_seen",
        "outbox",
        "parser",
        "peer",
        "ping_outstanding",
        "session",
        "stream",
        "writer",
    )

    def __init__(
        self,
        services: SessionServices,
        stream: trio.SocketStream | TLSStream,
        *,
        conn_id: str,
        identity: Identity,
        encoding: Encoding,
        peer: tuple[str, int],
        nursery: trio.Nursery,
        poller: ReadPoller | None = None,
        resume: Callable[[Connection, bytes], Awaitable[object]] | None = None,
        close_timeout: float = CLOSE_TIMEOUT,
    ) -> None:
        config = services.runtime.config
        self._services = services
        self._nursery = nursery
        self._poller = poller
        self._resume = resume
        self._started = False
        #: Dormant: no task; the poller (or close()) wakes it.
        self._asleep = False
        self._hub = services.hub
        self.stream: trio.SocketStream | TLSStream = stream
        self.id = conn_id
        self.encoding = encoding
        self.peer = peer
        max_messages, max_bytes = config.queue.connection_limits()
        self.outbox = Outbox(
            max_messages=max_messages,
            max_bytes=max_bytes,
            max_replies=config.limits.max_replies,
        )
        self.parser = FrameParser(config.limits.max_message_size)
        self.writer = SocketWriter(
            stream,
            self.outbox,
            encoding,
            batch_bytes=services.write_batch_bytes,
            owner=self,
            conn_id=conn_id,
        )
        self.close_code: int | None = None
        self.close_reason = ""
        #: trio.current_time() of the last bytes received; the heartbeat
        #: drops connections that stay silent too long.
        self.last_seen = trio.current_time()
        self.ping_outstanding = False
        self.dirty = False  # queued in the hub's list of connections to flush
        self._close_timeout = close_timeout
        self._drain = False
        self._scope: trio.CancelScope | None = None
        self._peer_closed = False
        self._finishing = False
        #: WebSocket bytes read, for metrics.
        self.bytes_in = 0
        self.session = Session(self, services, identity, encoding)

    def __repr__(self) -> str:
        return f"<Connection {self.id} {self.identity.subject}@{self.peer[0]}:{self.peer[1]}>"

    @property
    def identity(self) -> Identity:
        return self.session.identity

    @property
    def info(self) -> ClientInfo:
        return self.session.info

    @property
    def subscriptions(self) -> AbstractSet[str]:
        """The patterns it holds (a set; not to be changed)."""
        subscriptions = self.session.subscriptions
        return subscriptions if isinstance(subscriptions, set) else frozenset(subscriptions)

    @property
    def bytes_out(self) -> int:
        return self.writer.bytes_out

    # -- called by the hub, the session and the heartbeat (synchronous) ------------

    def reply_frame(self, data: bytes) -> None:
        """Queue a reply, pong or ping (closes the connection if the client
        leaves too many unread)."""
        outbox = self.outbox
        if not outbox.push_reply(data):
            # max_replies are queued. They may only be waiting for the end
            # of the read that produced them (a client resubscribing to
            # hundreds of topics in one write): write them now. What the
            # socket does not take, the client has left unread.
            writer = self.writer
            if not writer.writer_running:
                self.flush()
            if not outbox.push_reply(data):
                log.warning("%s closing: %d replies unread", self.id, outbox.max_replies)
                self.close(CloseCode.POLICY_VIOLATION, "too many unread replies")
                return
        if not self.dirty:
            self.dirty = True
            self._hub.dirty.append(self)

    def slow_consumer(self) -> None:
        if self.close_code is None:
            log.warning(
                "%s slow consumer disconnected: queue full (%d messages, %d bytes)",
                self.id,
                self.outbox.stats().messages,
                self.outbox.queued_bytes,
            )
        # What is queued is not written; the close frame is tried (a slow
        # reader may still get it), for close_timeout at most.
        self.close(CloseCode.POLICY_VIOLATION, "slow consumer: outbound queue full")

    def close(self, code: int, reason: str, *, drain: bool = False) -> None:
        """Start closing: the first call decides the code and reason.

        With *drain*, frames already queued are written first (bounded by
        ``limits.drain_timeout``).
        """
        self._stop(code, reason, drain)
        if self._scope is not None:
            self._scope.cancel()
        elif (
            self._asleep and self._poller is not None and self._poller.take(_socket_fd(self.writer))
        ):
            # Dormant: a task of its own closes it, as any reader's does.
            self.wake()

    def wake(self, initial: bytes = b"") -> None:
        """Start the task of a dormant connection, which handles *initial*
        (input already read) first: for input (:meth:`readable`), to close
        (:meth:`close`), or as the broker stops."""
        if self._asleep and self._resume is not None:
            self._asleep = False
            self._nursery.start_soon(self._resume, self, initial, name=self.id)

    def readable(self) -> None:
        """Input for a dormant connection (the poller calls this when its
        socket is readable, having forgotten it).

        Pings and pongs alone, a heartbeat's answer or a client's keep-alive,
        are handled here, in the poller's task, as the reader would (the
        same two methods), and the connection stays dormant: an idle client
        costs no task per heartbeat. Anything else (a message, a close, a
        frame cut short, the end of the stream, a failed write) wakes it
        into its task with what was read.
        """
        if not self._asleep:
            return
        writer = self.writer
        tls = writer.tls
        fd = _socket_fd(writer)
        poller = self._poller
        assert poller is not None  # dormant: the poller put it to sleep
        for _ in range(QUICK_READS):
            read = _read_nowait(fd) if tls is None else _receive_nowait(tls)
            if read is None:
                # All handled and the socket empty: dormant again (as when
                # it retired, right after a read that found nothing).
                poller.sleep(fd, self)
                self.outbox.shed()
                return
            # (A read that fills the buffer is a busy client: its task.)
            events = self.parser.feed_controls(read) if 0 < len(read) < RECEIVE_SIZE else None
            if events is None:
                self.wake(read)
                return
            self._heard(len(read))
            for event in events:
                assert isinstance(event, (Ping, Pong))
                self._control(event)
            self._hub.flush()  # the pongs
            if self.close_code is not None:  # the write failed
                self.wake()
                return
        # Still more after that many reads: a client this busy gets its task,
        # which takes turns with the others (the poller's task does not).
        self.wake()

    def _heard(self, size: int) -> None:
        """*size* bytes came in: the client is alive, and a new ping may go
        out the next time it falls silent."""
        self.last_seen = trio.current_time()
        self.bytes_in += size
        self.ping_outstanding = False

    def _control(self, event: Ping | Pong) -> None:
        """A ping is answered with a pong (a pong needs nothing more than
        :meth:`_heard`)."""
        if type(event) is Ping:
            self.reply_frame(pong_frame(event.payload))

    @property
    def asleep(self) -> bool:
        """Dormant: the connection has no task now (see the module's docstring)."""
        return self._asleep

    def _stop(self, code: int, reason: str, drain: bool = False) -> None:
        """:meth:`close` without cancelling the reader: for the reader itself,
        which stops reading right after (cancelling costs more than the rest
        of a close)."""
        if self.close_code is None:
            self.close_code = code
            self.close_reason = reason
            self._drain = drain
            # No new messages for a connection that is closing.
            self.session.unsubscribe_all()

    def flush(self) -> None:
        """Write what is queued now, without blocking (see :mod:`broker.io.writer`)."""
        if self._finishing or (self.close_code is not None and not self._drain):
            # run()'s finish owns the socket now, or the connection is closing
            # without a drain: what is queued is not written.
            return
        self.writer.flush()

    def send_ping(self) -> None:
        """Queue a ping (the heartbeat calls this, then flushes)."""
        self.ping_outstanding = True
        self.reply_frame(ping_frame())

    # -- the connection's task -----------------------------------------------------

    async def run(self, initial: bytes = b"") -> bool:
        """Serve the client until it or the broker closes the connection
        (False), or until the reader is retired (True: the connection is
        dormant, and :meth:`wake` will start a task that calls this again).

        *initial* is input already read: what arrived with the handshake
        request, or what woke a dormant connection (:meth:`readable`).

        The reading loop is here, not in a coroutine of its own: a parked
        connection is this frame (and its caller's) suspended in one trio
        trap, and nothing more; each read is handled by :meth:`_batch`,
        whose frame (with the parser, session and flushing state it uses)
        lives only while it runs.
        """
        services = self._services
        plugins = services.runtime.plugins
        writer = self.writer
        tls = writer.tls
        fd = _socket_fd(writer)
        poller = self._poller
        first = not self._started
        if first:
            self._started = True
            if poller is not None and not poller.register(fd):
                poller = self._poller = None  # the kernel refused: trio's wait
            # No nursery of its own: the writer task, when the socket backs
            # up, runs in the broker's (see broker.io.writer).
            writer.nursery = self._nursery
        retire = self._resume is not None and poller is not None
        task = trio.lowlevel.current_task()
        data = initial
        retired = False
        try:
            with trio.CancelScope() as scope:
                self._scope = scope
                if self.close_code is not None:  # closed before we started
                    scope.cancel()
                if first:
                    await plugins.connected(self.info)
                try:
                    while True:
                        if data and not await self._batch(data):
                            break
                        # Hold nothing while waiting (an idle connection's
                        # whole cost).
                        data = b""
                        # Read what is there without waiting (plain: the
                        # descriptor; TLS: the socket through the SSLObject),
                        # and wait on the socket when it is empty. Idle, a
                        # connection is then suspended in one trio trap,
                        # parked on the broker's poller (broker.io.poller):
                        # through SocketStream.receive_some or
                        # TLSStream.receive_some it would also hold four more
                        # suspended frames (~1.5 KB, measured with
                        # tracemalloc), through wait_readable three. None
                        # means the socket's last read found it empty (also
                        # under TLS), so parking edge-triggered is safe.
                        read = _read_nowait(fd) if tls is None else _receive_nowait(tls)
                        if read is None:
                            if retired:
                                # Retired, and the socket is still empty:
                                # the task ends (below, with no checkpoint
                                # after this read).
                                break
                            try:
                                if poller is not None:
                                    poller.park(fd, task)
                                    woken = await trio.lowlevel.wait_task_rescheduled(self._unpark)
                                    retired = woken is RETIRED and retire
                                else:
                                    await trio.lowlevel.wait_readable(fd)
                            except trio.ClosedResourceError:
                                pass
                            else:
                                continue
                        elif read:
                            retired = False  # input: it stays a task
                            # a checkpoint per read, as trio's own
                            # receive_some makes
                            await trio.lowlevel.checkpoint()
                            data = read
                        if not data:
                            writer.broken = True  # TCP closed without a close frame
                            self._stop(CloseCode.ABNORMAL, "connection lost")
                            break
                except Exception:
                    log.exception("%s internal error", self.id)
                    self._stop(CloseCode.INTERNAL_ERROR, "internal error", drain=True)
                    retired = False
            self._scope = None
            if (
                retired
                and self.close_code is None
                and trio.current_effective_deadline() != -math.inf
            ):
                # Dormant from here, until the poller sees input or close()
                # wakes it (the read above found the socket empty, and
                # nothing has awaited since). Not if the broker's nursery
                # is cancelled: its connections close with their tasks, and
                # the broker has woken the dormant ones already.
                assert poller is not None
                self._asleep = True
                poller.sleep(fd, self)
                # As idle connections spend their life: the queue frees what
                # it keeps for the next batch (made again if one comes).
                self.outbox.shed()
                return True
            retired = False
            await self._end()
        finally:
            if not retired:
                await self._finish_all()
        return False

    async def _end(self) -> None:
        """The connection is closing: stop its subscriptions, let the writer
        drain (graceful close) or end its write in progress."""
        writer = self.writer
        self.session.unsubscribe_all()
        self._hub.flush()  # what this reader queued for others
        if self._drain and not writer.broken:
            # Let the writer finish what is queued, for a bounded time;
            # cancelling it mid-write would cost the close frame.
            limits = self._services.runtime.config.limits
            writer.start_writer()  # unless it is running
            await writer.stop(trio.current_time() + limits.drain_timeout)
        else:
            # Queued frames are not written, but a write in progress
            # gets close_timeout to end, so that the close frame can
            # follow it (a slow consumer may still read its 1008).
            writer.no_more = True
            await writer.stop(trio.current_time() + self._close_timeout)

    async def _finish_all(self) -> None:
        """The last of a connection, also when its task is cancelled: the
        close frame, the socket, the engine's interest, the disconnect hook."""
        writer = self.writer
        plugins = self._services.runtime.plugins
        self._scope = None
        writer.nursery = None
        if writer.writer_running:  # cancelled from outside: end it now
            with trio.CancelScope(shield=True):
                await writer.stop(-math.inf)
        self._finishing = True
        self.session.unsubscribe_all()
        # (A cancel scope costs as much as the rest of a close: each is
        # entered only when what it bounds may wait.)
        if not self._finish_nowait():
            with trio.move_on_after(self._close_timeout, shield=True):
                await self._finish()
        # The engine hears of the patterns nobody here needs any more, and
        # counts the connection out of presence: in a scope of its own, so
        # a client that never answers the close frame does not skip it.
        if not self.session.settled:
            with trio.move_on_after(self._close_timeout, shield=True):
                await self.session.settle()
        code = self.close_code if self.close_code is not None else CloseCode.NORMAL
        if plugins.pm.hook.broker_disconnected.get_hookimpls():
            with trio.move_on_after(self._close_timeout, shield=True):
                await plugins.disconnected(self.info, int(code), self.close_reason)

    def _unpark(self, raise_cancel: trio.lowlevel.RaiseCancelT) -> trio.lowlevel.Abort:
        """The reader, parked on the poller, is cancelled: it waits no more."""
        if self._poller is not None:
            self._poller.unpark(_socket_fd(self.writer))
        return trio.lowlevel.Abort.SUCCEEDED

    def _finish_nowait(self) -> bool:
        """:meth:`_finish` when it cannot wait: on plain TCP, when the client's
        close frame is not to be waited for (it closed first, or the socket
        failed) and the close frame goes out with one non-blocking write.
        False (the socket still open) if :meth:`_finish` must run."""
        stream = self.stream
        if not isinstance(stream, trio.SocketStream):
            return False
        writer = self.writer
        if not (writer.broken or self._peer_closed or self.parser.lost):
            return False  # the client's close frame is waited for
        code = self.close_code if self.close_code is not None else CloseCode.NORMAL
        if not writer.send_close_nowait(int(code), self.close_reason):
            return False
        stream.socket.close()
        return True

    async def _finish(self) -> None:
        """Send the close frame and wait briefly for the client's; close the socket."""
        stream = self.stream
        try:
            code = self.close_code if self.close_code is not None else CloseCode.NORMAL
            await self.writer.send_close(int(code), self.close_reason)
            if not self.writer.broken and not self._peer_closed and not self.parser.lost:
                await self._await_close()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            if isinstance(stream, trio.SocketStream):
                stream.socket.close()  # nothing to flush: no need to await
            else:
                await trio.aclose_forcefully(stream)  # close_notify, if it fits

    async def _await_close(self) -> None:
        """After our close frame: read until the client's, or until it hangs up.

        After a framing violation the parser skips everything but the
        client's close frame, so its arrival is seen here too, and the TCP
        connection closed at once (RFC 6455 section 5.5.1).
        """
        while True:
            data = await self.stream.receive_some(RECEIVE_SIZE)
            if not data:
                return
            try:
                events = self.parser.feed(data)
            except FrameError as e:
                if e.closing or self.parser.lost:
                    return
                continue  # the parser now looks for the close frame only
            if any(isinstance(e, Close) for e in events):
                return

    async def _batch(self, data: bytes | bytearray) -> bool:
        """Handle *data* and the input already waiting after it, then flush:
        False once the connection is closing."""
        stream = self.stream
        parser = self.parser
        hub = self._hub
        session = self.session
        writer = self.writer
        fd = writer.fd
        tls = writer.tls
        reads = 0
        handled = 0  # messages since the last flush
        spent = 0  # FRAME_COST per frame handled since the last checkpoint
        delivered = hub.delivered  # the hub's deliveries at the last checkpoint
        while True:
            self._heard(len(data))
            violation: FrameError | None = None
            try:
                events = parser.feed(data)
            except FrameError as e:
                events, violation = e.events, e  # handle what came before it
            for event in events:
                if isinstance(event, (str, bytes)):
                    handled += 1
                    await session.command(event)
                    if hub.pending > FLUSH_EVERY:
                        hub.flush()
                elif isinstance(event, (Ping, Pong)):
                    self._control(event)
                else:
                    assert isinstance(event, Close)
                    self._peer_closed = True
                    code = event.code if event.code != 1005 else CloseCode.NORMAL
                    self._stop(code, event.reason)
                    return False
                if self.close_code is not None:
                    return False
                spent += FRAME_COST
                if spent + hub.delivered - delivered >= ROUND_BUDGET:
                    # This client's round is over: let the others run.
                    await trio.lowlevel.checkpoint()
                    spent = 0
                    delivered = hub.delivered
            if violation is not None:
                # (closing: the client's close frame was seen already.)
                self._peer_closed = violation.closing
                log.info("%s closing (%d): %s", self.id, violation.code, violation.reason)
                self._stop(violation.code, violation.reason, drain=True)
                return False
            # Adaptive batching: before flushing, take what input is
            # already waiting (one more non-blocking read, and more while
            # reads come back full), so that under load each subscriber
            # gets many frames per write; idle, it costs one EAGAIN.
            # Bounded, so others get their turn and latency stays low.
            if (
                (len(data) >= RECEIVE_SIZE or reads == 0)
                and reads < MAX_READS_PER_FLUSH
                and hub.pending < FLUSH_EVERY
            ):
                reads += 1
                ahead = _read_nowait(fd) if tls is None else _receive_nowait(tls)
                if ahead:
                    data = ahead
                    continue
                if ahead is not None:
                    writer.broken = True  # closed without a close frame
                    self._stop(CloseCode.ABNORMAL, "connection lost")
                    return False
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
                        writer.broken = True
                    if not more:
                        writer.broken = True
                        self._stop(CloseCode.ABNORMAL, "connection lost")
                        return False
                if more:
                    data = more
                    continue
            if session.in_flight is not None:
                # Publishes a remote engine has yet to answer: their
                # acks go out with this flush.
                await session.settle_publishes()
                if self.close_code is not None:
                    return False
            hub.flush()
            return True


def _socket_fd(writer: SocketWriter) -> int:
    """The descriptor the reader reads and waits on: the socket's, under TLS
    too (the writer's ``fd`` is -1 there: it writes through the stream)."""
    tls = writer.tls
    return writer.fd if tls is None else tls.fileno()


def _receive_nowait(tls: TLSStream) -> bytes | None:
    """:func:`_read_nowait` under TLS: the plaintext that is there now, None
    if the socket had nothing more (its last read found it empty), ``b""``
    at the end of the stream or when the stream failed."""
    try:
        return tls.receive_nowait(RECEIVE_SIZE)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        return b""


def _read_nowait(fd: int) -> bytes | None:
    """One non-blocking read of *fd*: None if nothing is waiting, ``b""`` at
    the end of the stream or when the socket failed.

    A function of its own so that the ``BlockingIOError`` of an empty socket
    is raised and caught in this short-lived frame: raised in a connection's
    long-lived reader, it would give that coroutine a frame object (~360 B)
    for the rest of its life.
    """
    try:
        return os.read(fd, RECEIVE_SIZE)
    except _WOULD_BLOCK:
        return None
    except OSError:
        return b""
