"""Operations: the admin HTTP listener, Prometheus metrics, configuration
reload, systemd integration.

Layer: above :mod:`broker.core`, :mod:`broker.plugin`, :mod:`broker.io` and
:mod:`broker.sources`; below :mod:`broker.server`, which it sees through
type annotations only.
"""
