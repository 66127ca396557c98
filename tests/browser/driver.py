"""Real Chromium for the browser tests: the runner process, sessions, pages,
and a loopback web server for the pages under test.

* :func:`runner` starts ``node tests/browser/runner.mjs`` once per test run
  (Debian's ``/usr/bin/chromium`` through playwright-core; ``npm ci`` in
  this folder installs it, ``.ci/run`` does both) and skips the test when
  Chromium, Node or ``node_modules`` is missing.
* :func:`browser_session` is one test's browser context, over a TCP
  connection to the runner: :meth:`Session.open` gives a :class:`Page`,
  whose :meth:`~Page.evaluate` and :meth:`~Page.wait_for` run JavaScript
  functions (as source text) in it.
* :class:`Gate` is a page route that holds a synchronous request, and so
  the page's main thread, until the test opens it: a tab stuck in a long
  task, that reads none of its WebSocket's messages meanwhile.
* :func:`serve_pages` serves the client (``broker/web``), the test pages
  (``tests/browser/pages``), the examples' pages, ``@msgpack/msgpack`` and
  a test's own routes on ``http://127.0.0.1:PORT``, with the broker's own
  HTTP server helper (:mod:`broker.io.http`).

Every wait is on an answer from the runner or a condition in the page
(``waitForFunction``), bounded; none is a sleep.
"""

from __future__ import annotations

import atexit
import itertools
import json
import os
import select
import shutil
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from broker.io.http import HttpServer, Limits, Request, Response

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
WEB = ROOT / "broker" / "web"
PAGES = HERE / "pages"
EXAMPLES = ROOT / "examples"
NODE_MODULES = HERE / "node_modules"
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
#: Where screenshots go: docs/img when BROKER_SCREENSHOTS=1 (to refresh the
#: committed ones), else a temporary folder (the test still takes them).
SCREENSHOTS = ROOT / "docs" / "img"

#: Bound on one wait in the page (seconds).
WAIT = 10.0


