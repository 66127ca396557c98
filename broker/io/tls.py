"""Server-side TLS over a Trio socket, with writes that never wait.

:class:`TLSStream` is what the broker serves ``wss://`` with. It does what
``trio.SSLStream(..., server_side=True, https_compatible=True)`` does, on an
:class:`ssl.SSLObject` between two :class:`ssl.MemoryBIO`, and adds one
thing: :meth:`TLSStream.send_nowait`, a synchronous write. It encrypts the
data, writes the ciphertext to the socket with one non-blocking
``os.write`` and keeps whatever the kernel did not take; it returns False
when something is left, and the caller then hands over to a task that
awaits :meth:`TLSStream.send_all`. That lets :mod:`broker.server.connection` write
a TLS subscriber the way it writes a plain TCP one: straight from the
publisher's task, one encryption and one system call per batch, no task
switch (see its module docstring).

How it stays correct:

* **One ordered ciphertext buffer.** Everything the SSLObject produces
  (application data, TLS 1.3 session tickets, key-update replies, alerts,
  close_notify) is appended to ``_pending`` the moment it is produced (in
  the same synchronous step, even when the step fails), and
  the socket is only ever written from the front of that buffer. So the
  bytes on the wire are always in the order the SSLObject produced them,
  whichever task wrote them.
* **No await inside an SSLObject step.** Every SSLObject call and the
  taking of its output happen synchronously, so a reader task and a writer
  task can share the object under Trio without locks. Only one task may
  send (``send_all``, ``send_nowait``, ``wait_send_all_might_not_block``)
  and one may receive at a time; a second one gets
  :exc:`trio.BusyResourceError`.
* **Cancellation.** A cancelled ``send_all`` has encrypted all of its data:
  what did not reach the socket stays pending and goes out first with the
  next send, so the stream stays usable (``trio.SSLStream`` becomes broken).
  A cancelled ``receive_some`` loses nothing. A cancelled handshake breaks
  the stream.

Semantics, as ``trio.SSLStream`` with ``https_compatible=True``:

* a peer that closes its socket without a close_notify has ended the
  stream: ``receive_some`` returns ``b""``, as for a close_notify;
* :exc:`ssl.SSLError` and socket errors become
  :exc:`trio.BrokenResourceError` (the original as ``__cause__``); use after
  :meth:`~TLSStream.aclose` raises :exc:`trio.ClosedResourceError`. An
  error met after some plaintext in the same read (a corrupted record
  behind good ones) is raised by the next receive, after that plaintext
  (never taken for an end of stream);
* the session tickets TLS 1.3 produces after the handshake go out with the
  first send.

Differences: the handshake is explicit (call :meth:`~TLSStream.do_handshake`
before anything else); TLS 1.2 renegotiation is not supported (OpenSSL 3
refuses client-initiated renegotiation anyway, with a warning alert that
goes out like any other output); :meth:`~TLSStream.aclose` sends a
close_notify if the socket takes it without waiting (trio sends none in
this mode), then closes the socket; an alert produced by a failed handshake
or read is written if the socket takes it at once (trio drops it).

Memory: beyond OpenSSL's own state, an idle stream is one small object
with ``__slots__`` and holds no buffer (``_pending`` is empty unless a
subscriber is backed up, bounded then by one write batch). A MemoryBIO never
gives back the largest size it held, so **both BIOs are shared** by all the
streams of a thread. Every SSLObject
step takes out what it wrote to the outgoing BIO (to ``_pending``) and
what it left unread in the incoming one (to ``_unread``, which is empty
unless a receive stopped at *max_bytes* with whole records still to
decrypt) in the same synchronous step, also when the step fails, so both
are empty between steps and one pair serves every stream. A connection
thus keeps no BIO buffer of its own: not the ciphertext of its handshake
(about 1.9 KB for both directions, for the life of the connection), nor
that of its largest batch or read (up to ~22 KiB per direction), and the
buffer each encryption writes to stays in the CPU cache instead of being
one cold buffer per subscriber (a fan-out to 1000 wss subscribers touches
1000 of them per batch). The shared BIOs keep the largest size they held,
once per thread: :data:`WRITE_CHUNK` and :data:`BIO_CHUNK` bound that.
The streams of a Trio run all live in its thread; the BIOs are per thread
so that runs in other threads never share them.
"""

