"""Exceptions users see. The CLI prints their message and exits 2; the API returns it as a 4xx.

Messages follow one format: ``<field or file>: got <value>; expected <constraint>. <how to fix>``.
"""

__all__ = ["ConfigError", "DataError", "MetarecError", "ModelNotFoundError"]


class MetarecError(Exception):
    """Base class for every error caused by user input rather than a bug."""


class ConfigError(MetarecError, ValueError):
    """A config value (YAML, CLI flag or ``--set``) is unknown, mistyped or out of range."""


class DataError(MetarecError, ValueError):
    """An input file or prepared dataset is missing, malformed or incompatible."""


class ModelNotFoundError(MetarecError, LookupError):
    """A model URI or checkpoint does not resolve to a loadable model."""
