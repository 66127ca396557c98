"""Socket-level I/O shared by the servers: our TLS stream, the per-connection
socket writer, the read poller idle connections wait on, and the h11
keep-alive HTTP server helper.

Layer: above :mod:`broker.core`; knows nothing of the broker, its plugins or
its engine.
"""
