"""Sliding-window (local) attention: ``local_window_size`` (jax.nn's keyword, by index) and
``AttentionSpec(window=...)`` (by position) in every implementation, against an explicit
boolean band mask built by loops (given to numpy loops and to the plain "xla" path) and against
``jax.nn.dot_product_attention(local_window_size=...)``; composed with causal, padding and
packed segments; the chunked implementation's skipping of key blocks outside the window."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from references import HI, band_mask, numpy_attention, repeat_kv_heads, row_attention

from transformer_jax import ops
from transformer_jax.ops.chunked_attention import (
    block_dropout_keep,
    chunked_dot_product_attention,
    visited_key_blocks,
)

TOL = 1e-5
ANY_MASK = tuple(i for i in ops.IMPLEMENTATIONS if i != "splash")


def _rand(rng, *shape):
    return jnp.asarray(rng.standard_normal(shape), jnp.float32)


def _qkv(seed, b, t, s, n, kh, h=4):
    rng = np.random.default_rng(seed)
    return (_rand(rng, b, t, n, h), _rand(rng, b, s, kh, h), _rand(rng, b, s, kh, h),
            _rand(rng, b, t, n, h), rng)


def _grads(fn, q, k, v, cot):
    return jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v) * cot), argnums=(0, 1, 2))(q, k, v)


def _check_all(q, k, v, cot, kwargs, mask, impls=ANY_MASK, chunk=3, q_chunk=None):
    """Every implementation with ``kwargs`` == numpy loops and row-wise gradients under the
    dense reference ``mask`` [B, 1, T, S]; returns the "xla" output."""
    n = q.shape[2]
    kr, vr = np.repeat(k, n // k.shape[2], 2), np.repeat(v, n // k.shape[2], 2)
    want, _ = numpy_attention(q, kr, vr, mask)
    ref_grads = _grads(lambda q, k, v: row_attention(q, repeat_kv_heads(k, n),
                                                     repeat_kv_heads(v, n), jnp.asarray(mask)),
                       q, k, v, cot)
    outs = {}
    for impl in impls:
        fn = jax.jit(lambda q, k, v, impl=impl: ops.dot_product_attention(
            q, k, v, implementation=impl, chunk_size=chunk, query_chunk_size=q_chunk,
            precision=HI, **kwargs))
        outs[impl] = fn(q, k, v)
        np.testing.assert_allclose(outs[impl], want, atol=TOL, err_msg=impl)
        for name, g, g_ref in zip("qkv", _grads(fn, q, k, v, cot), ref_grads, strict=True):
            np.testing.assert_allclose(g, g_ref, atol=TOL, rtol=TOL, err_msg=f"{impl} d{name}")
    return outs


@pytest.mark.parametrize("window, causal", [
    ((2, 1), False), ((3, 0), False), ((0, 0), False), (1, False), ((2, 5), True), ((4, 0), True),
])
def test_window_by_index_matches_band_mask_and_jax_nn(window, causal):
    t = 11
    q, k, v, cot, _ = _qkv(sum(np.atleast_1d(window)) + causal, 2, t, t, 4, 2)
    left, right = (window, window) if isinstance(window, int) else window
    mask = band_mask(np.arange(t), np.arange(t), left, min(right, 0) if causal else right)
    kwargs = dict(local_window_size=window, is_causal=causal)
    outs = _check_all(q, k, v, cot, kwargs, mask, impls=ops.IMPLEMENTATIONS)
    np.testing.assert_allclose(outs["xla"], jax.nn.dot_product_attention(q, k, v, **kwargs),
                               atol=TOL)
    # the same band as a dense mask through the plain path
    dense = ops.dot_product_attention(q, k, v, mask=jnp.asarray(mask), precision=HI)
    np.testing.assert_allclose(outs["chunked"], dense, atol=TOL)


def test_window_composes_with_padding_and_segments():
    # Packed rows (segments 1, 2, 0 = padding), key lengths and a dense key-padding mask,
    # causal, window (3, 0): each term must act, and all of them together.
    b, t = 2, 13
    q, k, v, cot, rng = _qkv(5, b, t, t, 2, 2)
    seg = np.array([[1] * 6 + [2] * 5 + [0] * 2, [1] * 9 + [2] * 4])
    lengths = np.array([11, 12], np.int32)
    valid = rng.random((b, t)) > 0.2
    spec = ops.AttentionSpec(q_segments=seg, k_segments=seg, k_valid=valid)
    mask = band_mask(np.arange(t), np.arange(t), 3, 0)
    mask = mask & (seg[:, None, :, None] == seg[:, None, None, :]) & (seg != 0)[:, None, :, None]
    mask = mask & valid[:, None, None, :] & (np.arange(t) < lengths[:, None])[:, None, None, :]
    assert not np.all(mask.any(-1))  # some rows see no key at all: zeros
    kwargs = dict(spec=spec, is_causal=True, local_window_size=(3, 0),
                  key_value_seq_lengths=lengths)
    _check_all(q, k, v, cot, kwargs, mask, impls=ops.IMPLEMENTATIONS)


def test_window_by_position_in_the_spec():
    # Packed rows whose positions restart per segment: the window counts positions, and the
    # default positions of T < S queries are the last T keys (bottom-right), unlike the
    # keyword's jax.nn convention (query 0 at key 0).
    b, t, s = 2, 6, 10
    q, k, v, cot, _ = _qkv(6, b, t, s, 2, 1)
    seg_k = np.array([[1] * 4 + [2] * 6, [1] * 10])
    pos_k = np.array([list(range(4)) + list(range(6)), list(range(10))])
    seg_q, pos_q = seg_k[:, 4:], pos_k[:, 4:]
    spec = ops.AttentionSpec(window=(2, 1), causal=True, q_positions=pos_q, k_positions=pos_k,
                             q_segments=seg_q, k_segments=seg_k)
    mask = band_mask(pos_q, pos_k, 2, 0) & (seg_q[:, None, :, None] == seg_k[:, None, None, :])
    _check_all(q, k, v, cot, dict(spec=spec), mask)
    bottom_right = band_mask(s - t + np.arange(t), np.arange(s), 2, 1)
    _check_all(q, k, v, cot, dict(spec=ops.AttentionSpec(window=(2, 1))), bottom_right)
    top_left = band_mask(np.arange(t), np.arange(s), 2, 1)
    outs = _check_all(q, k, v, cot, dict(local_window_size=(2, 1)), top_left)
    np.testing.assert_allclose(
        outs["xla"], jax.nn.dot_product_attention(q, k, v, local_window_size=(2, 1)), atol=TOL)


@pytest.mark.parametrize("t, s", [(4, 9), (9, 4)])
def test_is_causal_keyword_is_top_left_as_in_jax_nn(t, s):
    # jax.nn: query i attends keys j <= i whatever T and S (the spec's default is bottom-right)
    q, k, v, cot, _ = _qkv(t * s, 2, t, s, 2, 1)
    mask = np.arange(s)[None, :] <= np.arange(t)[:, None]
    lengths = np.array([s, 2], np.int32)
    mask = mask[None, None] & (np.arange(s) < lengths[:, None])[:, None, None, :]
    outs = _check_all(q, k, v, cot, dict(is_causal=True, key_value_seq_lengths=lengths),
                      mask)
    np.testing.assert_allclose(outs["jax"], jax.nn.dot_product_attention(
        q, k, v, is_causal=True, key_value_seq_lengths=jnp.asarray(lengths)), atol=TOL)


@pytest.mark.parametrize("t, s, chunk, q_chunk, window, causal", [
    (37, 37, 4, 3, (5, 2), False),  # ragged blocks; windows clamped at both ends
    (40, 40, 8, 8, (8, 0), True),
    (21, 30, 4, 5, (3, 3), False),  # T < S (bottom-right), a window wider than a block
    (16, 16, 4, 4, (0, 0), False),  # each query sees itself only
    (9, 9, 16, 16, (2, 2), True),  # one block: nothing to skip
])
def test_chunked_window_skips_blocks_with_the_same_numbers(t, s, chunk, q_chunk, window, causal):
    q, k, v, cot, _ = _qkv(t + s + chunk, 1, t, s, 2, 2)
    spec = ops.AttentionSpec(window=window, causal=causal)
    right = min(window[1], 0) if causal else window[1]
    mask = band_mask(s - t + np.arange(t), np.arange(s), window[0], right)
    _check_all(q, k, v, cot, dict(spec=spec), mask, impls=("chunked",), chunk=chunk,
               q_chunk=q_chunk)
    # Enough blocks are visited (else the numbers above would differ), and few: a query block
    # of Cq meets at most ceil((Cq + left + right - 1) / Ck) + 1 key blocks.
    nk = -(-s // min(chunk, s))
    visited = visited_key_blocks(spec, t, s, chunk, q_chunk)
    span = min(q_chunk, t) + window[0] + right
    assert visited <= min(nk, -(-(span - 1) // min(chunk, s)) + 1)
    if t >= 4 * chunk:
        assert visited <= nk / 2
    assert visited_key_blocks(ops.AttentionSpec(causal=causal), t, s, chunk, q_chunk) == nk


def test_visited_key_blocks_of_aligned_blocks():
    # Query and key blocks of 8 aligned, causal window of 8 to the left: the block itself and
    # the one before it.
    spec = ops.AttentionSpec(causal=True, window=(8, 0))
    assert visited_key_blocks(spec, 40, 40, 8) == 2
    assert visited_key_blocks(spec, 40, 40, 8, 4) == 2
    assert visited_key_blocks(ops.AttentionSpec(window=(8, 8)), 40, 40, 8) == 3
    assert visited_key_blocks(ops.AttentionSpec(window=(8, 0), q_positions=np.zeros((1, 40)),
                                                k_positions=np.zeros((1, 40))), 40, 40, 8) == 5


def test_chunked_window_dropout_uses_the_block_masks():
    # The keep mask of a visited block is drawn from its absolute (query, key) block index.
    t, chunk, rate = 20, 4, 0.3
    q, k, v, cot, _ = _qkv(8, 1, t, t, 2, 2)
    key = jax.random.key(5)
    keep = block_dropout_keep(key, rate, (1, 2, t), t, chunk) / (1 - rate)
    mask = jnp.asarray(band_mask(np.arange(t), np.arange(t), 5, 0))

    def chunked(q, k, v):
        return ops.dot_product_attention(q, k, v, is_causal=True, local_window_size=(5, 0),
                                         dropout_rate=rate, dropout_rng=key,
                                         implementation="chunked", chunk_size=chunk, precision=HI)

    ref = lambda q, k, v: row_attention(q, k, v, mask, None, keep)
    np.testing.assert_allclose(chunked(q, k, v), ref(q, k, v), atol=TOL)
    for g, g_ref in zip(_grads(chunked, q, k, v, cot), _grads(ref, q, k, v, cot), strict=True):
        np.testing.assert_allclose(g, g_ref, atol=TOL)


def _flops(fn, *args):
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    return (cost[0] if isinstance(cost, list) else cost)["flops"]


def test_chunked_window_compiled_flops_grow_with_the_window_not_the_length():
    # XLA counts a loop body once; unroll=True makes the compiled cost count every block.
    def flops(t, window):
        x = jax.ShapeDtypeStruct((1, t, 2, 8), jnp.float32)
        spec = ops.AttentionSpec(causal=True, window=window)
        return _flops(lambda q, k, v: chunked_dot_product_attention(
            q, k, v, spec=spec, chunk_size=16, unroll=True), x, x, x)

    full = [flops(t, None) for t in (48, 96)]
    local = [flops(t, (16, 0)) for t in (48, 96)]
    assert 3.5 < full[1] / full[0] < 4.5  # quadratic
    assert 1.8 < local[1] / local[0] < 2.2  # linear
    assert local[1] < 0.4 * full[1]
    q, k, v, _, _ = _qkv(9, 1, 64, 64, 2, 2, 8)
    spec = ops.AttentionSpec(causal=True, window=(16, 0))
    np.testing.assert_allclose(
        chunked_dot_product_attention(q, k, v, spec=spec, chunk_size=16, unroll=True),
        chunked_dot_product_attention(q, k, v, spec=spec, chunk_size=16), atol=1e-6)


@pytest.mark.parametrize("kwargs, match", [
    (dict(local_window_size=(-1, 2)), r"negative side"),
    (dict(local_window_size=(1.5, 2)), r"None, an int or a pair"),
    (dict(local_window_size=(1, 2, 3)), r"None, an int or a pair"),
    (dict(local_window_size=1, spec=ops.AttentionSpec(window=(1, 1))), "given twice"),
    (dict(is_causal=True, spec=ops.AttentionSpec(q_positions=np.zeros((1, 4), int),
                                                 k_positions=np.zeros((1, 4), int))),
     "compare query and key indices"),
    (dict(key_value_seq_lengths=np.array([1.0, 2.0])), r"must be integers of shape \[2\]"),
])
def test_window_and_keyword_errors(kwargs, match):
    x = jnp.zeros((2, 4, 2, 4))
    with pytest.raises(ValueError, match=match):
        ops.dot_product_attention(x, x, x, **kwargs)
