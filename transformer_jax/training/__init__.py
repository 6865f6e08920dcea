"""Training: optimizer, pure train/eval steps, data parallelism, checkpoints, main loop.

Entry points::

    from transformer_jax.training import default_config, train_and_evaluate

    config = default_config()                 # or configs/*.py get_config()
    summary = train_and_evaluate(config, "runs/demo")

Reading a finished run is ``transformer_jax.inference.load("runs/demo")`` (or the lower level
``transformer_jax.checkpoints.load_params``; re-exported here with ``read_meta``).
"""

from transformer_jax.checkpoints import load_params, read_meta
from transformer_jax.errors import CheckpointMismatchError, ConfigError, TrainingDivergedError
from transformer_jax.nn import ModelDef, split_model
from transformer_jax.training.checkpoint import Checkpointer, average_checkpoints
from transformer_jax.training.defaults import default_config, validate_config
from transformer_jax.training.loop import train_and_evaluate
from transformer_jax.training.optim import make_optimizer, make_schedule, paper_schedule
from transformer_jax.training.parallel import DataParallel
from transformer_jax.training.step import TrainState, create_train_state, eval_step, train_step

__all__ = [
    "CheckpointMismatchError",
    "Checkpointer",
    "ConfigError",
    "DataParallel",
    "ModelDef",
    "TrainState",
    "TrainingDivergedError",
    "average_checkpoints",
    "create_train_state",
    "default_config",
    "eval_step",
    "load_params",
    "make_optimizer",
    "make_schedule",
    "paper_schedule",
    "read_meta",
    "split_model",
    "train_and_evaluate",
    "train_step",
    "validate_config",
]
