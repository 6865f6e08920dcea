"""Memory-efficient ("chunked") dot-product attention.

The forward pass scans over blocks of C keys keeping FlashAttention's running statistics per
query — the row maximum ``m``, the softmax denominator ``l`` and the unnormalised output — so
only a ``[B, N, T, C]`` block of scores exists at any time (Rabe & Staats 2021; Dao et al.
2022). The backward pass is a ``jax.custom_vjp`` that saves only the inputs, the output and the
per-row log-sum-exp ``[B, N, T]`` and recomputes each block's probabilities, so gradient memory
is also O(T + S) per head instead of O(T * S).

Masks and biases may be broadcast shapes (any axis 1); those with a full key axis are padded
and cut into key blocks, the others are applied whole. When S is not a multiple of C the keys
are padded with masked-out entries. Dropout draws the keep mask of key block ``i`` from
``jax.random.fold_in(dropout_rng, i)``, in the forward and again in the backward pass.

Use it through ``transformer_jax.ops.dot_product_attention(..., implementation="chunked")``,
which validates the shapes.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

__all__ = ["chunked_dot_product_attention", "block_dropout_keep"]

_F32 = jnp.float32


def _block_logits(q, k_blk, mask_blk, mask_const, bias_blk, bias_const, scale, precision):
    """Scores of all queries against one key block: ``[B, N, T, C]`` float32, masked = -inf."""
    s = jnp.einsum(
        "BTNH,BCNH->BNTC", q, k_blk, precision=precision, preferred_element_type=_F32
    )  # [B, N, T, C]
    s = s * scale
    for b in (bias_blk, bias_const):
        if b is not None:
            s = s + b.astype(_F32)
    for m in (mask_blk, mask_const):
        if m is not None:
            s = jnp.where(m, s, -jnp.inf)
    return s


def _keep_scale(rng, block_index, rate, shape):
    """Inverted-dropout multiplier for one key block: 0 or 1/(1-rate), ``shape`` float32."""
    keep = jax.random.bernoulli(jax.random.fold_in(rng, block_index), 1.0 - rate, shape)
    return jnp.where(keep, 1.0 / (1.0 - rate), 0.0).astype(_F32)


def block_dropout_keep(dropout_rng, dropout_rate, shape, seq_len, chunk_size):
    """The full ``[B, N, T, S]`` keep mask that the chunked implementation uses (for testing).

    Args:
      dropout_rng: the key passed to ``dot_product_attention``.
      dropout_rate: the rate.
      shape: ``(B, N, T)``.
      seq_len: S.
      chunk_size: the chunk size passed to ``dot_product_attention``.

    Returns:
      ``[B, N, T, S]`` bool.
    """
    c = min(chunk_size, seq_len)
    n_blocks = -(-seq_len // c)
    blocks = [
        jax.random.bernoulli(jax.random.fold_in(dropout_rng, i), 1.0 - dropout_rate, (*shape, c))
        for i in range(n_blocks)
    ]
    return jnp.concatenate(blocks, axis=-1)[..., :seq_len]


def _pv(p, v_blk, precision):
    """``[B, N, T, C] x [B, C, N, H] -> [B, N, T, H]`` float32."""
    p = p if v_blk.dtype == _F32 else p.astype(v_blk.dtype)
    return jnp.einsum("BNTC,BCNH->BNTH", p, v_blk, precision=precision, preferred_element_type=_F32)


def _forward(q, kb, vb, mask_b, mask_c, bias_b, bias_c, rng, rate, precision):
    """Returns out ``[B, T, N, H]`` (query dtype) and lse ``[B, N, T]`` float32."""
    bsz, t, n, h = q.shape
    scale = 1.0 / math.sqrt(h)
    n_blocks = kb.shape[0]

    def step(carry, xs):
        m, denom, acc = carry  # [B, N, T], [B, N, T], [B, N, T, H]
        k_blk, v_blk, m_blk, b_blk, idx = xs
        s = _block_logits(q, k_blk, m_blk, mask_c, b_blk, bias_c, scale, precision)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))  # [B, N, T]
        m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
        p = jnp.exp(s - m_safe[..., None])  # [B, N, T, C]; masked -> 0
        corr = jnp.exp(m - m_safe)  # [B, N, T]; 0 while nothing was attended yet
        denom = denom * corr + jnp.sum(p, axis=-1)
        if rng is not None:
            p = p * _keep_scale(rng, idx, rate, p.shape)
        acc = acc * corr[..., None] + _pv(p, v_blk, precision)
        return (m_new, denom, acc), None

    init = (
        jnp.full((bsz, n, t), -jnp.inf, _F32),
        jnp.zeros((bsz, n, t), _F32),
        jnp.zeros((bsz, n, t, h), _F32),
    )
    xs = (kb, vb, mask_b, bias_b, jnp.arange(n_blocks))
    (m, denom, acc), _ = jax.lax.scan(step, init, xs)
    out = acc / jnp.where(denom == 0.0, 1.0, denom)[..., None]  # fully masked rows -> 0
    safe = jnp.where(denom > 0.0, denom, 1.0)
    lse = jnp.where(denom > 0.0, m + jnp.log(safe), jnp.inf)  # [B, N, T]
    return jnp.transpose(out, (0, 2, 1, 3)).astype(q.dtype), lse


def _reduce_to(x, shape):
    """Sums ``x`` over the axes where ``shape`` has a 1 (undoing broadcasting)."""
    axes = tuple(i for i, (a, b) in enumerate(zip(x.shape, shape, strict=True)) if b == 1 != a)
    return jnp.sum(x, axis=axes, keepdims=True) if axes else x


@functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9))
def _flash(q, kb, vb, mask_b, mask_c, bias_b, bias_c, rng, rate, precision):
    return _forward(q, kb, vb, mask_b, mask_c, bias_b, bias_c, rng, rate, precision)[0]


def _flash_fwd(q, kb, vb, mask_b, mask_c, bias_b, bias_c, rng, rate, precision):
    out, lse = _forward(q, kb, vb, mask_b, mask_c, bias_b, bias_c, rng, rate, precision)
    return out, (q, kb, vb, mask_b, mask_c, bias_b, bias_c, rng, out, lse)


def _flash_bwd(rate, precision, res, g):
    q, kb, vb, mask_b, mask_c, bias_b, bias_c, rng, out, lse = res
    scale = 1.0 / math.sqrt(q.shape[-1])
    do = jnp.transpose(g.astype(_F32), (0, 2, 1, 3))  # [B, N, T, H]
    # D_i = sum_j P_ij dP_ij = dO_i . O_i (also with dropout, since O uses the dropped P).
    delta = jnp.einsum("BTNH,BTNH->BNT", g.astype(_F32), out.astype(_F32))  # [B, N, T]
    do_v = do if vb.dtype == _F32 else do.astype(vb.dtype)

    def step(carry, xs):
        dq, dbias_c = carry  # [B, T, N, H] f32, bias_c-shaped f32 (or None)
        k_blk, v_blk, m_blk, b_blk, idx = xs
        s = _block_logits(q, k_blk, m_blk, mask_c, b_blk, bias_c, scale, precision)
        p = jnp.exp(s - lse[..., None])  # [B, N, T, C]; masked rows/entries -> 0
        dp = jnp.einsum(
            "BNTH,BCNH->BNTC", do_v, v_blk, precision=precision, preferred_element_type=_F32
        )  # [B, N, T, C]
        if rng is not None:
            z = _keep_scale(rng, idx, rate, p.shape)
            p_drop, dp = p * z, dp * z
        else:
            p_drop = p
        dv_blk = jnp.einsum(
            "BNTC,BNTH->BCNH",
            p_drop.astype(do_v.dtype),
            do_v,
            precision=precision,
            preferred_element_type=_F32,
        )  # [B, C, N, H]
        ds = p * (dp - delta[..., None])  # [B, N, T, C] = d loss / d logits (after bias)
        ds_q = ds if q.dtype == _F32 else ds.astype(q.dtype)
        dq = dq + scale * jnp.einsum(
            "BNTC,BCNH->BTNH", ds_q, k_blk, precision=precision, preferred_element_type=_F32
        )
        dk_blk = scale * jnp.einsum(
            "BNTC,BTNH->BCNH", ds_q, q, precision=precision, preferred_element_type=_F32
        )
        db_blk = None if b_blk is None else _reduce_to(ds, b_blk.shape)
        if dbias_c is not None:
            dbias_c = dbias_c + _reduce_to(ds, bias_c.shape)
        return (dq, dbias_c), (dk_blk, dv_blk, db_blk)

    init = (
        jnp.zeros(q.shape, _F32),
        None if bias_c is None else jnp.zeros(bias_c.shape, _F32),
    )
    xs = (kb, vb, mask_b, bias_b, jnp.arange(kb.shape[0]))
    (dq, dbias_c), (dkb, dvb, dbias_b) = jax.lax.scan(step, init, xs)
    return (
        dq.astype(q.dtype),
        dkb.astype(kb.dtype),
        dvb.astype(vb.dtype),
        None,
        None,
        None if bias_b is None else dbias_b.astype(bias_b.dtype),
        None if bias_c is None else dbias_c.astype(bias_c.dtype),
        None,
    )


_flash.defvjp(_flash_fwd, _flash_bwd)


def _to_blocks(x, n_blocks, chunk, pad_value):
    """``[..., S]`` -> ``[n_blocks, ..., C]`` (padding the last axis with ``pad_value``)."""
    s = x.shape[-1]
    pad = n_blocks * chunk - s
    if pad:
        x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)], constant_values=pad_value)
    x = x.reshape(*x.shape[:-1], n_blocks, chunk)
    return jnp.moveaxis(x, -2, 0)


def chunked_dot_product_attention(
    query,
    key,
    value,
    *,
    mask=None,
    bias=None,
    dropout_rate=0.0,
    dropout_rng=None,
    chunk_size=512,
    precision=None,
):
    """Chunked attention; same contract as ``dot_product_attention`` (shapes not re-checked).

    Args:
      query: ``[B, T, N, H]``; key, value: ``[B, S, N, H]``.
      mask: optional bool ``[b, n, t, s]`` broadcastable to ``[B, N, T, S]``.
      bias: optional float, same broadcasting rule.
      dropout_rate, dropout_rng: dropout on the attention weights (block-wise keys).
      chunk_size: key block size C.
      precision: matmul precision.

    Returns:
      ``[B, T, N, H]`` in the query dtype.
    """
    if int(chunk_size) <= 0:
        raise ValueError(f"chunk_size must be a positive integer; got {chunk_size}.")
    bsz, t, n, h = query.shape
    s = key.shape[1]
    if s == 0:
        return jnp.zeros(query.shape, query.dtype)
    chunk = min(int(chunk_size), s)
    n_blocks = -(-s // chunk)
    padded = n_blocks * chunk != s

    def kv_blocks(x):  # [B, S, N, H] -> [n_blocks, B, C, N, H]
        x = jnp.moveaxis(x, 1, -1)  # [B, N, H, S]
        return jnp.moveaxis(_to_blocks(x, n_blocks, chunk, 0), -1, 2)

    kb, vb = kv_blocks(key), kv_blocks(value)

    mask_b = mask_c = bias_b = bias_c = None
    if mask is not None and mask.shape[-1] == s and s != 1:
        mask_b = _to_blocks(mask, n_blocks, chunk, False)  # [n_blocks, b, n, t, C]
    elif mask is not None:
        mask_c = mask
    if mask_b is None and padded:
        valid = jnp.arange(s) >= 0  # all True; padding adds the False tail
        mask_b = _to_blocks(valid.reshape(1, 1, 1, s), n_blocks, chunk, False)
    if bias is not None and bias.shape[-1] == s and s != 1:
        bias_b = _to_blocks(bias, n_blocks, chunk, 0)
    elif bias is not None:
        bias_c = bias
    rng = dropout_rng if (dropout_rng is not None and dropout_rate > 0.0) else None
    return _flash(
        query, kb, vb, mask_b, mask_c, bias_b, bias_c, rng, float(dropout_rate), precision
    )