from __future__ import annotations

import contextlib
import operator
import os
import re
import ssl
import threading
from typing import Any, Final

import trio

from broker.core.config import ListenerConfig

__all__ = ["TLSStream", "describe_tls_error", "joined"]

#: Bytes of ciphertext asked of the kernel per read, and the default most
#: plaintext bytes one receive returns.
RECEIVE_SIZE: Final = 65536
#: Most bytes of ciphertext handed to the SSLObject at a time (one full TLS
#: record), as decryption needs them: what the shared incoming BIO keeps
#: after the largest read, and what a receive that stopped at *max_bytes*
#: has to take back out of it at most.
BIO_CHUNK: Final = 16384
#: Most bytes of plaintext encrypted in one step (the default write batch,
#: ``limits.write_batch_bytes``): what the shared outgoing BIO keeps after
#: the largest write, once per thread (about 350 KiB).
WRITE_CHUNK: Final = 262144

_per_thread = threading.local()


def _shared_bios() -> tuple[ssl.MemoryBIO, ssl.MemoryBIO]:
    """The calling thread's (incoming, outgoing) BIOs, which all its streams
    share (see the module docstring)."""
    try:
        bios: tuple[ssl.MemoryBIO, ssl.MemoryBIO] = _per_thread.bios
    except AttributeError:
        bios = _per_thread.bios = (ssl.MemoryBIO(), ssl.MemoryBIO())
    return bios


#: What a peer's end looks like to an SSLObject, raised for an end met in
#: the middle of the handshake (a shared BIO is never told of one stream's end).
_EOF_MESSAGE: Final = "EOF occurred in violation of protocol"


_WOULD_BLOCK: Final = (BlockingIOError, InterruptedError)

# States.
_HANDSHAKE: Final = 0  # before do_handshake() completed
_OPEN: Final = 1
_BROKEN: Final = 2  # a TLS or socket error; only aclose() is left
_CLOSED: Final = 3


