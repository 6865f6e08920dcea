"""A diverging run stops with a clear message and a non-zero exit; the checkpoint written
before the loss became NaN stays intact and loads with ``load_params``."""

import os

import jax
import numpy as np
from helpers import checkpoint_entries, final_params, run_train


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, data_dir):
    workdir = str(tmp_path / "run")
    # Adam moves every weight by ~1e30 in the first update: the second loss is NaN.
    proc = run_train(workdir, data_dir, checkpoint_every_steps=1, optimizer__schedule="constant",
                     optimizer__learning_rate=1e30, optimizer__clip_norm=0.0)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    ckpt = os.path.join(workdir, "checkpoints")
    assert errors == [
        f"error: training diverged: the loss (nan) is not finite at step 2; the last good "
        f"checkpoint is step 1 in {ckpt}. Lower optimizer.learning_rate (or raise "
        "optimizer.warmup_steps / set optimizer.clip_norm) and run again; it resumes from that "
        "checkpoint."
    ], proc.stderr
    assert proc.stderr.rstrip().endswith(errors[0])  # the last thing on stderr
    assert checkpoint_entries(workdir) == ["1"]  # no temporary directory, no step 2
    params = final_params(workdir)
    leaves = [np.asarray(x) for x in jax.tree_util.tree_leaves(params)]
    assert leaves and all(np.isfinite(x).all() for x in leaves)
    assert max(float(np.abs(x).max()) for x in leaves) > 1e20  # it is the step-1 update
