"""Shared test helpers: tiny models, synthetic batches, tiny run configs, subprocess runs.

One module for the whole suite (``tests`` is on ``sys.path``, see ``pyproject.toml``):
``from helpers import tiny_model, synthetic_batch``. Everything here is small enough that a
model compiles in a second and a whole ``train.py`` run (start-up, compile, 10 updates, final
evaluation) takes seconds.
"""

from __future__ import annotations

import fcntl
import functools
import importlib.util
import os
import subprocess
import sys
import time

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from transformer_jax.checkpoints import load_params
from transformer_jax.config import ModelConfig
from transformer_jax.data import default_data_config
from transformer_jax.nn import build_model, split_model
from transformer_jax.training import default_config, train_and_evaluate
from transformer_jax.training.step import create_train_state, train_step

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(REPO, "train.py")
VOCAB = 64  # vocabulary of the tiny models and synthetic batches
HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
# for tests that compile for a TPU topology on this CPU (the "aot" extra installs libtpu)
needs_libtpu = pytest.mark.skipif(not HAS_LIBTPU,
                                  reason="libtpu is not installed (pip install -e .[aot])")


# --------------------------------------------------------------------------- models
def tiny_config(**overrides) -> ModelConfig:
    """D 32, 2 heads, 1+1 layers, F 64, vocab ``VOCAB``, max_len 32, no dropout."""
    kw = dict(vocab_size=VOCAB, d_model=32, num_heads=2, num_layers=1, d_ff=64, max_len=32,
              dropout_rate=0.0)
    kw.update(overrides)
    return ModelConfig.tiny(**kw)


def tiny_model(dropout: float = 0.0, seed: int = 0, *, kind: str = "encoder_decoder",
               **overrides):
    """``(ModelDef, params)`` of a :func:`tiny_config` model."""
    cfg = tiny_config(dropout_rate=dropout, **overrides)

    def build():
        return build_model(kind, cfg, nnx.Rngs(seed))

    model_def, _ = split_model(nnx.eval_shape(build))
    params = jax.jit(lambda: split_model(build())[1])()  # one compile instead of one per op
    return model_def, params


@functools.partial(jax.jit, static_argnums=1)
def init_state(params, tx):
    """``create_train_state`` compiled once (eager optimizer init compiles one op per shape)."""
    return create_train_state(params, tx)


def adam_step(model_def, lr: float = 1e-2):
    """``(tx, per_device_step)`` with a constant-rate Adam and no dropout."""
    tx = optax.adam(lr)
    per_device = functools.partial(train_step, model_def=model_def, tx=tx,
                                   schedule=lambda s: lr, dropout=False)
    return tx, per_device


# --------------------------------------------------------------------------- batches
def synthetic_batch(rows: int, length: int = 8, seed: int = 0) -> dict[str, np.ndarray]:
    """Unpacked rows of random tokens (ids 3..V-1) with EOS and a random amount of padding."""
    rng = np.random.default_rng(seed)
    out = {}
    for key in ("inputs", "targets"):
        ids = rng.integers(3, VOCAB, size=(rows, length)).astype(np.int32)
        lengths = rng.integers(2, length + 1, size=rows)
        for r, n in enumerate(lengths):
            ids[r, n - 1] = 1  # EOS
            ids[r, n:] = 0  # padding
        out[key] = ids
    return out


