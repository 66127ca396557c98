"""The broker behind a real nginx (Debian's package), started by each test.

nginx runs as the test's own subprocess on loopback (``daemon off``, its own
configuration, pid file, logs and temporary directories in ``tmp_path``),
with the configuration docs/deploy.md gives: the test reads it from there
and changes only ports, certificate paths and the idle timeout, so the
documented configuration is the tested one. Clients bind 127.0.0.2 and
127.0.0.3 to be different addresses behind the same proxy (127.0.0.1).

Without nginx these tests are skipped; .ci/run installs it (``nginx`` and
``libnginx-mod-stream``).
"""

from __future__ import annotations

import os
import re
import shutil
import ssl
import subprocess
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trustme
from wsproto.events import Ping

from broker import Broker, Identity
from tests.conftest import BrokerFactory
from tests.helpers import free_port, raw_connect
from tests.test_proxy_server import Seen, exchange, plugin, status, upgrade

NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)

pytestmark = pytest.mark.skipif(
    NGINX is None, reason="nginx is not installed (apt-get install nginx; .ci/run does)"
)

DEPLOY = Path(__file__).resolve().parent.parent / "docs" / "deploy.md"
PROXY = "127.0.0.1"
ALICE = "127.0.0.2"
BOB = "127.0.0.3"


def deploy_block(heading: str, language: str, index: int = 0) -> str:
    """The *index*-th ``language`` code block under the docs/deploy.md heading
    *heading* (and before the next heading of the same level)."""
    text = DEPLOY.read_text(encoding="utf-8")
    start = text.index(f"\n{heading}\n") + len(heading) + 2
    level = heading.split(" ")[0]
    end = text.find(f"\n{level} ", start)
    section = text[start : end if end >= 0 else len(text)]
    blocks = re.findall(rf"^```{language}\n(.*?)^```", section, re.DOTALL | re.MULTILINE)
    assert len(blocks) > index, f"no {language} block #{index} under {heading!r}"
    return str(blocks[index])


def adapt(snippet: str, changes: Mapping[str, str]) -> str:
    """*snippet* with each documented value replaced by the test's: each must
    occur exactly once, so the documentation cannot drift from the test."""
    for old, new in changes.items():
        assert snippet.count(old) == 1, f"{old!r} is not in the documented snippet once"
        snippet = snippet.replace(old, new)
    return snippet


def stream_module() -> str | None:
    """The ``load_module`` line the stream module needs, "" if built in, None if absent."""
    assert NGINX is not None
    info = subprocess.run([NGINX, "-V"], capture_output=True, text=True, check=True).stderr
    if "--with-stream " in info + " " and "--with-stream=dynamic" not in info:
        return ""
    found = re.search(r"--modules-path=(\S+)", info)
    module = Path(found.group(1) if found else "/usr/lib/nginx/modules") / "ngx_stream_module.so"
    return f"load_module {module};\n" if module.is_file() else None


@asynccontextmanager
async def run_server(argv: list[str], port: int, logs: Path) -> AsyncIterator[None]:
    """Run *argv* (a proxy in the foreground) until the block ends; wait
    until it accepts connections on *port*. Its output goes to *logs*
    (quoted, with the files next to it, if it exits early)."""
    with logs.open("wb") as out:
        process = await trio.lowlevel.open_process(
            argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out
        )
    try:
        # An external process: poll its port, with a deadline.
        with trio.fail_after(10):
            while True:
                if process.poll() is not None:
                    found = "\n".join(
                        f"{f.name}:\n{f.read_text()}" for f in logs.parent.glob("*.log")
                    )
                    raise AssertionError(f"{argv[0]} exited:\n{found}")
                try:
                    probe = await trio.open_tcp_stream("127.0.0.1", port)
                except OSError:
                    await trio.sleep(0.02)
                else:
                    await probe.aclose()
                    break
        yield
    finally:
        process.terminate()  # nginx and HAProxy stop at once on SIGTERM
        with trio.move_on_after(5, shield=True):
            await process.wait()
        if process.poll() is None:
            process.kill()
            with trio.CancelScope(shield=True):
                await process.wait()


