"""A page in real Chromium authenticates with the jwt plugin's cookie
(``token_cookie``): its site sets the token as an HttpOnly cookie, the page
opens a plain ``new WebSocket(url)`` without any token in it, and the
browser attaches the cookie itself. A page of another site is refused by
the origin plugin, which the cookie requires.

The pages are served from ``http://127.0.0.1:PORT``, the broker listens on
another port of 127.0.0.1: cookies are per host, not per port (RFC 6265,
section 8.5), so the browser sends the broker the cookie of the page's
host, exactly as for a page and a broker behind one proxy on one origin.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from broker.io.http import Request, Response
from tests.browser.driver import Page, PageServer, Session, browser_session, serve_pages
from tests.conftest import BrokerFactory
from tests.plugin_helpers import SECRET, SeenIdentities, claims, hs256, plugin_factory

#: The page: logs in (its site sets the cookie), then connects and pings.
PAGE = b"""<!doctype html>
<meta charset="utf-8">
<title>cookie login</title>
<script>
  window.login = () => fetch("/login", { method: "POST" }).then((r) => r.status);
  window.ping = (url) => new Promise((resolve) => {
    const ws = new WebSocket(url);
    ws.onopen = () => ws.send(JSON.stringify({ op: "ping", id: 1 }));
    ws.onmessage = (e) => { resolve({ open: true, answer: JSON.parse(e.data).op }); ws.close(); };
    ws.onclose = (e) => resolve({ open: false, code: e.code });
  });
</script>
"""


@pytest.fixture
async def session() -> AsyncIterator[Session]:
    async with browser_session() as s:
        yield s


@pytest.fixture
async def pages() -> AsyncIterator[PageServer]:
    token = hs256(claims("alice", roles=["reader"], ttl=600))

    async def page(request: Request) -> Response:
        return Response(200, PAGE, "text/html; charset=utf-8")

    async def login(request: Request) -> Response:
        # What the site's login does once it knows the user: the token goes
        # into a cookie the page's scripts cannot read.
        cookie = f"broker_token={token}; HttpOnly; SameSite=Strict; Path=/; Max-Age=600"
        return Response(204, headers=(("Set-Cookie", cookie),))

    async with serve_pages({"/app": page, "/login": login}) as server:
        yield server


async def open_app(session: Session, origin: str) -> Page:
    page = await session.open(f"{origin}/app")
    await page.wait_for("() => window.ping !== undefined")
    return page


async def test_a_page_connects_with_its_httponly_cookie(
    start_broker: BrokerFactory, session: Session, pages: PageServer
) -> None:
    seen = SeenIdentities()
    config: dict[str, Any] = {
        "plugins": {"enabled": ["origin", "jwt", "seen"]},
        "plugin": {
            "origin": {"allowed": [pages.origin], "allow_missing": False},
            "jwt": {"secret": SECRET, "token_cookie": "broker_token", "query_token": False},
        },
    }
    broker = await start_broker(config, factories=plugin_factory("seen", seen))
    page = await open_app(session, pages.origin)
    # Before logging in: no credentials, refused.
    assert await page.evaluate("(url) => window.ping(url)", broker.url) == {
        "open": False,
        "code": 1006,
    }
    assert broker.stats.rejected["auth_401"] == 1
    assert await page.evaluate("() => window.login()") == 204
    # The page's scripts cannot read the token...
    assert await page.evaluate("() => document.cookie") == ""
    # ...but the browser sends it with the handshake: no token in the URL.
    assert await page.evaluate("(url) => window.ping(url)", broker.url) == {
        "open": True,
        "answer": "pong",
    }
    assert [(i.subject, i.plugin, i.roles) for i in seen.identities] == [
        ("alice", "jwt", frozenset({"reader"}))
    ]

    # A page of another site (localhost is not 127.0.0.1) opening the same
    # broker: the origin plugin refuses it before any credential is read.
    other = await open_app(session, pages.origin.replace("127.0.0.1", "localhost"))
    assert await other.evaluate("(url) => window.ping(url)", broker.url) == {
        "open": False,
        "code": 1006,
    }
    assert broker.stats.rejected["auth_403"] == 1
    assert len(seen.identities) == 1
