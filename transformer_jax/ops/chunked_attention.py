"""Memory-efficient ("chunked") dot-product attention.

Queries are cut into blocks of Cq and keys into blocks of Ck. For each query block the forward
pass scans over the key blocks keeping FlashAttention's running statistics per query — the row
maximum ``m``, the softmax denominator ``l`` and the unnormalised output — so only a
``[B, N, Cq, Ck]`` block of scores exists at any time (Rabe & Staats 2021; Dao et al. 2022).
The backward pass is a ``jax.custom_vjp`` that saves only the inputs, the output and the
per-row log-sum-exp ``[B, N, T]`` and recomputes each block's probabilities, so gradient memory
is also O(T + S) per head instead of O(T * S).

Structured terms (``masks.AttentionSpec``: causal order, packed segments, key padding, ALiBi
slopes) are built for each block from ``[B, T]`` / ``[B, S]`` positions and ids, so the model
never holds a ``[T, S]`` mask or bias. Dense ``mask`` / ``bias`` arrays are also accepted
(broadcast shapes, any axis 1); a full query or key axis is sliced block by block. Queries and
keys are padded to whole blocks (padded keys are masked, padded query rows are cut off).
Dropout draws the keep mask of block (query block ``i``, key block ``j``) from
``jax.random.fold_in(dropout_rng, i * num_key_blocks + j)``, in the forward and again in the
backward pass (``block_dropout_keep`` rebuilds the whole mask for tests).

Use it through ``transformer_jax.ops.dot_product_attention(..., implementation="chunked")``,
which validates the shapes.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from transformer_jax.ops import masks as masks_lib

__all__ = ["chunked_dot_product_attention", "block_dropout_keep", "check_head_dims"]

_F32 = jnp.float32


def check_head_dims(query, key, value) -> None:
    """Raises ValueError unless query, key and value ``[..., H]`` share one head dim H."""
    hq, hk, hv = (jnp.shape(x)[-1] for x in (query, key, value))
    if not hq == hk == hv:
        raise ValueError(
            f"query, key and value must have the same head dim H; got query H={hq}, key "
            f"H={hk}, value H={hv}; project them to one head dim (d_model / num_heads)."
        )


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Static block layout: Cq, Ck, block counts and what does not change per call."""

    cq: int
    ck: int
    nq: int
    nk: int
    causal: bool
    rate: float
    precision: Any


def _slice(x, axis: int, start, size: int):
    """Block ``[start, start + size)`` of ``x`` along ``axis``; a broadcast (1) axis as is."""
    if x is None or x.shape[axis] == 1:
        return x
    return lax.dynamic_slice_in_dim(x, start, size, axis)


def _block_scores(plan: _Plan, q_blk, k_blk, aux, qi, ki):
    """Scaled, biased, masked scores of query block ``qi`` vs key block ``ki``:
    ``[B, N, Cq, Ck]`` float32, masked = -inf."""
    q0, k0 = qi * plan.cq, ki * plan.ck
    s = jnp.einsum(
        "BTNH,BCNH->BNTC", q_blk, k_blk, precision=plan.precision, preferred_element_type=_F32
    )  # [B, N, Cq, Ck]
    s = s * (1.0 / math.sqrt(q_blk.shape[-1]))
    mask, bias = masks_lib.structured_terms(
        _slice(aux["q_positions"], 1, q0, plan.cq),
        _slice(aux["k_positions"], 1, k0, plan.ck),
        causal=plan.causal,
        q_segments=_slice(aux["q_segments"], 1, q0, plan.cq),
        k_segments=_slice(aux["k_segments"], 1, k0, plan.ck),
        k_valid=_slice(aux["k_valid"], 1, k0, plan.ck),
        alibi_slopes=aux["alibi_slopes"],
    )
    dense_mask = _slice(_slice(aux["mask"], 2, q0, plan.cq), 3, k0, plan.ck)
    dense_bias = _slice(_slice(aux["bias"], 2, q0, plan.cq), 3, k0, plan.ck)
    for b in (bias, dense_bias):
        if b is not None:
            s = s + b.astype(_F32)
    for m in (mask, dense_mask):
        if m is not None:
            s = jnp.where(m, s, -jnp.inf)
    return s


def _keep_scale(rng, block_index, rate, shape):
    """Inverted-dropout multiplier for one block: 0 or 1/(1-rate), ``shape`` float32."""
    keep = jax.random.bernoulli(jax.random.fold_in(rng, block_index), 1.0 - rate, shape)
    return jnp.where(keep, 1.0 / (1.0 - rate), 0.0).astype(_F32)


