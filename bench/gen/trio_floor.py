"""CALIBRATION for ``connect-rate``: the least a Trio server does per connection.

    python bench/gen/trio_floor.py --port 8765

Not a broker. It reads the opening handshake until the blank line, answers
101 with the computed accept key, answers ``{"op":"ping","id":N}`` with
``{"op":"pong","id":N}`` and a close frame with a close frame, then closes;
no HTTP parser, no validation, no plugins, no limits. What ``connect-rate``
measures against it is the floor that Trio's accept, socket calls and task
per connection put under any Trio server on this machine, the yardstick
for the broker's own per-connection cost.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import json
import os
import re

import trio

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
KEY = re.compile(rb"sec-websocket-key: *(\S+)", re.IGNORECASE)


async def handle(stream: trio.SocketStream) -> None:
    # A client that left, or sent something else: on to the next one.
    with contextlib.suppress(trio.BrokenResourceError, OSError, ValueError, KeyError):
        await serve_one(stream)


async def serve_one(stream: trio.SocketStream) -> None:
    fd = stream.socket.fileno()
    request = b""
    while b"\r\n\r\n" not in request:
        data = await stream.receive_some(4096)
        if not data:
            return
        request += data
    found = KEY.search(request)
    if found is None:
        return
    accept = base64.b64encode(hashlib.sha1(found.group(1) + GUID).digest())
    os.write(
        fd,
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n",
    )
    data = request.split(b"\r\n\r\n", 1)[1]
    while True:
        if not data:
            data = await stream.receive_some(65536)
            if not data:
                return
        # Small client frames only (the generator's ping and close).
        at = 0
        while at + 6 <= len(data):
            opcode = data[at] & 0x0F
            size = data[at + 1] & 0x7F
            mask = data[at + 2 : at + 6]
            body = bytes(b ^ mask[i % 4] for i, b in enumerate(data[at + 6 : at + 6 + size]))
            at += 6 + size
            if opcode == 0x8:
                os.write(fd, b"\x88\x02\x03\xe8")
                return
            if opcode == 0x1:
                message = json.loads(body)
                if message.get("op") == "ping":
                    pong = json.dumps({"op": "pong", "id": message["id"]}, separators=(",", ":"))
                    os.write(fd, bytes([0x81, len(pong)]) + pong.encode())
        data = b""


async def serve(port: int) -> None:
    await trio.serve_tcp(handle, port, host="127.0.0.1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    trio.run(serve, args.port)


if __name__ == "__main__":
    main()
