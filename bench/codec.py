"""Micro-benchmark of the protocol codec: decode_command and encode_msg.

    PYTHONPATH=. .venv/bin/python bench/codec.py [--rounds 25] [--number 20000]

Each case is timed ``--rounds`` times for ``--number`` calls, the cases
interleaved round by round, and the best round is reported (ns per call):
on a shared or noisy machine the minimum is the number least disturbed by
others. Besides the broker's own functions it times, for comparison:

* ``checked``: ``broker.core.protocol._decode_checked``, the decoder before msgspec
  that now only runs for frames msgspec refuses (absent before that change);
* ``json.loads``: the standard library's parse alone, no checks;
* ``msgspec json`` (encode): what encode_msg's JSON branch would cost with
  msgspec.json.Encoder (not adopted: see the comment in encode_msg).

To compare with an older commit, run the script against a copy of it:
``git archive COMMIT | tar -x -C /tmp/old`` then ``PYTHONPATH=/tmp/old``.
"""

from __future__ import annotations

import argparse
import json
import timeit
from collections.abc import Callable
from functools import partial
from typing import Any

import msgpack
import msgspec

from broker.core import protocol
from broker.core.errors import ProtocolError
from broker.core.protocol import Encoding, decode_command, encode_msg

BENCH_DATA = "@T1234567890123456#" + "x" * 81  # what bench/run.py publishes
SMALL_DATA = {"price": 64123.5, "qty": 2, "side": "buy"}
MEDIUM_DATA = {
    "bids": [[64000.5 + i, 0.25 * i] for i in range(10)],
    "asks": [[64100.5 + i, 0.5] for i in range(10)],
    "ts": 1700000000123,
}

COMMANDS: dict[str, dict[str, Any]] = {
    # fire and forget, as the load generator sends it
    "pub (bench: 100-char string, no id)": {"op": "pub", "topic": "t.417", "data": BENCH_DATA},
    "pub (small dict, id)": {"op": "pub", "id": 17, "topic": "trades.BTC-USD", "data": SMALL_DATA},
    "pub (order book, id, key)": {
        "op": "pub",
        "id": 18,
        "topic": "book.BTC-USD",
        "data": MEDIUM_DATA,
        "key": "BTC-USD",
    },
    # deeper than the typed frame (6 levels): msgspec, then a walk in Python
    "pub (data 8 levels deep)": {"op": "pub", "topic": "t", "data": [[[[[[[[1, 2.5]]]]]]]]},
    "sub": {"op": "sub", "id": 3, "topic": "trades.*"},
    "pub + unknown field": {"op": "pub", "topic": "t", "data": 1, "trace": "abc"},
    "bad: wildcard in pub topic": {"op": "pub", "id": 5, "topic": "trades.*", "data": 1},
    "bad: id 1.5": {"op": "ping", "id": 1.5},
}


def payload(obj: dict[str, Any], encoding: Encoding) -> str | bytes:
    if encoding is Encoding.JSON:
        return json.dumps(obj, separators=(",", ":"))
    return msgpack.packb(obj)  # type: ignore[no-any-return]


def quiet(decode: Callable[[Any, Encoding], Any], frame: Any, encoding: Encoding) -> object:
    try:
        return decode(frame, encoding)
    except ProtocolError as e:
        return e


def _json_msg_with_msgspec(encoder: msgspec.json.Encoder, data: Any) -> str:
    head = '{"op":"msg","topic":"trades.BTC-USD","seq":123456,"data":'
    return head + encoder.encode(data).decode() + "}"


def cases() -> list[tuple[str, str, Callable[[], object]]]:
    """(group, name, callable) for every measurement."""
    out: list[tuple[str, str, Callable[[], object]]] = []
    checked = getattr(protocol, "_decode_checked", None)
    for encoding in Encoding:
        for name, obj in COMMANDS.items():
            frame = payload(obj, encoding)
            group = f"decode {encoding} {name}"
            out.append((group, "decode_command", partial(quiet, decode_command, frame, encoding)))
            if checked is not None:
                out.append((group, "checked", partial(quiet, checked, frame, encoding)))
            if encoding is Encoding.JSON and name.startswith("pub ("):
                out.append((group, "json.loads", partial(json.loads, frame)))

    json_encoder = msgspec.json.Encoder()
    for name, data in [
        ("bench", BENCH_DATA),
        ("small dict", SMALL_DATA),
        ("order book", MEDIUM_DATA),
    ]:
        for encoding in Encoding:
            run = partial(encode_msg, "trades.BTC-USD", 123456, data, None, encoding)
            out.append((f"encode_msg {encoding} {name}", "encode_msg", run))
        run_msgspec = partial(_json_msg_with_msgspec, json_encoder, data)
        out.append((f"encode_msg json {name}", "msgspec json", run_msgspec))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--number", type=int, default=20000)
    args = parser.parse_args()
    todo = cases()
    best = {(g, n): float("inf") for g, n, _ in todo}
    for _ in range(args.rounds):
        for group, name, fn in todo:
            t = timeit.timeit(fn, number=args.number) / args.number
            best[group, name] = min(best[group, name], t)
    print(f"msgspec {msgspec.__version__}, msgpack {'.'.join(map(str, msgpack.version))}")
    print(f"best of {args.rounds} rounds x {args.number} calls, ns per call\n")
    print("| case | function | ns |")
    print("|---|---|---:|")
    for (group, name), t in best.items():
        print(f"| {group} | {name} | {t * 1e9:,.0f} |")


if __name__ == "__main__":
    main()
