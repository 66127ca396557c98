"""trio-broker: a pluggable pub/sub WebSocket broker built on Trio."""

from __future__ import annotations

__version__ = "0.1.0"
