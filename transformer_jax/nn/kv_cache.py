"""The incremental KV caches of ``nn.attention.MultiHeadAttention``: writing new keys and values
into a heads-first cache ``[B, K, L, H]`` (or a sliding-window ring of ``w + 1`` slots) and the
spec of the positions each query may attend. Pure functions over the cache pytree."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

from transformer_jax import ops

__all__ = ["check_cache", "is_ring", "swap_heads", "update_cache", "update_ring"]

def check_cache(cache, key) -> None:
    """The cache ``[B, K, L, H]`` fits the new keys ``[B, T, K, H]``."""
    shape = cache["key"].shape
    if (shape[0], shape[1], shape[3]) != (key.shape[0], key.shape[2], key.shape[3]):
        raise ValueError(
            f"cache key {tuple(shape)} does not match the new keys {tuple(key.shape)} "
            f"([B, K, L, H] and [B, T, K, H]); build the cache with "
            f"init_cache(batch={key.shape[0]}, ...) of this module."
        )


def is_ring(cache, spec) -> bool:
    """A sliding-window ring buffer: the spec's window is causal-left and the cache holds
    exactly its ``left + 1`` slots (``init_cache(..., window=left)``)."""
    window = None if spec is None else spec.window
    return (cache is not None and "index" in cache and window is not None and window[1] == 0
            and cache["key"].shape[2] == window[0] + 1)


def update_cache(cache, key, value, spec):
    """Writes T new keys/values ``[B, T, K, H]`` at ``cache["index"]``; returns the full
    cache tensors as ``[B, L, K, H]`` views and ``spec`` with the cache's causal term (query
    i at slot ``index + i`` sees slots ``<= index + i``)."""
    cached_k, cached_v, index = cache["key"], cache["value"], cache["index"]  # [B, K, L, H]
    length, max_len = key.shape[1], cached_k.shape[2]
    if length > max_len:
        raise ValueError(f"{length} new tokens do not fit a cache of length {max_len}.")
    if not isinstance(index, jax.core.Tracer) and int(index) + length > max_len:
        raise ValueError(
            f"writing {length} token(s) at position {int(index)} overflows the KV cache of "
            f"length {max_len}; build the cache with a larger max_len."
        )
    start = (0, 0, index, 0)
    cached_k = lax.dynamic_update_slice(cached_k, swap_heads(key).astype(cached_k.dtype), start)
    cached_v = lax.dynamic_update_slice(cached_v, swap_heads(value).astype(cached_v.dtype),
                                        start)
    spec = dataclasses.replace(
        spec or ops.AttentionSpec(),
        causal=True,
        q_positions=(index + jnp.arange(length, dtype=jnp.int32))[None],  # [1, T]
        k_positions=jnp.arange(max_len, dtype=jnp.int32)[None],  # [1, L]
    )
    new_cache = {"key": cached_k, "value": cached_v, "index": index + length}
    return swap_heads(cached_k), swap_heads(cached_v), spec, new_cache


def update_ring(cache, key, value, spec):
    """Sliding-window step over a ring of C slots: the T new queries attend the C slots and
    their own T keys (``[B, C + T, K, H]``, masked by position: causal, inside the window,
    slot written); the newest ``min(T, C)`` keys then replace the oldest slots."""
    cached_k, cached_v, index = cache["key"], cache["value"], cache["index"]  # [B, K, C, H]
    slots, length = cached_k.shape[2], key.shape[1]
    if spec.k_valid is not None or spec.q_segments is not None:
        raise ValueError("A sliding-window cache takes no key padding or segments.")
    # the position each slot holds: the latest p < index with p % C == slot (< 0: empty)
    slot_pos = index - 1 - jnp.mod(index - 1 - jnp.arange(slots, dtype=jnp.int32), slots)
    q_pos = index + jnp.arange(length, dtype=jnp.int32)  # [T]
    keys = jnp.concatenate([swap_heads(cached_k), key.astype(cached_k.dtype)], axis=1)
    values = jnp.concatenate([swap_heads(cached_v), value.astype(cached_v.dtype)], axis=1)
    spec = dataclasses.replace(
        spec, causal=True, q_positions=q_pos[None],
        k_positions=jnp.concatenate([slot_pos, q_pos])[None],  # [1, C + T]
        k_valid=jnp.concatenate([slot_pos >= 0, jnp.ones((length,), bool)])[None])
    kept = min(length, slots)  # the newest keys that stay
    where = jnp.mod(index + length - kept + jnp.arange(kept), slots)  # [kept] distinct slots
    new_k = swap_heads(key[:, length - kept:]).astype(cached_k.dtype)  # [B, K, kept, H]
    new_v = swap_heads(value[:, length - kept:]).astype(cached_v.dtype)
    new_cache = {"key": cached_k.at[:, :, where].set(new_k),
                 "value": cached_v.at[:, :, where].set(new_v), "index": index + length}
    return keys, values, spec, new_cache


def swap_heads(x):
    """``[B, L, K, H] <-> [B, K, L, H]``: cache layout to the ``ops`` layout and back (XLA folds
    the swap into the matmul that reads it)."""
    return jnp.swapaxes(x, 1, 2)
