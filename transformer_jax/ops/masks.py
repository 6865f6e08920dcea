"""Boolean attention masks, broadcastable to ``[B, N, T, S]`` (True = attend).

All masks have rank 4 so they can be combined with ``combine_masks`` and passed straight to
``transformer_jax.ops.dot_product_attention``. Singleton axes broadcast.
"""

from __future__ import annotations

import jax.numpy as jnp

__all__ = ["padding_mask", "causal_mask", "segment_mask", "combine_masks"]


def _check_rank2(name: str, x) -> jnp.ndarray:
    x = jnp.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{name} must have shape [batch, length]; got shape {tuple(x.shape)}.")
    return x


def padding_mask(q_valid, k_valid) -> jnp.ndarray:
    """Mask letting valid queries attend valid keys.

    Args:
      q_valid: ``[B, T]`` bool (or int, non-zero = valid) — which query positions are real.
      k_valid: ``[B, S]`` bool (or int, non-zero = valid) — which key positions are real.

    Returns:
      ``[B, 1, T, S]`` bool, True where both the query and the key are valid.
    """
    q_valid = _check_rank2("q_valid", q_valid).astype(bool)
    k_valid = _check_rank2("k_valid", k_valid).astype(bool)
    if q_valid.shape[0] != k_valid.shape[0]:
        raise ValueError(
            f"q_valid {tuple(q_valid.shape)} and k_valid {tuple(k_valid.shape)} disagree on the "
            "batch size; pass arrays with the same leading dimension."
        )
    return q_valid[:, None, :, None] & k_valid[:, None, None, :]  # [B, 1, T, S]


def causal_mask(t: int, s: int | None = None, offset=0) -> jnp.ndarray:
    """Causal (look-ahead) mask.

    Query ``i`` sits at absolute position ``i + offset`` and attends key ``j`` iff
    ``j <= i + offset``. With ``offset=0`` and ``s == t`` this is the usual lower-triangular mask;
    in incremental decoding pass ``offset`` = number of tokens already in the cache (it may be a
    traced integer).

    Args:
      t: number of queries T.
      s: number of keys S (defaults to ``t``).
      offset: absolute position of query 0 (int or scalar int array).

    Returns:
      ``[1, 1, T, S]`` bool.
    """
    s = t if s is None else s
    if int(t) < 0 or int(s) < 0:
        raise ValueError(f"causal_mask lengths must be non-negative; got t={t}, s={s}.")
    q_pos = jnp.arange(t)[:, None] + offset  # [T, 1]
    k_pos = jnp.arange(s)[None, :]  # [1, S]
    return (k_pos <= q_pos)[None, None]  # [1, 1, T, S]


def segment_mask(q_segments, k_segments) -> jnp.ndarray:
    """Mask for packed sequences: attend only within the same (non-zero) segment id.

    Args:
      q_segments: ``[B, T]`` int segment ids of the queries (0 = padding).
      k_segments: ``[B, S]`` int segment ids of the keys (0 = padding).

    Returns:
      ``[B, 1, T, S]`` bool, True where ids are equal and non-zero.
    """
    q_segments = _check_rank2("q_segments", q_segments)
    k_segments = _check_rank2("k_segments", k_segments)
    if q_segments.shape[0] != k_segments.shape[0]:
        raise ValueError(
            f"q_segments {tuple(q_segments.shape)} and k_segments {tuple(k_segments.shape)} "
            "disagree on the batch size; pass arrays with the same leading dimension."
        )
    same = q_segments[:, None, :, None] == k_segments[:, None, None, :]  # [B, 1, T, S]
    return same & (q_segments != 0)[:, None, :, None]


def combine_masks(*masks) -> jnp.ndarray | None:
    """Logical AND of masks (broadcasting); ``None`` entries are ignored.

    Returns ``None`` when every argument is ``None``.
    """
    present = [jnp.asarray(m) for m in masks if m is not None]
    if not present:
        return None
    for m in present:
        if m.ndim != 4:
            raise ValueError(
                f"combine_masks expects rank-4 masks broadcastable to [B, N, T, S]; got shape "
                f"{tuple(m.shape)}."
            )
    out = present[0].astype(bool)
    for m in present[1:]:
        out = out & m.astype(bool)
    return out
