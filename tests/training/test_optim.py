"""Schedules against the written-out formulas; accumulation against one big batch."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from transformer_jax.training import optim


def _opt(**overrides):
    cfg = ml_collections.ConfigDict(
        dict(
            name="adam",
            schedule="paper",
            learning_rate=1.0,
            warmup_steps=4000,
            end_learning_rate=0.0,
            b1=0.9,
            b2=0.98,
            eps=1e-9,
            weight_decay=0.0,
            clip_norm=0.0,
            grad_accum_steps=1,
        )
    )
    cfg.update(overrides)
    return cfg


@pytest.mark.parametrize("step", [1, 2, 100, 3999, 4000, 4001, 10_000, 100_000])
def test_paper_schedule_matches_formula(step):
    d, warmup = 512, 4000
    expected = d**-0.5 * min(step**-0.5, step * warmup**-1.5)
    got = float(optim.paper_schedule(d, warmup)(step - 1))  # optax counts from 0
    assert got == pytest.approx(expected, rel=1e-6)
    scaled = float(optim.paper_schedule(d, warmup, scale=2.0)(step - 1))
    assert scaled == pytest.approx(2 * expected, rel=1e-6)


def test_paper_schedule_peak_is_at_warmup():
    sched = optim.paper_schedule(256, 100)
    values = np.asarray([float(sched(c)) for c in range(300)])
    assert int(np.argmax(values)) == 99  # step 100 (count 99)
    assert values[99] == pytest.approx(256**-0.5 * 100**-0.5, rel=1e-6)


def test_warmup_rsqrt_equals_paper_with_matching_peak():
    d, warmup = 128, 50
    peak = d**-0.5 * warmup**-0.5
    a = optim.warmup_rsqrt_schedule(peak, warmup)
    b = optim.paper_schedule(d, warmup)
    for count in (0, 10, 49, 50, 51, 500):
        assert float(a(count)) == pytest.approx(float(b(count)), rel=1e-5)


def test_warmup_cosine_matches_formula():
    peak, warmup, total, end = 3e-3, 10, 110, 1e-4
    sched = optim.warmup_cosine_schedule(peak, warmup, total, end)
    assert float(sched(5)) == pytest.approx(peak * 5 / 10, rel=1e-6)
    for count in (10, 35, 60, 109, 110):
        frac = (count - warmup) / (total - warmup)
        expected = end + (peak - end) * 0.5 * (1 + math.cos(math.pi * frac))
        assert float(sched(count)) == pytest.approx(expected, rel=1e-5)


def test_bad_schedule_and_optimizer_names():
    with pytest.raises(ValueError, match="optimizer.schedule='linear'"):
        optim.make_optimizer(_opt(schedule="linear"), d_model=8, num_train_steps=10)
    with pytest.raises(ValueError, match="optimizer.name='sgd'"):
        optim.make_optimizer(_opt(name="sgd"), d_model=8, num_train_steps=10)
    with pytest.raises(ValueError, match="num_train_steps"):
        optim.make_optimizer(
            _opt(schedule="warmup_cosine", warmup_steps=20), d_model=8, num_train_steps=10
        )


def test_decay_mask_excludes_biases_and_norms():
    params = {
        "encoder": {
            "layers": {0: {"attention": {"query": jnp.ones((2, 2)), "query_bias": jnp.ones(2)}}},
            "final_norm": {"scale": jnp.ones(2), "bias": jnp.ones(2)},
        },
        "embed": {"embedding": jnp.ones((4, 2))},
        "dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)},
    }
    mask = optim.decay_mask(params)
    assert mask["encoder"]["layers"][0]["attention"]["query"] is True
    assert mask["encoder"]["layers"][0]["attention"]["query_bias"] is False
    assert mask["encoder"]["final_norm"] == {"scale": False, "bias": False}
    assert mask["embed"]["embedding"] is True
    assert mask["dense"] == {"kernel": True, "bias": False}
    # AdamW with zero gradients only shrinks the decayed leaves.
    tx, _ = optim.make_optimizer(
        _opt(name="adamw", schedule="constant", learning_rate=0.1, weight_decay=0.5),
        d_model=2,
        num_train_steps=10,
    )
    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    new = optax.apply_updates(params, updates)
    np.testing.assert_allclose(new["dense"]["kernel"], 1 - 0.1 * 0.5, rtol=1e-6)
    np.testing.assert_allclose(new["dense"]["bias"], 1.0)
    np.testing.assert_allclose(new["encoder"]["final_norm"]["scale"], 1.0)


def _linear_loss(params, x, y):
    pred = jnp.tanh(x @ params["w"] + params["b"])  # [B, 3]
    return jnp.mean((pred - y) ** 2)


def test_gradient_accumulation_equals_big_batch():
    k, micro = 4, 3
    rng = np.random.default_rng(0)
    params = {
        "w": jnp.asarray(rng.normal(size=(5, 3)), jnp.float32),
        "b": jnp.asarray(rng.normal(size=(3,)), jnp.float32),
    }
    # Two updates so that Adam's moments and the schedule both matter; a large eps and
    # clipping make the update depend on the gradient's scale, not only its sign.
    batches = [
        (rng.normal(size=(k * micro, 5)).astype(np.float32),
         rng.normal(size=(k * micro, 3)).astype(np.float32))
        for _ in range(2)
    ]
    common = dict(schedule="warmup_rsqrt", learning_rate=0.05, warmup_steps=2, eps=0.1,
                  clip_norm=0.5)
    grad_fn = jax.jit(jax.grad(_linear_loss))

    big_tx, _ = optim.make_optimizer(_opt(**common), d_model=4, num_train_steps=10)
    big_params, big_state = params, big_tx.init(params)
    for x, y in batches:
        updates, big_state = big_tx.update(grad_fn(big_params, x, y), big_state, big_params)
        big_params = optax.apply_updates(big_params, updates)

    acc_tx, _ = optim.make_optimizer(
        _opt(grad_accum_steps=k, **common), d_model=4, num_train_steps=10
    )
    acc_params, acc_state = params, acc_tx.init(params)
    for x, y in batches:
        for i in range(k):
            sl = slice(i * micro, (i + 1) * micro)
            grads = grad_fn(acc_params, x[sl], y[sl])
            updates, acc_state = acc_tx.update(grads, acc_state, acc_params)
            acc_params = optax.apply_updates(acc_params, updates)
            if i < k - 1:  # no change until the k-th micro-batch
                assert all(float(jnp.abs(u).max()) == 0.0
                           for u in jax.tree_util.tree_leaves(updates))
    for name in params:
        np.testing.assert_allclose(acc_params[name], big_params[name], atol=1e-6, rtol=0)
    # and the run actually moved the parameters
    assert float(jnp.abs(big_params["w"] - params["w"]).max()) > 1e-3
