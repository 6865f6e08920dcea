"""Scaled dot-product attention as a pure function (multi-head projections: ``ops.multi_head``).

Shapes use the letters B batch, T query length, S key length, N query heads, K key/value heads
(K divides N: grouped-query attention, K = 1 multi-query), H head dim. Four interchangeable
implementations of ``dot_product_attention`` give the same numbers:

* ``"xla"``: einsum + masked softmax; materialises the ``[B, N, T, S]`` weights. The reference.
* ``"chunked"``: memory-efficient attention (Rabe & Staats 2021; FlashAttention's online
  softmax) scanning over key blocks with a recomputing backward pass, so neither the forward
  nor the gradient ever holds a ``[T, S]`` array per head (memory O(T + S) per head). With a
  sliding window and default positions it visits only the key blocks inside the window.
* ``"jax"``: ``jax.nn.dot_product_attention``: cuDNN fused (flash) attention on a GPU for
  bf16/fp16 with a head dim that is a multiple of 8 and at most 128, else XLA. Causal, padding
  and sliding-window terms by index reach cuDNN as its own mask types; other terms (a dense
  boolean ``mask``, packed rows) reach it as an additive bias.
* ``"splash"``: Pallas' splash (flash) attention kernel on a TPU, for causal, sliding-window,
  padding and packed-segment masks from the spec / keywords (no dense mask, bias or dropout);
  Pallas' interpreter elsewhere. See ``ops.splash_attention``.

Masks come in three forms, each for one job: ``mask`` (dense boolean, True = attend) and
``bias`` (dense additive), both rank 4 and broadcastable to ``[B, N, T, S]``; ``spec``, an
``AttentionSpec`` of per-token arrays (causal order, sliding window, packed segments, key
padding, ALiBi) that each implementation builds its own way. ``jax.nn``'s keywords
``is_causal``, ``key_value_seq_lengths`` and ``local_window_size`` are accepted with jax.nn's
meaning and folded into the spec (``masks.spec_from_keywords``).

Conventions shared by all four: the logits are scaled by ``1/sqrt(H)``; the softmax runs in
float32 whatever the input dtype; the output has the query dtype. A query whose keys are all
masked out gets zero weights and a zero output (with zero, finite gradients). ``"xla"`` and
``"chunked"`` also treat ``-inf`` bias entries as masked (a row whose bias is ``-inf``
everywhere gives zeros); ``"jax"`` detects fully masked rows from the masks only.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax import lax

import transformer_jax.ops.chunked_attention as chunked_attention
import transformer_jax.ops.splash_attention as splash_attention
from transformer_jax.ops.dropout import dropout
from transformer_jax.ops.grouped import attention_logits, weighted_values
from transformer_jax.ops.masks import AttentionSpec, combine_masks, spec_from_keywords
from transformer_jax.ops.shapes import check_broadcast, check_qkv

__all__ = [
    "IMPLEMENTATIONS",
    "dot_product_attention",
    "masked_softmax",
]

IMPLEMENTATIONS = ("xla", "chunked", "jax", "splash")


# ----------------------------------------------------------------------------- xla reference


def masked_softmax(logits, mask=None) -> jnp.ndarray:
    """Softmax over the last axis in float32 where masked entries get weight 0.

    Rows with no unmasked (finite) entry get all-zero weights instead of NaN or a uniform
    average, and their gradient is zero.

    Args:
      logits: ``[..., S]`` scores (a ``-inf`` score also counts as masked).
      mask: optional bool broadcastable to ``logits`` (True = keep).

    Returns:
      float32 weights with the shape of ``logits``.
    """
    logits = jnp.asarray(logits).astype(jnp.float32)
    if mask is not None:
        logits = jnp.where(mask, logits, -jnp.inf)
    row_max = jnp.max(logits, axis=-1, keepdims=True)
    row_max = lax.stop_gradient(jnp.where(jnp.isfinite(row_max), row_max, 0.0))
    unnorm = jnp.exp(logits - row_max)
    denom = jnp.sum(unnorm, axis=-1, keepdims=True)
    return unnorm / jnp.where(denom == 0.0, 1.0, denom)


def _xla_attention(query, key, value, mask, bias, dropout_rate, dropout_rng, precision):
    logits = attention_logits(query, key, precision) * (1.0 / math.sqrt(query.shape[-1]))
    if bias is not None:
        logits = logits + bias.astype(jnp.float32)
    weights = masked_softmax(logits, mask)  # [B, N, T, S] float32
    probs = weights
    if dropout_rng is not None:
        probs = dropout(weights, dropout_rate, dropout_rng)  # 16-bit masks (ops/dropout.py)
    out = weighted_values(probs, value, precision)  # [B, T, N, H]
    return out.astype(query.dtype), weights


def _with_dense_spec(spec: AttentionSpec | None, mask, bias, t: int, s: int):
    """``mask`` and ``bias`` combined with the dense terms of ``spec``."""
    if spec is None:
        return mask, bias
    spec_mask, spec_bias = spec.dense(t, s)
    if spec_bias is not None:
        bias = spec_bias if bias is None else bias.astype(jnp.float32) + spec_bias
    return combine_masks(mask, spec_mask), bias


# ----------------------------------------------------------------------------- jax.nn


def _cudnn_ok(query) -> bool:
    """cuDNN fused attention applies: a GPU, bf16/fp16 inputs, head dim a multiple of 8 <= 128."""
    head_dim = query.shape[-1]
    return (jax.default_backend() == "gpu" and query.dtype in (jnp.bfloat16, jnp.float16)
            and head_dim % 8 == 0 and head_dim <= 128)


def _native_terms(spec: AttentionSpec | None, b: int, t: int, s: int, cudnn: bool):
    """Splits off the spec terms ``jax.nn`` takes as keywords (cuDNN's own causal, padding and
    sliding-window mask types, no ``[T, S]`` array); returns ``(keywords, rest of spec)``."""
    if spec is None:
        return {}, None
    kw = {}
    if spec.k_lengths is not None:
        lengths = jnp.asarray(spec.k_lengths, jnp.int32)
        kw["key_value_seq_lengths"] = jnp.broadcast_to(lengths, (b,))
        spec = dataclasses.replace(spec, k_lengths=None)
    if spec.by_index and t == s:  # positions are indices: "key index <= query index" etc.
        if spec.causal and spec.alibi_slopes is None:
            kw["is_causal"] = True
            spec = dataclasses.replace(spec, causal=False)
        # cuDNN's window has no right side unless the mask is causal (jax.nn refuses it).
        if spec.window is not None and (not cudnn or spec.window[1] == 0 or "is_causal" in kw):
            kw["local_window_size"] = spec.window
            spec = dataclasses.replace(spec, window=None)
    return kw, spec


def _rows_with_keys(mask, kw, t: int, s: int):
    """``[b, T, n or 1, 1]`` bool: which query rows see at least one key, or None if all do.

    ``jax.nn`` returns the average of the values on a fully masked row; we return zeros. The
    keywords leave query ``i`` the key range ``[lo_i, hi_i]`` (``[B, T]`` with lengths); a
    dense mask is reduced within that range where it is built (fused by XLA), never stored.
    """
    lengths = kw.get("key_value_seq_lengths")
    if mask is None and lengths is None:
        return None  # T == S with causal / window by index: query i always sees key i
    i = jnp.arange(t)
    lo, hi = jnp.zeros_like(i), jnp.full_like(i, s - 1)
    if kw.get("is_causal"):
        hi = jnp.minimum(hi, i)
    if "local_window_size" in kw:
        left, right = kw["local_window_size"]
        lo, hi = jnp.maximum(lo, i - left), jnp.minimum(hi, i + right)
    hi = hi[None] if lengths is None else jnp.minimum(hi[None], lengths[:, None] - 1)  # [b, T]
    if mask is None:
        return (lo[None] <= hi)[:, :, None, None]
    j = jnp.arange(s)
    in_range = (lo[:, None] <= j) & (j <= hi[..., None])  # [b, T, S]
    row_any = jnp.any(mask & in_range[:, None], axis=-1)  # [b, n, T]
    return jnp.transpose(row_any, (0, 2, 1))[..., None]


def _jax_attention(query, key, value, mask, bias, spec, precision, backend):
    """``jax.nn.dot_product_attention``; ``backend`` None picks cuDNN where it applies."""
    b, t, s = query.shape[0], query.shape[1], key.shape[1]
    if backend is None:
        backend = "cudnn" if _cudnn_ok(query) else "xla"
    kw, spec = _native_terms(spec, b, t, s, cudnn=backend == "cudnn")
    mask, bias = _with_dense_spec(spec, mask, bias, t, s)
    if bias is not None:
        kw["bias"] = bias.astype(query.dtype)
    if mask is not None:
        if backend == "cudnn":  # cuDNN takes the mask as a bias with the full query length
            mask = jnp.broadcast_to(mask, (*mask.shape[:2], t, s))
        kw["mask"] = mask
    with jax.default_matmul_precision(_precision_name(precision)):
        out = jax.nn.dot_product_attention(query, key, value, implementation=backend, **kw)
    keep = _rows_with_keys(mask, kw, t, s)
    if keep is not None:
        out = jnp.where(keep, out, jnp.zeros((), out.dtype))
    return out.astype(query.dtype)


def _precision_name(precision) -> str | None:
    if precision is None:
        return None
    if isinstance(precision, lax.Precision):
        return {
            lax.Precision.DEFAULT: "bfloat16",
            lax.Precision.HIGH: "tensorfloat32",
            lax.Precision.HIGHEST: "float32",
        }[precision]
    return {"default": "bfloat16", "high": "tensorfloat32", "highest": "float32"}.get(
        str(precision).lower(), str(precision)
    )


# ----------------------------------------------------------------------------- public API


def _check_call(implementation, mask, bias, spec, target, dropout_rate, dropout_rng,
                return_weights):
    """Validates everything but q/k/v; returns the dropout key to use (None = no dropout)."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"Unknown attention implementation {implementation!r}; use one of {IMPLEMENTATIONS}."
        )
    check_broadcast("mask", mask, target)
    check_broadcast("bias", bias, target)
    if mask is not None and jnp.result_type(mask) != jnp.bool_:
        raise ValueError(
            f"mask must be boolean (True = attend); got dtype {jnp.result_type(mask)}. Pass "
            "additive float masks as bias= instead."
        )
    if spec is not None:
        spec.check(*target)
    if not 0.0 <= dropout_rate < 1.0:
        raise ValueError(f"dropout_rate must be in [0, 1); got {dropout_rate}.")
    use_dropout = dropout_rate > 0.0 and dropout_rng is not None
    if return_weights and implementation != "xla":
        raise ValueError(
            f"return_weights=True needs implementation='xla'; {implementation!r} never "
            "materialises the weights [B, N, T, S].")
    if use_dropout and implementation in ("jax", "splash"):
        raise ValueError(
            f"implementation={implementation!r} does not support attention dropout; use "
            "implementation='xla' or 'chunked', or dropout_rate=0.")
    return dropout_rng if use_dropout else None


