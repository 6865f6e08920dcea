"""LoRA fine-tuning from a trained work directory of this library (``init_from``), through
train.py: the trained weights stay bit for bit, the adapters learn, the new run has the trained
run's tokenizer, translate decodes with the adapters merged in, a rerun resumes, and a bad
starting point is one line with exit code 2 before anything is written."""

import importlib.util
import json
import os
import sys

import jax
import numpy as np
import pytest
from helpers import (
    REPO,
    RUN_STEPS,
    TRAIN,
    assert_bit_identical,
    error_line,
    final_params,
    run,
)

from transformer_jax import translate
from transformer_jax.checkpoints import read_run
from transformer_jax.config import ModelConfig
from transformer_jax.data.tokenizer import TOKENIZER_FILE
from transformer_jax.errors import CheckpointMismatchError, WorkdirError
from transformer_jax.nn.adapters import adapter_params, base_params, base_sha256
from transformer_jax.param_count import count_params
from transformer_jax.training import train_and_evaluate
from transformer_jax.training.init_from import INIT_FROM_FILE
from transformer_jax.training.workdir import file_sha256

LORA_CONFIG = os.path.join(REPO, "configs", "finetune_lora.py")
STEPS = 4
OVERRIDES = {"num_train_steps": STEPS, "checkpoint_every_steps": 2, "log_every_steps": 2,
             "keep_checkpoints": 5}


def _config(base: str, **overrides):
    """configs/finetune_lora.py:BASE with the test's overrides (in-process runs)."""
    spec = importlib.util.spec_from_file_location("finetune_lora", LORA_CONFIG)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config(base)
    for key, value in {**OVERRIDES, "model.lora_rank": 4, **overrides}.items():
        section, _, name = key.rpartition(".")
        (c[section] if section else c)[name] = value
    return c


@pytest.fixture(scope="module")
def lora_run(reference, tmp_path_factory):
    """``(trained workdir, its params, LoRA workdir)``: STEPS adapter updates from it."""
    base, params = reference
    new = str(tmp_path_factory.mktemp("lora") / "run")
    flags = [f"--config.{k}={v}" for k, v in OVERRIDES.items()]
    proc = run([sys.executable, TRAIN, f"--config={LORA_CONFIG}:{base}", f"--workdir={new}",
                "--config.model.lora_rank=4", *flags])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return base, params, new


def _b_leaves(params) -> list:
    return [np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(adapter_params(params))
            if jax.tree_util.keystr(p).endswith("['b']")]


def _flat(params) -> dict:
    return {jax.tree_util.keystr(p): np.asarray(x)
            for p, x in jax.tree_util.tree_leaves_with_path(params)}


def test_lora_from_a_trained_workdir_trains_only_the_adapters(lora_run):
    base, trained, new = lora_run
    after = final_params(new, STEPS)
    assert_bit_identical(base_params(after), trained, "the trained weights must stay")
    b = _b_leaves(after)
    assert b and all(np.abs(x).max() > 0 for x in b)  # every adapter moved from b = 0
    assert file_sha256(os.path.join(new, TOKENIZER_FILE)) == file_sha256(
        os.path.join(base, TOKENIZER_FILE))
    with open(os.path.join(new, INIT_FROM_FILE), encoding="utf-8") as f:
        record = json.load(f)
    assert record["workdir"] == os.path.abspath(base) and record["step"] == RUN_STEPS
    assert record["base_sha256"] == base_sha256(after)  # what save_adapters records
    with open(os.path.join(new, "summary.json"), encoding="utf-8") as f:
        counts = json.load(f)["params"]
    with open(os.path.join(new, "config.json"), encoding="utf-8") as f:
        model = ModelConfig.from_dict(json.load(f)["model"])
    assert counts == {"total": count_params(model),
                      "trainable": count_params(model, trainable=True)}
    assert counts["trainable"] == sum(x.size for x in b) * 2  # a [D, r] and b [r, D] alike


def test_translate_decodes_with_the_adapters_merged(lora_run, tmp_path, capfd):
    base, trained, new = lora_run
    loaded = read_run(new, STEPS)
    assert not adapter_params(loaded["params"])  # a plain model: the adapters folded in
    merged, before = _flat(loaded["params"]), _flat(trained)
    assert merged.keys() == before.keys()
    changed = [k for k in merged if not np.array_equal(merged[k], before[k])]
    targets = ("['query']", "['key']", "['value']", "['out']")  # finetune_lora.py's
    assert changed and all(k.endswith(targets) for k in changed), changed  # w + scale a b
    (tmp_path / "in.txt").write_text("twelve\nthree hundred five\n", encoding="utf-8")
    capfd.readouterr()
    args = ["--workdir", new, "--beam", "1", "--input", str(tmp_path / "in.txt"),
            "--compile_cache", str(tmp_path / "cache")]
    assert translate.main(args) == 0
    assert len(capfd.readouterr().out.splitlines()) == 2


def test_rerun_resumes_the_lora_run(lora_run, capfd):
    base, trained, new = lora_run
    summary = train_and_evaluate(_config(base, num_train_steps=STEPS + 2), new)
    assert summary["step"] == STEPS + 2
    assert f"resuming from step {STEPS}" in capfd.readouterr().out
    after = final_params(new, STEPS + 2)
    assert_bit_identical(base_params(after), trained, "the trained weights must stay")
    assert any(not np.array_equal(x, y) for x, y in
               zip(_b_leaves(after), _b_leaves(final_params(new, STEPS)), strict=True))


@pytest.mark.parametrize("case", ["no_checkpoint", "itself", "shape"])
def test_a_bad_starting_point_is_refused_before_anything_is_written(reference, tmp_path, case):
    base = reference[0]
    new = str(tmp_path / "new")
    if case == "no_checkpoint":
        empty = tmp_path / "empty"
        empty.mkdir()
        (empty / "config.json").write_text(open(os.path.join(base, "config.json")).read())
        config, error, words = _config(str(empty)), WorkdirError, "holds no checkpoint"
    elif case == "itself":
        config, error, words, new = _config(base), WorkdirError, "is the --workdir itself", base
    else:
        config, error = _config(base, **{"model.d_model": 64}), CheckpointMismatchError
        words = "was written for d_model=32 but the config asks for d_model=64"
    with pytest.raises(error, match=words):
        train_and_evaluate(config, new)
    assert case == "itself" or not os.path.exists(new)


def test_shape_override_is_one_line_exit_2(reference, tmp_path):
    base = reference[0]
    new = str(tmp_path / "new")
    proc = run([sys.executable, TRAIN, f"--config={LORA_CONFIG}:{base}", f"--workdir={new}",
                "--config.model.d_ff=128"])
    line = error_line(proc)
    assert proc.returncode == 2
    assert "d_ff=64 but the config asks for d_ff=128" in line and "finetune_lora.py" in line
    assert not os.path.exists(new)
