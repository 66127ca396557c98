"""examples/chat: its broker.toml is valid with its plugins, and its login
gives the broker's jwt plugin tokens it accepts (the page itself runs in
tests/browser/test_browser_examples.py)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

from broker import Identity, PublishError
from broker.client import open_client
from tests.conftest import BrokerFactory

CHAT = Path(__file__).resolve().parent.parent / "examples" / "chat"


def chat_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("chat_run", CHAT / "run.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["chat_run"] = module
    spec.loader.exec_module(module)
    return module


async def test_login_tokens_are_accepted_and_the_rules_hold(start_broker: BrokerFactory) -> None:
    chat = chat_module()
    secret = "chat-test-secret-0123456789abcdef-0123"
    broker = await start_broker(chat.config(0, secret), source=CHAT / "broker.toml")
    login = chat.Login(secret)
    status, kind, body = await login("POST", b'{"name": "alice"}')
    assert (status, kind) == (200, "application/json")
    token = json.loads(body)["token"]
    for bad in (b'{"name": "a.b"}', b'{"name": ""}', b"not json", b'{"name": 3}'):
        status, _, _ = await login("POST", bad)
        assert status == 400, bad
    assert (await login("GET", b""))[0] == 405

    async with open_client(broker.url, token=token) as client:
        seq = await client.publish("chat.room.lobby", {"from": "alice", "text": "hi"})
        assert seq == 1
        presence = await client.presence("chat.room.lobby")
        assert presence.count == 0
        async with client.subscribe("chat.user.alice.inbox"):
            pass
    # In-process publishers go through the same schema.
    with pytest.raises(PublishError) as refused:
        await broker.publish(Identity("bot"), "chat.room.lobby", {"text": 1})
    assert refused.value.code == "invalid"