class TLSStream(trio.abc.Stream):
    """A server-side TLS stream over *transport_stream*, with :meth:`send_nowait`.

    Args:
        transport_stream: the accepted TCP connection; the stream owns its
            socket from now on (closing the stream closes it) and does its
            own I/O on the socket's file descriptor.
        ssl_context: a server context (``ssl.Purpose.CLIENT_AUTH``).
    """

    # One of these lives per wss:// connection (tens of thousands of idle
    # ones are expected): no __dict__, and nothing allocated while idle.
    __slots__ = (
        "_fd",
        "_in",
        "_out",
        "_pending",
        "_read_error",
        "_receiving",
        "_sending",
        "_ssl",
        "_state",
        "_unread",
        "transport_stream",
    )

    def __init__(self, transport_stream: trio.SocketStream, ssl_context: ssl.SSLContext) -> None:
        self.transport_stream = transport_stream
        self._fd = transport_stream.socket.fileno()
        # Shared: both are empty whenever this stream's code is not running.
        self._in, self._out = _shared_bios()
        self._ssl = ssl_context.wrap_bio(self._in, self._out, server_side=True)
        #: Ciphertext produced but not yet taken by the kernel, in order.
        self._pending: bytes | memoryview = b""
        #: Ciphertext read from the socket but not consumed by the SSLObject
        #: yet (a receive stopped at max_bytes), in order.
        self._unread: bytes | memoryview = b""
        self._state = _HANDSHAKE
        self._sending = False
        self._receiving = False
        #: A TLS error met after some plaintext, raised by the next receive.
        self._read_error: ssl.SSLError | None = None

    # -- public API -------------------------------------------------------------

    def fileno(self) -> int:
        """The socket's file descriptor (to wait on it for reading, after
        :meth:`receive_nowait` returned None)."""
        return self._fd

    @property
    def unsent(self) -> int:
        """Bytes of ciphertext waiting for the socket (0 when all is written)."""
        return len(self._pending)

    async def do_handshake(self) -> None:
        """Run the TLS handshake; a no-op once it completed.

        Raises:
            trio.BrokenResourceError: the handshake failed (an
                :exc:`ssl.SSLError`, a certificate the context refuses, the
                peer left); the cause is the original error.
        """
        if self._state != _HANDSHAKE:
            self._check()
            await trio.lowlevel.checkpoint()
            return
        if self._sending or self._receiving:
            raise trio.BusyResourceError("the TLS handshake is already running")
        self._sending = self._receiving = True
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
            ssl_object = self._ssl
            incoming = self._in
            data: bytes | None = b""
            while True:
                try:
                    if self._unread:  # (kept by the last step, in order)
                        incoming.write(self._unread)
                        self._unread = b""
                    if data:
                        incoming.write(data)
                    ssl_object.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    pass
                finally:
                    # The flight or an alert (see below) out of the shared
                    # BIO, and what came after the handshake (the request)
                    # kept for the first receive.
                    self._settle()
                await self._flush()  # a checkpoint, even with nothing to write
                while (data := self._read_ciphertext(BIO_CHUNK)) is None:
                    await trio.lowlevel.wait_readable(self._fd)
                if not data:
                    raise ssl.SSLEOFError(ssl.SSL_ERROR_EOF, _EOF_MESSAGE)
            # TLS 1.2 ends with our Finished, which the client waits for. What
            # TLS 1.3 produces now is session tickets: they go out with the
            # first send, as in trio (one write fewer per connection).
            if self._pending and ssl_object.version() != "TLSv1.3":
                await self._flush()
        except ssl.SSLError as e:  # ssl.CertificateError included
            self._state = _BROKEN
            self._send_alert()
            raise trio.BrokenResourceError(f"TLS handshake failed: {e}") from e
        except BaseException:  # a socket error, cancelled (a timeout), closed
            if self._state != _CLOSED:
                self._fail()
            raise
        else:
            self._state = _OPEN
        finally:
            self._sending = self._receiving = False

    def getpeercert(self) -> dict[str, Any] | None:
        """The client's certificate, as :meth:`ssl.SSLSocket.getpeercert`
        gives it: a dict once the context verified it (mTLS), None if the
        client sent none or was not asked for one."""
        if self._state == _HANDSHAKE:
            raise RuntimeError("call do_handshake() first")
        return self._ssl.getpeercert()

    def send_nowait(self, data: bytes | bytearray | memoryview) -> bool:
        """Encrypt *data* and write what the socket takes now, without waiting.

        Ciphertext still pending from earlier sends goes first. Returns True
        when everything is written, False when some ciphertext is left: it
        stays in the stream (:attr:`unsent`), and the caller should then
        await :meth:`send_all` (with ``b""``, or with more data) from a task
        that may wait, rather than call this again.

        Raises:
            trio.BrokenResourceError: the connection failed.
            trio.ClosedResourceError: the stream was closed.
            trio.BusyResourceError: another task is in :meth:`send_all`.
        """
        if self._state == _OPEN and not (self._sending or self._pending) and data:
            if len(data) <= WRITE_CHUNK:
                # The common case (a subscriber's batch), in one piece: one
                # encryption, one read of the BIO, one write.
                try:
                    self._ssl.write(data)
                except ssl.SSLError as e:
                    self._state = _BROKEN
                    self._send_alert()  # empties the shared BIO
                    raise trio.BrokenResourceError(f"TLS write failed: {e}") from e
                cipher = self._out.read()
                try:
                    written = os.write(self._fd, cipher)
                except _WOULD_BLOCK:
                    self._pending = cipher
                    return False
                except OSError as e:
                    self._fail()
                    raise trio.BrokenResourceError(f"socket write failed: {e}") from e
                if written == len(cipher):
                    return True
                self._pending = memoryview(cipher)[written:]
                return False
        elif self._state != _OPEN:
            self._check()
        elif self._sending:
            raise trio.BusyResourceError("another task is sending on this TLS stream")
        if data:
            self._encrypt(data)
        return not self._pending or self._write_pending()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Encrypt *data* and write it after any pending ciphertext, waiting
        for the socket as needed; ``send_all(b"")`` writes what is pending.

        If cancelled, *data* has been encrypted in full and the rest of it
        goes out before anything sent later (the stream stays usable).
        """
        if self._sending:
            raise trio.BusyResourceError("another task is sending on this TLS stream")
        self._check()
        self._sending = True
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
            if data:
                self._encrypt(data)
            await self._flush()
        finally:
            self._sending = False

    async def wait_send_all_might_not_block(self) -> None:
        """Return when the socket may take the pending ciphertext (at once if none)."""
        if self._sending:
            raise trio.BusyResourceError("another task is sending on this TLS stream")
        self._check()
        self._sending = True
        try:
            if self._pending:
                await trio.lowlevel.wait_writable(self._fd)
            else:
                await trio.lowlevel.checkpoint()
        finally:
            self._sending = False

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """Decrypted bytes, at most *max_bytes* (64 KiB by default); ``b""``
        once the peer ended the stream (close_notify, or just closed)."""
        if self._receiving:
            raise trio.BusyResourceError("another task is receiving on this TLS stream")
        self._check()
        if max_bytes is None:
            max_bytes = RECEIVE_SIZE
        else:
            max_bytes = operator.index(max_bytes)
            if max_bytes < 1:
                raise ValueError("max_bytes must be >= 1")
        self._receiving = True
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
            waited = False
            data = self._decrypt(max_bytes)
            while data is None:
                raw = self._read_ciphertext(RECEIVE_SIZE)
                if raw is None:
                    waited = True
                    await trio.lowlevel.wait_readable(self._fd)
                else:
                    data = self._decrypt(max_bytes, raw)
            if not waited:  # no I/O wait, but still a checkpoint
                await trio.lowlevel.cancel_shielded_checkpoint()
            return data
        finally:
            self._receiving = False

    def receive_nowait(self, max_bytes: int = RECEIVE_SIZE) -> bytes | None:
        """What :meth:`receive_some` would return at once, without waiting:
        decrypted bytes, ``b""`` at the end of the stream, or None if nothing
        is there yet (the socket is read without waiting).

        None is returned only after a read of the socket found it empty, with
        nothing left in the stream, so a caller may then wait for the socket
        on an edge-triggered epoll (as the broker's read poller does).
        """
        if self._receiving:
            raise trio.BusyResourceError("another task is receiving on this TLS stream")
        self._check()
        data = self._decrypt(max_bytes)
        while data is None:
            raw = self._read_ciphertext(RECEIVE_SIZE)
            if raw is None:
                return None
            data = self._decrypt(max_bytes, raw)
        return data

    async def aclose(self) -> None:
        """Close: a close_notify if the socket takes it at once, then the socket.

        Never waits for the peer (a subscriber that stopped reading would
        hold it up), and closes even if cancelled.
        """
        if self._state != _CLOSED:
            if self._state == _OPEN:
                # Queues our close_notify (SSLWantReadError: the peer's is
                # not awaited).
                try:
                    self._ssl.unwrap()
                except ssl.SSLError:
                    pass
                finally:
                    self._settle()
                if self._pending:
                    with contextlib.suppress(trio.BrokenResourceError):
                        self._write_pending()
            self._state = _CLOSED
            self._pending = self._unread = b""
            self.transport_stream.socket.close()  # wakes any task waiting on it
        await trio.lowlevel.checkpoint()

    # -- internals --------------------------------------------------------------

    def _check(self) -> None:
        state = self._state
        if state == _OPEN:
            return
        if state == _CLOSED:
            raise trio.ClosedResourceError("this TLS stream was closed")
        if state == _BROKEN:
            raise trio.BrokenResourceError("this TLS stream is broken")
        raise RuntimeError("call do_handshake() first")

    def _fail(self) -> None:
        self._state = _BROKEN
        self._pending = b""

    def _settle(self) -> None:
        """After an SSLObject step: empty the shared BIOs, what it wrote to
        the end of the pending ciphertext, what it left unread to the front
        of ``_unread``."""
        incoming = self._in
        if incoming.pending:
            rest = incoming.read()
            self._unread = b"".join((rest, self._unread)) if self._unread else rest
        self._collect()

    def _collect(self) -> None:
        """Move what the SSLObject produced to the end of the pending ciphertext."""
        out = self._out
        if out.pending:
            data = out.read()
            self._pending = b"".join((self._pending, data)) if self._pending else data

    def _encrypt(self, data: bytes | bytearray | memoryview) -> None:
        """Encrypt *data* onto the end of the pending ciphertext, WRITE_CHUNK
        bytes at a time."""
        ssl_object = self._ssl
        try:
            if len(data) <= WRITE_CHUNK:
                ssl_object.write(data)
                self._collect()
                return
            out = self._out
            parts = [self._pending] if self._pending else []
            view = memoryview(data)
            for start in range(0, len(view), WRITE_CHUNK):
                ssl_object.write(view[start : start + WRITE_CHUNK])
                parts.append(out.read())
        except ssl.SSLError as e:
            self._state = _BROKEN
            self._send_alert()  # empties the shared BIO
            raise trio.BrokenResourceError(f"TLS write failed: {e}") from e
        self._pending = b"".join(parts)

    def _write_pending(self) -> bool:
        """One non-blocking write of the pending ciphertext; True if none is left."""
        if self._state == _CLOSED:  # never touch the fd: its number may be reused
            raise trio.ClosedResourceError("this TLS stream was closed")
        pending = self._pending
        try:
            written = os.write(self._fd, pending)
        except _WOULD_BLOCK:
            return False
        except OSError as e:
            self._fail()
            raise trio.BrokenResourceError(f"socket write failed: {e}") from e
        if written == len(pending):
            self._pending = b""
            return True
        # The kernel buffer is full; keep the rest without copying it.
        self._pending = memoryview(pending)[written:]
        return False

    async def _flush(self) -> None:
        """Write all the pending ciphertext, waiting for the socket as needed."""
        waited = False
        while self._pending and not self._write_pending():
            waited = True
            await trio.lowlevel.wait_writable(self._fd)
        if not waited:
            await trio.lowlevel.cancel_shielded_checkpoint()

    def _send_alert(self) -> None:
        """After a TLS error: write the alert the SSLObject produced, if the
        socket takes it at once (best effort); nothing is kept."""
        self._collect()
        if self._pending:
            with contextlib.suppress(OSError):
                os.write(self._fd, self._pending)
        self._pending = b""

    def _read_ciphertext(self, size: int) -> bytes | None:
        """One non-blocking read from the socket: ``b""`` at EOF, None if the
        socket had nothing."""
        if self._state == _CLOSED:  # never touch the fd: its number may be reused
            raise trio.ClosedResourceError("this TLS stream was closed")
        try:
            return os.read(self._fd, size)
        except _WOULD_BLOCK:
            return None
        except OSError as e:
            self._fail()
            raise trio.BrokenResourceError(f"socket read failed: {e}") from e

    def _decrypt(self, max_bytes: int, raw: bytes | None = None) -> bytes | None:
        """Plaintext from what the stream holds (decrypted but not returned
        yet, or ciphertext in ``_unread``), then from *raw* (what a socket
        read returned, ``b""`` at its end), up to *max_bytes* and over
        several TLS records: ``b""`` at the end of the stream, None if more
        ciphertext is needed.

        Ciphertext goes to the shared incoming BIO BIO_CHUNK bytes at a
        time, as decryption needs it; what is left when *max_bytes* is
        reached goes back to ``_unread`` for the next call, and the BIO is
        left empty.
        """
        ssl_object = self._ssl
        incoming = self._in
        error = self._read_error
        if error is not None:
            # OpenSSL reports a fatal error once; what it says afterwards
            # must not pass for a clean end of the stream.
            self._read_error = None
            self._state = _BROKEN
            raise trio.BrokenResourceError(f"TLS read failed: {error}") from error
        unread = self._unread
        if raw:
            unread = b"".join((unread, raw)) if unread else raw
        self._unread = b""
        left = len(unread)  # not handed to the BIO yet, from fed on
        fed = 0
        chunks: list[bytes] = []
        size = 0
        ended = False
        try:
            while size < max_bytes:
                try:
                    data = ssl_object.read(max_bytes - size)
                except ssl.SSLWantReadError:
                    if fed < left:
                        end = min(fed + BIO_CHUNK, left)
                        incoming.write(memoryview(unread)[fed:end])
                        fed = end
                        continue
                    # All of it handed over: the end of the socket is the
                    # end of the stream (https_compatible: without a
                    # close_notify, even in the middle of a record).
                    ended = raw == b""
                    break
                except ssl.SSLError as e:
                    if chunks:
                        # Return what came before it; the next receive raises it.
                        self._read_error = e
                        break
                    self._state = _BROKEN
                    self._send_alert()
                    raise trio.BrokenResourceError(f"TLS read failed: {e}") from e
                if not data:
                    ended = True  # close_notify
                    break
                chunks.append(data)
                size += len(data)
                if fed >= left and not incoming.pending:
                    break  # all consumed (a short read: no plaintext left inside)
        finally:
            # The shared BIOs emptied: the ciphertext not consumed (what
            # the BIO still holds is the end of what was fed) back to
            # _unread, without a copy; what was produced while reading (a
            # key-update reply, an alert...) to the pending ciphertext.
            kept = incoming.pending
            if kept:
                incoming.read()
            if kept or fed < left:
                self._unread = memoryview(unread)[fed - kept :]
            produced = self._out.pending
            if produced:
                self._collect()
        if produced and not self._sending:
            # In order, now if the socket takes it, else with the next send.
            # A failure shows in the next send or receive.
            with contextlib.suppress(trio.BrokenResourceError):
                self._write_pending()
        if chunks:
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)
        return b"" if ended else None


# The last batch joined: a copy of its list of frames, and its bytes. One
# tuple, replaced whole, so that a thread never pairs one batch's frames
# with another's bytes.
_last_join: tuple[list[bytes], bytes] = ([], b"")


def joined(parts: list[bytes]) -> bytes:
    """``b"".join(parts)``: one subscriber's batch as one piece of plaintext,
    for one encryption (:meth:`TLSStream.send_nowait`).

    A fan-out hands every subscriber of a topic the same frames, so the
    last batch joined is kept and handed out again while the frames are the
    same (equal bytes, usually the very same objects): one join per batch,
    not one per TLS subscriber. It holds one batch at most.
    """
    global _last_join
    if len(parts) == 1:
        return parts[0]
    last_parts, last_data = _last_join
    if parts == last_parts:
        return last_data
    data = b"".join(parts)
    _last_join = (parts.copy(), data)
    return data


def describe_tls_error(error: BaseException) -> str:
    """One line for a failed TLS handshake, for the log: OpenSSL's reason
    (``wrong version number``, ``tlsv1 alert unknown ca``...) without its
    source file and line, or the socket error. Never key material: OpenSSL's
    messages name the failure, not the data."""
    cause = error.__cause__ if error.__cause__ is not None else error
    if isinstance(cause, (ssl.SSLEOFError, ssl.SSLZeroReturnError)):
        return "the client closed the connection"
    if isinstance(cause, ssl.SSLCertVerificationError) and cause.verify_message:
        return f"certificate verify failed: {cause.verify_message}"
    if isinstance(cause, ssl.SSLError):
        text = cause.strerror or str(cause)
        text = re.sub(r"\s*\(_ssl\.c:\d+\)$", "", text)
        return re.sub(r"^\[SSL: [A-Z0-9_]+\]\s*", "", text) or text
    return str(cause) or type(cause).__name__


def make_ssl_context(
    cert: str, key: str, client_ca: str = "", client_auth: str = "none"
) -> ssl.SSLContext:
    """A server TLS context from PEM files, TLS 1.2 at the least.

    With *client_ca* and *client_auth* ``"optional"`` or ``"required"``,
    clients are asked for a certificate signed by one of those CAs; one that
    does not verify fails the TLS handshake (as does none at all, when
    required).
    """
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    if client_ca and client_auth != "none":
        ctx.load_verify_locations(cafile=client_ca)
        ctx.verify_mode = ssl.CERT_REQUIRED if client_auth == "required" else ssl.CERT_OPTIONAL
    return ctx


def ssl_context_for(listener: ListenerConfig) -> ssl.SSLContext | None:
    """The TLS context ``[listener]`` asks for (mTLS included), or None without TLS."""
    if not listener.tls:
        return None
    return make_ssl_context(
        listener.tls_cert, listener.tls_key, listener.tls_client_ca, listener.tls_client_auth
    )
