"""The WebSocket transport: the one module that knows trio-websocket's insides.

trio-websocket does the opening handshake, parses inbound frames and answers
pings; its public API sends one message per call, each framed by wsproto and
written with its own ``send_all``. The broker's writer instead hands the
socket many frames that were built once for all subscribers
(:mod:`broker.frames`) in a single ``send_all``. That needs two private
attributes of :class:`trio_websocket.WebSocketConnection`: ``_stream`` and
``_stream_lock`` (the lock every trio-websocket write takes, so our writes and
its pongs and close frames never interleave mid-frame), plus ``_wsproto`` to
check that the connection is open. Why that is safe:

* server frames are unmasked (RFC 6455 section 5.1), so a frame's bytes do
  not depend on the connection;
* we only write complete (FIN) data frames and no extension is ever
  negotiated (trio-websocket accepts none), so wsproto's outbound state has
  nothing to track for them;
* control frames (ping, pong, close) still go through wsproto.

The version is pinned in pyproject.toml and tests/test_transport.py checks
these attributes and that frames written this way read back correctly.
"""

from __future__ import annotations

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection
from wsproto.connection import ConnectionState

__all__ = ["abort", "is_open", "send_frames"]


def is_open(ws: WebSocketConnection) -> bool:
    """True while data frames may be sent (no close frame sent or received)."""
    return ws._wsproto.state is ConnectionState.OPEN and ws.closed is None


async def send_frames(ws: WebSocketConnection, data: bytes) -> None:
    """Write *data*, one or more complete pre-built data frames, in one ``send_all``.

    Raises ConnectionClosed when the connection is closing or the stream broke.
    If cancelled part-way, the stream may hold half a frame: the caller must
    then :func:`abort` rather than send a close frame.
    """
    if not is_open(ws):
        raise ConnectionClosed(ws.closed)
    async with ws._stream_lock:
        try:
            await ws._stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            await ws._abort_web_socket()
            raise ConnectionClosed(ws.closed) from None


async def abort(ws: WebSocketConnection) -> None:
    """Drop the TCP connection without a closing handshake.

    For a peer that stopped reading (its close frame could never be
    written) or a stream left mid-frame by a cancelled write.
    """
    await ws._abort_web_socket()
    await ws._close_stream()
