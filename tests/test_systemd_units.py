"""The example systemd units (examples/systemd/) are valid and documented.

``systemd-analyze verify`` checks them where it is installed (Debian's
``systemd`` package; .ci/run installs it); the install path of the broker
is replaced by this checkout's, since verify requires the executables to
exist. Every directive is explained in docs/operations.md.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
UNITS = ROOT / "examples" / "systemd"
SERVICE = UNITS / "trio-broker.service"
SOCKET = UNITS / "trio-broker.socket"
INSTALLED = "/opt/trio-broker/bin/broker"


def directives(path: Path) -> list[tuple[str, str, str]]:
    """(section, key, value) of every directive, in order (keys may repeat)."""
    out: list[tuple[str, str, str]] = []
    section = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.append((section, key.strip(), value.strip()))
    return out


def values(path: Path, key: str) -> list[str]:
    return [v for _, k, v in directives(path) if k == key]


@pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze is not installed (Debian: apt-get install systemd)",
)
def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    verify_units(tmp_path, (SERVICE, SOCKET), [SERVICE.name, SOCKET.name])


def verify_units(tmp_path: Path, units: Sequence[Path], names: Sequence[str]) -> None:
    """``systemd-analyze verify`` *names* (units, or instances of templates)
    of *units*, copied to *tmp_path* with this checkout's broker command."""
    broker = Path(sys.executable).parent / "broker"
    assert broker.exists(), "the broker command of this checkout (pip install -e .)"
    for unit in units:
        (tmp_path / unit.name).write_text(unit.read_text().replace(INSTALLED, str(broker)))
    result = subprocess.run(
        ["systemd-analyze", "verify", *names],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    # Unknown or misspelled directives are only warnings: refuse those too.
    complaints = [line for line in result.stderr.splitlines() if "trio-broker" in line]
    assert result.returncode == 0, result.stderr
    assert complaints == []


def test_service_is_type_notify_with_a_watchdog() -> None:
    assert values(SERVICE, "Type") == ["notify"]
    assert values(SERVICE, "NotifyAccess") == ["main"]
    assert values(SERVICE, "WatchdogSec")
    assert values(SERVICE, "KillSignal") == ["SIGTERM"]


def test_config_is_checked_before_start_and_reload() -> None:
    serve = values(SERVICE, "ExecStart")
    assert len(serve) == 1
    assert re.fullmatch(rf"{INSTALLED} serve -c (\S+)", serve[0])
    config = serve[0].split()[-1]
    check = f"{INSTALLED} check-config -c {config}"
    assert values(SERVICE, "ExecStartPre") == [check]
    # The guard first: a bad file fails the reload before the signal is sent.
    assert values(SERVICE, "ExecReload") == [check, "/bin/kill -HUP $MAINPID"]


def test_hardening() -> None:
    expected = {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "CapabilityBoundingSet": "",
        "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
    }
    for key, value in expected.items():
        assert values(SERVICE, key) == [value], key
    assert values(SERVICE, "User") == ["trio-broker"]
    assert values(SERVICE, "RuntimeDirectory") == ["trio-broker"]
    assert values(SERVICE, "StateDirectory") == ["trio-broker"]
    # Room for max_connections (10000 by default) plus files and sources.
    assert int(values(SERVICE, "LimitNOFILE")[0]) >= 20_000


def test_socket_unit_passes_the_websocket_listener() -> None:
    assert values(SOCKET, "FileDescriptorName") == ["ws"]
    assert values(SOCKET, "Service") == [SERVICE.name]
    assert values(SERVICE, "Requires") == [SOCKET.name]
    # A socket that were PartOf the service would close on every restart,
    # refusing the connection attempts it exists to queue.
    assert values(SOCKET, "PartOf") == []


@pytest.mark.parametrize("unit", [SERVICE, SOCKET], ids=lambda p: p.name)
def test_every_directive_is_explained_in_operations_md(unit: Path) -> None:
    doc = (ROOT / "docs" / "operations.md").read_text()
    for _, key, _ in directives(unit):
        assert f"`{key}=" in doc, f"docs/operations.md does not explain {key}="
