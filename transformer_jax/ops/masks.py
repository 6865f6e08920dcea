"""Boolean attention masks, broadcastable to ``[B, N, T, S]`` (True = attend).

All masks have rank 4 so they can be combined with ``combine_masks`` and passed straight to
``transformer_jax.ops.dot_product_attention``. Singleton axes broadcast.

``AttentionSpec`` describes the same terms (causal order, sliding windows, packed segments, key
padding, ALiBi) with ``[B, T]`` / ``[B, S]`` arrays only. ``dot_product_attention(spec=...)``
builds them densely for "xla" / "jax" and block by block for "chunked", which then never holds
a ``[T, S]`` array — the model passes its masks this way.
"""

from __future__ import annotations

import dataclasses
import functools
import operator
from typing import Any

import jax
import jax.numpy as jnp

__all__ = [
    "AttentionSpec",
    "padding_mask",
    "causal_mask",
    "segment_mask",
    "combine_masks",
    "normalize_window",
    "spec_from_keywords",
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


def normalize_window(window) -> tuple[int, int] | None:
    """``local_window_size`` as ``(left, right)``: an int ``w`` is ``(w, w)``, None stays None.

    Query ``i`` attends key ``j`` iff ``i - left <= j <= i + right`` (positions, or indices),
    the convention of ``jax.nn.dot_product_attention``.
    """
    if window is None:
        return None
    pair = (window, window) if isinstance(window, int) and not isinstance(window, bool) else window
    try:
        left, right = (operator.index(w) for w in pair)
    except (TypeError, ValueError):
        raise ValueError(
            f"local_window_size must be None, an int or a pair (left, right) of ints; got "
            f"{window!r}."
        ) from None
    if left < 0 or right < 0:
        raise ValueError(
            f"local_window_size={window!r} has a negative side; query i attends keys "
            "i - left .. i + right, so both sides must be >= 0 (use is_causal=True or "
            "right=0 to attend no later key)."
        )
    return int(left), int(right)


def structured_terms(q_positions, k_positions, *, causal: bool = False, window=None,
                     q_segments=None, k_segments=None, k_valid=None, alibi_slopes=None):
    """Mask and bias from per-token arrays (any block of queries and keys).

    Args:
      q_positions: ``[b, t]`` int query positions (needed for ``causal``, ``window`` and ALiBi,
        else None).
      k_positions: ``[b, s]`` int key positions (same).
      causal: key visible iff ``k_pos <= q_pos``.
      window: ``(left, right)``: key visible iff ``q_pos - left <= k_pos <= q_pos + right``.
      q_segments, k_segments: ``[b, t]`` / ``[b, s]`` int ids; attend within equal non-zero ids.
      k_valid: ``[b, s]`` bool, False at padding keys.
      alibi_slopes: ``[N]``; bias ``-slope * |q_pos - k_pos|``.

    Returns:
      ``(mask [b, 1, t, s] bool or None, bias [b, N, t, s] float32 or None)``.
    """
    terms = []
    if causal or window is not None:
        q_pos, k_pos = q_positions[:, None, :, None], k_positions[:, None, None, :]
        if causal:
            terms.append(k_pos <= q_pos)
        if window is not None:
            terms.append((q_pos - window[0] <= k_pos) & (k_pos <= q_pos + window[1]))
    if q_segments is not None:
        same = q_segments[:, None, :, None] == k_segments[:, None, None, :]
        terms.append(same & (q_segments != 0)[:, None, :, None])
    if k_valid is not None:
        terms.append(k_valid[:, None, None, :])
    mask = functools.reduce(jnp.logical_and, terms) if terms else None
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
      q_positions, k_positions: int positions (for ``causal``, ``window`` and ALiBi). Default
        ``arange(S)`` for keys and, bottom-right aligned, ``S - T + arange(T)`` for queries
        (the queries are the last T keys; equal to ``arange(T)`` when T == S).
      q_segments, k_segments: int segment ids of packed rows (0 = padding, never attended).
      k_valid: bool key padding (False = padding key).
      alibi_slopes: ``[N]`` ALiBi slopes (``positional.alibi_slopes``); adds
        ``-slope * |q_pos - k_pos|``.
      window: ``(left, right)`` (or an int for both sides): a sliding window, key ``j`` is
        visible to query ``i`` iff ``q_pos - left <= k_pos <= q_pos + right``. With default
        positions "chunked" skips the key blocks outside the window.
      k_lengths: ``[B]`` int key lengths: keys at index ``>= k_lengths[b]`` are padding (what
        cuDNN takes as its own padding mask through ``implementation="jax"``).
    """

    causal: bool = False
    q_positions: Any = None
    k_positions: Any = None
    q_segments: Any = None
    k_segments: Any = None
    k_valid: Any = None
    alibi_slopes: Any = None
    window: tuple[int, int] | None = None
    k_lengths: Any = None

    def __post_init__(self):
        object.__setattr__(self, "window", normalize_window(self.window))

    @property
    def by_index(self) -> bool:
        """True when the positions are the defaults (query ``i`` at ``S - T + i``, key ``j``
        at ``j``), so causal and window terms are static in the indices."""
        return self.q_positions is None and self.k_positions is None

    def arrays(self, t: int, s: int) -> dict[str, Any]:
        """The arrays with default positions filled in where they are needed and the key
        lengths folded into ``k_valid``."""
        q_pos, k_pos = self.q_positions, self.k_positions
        if self.causal or self.window is not None or self.alibi_slopes is not None:
            if k_pos is None:
                k_pos = jnp.arange(s, dtype=jnp.int32)[None]
            if q_pos is None:
                q_pos = (s - t + jnp.arange(t, dtype=jnp.int32))[None]
        k_valid = None if self.k_valid is None else jnp.asarray(self.k_valid, bool)
        if self.k_lengths is not None:
            lengths = jnp.asarray(self.k_lengths).reshape(-1, 1)  # [b, 1]
            by_length = jnp.arange(s)[None, :] < lengths  # [b, S]
            k_valid = by_length if k_valid is None else k_valid & by_length
        return {
            "q_positions": None if q_pos is None else jnp.asarray(q_pos),
            "k_positions": None if k_pos is None else jnp.asarray(k_pos),
            "q_segments": self.q_segments,
            "k_segments": self.k_segments,
            "k_valid": k_valid,
            "alibi_slopes": self.alibi_slopes,
        }

    def dense(self, t: int, s: int):
        """``(mask [b, 1, T, S] or None, bias [b, N, T, S] or None)`` (the "xla" path)."""
        return structured_terms(causal=self.causal, window=self.window, **self.arrays(t, s))

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
        lengths = self.k_lengths
        if lengths is not None and (jnp.ndim(lengths) != 1 or jnp.shape(lengths)[0] not in (1, b)
                                    or not jnp.issubdtype(jnp.result_type(lengths), jnp.integer)):
            raise ValueError(
                f"key lengths (key_value_seq_lengths / AttentionSpec.k_lengths) must be integers "
                f"of shape [{b}] (one per row); got {jnp.result_type(lengths)} "
                f"{tuple(jnp.shape(lengths))}."
            )


jax.tree_util.register_dataclass(
    AttentionSpec,
    data_fields=["q_positions", "k_positions", "q_segments", "k_segments", "k_valid",
                 "alibi_slopes", "k_lengths"],
    meta_fields=["causal", "window"],
)


def spec_from_keywords(spec: AttentionSpec | None, t: int, s: int, *, is_causal: bool = False,
                       key_value_seq_lengths=None, local_window_size=None):
    """``spec`` with ``jax.nn.dot_product_attention``'s mask keywords folded in.

    ``is_causal`` and ``local_window_size`` work on indices as in ``jax.nn`` (query ``i`` and
    key ``j`` compared as ``j <= i`` and ``i - left <= j <= i + right``, query 0 at key 0);
    ``key_value_seq_lengths`` becomes ``k_lengths``. Returns ``spec`` unchanged (possibly
    None) when no keyword is given.
    """
    window = normalize_window(local_window_size)
    if not is_causal and window is None and key_value_seq_lengths is None:
        return spec
    spec = spec or AttentionSpec()
    changes: dict[str, Any] = {}
    if key_value_seq_lengths is not None:
        if spec.k_lengths is not None:
            raise ValueError("key lengths are given twice (key_value_seq_lengths and "
                             "spec.k_lengths); pass one.")
        changes["k_lengths"] = jnp.asarray(key_value_seq_lengths)
    if is_causal or window is not None:
        if window is not None and spec.window is not None:
            raise ValueError("a sliding window is given twice (local_window_size and "
                             "spec.window); pass one.")
        positional = spec.causal or spec.window is not None or spec.alibi_slopes is not None
        if not spec.by_index or (t != s and positional):
            raise ValueError(
                "is_causal / local_window_size compare query and key indices (query 0 at key "
                "0, as jax.nn); this spec places queries by its own positions, so give the "
                "causal order and window in the spec instead (AttentionSpec(causal=..., "
                "window=...)).")
        if t != s:  # the spec's default positions are bottom-right aligned; jax.nn's top-left
            changes["q_positions"] = jnp.arange(t, dtype=jnp.int32)[None]
            changes["k_positions"] = jnp.arange(s, dtype=jnp.int32)[None]
        changes["causal"] = spec.causal or bool(is_causal)
        changes["window"] = window if window is not None else spec.window
    return dataclasses.replace(spec, **changes)