class Runner:
    """The ``runner.mjs`` process and the port it listens on."""

    _shared: Runner | None = None

    def __init__(self, process: subprocess.Popen[bytes], port: int, version: str) -> None:
        self.process = process
        self.port = port
        self.version = version

    @classmethod
    def shared(cls) -> Runner:
        """The runner of this test run, started on first use."""
        if cls._shared is None or cls._shared.process.poll() is not None:
            cls._shared = cls._start()
        return cls._shared

    @classmethod
    def _start(cls) -> Runner:
        node = shutil.which("node")
        missing = [
            what
            for what, ok in (
                (CHROMIUM, os.access(CHROMIUM, os.X_OK)),
                ("node", node is not None),
                (
                    "tests/browser/node_modules (npm ci)",
                    (NODE_MODULES / "playwright-core").is_dir(),
                ),
            )
            if not ok
        ]
        if missing:
            why = f"browser tests need {', '.join(missing)} (see tests/browser/README.md)"
            if os.environ.get("CI"):  # .ci/run installs them: their absence is a failure
                pytest.fail(why)
            pytest.skip(why)
        assert node is not None
        process = subprocess.Popen(
            [node, str(HERE / "runner.mjs")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd=HERE,
            env={**os.environ, "CHROMIUM": CHROMIUM},
        )
        assert process.stdout is not None
        # An external process: poll its output with a deadline.
        ready, _, _ = select.select([process.stdout], [], [], 60)
        line = process.stdout.readline() if ready else b""
        if not line:
            process.kill()
            raise RuntimeError("runner.mjs did not start Chromium within 60 s")
        hello = json.loads(line)
        atexit.register(cls._stop, process)
        return cls(process, int(hello["port"]), str(hello["version"]))

    @staticmethod
    def _stop(process: subprocess.Popen[bytes]) -> None:
        if process.stdin is not None:
            process.stdin.close()  # the runner closes Chromium and exits
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()


def runner() -> Runner:
    return Runner.shared()


class BrowserError(AssertionError):
    """A command failed in the runner (a JavaScript exception, a timeout...)."""


class Session:
    """One browser context: pages, and what they printed."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self._stream = stream
        self._ids = itertools.count(1)
        self._waiting: dict[int, tuple[trio.Event, list[Any]]] = {}
        #: Every event the pages sent ({"event": "console", "page", "type", "text"}...).
        self.events: list[dict[str, Any]] = []
        self._changed = trio.Event()

    async def _read(self) -> None:
        buffer = b""
        while True:
            data = await self._stream.receive_some(65536)
            if not data:
                for event, slot in self._waiting.values():
                    slot.append({"ok": False, "error": "the runner closed the session"})
                    event.set()
                return
            buffer += data
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                message = json.loads(line)
                if "event" in message:
                    self.events.append(message)
                    self._changed.set()
                    self._changed = trio.Event()
                    continue
                event, slot = self._waiting.pop(message["id"])
                slot.append(message)
                event.set()

    async def command(self, op: str, seconds: float = WAIT + 5, **fields: Any) -> Any:
        request_id = next(self._ids)
        event, slot = trio.Event(), list[Any]()
        self._waiting[request_id] = (event, slot)
        await self._stream.send_all(
            json.dumps({"id": request_id, "op": op, **fields}).encode() + b"\n"
        )
        with trio.fail_after(seconds):
            await event.wait()
        answer = slot[0]
        if not answer["ok"]:
            raise BrowserError(f"{op} failed: {answer['error']}\n{self.transcript()}")
        return answer["value"]

    async def open(self, url: str) -> Page:
        return Page(self, int(await self.command("open", url=url)))

    async def set_offline(self, offline: bool) -> None:
        await self.command("setOffline", offline=offline)

    def console(self, page: Page | None = None) -> list[str]:
        """The console lines (``type: text``) of *page*, or of every page."""
        return [
            f"{e['type']}: {e['text']}"
            for e in self.events
            if e["event"] == "console" and (page is None or e["page"] == page.id)
        ]

    async def wait_console(self, predicate: Callable[[str], bool], seconds: float = WAIT) -> str:
        """Wait until a console line (``type: text``) satisfies *predicate*."""
        with trio.fail_after(seconds):
            while True:
                for line in self.console():
                    if predicate(line):
                        return line
                await self._changed.wait()

    def transcript(self) -> str:
        lines = [
            f"[page {e.get('page')}] {e['event']}: {e.get('type', '')} {e.get('text', '')} {e.get('url', '')}"
            for e in self.events
        ]
        return "browser events:\n" + "\n".join(lines[-40:])


class Page:
    """One tab."""

    def __init__(self, session: Session, page_id: int) -> None:
        self.session = session
        self.id = page_id

    async def evaluate(self, source: str, arg: Any = None, seconds: float = WAIT) -> Any:
        """Run the function *source* (``"async (arg) => ..."``) in the page;
        its (awaited) result, as JSON."""
        return await self.session.command(
            "evaluate", page=self.id, source=source, arg=arg, seconds=seconds
        )

    async def wait_for(self, source: str, arg: Any = None, seconds: float = WAIT) -> Any:
        """Wait until the function *source* returns a truthy value in the
        page (checked at each animation frame); that value."""
        return await self.session.command(
            "waitFor",
            page=self.id,
            source=source,
            arg=arg,
            seconds=seconds + 5,
            timeout_ms=int(seconds * 1000),
        )

    async def goto(self, url: str) -> None:
        await self.session.command("goto", page=self.id, url=url)

    async def text(self, selector: str) -> str:
        value = await self.session.command("text", page=self.id, selector=selector)
        assert isinstance(value, str)
        return value

    async def click(self, selector: str) -> None:
        await self.session.command("click", page=self.id, selector=selector)

    async def fill(self, selector: str, value: str) -> None:
        await self.session.command("fill", page=self.id, selector=selector, value=value)

    async def set_hidden(self, hidden: bool) -> None:
        """Make the page look hidden or visible (``visibilitychange``)."""
        await self.session.command("emulateHidden", page=self.id, hidden=hidden)

    async def screenshot(self, name: str, tmp: Path, *, full_page: bool = False) -> Path:
        """A PNG of the page: docs/img/NAME when BROKER_SCREENSHOTS=1, else in *tmp*."""
        folder = SCREENSHOTS if os.environ.get("BROKER_SCREENSHOTS") == "1" else tmp
        path = folder / name
        size = await self.session.command(
            "screenshot", page=self.id, path=str(path), fullPage=full_page
        )
        assert size > 1000, f"a {size}-byte screenshot is blank"
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        return path

    async def close(self) -> None:
        await self.session.command("closePage", page=self.id)


class Gate:
    """A page route that answers only once opened: a page that requests it
    synchronously (XMLHttpRequest) has its main thread blocked until then,
    like a tab busy with a long task, and reads none of its WebSocket's
    messages meanwhile. Serve :meth:`route` at :attr:`PATH`
    (``serve_pages({Gate.PATH: gate.route})``)."""

    PATH = "/gate"

    def __init__(self) -> None:
        self.entered = trio.Event()
        self._open = trio.Event()

    async def route(self, request: Request) -> Response:
        self.entered.set()
        await self._open.wait()
        return Response(200, b"open\n", "text/plain")

    def open(self) -> None:
        self._open.set()

    async def block(self, page: Page) -> None:
        """Block *page* on the gate until :meth:`open`; returns once the
        page runs again."""
        source = """(path) => {
            const request = new XMLHttpRequest();
            request.open("GET", path, false);  // synchronous: the tab is stuck
            request.send();
            return request.status;
        }"""
        assert await page.evaluate(source, self.PATH, seconds=60) == 200


@asynccontextmanager
async def browser_session() -> AsyncIterator[Session]:
    """A browser context of the shared runner, for one test."""
    port = runner().port
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    session = Session(stream)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(session._read)
        try:
            yield session
        finally:
            nursery.cancel_scope.cancel()
    await stream.aclose()  # the runner closes the context


#: A test's own route: the request -> the response.
Route = Callable[[Request], Awaitable[Response]]

_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json",
    ".png": "image/png",
}

#: URL prefix -> folder served under it.
_FOLDERS = {
    "/web/": WEB,
    "/pages/": PAGES,
    "/examples/": EXAMPLES,
    "/msgpack/": NODE_MODULES / "@msgpack" / "msgpack",
}


def _file(path: str) -> Response | None:
    for prefix, folder in _FOLDERS.items():
        if path.startswith(prefix):
            file = (folder / path[len(prefix) :]).resolve()
            if folder.resolve() not in file.parents or not file.is_file():
                return None
            content_type = _TYPES.get(file.suffix, "application/octet-stream")
            return Response(200, file.read_bytes(), content_type)
    return None


class PageServer:
    """The pages' origin: ``http://127.0.0.1:PORT``."""

    def __init__(self, routes: Mapping[str, Route]) -> None:
        self.routes = dict(routes)
        self.port = 0
        self.requests: list[str] = []

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, path: str) -> str:
        return self.origin + path

    async def handle(self, request: Request) -> Response:
        self.requests.append(request.target)
        route = self.routes.get(request.path)
        if route is not None:
            return await route(request)
        response = _file(request.path)
        return response if response is not None else Response(404, b"not found\n", "text/plain")


@asynccontextmanager
async def serve_pages(routes: Mapping[str, Route] | None = None) -> AsyncIterator[PageServer]:
    """Serve the pages (see the module doc) until the block ends."""
    server = PageServer(routes or {})
    http = HttpServer(
        server.handle, Limits(max_connections=256), headers=(("Cache-Control", "no-store"),)
    )
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    server.port = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(http.serve, listeners, nursery)
        try:
            yield server
        finally:
            nursery.cancel_scope.cancel()
