"""trio-broker: a pluggable pub/sub WebSocket broker built on Trio.

This module is the supported public API; everything else may change between
releases. Plugin authors need :data:`hookimpl`, the values in
:mod:`broker.core.values`, :func:`parse_settings` (with the constraints in
:mod:`broker.settings`) and :class:`ConfigError`; embedders need :class:`Broker`
and :func:`load_config` (and :class:`ListenError`, what ``Broker.serve`` raises
when it cannot bind); clients use :mod:`broker.client`.
"""

from __future__ import annotations

from broker.core.config import Config as Config
from broker.core.config import config_from_dict as config_from_dict
from broker.core.config import is_loopback_host as is_loopback_host
from broker.core.config import load_config as load_config
from broker.core.errors import CloseCode as CloseCode
from broker.core.errors import ConfigError as ConfigError
from broker.core.errors import ErrorCode as ErrorCode
from broker.core.errors import PluginError as PluginError
from broker.core.errors import PublishError as PublishError
from broker.core.settings import parse_settings as parse_settings
from broker.core.topics import MAX_TOKENS as MAX_TOKENS
from broker.core.topics import TopicError as TopicError
from broker.core.topics import pattern_matches as pattern_matches
from broker.core.topics import validate_pattern as validate_pattern
from broker.core.values import ANONYMOUS as ANONYMOUS
from broker.core.values import Action as Action
from broker.core.values import ClientInfo as ClientInfo
from broker.core.values import Handshake as Handshake
from broker.core.values import Identity as Identity
from broker.core.values import Refusal as Refusal
from broker.core.values import Reject as Reject
from broker.core.values import ServiceMetric as ServiceMetric
from broker.core.values import ServiceStatus as ServiceStatus
from broker.core.values import SourcesContext as SourcesContext
from broker.core.version import VERSION
from broker.io.tls import make_ssl_context as make_ssl_context
from broker.plugin.hookspecs import hookimpl as hookimpl
from broker.plugin.host import PluginContext as PluginContext
from broker.plugin.host import PluginHost as PluginHost
from broker.plugin.services import Service as Service
from broker.server.broker import Broker as Broker
from broker.server.broker import ListenError as ListenError
from broker.sources.supervisor import Backoff as Backoff
from broker.sources.supervisor import Publisher as Publisher
from broker.sources.supervisor import Source as Source
from broker.sources.supervisor import SourceError as SourceError

__version__ = VERSION
