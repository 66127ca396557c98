"""Sources: tasks that bring upstream data into topics, and the kit for
writing one (see docs/sources.md).

This package is what a source plugin imports: the :class:`Source` and
:class:`Publisher` protocols, the supervisor's :class:`Backoff`, the shared
``[[plugin.NAME.sources]]`` options, message mappings and the upstream
WebSocket connection, and the HTTP server helper a source that serves
requests builds on.

Layer: above :mod:`broker.core`, :mod:`broker.plugin` and :mod:`broker.io`;
below :mod:`broker.server`, which runs each source under a
:class:`Supervisor`.
"""

from broker.core.mapping import MappingError as MappingError
from broker.core.mapping import Mappings as Mappings
from broker.core.mapping import MappingSettings as MappingSettings
from broker.core.mapping import MatchMappingSettings as MatchMappingSettings
from broker.core.mapping import MessageMapping as MessageMapping
from broker.core.mapping import Template as Template
from broker.core.mapping import TemplateText as TemplateText
from broker.core.mapping import select as select
from broker.io.http import HttpServer as HttpServer
from broker.io.http import Limits as Limits
from broker.io.http import Request as Request
from broker.io.http import Response as Response
from broker.sources.supervisor import SEND_WINDOW as SEND_WINDOW
from broker.sources.supervisor import Backoff as Backoff
from broker.sources.supervisor import ConfiguredSource as ConfiguredSource
from broker.sources.supervisor import LogLimiter as LogLimiter
from broker.sources.supervisor import Publisher as Publisher
from broker.sources.supervisor import Source as Source
from broker.sources.supervisor import SourceError as SourceError
from broker.sources.supervisor import SourceName as SourceName
from broker.sources.supervisor import SourceOptions as SourceOptions
from broker.sources.supervisor import SourceSettings as SourceSettings
from broker.sources.supervisor import SourcesPlugin as SourcesPlugin
from broker.sources.supervisor import SourceState as SourceState
from broker.sources.supervisor import SubjectSourceSettings as SubjectSourceSettings
from broker.sources.supervisor import Supervisor as Supervisor
from broker.sources.supervisor import describe_error as describe_error
from broker.sources.supervisor import publish_mapped as publish_mapped
from broker.sources.supervisor import sources_plugin as sources_plugin
from broker.sources.supervisor import unique_names as unique_names
from broker.sources.upstream import Upstream as Upstream
from broker.sources.upstream import UpstreamConnection as UpstreamConnection
from broker.sources.upstream import UpstreamOptions as UpstreamOptions
from broker.sources.upstream import display_url as display_url
