"""The Trio client library and the ``broker pub`` / ``broker sub`` commands.

* :mod:`broker.client.client`: :func:`open_client`, :class:`Client`: the
  connection loop (reconnect, resubscribe) and the reader;
* :mod:`broker.client.reconnect`: :class:`Reconnect`, the backoff and when
  not to come back (pure);
* :mod:`broker.client.positions`: what each subscription resumes from and
  what it delivers (pure);
* :mod:`broker.client.subscription`: :class:`Subscription` and its buffer;
* :mod:`broker.client.events`, :mod:`broker.client.errors`: what the
  application gets;
* :mod:`broker.client.cli`: ``broker pub`` and ``broker sub``.

Everything public is importable from here. See docs/client.md.

Layer: uses :mod:`broker.core` only (the same protocol codec as the server),
never the server side.
"""

from broker.client.client import *  # noqa: F403
from broker.client.client import __all__ as __all__
