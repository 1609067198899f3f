"""The one exception of a bad configuration."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration value or key is invalid; the message says which and how to fix it."""
