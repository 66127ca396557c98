"""The admin console (GET / on the admin listener) in Chromium: it asks for
the admin token, keeps it out of the URL, shows live numbers, and its "try
it" panel subscribes and publishes through the JavaScript client."""

from __future__ import annotations

from pathlib import Path

import trio

from broker import Identity
from broker.core.stats import BusiestTopics
from tests.browser.driver import browser_session
from tests.conftest import BrokerFactory
from tests.helpers import raw_connect

ADMIN_TOKEN = "admin-secret-0123456789"


async def test_the_console_shows_live_numbers(start_broker: BrokerFactory, tmp_path: Path) -> None:
    broker = await start_broker(
        {
            "admin": {"port": 0, "token": ADMIN_TOKEN},
            "history": [{"pattern": "market.>", "size": 100}],
            "queue": {"rules": [{"pattern": "market.>", "policy": "conflate"}]},
        }
    )
    broker._busiest = BusiestTopics(window=1.0)  # a ranking every second
    feed = Identity("feed")

    async def publish() -> None:
        n = 0
        while True:
            n += 1
            await broker.publish(feed, ("market.BTC", "market.ETH", "market.BTC")[n % 3], n)
            await trio.sleep(0.002)

    async with (
        raw_connect(broker.url) as subscriber,  # subscribes, then reads nothing
        browser_session() as session,
        trio.open_nursery() as publishing,
    ):
        await subscriber.send({"op": "sub", "id": 1, "topic": "market.>"})
        assert (await subscriber.recv())["op"] == "ok"
        publishing.start_soon(publish)
        page = await session.open(broker.admin_url + "/")
        await page.wait_for("() => !document.getElementById('login').hidden")
        assert await page.evaluate("() => document.getElementById('dashboard').hidden") is True
        await page.fill("#token", "wrong")
        await page.click("#login button")
        await page.wait_for(
            "() => document.getElementById('login-error').textContent === 'that token was refused'"
        )
        await page.fill("#token", ADMIN_TOKEN)
        await page.click("#login button")
        await page.wait_for("() => !document.getElementById('dashboard').hidden")
        # Rates need two reads; the busiest topics a complete window.
        await page.wait_for(
            "() => parseFloat(document.getElementById('publish-rate').textContent) > 0"
            " && document.querySelector('#busiest tbody tr')",
            seconds=10,
        )
        assert await page.text("#connections") == "1"
        assert await page.text("#subscriptions") == "1"
        busiest = await page.text("#busiest tbody")
        assert busiest.splitlines()[0].startswith("market.BTC")
        assert "conflate" in await page.text("#drops tbody")
        assert "stored messages" in await page.text("#history tbody")
        assert await page.text("#ready") == "ready"
        # The token is in this tab's sessionStorage, not in the URL.
        assert await page.evaluate("() => location.href") == broker.admin_url + "/"
        assert (
            await page.evaluate("() => sessionStorage.getItem('trio-broker-admin-token')")
            == ADMIN_TOKEN
        )

        # Try it: subscribe and publish through /client.js.
        await page.click("#try-subscribe")
        await page.wait_for(
            "() => document.getElementById('try-log').textContent.includes('subscribed to demo.>')"
        )
        await page.click("#try-publish")
        await page.wait_for(
            """() => document.getElementById('try-log').textContent.includes('demo.hello #1 {"text":"hello"}')"""
        )
        await page.wait_for(
            "() => document.getElementById('connections').textContent === '2'", seconds=6
        )
        await page.screenshot("console.png", tmp_path, full_page=True)

        await page.click("#signout")
        await page.wait_for("() => !document.getElementById('login').hidden")
        assert await page.evaluate("() => sessionStorage.length") == 0
        publishing.cancel_scope.cancel()
    assert "Bearer" not in " ".join(session.console())
