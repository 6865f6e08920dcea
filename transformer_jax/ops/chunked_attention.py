"""Memory-efficient ("chunked") dot-product attention.

Queries are cut into blocks of Cq and keys into blocks of Ck. For each query block the forward
pass scans over the key blocks keeping FlashAttention's running statistics per query — the row
maximum ``m``, the softmax denominator ``l`` and the unnormalised output — so only a
``[B, N, Cq, Ck]`` block of scores exists at any time (Rabe & Staats 2021; Dao et al. 2022).
The backward pass is a ``jax.custom_vjp`` that saves only the inputs, the output and the
per-row log-sum-exp ``[B, N, T]`` and recomputes each block's probabilities, so gradient memory
is also O(T + S) per head instead of O(T * S). Keys and values may have fewer heads K than the
queries N (grouped-query attention): the blocks are multiplied group-wise (``ops.grouped``).

Structured terms (``masks.AttentionSpec``: causal order, sliding window, packed segments, key
padding, ALiBi slopes) are built for each block from ``[B, T]`` / ``[B, S]`` positions and ids,
so the model never holds a ``[T, S]`` mask or bias. With a sliding window ``(left, right)`` and
the spec's default positions (query ``i`` at ``S - T + i``), each query block visits only the
W key blocks its window can reach (``visited_key_blocks``: a static count, about
``(Cq + left + right) / Ck + 1``), starting at the first such block, so the work grows with
T times the window instead of T times S. Dense ``mask`` / ``bias`` arrays are also
accepted (broadcast shapes, any axis 1); a full query or key axis is sliced block by block.
Queries and keys are padded to whole blocks (padded keys are masked, padded query rows are cut
off). Dropout draws the keep mask of block (query block ``i``, key block ``j``) from
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
from transformer_jax.ops.grouped import attention_logits, key_gradient, weighted_values
from transformer_jax.ops.shapes import check_head_dims

__all__ = ["chunked_dot_product_attention", "block_dropout_keep", "visited_key_blocks"]

_F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Static block layout: Cq, Ck, block counts and what does not change per call."""

    cq: int
    ck: int
    nq: int
    nk: int
    nw: int  # key blocks visited per query block (nk without a window)
    first_key: int  # key index of query 0's window start (S - T - left) when nw < nk
    causal: bool
    window: tuple[int, int] | None
    rate: float
    precision: Any
    unroll: bool

    def key_block(self, qi, w):
        """Absolute index of the ``w``-th key block visited by query block ``qi``."""
        if self.nw == self.nk:
            return w
        start = jnp.floor_divide(qi * self.cq + self.first_key, self.ck)
        return jnp.clip(start, 0, self.nk - self.nw) + w


