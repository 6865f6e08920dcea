"""Boolean attention masks, broadcastable to ``[B, N, T, S]`` (True = attend).

All masks have rank 4 so they can be combined with ``combine_masks`` and passed straight to
``transformer_jax.ops.dot_product_attention``. Singleton axes broadcast.

``AttentionSpec`` describes the same terms (causal order, packed segments, key padding, ALiBi)
with ``[B, T]`` / ``[B, S]`` arrays only. ``dot_product_attention(spec=...)`` builds them
densely for "xla" / "jax" and block by block for "chunked", which then never holds a
``[T, S]`` array — the model passes its masks this way.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

__all__ = [
    "AttentionSpec",
    "padding_mask",
    "causal_mask",
    "segment_mask",
    "combine_masks",
    "structured_terms",
]


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


def causal_mask(t: int, s: int | None = None, offset=0, *, align: str = "top_left") -> jnp.ndarray:
    """Causal (look-ahead) mask.

    Query ``i`` sits at absolute position ``i + offset`` and attends key ``j`` iff
    ``j <= i + offset``. With ``offset=0`` and ``s == t`` this is the usual lower-triangular mask;
    in incremental decoding pass ``offset`` = number of tokens already in the cache (it may be a
    traced integer).

    ``align="bottom_right"`` adds ``s - t`` to the offset: the queries are the *last* ``t`` of
    the ``s`` keys, as when a chunk of ``t`` new tokens is attended together with the ``s - t``
    before it (chunked prefill). ``"top_left"`` (default) puts query 0 at key 0.

    Args:
      t: number of queries T.
      s: number of keys S (defaults to ``t``).
      offset: absolute position of query 0 (int or scalar int array).
      align: ``"top_left"`` or ``"bottom_right"``.

    Returns:
      ``[1, 1, T, S]`` bool.
    """
    s = t if s is None else s
    if int(t) < 0 or int(s) < 0:
        raise ValueError(f"causal_mask lengths must be non-negative; got t={t}, s={s}.")
    if align not in ("top_left", "bottom_right"):
        raise ValueError(f"causal_mask align={align!r}; use 'top_left' or 'bottom_right'.")
    if align == "bottom_right":
        offset = offset + (int(s) - int(t))
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


def structured_terms(q_positions, k_positions, *, causal: bool = False, q_segments=None,
                     k_segments=None, k_valid=None, alibi_slopes=None):
    """Mask and bias from per-token arrays (any block of queries and keys).

    Args:
      q_positions: ``[b, t]`` int query positions (needed for ``causal`` / ALiBi, else None).
      k_positions: ``[b, s]`` int key positions (same).
      causal: key visible iff ``k_pos <= q_pos``.
      q_segments, k_segments: ``[b, t]`` / ``[b, s]`` int ids; attend within equal non-zero ids.
      k_valid: ``[b, s]`` bool, False at padding keys.
      alibi_slopes: ``[N]``; bias ``-slope * |q_pos - k_pos|``.

    Returns:
      ``(mask [b, 1, t, s] bool or None, bias [b, N, t, s] float32 or None)``.
    """
    mask = None

    def both(m):
        return m if mask is None else mask & m

    if causal:
        mask = both(k_positions[:, None, None, :] <= q_positions[:, None, :, None])
    if q_segments is not None:
        same = q_segments[:, None, :, None] == k_segments[:, None, None, :]
        mask = both(same & (q_segments != 0)[:, None, :, None])
    if k_valid is not None:
        mask = both(k_valid[:, None, None, :])
    bias = None
    if alibi_slopes is not None:
        dist = jnp.abs(q_positions[:, :, None].astype(jnp.float32)
                       - k_positions[:, None, :].astype(jnp.float32))  # [b, t, s]
        bias = -alibi_slopes.astype(jnp.float32)[None, :, None, None] * dist[:, None]
    return mask, bias


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
    """Mask and bias terms given by ``[B, T]`` / ``[B, S]`` arrays (a batch axis may be 1).

    Attributes:
      causal: key ``j`` is visible to query ``i`` iff ``k_positions[j] <= q_positions[i]``.
      q_positions, k_positions: int positions (for ``causal`` and ALiBi). Default
        ``arange(S)`` for keys and, bottom-right aligned, ``S - T + arange(T)`` for queries
        (the queries are the last T keys; equal to ``arange(T)`` when T == S).
      q_segments, k_segments: int segment ids of packed rows (0 = padding, never attended).
      k_valid: bool key padding (False = padding key).
      alibi_slopes: ``[N]`` ALiBi slopes (``positional.alibi_slopes``); adds
        ``-slope * |q_pos - k_pos|``.
    """

    causal: bool = False
    q_positions: Any = None
    k_positions: Any = None
    q_segments: Any = None
    k_segments: Any = None
    k_valid: Any = None
    alibi_slopes: Any = None

    def arrays(self, t: int, s: int) -> dict[str, Any]:
        """The arrays with default positions filled in where they are needed."""
        q_pos, k_pos = self.q_positions, self.k_positions
        if self.causal or self.alibi_slopes is not None:
            if k_pos is None:
                k_pos = jnp.arange(s, dtype=jnp.int32)[None]
            if q_pos is None:
                q_pos = (s - t + jnp.arange(t, dtype=jnp.int32))[None]
        return {
            "q_positions": None if q_pos is None else jnp.asarray(q_pos),
            "k_positions": None if k_pos is None else jnp.asarray(k_pos),
            "q_segments": self.q_segments,
            "k_segments": self.k_segments,
            "k_valid": None if self.k_valid is None else jnp.asarray(self.k_valid, bool),
            "alibi_slopes": self.alibi_slopes,
        }

    def dense(self, t: int, s: int):
        """``(mask [b, 1, T, S] or None, bias [b, N, T, S] or None)`` (the "xla" path)."""
        a = self.arrays(t, s)
        return structured_terms(
            a["q_positions"], a["k_positions"], causal=self.causal, q_segments=a["q_segments"],
            k_segments=a["k_segments"], k_valid=a["k_valid"], alibi_slopes=a["alibi_slopes"])

    def check(self, b: int, n: int, t: int, s: int) -> None:
        """Raises ValueError unless every array fits ``[B, N, T, S] = [b, n, t, s]``."""
        want = {"q_positions": t, "q_segments": t, "k_positions": s, "k_segments": s,
                "k_valid": s}
        for name, length in want.items():
            x = getattr(self, name)
            if x is not None and (jnp.ndim(x) != 2 or jnp.shape(x)[0] not in (1, b)
                                  or jnp.shape(x)[1] != length):
                raise ValueError(
                    f"AttentionSpec.{name} has shape {tuple(jnp.shape(x))}; it must be "
                    f"[{b} or 1, {length}] for attention of shape [B, N, T, S] = {[b, n, t, s]}."
                )
        if (self.q_segments is None) != (self.k_segments is None):
            raise ValueError("AttentionSpec needs both q_segments and k_segments, or neither.")
        if self.alibi_slopes is not None and tuple(jnp.shape(self.alibi_slopes)) != (n,):
            raise ValueError(
                f"AttentionSpec.alibi_slopes has shape {tuple(jnp.shape(self.alibi_slopes))}; "
                f"it must be [{n}] (one slope per head)."
            )


jax.tree_util.register_dataclass(
    AttentionSpec,
    data_fields=["q_positions", "k_positions", "q_segments", "k_segments", "k_valid",
                 "alibi_slopes"],
    meta_fields=["causal"],
)
