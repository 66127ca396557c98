"""How settings are read: our dataclass reader (broker.settings) against msgspec.

The measurement behind docs/configuration.md#how-settings-are-read. The same
schema (every core table, and the acl plugin's rules) is written twice, as
dataclasses for :func:`broker.settings.parse` and as msgspec Structs for
``msgspec.convert(strict=True)``, and both read:

* the shipped broker.toml (every key of every core table);
* a large plugin table: ``[plugin.acl]`` with 2,000 rules of 2 roles and 3
  patterns each (a big deployment's ACL is a few hundred rules).

Only types, bounds, choices and unknown keys are checked by either (the
checks that span keys, the files and the topic patterns are the same code
whichever reads the types). The broker's real ``config_from_dict`` and the
real acl plugin are timed too. Then a few bad tables show what each reports.

    PYTHONPATH=.:plugins .venv/bin/python bench/settings_parse.py
"""

from __future__ import annotations

import dataclasses
import enum
import sys
import timeit
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

from broker import ConfigError, PluginContext, config_from_dict
from broker.core.settings import Meta, parse

ROOT = Path(__file__).resolve().parent.parent


class Policy(enum.StrEnum):
    DROP_OLDEST = "drop-oldest"
    DROP_NEWEST = "drop-newest"
    CONFLATE = "conflate"
    DISCONNECT = "disconnect"


# -- the schema as dataclasses (broker.settings) -------------------------------------

Count = Annotated[int, Meta(gt=0)]
Secs = Annotated[float, Meta(gt=0)]
Secs0 = Annotated[float, Meta(ge=0)]
Port = Annotated[int, Meta(ge=0, le=65535)]
D = dataclasses.dataclass(frozen=True, kw_only=True)


@D
class Listener:
    host: str = "127.0.0.1"
    port: Port = 8765
    path: str = "/ws"
    tls_cert: str = ""
    tls_key: str = ""
    allow_insecure: bool = False
    tls_client_ca: str = ""
    tls_client_auth: Literal["none", "optional", "required"] = "none"


@D
class Limits:
    max_connections: Count = 10_000
    max_connections_per_ip: Count = 1_000
    max_subscriptions: Count = 1_000
    max_message_size: Count = 65_536
    max_replies: Count = 256
    handshake_timeout: Secs = 10.0
    auth_timeout: Secs = 5.0
    ping_interval: Secs0 = 20.0
    ping_timeout: Secs = 20.0
    drain_timeout: Secs0 = 5.0
    write_batch_bytes: Count = 262_144


@D
class QueueRule:
    pattern: str
    policy: Policy | None = None
    max_messages: Count | None = None
    max_bytes: Count | None = None


@D
class Queue:
    max_messages: Count = 1_000
    max_bytes: Count = 1_048_576
    policy: Policy = Policy.DROP_OLDEST
    rules: tuple[QueueRule, ...] = ()


@D
class Authorization:
    default: Literal["allow", "deny"] = "allow"


@D
class Plugins:
    enabled: tuple[str, ...] = ("noauth",)


@D
class Log:
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["text", "json"] = "text"


@D
class Admin:
    enabled: bool = True
    host: str = "127.0.0.1"
    port: Port = 8766
    token: str = ""
    allow_insecure: bool = False


@D
class Document:
    listener: Listener = Listener()
    limits: Limits = Limits()
    queue: Queue = Queue()
    authorization: Authorization = Authorization()
    plugins: Plugins = Plugins()
    plugin: dict[str, dict[str, object]] = dataclasses.field(default_factory=dict)
    log: Log = Log()
    admin: Admin = Admin()


@D
class AclRule:
    subjects: frozenset[str] = frozenset()
    roles: frozenset[str] = frozenset()
    subscribe: tuple[str, ...] = ()
    publish: tuple[str, ...] = ()
    deny_subscribe: tuple[str, ...] = ()
    deny_publish: tuple[str, ...] = ()


@D
class Acl:
    default: Literal["deny", "defer"] = "deny"
    rules: tuple[AclRule, ...] = ()


# -- the same schema as msgspec Structs ----------------------------------------------

