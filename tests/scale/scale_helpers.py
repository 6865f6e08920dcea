"""Shared tiny models and batches for the scaling tests."""

from __future__ import annotations

import functools

import numpy as np
import optax

from transformer_jax.config import ModelConfig
from transformer_jax.training.step import create_train_state, train_step

VOCAB = 64


def tiny_config(**overrides) -> ModelConfig:
    kw = dict(vocab_size=VOCAB, d_model=32, num_heads=2, num_layers=1, d_ff=64, max_len=32,
              dropout_rate=0.0)
    kw.update(overrides)
    return ModelConfig.tiny(**kw)


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


def adam_step(model_def, lr: float = 1e-2):
    """``(tx, per_device_step)`` with a constant-rate Adam."""
    tx = optax.adam(lr)
    per_device = functools.partial(train_step, model_def=model_def, tx=tx,
                                   schedule=lambda s: lr, dropout=False)
    return tx, per_device


def fresh_state(params, tx):
    return create_train_state(params, tx)
