"""Elastic resume through train.py: a run checkpointed on 2 devices continues on 4
(shard_map) and ends where the uninterrupted 2-device run ends (the global batches do not
depend on the device or process count; the data-level tests cover process layouts)."""

import os
import shutil

import jax
import numpy as np
from helpers import final_params, run_train

STOP, STEPS = 3, 6
# Dropout off: its masks are still drawn per device, which is not what this test is about.
SETTINGS = dict(parallelism="shard_map", num_train_steps=STEPS, model__dropout_rate=0.0,
                checkpoint_every_steps=STOP)


def test_two_devices_then_four_match_two_throughout(data_dir, tmp_path):
    reference = str(tmp_path / "reference")
    done = run_train(reference, data_dir, devices=2, **SETTINGS)
    assert done.returncode == 0, done.stderr[-3000:]

    workdir = str(tmp_path / "elastic")  # as if the 2-device run had stopped after STOP
    shutil.copytree(reference, workdir)
    shutil.rmtree(os.path.join(workdir, "checkpoints", str(STEPS)))
    resumed = run_train(workdir, data_dir, devices=4, **SETTINGS)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from step {STOP}" in resumed.stdout

    want, got = final_params(reference), final_params(workdir)
    at_stop = final_params(reference, STOP)
    pairs = zip(jax.tree_util.tree_leaves_with_path(want), jax.tree_util.tree_leaves(got),
                jax.tree_util.tree_leaves(at_stop), strict=True)
    moved = 0.0
    for (path, x), y, before in pairs:
        np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-6, err_msg=jax.tree_util.keystr(path))
        moved = max(moved, float(np.abs(x - before).max()))
    assert moved > 1e-3  # the steps after the resume changed the parameters
