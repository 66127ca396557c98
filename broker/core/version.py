"""The package version (one place; the facade publishes it as ``broker.__version__``)."""

VERSION = "0.1.0"