def _blocks(t: int, s: int, chunk_size: int, query_chunk_size: int | None):
    """(Cq, Ck, nq, nk) for T queries and S keys."""
    ck = min(int(chunk_size), s)
    cq = min(int(query_chunk_size or chunk_size), t)
    return cq, ck, -(-t // cq), -(-s // ck)


def block_dropout_keep(dropout_rng, dropout_rate, shape, seq_len, chunk_size,
                       query_chunk_size=None):
    """The full ``[B, N, T, S]`` keep mask that the chunked implementation uses (for testing).

    Args:
      dropout_rng: the key passed to ``dot_product_attention``.
      dropout_rate: the rate.
      shape: ``(B, N, T)``.
      seq_len: S.
      chunk_size, query_chunk_size: as passed to ``dot_product_attention``.

    Returns:
      ``[B, N, T, S]`` bool.
    """
    b, n, t = shape
    cq, ck, nq, nk = _blocks(t, seq_len, chunk_size, query_chunk_size)
    rows = []
    for i in range(nq):
        row = [
            jax.random.bernoulli(
                jax.random.fold_in(dropout_rng, i * nk + j), 1.0 - dropout_rate, (b, n, cq, ck)
            )
            for j in range(nk)
        ]
        rows.append(jnp.concatenate(row, axis=-1))
    return jnp.concatenate(rows, axis=-2)[:, :, :t, :seq_len]


def _pv(p, v_blk, precision):
    """``[B, N, Cq, Ck] x [B, Ck, N, H] -> [B, N, Cq, H]`` float32."""
    p = p if v_blk.dtype == _F32 else p.astype(v_blk.dtype)
    return jnp.einsum("BNTC,BCNH->BNTH", p, v_blk, precision=precision, preferred_element_type=_F32)


def _forward_block(plan: _Plan, q_blk, k, v, aux, rng, qi):
    """One query block over all key blocks: out ``[B, Cq, N, H]`` f32, lse ``[B, N, Cq]``."""
    bsz, cq, n, h = q_blk.shape

    def step(carry, ki):
        m, denom, acc = carry  # [B, N, Cq], [B, N, Cq], [B, N, Cq, H]
        k_blk = lax.dynamic_slice_in_dim(k, ki * plan.ck, plan.ck, 1)
        v_blk = lax.dynamic_slice_in_dim(v, ki * plan.ck, plan.ck, 1)
        s = _block_scores(plan, q_blk, k_blk, aux, qi, ki)  # [B, N, Cq, Ck]
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))
        m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
        p = jnp.exp(s - m_safe[..., None])  # masked -> 0
        corr = jnp.exp(m - m_safe)  # 0 while nothing was attended yet
        denom = denom * corr + jnp.sum(p, axis=-1)
        if rng is not None:
            p = p * _keep_scale(rng, qi * plan.nk + ki, plan.rate, p.shape)
        acc = acc * corr[..., None] + _pv(p, v_blk, plan.precision)
        return (m_new, denom, acc), None

    init = (
        jnp.full((bsz, n, cq), -jnp.inf, _F32),
        jnp.zeros((bsz, n, cq), _F32),
        jnp.zeros((bsz, n, cq, h), _F32),
    )
    (m, denom, acc), _ = lax.scan(step, init, jnp.arange(plan.nk))
    out = acc / jnp.where(denom == 0.0, 1.0, denom)[..., None]  # fully masked rows -> 0
    safe = jnp.where(denom > 0.0, denom, 1.0)
    lse = jnp.where(denom > 0.0, m + jnp.log(safe), jnp.inf)  # [B, N, Cq]
    return jnp.transpose(out, (0, 2, 1, 3)), lse


def _forward(plan: _Plan, q, k, v, aux, rng):
    """out ``[B, Tp, N, H]`` (query dtype), lse ``[B, N, Tp]`` float32."""
    bsz, tp, n, h = q.shape

    def one(qi):
        q_blk = lax.dynamic_slice_in_dim(q, qi * plan.cq, plan.cq, 1)
        return _forward_block(plan, q_blk, k, v, aux, rng, qi)

    outs, lses = lax.map(one, jnp.arange(plan.nq))  # [nq, B, Cq, N, H], [nq, B, N, Cq]
    out = jnp.moveaxis(outs, 0, 1).reshape(bsz, tp, n, h)
    lse = jnp.moveaxis(lses, 0, 2).reshape(bsz, n, tp)
    return out.astype(q.dtype), lse


