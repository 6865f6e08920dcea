"""Symmetric int8 quantisation and the int8 x int8 matmul of quantised decoding, as pure
functions.

A weight ``w [D_in, D_out]`` is quantised once, per output channel: ``scale[o] = max_i
|w[i, o]| / 127`` and ``q = round(w / scale)`` in ``[-127, 127]``, so ``q * scale`` is within
``scale / 2`` of ``w`` element-wise. Activations ``x [..., D_in]`` are quantised the same way
at run time, one scale per row (dynamic). ``int8_matmul`` multiplies the two int8 matrices
with int32 accumulation, which is exact: ``|sum_i xq_i q_io| <= D_in * 127^2`` stays below
``2^31`` for ``D_in`` up to 133,000. The result is rescaled by ``row_scale * channel_scale``,
so it differs from ``x @ w`` by at most ``scale[o] / 2 * sum_i |x_i| + row_scale / 2 * sum_i
|q_io * scale[o]|`` (plus float32 rounding). An all-zero row or column gets scale 1 (its
quantised values are 0 either way).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from transformer_jax.ops.shapes import shape_of

__all__ = ["QMAX", "dequantize", "int8_dot", "int8_matmul", "quantize_per_channel",
           "quantize_rows"]

QMAX = 127  # symmetric: -128 is never produced, so negation cannot overflow


def _quantize(x, absmax):
    """``(round(x / s) as int8, s)`` with ``s = absmax / QMAX`` (1 where ``absmax`` is 0)."""
    scale = jnp.where(absmax > 0, absmax / QMAX, 1.0).astype(jnp.float32)
    q = jnp.clip(jnp.round(x.astype(jnp.float32) / scale), -QMAX, QMAX).astype(jnp.int8)
    return q, scale


def quantize_per_channel(w) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Weight ``w [D_in, D_out]`` -> ``(q int8 [D_in, D_out], scale float32 [D_out])``."""
    w = jnp.asarray(w)
    if w.ndim != 2:
        raise ValueError(f"quantize_per_channel takes a [D_in, D_out] weight; got shape "
                         f"{tuple(w.shape)} (reshape the kernel to two axes first).")
    absmax = jnp.max(jnp.abs(w.astype(jnp.float32)), axis=0, keepdims=True)  # [1, D_out]
    q, scale = _quantize(w, absmax)
    return q, scale[0]


def quantize_rows(x) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Activations ``x [..., D]`` -> ``(q int8 [..., D], scale float32 [..., 1])``, one
    scale per row (the absolute maximum over ``D`` over 127)."""
    x = jnp.asarray(x)
    absmax = jnp.max(jnp.abs(x.astype(jnp.float32)), axis=-1, keepdims=True)  # [..., 1]
    return _quantize(x, absmax)


def dequantize(q, scale, dtype=jnp.float32) -> jnp.ndarray:
    """``q * scale`` in ``dtype`` (``scale`` broadcasts: ``[D_out]`` per channel, ``[..., 1]``
    per row)."""
    return (jnp.asarray(q).astype(jnp.float32) * scale).astype(dtype)


def int8_dot(xq, q) -> jnp.ndarray:
    """``xq [..., D_in] int8 @ q [D_in, D_out] int8`` -> int32 ``[..., D_out]``, accumulated
    in int32 (exact)."""
    xs, qs = shape_of(xq), shape_of(q)
    if len(qs) != 2 or xs[-1:] != qs[:1]:
        raise ValueError(f"int8_dot needs xq [..., D_in] and q [D_in, D_out]; got {xs} and "
                         f"{qs}.")
    rows = xq.reshape(-1, qs[0])  # [R, D_in]: one 2-D dot, XLA's fast path
    out = lax.dot_general(rows, q, (((1,), (0,)), ((), ())),
                          preferred_element_type=jnp.int32)  # [R, D_out]
    return out.reshape(*xs[:-1], qs[1])


def int8_matmul(x, q, scale, *, dtype=None) -> jnp.ndarray:
    """``x [..., D_in] @ (q * scale)`` with ``x`` quantised per row: ``[..., D_out]``.

    Args:
      x: float ``[..., D_in]``.
      q: int8 ``[D_in, D_out]``; scale: float32 ``[D_out]`` (``quantize_per_channel``).
      dtype: result dtype (default ``x``'s); the rescale runs in float32.
    """
    x = jnp.asarray(x)
    xq, row_scale = quantize_rows(x)  # [..., D_in], [..., 1]
    acc = int8_dot(xq, q)  # [..., D_out] int32
    out = acc.astype(jnp.float32) * (row_scale * scale)  # [..., D_out]
    return out.astype(x.dtype if dtype is None else dtype)
