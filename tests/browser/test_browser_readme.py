"""The README's "From a browser" snippet in Chromium, as written: in a page
served over HTTP it works; pasted into an ``about:blank`` console it is
blocked, with the message the README quotes."""

from __future__ import annotations

import re
from pathlib import Path

from broker.io.http import Request, Response
from tests.browser.driver import browser_session, serve_pages
from tests.conftest import BrokerFactory

README = Path(__file__).resolve().parent.parent.parent / "README.md"
URL = "ws://127.0.0.1:8765/ws"


def snippets() -> list[str]:
    return re.findall(r"```js\n(.*?)```", README.read_text(), re.S)


def raw_snippet() -> str:
    (snippet,) = [s for s in snippets() if "new WebSocket" in s]
    return snippet


async def test_the_snippet_works_in_a_served_page(start_broker: BrokerFactory) -> None:
    broker = await start_broker()
    code = raw_snippet().replace(URL, broker.url)
    assert code != raw_snippet(), "the snippet's URL changed: update this test"

    async def page(request: Request) -> Response:
        return Response(200, f"<!doctype html><script>\n{code}</script>".encode(), "text/html")

    async with serve_pages({"/snippet.html": page}) as pages, browser_session() as session:
        await session.open(pages.url("/snippet.html"))
        line = await session.wait_console(lambda text: text.startswith("log: trades"))
    assert line == "log: trades.BTC-USD 1 {price: 64000.5}"


async def test_the_snippet_is_blocked_in_an_about_blank_console(
    start_broker: BrokerFactory,
) -> None:
    broker = await start_broker()
    code = raw_snippet().replace(URL, broker.url)
    async with browser_session() as session:
        page = await session.open("about:blank")
        await page.evaluate("(code) => { (0, eval)(code); }", code)  # as if pasted
        line = await session.wait_console(lambda text: "failed" in text)
    assert line == (
        f"error: WebSocket connection to '{broker.url}' failed: Error in connection "
        "establishment: net::ERR_BLOCKED_BY_LOCAL_NETWORK_ACCESS_CHECKS"
    )
    expected = (
        "`WebSocket connection to 'ws://127.0.0.1:8765/ws' failed: Error in\n"
        "connection establishment: net::ERR_BLOCKED_BY_LOCAL_NETWORK_ACCESS_CHECKS`"
    )
    assert expected in README.read_text()
    assert broker.stats.accepted == 0


async def test_the_client_example_works_in_a_served_page(start_broker: BrokerFactory) -> None:
    """The README's client example, with the client served by the test
    server (the broker serves it at /client.js: tests/browser/test_browser_endpoint.py)."""
    broker = await start_broker()
    (example,) = [s for s in snippets() if "import { connect }" in s]
    code = example.replace(URL, broker.url).replace(
        "http://127.0.0.1:8765/client.js", "/web/client.js"
    )
    code += 'await client.publish("trades.ETH-USD", {price: 3000});\n'

    async def page(request: Request) -> Response:
        return Response(
            200, f'<!doctype html><script type="module">\n{code}</script>'.encode(), "text/html"
        )

    async with serve_pages({"/client.html": page}) as pages, browser_session() as session:
        await session.open(pages.url("/client.html"))
        line = await session.wait_console(lambda text: text.startswith("log: message"))
    assert line == "log: message trades.ETH-USD {price: 3000}"
