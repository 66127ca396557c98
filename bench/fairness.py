#!/usr/bin/env python3
"""Fair reading: what one flooding client costs another client's round trip.

    python3 bench/fairness.py                     # 5 s per phase
    python3 bench/fairness.py --seconds 2 --json  # shorter; figures as JSON

Starts our broker (``python -m broker serve``, pinned to CPU 0 with taskset
when there is one), then

* a **pinger** (this process): one connection sending ``{"op":"ping"}`` and
  waiting for each ``pong``; it measures the round trip with the broker
  otherwise idle (the reference);
* a **flooder** (a subprocess, pinned to CPU 1): publishes small messages
  without ids (no replies) on one connection as fast as the broker takes
  them, pre-built masked frames in large writes. Alone first: the rate the
  broker takes it at (counted exactly: the flooder ends with a publish with
  an id and stops the clock at its ``ok``) and the broker's CPU time per
  message (from ``/proc``, so less sensitive to a busy machine than the
  rate);
* then the flood again, while the pinger measures its round trip.

Prints the round trip's p50/p99/max, quiet and under the flood, and the
flood's rate and cost. Stdlib only, like ``run.py``.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from targets import ROOT, default_python, free_port

PATH = "/ws"
SUBPROTOCOL = "broker.v1.json"


# -- a minimal WebSocket client (client frames masked, server frames not) ----------


def masked(payload: bytes, opcode: int = 0x1) -> bytes:
    """One final client frame carrying *payload*."""
    mask = os.urandom(4)
    n = len(payload)
    if n < 126:
        head = bytes([0x80 | opcode, 0x80 | n])
    elif n < 65536:
        head = bytes([0x80 | opcode, 0x80 | 126]) + n.to_bytes(2, "big")
    else:
        head = bytes([0x80 | opcode, 0x80 | 127]) + n.to_bytes(8, "big")
    key = (mask * (n // 4 + 1))[:n]
    body = (int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")).to_bytes(n, "big")
    return head + mask + body


class Conn:
    """A blocking WebSocket connection to the broker."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            (
                f"GET {PATH} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                f"Sec-WebSocket-Protocol: {SUBPROTOCOL}\r\n\r\n"
            ).encode()
        )
        self.buf = b""
        while b"\r\n\r\n" not in self.buf:
            self._fill()
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        if not head.startswith(b"HTTP/1.1 101"):
            raise SystemExit(f"handshake refused: {head[:200]!r}")

    def _fill(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise SystemExit("the broker closed the connection")
        self.buf += data

    def send(self, obj: dict[str, Any]) -> None:
        self.sock.sendall(masked(json.dumps(obj).encode()))

    def close(self) -> None:
        """Close the connection (a close frame, then the socket): the broker
        need not wait for it when it stops."""
        self.sock.sendall(masked((1000).to_bytes(2, "big"), opcode=0x8))
        self.sock.close()

    def recv(self) -> dict[str, Any]:
        """The next text message (control frames skipped)."""
        while True:
            while len(self.buf) < 2:
                self._fill()
            opcode, n = self.buf[0] & 0x0F, self.buf[1] & 0x7F
            head = 2
            if n == 126:
                head, n = 4, int.from_bytes(self.buf[2:4], "big")
            elif n == 127:
                head, n = 10, int.from_bytes(self.buf[2:10], "big")
            while len(self.buf) < head + n:
                self._fill()
            payload, self.buf = self.buf[head : head + n], self.buf[head + n :]
            if opcode == 0x8:
                raise SystemExit(f"closed by the broker: {payload!r}")
            if opcode == 0x1:
                obj: dict[str, Any] = json.loads(payload)
                return obj


# -- the two clients -----------------------------------------------------------------


def flood(port: int, seconds: float) -> None:
    """The flooder's process: print the rate the broker took the flood at."""
    conn = Conn(port)
    one = masked(json.dumps({"op": "pub", "topic": "flood", "data": "x" * 16}).encode())
    batch = one * 1000  # about 60 KB per write
    sent = 0
    start = time.perf_counter()
    deadline = start + seconds
    conn.sock.sendall(batch)
    sent += 1000
    print("flooding", flush=True)  # the pinger's cue
    while time.perf_counter() < deadline:
        conn.sock.sendall(batch)
        sent += 1000
    conn.send({"op": "pub", "id": "end", "topic": "flood", "data": "end"})
    reply = conn.recv()
    elapsed = time.perf_counter() - start
    assert reply.get("id") == "end", reply
    conn.close()
    print(json.dumps({"published": sent + 1, "seconds": elapsed}), flush=True)


def ping_rtts(conn: Conn, seconds: float, n: int) -> list[float]:
    """Round trips (ms) of app-level pings, back to back, for *seconds*."""
    rtts: list[float] = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        n += 1
        t0 = time.perf_counter()
        conn.send({"op": "ping", "id": n})
        reply = conn.recv()
        rtts.append((time.perf_counter() - t0) * 1000)
        assert reply == {"op": "pong", "id": n}, reply
    return rtts


def figures(rtts: list[float]) -> dict[str, float]:
    rtts = sorted(rtts)
    return {
        "pings": len(rtts),
        "p50_ms": round(statistics.median(rtts), 3),
        "p99_ms": round(rtts[min(len(rtts) - 1, int(len(rtts) * 0.99))], 3),
        "max_ms": round(rtts[-1], 3),
    }


# -- the run ---------------------------------------------------------------------------


def pinned(cpu: int, argv: list[str]) -> list[str]:
    if shutil.which("taskset") and (os.cpu_count() or 1) > cpu:
        return ["taskset", "-c", str(cpu), *argv]
    return argv


def wait_listening(port: int, proc: subprocess.Popen[bytes], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:  # an external process: poll with a deadline
        if proc.poll() is not None:
            raise SystemExit(f"the broker exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit("the broker did not start listening")


def start_flooder(port: int, seconds: float) -> subprocess.Popen[bytes]:
    """Start the flooder's process; return once it floods."""
    argv = [sys.executable, __file__, "--flood", str(port), "--seconds", str(seconds)]
    flooder = subprocess.Popen(pinned(1, argv), stdout=subprocess.PIPE)
    assert flooder.stdout is not None
    if flooder.stdout.readline() != b"flooding\n":
        raise SystemExit("the flooder failed to start")
    return flooder


def finish_flooder(flooder: subprocess.Popen[bytes]) -> dict[str, float]:
    """Wait for the flooder; what it published, in how many seconds."""
    assert flooder.stdout is not None
    out = flooder.stdout.read()
    if flooder.wait(timeout=60) != 0:
        raise SystemExit("the flooder failed")
    took: dict[str, float] = json.loads(out)
    return took


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process (Linux); None where unknown."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="each phase (default 5)")
    parser.add_argument("--python", default=default_python(), help="interpreter for the broker")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--flood", type=int, help=argparse.SUPPRESS)  # the flooder's port
    args = parser.parse_args()
    if args.flood is not None:
        flood(args.flood, args.seconds)
        return 0

    port, admin = free_port(), free_port()
    with tempfile.TemporaryDirectory() as tmp:
        conf = Path(tmp) / "broker.toml"
        conf.write_text(
            "[listener]\n"
            f'host = "127.0.0.1"\nport = {port}\npath = "{PATH}"\n'
            f"[admin]\nport = {admin}\n"
            "[limits]\nping_interval = 0\n"
            '[log]\nlevel = "warning"\n'
            '[plugins]\nenabled = ["noauth"]\n'
        )
        broker = subprocess.Popen(
            pinned(0, [args.python, "-m", "broker", "serve", "-c", str(conf)]), cwd=ROOT
        )
        try:
            wait_listening(port, broker)
            conn = Conn(port)
            ping_rtts(conn, min(0.5, args.seconds), 0)  # warm up
            quiet = figures(ping_rtts(conn, args.seconds, 1_000_000))
            # The flood alone: the rate the broker takes it at, and its CPU
            # time per message (from /proc, so load from elsewhere on the
            # machine counts less than in the rate).
            flooder = start_flooder(port, args.seconds)
            cpu_before = cpu_seconds(broker.pid)
            took = finish_flooder(flooder)
            cpu_after = cpu_seconds(broker.pid)
            rate = took["published"] / took["seconds"]
            cpu_us = None
            if cpu_before is not None and cpu_after is not None:
                cpu_us = 1e6 * (cpu_after - cpu_before) / took["published"]
            # The flood again, with the pinger's round trips measured.
            flooder = start_flooder(port, args.seconds + min(1.0, args.seconds))
            loaded = figures(ping_rtts(conn, args.seconds, 2_000_000))
            finish_flooder(flooder)
            conn.close()
        finally:
            broker.send_signal(signal.SIGTERM)
            try:
                broker.wait(timeout=10)
            except subprocess.TimeoutExpired:
                broker.kill()
    result = {
        "quiet": quiet,
        "flood": loaded,
        "flood_msgs_per_s": round(rate),
        "broker_cpu_us_per_flood_msg": None if cpu_us is None else round(cpu_us, 2),
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(f"ping round trip, broker otherwise idle: {_fmt(quiet)}")
        print(f"ping round trip, under the flood:       {_fmt(loaded)}")
        print(f"flood alone, taken by the broker: {rate:,.0f} messages/s", end="")
        print("" if cpu_us is None else f", {cpu_us:.2f} µs of broker CPU each")
    return 0


def _fmt(f: dict[str, float]) -> str:
    return f"p50 {f['p50_ms']} ms, p99 {f['p99_ms']} ms, max {f['max_ms']} ms ({f['pings']} pings)"


if __name__ == "__main__":
    sys.exit(main())
