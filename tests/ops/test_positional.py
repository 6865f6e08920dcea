"""Sinusoidal encodings, RoPE and ALiBi against their formulas."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from transformer_jax import ops


def test_sinusoidal_matches_paper_formula():
    d = 8
    got = np.asarray(ops.sinusoidal_encoding(np.arange(6), d))
    assert got.shape == (6, d) and got.dtype == np.float32
    for pos in range(6):
        for i in range(d // 2):
            angle = pos / 10000 ** (2 * i / d)
            assert got[pos, 2 * i] == pytest.approx(math.sin(angle), abs=1e-6)
            assert got[pos, 2 * i + 1] == pytest.approx(math.cos(angle), abs=1e-6)


def test_sinusoidal_batched_positions_and_errors():
    pos = np.array([[0, 1, 2], [0, 0, 1]])
    got = ops.sinusoidal_encoding(pos, 4)
    assert got.shape == (2, 3, 4)
    np.testing.assert_allclose(got[1, 1], ops.sinusoidal_encoding(np.arange(1), 4)[0])
    np.testing.assert_allclose(got[0, 0], [0, 1, 0, 1])
    with pytest.raises(ValueError, match="even d_model; got 5"):
        ops.sinusoidal_encoding(pos, 5)


def _rand(rng, *shape):
    return jnp.asarray(rng.standard_normal(shape), jnp.float32)


def test_rope_matches_half_split_formula_and_preserves_norm():
    rng = np.random.default_rng(0)
    x = _rand(rng, 2, 3, 2, 6)
    pos = np.array([[0, 1, 5], [7, 2, 3]])
    got = np.asarray(ops.apply_rope(x, pos))
    xn = np.asarray(x, np.float64)
    for b in range(2):
        for t in range(3):
            for i in range(3):
                theta = pos[b, t] / 10000 ** (2 * i / 6)
                c, s = math.cos(theta), math.sin(theta)
                x1, x2 = xn[b, t, :, i], xn[b, t, :, i + 3]
                np.testing.assert_allclose(got[b, t, :, i], x1 * c - x2 * s, atol=1e-5)
                np.testing.assert_allclose(got[b, t, :, i + 3], x2 * c + x1 * s, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=-1), np.linalg.norm(xn, axis=-1), rtol=1e-5)
    np.testing.assert_allclose(ops.apply_rope(x, np.zeros((2, 3), int)), x, atol=1e-7)


def test_rope_dot_products_depend_only_on_relative_position():
    rng = np.random.default_rng(1)
    q, k = _rand(rng, 1, 4, 2, 8), _rand(rng, 1, 4, 2, 8)
    pos = jnp.array([[0, 3, 4, 9]])

    def scores(shift):
        qr, kr = ops.apply_rope(q, pos + shift), ops.apply_rope(k, pos + shift)
        return jnp.einsum("BTNH,BSNH->BNTS", qr, kr, precision=jax.lax.Precision.HIGHEST)

    base = scores(0)
    np.testing.assert_allclose(scores(17), base, atol=1e-4)
    np.testing.assert_allclose(scores(250), base, atol=1e-4)
    plain = jnp.einsum("BTNH,BSNH->BNTS", q, k, precision=jax.lax.Precision.HIGHEST)
    assert not np.allclose(base, plain, atol=1e-2)  # rotation changes off-diagonal scores


def test_rope_errors():
    with pytest.raises(ValueError, match=r"even head dimension H; got x shape \(1, 2, 1, 3\)"):
        ops.apply_rope(jnp.ones((1, 2, 1, 3)), jnp.zeros((1, 2), int))
    with pytest.raises(ValueError, match=r"positions must have shape \[B, T\] = \[1, 2\]"):
        ops.apply_rope(jnp.ones((1, 2, 1, 4)), jnp.zeros((1, 3), int))


def test_alibi_slopes_power_of_two():
    np.testing.assert_allclose(ops.alibi_slopes(8), [2.0**-i for i in range(1, 9)], rtol=1e-6)
    np.testing.assert_allclose(ops.alibi_slopes(4), [2.0**-2, 2.0**-4, 2.0**-6, 2.0**-8])


def test_alibi_slopes_non_power_of_two():
    # n=6: the 4-head slopes 1/4, 1/16, 1/64, 1/256, then the 1st and 3rd of the 8-head ones.
    np.testing.assert_allclose(
        ops.alibi_slopes(6), [1 / 4, 1 / 16, 1 / 64, 1 / 256, 1 / 2, 1 / 8], rtol=1e-6
    )
    # n=12: the 8-head slopes, then 16-head slopes 2^-0.5, 2^-1.5, 2^-2.5, 2^-3.5.
    want = [2.0**-i for i in range(1, 9)] + [2.0**-0.5, 2.0**-1.5, 2.0**-2.5, 2.0**-3.5]
    np.testing.assert_allclose(ops.alibi_slopes(12), want, rtol=1e-6)


def test_alibi_bias_values():
    q_pos = np.array([[0, 1, 2]])
    k_pos = np.array([[0, 1, 2, 3]])
    got = np.asarray(ops.alibi_bias(2, q_pos, k_pos))
    assert got.shape == (1, 2, 3, 4)
    slopes = [2.0**-4, 2.0**-8]
    for n in range(2):
        for i in range(3):
            for j in range(4):
                assert got[0, n, i, j] == pytest.approx(-slopes[n] * abs(i - j))
