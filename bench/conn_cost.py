"""What one idle subscribed connection costs the broker: CPU instructions to
set it up, and the memory it holds.

    python3 bench/conn_cost.py instructions [--n 2000] [--python .venv/bin/python]
    PYTHONPATH=. .venv/bin/python bench/conn_cost.py memory [--n 2000] [--top 25] [--parked]
    PYTHONPATH=. .venv/bin/python bench/conn_cost.py rss [--tls] [--n 3000] [--parked]
    PYTHONPATH=. .venv/bin/python bench/conn_cost.py wake [--n 3000] [--parked] [--input message]
    python3 bench/conn_cost.py clients --port PORT [--n 2000] [--tls CAFILE]

``instructions`` starts ``broker serve`` (the configuration of
``bench/run.py``'s ``broker`` target) under ``valgrind --tool=callgrind``
with instrumentation off, switches it on, opens ``--n`` connections the way
``idle-10000`` does (TCP connect, opening handshake, ``sub`` to a topic of
its own, wait for the ``ok``; 64 in flight), then one probe message to each
through a publisher connection, dumps the counters and prints the broker's
instructions per connection. With ``--churn``, each connection makes one
``ping`` round trip and the closing handshake instead, as ``connect-rate``
does. Instruction counts do not depend on what else
the machine runs, so a change to the accept path can be judged with one run
before and one after (against a checkout of the old commit: ``git worktree
add /tmp/old COMMIT`` and run the script there). System calls are the
kernel's and not counted: ``strace -c -f -p PID`` tells them.

``memory`` runs the broker in this process with :mod:`tracemalloc` and the
clients in a child process, and prints the Python bytes per connection (all
of them, not only those with broker code on the stack as
``tests/test_memory_budget.py`` counts) and the allocation sites that hold
the most.

``rss`` runs the broker in this process without tracemalloc (whose own
tables would be counted) and prints, per connection, the growth of the
process's RSS and of what glibc's malloc has in use (``mallinfo2``): the C
heap, where OpenSSL keeps its per-connection state and CPython its objects
over 512 bytes; the rest of the RSS is mostly CPython's small-object arenas.
With ``--tls`` the listener serves ``wss://`` (a trustme certificate) and the
clients connect with TLS 1.3, one at a time, so the split shows what OpenSSL
holds per idle connection.

Both in-process modes measure idle connections as they spend their life:
dormant (their readers' tasks ended by the read poller's sweep, see
``broker/io/poller.py``), opened in batches of ``--batch`` (500) with the
readers of each batch retired before the next opens, as a broker filling up
over minutes has them. ``--parked`` measures them in their first second or
two instead: every reader a task parked on the poller (the sweep is off).

``wake`` opens ``--n`` idle connections (at once), parked or dormant, then has every
client send one WebSocket ping at once (as the heartbeat's round has every
idle client answer at once; ``--input message``: a protocol ``ping``
message instead, which needs the connection's task) and prints the broker
process's CPU time (``time.process_time``) per connection until every
answer is back, how many connections are dormant then, and, for dormant
connections, per connection to retire them all again: what input costs a
dormant connection against a parked one.

``clients`` is the client side alone (stdlib sockets and selectors), for a
broker started some other way; it prints one line when every connection
got its probe, then holds them open until stdin closes.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import gc
import json
import os
import resource
import selectors
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent

REQUEST = (
    "GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
    "Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


def _masked(payload: bytes, opcode: int = 0x1) -> bytes:
    """One masked frame, text by default (payloads under 64 KiB)."""
    mask = os.urandom(4)
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    if len(payload) < 126:
        head = bytes([0x80 | opcode, 0x80 | len(payload)])
    else:
        head = bytes([0x80 | opcode, 0x80 | 126]) + struct.pack(">H", len(payload))
    return head + mask + body


def _frames(buf: bytearray) -> list[bytes]:
    """Take the complete unmasked server frames at the start of *buf*."""
    out = []
    while len(buf) >= 2:
        length = buf[1] & 0x7F
        at = 2
        if length == 126:
            if len(buf) < 4:
                break
            length = struct.unpack(">H", buf[2:4])[0]
            at = 4
        if len(buf) < at + length:
            break
        out.append(bytes(buf[at : at + length]))
        del buf[: at + length]
    return out


class _Client:
    __slots__ = ("buf", "i", "sock", "state")

    def __init__(self, i: int, sock: socket.socket) -> None:
        self.i = i
        self.sock = sock
        self.buf = bytearray()
        self.state = "connecting"


def open_clients(
    port: int, n: int, concurrency: int = 64, *, churn: bool = False, first: int = 0
) -> list[socket.socket]:
    """Open *n* subscribed connections (topic ``t<i>``, *i* from *first*), *concurrency* at a
    time, then publish one probe to each topic and wait until every one got
    it. Returns the sockets.

    With *churn*, as the benchmark's ``connect-rate``: each connection makes
    one ``ping`` round trip, then the closing handshake, and is closed (none
    is returned).
    """
    sel = selectors.DefaultSelector()
    done: list[socket.socket] = []
    started = 0
    in_flight = 0

    def start(i: int) -> None:
        sock = socket.socket()
        sock.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            sock.connect(("127.0.0.1", port))
        sel.register(sock, selectors.EVENT_WRITE, _Client(i, sock))

    while len(done) < n:
        while in_flight < concurrency and started < n:
            start(started)
            started += 1
            in_flight += 1
        for key, _ in sel.select(10):
            c: _Client = key.data
            if c.state == "connecting":
                err = c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    raise OSError(err, f"connection {c.i}: {os.strerror(err)}")
                k = base64.b64encode(os.urandom(16)).decode()
                c.sock.sendall(REQUEST.format(port=port, key=k).encode())
                c.state = "handshake"
                sel.modify(c.sock, selectors.EVENT_READ, c)
                continue
            data = c.sock.recv(65536)
            if not data and c.state == "closing":  # the broker closed after its close frame
                sel.unregister(c.sock)
                c.sock.close()
                done.append(c.sock)
                in_flight -= 1
                continue
            if not data:
                raise OSError(f"connection {c.i} closed in state {c.state}")
            c.buf += data
            if c.state == "handshake":
                end = c.buf.find(b"\r\n\r\n")
                if end < 0:
                    continue
                if not c.buf.startswith(b"HTTP/1.1 101"):
                    raise OSError(f"connection {c.i}: {bytes(c.buf[:80])!r}")
                del c.buf[: end + 4]
                if churn:
                    c.sock.sendall(_masked(b'{"op":"ping","id":1}'))
                    c.state = "pinging"
                else:
                    sub = json.dumps({"op": "sub", "id": 1, "topic": f"t{first + c.i}"})
                    c.sock.sendall(_masked(sub.encode()))
                    c.state = "subscribing"
            if c.state == "pinging" and _frames(c.buf):
                c.sock.sendall(_masked(struct.pack(">H", 1000), opcode=0x8))
                c.state = "closing"
            if c.state == "subscribing":
                for payload in _frames(c.buf):
                    if json.loads(payload).get("op") != "ok":
                        raise OSError(f"connection {c.i}: {payload!r}")
                    sel.unregister(c.sock)
                    c.sock.setblocking(True)
                    done.append(c.sock)
                    in_flight -= 1
    sel.close()
    if churn:
        return []
    # One probe to every subscriber, as idle-10000's barrier does.
    pub = socket.create_connection(("127.0.0.1", port))
    k = base64.b64encode(os.urandom(16)).decode()
    pub.sendall(REQUEST.format(port=port, key=k).encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += pub.recv(4096)
    probe = "@T0000000000000000#" + "x" * 81
    pub.sendall(
        b"".join(
            _masked(json.dumps({"op": "pub", "topic": f"t{first + i}", "data": probe}).encode())
            for i in range(n)
        )
    )
    for sock in done:
        buf = bytearray()
        while not _frames(buf):
            buf += sock.recv(4096)
    done.append(pub)
    return done


def open_tls_clients(port: int, n: int, cafile: str, first: int = 0) -> list[socket.socket]:
    """:func:`open_clients` over TLS, one connection at a time (blocking
    sockets; the broker still serves them all at once once they are open)."""
    import ssl

    ctx = ssl.create_default_context(cafile=cafile)

    def connect() -> socket.socket:
        sock = ctx.wrap_socket(
            socket.create_connection(("127.0.0.1", port)), server_hostname="localhost"
        )
        k = base64.b64encode(os.urandom(16)).decode()
        sock.sendall(REQUEST.format(port=port, key=k).encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(4096)
            if not chunk:
                raise OSError("closed during the handshake")
            head += chunk
        if not head.startswith(b"HTTP/1.1 101"):
            raise OSError(f"refused: {head[:80]!r}")
        return sock

    def frame(sock: socket.socket) -> bytes:
        buf = bytearray()
        while not (frames := _frames(buf)):
            chunk = sock.recv(4096)
            if not chunk:
                raise OSError("closed")
            buf += chunk
        return frames[0]

    done = []
    for i in range(n):
        sock = connect()
        sock.sendall(_masked(json.dumps({"op": "sub", "id": 1, "topic": f"t{first + i}"}).encode()))
        reply = frame(sock)
        if json.loads(reply).get("op") != "ok":
            raise OSError(f"connection {i}: {reply!r}")
        done.append(sock)
    pub = connect()
    probe = "@T0000000000000000#" + "x" * 81
    for i in range(n):
        pub.sendall(
            _masked(json.dumps({"op": "pub", "topic": f"t{first + i}", "data": probe}).encode())
        )
    for sock in done:
        frame(sock)
    done.append(pub)
    return done


# ------------------------------------------------------------------ instructions
def _broker_launch(python: str, workdir: Path) -> Any:
    sys.path.insert(0, str(BENCH))
    import targets

    return targets._broker(targets.Settings(python=python), workdir)


def _wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 300) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"the broker exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.sendall(
                    REQUEST.format(
                        port=port, key=base64.b64encode(b"conn-cost-probe!").decode()
                    ).encode()
                )
                if s.recv(64).startswith(b"HTTP/1.1 101"):
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError("the broker did not answer")


def _total_ir(path: Path) -> int:
    for line in path.read_text().splitlines():
        if line.startswith(("summary:", "totals:")):
            return int(line.split()[1])
    raise RuntimeError(f"no totals in {path}")


def instructions(args: argparse.Namespace) -> None:
    raise_nofile(args.n + 100)
    with tempfile.TemporaryDirectory(prefix="conn-cost-") as tmp:
        workdir = Path(tmp)
        launch = _broker_launch(args.python, workdir)
        out = workdir / "callgrind.out"
        argv = [
            "valgrind",
            "--tool=callgrind",
            "--instr-atstart=no",
            f"--callgrind-out-file={out}",
            *launch.argv,
        ]
        root = Path(args.root).resolve()
        env = {**os.environ, "PYTHONPATH": f"{root}:{root / 'plugins'}"}
        log = open(workdir / "broker.log", "wb")  # noqa: SIM115
        proc = subprocess.Popen(argv, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            _wait_port(launch.ws_port, proc)
            # Warm up (first handshake, first sub, code paths taken once).
            warm = open_clients(launch.ws_port, 64)
            subprocess.run(["callgrind_control", "-i", "on", str(proc.pid)], check=True)
            t0 = time.monotonic()
            socks = open_clients(launch.ws_port, args.n, churn=args.churn)
            elapsed = time.monotonic() - t0
            subprocess.run(["callgrind_control", "-d", str(proc.pid)], check=True)
            dumps = sorted(workdir.glob("callgrind.out*"), key=lambda p: p.stat().st_mtime)
            total = sum(_total_ir(p) for p in dumps if p.stat().st_size)
            for sock in socks + warm:
                sock.close()
            if args.keep:
                for dump in dumps:
                    dump.rename(Path(args.keep) / dump.name)
        finally:
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log.close()
        print(
            json.dumps(
                {
                    "connections": args.n,
                    "instructions": total,
                    "instructions_per_connection": round(total / args.n),
                    "seconds_under_valgrind": round(elapsed, 1),
                }
            )
        )


# ------------------------------------------------------------------ in process
def _in_process_config(listener: dict[str, Any]) -> Any:
    """The configuration ``memory`` and ``rss`` serve: *listener*, no
    heartbeat, room for 20,000 connections from one address."""
    from broker import config_from_dict

    return config_from_dict(
        {
            "listener": listener,
            "limits": {
                "ping_interval": 0,
                "max_connections": 20000,
                "max_connections_per_ip": 20000,
            },
            "admin": {"enabled": False},
            "plugins": {"enabled": ["noauth"]},
        }
    )


async def _retire_all(broker: Any) -> None:
    """Retire every parked reader now (what the sweep does a second or two
    later) and let their tasks end."""
    import trio.testing

    poller = broker._poller
    await trio.testing.wait_all_tasks_blocked()
    poller.retire_quiet()
    poller.retire_quiet()
    await trio.testing.wait_all_tasks_blocked()


async def _open_idle(broker: Any, args: argparse.Namespace, extra: Sequence[str] = ()) -> list[Any]:
    """``--n`` idle connections to *broker* (see the module's docstring):
    the client processes, once every connection got its probe."""
    import trio

    if args.parked:
        proc = await _spawn_clients(broker.port, args.n, extra)
        await trio.sleep(0.5)  # every reader back to waiting
        return [proc]
    procs = []
    left = args.n
    while left > 0:
        # Topics of their own per batch: a probe for this batch's
        # subscribers does not reach the earlier, dormant ones.
        first = ["--first", str(args.n - left)]
        procs.append(await _spawn_clients(broker.port, min(left, args.batch), [*extra, *first]))
        left -= args.batch
        await _retire_all(broker)
    return procs


async def _spawn_clients(port: int, n: int, extra: Sequence[str] = ()) -> Any:
    """``clients`` in a child process (*extra*: more of its arguments); returns
    the trio Process once every connection got its probe. Closing its stdin
    closes them."""
    import trio

    proc = await trio.lowlevel.open_process(
        [sys.executable, __file__, "clients", "--port", str(port), "--n", str(n), *extra],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    await _read_line(proc)
    return proc


async def _read_line(proc: Any) -> bytes:
    """The next line the ``clients`` child prints (it prints one when done)."""
    assert proc.stdout is not None
    line = b""
    while not line.endswith(b"\n"):
        chunk = await proc.stdout.receive_some(100)
        if not chunk:
            raise RuntimeError("the clients failed")
        line += chunk
    return line


# ------------------------------------------------------------------ memory
def memory(args: argparse.Namespace) -> None:
    import tracemalloc

    import trio

    from broker import Broker, PluginHost

    raise_nofile(args.n + 100)
    cfg = _in_process_config({"host": "127.0.0.1", "port": 0, "path": "/ws"})

    n = 0

    async def main() -> None:
        nonlocal n
        broker = Broker(cfg, plugins=PluginHost.from_config(cfg), sweep_interval=None)
        async with trio.open_nursery() as nursery:
            await nursery.start(broker.serve)
            warm = await _spawn_clients(broker.port, 64)
            if not args.parked:
                await _retire_all(broker)
            gc.collect()
            opened = len(broker.connections)
            tracemalloc.start(args.depth)
            before = tracemalloc.take_snapshot()
            procs = await _open_idle(broker, args)
            gc.collect()
            after = tracemalloc.take_snapshot()
            tracemalloc.stop()
            n = len(broker.connections) - opened  # the publishers' connections too
            for p in (*procs, warm):
                assert p.stdin is not None
                await p.stdin.aclose()
                await p.wait()
            broker.stop()
        stats = after.compare_to(before, "traceback")
        total = sum(s.size_diff for s in stats)
        print(f"{total / n:.0f} B of Python heap per connection ({n} connections)")
        by_line: dict[str, int] = {}
        for stat in stats:
            # Frames oldest first: the site is the newest frame, the owner
            # the newest frame of the broker's own code.
            site = stat.traceback[-1]
            owner = next((f for f in reversed(stat.traceback) if "broker/" in f.filename), None)
            name = f"{_short(site.filename)}:{site.lineno}"
            if owner is not None and owner is not site:
                name += f" <- {_short(owner.filename)}:{owner.lineno}"
            by_line[name] = by_line.get(name, 0) + stat.size_diff
        for name, size in sorted(by_line.items(), key=lambda kv: -kv[1])[: args.top]:
            print(f"{size / n:8.0f}  {name}")

    trio.run(main)


def _heap_in_use() -> int | None:
    """Bytes glibc's malloc has handed out and not got back (None off glibc)."""
    import ctypes

    class MallInfo2(ctypes.Structure):
        _fields_ = [
            (name, ctypes.c_size_t)
            for name in [
                "arena",
                "ordblks",
                "smblks",
                "hblks",
                "hblkhd",
                "usmblks",
                "fsmblks",
                "uordblks",
                "fordblks",
                "keepcost",
            ]
        ]

    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = MallInfo2
    except (OSError, AttributeError):
        return None
    info = libc.mallinfo2()
    return int(info.uordblks + info.hblkhd)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def rss(args: argparse.Namespace) -> None:
    import trio
    import trustme

    from broker import Broker, PluginHost

    raise_nofile(args.n + 100)
    tmp = tempfile.TemporaryDirectory(prefix="conn-cost-")
    listener: dict[str, Any] = {"host": "127.0.0.1", "port": 0, "path": "/ws"}
    client_args: list[str] = []
    if args.tls:
        ca = trustme.CA()
        pem = Path(tmp.name) / "server.pem"
        ca.issue_cert("localhost").private_key_and_cert_chain_pem.write_to_path(str(pem))
        ca.cert_pem.write_to_path(str(Path(tmp.name) / "ca.pem"))
        listener.update(tls_cert=str(pem), tls_key=str(pem))
        client_args = ["--tls", str(Path(tmp.name) / "ca.pem")]
    cfg = _in_process_config(listener)
    figures: dict[str, float] = {}

    async def main() -> None:
        broker = Broker(cfg, plugins=PluginHost.from_config(cfg), sweep_interval=None)
        async with trio.open_nursery() as nursery:
            await nursery.start(broker.serve)
            warm = await _spawn_clients(broker.port, 64, client_args)
            if not args.parked:
                await _retire_all(broker)
            gc.collect()
            opened = len(broker.connections)
            rss0, heap0 = _rss(), _heap_in_use()
            procs = await _open_idle(broker, args, client_args)
            gc.collect()
            rss1, heap1 = _rss(), _heap_in_use()
            n = len(broker.connections) - opened  # the publishers' connections too
            figures["connections"] = n
            figures["rss_per_connection"] = (rss1 - rss0) / n
            if heap0 is not None and heap1 is not None:
                figures["c_heap_per_connection"] = (heap1 - heap0) / n
            for p in (*procs, warm):
                assert p.stdin is not None
                await p.stdin.aclose()
                await p.wait()
            broker.stop()

    try:
        trio.run(main)
    finally:
        tmp.cleanup()
    out: dict[str, Any] = {"tls": args.tls, "state": "parked" if args.parked else "dormant"}
    out.update({k: round(v) for k, v in figures.items()})
    print(json.dumps(out))


# ------------------------------------------------------------------ wake
def wake(args: argparse.Namespace) -> None:
    import time

    import trio

    from broker import Broker, PluginHost

    raise_nofile(args.n + 100)
    cfg = _in_process_config({"host": "127.0.0.1", "port": 0, "path": "/ws"})
    figures: dict[str, float] = {}

    async def main() -> None:
        broker = Broker(cfg, plugins=PluginHost.from_config(cfg), sweep_interval=None)
        async with trio.open_nursery() as nursery:
            await nursery.start(broker.serve)
            proc = await _spawn_clients(broker.port, args.n)
            await trio.testing.wait_all_tasks_blocked()
            if not args.parked:
                await _retire_all(broker)
            assert proc.stdin is not None
            start = time.process_time()
            await proc.stdin.send_all(f"{args.input}\n".encode())
            await _read_line(proc)
            await trio.testing.wait_all_tasks_blocked()
            figures["input_to_answer_us"] = (time.process_time() - start) / args.n * 1e6
            figures["dormant_after"] = broker.dormant
            if not args.parked:
                start = time.process_time()
                await _retire_all(broker)
                figures["retire_us"] = (time.process_time() - start) / args.n * 1e6
            await proc.stdin.aclose()
            await proc.wait()
            broker.stop()

    import trio.testing

    trio.run(main)
    out: dict[str, Any] = {"state": "parked" if args.parked else "dormant", "input": args.input}
    out.update({k: round(v, 1) for k, v in figures.items()})
    print(json.dumps(out))


def _short(filename: str) -> str:
    for marker in ("/site-packages/", "/lib/python3"):
        if marker in filename:
            return filename.split(marker, 1)[1]
    return os.path.relpath(filename, ROOT)


def raise_nofile(need: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(need, soft)), hard))


