"""AttentionSpec (causal order, packed segments, key padding, ALiBi from [B, T] / [B, S]
arrays) in every implementation, against numpy loops that build each term from its definition;
chunked with query and key blocks; head-dim checks; softmax precision."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from references import HI, numpy_attention, row_attention

from transformer_jax import ops
from transformer_jax.ops.chunked_attention import chunked_dot_product_attention

TOL = 1e-5

# Implementations that take any dense mask and bias ("splash" takes structured masks
# only: tests/ops/test_splash_attention.py).
ANY_MASK = tuple(i for i in ops.IMPLEMENTATIONS if i != "splash")


def numpy_terms(q_pos, k_pos, q_seg, k_seg, k_valid, slopes, causal, n):
    """Dense mask [B, N, T, S] and bias by loops, straight from the definitions."""
    b_, t_ = q_pos.shape
    s_ = k_pos.shape[1]
    mask = np.ones((b_, n, t_, s_), bool)
    bias = np.zeros((b_, n, t_, s_))
    for b in range(b_):
        for i in range(t_):
            for j in range(s_):
                ok = k_valid[b, j] and (not causal or k_pos[b, j] <= q_pos[b, i])
                if q_seg is not None:
                    ok = ok and q_seg[b, i] != 0 and q_seg[b, i] == k_seg[b, j]
                mask[b, :, i, j] = ok
                if slopes is not None:
                    bias[b, :, i, j] = -np.asarray(slopes) * abs(q_pos[b, i] - k_pos[b, j])
    return mask, bias


def _packed(rng, b, length, segments=True):
    """Segment ids (1, 1, 2, 2, 2, ..., 0 padding) and per-segment positions [b, length]."""
    seg = np.zeros((b, length), np.int32)
    pos = np.zeros((b, length), np.int32)
    for r in range(b):
        used = rng.integers(1, length + 1)
        cuts = np.sort(rng.choice(np.arange(1, used), size=min(2, used - 1), replace=False)) \
            if segments and used > 2 else []
        ids = np.searchsorted(np.asarray(cuts), np.arange(used), side="right") + 1
        seg[r, :used] = ids
        for i in range(used):
            start = np.flatnonzero(ids == ids[i])[0]
            pos[r, i] = i - start
    return seg, pos


def _case(seed, b, t, s, n, h, kind):
    rng = np.random.default_rng(seed)
    q, k, v, cot = (jnp.asarray(rng.standard_normal(shape), jnp.float32)
                    for shape in ((b, t, n, h), (b, s, n, h), (b, s, n, h), (b, t, n, h)))
    slopes = ops.alibi_slopes(n) * 4.0  # steeper than usual, so the bias matters
    if kind == "self_packed":  # decoder self-attention of packed rows: causal+segments+ALiBi
        seg, pos = _packed(rng, b, t)
        spec = ops.AttentionSpec(causal=True, q_positions=pos, k_positions=pos,
                                 q_segments=seg, k_segments=seg, alibi_slopes=slopes)
        ref = numpy_terms(pos, pos, seg, seg, np.ones((b, s), bool), slopes, True, n)
    elif kind == "encoder":  # key padding + ALiBi with default positions
        valid = np.arange(s) < rng.integers(1, s + 1, size=(b, 1))
        spec = ops.AttentionSpec(k_valid=valid, alibi_slopes=slopes)
        grid = np.broadcast_to(np.arange(s), (b, s))
        ref = numpy_terms(grid, grid, None, None, valid, slopes, False, n)
    elif kind == "bottom_right":  # T new queries are the last T of S keys
        spec = ops.AttentionSpec(causal=True)
        q_pos = np.broadcast_to(s - t + np.arange(t), (b, t))
        k_pos = np.broadcast_to(np.arange(s), (b, s))
        ref = numpy_terms(q_pos, k_pos, None, None, np.ones((b, s), bool), None, True, n)
    else:  # cross-attention of packed rows: segments + key padding, no positions
        q_seg, _ = _packed(rng, b, t)
        k_seg, _ = _packed(rng, b, s)
        valid = k_seg != 0
        spec = ops.AttentionSpec(q_segments=q_seg, k_segments=k_seg, k_valid=valid)
        zeros_t, zeros_s = np.zeros((b, t), int), np.zeros((b, s), int)
        ref = numpy_terms(zeros_t, zeros_s, q_seg, k_seg, valid, None, False, n)
    return (q, k, v, cot), spec, ref


def _grads(fn, q, k, v, cot):
    return jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v) * cot), argnums=(0, 1, 2))(q, k, v)


@pytest.mark.parametrize("kind", ["self_packed", "encoder", "bottom_right", "cross_packed"])
@pytest.mark.parametrize("chunk, q_chunk", [(3, 2), (4, None), (16, 5)])
def test_spec_matches_numpy_terms_in_every_implementation(kind, chunk, q_chunk):
    t, s = (4, 9) if kind in ("bottom_right", "cross_packed") else (9, 9)
    (q, k, v, cot), spec, (mask, bias) = _case(7, 2, t, s, 2, 4, kind)
    want, _ = numpy_attention(q, k, v, mask, bias)
    ref_grads = _grads(lambda q, k, v: row_attention(q, k, v, jnp.asarray(mask),
                                                     jnp.asarray(bias, jnp.float32)), q, k, v, cot)
    for impl in ANY_MASK:
        fn = jax.jit(lambda q, k, v, spec, impl=impl: ops.dot_product_attention(
            q, k, v, spec=spec, implementation=impl, chunk_size=chunk,
            query_chunk_size=q_chunk, precision=HI))
        np.testing.assert_allclose(fn(q, k, v, spec), want, atol=TOL, err_msg=impl)
        grads = _grads(lambda q, k, v, fn=fn: fn(q, k, v, spec), q, k, v, cot)
        for name, g, g_ref in zip("qkv", grads, ref_grads, strict=True):
            np.testing.assert_allclose(g, g_ref, atol=TOL, rtol=TOL, err_msg=f"{impl} d{name}")


def test_spec_combines_with_dense_mask_and_bias_with_bias_gradient():
    (q, k, v, cot), spec, (mask, bias) = _case(3, 2, 7, 7, 2, 4, "self_packed")
    rng = np.random.default_rng(0)
    extra_mask = jnp.asarray(rng.random((2, 1, 7, 7)) > 0.2)
    extra_bias = jnp.asarray(rng.standard_normal((1, 2, 7, 7)), jnp.float32)
    want, _ = numpy_attention(q, k, v, mask & np.asarray(extra_mask),
                              bias + np.asarray(extra_bias))

    def run(impl, q, k, v, b):
        return ops.dot_product_attention(q, k, v, mask=extra_mask, bias=b, spec=spec,
                                         implementation=impl, chunk_size=3,
                                         query_chunk_size=2, precision=HI)

    grads = {}
    for impl in ("xla", "chunked"):
        np.testing.assert_allclose(run(impl, q, k, v, extra_bias), want, atol=TOL)
        grads[impl] = jax.grad(lambda b, impl=impl: jnp.sum(run(impl, q, k, v, b) * cot))(
            extra_bias)
    np.testing.assert_allclose(grads["chunked"], grads["xla"], atol=TOL)
    assert np.abs(grads["xla"]).max() > 1e-3


def test_spec_errors():
    q = k = v = jnp.zeros((2, 3, 2, 4))
    cases = [
        (ops.AttentionSpec(k_valid=np.ones((2, 4), bool)),
         r"k_valid has shape \(2, 4\).*\[2 or 1, 3\]"),
        (ops.AttentionSpec(q_segments=np.ones((2, 3), int)), "both q_segments and k_segments"),
        (ops.AttentionSpec(alibi_slopes=jnp.ones(3)), r"alibi_slopes has shape \(3,\).*\[2\]"),
    ]
    for spec, match in cases:
        with pytest.raises(ValueError, match=match):
            ops.dot_product_attention(q, k, v, spec=spec, implementation="chunked")


def test_causal_mask_bottom_right_alignment():
    got = np.asarray(ops.causal_mask(2, 5, align="bottom_right"))[0, 0]
    np.testing.assert_array_equal(got, [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    top = np.asarray(ops.causal_mask(2, 5))[0, 0]
    np.testing.assert_array_equal(top, [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0]])
    with pytest.raises(ValueError, match="align='middle'"):
        ops.causal_mask(2, 5, align="middle")


@pytest.mark.parametrize("impl", ops.IMPLEMENTATIONS)
def test_value_head_dim_must_match_in_every_implementation(impl):
    q, k = jnp.zeros((1, 3, 2, 4)), jnp.zeros((1, 5, 2, 4))
    v = jnp.zeros((1, 5, 2, 8))
    with pytest.raises(ValueError, match=r"same head dim H; got query H=4, key H=4, value H=8"):
        ops.dot_product_attention(q, k, v, implementation=impl)
    with pytest.raises(ValueError, match=r"query H=4, key H=8, value H=8"):
        ops.dot_product_attention(q, v, v, implementation=impl)


def test_chunked_function_checks_head_dims_itself():
    with pytest.raises(ValueError, match="value H=8"):
        chunked_dot_product_attention(jnp.zeros((1, 3, 2, 4)), jnp.zeros((1, 5, 2, 4)),
                                      jnp.zeros((1, 5, 2, 8)))
