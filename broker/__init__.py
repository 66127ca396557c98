"""trio-broker: a pluggable pub/sub WebSocket broker built on Trio.

This module is the supported public API; everything else may change between
releases. Plugin authors need :data:`hookimpl`, the values in
:mod:`broker.auth`, :func:`parse_settings` (with the constraints in
:mod:`broker.settings`) and :class:`ConfigError`; embedders need :class:`Broker`
and :func:`load_config`; clients use :mod:`broker.client`.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .auth import ANONYMOUS as ANONYMOUS
from .auth import Action as Action
from .auth import ClientInfo as ClientInfo
from .auth import Handshake as Handshake
from .auth import Identity as Identity
from .auth import Refusal as Refusal
from .auth import Reject as Reject
from .config import Config as Config
from .config import config_from_dict as config_from_dict
from .config import load_config as load_config
from .errors import CloseCode as CloseCode
from .errors import ConfigError as ConfigError
from .errors import ErrorCode as ErrorCode
from .errors import PluginError as PluginError
from .errors import PublishError as PublishError
from .hookspecs import hookimpl as hookimpl
from .plugin_host import PluginContext as PluginContext
from .plugin_host import PluginHost as PluginHost
from .server import Broker as Broker
from .settings import parse_settings as parse_settings
from .sources import Backoff as Backoff
from .sources import Publisher as Publisher
from .sources import Source as Source
from .sources import SourceError as SourceError
from .topics import TopicError as TopicError
from .topics import pattern_matches as pattern_matches
from .topics import validate_pattern as validate_pattern
