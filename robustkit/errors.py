"""Exceptions raised by robustkit.

Every error a user can cause (bad config, bad tensor, missing file, unknown name)
derives from :class:`RobustkitError`, so callers can catch one type. The concrete
classes also derive from the matching built-in (``ValueError``, ``KeyError``,
``FileNotFoundError``) so generic handlers keep working.
"""

from __future__ import annotations


class RobustkitError(Exception):
    """Base class of all robustkit errors."""


class ConfigError(RobustkitError, ValueError):
    """A configuration (YAML file, dict or keyword arguments) is invalid.

    ``path`` names the offending key, e.g. ``steps[1].evaluate.attacks[0].eps``.
    """

    def __init__(self, message: str, path: str | None = None):
        self.path = path
        self.reason = message
        super().__init__(f"{path}: {message}" if path else message)


class UnknownNameError(ConfigError, KeyError):
    """A name was looked up in a registry that does not hold it."""

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return Exception.__str__(self)


class InputError(RobustkitError, ValueError):
    """A tensor or array has the wrong shape, dtype, range or device."""


class DataNotFoundError(RobustkitError, FileNotFoundError):
    """A data set or checkpoint is missing on disk and cannot be downloaded."""


class RepairError(RobustkitError, RuntimeError):
    """A repair found no admissible way to repair the model (e.g. every skip connection's
    suppression collapses clean accuracy); the message names the numbers."""
