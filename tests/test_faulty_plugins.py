"""A plugin that raises in each hook, sync or async: the broker keeps serving
every other client, and authentication, authorization, validation and
refresh fail closed.

The faulty plugin is registered while a "survivor" client is connected, so
the test can show that client unharmed; a "victim" then makes the hook run.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import trio

from broker import Broker, hookimpl
from broker.plugin.hookspecs import BrokerSpec
from tests.conftest import BrokerFactory
from tests.helpers import Client, connect, rejection, wait_until

#: Hooks called while clients are served (broker_sources and broker_services
#: are called when plugins come into force: tested below).
HOOKS = sorted(
    name
    for name in vars(BrokerSpec)
    if name.startswith("broker_") and name not in ("broker_sources", "broker_services")
)


def faulty(hook: str, *, is_async: bool) -> object:
    """An object whose only hook implementation raises. It takes no
    arguments: pluggy's opt-in arguments make that valid for every hook."""

    def sync_impl(self: object) -> None:
        raise RuntimeError(f"plugin bug in {hook}")

    async def async_impl(self: object) -> None:
        await trio.lowlevel.checkpoint()
        raise RuntimeError(f"plugin bug in {hook}")

    impl: Callable[..., Any] = async_impl if is_async else sync_impl
    impl.__name__ = hook
    return type("Faulty", (), {hook: hookimpl(impl)})()


async def exercise(hook: str, broker: Broker, survivor: Client) -> None:
    """Make *hook* run, and check what the client sees."""
    url = broker.url
    if hook == "broker_authenticate":
        e = await rejection(url)
        assert (e.status_code, e.body) == (403, b"authentication error\n")  # not noauth's yes
        return
    async with connect(url) as victim:
        if hook == "broker_authorize":
            for command in [
                {"op": "sub", "id": 1, "topic": "t"},
                {"op": "pub", "id": 1, "topic": "t", "data": 1},
            ]:
                reply = await victim.request(command)
                assert reply["code"] == "forbidden", reply  # [authorization] default is allow
        elif hook == "broker_validate":
            reply = await victim.request({"op": "pub", "id": 1, "topic": "t", "data": 1})
            assert reply == {
                "op": "err",
                "id": 1,
                "code": "internal",
                "message": "validation failed",
            }
        elif hook == "broker_refresh":
            reply = await victim.request({"op": "auth", "id": 1, "token": "t"})
            assert reply == {
                "op": "err",
                "id": 1,
                "code": "unauthorized",
                "message": "authentication error",
            }
        else:  # observers: everything works as if they were not there
            await victim.sub("t")
            await victim.sub("u")
            assert await victim.request({"op": "unsub", "id": 1, "topic": "u"}) == {
                "op": "ok",
                "id": 1,
            }
            await victim.send({"op": "pub", "id": 2, "topic": "t", "data": "hello"})
            message = {"op": "msg", "topic": "t", "seq": 1, "data": "hello"}
            assert await victim.recv() == message  # its own message comes before the ok
            assert await victim.recv() == {"op": "ok", "id": 2, "seq": 1}
            assert await survivor.recv() == message
        await victim.assert_alive()


@pytest.mark.parametrize("is_async", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("hook", HOOKS)
async def test_a_raising_hook_harms_no_one_else(
    start_broker: BrokerFactory, hook: str, is_async: bool, caplog: pytest.LogCaptureFixture
) -> None:
    broker = await start_broker()
    async with connect(broker.url) as survivor:
        await survivor.sub("t")
        broker.plugins.register(faulty(hook, is_async=is_async), "faulty")
        await exercise(hook, broker, survivor)
        if hook == "broker_disconnected":
            await wait_until(lambda: f"plugin bug in {hook}" in caplog.text)
        await survivor.assert_alive()
        # Newcomers are served too (refused, for a broken authenticate).
        if hook != "broker_authenticate":
            async with connect(broker.url) as newcomer:
                await newcomer.assert_alive()
    assert f"plugin bug in {hook}" in caplog.text
    assert "faulty" in caplog.text  # the log names the plugin


@pytest.mark.skipif(not hasattr(BrokerSpec, "broker_sources"), reason="no broker_sources hook")
async def test_a_raising_sources_hook_does_not_stop_the_start(
    start_broker: BrokerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    def create(settings: Any, context: Any) -> object:
        return faulty("broker_sources", is_async=False)

    broker = await start_broker(
        {"plugins": {"enabled": ["noauth", "faulty"]}}, factories={"faulty": create}
    )
    async with connect(broker.url) as c:
        await c.pub("t", 1)
    assert "plugin bug in broker_sources" in caplog.text


@pytest.mark.parametrize("is_async", [False, True], ids=["sync", "async"])
async def test_a_raising_services_hook_does_not_stop_the_start(
    start_broker: BrokerFactory, is_async: bool, caplog: pytest.LogCaptureFixture
) -> None:
    def create(settings: Any, context: Any) -> object:
        return faulty("broker_services", is_async=is_async)

    broker = await start_broker(
        {"plugins": {"enabled": ["noauth", "faulty"]}}, factories={"faulty": create}
    )
    assert broker.services == []
    async with connect(broker.url) as c:
        await c.pub("t", 1)
    assert "plugin bug in broker_services" in caplog.text
    assert "plugin faulty: broker_services failed; no services" in caplog.text
