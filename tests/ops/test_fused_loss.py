"""fused_cross_entropy against the unfused loss (logits, then ops.cross_entropy): values,
metrics and gradients w.r.t. hidden, kernel and bias; float32 tight, bfloat16 looser."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from transformer_jax import ops

B, T, D, V = 3, 7, 16, 50


def _inputs(dtype, seed=0):
    rng = np.random.default_rng(seed)
    hidden = jnp.asarray(rng.standard_normal((B, T, D)), dtype)
    kernel = jnp.asarray(rng.standard_normal((D, V)) * 0.4, dtype)
    bias = jnp.asarray(rng.standard_normal(V) * 0.1, jnp.float32)
    targets = jnp.asarray(rng.integers(0, V, (B, T)), jnp.int32)
    weights = jnp.asarray(rng.random((B, T)) > 0.3, jnp.float32)  # padding: weight 0
    return hidden, kernel, bias, targets, weights


def _unfused(hidden, kernel, bias, targets, weights, ls):
    """The training step's unfused path: float32 logits [B, T, V], then the losses."""
    logits = jnp.einsum("BTD,DV->BTV", hidden, kernel, preferred_element_type=jnp.float32,
                        precision=jax.lax.Precision.HIGHEST)
    if bias is not None:
        logits = logits + bias
    loss, weight = ops.cross_entropy(logits, targets, weights, ls)
    nll, _ = ops.cross_entropy(logits, targets, weights, 0.0)
    correct, _ = ops.token_accuracy(logits, targets, weights)
    return loss, (nll, correct, weight)


def _fused(hidden, kernel, bias, targets, weights, ls, chunk):
    out = ops.fused_cross_entropy(hidden, kernel, targets, weights, bias=bias,
                                  label_smoothing=ls, chunk=chunk)
    return out.loss_sum, (out.nll_sum, out.correct_sum, out.weight_sum)


@pytest.mark.parametrize("ls", [0.0, 0.1])
@pytest.mark.parametrize("chunk, with_bias", [(4, True), (1024, False)])  # 21 = 5*4 + 1 rows
def test_float32_value_metrics_and_gradients_equal_the_unfused_loss(ls, chunk, with_bias):
    hidden, kernel, bias, targets, weights = _inputs(jnp.float32)
    bias = bias if with_bias else None
    argnums = (0, 1, 2) if with_bias else (0, 1)
    want, want_grads = jax.value_and_grad(_unfused, argnums, has_aux=True)(
        hidden, kernel, bias, targets, weights, ls)
    got, got_grads = jax.jit(jax.value_and_grad(_fused, argnums, has_aux=True),
                             static_argnums=(5, 6))(hidden, kernel, bias, targets, weights,
                                                    ls, chunk)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
    np.testing.assert_allclose(np.array(got[1]), np.array(want[1]), rtol=1e-6)
    for g, w in zip(got_grads, want_grads, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
    # Without jax.grad only the forward runs; same numbers.
    plain = jax.jit(_fused, static_argnums=(5, 6))(hidden, kernel, bias, targets, weights,
                                                   ls, chunk)
    np.testing.assert_allclose(plain[0], want[0], rtol=1e-6)


def test_bfloat16_matches_the_unfused_loss_loosely():
    hidden, kernel, bias, targets, weights = _inputs(jnp.bfloat16, seed=1)
    want, want_grads = jax.value_and_grad(_unfused, (0, 1, 2), has_aux=True)(
        hidden, kernel, bias, targets, weights, 0.1)
    got, got_grads = jax.value_and_grad(_fused, (0, 1, 2), has_aux=True)(
        hidden, kernel, bias, targets, weights, 0.1, 8)
    assert got[0].dtype == jnp.float32
    np.testing.assert_allclose(got[0], want[0], rtol=1e-4)  # same bf16 products, f32 sums
    for g, w in zip(got_grads, want_grads, strict=True):
        assert g.dtype == w.dtype
        scale = float(jnp.max(jnp.abs(w.astype(jnp.float32))))
        np.testing.assert_allclose(g.astype(np.float32), w.astype(np.float32),
                                   atol=0.02 * scale)


def test_padding_positions_contribute_nothing_and_get_no_gradient():
    hidden, kernel, bias, targets, weights = _inputs(jnp.float32, seed=2)
    shifted = hidden.at[weights == 0].add(5.0)  # change only padded positions

    def loss(h):
        return _fused(h, kernel, bias, targets, weights, 0.1, 5)[0]

    assert float(loss(shifted)) == pytest.approx(float(loss(hidden)), rel=1e-6)
    grad = jax.grad(loss)(hidden)
    assert np.all(np.asarray(grad)[np.asarray(weights) == 0] == 0)
    assert np.any(np.asarray(grad)[np.asarray(weights) == 1] != 0)


def test_bad_shapes_and_arguments_say_what_is_wrong():
    hidden, kernel, _, targets, weights = _inputs(jnp.float32)
    with pytest.raises(ValueError, match="kernel"):
        ops.fused_cross_entropy(hidden, kernel.T, targets)
    with pytest.raises(ValueError, match="label_smoothing"):
        ops.fused_cross_entropy(hidden, kernel, targets, label_smoothing=1.0)
    with pytest.raises(ValueError, match="chunk"):
        ops.fused_cross_entropy(hidden, kernel, targets, chunk=0)
    with pytest.raises(ValueError, match="weights"):
        ops.fused_cross_entropy(hidden, kernel, targets, weights[:, :3])
