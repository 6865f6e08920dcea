"""Resuming is bit-identical; load_params by step; mismatched configs; checkpoint averaging."""

import contextlib
import io
import json
import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from helpers import tiny_train_config

from transformer_jax.checkpoints import AVERAGED_DIR, average_checkpoints, load_params, save_params
from transformer_jax.errors import CheckpointMismatchError
from transformer_jax.training import train_and_evaluate
from transformer_jax.training.average import main as average_main


def _flat(tree) -> dict[str, np.ndarray]:
    """Nested params -> {"encoder/layers/0/...": array}, keys as strings."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    out = {}
    for path, leaf in leaves:
        names = [str(getattr(p, "key", getattr(p, "idx", p))) for p in path]
        out["/".join(names)] = np.asarray(leaf)
    return out


def _orbax_params(workdir, step) -> dict[str, np.ndarray]:
    """The params of one checkpoint read straight from orbax (no template, no load_params)."""
    path = os.path.join(workdir, "checkpoints", str(step), "params")
    return _flat(ocp.StandardCheckpointer().restore(path))


def _config(workdir_root, steps, **top):
    config = tiny_train_config(num_train_steps=steps, **top)
    config.data.data_dir = str(workdir_root / "shared_data")  # prepare the numbers task once
    return config


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Run A: 6 steps straight. Run B: 3 steps, then the same command with 6 (resumes)."""
    root = tmp_path_factory.mktemp("resume")
    straight, resumed = str(root / "straight"), str(root / "resumed")
    train_and_evaluate(_config(root, 6), straight)
    first = train_and_evaluate(_config(root, 3), resumed)
    with contextlib.redirect_stdout(io.StringIO()) as out:
        second = train_and_evaluate(_config(root, 6), resumed)
    return {"root": root, "straight": straight, "resumed": resumed,
            "first": first, "second": second, "second_stdout": out.getvalue()}


def test_resume_is_bit_identical(runs):
    assert runs["first"]["step"] == 3 and runs["second"]["step"] == 6
    assert "resuming from step 3" in runs["second_stdout"]  # not started over
    straight = _flat(load_params(runs["straight"]))
    resumed = _flat(load_params(runs["resumed"]))
    assert straight.keys() == resumed.keys()
    for name in straight:
        assert np.array_equal(straight[name], resumed[name]), name
    # Training moved the parameters between step 3 and step 6 (with dropout on).
    at3 = _orbax_params(runs["straight"], 3)
    assert any(not np.array_equal(at3[k], straight[k]) for k in straight)
    # The training losses logged after the restart are those of the straight run.
    a, b = _train_losses(runs["straight"]), _train_losses(runs["resumed"])
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
    assert a == b


def _train_losses(workdir) -> dict[int, float]:
    with open(os.path.join(workdir, "history.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {r["step"]: r["loss"] for r in rows if r["split"] == "train"}


def test_load_params_latest_and_by_step(runs):
    workdir = runs["straight"]
    latest = _flat(load_params(workdir))
    assert latest.keys() == _orbax_params(workdir, 6).keys()
    for name, value in _orbax_params(workdir, 6).items():
        assert np.array_equal(latest[name], value), name
    at2 = _flat(load_params(workdir, step=2))
    for name, value in _orbax_params(workdir, 2).items():
        assert np.array_equal(at2[name], value), name
    assert any(not np.array_equal(at2[k], latest[k]) for k in latest)
    with pytest.raises(FileNotFoundError, match=r"step 99 .*steps present: \[1, 2, 3, 4, 5, 6\]"):
        load_params(workdir, step=99)


def test_checkpoint_of_another_model_fails_clearly(runs):
    workdir = runs["straight"]
    config_file = os.path.join(workdir, "config.json")
    with open(config_file) as f:
        before = f.read()
    wider = _config(runs["root"], 8)
    wider.model.d_model = 64
    with pytest.raises(CheckpointMismatchError, match=(
            r"checkpoint in .*straight was written for d_model=32 but the config asks for "
            r"d_model=64; use a fresh --workdir or the matching config\.")):
        train_and_evaluate(wider, workdir)
    with open(config_file) as f:
        assert f.read() == before  # nothing rewritten
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == [str(s) for s in range(1, 7)]
    saved = json.loads(before)["model"]
    with pytest.raises(CheckpointMismatchError, match="num_heads=2 but the config asks for "
                                                      "num_heads=4"):
        load_params(workdir, model_config={**saved, "num_heads": 4})


def test_average_of_last_checkpoints_is_their_mean(runs):
    workdir = runs["straight"]
    params, meta = average_checkpoints(workdir, last=3)
    assert meta["averaged_steps"] == [4, 5, 6]
    saved = [_orbax_params(workdir, s) for s in (4, 5, 6)]
    expected = {
        name: np.mean(np.stack([p[name] for p in saved]), axis=0,
                      dtype=np.float64).astype(np.float32)
        for name in saved[-1]
    }
    got = _flat(params)
    assert got.keys() == expected.keys()
    for name in expected:
        assert got[name].dtype == np.float32
        np.testing.assert_allclose(got[name], expected[name], rtol=1e-6, atol=1e-9)
    # The command writes the same average where load_params(averaged=True) finds it.
    assert average_main(["--workdir", workdir, "--last", "3"]) == 0
    written = _flat(load_params(workdir, averaged=True))
    for name in expected:
        assert np.array_equal(written[name], got[name]), name
    differs = any(not np.allclose(expected[k], saved[-1][k]) for k in expected)
    assert differs  # averaging several distinct checkpoints is not the newest one


def test_average_leaves_out_params_only_steps(runs, tmp_path):
    """The imported start of a fine-tuning run (params_only) is not mixed into the mean."""
    workdir = str(tmp_path / "run")
    shutil.copytree(runs["straight"], workdir)
    meta_file = os.path.join(workdir, "checkpoints", "5", "meta", "metadata")
    with open(meta_file) as f:
        meta = json.load(f)
    meta["params_only"] = True
    with open(meta_file, "w") as f:
        json.dump(meta, f)
    _, meta = average_checkpoints(workdir, last=3)
    assert meta["averaged_steps"] == [3, 4, 6]


def test_a_failed_save_keeps_the_previous_averaged_checkpoint(runs, tmp_path, monkeypatch):
    workdir = str(tmp_path / "run")
    shutil.copytree(runs["straight"], workdir)
    assert average_main(["--workdir", workdir, "--last", "2"]) == 0
    before = _flat(load_params(workdir, averaged=True))
    params, meta = average_checkpoints(workdir, last=3)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ocp.CheckpointManager, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        save_params(os.path.join(workdir, AVERAGED_DIR), meta["step"], params, meta)
    after = _flat(load_params(workdir, averaged=True))
    assert after.keys() == before.keys()
    assert all(np.array_equal(after[k], before[k]) for k in before)
    assert set(os.listdir(workdir)) == {*os.listdir(runs["straight"]), AVERAGED_DIR}  # no temp