def dot_product_attention(
    query,
    key,
    value,
    *,
    mask=None,
    bias=None,
    spec: AttentionSpec | None = None,
    is_causal: bool = False,
    key_value_seq_lengths=None,
    local_window_size: int | tuple[int, int] | None = None,
    dropout_rate: float = 0.0,
    dropout_rng=None,
    implementation: str = "xla",
    chunk_size: int = 512,
    query_chunk_size: int | None = None,
    return_weights: bool = False,
    precision=None,
    jax_backend: str | None = None,
):
    """Scaled dot-product attention ``softmax(q k^T / sqrt(H) + bias, masked) v``.

    Args:
      query: ``[B, T, N, H]``.
      key, value: ``[B, S, K, H]`` with K dividing N (K < N: grouped-query attention).
      mask: optional bool, rank 4, broadcastable to ``[B, N, T, S]``; True = attend.
      bias: optional float, rank 4, broadcastable to ``[B, N, T, S]``; added to the scaled
        logits (e.g. ``relative_position_bias``). Differentiable.
      spec: optional ``AttentionSpec`` (causal order, sliding window, packed segments, key
        padding, ALiBi slopes from ``[B, T]`` / ``[B, S]`` arrays), combined with ``mask`` and
        ``bias``. ``"chunked"`` builds it block by block; the others build it densely.
      is_causal: ``jax.nn``'s keyword: query ``i`` attends keys ``j <= i`` (by index).
      key_value_seq_lengths: ``jax.nn``'s keyword: int ``[B]``, keys at ``>= length`` are
        padding.
      local_window_size: ``jax.nn``'s keyword: ``(left, right)`` (an int: both sides); query
        ``i`` attends keys ``i - left <= j <= i + right`` (by index).
      dropout_rate: probability of dropping an attention weight (inverted dropout).
      dropout_rng: PRNG key; dropout is applied only when this is given and the rate is > 0.
        ``"xla"`` draws one ``[B, N, T, S]`` keep mask from it; ``"chunked"`` draws the mask of
        each block from ``fold_in(dropout_rng, block index)`` (deterministic, but a different
        draw than ``"xla"``); ``"jax"`` and ``"splash"`` have no dropout (ValueError).
      implementation: ``"xla"`` | ``"chunked"`` | ``"jax"`` | ``"splash"`` (module docstring).
      chunk_size: key block size for ``"chunked"`` (S is padded with masked keys to a multiple
        of it; a block never exceeds S).
      query_chunk_size: query block size for ``"chunked"`` (default ``chunk_size``).
      return_weights: also return the float32 ``[B, N, T, S]`` attention weights (before
        dropout). Only ``"xla"``.
      precision: ``jax.lax.Precision`` (or "highest", ...) for the matmuls.
      jax_backend: for ``"jax"`` only, the ``implementation`` passed to
        ``jax.nn.dot_product_attention``; default: ``"cudnn"`` on GPU for bf16/fp16, else
        ``"xla"``.

    Returns:
      ``[B, T, N, H]`` in the query dtype, or ``(out, weights)`` when ``return_weights``.
    """
    query, key, value = jnp.asarray(query), jnp.asarray(key), jnp.asarray(value)
    b, t, s, n, _, _ = check_qkv(query, key, value)
    spec = spec_from_keywords(spec, t, s, is_causal=is_causal, local_window_size=local_window_size,
                              key_value_seq_lengths=key_value_seq_lengths)
    rng = _check_call(implementation, mask, bias, spec, (b, n, t, s), dropout_rate, dropout_rng,
                      return_weights)
    if implementation == "xla":
        mask, bias = _with_dense_spec(spec, mask, bias, t, s)
        out, weights = _xla_attention(query, key, value, mask, bias, dropout_rate, rng, precision)
        return (out, weights) if return_weights else out
    if implementation == "chunked":
        return chunked_attention.chunked_dot_product_attention(
            query, key, value, mask=mask, bias=bias, spec=spec, dropout_rate=dropout_rate,
            dropout_rng=rng, chunk_size=chunk_size, query_chunk_size=query_chunk_size,
            precision=precision)
    if implementation == "splash":
        return splash_attention.splash_attention(query, key, value, spec=spec, mask=mask,
                                                 bias=bias)
    return _jax_attention(query, key, value, mask, bias, spec, precision, jax_backend)
