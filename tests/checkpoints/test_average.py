"""Checkpoint averaging: imported (params_only) weights are never averaged in; a new average
replaces the old one only once it is written."""

import logging
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from transformer_jax.checkpoints import (
    AVERAGED_DIR,
    CHECKPOINT_DIR,
    average_checkpoints,
    load_params,
    save_params,
)
from transformer_jax.config import ModelConfig
from transformer_jax.nn import DEFAULT_MODEL_KIND, abstract_params
from transformer_jax.training.average import main as average_main

MODEL = ModelConfig.tiny(vocab_size=16, d_model=8, num_heads=2, num_layers=1, d_ff=16,
                         max_len=8).to_dict()

pytestmark = pytest.mark.faults


def _params(value: float):
    shapes = abstract_params(DEFAULT_MODEL_KIND, MODEL)
    return jax.tree_util.tree_map(lambda s: np.full(s.shape, value, s.dtype), shapes)


def _meta(step: int, **extra) -> dict:
    return {"step": step, "config": {"model": MODEL, "model_kind": DEFAULT_MODEL_KIND},
            **extra}


def _values(params) -> set[float]:
    return {float(v) for x in jax.tree_util.tree_leaves(params) for v in np.unique(x)}


@pytest.fixture
def fine_tune_workdir(tmp_path):
    """Imported weights at step 0 (params_only, all 100.0), fine-tuned steps 1 and 2."""
    directory = str(tmp_path / CHECKPOINT_DIR)
    save_params(directory, 0, _params(100.0), _meta(0, params_only=True))
    for step in (1, 2):
        save_params(directory, step, _params(float(step)), _meta(step))
    return str(tmp_path)


def test_params_only_steps_are_not_averaged(fine_tune_workdir, caplog):
    with caplog.at_level(logging.WARNING):
        params, meta = average_checkpoints(fine_tune_workdir, last=3)
    assert meta["averaged_steps"] == [1, 2] and meta["skipped_params_only_steps"] == [0]
    assert _values(params) == {1.5}  # the mean of 1 and 2; 100 would pull it to 34.33
    assert "not averaging step(s) [0]" in caplog.text and "params_only" in caplog.text


def test_only_params_only_steps_is_one_line_exit_2(tmp_path, capsys):
    save_params(str(tmp_path / CHECKPOINT_DIR), 0, _params(1.0), _meta(0, params_only=True))
    assert average_main(["--workdir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "only imported params_only steps [0]" in err


def test_a_failed_write_leaves_the_previous_average(fine_tune_workdir, monkeypatch):
    out = f"{fine_tune_workdir}/{AVERAGED_DIR}"
    save_params(out, 2, _params(1.0), _meta(2))
    real_save = ocp.CheckpointManager.save

    def fail_midway(self, *args, **kwargs):
        real_save(self, *args, **kwargs)  # some files are written, then the disk fills up
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ocp.CheckpointManager, "save", fail_midway)
    with pytest.raises(OSError, match="No space left"):
        save_params(out, 2, _params(7.0), _meta(2))
    monkeypatch.undo()
    assert _values(load_params(fine_tune_workdir, averaged=True)) == {1.0}
    assert sorted(os.listdir(fine_tune_workdir)) == [AVERAGED_DIR, CHECKPOINT_DIR]  # no leftovers
    save_params(out, 2, _params(7.0), _meta(2))  # a write that completes replaces it
    assert _values(load_params(fine_tune_workdir, averaged=True)) == {7.0}
    assert os.listdir(out) == ["2"]
