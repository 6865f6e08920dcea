"""Exceptions for problems the user can fix; the command lines print them as one line.

They live at the bottom of the package (no imports) so that every layer, from checkpoint
reading to the training loop, raises the same types.
"""

from __future__ import annotations

__all__ = [
    "CheckpointMismatchError",
    "CheckpointReadError",
    "ConfigError",
    "DistributedError",
    "ProcessFailedError",
    "TrainingDivergedError",
    "WorkdirError",
]


class ConfigError(ValueError):
    """The training config has an unknown key or an invalid value."""


class CheckpointMismatchError(ValueError):
    """A checkpoint was written for a different model/optimizer than the config asks for."""


class CheckpointReadError(RuntimeError):
    """A checkpoint could not be read for a reason other than damage (left in place)."""


class DistributedError(RuntimeError):
    """Another process failed, or did not arrive in time, at a point where all must agree."""


class ProcessFailedError(DistributedError):
    """Another process of the job failed (unreadable data, a failed write) and every process
    stopped with it; the message names that process and its error."""


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class WorkdirError(ValueError):
    """The work directory cannot be created or written (read-only, not a directory, full)."""