def _recv_exactly(sock: Any, size: int) -> bytes:
    got = b""
    while len(got) < size:
        chunk = sock.recv(size - len(got))
        if not chunk:
            raise OSError("closed while waiting for an answer")
        got += chunk
    return got


def clients_main(args: argparse.Namespace) -> None:
    raise_nofile(args.n + 100)
    if args.tls:
        socks = open_tls_clients(args.port, args.n, args.tls, args.first)
    else:
        socks = open_clients(args.port, args.n, churn=args.churn, first=args.first)
    print(f"{len(socks)} open", flush=True)
    for line in sys.stdin:
        command = line.strip()
        if command == "ping":
            # One masked WebSocket ping from every client, then every pong
            # (``\x8a\x00``).
            frame, answer = _masked(b"", opcode=0x9), b"\x8a\x00"
        elif command == "message":
            # One protocol ping (a message: it needs the connection's task)
            # from every client, then every answer.
            frame, answer = _masked(b'{"op":"ping","id":1}'), None
        else:
            break
        for sock in socks:
            sock.sendall(frame)
        for sock in socks:
            got = _recv_exactly(sock, 2)
            if answer is None:
                got += _recv_exactly(sock, got[1] & 0x7F)
                if got[0] != 0x81 or b'"pong"' not in got:
                    raise OSError(f"expected a pong message, got {got!r}")
            elif got != answer:
                raise OSError(f"expected a pong, got {got!r}")
        print("answered", flush=True)
    for sock in socks:
        sock.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    p = sub.add_parser("instructions")
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--python", default=str(ROOT / ".venv" / "bin" / "python"))
    p.add_argument("--keep", metavar="DIR", help="move the callgrind output there")
    p.add_argument(
        "--churn",
        action="store_true",
        help="as connect-rate: a ping round trip and the closing handshake per connection",
    )
    p.add_argument(
        "--root", default=str(ROOT), help="the checkout whose broker runs (default: this one)"
    )
    p = sub.add_parser("memory")
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--depth", type=int, default=25)
    p.add_argument("--parked", action="store_true", help="readers parked, not dormant")
    p.add_argument("--batch", type=int, default=500, help="connections opened per batch")
    p = sub.add_parser("rss")
    p.add_argument("--n", type=int, default=3000)
    p.add_argument("--tls", action="store_true", help="serve wss:// (TLS 1.3)")
    p.add_argument("--parked", action="store_true", help="readers parked, not dormant")
    p.add_argument("--batch", type=int, default=500, help="connections opened per batch")
    p = sub.add_parser("wake")
    p.add_argument("--n", type=int, default=3000)
    p.add_argument("--parked", action="store_true", help="readers parked, not dormant")
    p.add_argument(
        "--input",
        choices=("ping", "message"),
        default="ping",
        help="what each client sends: a WebSocket ping, or a protocol ping message",
    )
    p = sub.add_parser("clients")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--churn", action="store_true", help="as instructions --churn")
    p.add_argument("--first", type=int, default=0, help="subscribe to t<first>, t<first+1>...")
    p.add_argument("--tls", metavar="CAFILE", help="connect with TLS, trusting CAFILE")
    args = parser.parse_args()
    modes = {
        "instructions": instructions,
        "memory": memory,
        "rss": rss,
        "wake": wake,
        "clients": clients_main,
    }
    modes[args.mode](args)


if __name__ == "__main__":
    main()
