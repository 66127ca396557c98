"""Instructions per delivery on the 1000-topics or the fan-out path, counted by callgrind.

Timed benchmarks on a shared 2-core machine move by 10-20 % from run to
run; an instruction count does not. This script runs the broker (from
``--python``, on its default configuration) under ``valgrind
--tool=callgrind`` twice, and drives it from this process, which is not
counted:

* 1000 subscribers, each on its own topic ``t.N``, and one publisher;
* rounds: the publisher sends ``--burst`` publishes round-robin over the
  topics in one write (as the peer benchmark's closed loop keeps about
  10,000 in flight) and a ``ping``; the round ends when the ``pong`` and
  every subscriber's messages have arrived.

With ``--fanout`` the 1000 subscribers are all on one topic, so that each
gets the round's ``--burst`` messages as one batch (``--burst 10``: one
1.5 KB write per subscriber per round, as fan-out 1 -> 1000 in the peer
benchmark, whose closed loop keeps ten messages per subscriber in flight).
With ``--tls`` the broker serves ``wss://`` with a throw-away trustme
certificate (made with ``--python``) and the clients speak TLS.

The two runs differ only in their number of rounds, so everything else
(start, handshakes, subscriptions, shutdown) cancels out of::

    (instructions(rounds=long) - instructions(rounds=short)) / deliveries

User-space instructions only (the kernel's share is not counted), of the
interpreter and every C library it calls (OpenSSL, msgspec, ...). Run from
the project root::

    python3 bench/instructions.py                  # ~3 minutes
    python3 bench/instructions.py --python /path/to/other/.venv/bin/python \\
        --cwd /path/to/other/checkout               # the same for another commit
    python3 bench/instructions.py --fanout --burst 10 --long 21 [--tls]   # ~2 minutes

Compare two commits with the same ``--burst``: the figure depends on it
(frames per write, reads per flush).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import selectors
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TOPICS = 1000


def masked(payload: bytes, opcode: int = 0x1) -> bytes:
    mask = os.urandom(4)
    n = len(payload)
    if n < 126:
        head = bytes((0x80 | opcode, 0x80 | n))
    else:
        head = bytes((0x80 | opcode, 0x80 | 126)) + n.to_bytes(2, "big")
    key = (mask * (n // 4 + 1))[:n]
    body = (int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")).to_bytes(n, "big")
    return head + mask + body


def connect(port: int, tls: ssl.SSLContext | None = None) -> socket.socket:
    deadline = time.monotonic() + 120
    while True:
        try:
            s = socket.create_connection(("127.0.0.1", port), timeout=120)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    if tls is not None:
        s = tls.wrap_socket(s, server_hostname="127.0.0.1")
    s.sendall(
        b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        b"Sec-WebSocket-Version: 13\r\n\r\n"
    )
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = s.recv(4096)
        if not chunk:
            raise RuntimeError("handshake refused")
        head += chunk
    if not head.startswith(b"HTTP/1.1 101"):
        raise RuntimeError(head.decode(errors="replace"))
    return s


def frames_in(buf: bytearray) -> tuple[list[bytes], int]:
    """Whole server frames (unmasked) at the start of *buf*, and bytes used."""
    out: list[bytes] = []
    pos = 0
    while len(buf) - pos >= 2:
        n = buf[pos + 1] & 0x7F
        head = 2
        if n == 126:
            if len(buf) - pos < 4:
                break
            n = int.from_bytes(buf[pos + 2 : pos + 4], "big")
            head = 4
        elif n == 127:
            if len(buf) - pos < 10:
                break
            n = int.from_bytes(buf[pos + 2 : pos + 10], "big")
            head = 10
        if len(buf) - pos < head + n:
            break
        out.append(bytes(buf[pos + head : pos + head + n]))
        pos += head + n
    return out, pos


def read_frames(s: socket.socket, buf: bytearray, want: int) -> list[bytes]:
    got: list[bytes] = []
    while len(got) < want:
        frames, used = frames_in(buf)
        del buf[:used]
        got += frames
        if len(got) >= want:
            break
        chunk = s.recv(65536)
        if not chunk:
            raise RuntimeError("connection closed")
        buf += chunk
    return got


def drive(port: int, rounds: int, burst: int, fanout: bool, tls: ssl.SSLContext | None) -> int:
    """Subscribe, run *rounds*, return deliveries."""
    subs = [connect(port, tls) for _ in range(TOPICS)]
    bufs = [bytearray() for _ in subs]
    for i, s in enumerate(subs):
        topic = "t.0" if fanout else f"t.{i}"
        s.sendall(masked(json.dumps({"op": "sub", "id": 1, "topic": topic}).encode()))
    for s, buf in zip(subs, bufs, strict=True):
        (reply,) = read_frames(s, buf, 1)
        assert json.loads(reply)["op"] == "ok", reply
    publisher = connect(port, tls)
    pbuf = bytearray()
    filler = "#" + "x" * 80
    payloads = [
        masked(
            json.dumps(
                {
                    "op": "pub",
                    "topic": "t.0" if fanout else f"t.{n % TOPICS}",
                    "data": f"@T{n:016d}{filler}",
                }
            ).encode()
        )
        for n in range(burst)
    ]
    ping = masked(json.dumps({"op": "ping", "id": "r"}).encode())
    sel = selectors.DefaultSelector()
    for i, s in enumerate(subs):
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ, i)
    delivered = 0
    for _ in range(rounds):
        publisher.sendall(b"".join(payloads) + ping)
        (pong,) = read_frames(publisher, pbuf, 1)
        assert json.loads(pong)["op"] == "pong", pong
        if fanout:
            owed = [burst] * TOPICS
        else:
            owed = [burst // TOPICS + (1 if i < burst % TOPICS else 0) for i in range(TOPICS)]
        left = sum(owed)
        while left:
            for key, _ in sel.select(timeout=120):
                i = key.data
                # (TLS: a record at a time, until the socket has no more.)
                while True:
                    try:
                        chunk = subs[i].recv(65536)
                    except (BlockingIOError, ssl.SSLWantReadError):
                        break
                    if not chunk:
                        raise RuntimeError("a subscriber was disconnected")
                    bufs[i] += chunk
                    frames, used = frames_in(bufs[i])
                    del bufs[i][:used]
                    owed[i] -= len(frames)
                    left -= len(frames)
        assert not any(owed), "a subscriber got more or fewer messages than published"
        delivered += burst * (TOPICS if fanout else 1)
    for s in [*subs, publisher]:
        s.close()
    return delivered


def certificate(python: str, workdir: Path) -> tuple[Path, Path, ssl.SSLContext]:
    """A throw-away CA and server certificate for 127.0.0.1, made by trustme
    in the broker's interpreter (a test dependency of the project): the
    certificate, the key, and a client context that trusts the CA."""
    cert, key, ca = workdir / "cert.pem", workdir / "key.pem", workdir / "ca.pem"
    subprocess.run(
        [
            python,
            "-c",
            "import sys, trustme; ca = trustme.CA(); c = ca.issue_cert('127.0.0.1');"
            "c.cert_chain_pems[0].write_to_path(sys.argv[1]);"
            "c.private_key_pem.write_to_path(sys.argv[2]); ca.cert_pem.write_to_path(sys.argv[3])",
            str(cert),
            str(key),
            str(ca),
        ],
        check=True,
    )
    return cert, key, ssl.create_default_context(cafile=str(ca))


def count(
    python: str,
    cwd: Path,
    rounds: int,
    burst: int,
    workdir: Path,
    fanout: bool = False,
    tls: bool = False,
) -> tuple[int, int]:
    """Run the broker under callgrind for *rounds*: (instructions, deliveries)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = workdir / f"broker-{rounds}.toml"
    client_tls: ssl.SSLContext | None = None
    tls_lines = ""
    if tls:
        cert, key, client_tls = certificate(python, workdir)
        tls_lines = f'tls_cert = "{cert}"\ntls_key = "{key}"\n'
    config.write_text(
        f'[listener]\nhost = "127.0.0.1"\nport = {port}\n{tls_lines}[admin]\nport = 0\n'
        "[limits]\nmax_connections = 5000\nmax_connections_per_ip = 5000\nhandshake_timeout = 120.0\nping_interval = 0\n"
    )
    out = workdir / f"callgrind-{rounds}.out"
    log = workdir / f"broker-{rounds}.log"
    env = {**os.environ, "PYTHONPATH": f"{cwd}:{cwd / 'plugins'}"}
    proc = subprocess.Popen(
        [
            "valgrind",
            "--tool=callgrind",
            f"--callgrind-out-file={out}",
            python,
            "-m",
            "broker",
            "serve",
            "-c",
            str(config),
        ],
        cwd=cwd,
        env=env,
        stdout=subprocess.DEVNULL,
        # A file, not a pipe: a thousand "connected" lines would fill a pipe
        # nobody reads until the end, and block the broker.
        stderr=log.open("w"),
    )
    try:
        delivered = drive(port, rounds, burst, fanout, client_tls)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=300)
    err = log.read_text()
    match = re.search(r"Collected : (\d+)", err)
    if match is None:
        raise RuntimeError(f"no callgrind total:\n{err[-2000:]}")
    return int(match.group(1)), delivered


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--python", default=str(Path(".venv/bin/python").absolute()))
    ap.add_argument("--cwd", default=".", help="checkout whose broker runs")
    ap.add_argument("--burst", type=int, default=7500, help="publishes per round")
    ap.add_argument("--short", type=int, default=1, help="rounds of the short run")
    ap.add_argument("--long", type=int, default=3, help="rounds of the long run")
    ap.add_argument("--keep", help="keep the callgrind outputs and logs in this folder")
    ap.add_argument("--fanout", action="store_true", help="all subscribers on one topic")
    ap.add_argument("--tls", action="store_true", help="wss:// (a trustme certificate)")
    args = ap.parse_args()
    cwd = Path(args.cwd).absolute()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(args.keep or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        short = count(args.python, cwd, args.short, args.burst, workdir, args.fanout, args.tls)
        long = count(args.python, cwd, args.long, args.burst, workdir, args.fanout, args.tls)
    per = (long[0] - short[0]) / (long[1] - short[1])
    print(
        f"{cwd}: {per:,.0f} instructions per delivery "
        f"({'fan-out' if args.fanout else 'topics'} over {'wss' if args.tls else 'ws'}://, "
        f"burst {args.burst}, rounds {args.short} and {args.long})"
    )
    sys.exit(0)


if __name__ == "__main__":
    main()
