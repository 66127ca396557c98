"""The settings vocabulary for plugin authors (see docs/plugins.md).

A plugin declares its ``[plugin.NAME]`` table as frozen dataclasses whose
field types come from here (``NonEmptyStr``, ``Seconds``, ``Port``, ``File``,
``Meta(...)`` bounds, ...) and reads it with :func:`parse_settings`. This
module is part of the published facade; the implementation lives in
:mod:`broker.core.settings`.
"""

# Listener-like settings (a source that serves HTTP) and static secrets.
from broker.core.config import RequestPath as RequestPath
from broker.core.config import check_plain_listener as check_plain_listener
from broker.core.config import check_tls_pair as check_tls_pair
from broker.core.credentials import MIN_SECRET_LENGTH as MIN_SECRET_LENGTH
from broker.core.credentials import SecretSettings as SecretSettings
from broker.core.credentials import digests as digests
from broker.core.settings import NON_EMPTY as NON_EMPTY
from broker.core.settings import Check as Check
from broker.core.settings import Dir as Dir
from broker.core.settings import File as File
from broker.core.settings import Meta as Meta
from broker.core.settings import NonEmptyStr as NonEmptyStr
from broker.core.settings import Port as Port
from broker.core.settings import Seconds as Seconds
from broker.core.settings import TopicPattern as TopicPattern
from broker.core.settings import did_you_mean as did_you_mean
from broker.core.settings import join_key as join_key
from broker.core.settings import parse as parse
from broker.core.settings import parse_settings as parse_settings
