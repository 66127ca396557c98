"""Run the chat example: the broker and the chat page's web server, in one process.

    .venv/bin/python examples/chat/run.py [--port 8765] [--web-port 8000]

then open http://127.0.0.1:8000/ in two windows and log in with two names.
Ctrl-C stops it. See README.md next to this file.

``/login`` stands for an identity provider: it gives any valid name a JWT
for 60 seconds (no password: a demo of the token flow, not of logging in).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import re
import secrets
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import jwt
import trio

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from example_cli import page_url  # noqa: E402
from static_server import StaticServer  # noqa: E402

from broker import Broker, config_from_dict  # noqa: E402

#: Seconds a token is valid: short, so that the client's refresh shows.
TOKEN_LIFETIME = 60
#: A user name: one topic token (it becomes chat.user.NAME.inbox).
NAME = re.compile(r"[A-Za-z0-9_-]{1,32}")


class Login:
    """``POST /login`` with ``{"name": NAME}``: ``{"token", "expires_in"}``."""

    def __init__(self, secret: str, lifetime: float = TOKEN_LIFETIME) -> None:
        self.secret = secret
        self.lifetime = lifetime

    def token(self, name: str) -> str:
        now = int(time.time())
        claims = {"sub": name, "aud": "chat", "iat": now, "exp": now + int(self.lifetime)}
        return jwt.encode(claims, self.secret, algorithm="HS256")

    async def __call__(self, method: str, body: bytes) -> tuple[int, str, bytes]:
        if method != "POST":
            return 405, "text/plain", b"POST a name\n"
        try:
            name = json.loads(body).get("name")
        except (ValueError, AttributeError):
            name = None
        if not isinstance(name, str) or not NAME.fullmatch(name):
            answer = {"error": "a name is 1 to 32 letters, digits, '_' or '-'"}
            return 400, "application/json", json.dumps(answer).encode()
        answer = {"token": self.token(name), "expires_in": self.lifetime}
        return 200, "application/json", json.dumps(answer).encode()


def config(port: int, secret: str) -> dict[str, Any]:
    """broker.toml, on *port*, with *secret* for the tokens."""
    data = tomllib.loads((HERE / "broker.toml").read_text())
    data["listener"]["port"] = port
    data["plugin"]["jwt"]["secret"] = secret
    return data


async def main(port: int, web_port: int) -> None:
    secret = secrets.token_urlsafe(32)
    broker = Broker(config_from_dict(config(port, secret), source=HERE / "broker.toml"))
    web = StaticServer(HERE / "web", {"/login": Login(secret)})
    async with trio.open_nursery() as nursery:
        await nursery.start(broker.serve)
        await nursery.start(web.serve, "127.0.0.1", web_port)
        print(f"broker on {broker.url}", flush=True)
        print(page_url("chat", web.port, broker.url), flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8765, help="the broker's port")
    parser.add_argument("--web-port", type=int, default=8000, help="the chat page's port")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    with contextlib.suppress(KeyboardInterrupt):
        trio.run(main, args.port, args.web_port)
