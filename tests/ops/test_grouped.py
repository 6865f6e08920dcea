"""Grouped-query / multi-query attention (K key/value heads, K dividing the N query heads) in
every implementation, against the same attention with the key/value heads repeated N/K times
(numpy loops for values, a per-row jnp formulation through ``jnp.repeat`` for gradients)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from references import HI, numpy_attention, repeat_kv_heads, row_attention

from transformer_jax import ops

TOL = 1e-5
ANY_MASK = tuple(i for i in ops.IMPLEMENTATIONS if i != "splash")


def _rand(rng, *shape):
    return jnp.asarray(rng.standard_normal(shape), jnp.float32)


def _case(seed, b, t, s, n, kh, h):
    rng = np.random.default_rng(seed)
    return (_rand(rng, b, t, n, h), _rand(rng, b, s, kh, h), _rand(rng, b, s, kh, h),
            _rand(rng, b, t, n, h), rng)


def _grads(fn, q, k, v, cot):
    return jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v) * cot), argnums=(0, 1, 2))(q, k, v)


def _reference(q, k, v, mask, bias, cot):
    """Values by numpy loops over repeated heads; gradients through jnp.repeat."""
    n = q.shape[2]
    want, _ = numpy_attention(q, np.repeat(k, n // k.shape[2], 2),
                              np.repeat(v, n // v.shape[2], 2), mask, bias)
    grads = _grads(lambda q, k, v: row_attention(q, repeat_kv_heads(k, n), repeat_kv_heads(v, n),
                                                 mask, bias), q, k, v, cot)
    return want, grads


@pytest.mark.parametrize("n, kh, mask_kind", [
    (4, 2, "padding+bias"),  # grouped, a per-head bias over the query heads
    (4, 1, "causal"),  # multi-query
    (6, 3, "random"),  # a per-head random mask with a fully masked row
    (2, 2, "none"),  # K = N: plain multi-head through the same checks
])
def test_grouped_query_attention_matches_repeated_heads(n, kh, mask_kind):
    b, t, s, h = 2, 5, 7, 4
    q, k, v, cot, rng = _case(n * 10 + kh, b, t, s, n, kh, h)
    mask = bias = None
    if mask_kind == "padding+bias":
        mask = ops.padding_mask(np.ones((b, t), bool), np.arange(s) < np.array([[7], [4]]))
        bias = _rand(rng, 1, n, t, s)
    elif mask_kind == "causal":
        mask = ops.causal_mask(t, s, align="bottom_right")
    elif mask_kind == "random":
        m = rng.random((b, n, t, s)) > 0.4
        m[1, 2, 3] = False
        mask = jnp.asarray(m)
    want, ref_grads = _reference(q, k, v, mask, bias, cot)
    for impl in ANY_MASK:
        fn = jax.jit(lambda q, k, v, impl=impl: ops.dot_product_attention(
            q, k, v, mask=mask, bias=bias, implementation=impl, chunk_size=3, precision=HI))
        out = fn(q, k, v)
        assert out.shape == q.shape
        np.testing.assert_allclose(out, want, atol=TOL, err_msg=impl)
        for name, g, g_ref in zip("qkv", _grads(fn, q, k, v, cot), ref_grads, strict=True):
            assert g.shape == g_ref.shape
            np.testing.assert_allclose(g, g_ref, atol=TOL, rtol=TOL, err_msg=f"{impl} d{name}")


def test_grouped_weights_and_jax_nn_agree():
    q, k, v, _, _ = _case(1, 2, 4, 6, 8, 2, 4)
    out, weights = ops.dot_product_attention(q, k, v, return_weights=True, precision=HI)
    assert weights.shape == (2, 8, 4, 6)
    _, want_w = numpy_attention(q, np.repeat(k, 4, 2), np.repeat(v, 4, 2))
    np.testing.assert_allclose(weights, want_w, atol=TOL)
    np.testing.assert_allclose(out, jax.nn.dot_product_attention(q, k, v), atol=TOL)


def test_xla_path_never_builds_repeated_keys():
    # No intermediate of the "xla" program (values or gradients) has the [B, S, N, H] shape of
    # repeated keys; with N = 8 query heads and K = 2 key heads the keys stay [B, S, 2, H].
    b, t, s, n, kh, h = 2, 3, 5, 8, 2, 4
    q, k, v, _, _ = _case(2, b, t, s, n, kh, h)
    loss = lambda q, k, v: jnp.sum(ops.dot_product_attention(q, k, v))
    jaxpr = jax.make_jaxpr(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, k, v)
    shapes = {tuple(var.aval.shape) for eqn in jaxpr.jaxpr.eqns for var in eqn.outvars}
    assert (b, s, kh, h) in shapes
    assert (b, s, n, h) not in shapes


def test_splash_grouped_query_values_and_gradients():
    # Pallas' interpreter on CPU: GQA (4 query heads on 2 key heads) with a causal window.
    q, k, v, cot, _ = _case(3, 2, 12, 12, 4, 2, 8)
    lengths = jnp.asarray([12, 7], jnp.int32)

    def run(impl):
        fn = jax.jit(lambda q, k, v: ops.dot_product_attention(
            q, k, v, is_causal=True, local_window_size=(4, 0), key_value_seq_lengths=lengths,
            implementation=impl, precision=HI))
        return fn(q, k, v), _grads(fn, q, k, v, cot)

    want, want_grads = run("xla")
    got, grads = run("splash")
    np.testing.assert_allclose(got, want, atol=2e-5)
    for name, g, g_ref in zip("qkv", grads, want_grads, strict=True):
        np.testing.assert_allclose(g, g_ref, atol=2e-5, err_msg=f"d{name}")


def test_multi_head_attention_with_fewer_key_value_heads():
    rng = np.random.default_rng(4)
    d, n, kh, h = 8, 4, 2, 2
    params = {"query": _rand(rng, d, n, h), "key": _rand(rng, d, kh, h),
              "value": _rand(rng, d, kh, h), "out": _rand(rng, n, h, d),
              "key_bias": _rand(rng, kh, h), "value_bias": _rand(rng, kh, h)}
    x = _rand(rng, 2, 5, d)
    got = ops.multi_head_attention(x, x, params, precision=HI, implementation="chunked",
                                   chunk_size=2)
    q = np.einsum("btd,dnh->btnh", x, params["query"])
    k = np.einsum("btd,dkh->btkh", x, params["key"]) + np.asarray(params["key_bias"])
    v = np.einsum("btd,dkh->btkh", x, params["value"]) + np.asarray(params["value_bias"])
    heads, _ = numpy_attention(q, np.repeat(k, 2, 2), np.repeat(v, 2, 2))
    np.testing.assert_allclose(got, np.einsum("btnh,nhd->btd", heads, params["out"]), atol=1e-4)
    with pytest.raises(ValueError, match=r"params\['key'\] must have shape \(8, 4, 2\).*divide"):
        ops.multi_head_attention(x, x, dict(params, key=_rand(rng, d, 3, h)))
    with pytest.raises(ValueError, match=r"params\['value_bias'\] must have shape \(2, 2\)"):
        ops.multi_head_attention(x, x, dict(params, value_bias=_rand(rng, n, h)))
