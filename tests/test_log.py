"""Logs: plain lines for the journal or JSON lines, connection ids, no secrets."""

from __future__ import annotations

import io
import json
import logging
import os
import sys
from pathlib import Path

import pytest
import trio
import trio_websocket

from broker.ops.log import (
    CONNECTION_ID,
    JsonFormatter,
    TextFormatter,
    apply_logging,
    redact,
    setup_logging,
)
from tests.helpers import connect, free_port
from tests.service import open_notify_socket, run_broker

TOKEN = "alice-secret-token-0123456789"


def record(message: str, level: int = logging.INFO) -> logging.LogRecord:
    return logging.LogRecord("broker.server", level, __file__, 1, message, (), None)


def test_text_lines_carry_the_connection_id_of_the_task() -> None:
    formatter = TextFormatter()
    assert formatter.format(record("hello")) == "INFO broker.server: hello"
    token = CONNECTION_ID.set("c7")
    try:
        assert formatter.format(record("rejected 1.2.3.4:5 with 401")) == (
            "INFO broker.server: c7 rejected 1.2.3.4:5 with 401"
        )
        # A line that already names a connection is left alone.
        assert (
            formatter.format(record("c9 slow consumer")) == "INFO broker.server: c9 slow consumer"
        )
    finally:
        CONNECTION_ID.reset(token)


def test_json_lines_carry_conn() -> None:
    formatter = JsonFormatter()
    token = CONNECTION_ID.set("c7")
    try:
        entry = json.loads(formatter.format(record("rejected")))
    finally:
        CONNECTION_ID.reset(token)
    assert entry["conn"] == "c7"
    assert entry["msg"] == "rejected"
    assert entry["level"] == "info"
    assert entry["logger"] == "broker.server"
    assert entry["ts"].endswith("Z")
    assert "conn" not in json.loads(formatter.format(record("no connection here")))
    assert json.loads(formatter.format(record("c3 connected")))["conn"] == "c3"


@pytest.mark.parametrize(
    "text",
    [
        f"GET /ws?token={TOKEN}&x=1",
        f"Authorization: Bearer {TOKEN}",
        f"authorization: bearer {TOKEN}",
    ],
)
def test_token_shaped_values_are_masked(text: str) -> None:
    assert TOKEN not in redact(text)
    assert "[redacted]" in redact(text)
    assert TOKEN not in TextFormatter().format(record(text))
    assert TOKEN not in JsonFormatter().format(record(text))


def test_journal_lines_start_with_a_syslog_priority(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    with (tmp_path / "journal").open("w") as stream:
        st = os.fstat(stream.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        root = logging.getLogger()
        saved = (root.handlers[:], root.level)
        try:
            setup_logging("info", "text", stream=stream)
            logging.getLogger("broker.test").warning("disk %s", "full")
            logging.getLogger("broker.test").info("fine")
        finally:
            root.handlers[:] = saved[0]
            root.setLevel(saved[1])
    lines = (tmp_path / "journal").read_text().splitlines()
    assert lines == ["<4>WARNING broker.test: disk full", "<6>INFO broker.test: fine"]


def test_no_priority_prefix_when_not_the_journal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JOURNAL_STREAM", "1:1")
    stream = io.StringIO()
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    try:
        setup_logging("info", "text", stream=stream)
        logging.getLogger("broker.test").info("plain")
        apply_logging("warning", "json")  # a reload: level and format, same handler
        logging.getLogger("broker.test").info("hidden")
        logging.getLogger("broker.test").warning("shown")
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    first, second = stream.getvalue().splitlines()
    assert first == "INFO broker.test: plain"
    assert json.loads(second)["msg"] == "shown"


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
async def test_a_broker_process_logs_connection_ids_and_no_token(tmp_path: Path) -> None:
    port = free_port()
    config = tmp_path / "broker.toml"
    config.write_text(
        f'[listener]\nhost = "127.0.0.1"\nport = {port}\n[admin]\nport = 0\n'
        '[log]\nformat = "json"\nlevel = "debug"\n'
        '[plugins]\nenabled = ["tokens"]\n'
        f'[plugin.tokens]\ntokens = [{{ id = "alice", token = "{TOKEN}" }}]\n'
    )
    url = f"ws://127.0.0.1:{port}/ws"
    async with open_notify_socket() as notify, run_broker(config, notify) as broker:
        async with connect(f"{url}?token={TOKEN}") as client:
            await client.assert_alive()
        with pytest.raises(trio_websocket.ConnectionRejected):
            async with connect(f"{url}?token=wrong-{TOKEN}"):
                pass
        with pytest.raises(trio_websocket.ConnectionRejected):
            async with connect(url, headers=[(b"authorization", f"Bearer x{TOKEN}".encode())]):
                pass
        with trio.fail_after(5):
            assert await broker.stop() == 0
    text = broker.log_text()
    assert TOKEN not in text
    entries = [json.loads(line) for line in text.splitlines()]
    by_conn: dict[str, list[str]] = {}
    for entry in entries:
        if "conn" in entry:
            by_conn.setdefault(entry["conn"], []).append(entry["msg"])
    # c1 was accepted; c2 and c3 refused, their refusals carry their ids.
    assert any("connected" in m for m in by_conn["c1"])
    assert any("disconnected" in m for m in by_conn["c1"])
    assert any("rejected" in m and "401" in m for m in by_conn["c2"])
    assert any("rejected" in m and "401" in m for m in by_conn["c3"])