def _reduce_to(x, shape):
    """Sums ``x`` over the axes where ``shape`` has a 1 (undoing broadcasting)."""
    axes = tuple(i for i, (a, b) in enumerate(zip(x.shape, shape, strict=True)) if b == 1 != a)
    return jnp.sum(x, axis=axes, keepdims=True) if axes else x


def _add_block(total, blk, plan: _Plan, qi, ki):
    """``total[..., q block, k block] += blk`` for a (broadcast) bias-shaped ``total``."""
    start = [0, 0, qi * plan.cq if total.shape[2] != 1 else 0,
             ki * plan.ck if total.shape[3] != 1 else 0]
    old = lax.dynamic_slice(total, start, blk.shape)
    return lax.dynamic_update_slice(total, old + blk, start)


def _backward_block(plan: _Plan, q_blk, do_blk, lse_blk, delta_blk, k, v, aux, rng, qi, carry):
    """Gradients of one query block: (dq ``[B, Cq, N, H]``, (dk, dv, dbias) accumulated)."""
    scale = 1.0 / math.sqrt(q_blk.shape[-1])
    do_v = do_blk if v.dtype == _F32 else do_blk.astype(v.dtype)
    prec = plan.precision

    def step(inner, ki):
        dq, dk, dv, dbias = inner
        k_blk = lax.dynamic_slice_in_dim(k, ki * plan.ck, plan.ck, 1)
        v_blk = lax.dynamic_slice_in_dim(v, ki * plan.ck, plan.ck, 1)
        s = _block_scores(plan, q_blk, k_blk, aux, qi, ki)
        p = jnp.exp(s - lse_blk[..., None])  # [B, N, Cq, Ck]; masked -> 0
        dp = jnp.einsum("BTNH,BCNH->BNTC", do_v, v_blk, precision=prec,
                        preferred_element_type=_F32)  # [B, N, Cq, Ck]
        p_drop = p
        if rng is not None:
            z = _keep_scale(rng, qi * plan.nk + ki, plan.rate, p.shape)
            p_drop, dp = p * z, dp * z
        dv_blk = jnp.einsum("BNTC,BTNH->BCNH", p_drop.astype(do_v.dtype), do_v, precision=prec,
                            preferred_element_type=_F32)  # [B, Ck, N, H]
        # D_i = sum_j P_ij dP_ij = dO_i . O_i (also with dropout, since O uses the dropped P).
        ds = p * (dp - delta_blk[..., None])  # d loss / d (biased) logits
        ds_q = ds if q_blk.dtype == _F32 else ds.astype(q_blk.dtype)
        dq = dq + scale * jnp.einsum("BNTC,BCNH->BTNH", ds_q, k_blk, precision=prec,
                                     preferred_element_type=_F32)
        dk_blk = scale * jnp.einsum("BNTC,BTNH->BCNH", ds_q, q_blk, precision=prec,
                                    preferred_element_type=_F32)
        dk = lax.dynamic_update_slice_in_dim(
            dk, lax.dynamic_slice_in_dim(dk, ki * plan.ck, plan.ck, 1) + dk_blk, ki * plan.ck, 1)
        dv = lax.dynamic_update_slice_in_dim(
            dv, lax.dynamic_slice_in_dim(dv, ki * plan.ck, plan.ck, 1) + dv_blk, ki * plan.ck, 1)
        if dbias is not None:
            blk_shape = (*dbias.shape[:2], 1 if dbias.shape[2] == 1 else plan.cq,
                         1 if dbias.shape[3] == 1 else plan.ck)
            dbias = _add_block(dbias, _reduce_to(ds, blk_shape), plan, qi, ki)
        return (dq, dk, dv, dbias), None

    dk, dv, dbias = carry
    init = (jnp.zeros(q_blk.shape, _F32), dk, dv, dbias)
    (dq, dk, dv, dbias), _ = lax.scan(step, init, jnp.arange(plan.nk))
    return dq, (dk, dv, dbias)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _flash(q, k, v, aux, rng, plan):
    return _forward(plan, q, k, v, aux, rng)[0]


def _flash_fwd(q, k, v, aux, rng, plan):
    out, lse = _forward(plan, q, k, v, aux, rng)
    return out, (q, k, v, aux, rng, out, lse)


