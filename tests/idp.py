"""A local identity provider for the jwt plugin's tests: its signing keys as a
JWK Set and its OpenID Connect discovery document, over HTTPS on 127.0.0.1
with a trustme certificate, served by the broker's own HTTP server helper
(:mod:`broker.io.http`) on a real socket.

The test drives what it answers (:attr:`IdentityProvider.mode`): the key
set, an error status, a 10 MB body (with its ``Content-Length``, or chunked
without one), or a body that never finishes (a byte every 50 ms, for ever);
:meth:`IdentityProvider.stop` takes it down (connections refused) and
:meth:`IdentityProvider.start` brings it back on the same port. Every
request is recorded (:attr:`IdentityProvider.requests`).
"""

from __future__ import annotations

import dataclasses
import json
import ssl
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any, Literal

import jwt
import trio
import trustme
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from broker.io.http import HttpServer, Limits, Request, Response

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
Mode = Literal["ok", "error", "huge", "huge_chunked", "never_finishes"]

#: What a "huge" answer weighs: 10 MB.
HUGE = 10 * 1024 * 1024
JWKS_PATH = "/realms/test/certs"
DISCOVERY_PATH = "/realms/test/.well-known/openid-configuration"


def public_jwk(key: PrivateKey, kid: str, **extra: Any) -> dict[str, Any]:
    """The public JWK of *key*, with its kid (and ``alg``, ``use``... in *extra*)."""
    if isinstance(key, rsa.RSAPrivateKey):
        jwk = jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
    else:
        jwk = jwt.algorithms.ECAlgorithm.to_jwk(key.public_key(), as_dict=True)
    return {**jwk, "kid": kid, **extra}


class IdentityProvider:
    """See the module doc. *insecure*: plain http instead of https."""

    def __init__(self, ca: trustme.CA, *, insecure: bool = False) -> None:
        self.insecure = insecure
        self._ssl: ssl.SSLContext | None = None
        if not insecure:
            self._ssl = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ca.issue_cert("127.0.0.1").configure_cert(self._ssl)
        self.port = 0
        #: The key set served (set_keys), and its headers.
        self.jwks: dict[str, Any] = {"keys": []}
        self.cache_control: str | None = None
        self.etag: str | None = None
        self.mode: Mode = "ok"
        #: The discovery document's "issuer" (None: the real one).
        self.claimed_issuer: str | None = None
        #: The path of every request, in order.
        self.requests: list[str] = []
        self._seen = trio.Event()
        self._scope: trio.CancelScope | None = None
        self._http = HttpServer(self._respond, Limits(max_connections=32))

    # -- what it serves ----------------------------------------------------------

    @property
    def origin(self) -> str:
        scheme = "http" if self.insecure else "https"
        return f"{scheme}://127.0.0.1:{self.port}"

    @property
    def jwks_url(self) -> str:
        return self.origin + JWKS_PATH

    @property
    def issuer(self) -> str:
        return self.origin + "/realms/test"

    def set_keys(self, keys: Mapping[str, PrivateKey], **extra: Any) -> None:
        """Serve the public halves of *keys* (kid -> private key)."""
        self.jwks = {"keys": [public_jwk(k, kid, use="sig", **extra) for kid, k in keys.items()]}

    def count(self, path: str = JWKS_PATH) -> int:
        return self.requests.count(path)

    async def wait_requests(self, n: int, path: str = JWKS_PATH) -> None:
        """Wait until *path* was asked for *n* times."""
        with trio.fail_after(10):
            while self.count(path) < n:
                await self._seen.wait()

    def _note(self, path: str) -> None:
        self.requests.append(path)
        self._seen.set()
        self._seen = trio.Event()

    async def _respond(self, request: Request) -> Response:
        # One request per connection: each new request meets the mode of
        # the moment (see _serve_connection).
        return dataclasses.replace(await self._answer(request), close=True)

    async def _answer(self, request: Request) -> Response:
        self._note(request.path)
        if self.mode == "error":
            return Response(503, b"down for maintenance\n", "text/plain")
        if request.path == DISCOVERY_PATH:
            document = {
                "issuer": self.claimed_issuer or self.issuer,
                "jwks_uri": self.jwks_url,
                "id_token_signing_alg_values_supported": ["RS256", "ES256"],
            }
            return Response(200, json.dumps(document).encode(), "application/json")
        if request.path != JWKS_PATH:
            return Response(404, b"not found\n", "text/plain")
        if self.mode == "huge":
            return Response(200, b" " * HUGE, "application/json")
        headers: list[tuple[str, str]] = []
        if self.cache_control is not None:
            headers.append(("Cache-Control", self.cache_control))
        if self.etag is not None:
            headers.append(("ETag", self.etag))
            if request.header("if-none-match") == self.etag:
                return Response(304, b"", None, tuple(headers))
        body = json.dumps(self.jwks).encode()
        return Response(200, body, "application/jwk-set+json", tuple(headers))

    async def _serve_connection(self, stream: trio.abc.Stream) -> None:
        if self.mode not in ("huge_chunked", "never_finishes"):
            await self._http.serve_connection(stream)
            return
        # Answers HttpServer cannot give (it sends whole bodies): written by hand.
        try:
            head = b""
            while b"\r\n\r\n" not in head:
                data = await stream.receive_some(4096)
                if not data:
                    return
                head += data
            self._note(head.split(b" ", 2)[1].decode())
            if self.mode == "never_finishes":
                await stream.send_all(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    b"Content-Length: 100000\r\n\r\n{"
                )
                while True:  # a byte every 50 ms: each read is quick, the whole never ends
                    await trio.sleep(0.05)
                    await stream.send_all(b" ")
            await stream.send_all(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n"
            )
            chunk = b" " * 65536
            for _ in range(HUGE // len(chunk)):
                await stream.send_all(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            await stream.send_all(b"0\r\n\r\n")
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client gave up: what the test wants
        finally:
            await trio.aclose_forcefully(stream)

    # -- up and down ---------------------------------------------------------------

    async def _run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(self.port, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        served: list[trio.abc.Listener[Any]] = list(listeners)
        if self._ssl is not None:
            served = [trio.SSLListener(lst, self._ssl, https_compatible=True) for lst in listeners]
        with trio.CancelScope() as self._scope:
            async with trio.open_nursery() as nursery:
                await nursery.start(trio.serve_listeners, self._serve_connection, served)
                task_status.started()

    async def start(self, nursery: trio.Nursery) -> None:
        """Listen (on the same port as before, if it ran before)."""
        await nursery.start(self._run)

    def stop(self) -> None:
        """Close the listener and every connection: connections are refused."""
        assert self._scope is not None
        self._scope.cancel()


@asynccontextmanager
async def identity_provider(
    ca: trustme.CA, *, insecure: bool = False
) -> AsyncIterator[IdentityProvider]:
    """An :class:`IdentityProvider`, serving until the block ends."""
    idp = IdentityProvider(ca, insecure=insecure)
    async with trio.open_nursery() as nursery:
        await idp.start(nursery)
        try:
            yield idp
        finally:
            nursery.cancel_scope.cancel()
