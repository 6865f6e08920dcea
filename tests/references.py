"""Attention references written differently from the library (numpy loops, per-row jnp).

Shared by tests/ops/test_attention.py and tests/ops/test_attention_spec.py.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np

HI = jax.lax.Precision.HIGHEST


def numpy_attention(q, k, v, mask=None, bias=None):
    """Loops over b, n, t; returns (out [B,T,N,H], weights [B,N,T,S]) in float64."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b_, t_, n_, h_ = q.shape
    s_ = k.shape[1]
    full = (b_, n_, t_, s_)
    mask = np.ones(full, bool) if mask is None else np.broadcast_to(np.asarray(mask), full)
    bias = np.zeros(full) if bias is None else np.broadcast_to(np.asarray(bias, np.float64), full)
    out = np.zeros(q.shape)
    weights = np.zeros(full)
    for b in range(b_):
        for n in range(n_):
            for t in range(t_):
                allowed = [s for s in range(s_) if mask[b, n, t, s]]
                if not allowed:
                    continue  # fully masked row: zeros
                scores = {
                    s: float(q[b, t, n] @ k[b, s, n]) / math.sqrt(h_) + bias[b, n, t, s]
                    for s in allowed
                }
                top = max(scores.values())
                z = sum(math.exp(x - top) for x in scores.values())
                for s in allowed:
                    w = math.exp(scores[s] - top) / z
                    weights[b, n, t, s] = w
                    out[b, t, n] += w * v[b, s, n]
    return out, weights


def _row(q_row, k, v, mask_row, bias_row, keep_row):
    """One query row: q_row [H], k/v [S,H], mask_row/keep_row [S], bias_row [S] -> [H]."""
    scores = jnp.dot(k, q_row, precision=HI) / jnp.sqrt(q_row.shape[0]) + bias_row
    top = jax.lax.stop_gradient(jnp.max(jnp.where(mask_row, scores, -1e30)))
    e = jnp.where(mask_row, jnp.exp(jnp.where(mask_row, scores - top, 0.0)), 0.0)
    z = jnp.sum(e)
    w = e / jnp.where(z > 0, z, 1.0) * keep_row
    return jnp.dot(w, v, precision=HI)


def row_attention(q, k, v, mask=None, bias=None, keep=None):
    """vmapped per-row attention; keep is an optional dropout multiplier [B,N,T,S]."""
    b_, t_, n_, _ = q.shape
    full = (b_, n_, t_, k.shape[1])
    mask = jnp.ones(full, bool) if mask is None else jnp.broadcast_to(mask, full)
    bias = jnp.zeros(full) if bias is None else jnp.broadcast_to(bias, full)
    keep = jnp.ones(full) if keep is None else keep
    f = jax.vmap(_row, in_axes=(0, None, None, 0, 0, 0))  # over t
    f = jax.vmap(f, in_axes=(1, 1, 1, 0, 0, 0), out_axes=1)  # over n
    f = jax.vmap(f, in_axes=(0, 0, 0, 0, 0, 0))  # over b
    return f(q, k, v, mask, bias, keep)  # [B, T, N, H]


def repeat_kv_heads(x, num_heads):
    """Grouped-query reference: key/value heads [B, S, K, H] repeated to [B, S, N, H], head k
    serving query heads k*G .. k*G + G-1 (jnp.repeat, so gradients sum back over the group)."""
    return jnp.repeat(x, num_heads // x.shape[2], axis=2)


def band_mask(q_positions, k_positions, left, right):
    """Sliding-window mask by loops: [B, 1, T, S] bool, True iff
    q_pos - left <= k_pos <= q_pos + right. Positions are [B, T] / [B, S] (or [T] / [S])."""
    qp = np.atleast_2d(np.asarray(q_positions))
    kp = np.atleast_2d(np.asarray(k_positions))
    out = np.zeros((max(qp.shape[0], kp.shape[0]), 1, qp.shape[1], kp.shape[1]), bool)
    for b in range(out.shape[0]):
        for i in range(qp.shape[1]):
            for j in range(kp.shape[1]):
                q = qp[min(b, qp.shape[0] - 1), i]
                k = kp[min(b, kp.shape[0] - 1), j]
                out[b, 0, i, j] = q - left <= k <= q + right
    return out
