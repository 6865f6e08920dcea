"""A tiny model on the numbers task, trained once per test session for the decoding tests.

Under pytest-xdist the workers share one run directory (a file lock makes the first worker
train and the others wait and reuse it).
"""

from __future__ import annotations

import fcntl
import os

STEPS, CHECKPOINT_EVERY = 150, 75


def tiny_config():
    from transformer_jax.training import default_config

    c = default_config()
    c.seed = 0
    c.num_train_steps = STEPS
    c.batch_size = 16
    c.log_every_steps = 75
    c.eval_every_steps = 0
    c.checkpoint_every_steps = CHECKPOINT_EVERY
    c.keep_checkpoints = 2
    c.average_last = 2
    c.parallelism = "none"
    c.eval_metrics = ""
    c.eval_num_sentences = 0
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
    """Path of the trained run (checkpoints at steps 75 and 150, averaged/ of both)."""
    from transformer_jax.training import train_and_evaluate

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # shared by the workers of this run
    workdir = root / "tiny_translation_run"
    with open(root / "tiny_translation_run.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (workdir / "summary.json").exists():
            train_and_evaluate(tiny_config(), str(workdir))
    return str(workdir)