S = {"frozen": True, "forbid_unknown_fields": True, "kw_only": True}
MCount = Annotated[int, msgspec.Meta(gt=0)]
MSecs = Annotated[float, msgspec.Meta(gt=0)]
MSecs0 = Annotated[float, msgspec.Meta(ge=0)]
MPort = Annotated[int, msgspec.Meta(ge=0, le=65535)]


class SListener(msgspec.Struct, **S):  # type: ignore[call-arg]
    host: str = "127.0.0.1"
    port: MPort = 8765
    path: str = "/ws"
    tls_cert: str = ""
    tls_key: str = ""
    allow_insecure: bool = False
    tls_client_ca: str = ""
    tls_client_auth: Literal["none", "optional", "required"] = "none"


class SLimits(msgspec.Struct, **S):  # type: ignore[call-arg]
    max_connections: MCount = 10_000
    max_connections_per_ip: MCount = 1_000
    max_subscriptions: MCount = 1_000
    max_message_size: MCount = 65_536
    max_replies: MCount = 256
    handshake_timeout: MSecs = 10.0
    auth_timeout: MSecs = 5.0
    ping_interval: MSecs0 = 20.0
    ping_timeout: MSecs = 20.0
    drain_timeout: MSecs0 = 5.0
    write_batch_bytes: MCount = 262_144


class SQueueRule(msgspec.Struct, **S):  # type: ignore[call-arg]
    pattern: str
    policy: Policy | None = None
    max_messages: MCount | None = None
    max_bytes: MCount | None = None


class SQueue(msgspec.Struct, **S):  # type: ignore[call-arg]
    max_messages: MCount = 1_000
    max_bytes: MCount = 1_048_576
    policy: Policy = Policy.DROP_OLDEST
    rules: tuple[SQueueRule, ...] = ()


class SAuthorization(msgspec.Struct, **S):  # type: ignore[call-arg]
    default: Literal["allow", "deny"] = "allow"


class SPlugins(msgspec.Struct, **S):  # type: ignore[call-arg]
    enabled: tuple[str, ...] = ("noauth",)


class SLog(msgspec.Struct, **S):  # type: ignore[call-arg]
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["text", "json"] = "text"


class SAdmin(msgspec.Struct, **S):  # type: ignore[call-arg]
    enabled: bool = True
    host: str = "127.0.0.1"
    port: MPort = 8766
    token: str = ""
    allow_insecure: bool = False


class SDocument(msgspec.Struct, **S):  # type: ignore[call-arg]
    listener: SListener = SListener()
    limits: SLimits = SLimits()
    queue: SQueue = SQueue()
    authorization: SAuthorization = SAuthorization()
    plugins: SPlugins = SPlugins()
    plugin: dict[str, dict[str, Any]] = {}
    log: SLog = SLog()
    admin: SAdmin = SAdmin()


class SAclRule(msgspec.Struct, **S):  # type: ignore[call-arg]
    subjects: frozenset[str] = frozenset()
    roles: frozenset[str] = frozenset()
    subscribe: tuple[str, ...] = ()
    publish: tuple[str, ...] = ()
    deny_subscribe: tuple[str, ...] = ()
    deny_publish: tuple[str, ...] = ()


class SAcl(msgspec.Struct, **S):  # type: ignore[call-arg]
    default: Literal["deny", "defer"] = "deny"
    rules: tuple[SAclRule, ...] = ()


@D
class Rate:
    publish_rate: float = 0.0


@D
class Rates:
    roles: dict[str, Rate] = dataclasses.field(default_factory=dict)


class SRate(msgspec.Struct, **S):  # type: ignore[call-arg]
    publish_rate: float = 0.0


class SRates(msgspec.Struct, **S):  # type: ignore[call-arg]
    roles: dict[str, SRate] = {}


