"""``python train.py``: overrides reach the saved config, bad keys fail in one line, reruns
resume."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from ml_collections import ConfigDict

from transformer_jax.checkpoints import read_meta
from transformer_jax.data.numbers import english_words, german_words
from transformer_jax.training.optim import make_schedule

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = [  # seconds, not minutes: a tiny model, 300 training pairs, no decoding
    "--config.num_train_steps=2", "--config.batch_size=8", "--config.log_every_steps=1",
    "--config.checkpoint_every_steps=1", "--config.parallelism=none",
    "--config.eval_metrics=", "--config.eval_num_sentences=0",
    "--config.data.numbers_train_size=300", "--config.data.numbers_validation_size=16",
    "--config.data.numbers_test_size=16", "--config.data.test_split=",
    "--config.data.vocab_size=64", "--config.data.max_length=16",
    "--config.model.d_model=32", "--config.model.num_heads=2", "--config.model.d_ff=64",
    "--config.model.max_len=32", "--config.optimizer.schedule=warmup_rsqrt",
]


def _train(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "train.py"), "--config",
         os.path.join(ROOT, "configs", "default.py"), *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("cli") / "run")
    args = ("--workdir", workdir, "--config.model.num_layers=1", *TINY)
    return workdir, args, _train(*args)


def test_overrides_end_up_in_the_saved_config(first_run):
    workdir, _, proc = first_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "done: step 2" in proc.stdout
    assert "resuming" not in proc.stdout
    with open(os.path.join(workdir, "config.json")) as f:
        saved = json.load(f)
    assert saved["model"]["num_layers"] == 1  # the default config has 2
    assert saved["model"]["d_model"] == 32 and saved["num_train_steps"] == 2
    assert saved["eval_metrics"] == "" and saved["data"]["numbers_train_size"] == 300
    assert saved["model"]["vocab_size"] == 64  # filled in from the tokenizer
    with open(os.path.join(workdir, "summary.json")) as f:
        assert json.load(f)["step"] == 2
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["1", "2"]


def test_same_command_again_resumes(first_run):
    workdir, args, proc = first_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = os.path.join(workdir, "checkpoints", "2")
    stamp = os.stat(ckpt).st_mtime_ns
    again = _train(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming from step 2" in again.stdout
    assert "done: step 2" in again.stdout
    assert os.stat(ckpt).st_mtime_ns == stamp  # nothing retrained or rewritten
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["1", "2"]


@pytest.mark.parametrize("flag, message", [
    ("--config.model.bogus=3",
     "error: unknown config key 'model.bogus'; the model keys are: activation, "),
    ("--config.bogus=3", "error: unknown config key 'bogus'; the top-level keys are: "),
], ids=["model.bogus", "bogus"])
def test_unknown_key_fails_in_one_line(tmp_path, flag, message):
    workdir = tmp_path / "run"
    proc = _train("--workdir", str(workdir), flag)
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr  # no traceback
    assert lines[0].startswith(message)
    assert "d_model" in lines[0] if "model" in flag else "num_train_steps" in lines[0]
    assert not workdir.exists()


def test_bad_value_fails_in_one_line(tmp_path):
    proc = _train("--workdir", str(tmp_path / "run"), "--config.num_train_steps=many")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "num_train_steps" in lines[0]


def test_time_limit_stops_early_and_still_finishes(tmp_path):
    # 0.0001 minutes have passed before the first update ends: one update, then the normal end
    # (checkpoint, test-split evaluation, averaging), not the exit of an interrupted run.
    workdir = str(tmp_path / "run")
    args = [a for a in TINY if not a.startswith(("--config.num_train_steps",
                                                 "--config.data.test_split"))]
    proc = _train("--workdir", workdir, *args, "--config.num_train_steps=1000",
                  "--config.max_train_minutes=0.0001", "--config.average_last=2",
                  "--config.keep_checkpoints=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "max_train_minutes=0.0001 reached after update 1 of 1000" in proc.stderr
    with open(os.path.join(workdir, "summary.json")) as f:
        summary = json.load(f)
    assert summary["step"] == 1 and summary["stopped_by_time_limit"] is True
    assert summary["interrupted"] is False and "loss" in summary["test"]
    assert os.listdir(os.path.join(workdir, "checkpoints")) == ["1"]


def test_negative_time_limit_fails_in_one_line(tmp_path):
    proc = _train("--workdir", str(tmp_path / "w"), *TINY, "--config.max_train_minutes=-5")
    assert proc.returncode == 2
    assert "max_train_minutes=-5.0 must be a number of minutes >= 0" in proc.stderr
    assert not os.path.exists(tmp_path / "w")


def test_skipped_long_pairs_are_counted_and_reported(tmp_path):
    """Pairs longer than data.max_length are left out of training: said on stderr, counted in
    summary.json, so a user of their own corpus learns to raise max_length."""
    workdir = str(tmp_path / "run")
    proc = _train("--workdir", workdir, "--config.model.num_layers=1", *TINY,
                  "--config.data.max_length=20", "--config.data.test_split=test")
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(os.path.join(workdir, "summary.json")) as f:
        summary = json.load(f)
    dropped = summary["train_pairs_dropped"]
    assert dropped > 0
    # the evaluation scores long sources cut to max_length: summary.json says so, per split
    cut = summary["eval_pairs_cut_to_max_length"]
    assert summary["eval_max_length"] == 20
    assert set(cut) == {"validation", "test"} and all(0 < n <= 16 for n in cut.values())
    assert (f"{dropped} distinct training pairs read so far were skipped as longer than "
            "max_length") in proc.stderr
    assert "(data.max_length=20); raise data.max_length to train on them." in proc.stderr


def test_no_pair_fits_max_length_is_one_line_error(tmp_path):
    # Text files of long number words: the numbers task always trains on short ones ("two").
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    values = range(777_000, 777_300)
    for split in ("train", "validation"):
        (corpus / f"{split}.en").write_text("".join(f"{english_words(n)}\n" for n in values))
        (corpus / f"{split}.de").write_text("".join(f"{german_words(n)}\n" for n in values))
    proc = _train("--workdir", str(tmp_path / "run"), *TINY, "--config.data.max_length=6",
                  "--config.data.source=text", f"--config.data.path={corpus}")
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert lines[-1] == ("error: none of 10000 training pairs in a row fits data.max_length=6 "
                         "tokens (EOS included) and data.max_length_ratio; raise data.max_length.")
    assert "Traceback" not in proc.stderr


def test_fit_steps_to_time_ends_the_schedule_in_time_and_resume_keeps_the_count(tmp_path):
    """fit_steps_to_time: after the warm-up the run lowers num_train_steps to what fits in
    max_train_minutes, the cosine schedule spans the fitted count from there on, the
    checkpoints keep the count, and a rerun (resume) trains to it, not to the configured one."""
    workdir = str(tmp_path / "run")
    args = [a for a in TINY if not a.startswith(("--config.num_train_steps",
                                                 "--config.checkpoint_every_steps"))]
    args += ["--config.num_train_steps=1000000", "--config.checkpoint_every_steps=1000000",
             "--config.max_train_minutes=1", "--config.fit_steps_to_time=true",
             "--config.log_every_steps=10",
             "--config.data.numbers_max=3000",  # every pair fits max_length
             "--config.eval_every_steps=0", "--config.optimizer.schedule=warmup_cosine",
             "--config.optimizer.warmup_steps=20", "--config.optimizer.learning_rate=1e-3"]
    proc = _train("--workdir", workdir, *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(os.path.join(workdir, "summary.json")) as f:
        summary = json.load(f)
    fitted = summary["num_train_steps"]
    assert 20 < fitted < 1000000
    assert f"at update 20: training for {fitted} updates (num_train_steps=1000000)" in (
        proc.stdout + proc.stderr)
    # It ends at the fitted count unless the machine slowed down by more than the reserve.
    assert summary["step"] == fitted or summary["stopped_by_time_limit"]
    meta = read_meta(os.path.join(workdir, "checkpoints"), summary["step"])
    assert meta["fitted_num_train_steps"] == fitted

    # Every update after the fit used the cosine over the fitted count (a logged
    # learning_rate is that of the last update before the log).
    schedule = make_schedule(ConfigDict({"schedule": "warmup_cosine", "learning_rate": 1e-3,
                                         "warmup_steps": 20}), d_model=32,
                             num_train_steps=fitted)
    with open(os.path.join(workdir, "history.jsonl")) as f:
        logged = {r["step"]: r["learning_rate"] for r in map(json.loads, f)
                  if r["split"] == "train"}
    after = sorted(s for s in logged if s > 20)
    assert after[-1] == summary["step"] and len(after) > 1
    np.testing.assert_allclose([logged[s] for s in after],
                               [float(schedule(s - 1)) for s in after], rtol=1e-6, atol=1e-10)

    # A rerun with a shorter limit (the limit may change between runs; the count may not).
    rerun = _train("--workdir", workdir, *args, "--config.max_train_minutes=0.3")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    with open(os.path.join(workdir, "summary.json")) as f:
        resumed = json.load(f)
    assert f"resuming from step {summary['step']}" in rerun.stdout
    assert "fit_steps_to_time:" not in rerun.stdout + rerun.stderr
    assert resumed["num_train_steps"] == fitted
    assert resumed["step"] == fitted or resumed["stopped_by_time_limit"]


@pytest.mark.parametrize("minutes", ["0", "inf"])
def test_fit_steps_to_time_needs_a_time_limit(tmp_path, minutes):
    proc = _train("--workdir", str(tmp_path / "w"), *TINY, "--config.fit_steps_to_time=true",
                  f"--config.max_train_minutes={minutes}")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: fit_steps_to_time=True fits the schedule to max_train_minutes, which is "
        f"{minutes}; set a finite max_train_minutes > 0 or fit_steps_to_time=False."]
    assert not os.path.exists(tmp_path / "w")
