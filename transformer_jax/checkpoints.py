"""Reading trained work directories: checkpoint metadata, parameters, the tokenizer.

This module sits below both training and inference: ``training.checkpoint`` writes what is
read here (see its docstring for the layout), and ``inference`` loads models with it::

    meta = read_meta("runs/demo")                   # step, rng, resolved config, tokenizer
    params = load_params("runs/demo")               # newest checkpoint, no optimizer state
    params = load_params("runs/demo", averaged=True)     # <workdir>/averaged
    tokenizer = read_tokenizer("runs/demo", meta)   # checked against the sha256 in meta
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from transformer_jax.config import ModelConfig
from transformer_jax.data.pipeline import TOKENIZER_FILE
from transformer_jax.data.tokenizer import Tokenizer
from transformer_jax.errors import CheckpointMismatchError
from transformer_jax.nn.build import abstract_params, build_model

__all__ = [
    "read_run",
    "ARCHITECTURE_KEYS",
    "AVERAGED_DIR",
    "CHECKPOINT_DIR",
    "OPTIMIZER_KEYS",
    "check_compatible",
    "checkpoint_dir",
    "host_abstract",
    "load_params",
    "one_line",
    "open_manager",
    "read_meta",
    "read_tokenizer",
]

CHECKPOINT_DIR = "checkpoints"
AVERAGED_DIR = "averaged"

# Model fields that change parameter shapes or their meaning.
ARCHITECTURE_KEYS = (
    "vocab_size", "d_model", "num_heads", "num_layers", "num_encoder_layers",
    "num_decoder_layers", "d_ff", "max_len", "positional", "pre_norm", "share_embeddings",
    "tie_output", "use_bias", "param_dtype", "activation", "scale_embedding",
    "final_logits_bias", "num_decoder_heads", "decoder_d_ff",
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


def host_abstract(tree):
    """ShapeDtypeStructs on the first local device (the parallel layer re-places them)."""
    sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding), tree
    )


def read_meta(path: str, step: int | None = None) -> dict:
    """The ``meta`` JSON (step, rng, config, tokenizer) of a checkpoint directory/workdir."""
    directory = checkpoint_dir(path)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"no checkpoint directory at {directory}.")
    manager = open_manager(directory, create=False)
    try:
        step = manager.latest_step() if step is None else step
        if step is None or step not in manager.all_steps():
            have = sorted(manager.all_steps())
            raise FileNotFoundError(
                f"no checkpoint {'' if step is None else f'for step {step} '}in {directory}"
                f" (steps present: {have or 'none'})."
            )
        return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))[
            "meta"
        ]
    finally:
        manager.close()


def load_params(workdir: str, step: int | None = None, *, model_config: Mapping | None = None,
                averaged: bool = False):
    """Parameters of a checkpoint, without optimizer state.

    Args:
      workdir: a training work directory, or a checkpoint directory such as
        ``<workdir>/averaged``.
      step: checkpoint step (default: latest).
      model_config: optional model config dict of the caller; a different architecture raises
        :class:`CheckpointMismatchError`.
      averaged: read ``<workdir>/averaged`` (written by ``python -m
        transformer_jax.training.average``) instead of the training checkpoints.

    Returns:
      Nested dict of arrays with the structure of ``nnx.to_pure_dict(nnx.state(model,
      nnx.Param))`` for the saved model config.
    """
    path = os.path.join(workdir, AVERAGED_DIR) if averaged else workdir
    directory = checkpoint_dir(path)
    meta = read_meta(directory, step)
    saved = meta.get("config", {})
    if model_config is not None:
        check_compatible(saved, {"model": dict(model_config)}, os.path.abspath(workdir))
    if "model" not in saved:
        raise ValueError(f"checkpoint in {directory} has no model config in its metadata.")
    kind = saved.get("model_kind", "encoder_decoder")
    abstract = host_abstract(abstract_params(kind, saved["model"]))
    manager = open_manager(directory, create=False)
    try:
        restored = manager.restore(
            meta["step"], args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract))
        )
    finally:
        manager.close()
    return restored["params"]


def read_tokenizer(workdir: str, meta: Mapping) -> Tokenizer:
    """The workdir's SentencePiece model (or the one the checkpoint names), checked by hash."""
    ref = meta.get("tokenizer") or {}
    path = os.path.join(workdir, TOKENIZER_FILE)
    if not os.path.isfile(path) and ref.get("path"):
        path = ref["path"]
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"no tokenizer model at {os.path.join(workdir, TOKENIZER_FILE)}; the work directory "
            "must hold the tokenizer/spm.model written by training."
        )
    with open(path, "rb") as f:
        proto = f.read()
    if ref.get("sha256") and hashlib.sha256(proto).hexdigest() != ref["sha256"]:
        raise ValueError(
            f"the tokenizer at {path} is not the one this checkpoint was trained with (sha256 "
            "differs); restore the run's original tokenizer/spm.model."
        )
    return Tokenizer(proto)


def read_run(workdir: str, step: int | None, averaged: bool, want_kind: str | None) -> dict:
    """Model (abstract), params, tokenizer and step of a training work directory.

    ``want_kind`` (``"encoder_decoder"`` / ``"decoder_only"``, None: either) is checked against
    the run's ``model_kind``; ``averaged`` reads ``<workdir>/averaged``.
    """
    workdir = os.path.abspath(workdir)
    if not os.path.isdir(workdir):
        raise FileNotFoundError(
            f"no work directory at {workdir}; pass the --workdir of a training run."
        )
    if averaged and not os.path.isdir(os.path.join(workdir, AVERAGED_DIR)):
        raise FileNotFoundError(
            f"no averaged checkpoint in {workdir}; write one with python -m "
            f"transformer_jax.training.average --workdir {workdir}"
        )
    meta = read_meta(os.path.join(workdir, AVERAGED_DIR) if averaged else workdir, step)
    saved = meta.get("config") or {}
    if not saved.get("model"):
        raise ValueError(f"the checkpoint in {workdir} has no model config in its metadata.")
    kind = saved.get("model_kind", "encoder_decoder")
    if want_kind is not None and kind != want_kind:
        raise ValueError(
            f"the run in {workdir} trained a {kind} model, not {want_kind}; load it with "
            "transformer_jax.inference.load."
        )
    config = ModelConfig.from_dict(dict(saved["model"]))
    return {
        "kind": kind,
        "model": nnx.eval_shape(lambda: build_model(kind, config, nnx.Rngs(0))),
        "params": load_params(workdir, meta["step"], averaged=averaged),
        "tokenizer": read_tokenizer(workdir, meta),
        "step": int(meta["step"]),
        "data": saved.get("data") or {},
        # the beam-search length penalty the run was evaluated with (translation's default)
        "length_penalty": saved.get("eval_length_penalty"),
    }
