"""Exceptions for problems the user can fix; the command line prints them as one line."""

from __future__ import annotations

__all__ = ["CheckpointMismatchError", "ConfigError", "TrainingDivergedError"]


class ConfigError(ValueError):
    """The training config has an unknown key or an invalid value."""


class CheckpointMismatchError(ValueError):
    """A checkpoint was written for a different model/optimizer than the config asks for."""


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""
