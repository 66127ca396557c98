"""Plugins: the hook specifications (:mod:`broker.plugin.hookspecs`, every
hook in one module), the :class:`~broker.plugin.host.PluginHost` that loads
and calls them, and the :class:`~broker.plugin.runtime.Runtime` (the
configuration and plugins in force).

Layer: above :mod:`broker.core` and :mod:`broker.engine`.
"""
