"""The WebSocket server: the :class:`~broker.server.broker.Broker` (listeners,
the opening handshake, heartbeat, shutdown), each accepted
:class:`~broker.server.connection.Connection` (reader), its
:class:`~broker.server.session.Session` (commands), and the one
:class:`~broker.server.publish.PublishPipeline`.

Layer: the top of the broker process; imports every layer below it
(core, engine, plugin, io, sources, ops) and is imported only by
:mod:`broker.cli` and the public facade :mod:`broker`.
"""
