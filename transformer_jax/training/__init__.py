"""Training: optimizer, pure train/eval steps, data parallelism, checkpoints, main loop.

Entry points::

    from transformer_jax.training import default_config, train_and_evaluate, load_params

    config = default_config()                 # or configs/*.py get_config()
    summary = train_and_evaluate(config, "runs/demo")
    params = load_params("runs/demo")         # params of the newest checkpoint
"""

from transformer_jax.training.checkpoint import (
    Checkpointer,
    average_checkpoints,
    load_params,
    read_meta,
)
from transformer_jax.training.defaults import default_config, validate_config
from transformer_jax.training.errors import (
    CheckpointMismatchError,
    ConfigError,
    TrainingDivergedError,
)
from transformer_jax.training.optim import make_optimizer, make_schedule, paper_schedule
from transformer_jax.training.parallel import DataParallel
from transformer_jax.training.step import (
    ModelDef,
    TrainState,
    create_train_state,
    eval_step,
    split_model,
    train_step,
)


def train_and_evaluate(config, workdir: str) -> dict:
    """Train, evaluate and checkpoint into ``workdir`` (see ``training.loop``)."""
    from transformer_jax.training.loop import train_and_evaluate as run

    return run(config, workdir)


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
