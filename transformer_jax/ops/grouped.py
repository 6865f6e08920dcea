"""The three matmuls of attention for grouped-query attention, without repeating key heads.

Queries have N heads and keys/values K heads, K dividing N (K = N: multi-head attention, K = 1:
multi-query attention). Query head ``n`` meets key/value head ``n // G`` with G = N / K, the
convention of ``jax.nn.dot_product_attention``: the query heads are viewed as ``[K, G]`` (a
reshape, no copy) instead of building ``[B, S, N, H]`` keys by repetition. With K = N the
einsums are the plain multi-head ones.
"""

from __future__ import annotations

import jax.numpy as jnp

__all__ = ["attention_logits", "key_gradient", "weighted_values"]

_F32 = jnp.float32


def attention_logits(query, key, precision=None) -> jnp.ndarray:
    """Unscaled scores ``q . k``: ``[B, T, N, H] x [B, S, K, H] -> [B, N, T, S]`` float32."""
    b, t, n, h = query.shape
    s, kh = key.shape[1], key.shape[2]
    if kh == n:
        return jnp.einsum("BTNH,BSNH->BNTS", query, key, precision=precision,
                          preferred_element_type=_F32)  # [B, N, T, S]
    grouped = query.reshape(b, t, kh, n // kh, h)  # [B, T, K, G, H]
    logits = jnp.einsum("BTKGH,BSKH->BKGTS", grouped, key, precision=precision,
                        preferred_element_type=_F32)  # [B, K, G, T, S]
    return logits.reshape(b, n, t, s)


def weighted_values(probs, value, precision=None, *, heads_first: bool = False) -> jnp.ndarray:
    """``[B, N, T, S] x [B, S, K, H] -> [B, T, N, H]`` (``[B, N, T, H]`` with ``heads_first``)
    float32; ``probs`` is cast to a 16-bit ``value`` dtype first."""
    probs = probs if value.dtype == _F32 else probs.astype(value.dtype)
    b, n, t, s = probs.shape
    kh, h = value.shape[2], value.shape[3]
    if kh == n:
        spec = "BNTS,BSNH->BNTH" if heads_first else "BNTS,BSNH->BTNH"
        return jnp.einsum(spec, probs, value, precision=precision, preferred_element_type=_F32)
    grouped = probs.reshape(b, kh, n // kh, t, s)  # [B, K, G, T, S]
    if heads_first:
        out = jnp.einsum("BKGTS,BSKH->BKGTH", grouped, value, precision=precision,
                         preferred_element_type=_F32)  # [B, K, G, T, H]
        return out.reshape(b, n, t, h)
    out = jnp.einsum("BKGTS,BSKH->BTKGH", grouped, value, precision=precision,
                     preferred_element_type=_F32)  # [B, T, K, G, H]
    return out.reshape(b, t, n, h)


def key_gradient(scores_grad, x, num_kv_heads: int, precision=None) -> jnp.ndarray:
    """``[B, N, T, S] x [B, T, N, H] -> [B, S, K, H]`` float32, summed over each group's G
    query heads (the gradient of a key or value shared by them)."""
    b, n, t, s = scores_grad.shape
    h = x.shape[3]
    if num_kv_heads == n:
        return jnp.einsum("BNTS,BTNH->BSNH", scores_grad, x, precision=precision,
                          preferred_element_type=_F32)  # [B, S, N, H]
    g = n // num_kv_heads
    return jnp.einsum("BKGTS,BTKGH->BSKH", scores_grad.reshape(b, num_kv_heads, g, t, s),
                      x.reshape(b, t, num_kv_heads, g, h), precision=precision,
                      preferred_element_type=_F32)  # [B, S, K, H]
