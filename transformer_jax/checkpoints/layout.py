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

import json
import os
import re
from collections.abc import Mapping

import orbax.checkpoint as ocp

from transformer_jax.errors import CheckpointMismatchError

__all__ = [
    "CorruptCheckpointError",
    "is_corruption",
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
    "final_logits_bias", "num_decoder_heads", "decoder_d_ff",
)
# Optimizer fields that change the optimizer-state structure.
OPTIMIZER_KEYS = ("name", "grad_accum_steps")


class CorruptCheckpointError(ValueError):
    """A checkpoint's files are missing, short or cannot be decoded."""


# tensorstore's status codes of files that are missing or short; any other status
# (UNAVAILABLE, DEADLINE_EXCEEDED, PERMISSION_DENIED, INTERNAL, ...) is not damage
_DAMAGE_STATUSES = ("DATA_LOSS", "NOT_FOUND", "OUT_OF_RANGE")
_OTHER_STATUS = re.compile(r"^[A-Z][A-Z_]+:")
# what decoders say about bytes that cannot be decoded (read with the paths taken out)
_DECODE_MARKS = ("Truncated", "truncated", "Error decoding", "corrupt", "checksum")
# quoted strings, URLs and anything with a path separator: names, never a diagnosis
_PATHS = re.compile(r"\"[^\"]*\"|'[^']*'|\S*[/\\]\S*")


def _damage_in_text(message: str) -> bool:
    status = message.split(":", 1)[0] if _OTHER_STATUS.match(message) else None
    if status in _DAMAGE_STATUSES:
        return True
    if status not in (None, "FAILED_PRECONDITION", "INVALID_ARGUMENT", "UNKNOWN"):
        return False  # a transient or permission status, whatever the text says
    return any(mark in _PATHS.sub(" ", message) for mark in _DECODE_MARKS)


def is_corruption(err: BaseException | None) -> bool:
    """Missing, short or undecodable files (not: memory, permissions, other I/O errors).

    Classified by the error's type and tensorstore's status code, and by a decoder's words
    with every path and quoted name taken out, so that a transient error under a directory
    called, say, ``truncated`` is not taken for damage. Follows the chain of causes: orbax
    re-raises tensorstore's ``ValueError`` as a plain ``Exception`` while handling it.
    """
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, CorruptCheckpointError | FileNotFoundError | NotADirectoryError
                      | json.JSONDecodeError | UnicodeDecodeError):
            return True
        if isinstance(err, ValueError) and _damage_in_text(" ".join(str(err).split())):
            return True
        err = err.__cause__ or err.__context__
    return False


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
    return model


def check_compatible(saved: Mapping, wanted: Mapping, where: str) -> None:
    """Raise :class:`CheckpointMismatchError` naming the first field that differs.

    Args:
      saved: resolved config dict stored with the checkpoint (``model`` / ``optimizer``).
      wanted: the config dict of this run.
      where: checkpoint directory, for the message.
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
                f"{name}={new}; use a fresh --workdir or the matching config."
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