@asynccontextmanager
async def run_nginx(
    tmp_path: Path, port: int, *, http: str = "", stream: str = ""
) -> AsyncIterator[None]:
    """nginx with *http* (inside ``http {}``) and *stream* (a ``stream {}``
    block) until the block ends; waits until *port* accepts connections."""
    assert NGINX is not None
    prefix = tmp_path / "nginx"
    prefix.mkdir()
    head = ""
    if stream:
        module = stream_module()
        assert module is not None
        head = module
    temp = "\n".join(
        f"    {kind}_temp_path {prefix / kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    conf = prefix / "nginx.conf"
    conf.write_text(
        f"{head}"
        "daemon off;\n"
        "worker_processes 1;\n"
        f"pid {prefix / 'nginx.pid'};\n"
        f"error_log {prefix / 'error.log'} info;\n"
        "events { worker_connections 64; }\n"
        "http {\n"
        f"    access_log {prefix / 'access.log'};\n"
        f"{temp}\n"
        f"{http}\n"
        "}\n"
        f"{stream}\n"
    )
    argv = [NGINX, "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log")]
    async with run_server(argv, port, prefix / "stderr.log"):
        yield


@pytest.fixture
def nginx_cert(ca: trustme.CA, tmp_path: Path) -> tuple[str, str]:
    """Certificate chain and key files for nginx's TLS (127.0.0.1)."""
    cert = ca.issue_cert("127.0.0.1", "localhost")
    chain = tmp_path / "nginx-chain.pem"
    key = tmp_path / "nginx-key.pem"
    chain.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    key.write_bytes(cert.private_key_pem.bytes())
    return str(chain), str(key)


def http_site(
    broker: Broker,
    port: int,
    cert: tuple[str, str],
    read_timeout: str = "60s",
    access_log: Path | None = None,
) -> str:
    """docs/deploy.md's nginx site, listening on *port* for *broker*,
    logging to *access_log* (else nowhere)."""
    return adapt(
        deploy_block("## nginx", "nginx"),
        {
            "listen 443 ssl;": f"listen 127.0.0.1:{port} ssl;",
            "server 127.0.0.1:8765;": f"server 127.0.0.1:{broker.port};",
            "/etc/ssl/broker/fullchain.pem": cert[0],
            "/etc/ssl/broker/privkey.pem": cert[1],
            "proxy_read_timeout 60s;": f"proxy_read_timeout {read_timeout};",
            "/var/log/nginx/trio-broker.log": str(access_log or "/dev/null"),
        },
    )


def broker_listener(heading: str) -> dict[str, Any]:
    """The ``[listener]`` keys docs/deploy.md gives under *heading*, as tested."""
    import tomllib

    listener = dict(tomllib.loads(deploy_block(heading, "toml"))["listener"])
    assert listener.pop("host") == "127.0.0.1" and listener.pop("port") == 8765
    return listener


async def test_behind_nginx_clients_keep_their_addresses_and_limits(
    start_broker: BrokerFactory,
    tmp_path: Path,
    nginx_cert: tuple[str, str],
    client_ssl: ssl.SSLContext,
    caplog: pytest.LogCaptureFixture,
) -> None:
    listener = broker_listener("## nginx")
    assert listener == {"trusted_proxies": ["127.0.0.1"]}
    seen = Seen()
    broker = await start_broker(
        {
            # allow_insecure: plain ws:// behind the proxy, served to it alone.
            "listener": {**listener, "allow_insecure": True},
            "limits": {"max_connections_per_ip": 2},
            "plugins": {"enabled": ["noauth", "seen"]},
        },
        factories=plugin(seen),
    )
    caplog.set_level("INFO", "broker.server")
    port = free_port()
    url = f"wss://127.0.0.1:{port}/ws"
    async with run_nginx(tmp_path, port, http=http_site(broker, port, nginx_cert)):
        async with (
            raw_connect(url, ssl_context=client_ssl, source=ALICE) as a1,
            raw_connect(url, ssl_context=client_ssl, source=ALICE) as a2,
        ):
            assert [h.peer for h in seen.handshakes] == [(ALICE, 0), (ALICE, 0)]
            assert all(h.headers["x-forwarded-proto"] == "https" for h in seen.handshakes)
            # Alice's third connection is over the per-address limit...
            answer = await exchange(port, upgrade(), source=ALICE, tls=client_ssl)
            assert status(answer) == 429 and b"too many connections" in answer
            # ... and claiming another address in X-Forwarded-For changes nothing:
            # nginx appends the real one, which the broker takes.
            forged = upgrade(headers=[("X-Forwarded-For", "198.51.100.9")])
            assert status(await exchange(port, forged, source=ALICE, tls=client_ssl)) == 429
            # Bob, behind the same nginx, is another address.
            async with raw_connect(url, ssl_context=client_ssl, source=BOB) as b:
                await b.send({"op": "sub", "id": 1, "topic": "news"})
                assert (await b.recv())["op"] == "ok"
                await a1.send({"op": "pub", "id": 2, "topic": "news", "data": "hi"})
                assert (await a1.recv())["op"] == "ok"
                message = await b.recv()
                assert message["topic"] == "news" and message["data"] == "hi"
                assert sorted(c.peer[0] for c in broker.connections) == [ALICE, ALICE, BOB]
            await a2.send({"op": "ping", "id": 3})
            assert (await a2.recv())["op"] == "pong"
        assert broker.stats.rejected["max_per_ip"] == 2
        # Around nginx, straight to the broker's plain port: refused.
        assert status(await exchange(broker.port, upgrade(), source=ALICE)) == 403
    connected = [r.getMessage() for r in caplog.records if " connected from " in r.getMessage()]
    assert connected and all(f" via {PROXY}:" in line for line in connected)
    assert any(f"connected from {BOB}:0 via {PROXY}:" in line for line in connected)


