"""dot_product_attention / multi_head_attention against references written differently.

References: explicit numpy loops over (batch, head, query) for outputs and weights, and a
per-row jnp formulation (vmapped) differentiated with jax.grad for gradients.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from references import HI, numpy_attention, row_attention

from transformer_jax import ops
from transformer_jax.ops.chunked_attention import block_dropout_keep

TOL = 1e-5

# Implementations that take any dense mask and bias ("splash" takes structured masks
# only: tests/ops/test_splash_attention.py).
ANY_MASK = tuple(i for i in ops.IMPLEMENTATIONS if i != "splash")


def _loss_grads(fn, q, k, v, bias, cot):
    def loss(q, k, v, bias):
        return jnp.sum(fn(q, k, v, bias) * cot)

    argnums = (0, 1, 2) if bias is None else (0, 1, 2, 3)
    return jax.grad(loss, argnums=argnums)(q, k, v, bias)


@functools.partial(jax.jit, static_argnames=("impl", "chunk"))
def _impl_out_and_grads(q, k, v, mask, bias, cot, impl, chunk):
    fn = lambda q, k, v, b: ops.dot_product_attention(
        q, k, v, mask=mask, bias=b, implementation=impl, chunk_size=chunk, precision=HI
    )
    return fn(q, k, v, bias), _loss_grads(fn, q, k, v, bias, cot)


@jax.jit
def _ref_out_and_grads(q, k, v, mask, bias, cot):
    fn = lambda q, k, v, b: row_attention(q, k, v, mask, b)
    return fn(q, k, v, bias), _loss_grads(fn, q, k, v, bias, cot)


def _rand(rng, *shape):
    return jnp.asarray(rng.standard_normal(shape), jnp.float32)


def _make_mask(kind, rng, b, n, t, s):
    if kind == "none":
        return None
    if kind == "padding":
        q_len = rng.integers(1, t + 1, size=b)
        k_len = rng.integers(1, s + 1, size=b)
        return ops.padding_mask(np.arange(t) < q_len[:, None], np.arange(s) < k_len[:, None])
    if kind == "key_padding":
        k_len = rng.integers(0, s + 1, size=b)  # may mask every key of a row
        return jnp.asarray((np.arange(s) < k_len[:, None])[:, None, None, :])  # [B,1,1,S]
    if kind == "causal":
        return ops.causal_mask(t, s, offset=s - t)
    if kind == "segment":
        return ops.segment_mask(rng.integers(0, 3, size=(b, t)), rng.integers(0, 3, size=(b, s)))
    m = rng.random((b, n, t, s)) > 0.5  # random per head, with a fully masked row
    m[0, 0, 0, :] = False
    return jnp.asarray(m)


BIAS_SHAPES = {
    "none": None,
    "full": lambda b, n, t, s: (b, n, t, s),
    "heads": lambda b, n, t, s: (1, n, t, s),
    "keys": lambda b, n, t, s: (b, 1, 1, s),
    "scalar_per_head": lambda b, n, t, s: (1, n, 1, 1),
}


def _check_case(b, t, s, n, h, mask_kind, bias_kind, chunk, seed):
    rng = np.random.default_rng(seed)
    q, k, v = _rand(rng, b, t, n, h), _rand(rng, b, s, n, h), _rand(rng, b, s, n, h)
    cot = _rand(rng, b, t, n, h)
    mask = _make_mask(mask_kind, rng, b, n, t, s)
    bias = None if bias_kind == "none" else _rand(rng, *BIAS_SHAPES[bias_kind](b, n, t, s))
    want, _ = numpy_attention(q, k, v, mask, bias)
    ref_out, ref_grads = _ref_out_and_grads(q, k, v, mask, bias, cot)
    np.testing.assert_allclose(ref_out, want, atol=TOL)  # the gradient reference is sound
    for impl in ANY_MASK:
        out, grads = _impl_out_and_grads(q, k, v, mask, bias, cot, impl, chunk)
        assert out.shape == q.shape and out.dtype == jnp.float32
        np.testing.assert_allclose(out, want, atol=TOL, err_msg=impl)
        for name, g, g_ref in zip("qkvb"[: len(grads)], grads, ref_grads, strict=True):
            assert np.all(np.isfinite(g)), (impl, name)
            np.testing.assert_allclose(g, g_ref, atol=TOL, rtol=TOL, err_msg=f"{impl} d{name}")


@settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
@given(
    b=st.integers(1, 2),
    t=st.integers(1, 6),
    s=st.integers(1, 9),
    n=st.integers(1, 3),
    h=st.sampled_from([1, 2, 4, 8]),
    mask_kind=st.sampled_from(["none", "padding", "key_padding", "causal", "segment", "random"]),
    bias_kind=st.sampled_from(sorted(BIAS_SHAPES)),
    chunk=st.integers(1, 10),
    seed=st.integers(0, 2**16),
)
def test_all_implementations_match_references(b, t, s, n, h, mask_kind, bias_kind, chunk, seed):
    _check_case(b, t, s, n, h, mask_kind, bias_kind, chunk, seed)


@pytest.mark.parametrize(
    "mask_kind,bias_kind",
    [
        ("padding", "scalar_per_head"),
        ("key_padding", "keys"),  # some rows see no key at all
        ("causal", "heads"),
        ("segment", "full"),
        ("random", "none"),
        ("none", "full"),
    ],
)
def test_every_mask_and_bias_kind(mask_kind, bias_kind):
    _check_case(2, 5, 7, 2, 4, mask_kind, bias_kind, 3, seed=len(mask_kind) + len(bias_kind))


@pytest.mark.parametrize(
    "t,s,chunk",
    [
        (3, 10, 4),  # S not divisible by the chunk, cross attention T != S
        (8, 8, 3),  # self attention, ragged last block
        (4, 6, 32),  # chunk larger than S
        (2, 5, 1),  # one key per block
    ],
)
def test_chunked_block_edges(t, s, chunk):
    _check_case(2, t, s, 2, 4, "random", "full", chunk, seed=t * 100 + s)


def test_fully_masked_rows_are_zero_with_zero_gradients():
    rng = np.random.default_rng(0)
    q, k, v = _rand(rng, 1, 3, 2, 4), _rand(rng, 1, 5, 2, 4), _rand(rng, 1, 5, 2, 4)
    mask = np.ones((1, 2, 3, 5), bool)
    mask[0, 1, 2] = False  # head 1, query 2 sees nothing
    mask = jnp.asarray(mask)
    for impl in ANY_MASK:
        out, (gq, gk, gv) = _impl_out_and_grads(q, k, v, mask, None, jnp.ones_like(q), impl, 2)
        np.testing.assert_array_equal(out[0, 2, 1], 0.0)
        assert np.all(out[0, 2, 0] != 0)
        np.testing.assert_array_equal(gq[0, 2, 1], 0.0)
        assert all(np.all(np.isfinite(g)) for g in (gq, gk, gv))


def _peaked_bf16_case():
    """bf16-exact q/k whose float32 logits are ~90 apart by ~0.35: a bfloat16 softmax (8-bit
    mantissa, spacing 0.5 at 90) rounds the differences away; float32 keeps them."""
    h, s = 8, 6
    q = np.zeros((1, 1, 1, h), np.float32)
    q[..., 0], q[..., 1] = 16.0, 1.0
    k = np.zeros((1, s, 1, h), np.float32)
    k[:, :, 0, 0] = 16.0
    k[:, :, 0, 1] = np.arange(s) * 0.5  # logits (256 + 0.5 j) / sqrt(8)
    v = np.zeros((1, s, 1, h), np.float32)
    v[:, :, 0, 0] = np.arange(s) * 2.0  # outputs weigh the keys' positions
    return (jnp.asarray(x, jnp.bfloat16) for x in (q, k, v))


def test_bfloat16_inputs_softmax_in_float32():
    q, k, v = _peaked_bf16_case()
    want, _ = numpy_attention(*(np.asarray(x.astype(jnp.float32)) for x in (q, k, v)))
    assert want[0, 0, 0, 0] > 5.0  # the last keys dominate
    for impl in ops.IMPLEMENTATIONS:
        out = ops.dot_product_attention(q, k, v, implementation=impl, chunk_size=4,
                                        query_chunk_size=1)
        assert out.dtype == jnp.bfloat16
        # Output rounding to bfloat16 only: 2**-8 relative at ~6.
        np.testing.assert_allclose(out.astype(np.float32)[0, 0, 0, 0], want[0, 0, 0, 0],
                                   rtol=2**-7, err_msg=impl)
    scale = 1 / math.sqrt(8)
    logits = (256 + 0.5 * np.arange(6)) * scale
    bf16 = np.asarray(jnp.asarray(logits, jnp.bfloat16).astype(jnp.float32))
    w16 = np.exp(bf16 - bf16.max())
    # the case is sensitive: a bf16 softmax would move the output by more than the tolerance
    assert abs((w16 / w16.sum()) @ (np.arange(6) * 2.0) - want[0, 0, 0, 0]) > (
        1.5 * 2**-7 * want[0, 0, 0, 0])


def test_return_weights_match_numpy_and_sum_to_one():
    rng = np.random.default_rng(2)
    q, k, v = _rand(rng, 2, 3, 2, 4), _rand(rng, 2, 5, 2, 4), _rand(rng, 2, 5, 2, 4)
    mask = ops.padding_mask(np.array([[1, 1, 0], [1, 1, 1]]), np.array([[1, 1, 1, 0, 0]] * 2))
    out, weights = ops.dot_product_attention(q, k, v, mask=mask, return_weights=True, precision=HI)
    want_out, want_w = numpy_attention(q, k, v, mask)
    np.testing.assert_allclose(out, want_out, atol=TOL)
    np.testing.assert_allclose(weights, want_w, atol=TOL)
    np.testing.assert_allclose(weights[1].sum(-1), 1.0, atol=1e-6)
    with pytest.raises(ValueError, match="return_weights=True needs implementation='xla'"):
        ops.dot_product_attention(q, k, v, implementation="chunked", return_weights=True)


def test_xla_dropout_uses_one_keep_mask():
    rng = np.random.default_rng(3)
    q, k, v = _rand(rng, 1, 4, 2, 4), _rand(rng, 1, 6, 2, 4), _rand(rng, 1, 6, 2, 4)
    key, rate = jax.random.key(7), 0.5
    out = ops.dot_product_attention(q, k, v, dropout_rate=rate, dropout_rng=key, precision=HI)
    keep = ops.keep_mask(key, rate, (1, 2, 4, 6)) * ops.keep_scale(rate)
    np.testing.assert_allclose(out, row_attention(q, k, v, keep=keep), atol=TOL)
    # No rng -> deterministic, dropout off.
    np.testing.assert_allclose(
        ops.dot_product_attention(q, k, v, dropout_rate=rate, precision=HI),
        numpy_attention(q, k, v)[0],
        atol=TOL,
    )


def test_chunked_dropout_matches_blockwise_reference_with_gradients():
    rng = np.random.default_rng(4)
    q, k, v = _rand(rng, 2, 3, 2, 4), _rand(rng, 2, 7, 2, 4), _rand(rng, 2, 7, 2, 4)
    bias, cot = _rand(rng, 1, 2, 3, 7), _rand(rng, 2, 3, 2, 4)
    mask = _make_mask("random", rng, 2, 2, 3, 7)
    key, rate, chunk = jax.random.key(3), 0.3, 3
    keep = block_dropout_keep(key, rate, (2, 2, 3), 7, chunk) / (1 - rate)

    def chunked(q, k, v, b):
        return ops.dot_product_attention(
            q,
            k,
            v,
            mask=mask,
            bias=b,
            dropout_rate=rate,
            dropout_rng=key,
            implementation="chunked",
            chunk_size=chunk,
            precision=HI,
        )

    ref = lambda q, k, v, b: row_attention(q, k, v, mask, b, keep)
    both = jax.jit(lambda f, *a: (f(*a[:4]), _loss_grads(f, *a)), static_argnums=0)
    out, grads = both(chunked, q, k, v, bias, cot)
    out_ref, grads_ref = both(ref, q, k, v, bias, cot)
    np.testing.assert_allclose(out, out_ref, atol=TOL)
    np.testing.assert_allclose(out, chunked(q, k, v, bias), atol=1e-6)  # same rng, same draw
    assert not np.allclose(out, row_attention(q, k, v, mask, bias), atol=1e-3)  # dropout acted
    for g, g_ref in zip(grads, grads_ref, strict=True):
        np.testing.assert_allclose(g, g_ref, atol=TOL)


def test_jax_implementation_rejects_dropout():
    x = jnp.ones((1, 2, 1, 4))
    with pytest.raises(ValueError, match="does not support attention dropout"):
        ops.dot_product_attention(
            x, x, x, implementation="jax", dropout_rate=0.1, dropout_rng=jax.random.key(0)
        )


@pytest.mark.parametrize(
    "q_shape,k_shape,v_shape,kwargs,match",
    [
        ((2, 3, 4), (2, 3, 1, 4), (2, 3, 1, 4), {}, r"query must have rank 4.*\(2, 3, 4\)"),
        ((2, 3, 1, 4), (2, 5, 1, 4), (2, 6, 1, 4), {}, r"key \(2, 5, 1, 4\) and value \(2, 6"),
        ((2, 3, 1, 4), (2, 5, 1, 8), (2, 5, 1, 8), {}, r"head dim H; got query H=4, key H=8"),
        ((2, 3, 3, 4), (2, 5, 2, 4), (2, 5, 2, 4), {}, r"3 heads, which is not a multiple of "
         r"the key/value heads 2"),
        ((2, 3, 1, 4), (3, 5, 1, 4), (3, 5, 1, 4), {}, r"batch sizes 2 != 3"),
        (
            (2, 3, 1, 4),
            (2, 5, 1, 4),
            (2, 5, 1, 4),
            {"mask": np.ones((2, 1, 3, 4), bool)},
            r"mask of shape \(2, 1, 3, 4\) is not broadcastable to \[B, N, T, S\] = \[2, 1, 3, 5\]",
        ),
        (
            (2, 3, 1, 4),
            (2, 5, 1, 4),
            (2, 5, 1, 4),
            {"mask": np.ones((3, 5), bool)},
            r"mask of shape \(3, 5\) .* must have rank 4",
        ),
        (
            (2, 3, 1, 4),
            (2, 5, 1, 4),
            (2, 5, 1, 4),
            {"bias": np.ones((2, 2, 3, 5))},
            r"bias of shape \(2, 2, 3, 5\) is not broadcastable",
        ),
        (
            (2, 3, 1, 4),
            (2, 5, 1, 4),
            (2, 5, 1, 4),
            {"mask": np.ones((2, 1, 3, 5))},
            r"mask must be boolean.*float",
        ),
        (
            (2, 3, 1, 4),
            (2, 5, 1, 4),
            (2, 5, 1, 4),
            {"implementation": "flash"},
            r"Unknown attention implementation 'flash'",
        ),
    ],
)
def test_shape_errors(q_shape, k_shape, v_shape, kwargs, match):
    with pytest.raises(ValueError, match=match):
        ops.dot_product_attention(jnp.ones(q_shape), jnp.ones(k_shape), jnp.ones(v_shape), **kwargs)


# ----------------------------------------------------------------------------- multi-head


def _mha_params(rng, d, n, h):
    return {
        "query": _rand(rng, d, n, h),
        "key": _rand(rng, d, n, h),
        "value": _rand(rng, d, n, h),
        "out": _rand(rng, n, h, d),
        "query_bias": _rand(rng, n, h),
        "key_bias": _rand(rng, n, h),
        "value_bias": _rand(rng, n, h),
        "out_bias": _rand(rng, d),
    }


def test_multi_head_attention_matches_flax():
    rng = np.random.default_rng(5)
    b, t, s, d, n = 2, 3, 5, 8, 2
    params = _mha_params(rng, d, n, d // n)
    xq, xkv = _rand(rng, b, t, d), _rand(rng, b, s, d)
    mask = ops.padding_mask(np.ones((b, t), bool), np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]))
    mha = nnx.MultiHeadAttention(
        num_heads=n, in_features=d, decode=False, precision=HI, rngs=nnx.Rngs(0)
    )
    for name in ("query", "key", "value", "out"):
        layer = getattr(mha, name)
        assert layer.kernel.shape == params[name].shape, name
        layer.kernel[...] = params[name]
        layer.bias[...] = params[f"{name}_bias"]
    want = mha(xq, xkv, mask=mask, deterministic=True)
    for impl in ANY_MASK:
        got = ops.multi_head_attention(
            xq, xkv, params, mask=mask, implementation=impl, precision=HI
        )
        assert got.shape == (b, t, d)
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-5, err_msg=impl)


def test_multi_head_attention_without_biases_and_weights():
    rng = np.random.default_rng(6)
    params = {k: v for k, v in _mha_params(rng, 6, 3, 2).items() if not k.endswith("bias")}
    x = _rand(rng, 1, 4, 6)
    out, w = ops.multi_head_attention(x, x, params, return_weights=True, precision=HI)
    q = np.einsum("btd,dnh->btnh", x, params["query"])
    k = np.einsum("btd,dnh->btnh", x, params["key"])
    v = np.einsum("btd,dnh->btnh", x, params["value"])
    heads, want_w = numpy_attention(q, k, v)
    np.testing.assert_allclose(w, want_w, atol=TOL)
    np.testing.assert_allclose(out, np.einsum("btnh,nhd->btd", heads, params["out"]), atol=1e-4)


def test_multi_head_attention_param_errors():
    rng = np.random.default_rng(7)
    params = _mha_params(rng, 6, 3, 2)
    x = jnp.ones((1, 4, 6))
    bad = dict(params, key=jnp.ones((6, 3, 3)))
    with pytest.raises(ValueError, match=r"params\['key'\] must have shape \(6, 3, 2\); got"):
        ops.multi_head_attention(x, x, bad)
    with pytest.raises(ValueError, match=r"missing \['out'\]"):
        ops.multi_head_attention(x, x, {k: v for k, v in params.items() if k != "out"})
    with pytest.raises(ValueError, match=r"D = inputs_q.shape\[-1\] = 5"):
        ops.multi_head_attention(jnp.ones((1, 4, 5)), x, params)
    with pytest.raises(ValueError, match=r"out_bias'\] must have shape \(6,\)"):
        ops.multi_head_attention(x, x, dict(params, out_bias=jnp.ones(5)))
