"""Checkpoints of a work directory, read and written in one place.

* ``layout``: where things live, the config checks shared by reading and writing;
* ``read``: ``read_meta``, ``load_params``, ``read_tokenizer``, ``read_run`` (what inference
  and the command lines use);
* ``damage``: ``is_corruption`` (damaged files, told apart from other read errors);
* ``manager``: ``Checkpointer`` (save, restore, resume from the newest readable checkpoint);
* ``average``: checkpoint averaging;
* ``adapters``: LoRA adapters saved alone with the sha256 of their base.
"""

from transformer_jax.checkpoints.adapters import load_adapters, save_adapters
from transformer_jax.checkpoints.average import (
    average_checkpoints,
    average_into_workdir,
    save_params,
)
from transformer_jax.checkpoints.damage import CorruptCheckpointError, is_corruption
from transformer_jax.checkpoints.layout import (
    ARCHITECTURE_KEYS,
    AVERAGED_DIR,
    CHECKPOINT_DIR,
    CORRUPT_DIR,
    OPTIMIZER_KEYS,
    check_compatible,
    checkpoint_dir,
)
from transformer_jax.checkpoints.manager import Checkpointer
from transformer_jax.checkpoints.read import load_params, read_meta, read_run, read_tokenizer

__all__ = [
    "ARCHITECTURE_KEYS",
    "AVERAGED_DIR",
    "CHECKPOINT_DIR",
    "CORRUPT_DIR",
    "OPTIMIZER_KEYS",
    "Checkpointer",
    "CorruptCheckpointError",
    "average_checkpoints",
    "average_into_workdir",
    "check_compatible",
    "checkpoint_dir",
    "is_corruption",
    "load_params",
    "read_meta",
    "read_run",
    "read_tokenizer",
    "load_adapters",
    "save_adapters",
    "save_params",
]