def _blocks(t: int, s: int, chunk_size: int, query_chunk_size: int | None):
    """(Cq, Ck, nq, nk) for T queries and S keys."""
    ck = min(int(chunk_size), s)
    cq = min(int(query_chunk_size or chunk_size), t)
    return cq, ck, -(-t // cq), -(-s // ck)


def visited_key_blocks(spec: masks_lib.AttentionSpec | None, t: int, s: int, chunk_size: int,
                       query_chunk_size: int | None = None) -> int:
    """How many key blocks each query block visits (of ``ceil(S / Ck)``): fewer only for a
    sliding window with the spec's default positions (a window static in the indices).

    Query block ``i`` (queries ``i*Cq ..``, at key positions ``S - T + i*Cq ..``) can see the
    keys ``[i*Cq + S - T - left, i*Cq + Cq - 1 + S - T + right]`` (``right`` 0 under a causal
    mask); the count is the most key blocks any query block's range touches.
    """
    cq, ck, nq, nk = _blocks(t, s, chunk_size, query_chunk_size)
    if spec is None or spec.window is None or not spec.by_index:
        return nk
    left, right = spec.window
    right = min(right, 0) if spec.causal else right
    first, span = s - t - left, cq + left + right  # key range of block 0: [first, first+span)
    touched = max((i * cq + first + span - 1) // ck - (i * cq + first) // ck + 1
                  for i in range(nq))
    return min(nk, touched)


def _slice(x, axis: int, start, size: int):
    """Block ``[start, start + size)`` of ``x`` along ``axis``; a broadcast (1) axis as is."""
    if x is None or x.shape[axis] == 1:
        return x
    return lax.dynamic_slice_in_dim(x, start, size, axis)


def _block_scores(plan: _Plan, q_blk, k_blk, aux, qi, kb):
    """Scaled, biased, masked scores of query block ``qi`` vs key block ``kb``:
    ``[B, N, Cq, Ck]`` float32, masked = -inf."""
    q0, k0 = qi * plan.cq, kb * plan.ck
    s = attention_logits(q_blk, k_blk, plan.precision)  # [B, N, Cq, Ck]
    s = s * (1.0 / math.sqrt(q_blk.shape[-1]))
    mask, bias = masks_lib.structured_terms(
        _slice(aux["q_positions"], 1, q0, plan.cq),
        _slice(aux["k_positions"], 1, k0, plan.ck),
        causal=plan.causal,
        window=plan.window,
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


def _forward_block(plan: _Plan, q_blk, k, v, aux, rng, qi):
    """One query block over its key blocks: out ``[B, Cq, N, H]`` f32, lse ``[B, N, Cq]``."""
    bsz, cq, n, h = q_blk.shape

    def step(carry, w):
        m, denom, acc = carry  # [B, N, Cq], [B, N, Cq], [B, N, Cq, H]
        kb = plan.key_block(qi, w)
        k_blk = lax.dynamic_slice_in_dim(k, kb * plan.ck, plan.ck, 1)
        v_blk = lax.dynamic_slice_in_dim(v, kb * plan.ck, plan.ck, 1)
        s = _block_scores(plan, q_blk, k_blk, aux, qi, kb)  # [B, N, Cq, Ck]
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))
        m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
        p = jnp.exp(s - m_safe[..., None])  # masked -> 0
        corr = jnp.exp(m - m_safe)  # 0 while nothing was attended yet
        denom = denom * corr + jnp.sum(p, axis=-1)
        if rng is not None:
            p = p * _keep_scale(rng, qi * plan.nk + kb, plan.rate, p.shape)
        pv = weighted_values(p, v_blk, plan.precision, heads_first=True)  # [B, N, Cq, H]
        acc = acc * corr[..., None] + pv
        return (m_new, denom, acc), None

    init = (
        jnp.full((bsz, n, cq), -jnp.inf, _F32),
        jnp.zeros((bsz, n, cq), _F32),
        jnp.zeros((bsz, n, cq, h), _F32),
    )
    (m, denom, acc), _ = lax.scan(step, init, jnp.arange(plan.nw), unroll=plan.unroll)
    out = acc / jnp.where(denom == 0.0, 1.0, denom)[..., None]  # fully masked rows -> 0
    safe = jnp.where(denom > 0.0, denom, 1.0)
    lse = jnp.where(denom > 0.0, m + jnp.log(safe), jnp.inf)  # [B, N, Cq]
    return jnp.transpose(out, (0, 2, 1, 3)), lse


def _forward(plan: _Plan, q, k, v, aux, rng):
    """out ``[B, Tp, N, H]`` (query dtype), lse ``[B, N, Tp]`` float32."""
    bsz, tp, n, h = q.shape

    def one(_, qi):
        q_blk = lax.dynamic_slice_in_dim(q, qi * plan.cq, plan.cq, 1)
        return None, _forward_block(plan, q_blk, k, v, aux, rng, qi)

    _, (outs, lses) = lax.scan(one, None, jnp.arange(plan.nq), unroll=plan.unroll)
    out = jnp.moveaxis(outs, 0, 1).reshape(bsz, tp, n, h)  # from [nq, B, Cq, N, H]
    lse = jnp.moveaxis(lses, 0, 2).reshape(bsz, n, tp)  # from [nq, B, N, Cq]
    return out.astype(q.dtype), lse


