"""Run ``train.py`` (or another entry point) in a subprocess with a tiny config.

Shared by the reliability tests (importable as ``reliability_helpers``). Every run uses one
CPU device unless the test asks for more, a one-layer d_model 32 model and a numbers task of a
few hundred pairs, so a whole run (start-up, compile, 10 updates, final evaluation) takes
seconds.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import jax
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAIN = os.path.join(REPO, "train.py")
STEPS = 10  # updates of the reference run

# Everything that shapes the math of a run. Checkpoint cadence, logging and evaluation do not
# change the parameters, so runs that differ only there must end bit-identical.
TINY = {
    "seed": 0,
    "num_train_steps": STEPS,
    "batch_size": 8,
    "log_every_steps": 1,
    "eval_every_steps": 0,
    "checkpoint_every_steps": 2,
    "keep_checkpoints": 3,
    "eval_metrics": "",
    "eval_num_sentences": 0,
    "parallelism": "none",
    "model.d_model": 32,
    "model.num_heads": 2,
    "model.num_layers": 1,
    "model.d_ff": 64,
    "model.max_len": 24,
    "model.dropout_rate": 0.1,  # dropout on: the restored RNG must matter
    "data.max_length": 24,
    "data.vocab_size": 64,
    "data.numbers_max": 3000,
    "data.numbers_train_size": 300,
    "data.numbers_validation_size": 16,
    "data.numbers_test_size": 8,
    "data.test_split": "",
    "optimizer.schedule": "warmup_rsqrt",
    "optimizer.learning_rate": 3e-3,
    "optimizer.warmup_steps": 4,
}


def config_args(data_dir: str, **overrides) -> list[str]:
    """``--config.key=value`` flags of the tiny config; ``model__d_model=64`` style overrides."""
    values = dict(TINY, **{"data.data_dir": data_dir})
    values.update({k.replace("__", "."): v for k, v in overrides.items()})
    return [f"--config.{k}={v}" for k, v in values.items()]


def subprocess_env(devices: int = 1) -> dict:
    env = dict(os.environ)
    env["JAX_PLATFORMS"] = "cpu"
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["PYTHONUNBUFFERED"] = "1"
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    return env


def train_cmd(workdir: str, data_dir: str, **overrides) -> list[str]:
    return [sys.executable, TRAIN, f"--workdir={workdir}", *config_args(data_dir, **overrides)]


def run(cmd: list[str], *, devices: int = 1, timeout: float = 600, text: bool = True,
        **kwargs):
    """Run to completion; returns the CompletedProcess (text stdout/stderr by default)."""
    return subprocess.run(cmd, capture_output=True, text=text, timeout=timeout, cwd=REPO,
                          env=subprocess_env(devices), check=False, **kwargs)


def run_train(workdir: str, data_dir: str, *, devices: int = 1, **overrides):
    return run(train_cmd(workdir, data_dir, **overrides), devices=devices)


def start_train(workdir: str, data_dir: str, log_path: str, **overrides) -> subprocess.Popen:
    """Start a run in the background; stdout and stderr go to ``log_path``."""
    log = open(log_path, "w")  # noqa: SIM115 - closed by the caller via finish()
    proc = subprocess.Popen(train_cmd(workdir, data_dir, **overrides), stdout=log,
                            stderr=subprocess.STDOUT, cwd=REPO, env=subprocess_env())
    proc._log = log  # type: ignore[attr-defined]
    return proc


def finish(proc: subprocess.Popen, timeout: float = 600) -> int:
    try:
        return proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc._log.close()  # type: ignore[attr-defined]


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 600, poll: float = 0.005):
    """Poll ``predicate()`` until true; fails if the process exits first or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            with open(proc._log.name) as f:  # type: ignore[attr-defined]
                tail = f.read()[-3000:]
            raise AssertionError(f"the run exited (code {proc.returncode}) first:\n{tail}")
        time.sleep(poll)
    raise AssertionError("timed out waiting for the run")


def checkpoint_entries(workdir: str) -> list[str]:
    """Names in ``<workdir>/checkpoints`` (finished steps and orbax temporary dirs)."""
    try:
        return os.listdir(os.path.join(workdir, "checkpoints"))
    except FileNotFoundError:
        return []


def final_params(workdir: str, step: int | None = None) -> dict:
    from transformer_jax.training import load_params

    return jax.tree_util.tree_map(np.asarray, load_params(workdir, step))


def assert_bit_identical(a, b, context: str = "") -> None:
    la, ta = jax.tree_util.tree_flatten_with_path(a)
    lb, tb = jax.tree_util.tree_flatten_with_path(b)
    assert ta == tb
    assert len(la) > 0
    for (path, x), (_, y) in zip(la, lb, strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape, path
        assert np.array_equal(x, y), f"{jax.tree_util.keystr(path)} differs; {context}"


def error_line(proc) -> str:
    """The single stderr line of a failed run (fails when stderr has more or a traceback)."""
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1, proc.stderr
    return lines[0]
