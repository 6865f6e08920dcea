"""Reading trained work directories: checkpoint metadata, parameters, the tokenizer, a run::

    meta = read_meta("runs/demo")                   # step, rng, resolved config, tokenizer
    params = load_params("runs/demo")               # newest checkpoint, no optimizer state
    params = load_params("runs/demo", averaged=True)     # <workdir>/averaged
    tokenizer = read_tokenizer("runs/demo", meta)   # checked against the sha256 in meta
    run = read_run("runs/demo")                     # model, params, tokenizer, step, ...
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from transformer_jax.checkpoints.damage import is_corruption
from transformer_jax.checkpoints.layout import (
    AVERAGED_DIR,
    check_compatible,
    checkpoint_dir,
    one_line,
    open_manager,
)
from transformer_jax.config import ModelConfig
from transformer_jax.data.tokenizer import TOKENIZER_FILE, Tokenizer
from transformer_jax.nn import DEFAULT_MODEL_KIND, abstract_model, abstract_params
from transformer_jax.nn.adapters import merge_lora

__all__ = ["load_params", "read_meta", "read_run", "read_tokenizer"]


def _host_abstract(tree):
    """ShapeDtypeStructs on the first local device (the caller re-places the arrays)."""
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
    kind = saved.get("model_kind", DEFAULT_MODEL_KIND)
    return _restore_params(directory, meta["step"], abstract_params(kind, saved["model"]))


def _restore_params(directory: str, step: int, abstract):
    """The ``params`` item of checkpoint ``step`` in ``directory``, shaped like ``abstract``."""
    manager = open_manager(directory, create=False)
    try:
        restored = manager.restore(
            step, args=ocp.args.Composite(params=ocp.args.StandardRestore(_host_abstract(abstract)))
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


def _read_step(path: str, step: int | None) -> tuple[dict, object, object]:
    """``(meta, abstract model, params)`` of checkpoint ``step`` (default newest) in ``path``.

    The model is built abstractly once (``nn.abstract_model``) and gives the params' shapes.
    A model trained with LoRA adapters comes back with them merged into its weights (a model
    without adapters, ``nn.adapters.merge_lora``)."""
    directory = checkpoint_dir(path)
    meta = read_meta(directory, step)
    saved = meta.get("config") or {}
    if not saved.get("model"):
        raise ValueError(f"the checkpoint in {directory} has no model config in its metadata.")
    config = ModelConfig.from_dict(dict(saved["model"]))
    kind = saved.get("model_kind", DEFAULT_MODEL_KIND)
    model = abstract_model(kind, config)
    abstract = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    params = _restore_params(directory, meta["step"], abstract)
    if config.lora_rank:  # LoRA adapters folded in: a plain model, decoding at full speed
        config, params = merge_lora(config, params)
        model = abstract_model(kind, config)
    return meta, model, params


def _readable_step(workdir: str, step: int | None, averaged: bool) -> tuple[dict, object, object]:
    """``(meta, abstract model, params)`` of checkpoint ``step``, or of the newest readable
    one (see :func:`read_run`)."""
    path = os.path.join(workdir, AVERAGED_DIR) if averaged else workdir
    if step is not None:
        return _read_step(path, step)
    steps: list = []
    if os.path.isdir(checkpoint_dir(path)):
        manager = open_manager(checkpoint_dir(path), create=False)
        try:
            steps = sorted(manager.all_steps(), reverse=True)
        finally:
            manager.close()
    for number, candidate in enumerate(steps or [None]):  # None: read_meta says why
        try:
            return _read_step(path, candidate)
        except Exception as err:
            if not is_corruption(err) or number + 1 >= len(steps):
                raise
            print(f"warning: checkpoint step {candidate} in {checkpoint_dir(path)} cannot be "
                  f"read ({one_line(err)}); using step {steps[number + 1]}.",
                  file=sys.stderr, flush=True)
    raise AssertionError("unreachable: the last step's error is raised")


def read_run(workdir: str, step: int | None = None, averaged: bool = False) -> dict:
    """Model (abstract), params, tokenizer and step of a training work directory.

    ``averaged`` reads ``<workdir>/averaged``. Without ``step``, a damaged newest checkpoint
    (files missing, short or undecodable) is skipped for the newest readable one, with a
    one-line warning on stderr; any other error is raised. The model is built from the run's
    saved ``model`` config and ``model_kind``; callers use what the model answers
    (``nn.model``), never the kind itself. LoRA adapters come back merged into the weights.
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
    meta, model, params = _readable_step(workdir, step, averaged)
    saved = meta["config"]
    return {
        "model": model,
        "params": params,
        "tokenizer": read_tokenizer(workdir, meta),
        "step": int(meta["step"]),
        "data": saved.get("data") or {},
        # the beam-search length penalty the run was evaluated with (translation's default)
        "length_penalty": saved.get("eval_length_penalty"),
    }
