"""systemd integration: readiness notification, watchdog, socket activation.

Implemented against the documented protocols rather than libsystemd, so it
needs nothing installed and is a no-op where systemd is absent:

* **sd_notify** (``sd_notify(3)``): state changes are sent as one datagram of
  newline-separated ``KEY=VALUE`` lines to the ``AF_UNIX`` socket named by
  ``$NOTIFY_SOCKET``: a filesystem path, or an abstract socket when it starts
  with ``@``. :class:`Notifier` sends ``READY=1``, ``STATUS=...``,
  ``WATCHDOG=1``, ``RELOADING=1`` with ``MONOTONIC_USEC=...`` (the
  ``Type=notify-reload`` protocol) and ``STOPPING=1``.
* **Watchdog** (``sd_watchdog_enabled(3)``): with ``WatchdogSec=`` set,
  systemd passes ``$WATCHDOG_USEC`` (and ``$WATCHDOG_PID``); the service must
  send ``WATCHDOG=1`` more often than that. :func:`watchdog_interval` returns
  half of it.
* **Socket activation** (``sd_listen_fds(3)``): systemd passes listening
  sockets as file descriptors 3, 4, ... with ``$LISTEN_FDS`` (how many),
  ``$LISTEN_PID`` (which process they are meant for) and ``$LISTEN_FDNAMES``
  (colon-separated names from ``FileDescriptorName=``). :func:`listen_fds`
  reads them.

Every function here takes the environment as an argument, so the parsing is
tested without a service manager; the command line passes ``os.environ``.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from typing import Final

__all__ = [
    "LISTEN_FDS_START",
    "ListenFd",
    "Notifier",
    "adopt_sockets",
    "listen_fds",
    "monotonic_usec",
    "watchdog_interval",
]

log = logging.getLogger("broker.systemd")

#: The first file descriptor systemd passes (``SD_LISTEN_FDS_START``).
LISTEN_FDS_START: Final = 3

_LISTEN_VARS: Final = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC in microseconds, as ``MONOTONIC_USEC=`` wants it."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


class Notifier:
    """Sends state notifications to the service manager.

    Without an address (not started by systemd, or ``Type=`` is not
    ``notify``) every method does nothing. A failed send is logged once at
    debug level and otherwise ignored: notifications never stop the broker.

    Args:
        address: the value of ``$NOTIFY_SOCKET``, or ``None``.
    """

    def __init__(self, address: str | None) -> None:
        self.address: str | None = address or None
        self._sock: socket.socket | None = None
        self._target: str | bytes = ""
        if self.address is not None:
            if self.address.startswith("@"):
                # Abstract namespace: a leading NUL byte instead of the '@'.
                self._target = "\0" + self.address[1:]
            elif self.address.startswith("/"):
                self._target = self.address
            else:
                log.warning("ignoring NOTIFY_SOCKET=%r: not a path or @name", self.address)
                self.address = None

    @classmethod
    def from_environ(cls, environ: MutableMapping[str, str], *, unset: bool = True) -> Notifier:
        """A notifier for ``$NOTIFY_SOCKET``; with *unset*, the variable is
        removed so that processes started later do not inherit it."""
        address = environ.pop("NOTIFY_SOCKET", None) if unset else environ.get("NOTIFY_SOCKET")
        return cls(address)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, *lines: str) -> bool:
        """Send ``KEY=VALUE`` *lines* in one datagram; True if it was sent."""
        if self.address is None:
            return False
        message = "\n".join(lines).encode("utf-8")
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                # A datagram to a live socket never blocks for long; never
                # let a stuck receiver stall the event loop.
                self._sock.setblocking(False)
            self._sock.sendto(message, self._target)
        except OSError as e:
            log.debug("sd_notify to %s failed: %r", self.address, e)
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """``READY=1``: start-up or a reload is complete."""
        return self.notify("READY=1", *([f"STATUS={status}"] if status else []))

    def reloading(self, status: str | None = None) -> bool:
        """``RELOADING=1`` with the current ``MONOTONIC_USEC`` (reload starts)."""
        lines = ["RELOADING=1", f"MONOTONIC_USEC={monotonic_usec()}"]
        return self.notify(*lines, *([f"STATUS={status}"] if status else []))

    def stopping(self, status: str | None = None) -> bool:
        """``STOPPING=1``: the shutdown has begun."""
        return self.notify("STOPPING=1", *([f"STATUS={status}"] if status else []))

    def status(self, text: str) -> bool:
        """``STATUS=...``: a one-line description shown by ``systemctl status``."""
        return self.notify(f"STATUS={text}")

    def watchdog(self) -> bool:
        """``WATCHDOG=1``: the keep-alive ping."""
        return self.notify("WATCHDOG=1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def watchdog_interval(environ: Mapping[str, str], pid: int) -> float | None:
    """Seconds between ``WATCHDOG=1`` pings: half of ``$WATCHDOG_USEC``.

    ``None`` when the watchdog is not enabled for process *pid*: no or an
    invalid ``WATCHDOG_USEC``, or a ``WATCHDOG_PID`` naming another process.
    """
    usec_text = environ.get("WATCHDOG_USEC")
    if not usec_text:
        return None
    try:
        usec = int(usec_text)
    except ValueError:
        log.warning("ignoring WATCHDOG_USEC=%r: not a number", usec_text)
        return None
    if usec <= 0:
        return None
    pid_text = environ.get("WATCHDOG_PID")
    if pid_text:
        try:
            if int(pid_text) != pid:
                return None
        except ValueError:
            return None
    return usec / 1_000_000 / 2


@dataclass(frozen=True, slots=True)
class ListenFd:
    """One socket passed by the service manager."""

    fd: int
    #: Its ``FileDescriptorName=`` (systemd's default is ``"unknown"``, or
    #: the socket unit's name when one unit passes it).
    name: str


def listen_fds(
    environ: MutableMapping[str, str], pid: int, *, unset: bool = True
) -> list[ListenFd]:
    """The sockets passed to process *pid* by socket activation.

    Reads ``LISTEN_PID``, ``LISTEN_FDS`` and ``LISTEN_FDNAMES`` from
    *environ* like ``sd_listen_fds_with_names(3)``: no sockets unless
    ``LISTEN_PID`` equals *pid* (the variables were meant for another
    process, e.g. our parent); with *unset* the three variables are removed
    in every case so that child processes do not see them. Names default to
    ``"unknown"`` when ``LISTEN_FDNAMES`` is missing or does not have one
    name per socket.

    Raises:
        ValueError: ``LISTEN_PID`` or ``LISTEN_FDS`` is not a number.
    """
    values = {name: environ.get(name) for name in _LISTEN_VARS}
    if unset:
        for name in _LISTEN_VARS:
            environ.pop(name, None)
    pid_text, count_text, names_text = (values[name] for name in _LISTEN_VARS)
    if not pid_text or not count_text:
        return []
    try:
        listen_pid = int(pid_text)
    except ValueError:
        raise ValueError(f"LISTEN_PID={pid_text!r} is not a number") from None
    if listen_pid != pid:
        return []
    try:
        count = int(count_text)
    except ValueError:
        raise ValueError(f"LISTEN_FDS={count_text!r} is not a number") from None
    if count <= 0:
        return []
    names = names_text.split(":") if names_text is not None else []
    if len(names) != count:
        names = ["unknown"] * count
    return [ListenFd(LISTEN_FDS_START + i, names[i]) for i in range(count)]


def adopt_sockets(fds: list[ListenFd]) -> dict[str, list[socket.socket]]:
    """Turn passed file descriptors into sockets, grouped by name.

    The broker knows the names ``ws`` (the WebSocket listener) and ``admin``
    (the admin HTTP listener); a single socket with any other name is the
    WebSocket listener. Each descriptor is made close-on-exec (systemd
    passes them inheritable) and checked to be a listening TCP socket.

    Raises:
        ValueError: a descriptor is not a listening TCP socket, or a name is
            unknown when several sockets were passed.
    """
    known = ("ws", "admin")
    names: list[str] = []
    for item in fds:
        if item.name in known:
            names.append(item.name)
        elif len(fds) == 1:
            names.append("ws")
        else:
            raise ValueError(
                f"socket activation: fd {item.fd} is named {item.name!r}; name the sockets "
                "'ws' and 'admin' with FileDescriptorName="
            )
    named: dict[str, list[socket.socket]] = {}
    adopted: list[socket.socket] = []
    try:
        for item, name in zip(fds, names, strict=True):
            sock = socket.socket(fileno=item.fd)
            adopted.append(sock)
            os.set_inheritable(item.fd, False)
            if (
                sock.family not in (socket.AF_INET, socket.AF_INET6)
                or sock.type != socket.SOCK_STREAM
            ):
                raise ValueError(f"socket activation: fd {item.fd} ({name}) is not a TCP socket")
            if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                raise ValueError(f"socket activation: fd {item.fd} ({name}) is not listening")
            named.setdefault(name, []).append(sock)
    except BaseException:
        # Leave the descriptors as they were passed (they are systemd's too).
        for sock in adopted:
            sock.detach()
        raise
    return named
