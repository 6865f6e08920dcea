"""Low-rank adaptation (LoRA, Hu et al. 2021) of a dense layer as pure functions.

A frozen ``[D_in, D_out]`` weight ``w`` is adapted by two small trainable matrices
``a [D_in, r]`` and ``b [r, D_out]`` with ``r`` much smaller than ``D_in`` and ``D_out``:
``y = x w + scale * (x a) b``. ``scale`` is usually ``alpha / r``; ``b`` starts at zero so the
adapted layer starts equal to the frozen one. ``lora_dense`` never forms ``a b`` (``x a`` is
``[..., r]``); ``lora_merge`` folds the adapter into the weight for decoding at full speed.
"""

from __future__ import annotations

import jax.numpy as jnp

from transformer_jax.ops.shapes import shape_of

__all__ = ["lora_dense", "lora_merge"]


def _check(w, a, b) -> None:
    ws, as_, bs = shape_of(w), shape_of(a), shape_of(b)
    if len(ws) != 2 or len(as_) != 2 or len(bs) != 2:
        raise ValueError(f"LoRA needs w [D_in, D_out], a [D_in, r] and b [r, D_out]; got ranks "
                         f"w {ws}, a {as_}, b {bs}.")
    if as_[0] != ws[0] or bs[1] != ws[1] or as_[1] != bs[0]:
        raise ValueError(
            f"LoRA shapes do not fit: w {ws} is [D_in, D_out], so a must be [{ws[0]}, r] and b "
            f"[r, {ws[1]}] with one rank r; got a {as_} and b {bs}.")


def lora_dense(x, w, a, b, scale, *, precision=None) -> jnp.ndarray:
    """``x w + scale * (x a) b``.

    Args:
      x: ``[..., D_in]``.
      w: ``[D_in, D_out]`` (frozen base weight).
      a: ``[D_in, r]``; b: ``[r, D_out]`` (the adapter).
      scale: float (or scalar array), e.g. ``alpha / r``.
      precision: matmul precision.

    Returns:
      ``[..., D_out]`` in the dtype JAX promotes ``x`` and ``w`` to.
    """
    _check(w, a, b)
    x = jnp.asarray(x)
    if x.shape[-1:] != shape_of(w)[:1]:
        raise ValueError(f"x {tuple(x.shape)} must end in D_in = {shape_of(w)[0]} (w is "
                         f"{shape_of(w)}).")
    base = jnp.matmul(x, w, precision=precision)  # [..., D_out]
    low = jnp.matmul(x, a, precision=precision)  # [..., r]
    return base + scale * jnp.matmul(low, b, precision=precision)


def lora_merge(w, a, b, scale, *, precision=None) -> jnp.ndarray:
    """The adapted weight ``w + scale * a b`` (``[D_in, D_out]``, in ``w``'s dtype): a plain
    dense layer with it equals ``lora_dense`` to rounding."""
    _check(w, a, b)
    delta = jnp.matmul(a, b, precision=precision)  # [D_in, D_out]
    return (w + scale * delta).astype(jnp.result_type(w))
