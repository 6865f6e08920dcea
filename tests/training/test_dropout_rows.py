"""Dropout masks follow the global batch row: 1 device == 8 devices with dropout on."""

import functools

import jax
import numpy as np
import optax
import pytest
from flax import nnx
from helpers import init_state, packed_batch, tiny_config

from transformer_jax.nn import Transformer, split_model
from transformer_jax.parallel import make_strategy
from transformer_jax.training.step import train_step


def _one_step(mode: str, dropout: bool):
    model_def, params = split_model(Transformer(tiny_config(dropout_rate=0.3),
                                                rngs=nnx.Rngs(0)))
    tx = optax.sgd(0.5)  # plain SGD: no Adam rescaling of rounding noise
    dp = make_strategy(mode)
    state = init_state(params, tx)
    step = dp.compile_train_step(functools.partial(train_step, model_def=model_def, tx=tx,
                                                   schedule=lambda s: 0.5, dropout=dropout),
                                 state)
    state, metrics = step(dp.put_state(state),
                          dp.put_batch(packed_batch(16, 16, seed=3)), dp.put_rng(jax.random.key(4)))
    return jax.device_get(dp.get_state(state).params), dp.metrics(metrics)["loss"]


@pytest.fixture(scope="module")
def one_device():
    """(params, loss) on one device with dropout, and the loss without dropout."""
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices (tests/conftest.py sets 8 virtual CPU devices)")
    return _one_step("none", dropout=True), _one_step("none", dropout=False)[1]


def test_dropout_acts(one_device):
    (_, loss), plain_loss = one_device
    assert abs(plain_loss - loss) > 1e-3  # the comparison below is not trivially true


@pytest.mark.parametrize("mode", ["pmap", "shard_map"])
def test_dropout_does_not_depend_on_the_device_count(mode, one_device):
    (want, want_loss), _ = one_device
    got, got_loss = _one_step(mode, dropout=True)
    assert got_loss == pytest.approx(want_loss, rel=1e-5)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                           got, want)
