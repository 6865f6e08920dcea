"""Dropout masks from 16 random bits per element (half the bits of ``jax.random.bernoulli``).

``jax.random.bernoulli(key, p, shape)`` draws a float32 uniform per element, i.e. one 32-bit
threefry output each; generating those bits is most of the cost of dropout on a CPU (about a
seventh of a small training step). ``keep_mask`` draws ``uint16`` bits instead (JAX packs two
per 32-bit threefry output) and keeps an element when its bits are ``>= round(rate * 2**16)``.
The drop probability is therefore ``rate`` rounded to a multiple of ``2**-16`` (0.1 becomes
0.100006), and ``keep_scale`` is the inverse of the exact keep probability, so inverted
dropout stays unbiased: ``E[keep * scale] = 1``.

Masks are a pure function of ``(key, rate, shape)``: the same key gives the same mask on every
run, which keeps a resumed run bit-exact.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["dropout", "keep_mask", "keep_scale"]

_BITS = 16
_LEVELS = 1 << _BITS


def _threshold(rate: float) -> int:
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"dropout rate must be in [0, 1); got {rate}.")
    return min(int(round(rate * _LEVELS)), _LEVELS - 1)


def keep_scale(rate: float) -> float:
    """``1 / P(keep)`` for the quantised ``rate`` (see the module docstring)."""
    return _LEVELS / (_LEVELS - _threshold(rate))


def keep_mask(rng: jax.Array, rate: float, shape) -> jax.Array:
    """Bool mask of ``shape``: True (keep) with probability ``1 - rate`` (rate in 2**-16 steps)."""
    bits = jax.random.bits(rng, tuple(shape), jnp.uint16)
    return bits >= jnp.uint16(_threshold(rate))


def dropout(x: jax.Array, rate: float, rng) -> jax.Array:
    """Inverted dropout of ``x``; identity when ``rng`` is None or ``rate == 0``."""
    if rng is None or rate == 0.0:
        return x
    scale = jnp.asarray(keep_scale(rate), x.dtype)
    return jnp.where(keep_mask(rng, rate, x.shape), x * scale, jnp.zeros((), x.dtype))
