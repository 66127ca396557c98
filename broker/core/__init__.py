"""The sans-I/O core: topics, routing, queues and their policies, the
protocol codec, WebSocket frames, the frame parser, the opening handshake,
the fan-out hub, configuration, and the values exchanged with plugins.

Layer rule (enforced by ``tests/test_layers.py``): nothing here imports trio
or does I/O, and nothing here imports another ``broker`` package. Every
module takes values and returns values, so all of it is tested without
sockets.
"""
