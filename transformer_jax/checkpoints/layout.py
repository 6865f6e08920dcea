"""The layout of a work directory's checkpoints, and the checks shared by reading and writing.

  <workdir>/checkpoints/<step>/params      parameter pytree (orbax StandardSave, tensorstore)
                              /opt_state   optimizer state pytree
                              /meta        JSON: step, raw RNG key data, resolved config,
                                           tokenizer reference (path + sha256), the
                                           trainer's extra keys (fitted_num_train_steps)
                              /data        JSON: state of the training data iterator
  <workdir>/averaged/<step>/params, meta   params-only checkpoint (``checkpoints.average``)
  <workdir>/corrupt_checkpoints/<step>     damaged checkpoints set aside on resume

Nothing is pickled: arrays go to tensorstore, everything else to JSON.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import orbax.checkpoint as ocp

from transformer_jax.errors import CheckpointMismatchError

__all__ = [
    "ARCHITECTURE_KEYS",
    "AVERAGED_DIR",
    "CHECKPOINT_DIR",
    "CORRUPT_DIR",
    "INCOMPLETE_MARK",
    "OPTIMIZER_KEYS",
    "check_compatible",
    "checkpoint_dir",
    "one_line",
    "open_manager",
]

CHECKPOINT_DIR = "checkpoints"
AVERAGED_DIR = "averaged"
CORRUPT_DIR = "corrupt_checkpoints"
INCOMPLETE_MARK = ".orbax-checkpoint-tmp"  # orbax's name for a save still in progress

# Model fields that change parameter shapes or their meaning.
ARCHITECTURE_KEYS = (
    "vocab_size", "d_model", "num_heads", "num_layers", "num_encoder_layers",
    "num_decoder_layers", "d_ff", "max_len", "positional", "pre_norm", "share_embeddings",
    "tie_output", "use_bias", "param_dtype", "activation", "scale_embedding",
    "final_logits_bias", "num_decoder_heads", "decoder_d_ff", "num_kv_heads",
    "relative_num_buckets",
)
# Optimizer fields that change the optimizer-state structure.
OPTIMIZER_KEYS = ("name", "grad_accum_steps")


def one_line(err: Exception, limit: int = 160) -> str:
    """An exception's text on one line, cut to ``limit`` characters."""
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------- compatibility
def _resolved_model(model: Mapping) -> dict:
    model = dict(model)
    for side in ("num_encoder_layers", "num_decoder_layers"):
        if model.get(side) is None:
            model[side] = model.get("num_layers")
    if model.get("num_kv_heads") is None:
        model["num_kv_heads"] = model.get("num_heads")
    return model


def check_compatible(saved: Mapping, wanted: Mapping, where: str, *,
                     fix: str = "use a fresh --workdir or the matching config") -> None:
    """Raise :class:`CheckpointMismatchError` naming the first field that differs.

    Args:
      saved: resolved config dict stored with the checkpoint (``model`` / ``optimizer``).
      wanted: the config dict of this run.
      where: checkpoint directory, for the message.
      fix: what the message tells the user to do.
    """
    pairs = [("model", k, _resolved_model) for k in ARCHITECTURE_KEYS]
    pairs += [("optimizer", k, dict) for k in OPTIMIZER_KEYS]
    for section, key, norm in pairs:
        if section not in saved or section not in wanted:
            continue
        old, new = norm(saved[section]).get(key), norm(wanted[section]).get(key)
        if old is not None and new is not None and old != new:
            name = key if section == "model" else f"{section}.{key}"
            raise CheckpointMismatchError(
                f"checkpoint in {where} was written for {name}={old} but the config asks for "
                f"{name}={new}; {fix}."
            )


# --------------------------------------------------------------------------- orbax access
def checkpoint_dir(path: str) -> str:
    """``<workdir>/checkpoints`` when it exists, else ``path`` itself (e.g. ``averaged``)."""
    path = os.path.abspath(os.fspath(path))
    nested = os.path.join(path, CHECKPOINT_DIR)
    return nested if os.path.isdir(nested) else path


def open_manager(directory: str, *, keep: int | None = None, async_save: bool = True,
                 create: bool = True) -> ocp.CheckpointManager:
    """An orbax ``CheckpointManager`` over ``directory`` (close it after use)."""
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        create=create,
        enable_async_checkpointing=async_save,
    )
    return ocp.CheckpointManager(directory, options=options)