def _reduce_to(x, shape):
    """Sums ``x`` over the axes where ``shape`` has a 1 (undoing broadcasting)."""
    axes = tuple(i for i, (a, b) in enumerate(zip(x.shape, shape, strict=True)) if b == 1 != a)
    return jnp.sum(x, axis=axes, keepdims=True) if axes else x


def _add_block(total, blk, plan: _Plan, qi, kb):
    """``total[..., q block, k block] += blk`` for a (broadcast) bias-shaped ``total``."""
    start = [0, 0, qi * plan.cq if total.shape[2] != 1 else 0,
             kb * plan.ck if total.shape[3] != 1 else 0]
    old = lax.dynamic_slice(total, start, blk.shape)
    return lax.dynamic_update_slice(total, old + blk, start)


def _add_rows(total, blk, start):
    """``total[:, start:start + len(blk)] += blk`` along axis 1."""
    old = lax.dynamic_slice_in_dim(total, start, blk.shape[1], 1)
    return lax.dynamic_update_slice_in_dim(total, old + blk, start, 1)


def _backward_block(plan: _Plan, q_blk, do_blk, lse_blk, delta_blk, k, v, aux, rng, qi, carry):
    """Gradients of one query block: (dq ``[B, Cq, N, H]``, (dk, dv, dbias) accumulated)."""
    scale = 1.0 / math.sqrt(q_blk.shape[-1])
    do_v = do_blk if v.dtype == _F32 else do_blk.astype(v.dtype)
    prec, kh = plan.precision, k.shape[2]

    def step(inner, w):
        dq, dk, dv, dbias = inner
        kb = plan.key_block(qi, w)
        k_blk = lax.dynamic_slice_in_dim(k, kb * plan.ck, plan.ck, 1)
        v_blk = lax.dynamic_slice_in_dim(v, kb * plan.ck, plan.ck, 1)
        s = _block_scores(plan, q_blk, k_blk, aux, qi, kb)
        p = jnp.exp(s - lse_blk[..., None])  # [B, N, Cq, Ck]; masked -> 0
        dp = attention_logits(do_v, v_blk, prec)  # [B, N, Cq, Ck]
        p_drop = p
        if rng is not None:
            z = _keep_scale(rng, qi * plan.nk + kb, plan.rate, p.shape)
            p_drop, dp = p * z, dp * z
        dv_blk = key_gradient(p_drop.astype(do_v.dtype), do_v, kh, prec)  # [B, Ck, K, H]
        # D_i = sum_j P_ij dP_ij = dO_i . O_i (also with dropout, since O uses the dropped P).
        ds = p * (dp - delta_blk[..., None])  # d loss / d (biased) logits
        ds_q = ds if q_blk.dtype == _F32 else ds.astype(q_blk.dtype)
        dq = dq + scale * weighted_values(ds_q, k_blk, prec)  # [B, Cq, N, H]
        dk = _add_rows(dk, scale * key_gradient(ds_q, q_blk, kh, prec), kb * plan.ck)
        dv = _add_rows(dv, dv_blk, kb * plan.ck)
        if dbias is not None:
            blk_shape = (*dbias.shape[:2], 1 if dbias.shape[2] == 1 else plan.cq,
                         1 if dbias.shape[3] == 1 else plan.ck)
            dbias = _add_block(dbias, _reduce_to(ds, blk_shape), plan, qi, kb)
        return (dq, dk, dv, dbias), None

    dk, dv, dbias = carry
    init = (jnp.zeros(q_blk.shape, _F32), dk, dv, dbias)
    (dq, dk, dv, dbias), _ = lax.scan(step, init, jnp.arange(plan.nw), unroll=plan.unroll)
    return dq, (dk, dv, dbias)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _flash(q, k, v, aux, rng, plan):
    return _forward(plan, q, k, v, aux, rng)[0]