def _flash_bwd(plan, res, g):
    q, k, v, aux, rng, out, lse = res
    bsz, tp, n, h = q.shape
    g32 = g.astype(_F32)
    delta = jnp.einsum("BTNH,BTNH->BNT", g32, out.astype(_F32))  # [B, N, Tp]
    bias = aux["bias"]

    def q_step(carry, qi):
        q0 = qi * plan.cq
        q_blk = lax.dynamic_slice_in_dim(q, q0, plan.cq, 1)
        do_blk = lax.dynamic_slice_in_dim(g32, q0, plan.cq, 1)
        lse_blk = lax.dynamic_slice_in_dim(lse, q0, plan.cq, 2)
        delta_blk = lax.dynamic_slice_in_dim(delta, q0, plan.cq, 2)
        return _backward_block(plan, q_blk, do_blk, lse_blk, delta_blk, k, v, aux, rng, qi,
                               carry)[::-1]

    init = (jnp.zeros(k.shape, _F32), jnp.zeros(v.shape, _F32),
            None if bias is None else jnp.zeros(bias.shape, _F32))
    (dk, dv, dbias), dq_blocks = lax.scan(q_step, init, jnp.arange(plan.nq))
    dq = jnp.moveaxis(dq_blocks, 0, 1).reshape(q.shape)  # [B, Tp, N, H]
    daux = {name: None for name in aux}
    if bias is not None:
        daux["bias"] = dbias.astype(bias.dtype)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), daux, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def _pad_axis(x, axis: int, target: int, value):
    """Pads a full axis of ``x`` to ``target`` with ``value`` (broadcast axes stay 1)."""
    if x is None or x.shape[axis] in (1, target):
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, target - x.shape[axis])
    return jnp.pad(x, widths, constant_values=value)


def chunked_dot_product_attention(
    query,
    key,
    value,
    *,
    mask=None,
    bias=None,
    spec: masks_lib.AttentionSpec | None = None,
    dropout_rate=0.0,
    dropout_rng=None,
    chunk_size=512,
    query_chunk_size=None,
    precision=None,
):
    """Chunked attention; same contract as ``dot_product_attention``.

    Args:
      query: ``[B, T, N, H]``; key, value: ``[B, S, N, H]``.
      mask: optional bool ``[b, n, t, s]`` broadcastable to ``[B, N, T, S]``.
      bias: optional float, same broadcasting rule (differentiable).
      spec: optional ``masks.AttentionSpec`` (built block by block; slopes get no gradient).
      dropout_rate, dropout_rng: dropout on the attention weights (block-wise).
      chunk_size: key block size Ck.
      query_chunk_size: query block size Cq (default ``chunk_size``).
      precision: matmul precision.

    Returns:
      ``[B, T, N, H]`` in the query dtype.
    """
    check_head_dims(query, key, value)
    if int(chunk_size) <= 0 or (query_chunk_size is not None and int(query_chunk_size) <= 0):
        raise ValueError(
            f"chunk_size and query_chunk_size must be positive integers; got {chunk_size} and "
            f"{query_chunk_size}."
        )
    bsz, t, n, h = query.shape
    s = key.shape[1]
    if s == 0 or t == 0:
        return jnp.zeros(query.shape, query.dtype)
    cq, ck, nq, nk = _blocks(t, s, chunk_size, query_chunk_size)
    tp, sp = nq * cq, nk * ck
    spec = spec or masks_lib.AttentionSpec()
    terms = spec.arrays(t, s)
    k_valid = terms["k_valid"]
    if k_valid is None and sp != s:
        k_valid = jnp.ones((1, s), bool)
    aux = {
        "q_positions": _pad_axis(terms["q_positions"], 1, tp, 0),
        "k_positions": _pad_axis(terms["k_positions"], 1, sp, 0),
        "q_segments": _pad_axis(terms["q_segments"], 1, tp, 0),
        "k_segments": _pad_axis(terms["k_segments"], 1, sp, 0),
        "k_valid": _pad_axis(k_valid, 1, sp, False),
        "alibi_slopes": terms["alibi_slopes"],
        "mask": _pad_axis(_pad_axis(mask, 2, tp, True), 3, sp, False),
        "bias": _pad_axis(_pad_axis(bias, 2, tp, 0), 3, sp, 0),
    }
    rng = dropout_rng if (dropout_rng is not None and dropout_rate > 0.0) else None
    plan = _Plan(cq, ck, nq, nk, spec.causal, float(dropout_rate), precision)
    out = _flash(
        _pad_axis(query, 1, tp, 0), _pad_axis(key, 1, sp, 0), _pad_axis(value, 1, sp, 0),
        aux, rng, plan,
    )
    return out[:, :t]