def packed_batch(rows: int, length: int, seed: int = 0, *, with_inputs: bool = True) -> dict:
    """Rows of two packed segments (ids in [3, VOCAB)) ending in EOS, then padding."""
    rng = np.random.default_rng(seed)
    out = {k: np.zeros((rows, length), np.int32) for k in
           ("targets", "targets_segmentation", "targets_position")}
    for r in range(rows):
        start = 0
        for seg, n in enumerate(rng.integers(3, length // 2, size=2), start=1):
            ids = np.append(rng.integers(3, VOCAB, size=n - 1), 1)  # tokens + EOS
            out["targets"][r, start:start + n] = ids
            out["targets_segmentation"][r, start:start + n] = seg
            out["targets_position"][r, start:start + n] = np.arange(n)
            start += n
    if with_inputs:
        for key in ("targets", "targets_segmentation", "targets_position"):
            out[key.replace("targets", "inputs")] = np.roll(out[key], 1, axis=0)
    return out


# The two-process test (e2e/test_multiprocess.py and the e2e/mp_worker.py it starts).
MP_STEPS, MP_ROWS, MP_LENGTH = 3, 8, 16


# --------------------------------------------------------------------------- configs
def small_numbers_config(**overrides):
    """A ``data.*`` numbers task small enough to prepare in well under a second."""
    cfg = default_data_config()
    cfg.numbers_max = 3000
    cfg.numbers_train_size = 600
    cfg.numbers_validation_size = 70
    cfg.numbers_test_size = 40
    cfg.vocab_size = 100
    cfg.max_length = 24
    cfg.update(overrides)
    return cfg


def tiny_train_config(**top):
    """A train_and_evaluate config that builds its data, tokenizer and model in seconds."""
    c = default_config()
    c.seed = 0
    c.num_train_steps = 3
    c.batch_size = 8
    c.log_every_steps = 1
    c.eval_every_steps = 0
    c.checkpoint_every_steps = 1
    c.keep_checkpoints = 10
    c.parallelism = "none"
    c.eval_metrics = ""
    c.eval_num_sentences = 0
    c.data.numbers_train_size = 300
    c.data.numbers_validation_size = 16
    c.data.numbers_test_size = 16
    c.data.test_split = ""
    c.data.vocab_size = VOCAB
    c.data.max_length = 16
    c.data.prefetch_batches = 0
    m = c.model
    m.d_model, m.num_heads, m.num_layers, m.d_ff, m.max_len = 32, 2, 1, 64, 32
    m.dropout_rate = 0.1  # on, so that resuming must also restore the dropout stream
    c.optimizer.schedule = "warmup_rsqrt"
    c.optimizer.learning_rate = 3e-3
    c.optimizer.warmup_steps = 2
    for key, value in top.items():
        c[key] = value
    return c


# --------------------------------------------------------------------------- a trained run
TRAINED_STEPS, TRAINED_CHECKPOINT_EVERY = 150, 75


def trained_run_config():
    """The translation model that the inference and translate tests share (150 updates)."""
    c = default_config()
    c.seed = 0
    c.num_train_steps = TRAINED_STEPS
    c.batch_size = 16
    c.log_every_steps = 75
    c.eval_every_steps = 0
    c.checkpoint_every_steps = TRAINED_CHECKPOINT_EVERY
    c.keep_checkpoints = 2
    c.average_last = 2
    c.parallelism = "none"
    c.eval_metrics = ""
    c.eval_num_sentences = 0
    c.eval_length_penalty = 0.8  # recorded in the run: the translate CLI's default alpha
    d = c.data
    d.numbers_max = 10_000
    d.numbers_train_size = 2_000
    d.numbers_validation_size = 20
    d.numbers_test_size = 20
    d.test_split = ""
    d.vocab_size = 64
    d.max_length = 24
    m = c.model
    m.d_model, m.num_heads, m.num_layers, m.d_ff = 32, 2, 2, 64
    m.dropout_rate = 0.0
    m.max_len = 32
    o = c.optimizer
    o.schedule, o.learning_rate, o.warmup_steps = "warmup_rsqrt", 3e-3, 50
    return c


def trained_workdir(tmp_path_factory) -> str:
    """Path of the shared trained run (checkpoints at steps 75 and 150, averaged/ of both).

    Under pytest-xdist the workers share one run directory (a file lock makes the first
    worker train and the others wait and reuse it).
    """
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # shared by the workers of this run
    workdir = root / "tiny_translation_run"
    with open(root / "tiny_translation_run.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (workdir / "summary.json").exists():
            train_and_evaluate(trained_run_config(), str(workdir))
    return str(workdir)


# --------------------------------------------------------------------------- train.py runs
# Everything that shapes the math of a subprocess run. Checkpoint cadence, logging and
# evaluation do not change the parameters, so runs that differ only there end bit-identical.
RUN_STEPS = 10  # updates of the reference run
TINY_FLAGS = {
    "seed": 0,
    "num_train_steps": RUN_STEPS,
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
    values = dict(TINY_FLAGS, **{"data.data_dir": data_dir})
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
    """Params of a run's checkpoint as numpy arrays."""
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