async def test_nginx_does_not_log_a_query_token(
    start_broker: BrokerFactory,
    tmp_path: Path,
    nginx_cert: tuple[str, str],
    client_ssl: ssl.SSLContext,
) -> None:
    """docs/deploy.md's log format: a token in the URL (accepted, or
    refused) is not in nginx's access log; the requests are."""
    token = "static-token-in-the-url-0123456789"
    broker = await start_broker(
        {
            "listener": {**broker_listener("## nginx"), "allow_insecure": True},
            "plugins": {"enabled": ["tokens"]},
            "plugin": {"tokens": {"tokens": [{"id": "app", "token": token}]}},
        }
    )
    port = free_port()
    log = tmp_path / "trio-broker.log"
    site = http_site(broker, port, nginx_cert, access_log=log)
    async with run_nginx(tmp_path, port, http=site):
        async with raw_connect(
            f"wss://127.0.0.1:{port}/ws?token={token}", ssl_context=client_ssl, source=ALICE
        ) as client:
            await client.send({"op": "ping", "id": 1})
            assert (await client.recv())["op"] == "pong"
        wrong = upgrade(f"/ws?token={token}-wrong")
        assert status(await exchange(port, wrong, source=ALICE, tls=client_ssl)) == 401
        # nginx writes a line when a request ends (for a WebSocket, when it
        # closes): an external process, polled with a deadline.
        with trio.fail_after(10):
            while len(log.read_text().splitlines()) < 2:  # noqa: ASYNC110
                await trio.sleep(0.02)
    text = log.read_text()
    assert "token" not in text, text
    assert text.count('"GET /ws HTTP/1.1" ') == 2 and " 101 " in text and " 401 " in text


#: nginx's idle timeout in the keepalive tests (the documented 60 s, shortened).
READ_TIMEOUT = 1.0


async def idle_through_nginx(
    start_broker: BrokerFactory,
    tmp_path: Path,
    cert: tuple[str, str],
    client_ssl: ssl.SSLContext,
    ping_interval: float,
) -> tuple[int, float | None]:
    """Subscribe through nginx, then stay idle for 3 x nginx's idle timeout
    (answering pings, as every WebSocket client does). Returns the pings
    seen, and None if a message published then still arrives, else how long
    the connection lasted."""
    broker = await start_broker(
        {
            "listener": broker_listener("## nginx"),
            "limits": {"ping_interval": ping_interval, "ping_timeout": 5.0},
            "plugins": {"enabled": ["seen"]},
        },
        factories=plugin(Seen()),
    )
    port = free_port()
    url = f"wss://127.0.0.1:{port}/ws"
    site = http_site(broker, port, cert, read_timeout=f"{READ_TIMEOUT:g}s")
    async with (
        run_nginx(tmp_path, port, http=site),
        raw_connect(url, ssl_context=client_ssl, source=ALICE) as client,
    ):
        await client.send({"op": "sub", "id": 1, "topic": "idle"})
        assert (await client.recv())["op"] == "ok"
        pings = 0
        idle = trio.current_time()
        # Time passing is the behaviour under test here, not synchronisation.
        with trio.move_on_after(3 * READ_TIMEOUT):
            try:
                while True:
                    event = await client.next_event()  # answers pings
                    assert isinstance(event, Ping), event
                    pings += 1
            except (EOFError, trio.BrokenResourceError):
                return pings, trio.current_time() - idle
        await broker.publish(Identity("source"), "idle", "still here")
        try:
            message = await client.recv()
        except (EOFError, trio.BrokenResourceError):
            return pings, trio.current_time() - idle
        assert message["data"] == "still here"
        return pings, None


