"""Positional information: sinusoidal encodings, rotary embeddings (RoPE), ALiBi biases and
T5's bucketed relative position biases.

All results are float32 (``apply_rope`` returns the input dtype, ``relative_position_bias``
the table's).
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

__all__ = [
    "sinusoidal_encoding",
    "apply_rope",
    "alibi_slopes",
    "alibi_bias",
    "relative_position_buckets",
    "relative_position_bias",
]


def sinusoidal_encoding(positions, d_model: int, max_wavelength: float = 10000.0, *,
                        split: bool = False) -> jnp.ndarray:
    """Sinusoidal position encoding of Vaswani et al. (2017), section 3.5.

    ``PE[pos, 2i] = sin(pos / max_wavelength**(2i/d_model))`` and
    ``PE[pos, 2i+1] = cos(pos / max_wavelength**(2i/d_model))`` — sine on even feature indices,
    cosine on odd ones (interleaved, exactly as the paper writes it).

    ``split=True`` gives the same values in another feature order, the one of tensor2tensor
    and Marian (OPUS-MT): ``PE[pos, i] = sin(pos * w_i)`` and ``PE[pos, D/2 + i] =
    cos(pos * w_i)`` for ``i < D/2``, with ``w_i = max_wavelength**(-2i/d_model)``.

    Args:
      positions: ``[..., T]`` integer (or float) positions, e.g. ``jnp.arange(T)`` or packed
        per-segment positions ``[B, T]``.
      d_model: feature size D; must be even.
      max_wavelength: the 10000 of the paper.
      split: all sines first, then all cosines (instead of interleaved).

    Returns:
      ``[..., T, D]`` float32.
    """
    if d_model <= 0 or d_model % 2:
        raise ValueError(f"sinusoidal_encoding needs a positive even d_model; got {d_model}.")
    pos = jnp.asarray(positions).astype(jnp.float32)[..., None]  # [..., T, 1]
    two_i = jnp.arange(0, d_model, 2, dtype=jnp.float32)  # [D/2]
    inv_freq = jnp.power(jnp.float32(max_wavelength), -two_i / d_model)  # [D/2]
    angle = pos * inv_freq  # [..., T, D/2]
    if split:
        return jnp.concatenate([jnp.sin(angle), jnp.cos(angle)], axis=-1)  # [..., T, D]
    pe = jnp.stack([jnp.sin(angle), jnp.cos(angle)], axis=-1)  # [..., T, D/2, 2]
    return pe.reshape(*angle.shape[:-1], d_model)  # [..., T, D] sin, cos, sin, cos, ...


def apply_rope(x, positions, max_wavelength: float = 10000.0) -> jnp.ndarray:
    """Rotary position embedding (Su et al. 2021) applied to queries or keys.

    Uses the *half-split* pairing (as in GPT-NeoX / LLaMA): feature ``i`` is rotated together
    with feature ``i + H/2`` by the angle ``pos * max_wavelength**(-2i/H)``, for ``i < H/2``::

        out[..., :H/2] = x1 * cos - x2 * sin
        out[..., H/2:] = x2 * cos + x1 * sin

    The rotation preserves norms and makes ``rope(q, p) . rope(k, r)`` depend only on ``p - r``.

    Args:
      x: ``[B, T, N, H]`` with H even.
      positions: ``[B, T]`` (or ``[T]``) integer positions.
      max_wavelength: base of the frequency ladder.

    Returns:
      ``[B, T, N, H]`` in ``x.dtype`` (computed in float32).
    """
    x = jnp.asarray(x)
    if x.ndim != 4:
        raise ValueError(f"apply_rope expects x of shape [B, T, N, H]; got {tuple(x.shape)}.")
    head_dim = x.shape[-1]
    if head_dim % 2:
        raise ValueError(f"apply_rope needs an even head dimension H; got x shape {x.shape}.")
    positions = jnp.asarray(positions)
    if positions.ndim == 1:
        positions = positions[None]
    if (
        positions.ndim != 2
        or positions.shape[-1] != x.shape[1]
        or positions.shape[0]
        not in (
            1,
            x.shape[0],
        )
    ):
        raise ValueError(
            f"apply_rope positions must have shape [B, T] = [{x.shape[0]}, {x.shape[1]}] (or [T]) "
            f"to match x {tuple(x.shape)}; got {tuple(positions.shape)}."
        )
    half = head_dim // 2
    inv_freq = jnp.power(
        jnp.float32(max_wavelength), -jnp.arange(half, dtype=jnp.float32) * 2.0 / head_dim
    )  # [H/2]
    angle = positions.astype(jnp.float32)[:, :, None, None] * inv_freq  # [B, T, 1, H/2]
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    xf = x.astype(jnp.float32)
    x1, x2 = xf[..., :half], xf[..., half:]  # [B, T, N, H/2] each
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def _power_of_two_slopes(n: int) -> list[float]:
    start = 2.0 ** (-8.0 / n)
    return [start ** (i + 1) for i in range(n)]


def alibi_slopes(num_heads: int) -> jnp.ndarray:
    """Per-head ALiBi slopes of Press et al. (2022).

    For ``n`` a power of two the slopes are the geometric sequence ``2**(-8/n * (i+1))``,
    ``i = 0..n-1`` (n=8: 1/2, 1/4, ..., 1/256). Otherwise, with ``p`` the largest power of two
    below ``n``, they are the ``p`` slopes for ``p`` heads followed by every other slope of the
    ``2p``-head sequence (the 1st, 3rd, 5th ...) until ``n`` slopes are reached.

    Returns:
      ``[N]`` float32.
    """
    if int(num_heads) <= 0:
        raise ValueError(f"alibi_slopes needs num_heads >= 1; got {num_heads}.")
    n = int(num_heads)
    p = 2 ** int(math.floor(math.log2(n)))
    slopes = _power_of_two_slopes(p)
    if p != n:
        slopes += _power_of_two_slopes(2 * p)[0::2][: n - p]
    return jnp.asarray(np.asarray(slopes, dtype=np.float32))


def alibi_bias(num_heads: int, q_positions, k_positions) -> jnp.ndarray:
    """ALiBi additive attention bias ``-slope[n] * |q_pos - k_pos|``.

    The distance is symmetric (absolute value), so it also works for bidirectional (encoder)
    attention; under a causal mask only ``k_pos <= q_pos`` is used, where it equals the paper's
    ``-slope * (i - j)``.

    Args:
      num_heads: N.
      q_positions: ``[B, T]`` (or ``[T]``) integer positions of the queries.
      k_positions: ``[B, S]`` (or ``[S]``) integer positions of the keys.

    Returns:
      ``[B, N, T, S]`` float32 (B is 1 when both positions are rank 1).
    """
    q_positions, k_positions = _positions_2d("alibi_bias", q_positions, k_positions)
    slopes = alibi_slopes(num_heads)  # [N]
    dist = jnp.abs(
        q_positions[:, :, None].astype(jnp.float32) - k_positions[:, None, :].astype(jnp.float32)
    )  # [B, T, S]
    return -slopes[None, :, None, None] * dist[:, None]  # [B, N, T, S]


def _positions_2d(caller: str, q_positions, k_positions):
    """``[T]`` / ``[B, T]`` query and ``[S]`` / ``[B, S]`` key positions as rank-2 arrays."""
    q_positions, k_positions = jnp.asarray(q_positions), jnp.asarray(k_positions)
    q_positions = q_positions[None] if q_positions.ndim == 1 else q_positions
    k_positions = k_positions[None] if k_positions.ndim == 1 else k_positions
    if q_positions.ndim != 2 or k_positions.ndim != 2:
        raise ValueError(
            f"{caller} positions must be [B, T] and [B, S]; got q_positions "
            f"{tuple(q_positions.shape)} and k_positions {tuple(k_positions.shape)}."
        )
    return q_positions, k_positions


def relative_position_buckets(relative_position, *, bidirectional: bool = True,
                              num_buckets: int = 32, max_distance: int = 128) -> jnp.ndarray:
    """T5's bucket of each relative position ``key_position - query_position`` (Raffel et al.
    2020; Mesh TensorFlow's ``_relative_position_bucket``).

    Bidirectional: half of the buckets for keys after the query (``relative_position > 0``),
    half for the rest. Unidirectional (a causal decoder): only keys at or before the query are
    told apart; every later key falls into bucket 0 with the query itself. Within each half,
    distances below ``max_exact = buckets_in_half / 2`` get a bucket each; larger distances
    share logarithmically wider buckets up to ``max_distance``, beyond which all distances share
    the last bucket.

    Args:
      relative_position: int array of any shape (``k_pos - q_pos``).
      bidirectional: encoder-style (True) or causal decoder (False).
      num_buckets: buckets in all (both halves when bidirectional).
      max_distance: distance from which all positions share the last bucket.

    Returns:
      int32 array of ``relative_position``'s shape with values in ``[0, num_buckets)``.
    """
    half = num_buckets // 2 if bidirectional else num_buckets
    max_exact = half // 2
    if max_exact < 1 or max_distance <= max_exact:
        raise ValueError(
            f"relative_position_buckets needs num_buckets >= {4 if bidirectional else 2} and "
            f"max_distance > the {max_exact} exact buckets; got num_buckets={num_buckets}, "
            f"max_distance={max_distance} (T5: 32 and 128).")
    rel = jnp.asarray(relative_position).astype(jnp.int32)
    if bidirectional:
        offset = jnp.where(rel > 0, half, 0)
        distance = jnp.abs(rel)
    else:
        offset = 0
        distance = -jnp.minimum(rel, 0)  # later keys: distance 0
    # float32 as in T5 (and transformers), truncated toward zero
    scaled = (jnp.log(jnp.maximum(distance, 1).astype(jnp.float32) / max_exact)
              / math.log(max_distance / max_exact) * (half - max_exact))
    large = jnp.minimum(max_exact + scaled.astype(jnp.int32), half - 1)
    return offset + jnp.where(distance < max_exact, distance, large)


def relative_position_bias(table, q_positions, k_positions, *, bidirectional: bool = True,
                           max_distance: int = 128) -> jnp.ndarray:
    """T5's relative position bias: ``table[bucket(k_pos - q_pos)]`` per head.

    Pass it as ``bias=`` to ``dot_product_attention`` (it composes with every mask). T5 shares
    one table across the layers of a stack, bidirectional in the encoder, unidirectional in the
    decoder, and does not scale its logits by ``1/sqrt(H)`` (its initialisation absorbs it):
    attention here scales them, so for T5's exact logits multiply the queries by ``sqrt(H)``.

    Args:
      table: ``[num_buckets, N]`` learned biases (differentiable).
      q_positions: ``[B, T]`` (or ``[T]``) integer query positions, e.g. ``index + arange(T)``
        when decoding with a cache.
      k_positions: ``[B, S]`` (or ``[S]``) integer key positions.
      bidirectional, max_distance: as in :func:`relative_position_buckets`.

    Returns:
      ``[B, N, T, S]`` in the table's dtype (B is 1 when both positions are rank 1).
    """
    table = jnp.asarray(table)
    if table.ndim != 2:
        raise ValueError(f"relative_position_bias table must be [num_buckets, N]; got shape "
                         f"{tuple(table.shape)}.")
    q_positions, k_positions = _positions_2d("relative_position_bias", q_positions, k_positions)
    relative = k_positions[:, None, :] - q_positions[:, :, None]  # [B, T, S]
    buckets = relative_position_buckets(relative, bidirectional=bidirectional,
                                        num_buckets=table.shape[0], max_distance=max_distance)
    return jnp.moveaxis(table[buckets], -1, 1)  # [B, T, S, N] -> [B, N, T, S]
