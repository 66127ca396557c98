"""What the examples' run.py scripts share: ports, the hints they print and
their start-up errors.

The scripts put this folder on ``sys.path`` and import from here (as they do
``static_server``).
"""

from __future__ import annotations

import shlex
from collections.abc import Iterator
from contextlib import contextmanager

from broker import ListenError, config_from_dict

#: The config keys the scripts set from their flags.
FLAGS = {"listener.port": "--port", "admin.port": "--admin-port"}


def admin_port_for(port: int, admin_port: int | None) -> int:
    """``--admin-port``, or the port after ``--port`` as in the defaults
    (8765, 8766): two copies on different ports do not collide; 0 stays 0."""
    if admin_port is not None:
        return admin_port
    return port + 1 if port else 0


def sub_hint(url: str, *patterns: str) -> str:
    """The ``broker sub`` command that reaches *url*: ``--url`` unless it is
    where ``broker sub`` connects by default (the built-in listener)."""
    default = config_from_dict({}).listener
    moved = url != f"ws://{default.host}:{default.port}{default.path}"
    option = f" --url {shlex.quote(url)}" if moved else ""
    return ".venv/bin/broker sub" + option + "".join(f" {shlex.quote(p)}" for p in patterns)


def page_url(name: str, port: int, broker_url: str) -> str:
    """The line naming a served page, told the broker's URL when it moved."""
    query = "" if broker_url == "ws://127.0.0.1:8765/ws" else f"?broker={broker_url}"
    return f"{name}: http://127.0.0.1:{port}/{query}"


def first_error(error: BaseException) -> BaseException:
    """The first error inside (nested) exception groups."""
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    return error


@contextmanager
def listening(what: str, port: int, flag: str) -> Iterator[None]:
    """Start *what* on *port*: a failure to listen names the flag that chose it."""
    try:
        yield
    except* OSError as group:
        error = first_error(group)
        where = f"127.0.0.1:{port} ({flag})"
        raise OSError(f"{what} cannot listen on {where}: {error}") from None


def describe(error: BaseException) -> str:
    """A failed start in one line; a port a script set names its flag."""
    error = first_error(error)
    return error.naming(FLAGS) if isinstance(error, ListenError) else str(error)
