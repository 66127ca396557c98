"""Run trio-broker like ``broker serve -c FILE``, plus the benchmark's plugins.

    python bench/launch_broker.py -c broker.toml

Plugins are normally found through the ``trio_broker`` entry-point group;
the benchmark's validation plugin (``bench_plugins.py``) is not installed, so
this launcher hands its factory to :func:`broker.cli.serve`, which serves
exactly as ``broker serve`` does (signals, reload, exit codes).
"""

from __future__ import annotations

import argparse
import sys

from bench_plugins import FACTORIES

from broker.cli import serve


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-c", "--config", required=True, help="broker.toml")
    args = parser.parse_args()
    return serve(args.config, factories=FACTORIES)


if __name__ == "__main__":
    sys.exit(main())
