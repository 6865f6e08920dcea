"""LoRA pure functions against numpy (float64, merged weights) and their gradients against
closed forms and central finite differences."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from transformer_jax import ops

HI = "highest"


def _case(seed=0, lead=(2, 3), d_in=6, d_out=5, r=2):
    rng = np.random.default_rng(seed)
    x, w = rng.standard_normal((*lead, d_in)), rng.standard_normal((d_in, d_out))
    a, b = rng.standard_normal((d_in, r)), rng.standard_normal((r, d_out))
    return x, w, a, b, rng


def test_lora_dense_and_merge_match_numpy():
    x, w, a, b, _ = _case()
    scale = 16 / 2  # alpha / r
    want = x @ (w + scale * (a @ b))  # float64, the merged weight
    f32 = [jnp.asarray(t, jnp.float32) for t in (x, w, a, b)]
    got = ops.lora_dense(*f32, scale, precision=HI)
    assert got.shape == (2, 3, 5) and got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    merged = ops.lora_merge(*f32[1:], scale, precision=HI)
    np.testing.assert_allclose(merged, w + scale * a @ b, rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(jnp.matmul(f32[0], merged, precision=HI), got, rtol=1e-5,
                               atol=1e-4)
    # b = 0 (LoRA's start): the frozen layer exactly
    np.testing.assert_array_equal(ops.lora_dense(f32[0], f32[1], f32[2], jnp.zeros((2, 5)), scale),
                                  jnp.matmul(f32[0], f32[1]))


def test_lora_gradients_match_closed_form_and_finite_differences():
    x, w, a, b, rng = _case(1)
    scale = 0.7
    cot = rng.standard_normal((2, 3, 5))
    loss = lambda x, w, a, b: jnp.sum(ops.lora_dense(x, w, a, b, scale, precision=HI) * cot)
    with jax.enable_x64():
        args = [jnp.asarray(t, jnp.float64) for t in (x, w, a, b)]
        gx, gw, ga, gb = jax.grad(loss, argnums=(0, 1, 2, 3))(*args)
        xf, cf = x.reshape(-1, 6), cot.reshape(-1, 5)
        np.testing.assert_allclose(ga, scale * xf.T @ (cf @ b.T), rtol=1e-10)
        np.testing.assert_allclose(gb, scale * (xf @ a).T @ cf, rtol=1e-10)
        np.testing.assert_allclose(gw, xf.T @ cf, rtol=1e-10)
        np.testing.assert_allclose(gx, cot @ (w + scale * a @ b).T, rtol=1e-10)
        eps = 1e-6
        for name, idx, grad in (("a", 2, ga), ("b", 3, gb)):
            fd = np.zeros(args[idx].shape)
            for pos in np.ndindex(fd.shape):
                plus, minus = list(args), list(args)
                plus[idx] = args[idx].at[pos].add(eps)
                minus[idx] = args[idx].at[pos].add(-eps)
                fd[pos] = (loss(*plus) - loss(*minus)) / (2 * eps)
            np.testing.assert_allclose(grad, fd, rtol=1e-6, atol=1e-8, err_msg=name)


def test_lora_under_jit_and_vmap():
    x, w, a, b, _ = _case(2, lead=(4,))
    f32 = [jnp.asarray(t, jnp.float32) for t in (x, w, a, b)]
    per_row = jax.vmap(lambda x: ops.lora_dense(x, *f32[1:], 2.0, precision=HI))(f32[0])
    np.testing.assert_allclose(per_row, jax.jit(ops.lora_dense)(*f32, 2.0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shapes, match", [
    (((6, 5), (6, 2), (3, 5)), r"one rank r; got a \(6, 2\) and b \(3, 5\)"),
    (((6, 5), (5, 2), (2, 5)), r"a must be \[6, r\]"),
    (((6, 5), (6, 2), (2, 4)), r"b \[r, 5\]"),
    (((6, 5, 1), (6, 2), (2, 5)), "needs w \\[D_in, D_out\\]"),
])
def test_lora_shape_errors(shapes, match):
    w, a, b = (jnp.zeros(s) for s in shapes)
    with pytest.raises(ValueError, match=match):
        ops.lora_merge(w, a, b, 1.0)
    with pytest.raises(ValueError, match=match):
        ops.lora_dense(jnp.zeros((2, 6)), w, a, b, 1.0)
    with pytest.raises(ValueError, match=r"x \(2, 4\) must end in D_in = 6"):
        ops.lora_dense(jnp.zeros((2, 4)), jnp.zeros((6, 5)), jnp.zeros((6, 2)),
                       jnp.zeros((2, 5)), 1.0)
