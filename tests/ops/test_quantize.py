"""ops.quantize against numpy: the quantisers exactly, the int8 dot exactly (int32, past
float32's integers), and int8_matmul within the error bound its scales give."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from transformer_jax import ops


def np_quantize(x, axis, scale=None):
    """numpy reference: symmetric absmax/127 along ``axis`` (scale 1 for an all-zero slice);
    ``scale`` given: quantise with it."""
    if scale is None:
        absmax = np.max(np.abs(x), axis=axis, keepdims=True).astype(np.float32)
        scale = np.where(absmax > 0, absmax / np.float32(127), np.float32(1)).astype(np.float32)
    q = np.clip(np.round(x.astype(np.float32) / scale), -127, 127).astype(np.int8)
    return q, scale


def check_quantized(x, q, scale, axis):
    """``scale`` is numpy's to 1 ulp (XLA may divide by multiplying with the reciprocal),
    ``q`` is numpy's with that scale, and ``q * scale`` is within half a step of ``x``."""
    ref_q, ref_scale = np_quantize(x, axis)
    np.testing.assert_array_max_ulp(scale, ref_scale.reshape(scale.shape), maxulp=1)
    np.testing.assert_array_equal(q, np_quantize(x, axis, np.expand_dims(scale, axis)
                                                 if scale.ndim < x.ndim else scale)[0])
    assert q.dtype == np.int8 and scale.dtype == np.float32
    step = np.expand_dims(scale, axis) if scale.ndim < x.ndim else scale
    assert np.all(np.abs(np.asarray(ops.dequantize(q, step)) - x) <= step / 2 * (1 + 1e-6))


def test_quantizers_match_numpy_and_stay_within_half_a_step():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(48, 40)).astype(np.float32)
    w[:, 3] = 0.0  # an all-zero output channel
    q, scale = jax.device_get(ops.quantize_per_channel(w))
    assert scale.shape == (40,)
    check_quantized(w, q, scale, axis=0)
    assert np.abs(q).max() == 127 and q[:, 3].tolist() == [0] * 48 and scale[3] == 1

    x = rng.normal(size=(2, 3, 40)).astype(np.float32) * np.array([1e-3, 1, 50])[None, :, None]
    xq, xs = jax.device_get(ops.quantize_rows(x))
    assert xs.shape == (2, 3, 1)
    check_quantized(x, xq, xs, axis=-1)
    assert np.all(np.abs(xq).max(-1) == 127)


def test_int8_dot_accumulates_exactly_in_int32():
    # sums up to 4096 * 127^2 = 66M: past 2^24, where a float32 accumulator rounds
    rng = np.random.default_rng(1)
    xq = rng.choice(np.array([-127, -126, 125, 127], np.int8), size=(3, 4096))
    xq[0] = 127
    q = rng.choice(np.array([-127, 1, 126, 127], np.int8), size=(4096, 5))
    q[:, 0] = 127
    got = np.asarray(ops.int8_dot(jnp.asarray(xq), jnp.asarray(q)))
    want = xq.astype(np.int64) @ q.astype(np.int64)
    assert got.dtype == np.int32 and got.shape == (3, 5)
    assert want[0, 0] == 4096 * 127 * 127 > 2**24
    np.testing.assert_array_equal(got, want)


def test_int8_matmul_within_the_bound_of_its_scales():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(2, 7, 64)).astype(np.float32)
    w = (rng.normal(size=(64, 24)) * rng.uniform(0.1, 3.0, size=24)).astype(np.float32)
    q, scale = ops.quantize_per_channel(w)
    got = np.asarray(ops.int8_matmul(x, q, scale))
    assert got.shape == (2, 7, 24) and got.dtype == np.float32
    w_hat = np.asarray(ops.dequantize(q, scale), np.float64)  # [D_in, D_out]
    _, row_scale = np_quantize(x, axis=-1)  # [2, 7, 1]
    exact = x.astype(np.float64) @ w.astype(np.float64)
    # |x w - x^ w^| <= |x| |w - w^| + |x - x^| |w^| <= s_o/2 sum|x| + s_r/2 sum|w^|
    bound = (np.asarray(scale, np.float64) / 2 * np.abs(x).sum(-1, keepdims=True)
             + row_scale / 2 * np.abs(w_hat).sum(0))
    rounding = 1e-6 * np.abs(x) @ np.abs(w_hat)  # the float32 rescale and the reference
    assert np.all(np.abs(got - exact) <= bound + rounding)
    assert np.abs(got - exact).max() > 0  # the bound is not met by being exact
    # and it is the dequantised product of the quantised operands, to float32 rounding
    xq, xs = jax.device_get(ops.quantize_rows(x))  # numpy's (the test above)
    emulated = (xq.astype(np.int64) @ np.asarray(q).astype(np.int64)) * xs * np.asarray(scale)
    np.testing.assert_allclose(got, emulated, rtol=1e-6, atol=1e-6)


def test_int8_matmul_dtype_and_errors():
    q, scale = ops.quantize_per_channel(np.eye(8, 4, dtype=np.float32))
    x = jnp.ones((3, 8), jnp.bfloat16)
    assert ops.int8_matmul(x, q, scale).dtype == jnp.bfloat16
    assert ops.int8_matmul(x, q, scale, dtype=jnp.float32).dtype == jnp.float32
    with pytest.raises(ValueError, match=r"\[D_in, D_out\] weight"):
        ops.quantize_per_channel(np.zeros((2, 3, 4), np.float32))
    with pytest.raises(ValueError, match="int8_dot needs"):
        ops.int8_dot(jnp.zeros((3, 5), jnp.int8), q)