def _flash_fwd(q, k, v, aux, rng, plan):
    out, lse = _forward(plan, q, k, v, aux, rng)
    return out, (q, k, v, aux, rng, out, lse)


def _flash_bwd(plan, res, g):
    q, k, v, aux, rng, out, lse = res
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
    (dk, dv, dbias), dq_blocks = lax.scan(q_step, init, jnp.arange(plan.nq), unroll=plan.unroll)
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


def _padded_terms(spec: masks_lib.AttentionSpec, mask, bias, t, s, tp, sp) -> dict:
    """The per-block inputs (spec arrays, dense mask and bias) padded to whole blocks."""
    terms = spec.arrays(t, s)
    k_valid = terms["k_valid"]
    if k_valid is None and sp != s:
        k_valid = jnp.ones((1, s), bool)
    return {
        "q_positions": _pad_axis(terms["q_positions"], 1, tp, 0),
        "k_positions": _pad_axis(terms["k_positions"], 1, sp, 0),
        "q_segments": _pad_axis(terms["q_segments"], 1, tp, 0),
        "k_segments": _pad_axis(terms["k_segments"], 1, sp, 0),
        "k_valid": _pad_axis(k_valid, 1, sp, False),
        "alibi_slopes": terms["alibi_slopes"],
        "mask": _pad_axis(_pad_axis(mask, 2, tp, True), 3, sp, False),
        "bias": _pad_axis(_pad_axis(bias, 2, tp, 0), 3, sp, 0),
    }


def chunked_dot_product_attention(query, key, value, *, mask=None, bias=None,
                                  spec: masks_lib.AttentionSpec | None = None, dropout_rate=0.0,
                                  dropout_rng=None, chunk_size=512, query_chunk_size=None,
                                  precision=None, unroll: bool = False):
    """Chunked attention; same contract as ``dot_product_attention``.

    Args:
      query: ``[B, T, N, H]``; key, value: ``[B, S, K, H]`` (K divides N).
      mask: optional bool ``[b, n, t, s]`` broadcastable to ``[B, N, T, S]``.
      bias: optional float, same broadcasting rule (differentiable).
      spec: optional ``masks.AttentionSpec`` (built block by block; slopes get no gradient).
      dropout_rate, dropout_rng: dropout on the attention weights (block-wise).
      chunk_size: key block size Ck.
      query_chunk_size: query block size Cq (default ``chunk_size``).
      precision: matmul precision.
      unroll: unroll the block loops (the same numbers). XLA's cost analysis counts a loop
        body once; unrolled, ``compiled.cost_analysis()`` counts every block
        (``bench/attention_memory.py --window``).

    Returns:
      ``[B, T, N, H]`` in the query dtype.
    """
    check_head_dims(query, key, value)
    if int(chunk_size) <= 0 or (query_chunk_size is not None and int(query_chunk_size) <= 0):
        raise ValueError(
            f"chunk_size and query_chunk_size must be positive integers; got {chunk_size} and "
            f"{query_chunk_size}."
        )
    t, s = query.shape[1], key.shape[1]
    if s == 0 or t == 0:
        return jnp.zeros(query.shape, query.dtype)
    cq, ck, nq, nk = _blocks(t, s, chunk_size, query_chunk_size)
    tp, sp = nq * cq, nk * ck
    spec = spec or masks_lib.AttentionSpec()
    aux = _padded_terms(spec, mask, bias, t, s, tp, sp)
    rng = dropout_rng if (dropout_rng is not None and dropout_rate > 0.0) else None
    nw = visited_key_blocks(spec, t, s, chunk_size, query_chunk_size)
    first_key = s - t - (spec.window[0] if spec.window else 0)
    plan = _Plan(cq, ck, nq, nk, nw, first_key, spec.causal, spec.window, float(dropout_rate),
                 precision, bool(unroll))
    out = _flash(
        _pad_axis(query, 1, tp, 0), _pad_axis(key, 1, sp, 0), _pad_axis(value, 1, sp, 0),
        aux, rng, plan,
    )
    return out[:, :t]
