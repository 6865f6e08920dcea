"""Shape checks shared by the attention functions: one clear ``ValueError`` per mistake.

Letters: B batch, T query length, S key length, N query heads, K key/value heads, H head dim.
"""

from __future__ import annotations

import jax.numpy as jnp

__all__ = ["check_broadcast", "check_head_dims", "check_qkv", "shape_of"]


def shape_of(x) -> tuple[int, ...]:
    """``x``'s shape as a tuple of ints (for error messages and comparisons)."""
    return tuple(jnp.shape(x))


def check_head_dims(query, key, value) -> None:
    """Raises ValueError unless query, key and value ``[..., H]`` share one head dim H."""
    hq, hk, hv = (jnp.shape(x)[-1] for x in (query, key, value))
    if not hq == hk == hv:
        raise ValueError(
            f"query, key and value must have the same head dim H; got query H={hq}, key "
            f"H={hk}, value H={hv}; project them to one head dim (d_model / num_heads)."
        )


def check_qkv(query, key, value) -> tuple[int, int, int, int, int, int]:
    """Validates ``query [B, T, N, H]``, ``key``/``value [B, S, K, H]``; returns
    ``(B, T, S, N, K, H)``.

    K may be smaller than N when it divides it (grouped-query attention; K = 1 is multi-query
    attention): query head ``n`` attends with key/value head ``n // (N // K)``, as in
    ``jax.nn.dot_product_attention``.
    """
    for name, x in (("query", query), ("key", key), ("value", value)):
        if jnp.ndim(x) != 4:
            raise ValueError(
                f"{name} must have rank 4 [batch, length, heads, head_dim]; got shape "
                f"{shape_of(x)}."
            )
    qs, ks, vs = shape_of(query), shape_of(key), shape_of(value)
    if ks[:3] != vs[:3]:
        raise ValueError(
            f"key {ks} and value {vs} must agree on [batch, length, heads]; pass keys and values "
            "of the same sequence."
        )
    if qs[0] != ks[0]:
        raise ValueError(f"query {qs} and key {ks} have different batch sizes {qs[0]} != {ks[0]}.")
    if ks[2] == 0 or qs[2] % ks[2]:
        raise ValueError(
            f"query {qs} has {qs[2]} heads, which is not a multiple of the key/value heads "
            f"{ks[2]} of key {ks}; the number of query heads N must be divisible by the "
            "number of key/value heads K (K = N: multi-head, K = 1: multi-query attention)."
        )
    check_head_dims(query, key, value)
    return qs[0], qs[1], ks[1], qs[2], ks[2], qs[3]


def check_broadcast(name: str, x, target: tuple[int, ...]) -> None:
    """Raises unless ``x`` (or None) has rank 4 and broadcasts to ``target = [B, N, T, S]``."""
    if x is None:
        return
    shape = shape_of(x)
    ok = len(shape) == 4 and all(d in (1, t) for d, t in zip(shape, target, strict=True))
    if not ok:
        raise ValueError(
            f"{name} of shape {shape} is not broadcastable to [B, N, T, S] = {list(target)}; "
            f"{name} must have rank 4 with each axis equal to the target or 1 "
            "(e.g. [B, 1, T, S] or [1, 1, T, S])."
        )
