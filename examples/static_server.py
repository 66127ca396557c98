"""A small web server for the examples' pages (``web/`` next to each
``run.py``): static files from one folder, plus a few routes of the
example's own (the chat's login). HTTP/1.1 on h11, one request per
connection; loopback only. Not for production: use any web server there.
"""

from __future__ import annotations

import mimetypes
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path

import h11
import trio

#: A route: (method, body) -> (status, content type, body).
Route = Callable[[str, bytes], Awaitable[tuple[int, str, bytes]]]

_TYPES = {".js": "text/javascript; charset=utf-8", ".html": "text/html; charset=utf-8"}


class StaticServer:
    """Serves *folder* (and *routes*) on ``http://HOST:PORT/``."""

    def __init__(self, folder: Path, routes: Mapping[str, Route] | None = None) -> None:
        self.folder = folder.resolve()
        self.routes = dict(routes or {})
        self.port = 0

    async def serve(
        self,
        host: str = "127.0.0.1",
        port: int = 8000,
        *,
        task_status: trio.TaskStatus[StaticServer] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        listeners = await trio.open_tcp_listeners(port, host=host)
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started(self)
        await trio.serve_listeners(self._connection, listeners)

    async def _answer(self, method: str, path: str, body: bytes) -> tuple[int, str, bytes]:
        route = self.routes.get(path)
        if route is not None:
            return await route(method, body)
        if method != "GET":
            return 405, "text/plain", b"method not allowed\n"
        file = (self.folder / (path.lstrip("/") or "index.html")).resolve()
        if self.folder not in file.parents or not file.is_file():
            return 404, "text/plain", b"not found\n"
        kind = _TYPES.get(file.suffix) or mimetypes.guess_type(file.name)[0] or "text/plain"
        return 200, kind, file.read_bytes()

    async def _connection(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        try:
            with trio.move_on_after(10):
                request: h11.Request | None = None
                body = b""
                while True:
                    event = conn.next_event()
                    if event is h11.NEED_DATA:
                        conn.receive_data(await stream.receive_some(65536))
                    elif isinstance(event, h11.Request):
                        request = event
                    elif isinstance(event, h11.Data):
                        body += event.data
                        if len(body) > 65536:
                            return
                    elif isinstance(event, h11.EndOfMessage) and request is not None:
                        break
                    else:
                        return
                path = request.target.decode("latin-1").partition("?")[0]
                status, kind, payload = await self._answer(request.method.decode(), path, body)
                headers = [
                    ("Content-Type", kind),
                    ("Content-Length", str(len(payload))),
                    ("Cache-Control", "no-cache"),
                    ("Connection", "close"),
                ]
                data = conn.send(h11.Response(status_code=status, headers=headers))
                data += conn.send(h11.Data(data=payload)) + conn.send(h11.EndOfMessage())
                await stream.send_all(data)
        except (h11.RemoteProtocolError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await trio.aclose_forcefully(stream)
