"""The training exceptions, defined in :mod:`transformer_jax.errors` (kept for old imports)."""

from transformer_jax.errors import (
    CheckpointMismatchError,
    ConfigError,
    TrainingDivergedError,
    WorkdirError,
)

__all__ = ["CheckpointMismatchError", "ConfigError", "TrainingDivergedError", "WorkdirError"]
