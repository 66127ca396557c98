"""Writing one connection's socket: batches, ``writev``, partial writes, and
a writer task only while the socket is backed up.

Everything owed to a client (replies, messages, pings, pongs) is queued in
its :class:`~broker.core.outbox.Outbox`. Whoever queued it (a publisher's reader,
a source, the heartbeat, an engine's delivery) calls ``Hub.flush`` once its
batch is done, and :meth:`SocketWriter.flush` then writes:

* on plain TCP, everything queued straight to the socket's descriptor with
  one non-blocking ``os.writev`` per batch: no task switch, one system call
  for many frames (the way nats-server flushes its clients);
* on TLS (``wss://``), the same way through
  :meth:`broker.io.tls.TLSStream.send_nowait`: the batch is encrypted in one go
  and the ciphertext written with one non-blocking ``os.write``;
* only when the kernel's buffer is full (a subscriber that reads slowly or
  not at all) a **writer** task is started; it waits until the socket is
  writable, writes what a direct write left (plain TCP: the rest of the
  batch; TLS: the ciphertext the stream kept) and drains the queue. Until it
  ends, flushes leave the socket to it, so frames never reorder. What a
  write has taken but the socket not accepted counts against the queue's
  byte bound (``Outbox.in_flight``).

The writer task runs in a nursery the connection names (the broker's
handlers nursery, where the connection's own task runs), in a cancel scope
of its own created with it: a connection holds no nursery of its own for a
task it rarely needs. The connection bounds it and waits for its end with
:meth:`SocketWriter.stop` before it writes the close frame.

The writer knows nothing of the broker: it gets the stream, the outbox, the
encoding (for ``dropped`` notices), the batch size and its connection (to
close when the socket fails).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Final, Protocol

import trio

from broker.core.errors import CloseCode
from broker.core.frames import close_frame, frame
from broker.core.outbox import Outbox
from broker.core.protocol import Encoding, encode_dropped
from broker.io.tls import TLSStream, joined

__all__ = ["MAX_IOV", "SocketWriter"]

log = logging.getLogger("broker.connection")

#: Most buffers in one writev (Linux IOV_MAX is 1024).
MAX_IOV: Final = 512

_WOULD_BLOCK: Final = (BlockingIOError, InterruptedError)


class Closable(Protocol):
    """What the writer tells of a failed socket: its connection."""

    def close(self, code: int, reason: str, *, drain: bool = False) -> None: ...


class SocketWriter:
    """Writes one connection's queued frames to its socket.

    Args:
        stream: a SocketStream, or a TLSStream over one.
        outbox: the connection's queue.
        encoding: the connection's encoding (``dropped`` notices).
        batch_bytes: returns the most bytes to take from the queue per write
            (``limits.write_batch_bytes``, read at each write: a reload may
            change it).
        owner: the connection, closed with 1006 when the socket fails.
        conn_id: for log lines.
    """

    # One of these lives per connection: no instance __dict__.
    __slots__ = (
        "_batch_bytes",
        "_close_queued",
        "_fd",
        "_owner",
        "_task_done",
        "_task_scope",
        "_tls",
        "_unsent",
        "_writing",
        "broken",
        "bytes_out",
        "conn_id",
        "encoding",
        "no_more",
        "nursery",
        "outbox",
        "stream",
        "writer_running",
    )

    def __init__(
        self,
        stream: trio.SocketStream | TLSStream,
        outbox: Outbox,
        encoding: Encoding,
        *,
        batch_bytes: Callable[[], int],
        owner: Closable,
        conn_id: str,
    ) -> None:
        self.stream: trio.SocketStream | TLSStream = stream
        # Direct writes: to this file descriptor for plain TCP (else -1), or
        # through the TLS stream's send_nowait (else None).
        if isinstance(stream, TLSStream):
            self._tls: TLSStream | None = stream
            self._fd = -1
        else:
            self._tls = None
            self._fd = stream.socket.fileno()
        self.outbox = outbox
        self.encoding = encoding
        self._batch_bytes = batch_bytes
        self._owner = owner
        self.conn_id = conn_id
        #: Where the writer task runs (the broker's handlers nursery), while
        #: the connection serves; None: no writer task may start.
        self.nursery: trio.Nursery | None = None
        self.writer_running = False
        # The writer task's cancel scope and end, while it runs.
        self._task_scope: trio.CancelScope | None = None
        self._task_done: trio.Event | None = None
        self._unsent = b""  # plain TCP: the tail of a partial direct write; goes out first
        self._writing = False  # an awaiting write is in progress
        #: The socket failed, or a write was cut mid-frame: write nothing more.
        self.broken = False
        #: Closing without a drain: only what a direct write started may go out.
        self.no_more = False
        #: WebSocket bytes written (before TLS), for metrics.
        self.bytes_out = 0
        # The rest of the close frame is in _unsent (see send_close_nowait).
        self._close_queued = False

    def release(self) -> None:
        """The connection is over: drop what it still held to write."""
        self._unsent = b""
        self.outbox.discard()

    @property
    def fd(self) -> int:
        """The plain socket's descriptor, or -1 on TLS."""
        return self._fd

    @property
    def tls(self) -> TLSStream | None:
        return self._tls

    def flush(self) -> None:
        """Write what is queued now without blocking; start the writer task
        if the socket is backed up."""
        if self.writer_running:
            return  # it takes what is queued once the socket drains
        if not self._write_nowait():
            self.start_writer()

    def start_writer(self) -> None:
        """Start the writer task (to drain on close, or once backed up)."""
        nursery = self.nursery
        if nursery is None or self.writer_running:
            return
        self.writer_running = True
        scope = self._task_scope = trio.CancelScope()
        done = self._task_done = trio.Event()
        nursery.start_soon(self._writer, scope, done)

    async def stop(self, deadline: float) -> None:
        """Let the writer task run until *deadline* at most (``-math.inf``:
        cancel it now), and wait for its end; returns at once without one."""
        scope, done = self._task_scope, self._task_done
        if scope is None or done is None:
            return
        scope.deadline = min(scope.deadline, deadline)
        await done.wait()

    # -- direct writes -------------------------------------------------------------

    def _next_parts(self) -> list[bytes]:
        outbox = self.outbox
        drops = outbox.take_drops()
        if not drops:  # the common case
            return outbox.take(self._batch_bytes())
        parts = [
            frame(encode_dropped(topic, count, self.encoding)) for topic, count in drops.items()
        ]
        parts += outbox.take(self._batch_bytes())
        return parts

    def _write_nowait(self) -> bool:
        """Write queued frames directly; False if the socket would block."""
        if self.broken:
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
                self.fail(e)
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
            data = joined(self._next_parts())
            try:
                done = tls.send_nowait(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
                self.fail(e)
                return True
            # Counted once encrypted: what the socket has not taken yet is
            # held by the stream and goes out first (see _write_some).
            self.bytes_out += len(data)
            if not done:
                outbox.in_flight = tls.unsent
                return False
        outbox.in_flight = 0
        return True

    # -- the writer task -------------------------------------------------------------

    async def _writer(self, scope: trio.CancelScope, done: trio.Event) -> None:
        """Write what is queued with awaiting writes, while the socket is
        backed up (or to drain on close); ends once nothing is left, or when
        *scope* is cancelled (see :meth:`stop`)."""
        try:
            with scope:
                while await self._write_some():
                    pass
        except Exception as e:
            log.exception("%s writer failed", self.conn_id)
            self.fail(e)
        finally:
            self.writer_running = False
            self._task_scope = self._task_done = None
            if self._writing:
                # Cancelled part-way through send_all: the peer may hold half
                # a frame, so nothing more may be written, not even a close.
                self.broken = True
            done.set()

    async def _write_some(self) -> bool:
        """One awaiting write of what is queued; False when nothing was left."""
        if self.broken:
            return False
        if self._unsent:
            data = self._unsent
        elif self.no_more:
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
            self.fail(e)
            return False
        self._writing = False
        outbox.in_flight = 0
        self.bytes_out += len(data)
        return True

    def fail(self, error: BaseException) -> None:
        """The socket failed: write nothing more, and have the connection close."""
        if not self.broken:
            log.debug("%s write failed: %r", self.conn_id, error)
        self.broken = True
        self._unsent = b""
        self.outbox.in_flight = 0
        self._owner.close(CloseCode.ABNORMAL, "connection lost")

    # -- the close frame ---------------------------------------------------------------

    def send_close_nowait(self, code: int, reason: str) -> bool:
        """:meth:`send_close` without waiting, on plain TCP: True once done
        (the close frame written with one non-blocking write, or nothing may
        be written); False if :meth:`send_close` must finish it (the socket
        is backed up, or a TLS stream).
        """
        if self._writing:
            self.broken = True  # cut mid-write by the drain deadline
        if self.broken:
            return True
        if self._unsent or self._fd < 0:
            return False
        closing = close_frame(code, reason)
        try:
            written = os.write(self._fd, closing)
        except _WOULD_BLOCK:
            return False
        except OSError:
            self.broken = True  # (send_close would raise: the socket is closed all the same)
            return True
        if written < len(closing):
            self._unsent = closing[written:]
            self._close_queued = True
            return False
        return True

    async def send_close(self, code: int, reason: str) -> None:
        """Finish a frame a direct write cut short, then send the close frame.

        Nothing is sent when a write was cut in the middle of a frame (the
        client may hold half a frame) or the socket already failed.

        Raises:
            trio.BrokenResourceError: the socket failed meanwhile.
        """
        if self._writing:
            self.broken = True  # cut mid-write by the drain deadline
        if self.broken:
            return
        stream = self.stream
        if self._unsent:
            await stream.send_all(self._unsent)
            self._unsent = b""
            if self._close_queued:
                return  # it ended with the close frame
        # (TLS: send_all writes the ciphertext the stream holds first.)
        closing = close_frame(code, reason)
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
