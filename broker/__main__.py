"""``python -m broker``: the same as the ``broker`` command."""

from .cli import main

raise SystemExit(main())
