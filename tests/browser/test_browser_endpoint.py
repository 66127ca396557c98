"""A page imports the client from the broker's own GET /client.js (another
origin than the page's: a module script needs CORS) and uses it."""

from __future__ import annotations

from tests.browser.driver import browser_session, serve_pages
from tests.conftest import BrokerFactory


async def test_a_page_imports_the_client_from_the_broker(start_broker: BrokerFactory) -> None:
    broker = await start_broker()
    script = f"http://127.0.0.1:{broker.port}/client.js"
    async with serve_pages() as pages, browser_session() as session:
        page = await session.open(pages.url(f"/pages/harness.html?client={script}"))
        await page.wait_for("() => window.broker !== undefined")
        result = await page.evaluate(
            """async ([url, script]) => {
                const { connect, VERSION } = window.broker;
                const client = await connect(url);
                const seq = await client.publish("a.b", 1);
                await client.close();
                // Revalidated with its ETag: a 304 the second time.
                const first = await fetch(script, { cache: "no-cache" });
                const again = await fetch(script, { cache: "no-cache" });
                return { VERSION, seq, type: first.headers.get("content-type"),
                         etag: first.headers.get("etag") === again.headers.get("etag") };
            }""",
            [broker.url, script],
        )
    assert result == {
        "VERSION": "0.1.0",
        "seq": 1,
        "type": "text/javascript; charset=utf-8",
        "etag": True,
    }
