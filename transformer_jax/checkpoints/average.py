"""Checkpoint averaging: the mean of the last k checkpoints' parameters, written as a
params-only checkpoint into ``<workdir>/averaged`` (the command line is
``python -m transformer_jax.training.average``)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from transformer_jax.checkpoints.layout import AVERAGED_DIR, checkpoint_dir, open_manager
from transformer_jax.checkpoints.read import load_params, read_meta

__all__ = ["average_checkpoints", "average_into_workdir", "save_params"]


def save_params(directory: str, step: int, params, meta: Mapping) -> None:
    """Write a params-only checkpoint as the only one in ``directory`` (replacing what was
    there): written whole into a new sibling directory first, then swapped in by renames, so
    a crash at any point leaves the previous checkpoint or the new one complete on disk
    (the previous one, in the middle of the swap, under ``<directory>.previous-*``)."""
    directory = os.path.abspath(directory)
    parent, name = os.path.split(directory)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent)
    try:
        manager = open_manager(tmp, async_save=False)
        try:
            manager.save(step, args=ocp.args.Composite(
                params=ocp.args.StandardSave(params), meta=ocp.args.JsonSave(dict(meta))),
                force=True)
            manager.wait_until_finished()
        finally:
            manager.close()
        old = None
        if os.path.exists(directory):
            old = tempfile.mkdtemp(prefix=f"{name}.previous-", dir=parent)
            os.replace(directory, old)  # onto the empty directory just made
        os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def average_checkpoints(workdir: str, last: int = 5) -> tuple[Any, dict]:
    """Mean of the params of the ``last`` most recent trained checkpoints of ``workdir``
    (params-only ones, the imported start of a fine-tuning run, are left out).

    Returns:
      ``(params, meta)``: averaged params (float32 numpy arrays) and the newest checkpoint's
      meta with ``averaged_steps`` added.
    """
    if last < 1:
        raise ValueError(f"--last must be >= 1; got {last}.")
    directory = checkpoint_dir(workdir)
    manager = open_manager(directory, create=False)
    steps = sorted(manager.all_steps())
    manager.close()
    if not steps:
        raise FileNotFoundError(f"no checkpoints to average in {directory}.")
    # a params_only step holds imported weights (a fine-tuning run's start), not this run's
    trained = [step for step in steps if not read_meta(directory, step).get("params_only")]
    if not trained:
        raise FileNotFoundError(f"no trained checkpoints to average in {directory} (only "
                                "imported, params-only ones).")
    chosen = trained[-last:]
    total = dtypes = None
    for step in chosen:
        params = jax.device_get(load_params(directory, step))
        if dtypes is None:
            dtypes = jax.tree_util.tree_map(lambda x: np.asarray(x).dtype, params)
        params = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), params)
        total = params if total is None else jax.tree_util.tree_map(np.add, total, params)
    averaged = jax.tree_util.tree_map(lambda s, dt: (s / len(chosen)).astype(dt), total, dtypes)
    meta = read_meta(directory, chosen[-1])
    meta["averaged_steps"] = chosen
    return averaged, meta


def average_into_workdir(workdir: str, last: int) -> tuple[str, list[int]]:
    """Average the last ``last`` checkpoints of ``workdir`` into ``<workdir>/averaged``;
    returns ``(that directory, the averaged steps)``."""
    params, meta = average_checkpoints(workdir, last)
    out = os.path.join(os.path.abspath(workdir), AVERAGED_DIR)
    save_params(out, meta["step"], params, meta)
    return out, meta["averaged_steps"]