def msgspec_parse(kind: type[Any], data: object) -> Any:
    """msgspec.convert with its error turned into a ConfigError: the least
    a translation needs (the "did you mean", the choices of a Literal, the
    value shown would each need the type looked up again along the path)."""
    try:
        return msgspec.convert(data, type=kind, strict=True)
    except msgspec.ValidationError as e:
        text, _, where = str(e).partition(" - at `$")
        key = where.rstrip("`").lstrip(".")
        if text.startswith("Object contains unknown field `"):
            name = text.split("`")[1]
            return ConfigError(f"{key}.{name}" if key else name, "unknown key")
        return ConfigError(key, text)


# -- the measurement -----------------------------------------------------------------


def acl_table(rules: int) -> dict[str, Any]:
    return {
        "default": "deny",
        "rules": [
            {
                "roles": [f"role-{i}", "staff"],
                "subscribe": [f"market.{i}.>", f"user.{{sub}}.orders.{i}"],
                "publish": [f"user.{{sub}}.commands.{i}"],
            }
            for i in range(rules)
        ],
    }


def best(func: Callable[[], object], number: int) -> float:
    """Best of 5 runs, in microseconds per call."""
    return min(timeit.repeat(func, number=number, repeat=5)) / number * 1e6


def main() -> None:
    document = tomllib.loads((ROOT / "broker.toml").read_text(encoding="utf-8"))
    acl = acl_table(2000)
    assert parse(Document, document) and msgspec.convert(document, SDocument, strict=True)
    assert len(parse(Acl, acl).rules) == len(msgspec.convert(acl, SAcl, strict=True).rules)

    import broker_acl

    context = PluginContext("acl", config_from_dict({"plugins": {"enabled": ["acl"]}}))
    print(f"python {sys.version.split()[0]}, msgspec {msgspec.__version__}\n")
    print("| what | broker.settings.parse | msgspec.convert |")
    print("|---|---:|---:|")
    rows = [
        (
            "default config (`{}`)",
            lambda: parse(Document, {}),
            lambda: msgspec_parse(SDocument, {}),
        ),
        (
            "shipped broker.toml",
            lambda: parse(Document, document),
            lambda: msgspec_parse(SDocument, document),
        ),
        ("acl, 2,000 rules", lambda: parse(Acl, acl), lambda: msgspec_parse(SAcl, acl)),
    ]
    for name, ours, theirs in rows:
        number = 5 if "acl" in name else 2000
        print(f"| {name} | {best(ours, number):,.1f} µs | {best(theirs, number):,.1f} µs |")
    real = best(lambda: config_from_dict(document), 500)
    plugin = best(lambda: broker_acl.create(acl, context), 3)
    print(f"\nThe broker's own config_from_dict(broker.toml): {real:,.1f} µs")
    print(f"broker_acl.create with 2,000 rules (patterns compiled): {plugin / 1000:,.1f} ms")

    print("\nWhat each reports (ours, then msgspec's raw message):")
    bad: list[tuple[type[Any], type[Any], dict[str, Any]]] = [
        (Document, SDocument, {"limits": {"max_conections": 1}}),
        (Document, SDocument, {"listner": {}}),
        (Document, SDocument, {"listener": {"port": "8765"}}),
        (Document, SDocument, {"limits": {"max_connections": 0}}),
        (Document, SDocument, {"log": {"level": "loud"}}),
        (Document, SDocument, {"queue": {"rules": [{"pattern": "a"}, {"policy": "x"}]}}),
        (Acl, SAcl, {"rules": [{"roles": "r"}]}),
    ]
    for ours_t, theirs_t, data in bad:
        try:
            parse(ours_t, data)
        except ConfigError as e:
            mine = str(e)
        try:
            msgspec.convert(data, type=theirs_t, strict=True)
        except msgspec.ValidationError as e:
            raw = str(e)
        print(f"- `{mine}`\n  `{raw}`")
    # A table of tables keyed by name (ratelimit's roles, mtls's roles,
    # command's env): msgspec does not say which key.
    roles = {"roles": {"ingest": {"publish_rate": "fast"}}}
    try:
        parse(Rates, roles)
    except ConfigError as e:
        mine = str(e)
    try:
        msgspec.convert(roles, type=SRates, strict=True)
    except msgspec.ValidationError as e:
        print(f"- `{mine}`\n  `{e}`")


if __name__ == "__main__":
    main()
