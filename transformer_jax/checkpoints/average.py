"""Checkpoint averaging: the mean of the last k checkpoints' parameters, written as a
params-only checkpoint into ``<workdir>/averaged`` (the command line is
``python -m transformer_jax.training.average``)."""

from __future__ import annotations

import logging
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

log = logging.getLogger(__name__)


def _write_params(directory: str, step: int, params, meta: Mapping) -> None:
    manager = open_manager(directory, async_save=False)
    try:
        manager.save(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardSave(params), meta=ocp.args.JsonSave(dict(meta))
            ),
            force=True,
        )
        manager.wait_until_finished()
    finally:
        manager.close()


def save_params(directory: str, step: int, params, meta: Mapping) -> None:
    """Write a params-only checkpoint ``<directory>/<step>`` (replacing an existing one).

    The new checkpoint is written whole into a temporary sibling of ``directory`` first;
    only then is an existing ``<step>`` renamed aside and the new one renamed into place
    (two renames on one file system), so a failed or interrupted write leaves the previous
    checkpoint as it was.
    """
    directory = os.path.abspath(directory)
    os.makedirs(os.path.dirname(directory), exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(directory)}-", suffix=".tmp",
                               dir=os.path.dirname(directory))
    try:
        _write_params(os.path.join(staging, "new"), step, params, meta)
        os.makedirs(directory, exist_ok=True)
        target = os.path.join(directory, str(step))
        if os.path.exists(target):
            os.replace(target, os.path.join(staging, "old"))
        os.replace(os.path.join(staging, "new", str(step)), target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def average_checkpoints(workdir: str, last: int = 5) -> tuple[Any, dict]:
    """Mean of the params of the ``last`` most recent checkpoints of ``workdir``.

    Checkpoints marked ``params_only`` (weights imported before training, e.g. from Marian)
    are not training checkpoints and are never averaged in; they are listed in the meta's
    ``skipped_params_only_steps`` and logged.

    Returns:
      ``(params, meta)``: averaged params (float32 numpy arrays) and the newest checkpoint's
      meta with ``averaged_steps`` and ``skipped_params_only_steps`` added.
    """
    if last < 1:
        raise ValueError(f"--last must be >= 1; got {last}.")
    directory = checkpoint_dir(workdir)
    manager = open_manager(directory, create=False)
    steps = sorted(manager.all_steps())
    manager.close()
    skipped = [s for s in steps if read_meta(directory, s).get("params_only")]
    steps = [s for s in steps if s not in skipped]
    if skipped:
        log.warning("not averaging step(s) %s of %s: imported weights (params_only), not "
                    "training checkpoints", skipped, directory)
    if not steps:
        raise FileNotFoundError(
            f"no training checkpoints to average in {directory}"
            f"{f' (only imported params_only steps {skipped})' if skipped else ''}.")
    chosen = steps[-last:]
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
    meta["skipped_params_only_steps"] = skipped
    return averaged, meta


def average_into_workdir(workdir: str, last: int) -> tuple[str, list[int]]:
    """Average the last ``last`` training checkpoints of ``workdir`` into
    ``<workdir>/averaged``; returns ``(that directory, the averaged steps)``."""
    params, meta = average_checkpoints(workdir, last)
    out = os.path.join(os.path.abspath(workdir), AVERAGED_DIR)
    save_params(out, meta["step"], params, meta)
    return out, meta["averaged_steps"]
