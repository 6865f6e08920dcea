"""Tiny models, synthetic batches and tiny end-to-end configs shared by the training tests."""

from __future__ import annotations

import functools

import jax
import numpy as np
from flax import nnx

from transformer_jax.config import ModelConfig
from transformer_jax.nn import Transformer
from transformer_jax.training import create_train_state, default_config, split_model

VOCAB = 64


def tiny_model(dropout: float = 0.0, seed: int = 0, **overrides):
    """``(ModelDef, params)`` of a 1-layer, D=32 encoder-decoder."""
    cfg = ModelConfig(vocab_size=VOCAB, d_model=32, num_heads=2, num_layers=1, d_ff=64,
                      max_len=32, dropout_rate=dropout, **overrides)

    def build():
        return Transformer(cfg, rngs=nnx.Rngs(seed))

    model_def, _ = split_model(nnx.eval_shape(build))
    params = jax.jit(lambda: split_model(build())[1])()  # one compile instead of one per op
    return model_def, params


@functools.partial(jax.jit, static_argnums=1)
def init_state(params, tx):
    """``create_train_state`` compiled once (eager optimizer init compiles one op per shape)."""
    return create_train_state(params, tx)


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
