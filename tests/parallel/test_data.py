"""Data-parallel strategies: pmap and shard_map over 8 CPU devices match one device step for
step."""

import functools
import os

import jax
import numpy as np
import optax
import pytest
from helpers import init_state, synthetic_batch, tiny_model, tiny_train_config

from transformer_jax.parallel import make_strategy
from transformer_jax.training import eval_step, train_and_evaluate, train_step

STEPS, ROWS = 3, 16


def _run(mode: str, *, dropout: bool):
    """Three train steps on fixed synthetic batches; returns (params, [metrics per step])."""
    model_def, params = tiny_model(dropout=0.1 if dropout else 0.0)
    # Plain SGD: a gradient scaled by the device count would show in the parameters (Adam
    # would hide it, and it turns the float noise of gradients that are exactly zero in
    # theory, such as the key bias, into full-size steps of either sign).
    tx = optax.sgd(0.5)
    dp = make_strategy(mode)
    per_device = functools.partial(
        train_step, model_def=model_def, tx=tx, schedule=lambda count: 0.5,
        label_smoothing=0.1, dropout=dropout)
    state = init_state(params, tx)
    step = dp.compile_train_step(per_device, state)
    state = dp.put_state(state)
    rng = dp.put_rng(jax.random.key(7))
    history = []
    for i in range(STEPS):
        state, metrics = step(state, dp.put_batch(synthetic_batch(ROWS, seed=i)), rng)
        history.append(dp.metrics(metrics))
    final = jax.device_get(dp.get_state(state))
    evaluated = dp.metrics(dp.compile_eval_step(functools.partial(eval_step, model_def=model_def))(
        dp.put_state(final.params), dp.put_batch(synthetic_batch(ROWS, seed=99))))
    return final, history, evaluated, params


@pytest.fixture(scope="module")
def single():
    return _run("none", dropout=False)


@pytest.mark.parametrize("mode", ["pmap", "shard_map"])
def test_data_parallel_matches_one_device(mode, single):
    assert len(jax.devices()) == 8
    want, want_hist, want_eval, init = single
    got, got_hist, got_eval, _ = _run(mode, dropout=False)
    assert int(got.step) == int(want.step) == STEPS
    for a, b in zip(got_hist, want_hist, strict=True):
        assert a["tokens"] == b["tokens"] > 0  # tokens summed over all devices
        for key in ("loss", "nll", "accuracy", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-5), key
    for key in ("loss_sum", "weight_sum", "correct_sum"):
        assert got_eval[key] == pytest.approx(want_eval[key], rel=1e-5), key
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
        got.params, want.params)
    # The steps really changed the parameters (the comparison above is not trivially true).
    moved = jax.tree_util.tree_map(lambda a, b: float(np.abs(a - b).max()), want.params, init)
    assert max(jax.tree_util.tree_leaves(moved)) > 1e-2
    # and the loss of step 3 is not that of step 1
    assert want_hist[2]["loss"] < want_hist[0]["loss"]


@pytest.mark.parametrize("mode", ["pmap", "shard_map"])
def test_batch_not_divisible_by_devices(mode):
    dp = make_strategy(mode)
    assert dp.check_batch_size(16) == 16
    with pytest.raises(ValueError, match=r"^batch_size=12 is not divisible by the 8 devices; "
                                         r"use a multiple of 8\.$"):
        dp.check_batch_size(12)


def test_train_and_evaluate_rejects_indivisible_batch_before_writing(tmp_path):
    workdir = tmp_path / "run"
    config = tiny_train_config(parallelism="shard_map", batch_size=12)
    with pytest.raises(ValueError, match="batch_size=12 is not divisible by the 8 devices"):
        train_and_evaluate(config, str(workdir))
    assert not os.path.exists(workdir)
    config = tiny_train_config(parallelism="pmap", batch_size=16, eval_batch_size=4)
    with pytest.raises(ValueError, match="batch_size=4 is not divisible by the 8 devices"):
        train_and_evaluate(config, str(workdir))
    assert not os.path.exists(workdir)
