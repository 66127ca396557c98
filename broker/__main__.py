"""``python -m broker``: the same as the ``broker`` command."""

from broker.cli import main

raise SystemExit(main())