async def test_broker_pings_keep_an_idle_subscription_alive_through_nginx(
    start_broker: BrokerFactory,
    tmp_path: Path,
    nginx_cert: tuple[str, str],
    client_ssl: ssl.SSLContext,
) -> None:
    # Pings at most 1.5 x ping_interval apart: under nginx's timeout.
    pings, lasted = await idle_through_nginx(
        start_broker, tmp_path, nginx_cert, client_ssl, READ_TIMEOUT / 3
    )
    assert lasted is None and pings >= 3


async def test_without_pings_nginx_drops_the_idle_subscription(
    start_broker: BrokerFactory,
    tmp_path: Path,
    nginx_cert: tuple[str, str],
    client_ssl: ssl.SSLContext,
) -> None:
    # The control: the same subscription with pings off is cut by nginx,
    # so the test above would catch pings that do not reach the proxy.
    pings, lasted = await idle_through_nginx(start_broker, tmp_path, nginx_cert, client_ssl, 0)
    assert pings == 0
    assert lasted is not None and READ_TIMEOUT * 0.9 <= lasted < 3 * READ_TIMEOUT


async def test_proxy_protocol_through_nginx_stream(
    start_broker: BrokerFactory,
    tmp_path: Path,
    tls_files: dict[str, str],
    client_ssl: ssl.SSLContext,
) -> None:
    module = stream_module()
    if module is None:
        pytest.skip("nginx has no stream module (apt-get install libnginx-mod-stream); "
                    "tests/test_proxy_server.py sends PROXY headers itself")  # fmt: skip
    listener = broker_listener("### nginx as a TCP proxy, with the PROXY protocol")
    assert listener.pop("tls_cert") and listener.pop("tls_key")
    assert listener == {"trusted_proxies": ["127.0.0.1"], "proxy_protocol": True}
    seen = Seen()
    broker = await start_broker(
        {
            "listener": {
                **listener,
                "tls_cert": tls_files["tls_cert"],
                "tls_key": tls_files["tls_key"],
            },
            "limits": {"max_connections_per_ip": 1},
            "plugins": {"enabled": ["noauth", "seen"]},
        },
        factories=plugin(seen),
    )
    port = free_port()
    url = f"wss://127.0.0.1:{port}/ws"
    stream = adapt(
        deploy_block("### nginx as a TCP proxy, with the PROXY protocol", "nginx"),
        {
            "listen 443;": f"listen 127.0.0.1:{port};",
            "proxy_pass 127.0.0.1:8765;": f"proxy_pass 127.0.0.1:{broker.port};",
        },
    )
    async with run_nginx(tmp_path, port, stream=stream):
        # TLS end to end, through nginx: the PROXY header went first.
        async with raw_connect(url, ssl_context=client_ssl, source=ALICE) as alice:
            ((address, client_port),) = [h.peer for h in seen.handshakes]
            assert address == ALICE and client_port != 0
            assert seen.handshakes[0].tls
            answer = await exchange(port, upgrade(), source=ALICE, tls=client_ssl)
            assert status(answer) == 429
            async with raw_connect(url, ssl_context=client_ssl, source=BOB) as bob:
                await bob.send({"op": "ping", "id": 1})
                assert (await bob.recv())["op"] == "pong"
            await alice.send({"op": "ping", "id": 2})
            assert (await alice.recv())["op"] == "pong"
        # Straight to the broker, without a PROXY header: closed unanswered.
        assert await exchange(broker.port, [b"", b"x"], source=PROXY, tls=client_ssl) == b""
        assert broker.stats.rejected["proxy_protocol"] == 1
