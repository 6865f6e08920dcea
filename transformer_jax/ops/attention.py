"""Scaled dot-product attention as a pure function (multi-head projections: ``ops.multi_head``).

Shapes use the letters B batch, T query length, S key length, N heads, H head dim, D model dim.
Four interchangeable implementations of ``dot_product_attention`` give the same numbers:

* ``"xla"``: einsum + masked softmax; materialises the ``[B, N, T, S]`` weights. The reference.
* ``"chunked"``: memory-efficient attention (Rabe & Staats 2021; FlashAttention's online
  softmax) scanning over key blocks with a recomputing backward pass, so neither the forward
  nor the gradient ever holds a ``[T, S]`` array per head (memory O(T + S) per head).
* ``"jax"``: ``jax.nn.dot_product_attention``: cuDNN fused (flash) attention on a GPU for
  bf16/fp16 with a head dim that is a multiple of 8 and at most 128, else XLA. Causal and
  padding masks given as ``is_causal`` / ``key_value_seq_lengths`` use cuDNN's own mask types;
  a dense boolean ``mask`` (packed rows) reaches cuDNN as an additive bias.
* ``"splash"``: Pallas' splash (flash) attention kernel on a TPU, for causal, padding and
  packed-segment masks given as ``spec`` / ``is_causal`` / ``key_value_seq_lengths`` (no
  dense mask, bias or dropout); Pallas' interpreter elsewhere. See ``ops.splash_attention``.

Conventions shared by all four: the logits are scaled by ``1/sqrt(H)``; ``mask`` is boolean
(True = attend) and ``bias`` additive, both rank 4 and broadcastable to ``[B, N, T, S]``; the
softmax runs in float32 whatever the input dtype; the output has the query dtype. A query whose
keys are all masked out gets zero weights and a zero output (with zero, finite gradients).
``"xla"`` and ``"chunked"`` also treat ``-inf`` bias entries as masked (a row whose bias is
``-inf`` everywhere gives zeros); ``"jax"`` detects fully masked rows from ``mask`` only.
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
from transformer_jax.ops.masks import AttentionSpec, combine_masks

__all__ = [
    "IMPLEMENTATIONS",
    "dot_product_attention",
    "masked_softmax",
]

IMPLEMENTATIONS = ("xla", "chunked", "jax", "splash")


# ----------------------------------------------------------------------------- validation


def _shape(x) -> tuple[int, ...]:
    return tuple(jnp.shape(x))


def _check_qkv(query, key, value) -> tuple[int, int, int, int, int]:
    """Validates q/k/v shapes; returns (B, T, S, N, H)."""
    for name, x in (("query", query), ("key", key), ("value", value)):
        if jnp.ndim(x) != 4:
            raise ValueError(
                f"{name} must have rank 4 [batch, length, heads, head_dim]; got shape {_shape(x)}."
            )
    qs, ks, vs = _shape(query), _shape(key), _shape(value)
    if ks[:3] != vs[:3]:
        raise ValueError(
            f"key {ks} and value {vs} must agree on [batch, length, heads]; pass keys and values "
            "of the same sequence."
        )
    if qs[0] != ks[0]:
        raise ValueError(f"query {qs} and key {ks} have different batch sizes {qs[0]} != {ks[0]}.")
    if qs[2] != ks[2]:
        raise ValueError(
            f"query {qs} and key {ks} have different numbers of heads {qs[2]} != {ks[2]}."
        )
    chunked_attention.check_head_dims(query, key, value)
    return qs[0], qs[1], ks[1], qs[2], qs[3]


def _check_broadcast(name: str, x, target: tuple[int, ...]) -> None:
    if x is None:
        return
    shape = _shape(x)
    ok = len(shape) == 4 and all(d in (1, t) for d, t in zip(shape, target, strict=True))
    if not ok:
        raise ValueError(
            f"{name} of shape {shape} is not broadcastable to [B, N, T, S] = {list(target)}; "
            f"{name} must have rank 4 with each axis equal to the target or 1 "
            "(e.g. [B, 1, T, S] or [1, 1, T, S])."
        )


def _check_mask_dtype(mask) -> None:
    if mask is not None and jnp.result_type(mask) != jnp.bool_:
        raise ValueError(
            f"mask must be boolean (True = attend); got dtype {jnp.result_type(mask)}. Pass "
            "additive float masks as bias= instead."
        )


def _check_dropout(dropout_rate: float, dropout_rng) -> bool:
    """Returns whether dropout is active."""
    if not 0.0 <= dropout_rate < 1.0:
        raise ValueError(f"dropout_rate must be in [0, 1); got {dropout_rate}.")
    return dropout_rate > 0.0 and dropout_rng is not None


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
    head_dim = query.shape[-1]
    logits = jnp.einsum(
        "BTNH,BSNH->BNTS", query, key, precision=precision, preferred_element_type=jnp.float32
    )  # [B, N, T, S]
    logits = logits * (1.0 / math.sqrt(head_dim))
    if bias is not None:
        logits = logits + bias.astype(jnp.float32)
    weights = masked_softmax(logits, mask)  # [B, N, T, S] float32
    probs = weights
    if dropout_rng is not None and dropout_rate > 0.0:
        probs = dropout(weights, dropout_rate, dropout_rng)  # 16-bit masks (ops/dropout.py)
    out = jnp.einsum(
        "BNTS,BSNH->BTNH",
        probs.astype(value.dtype) if value.dtype != jnp.float32 else probs,
        value,
        precision=precision,
        preferred_element_type=jnp.float32,
    )  # [B, T, N, H]
    return out.astype(query.dtype), weights


# ----------------------------------------------------------------------------- jax.nn


def _cudnn_ok(query) -> bool:
    """cuDNN fused attention applies: a GPU, bf16/fp16 inputs, head dim a multiple of 8 <= 128."""
    head_dim = query.shape[-1]
    return (jax.default_backend() == "gpu" and query.dtype in (jnp.bfloat16, jnp.float16)
            and head_dim % 8 == 0 and head_dim <= 128)


def _jax_attention(query, key, value, mask, bias, precision, backend, is_causal, kv_lengths):
    """``jax.nn.dot_product_attention``; ``backend`` None picks cuDNN where it applies.

    Causal and padding (``kv_lengths``) masks go to cuDNN as its own mask types (the flash
    kernel skips masked blocks); a dense ``mask`` (e.g. packed rows) becomes an additive bias.
    """
    if backend is None:
        backend = "cudnn" if _cudnn_ok(query) else "xla"
    kwargs = {}
    if bias is not None:
        kwargs["bias"] = bias.astype(query.dtype)
    if mask is not None:
        if backend == "cudnn":  # cuDNN takes the mask as a bias with the full query length
            mask = jnp.broadcast_to(mask, (*mask.shape[:2], query.shape[1], key.shape[1]))
        kwargs["mask"] = mask
    if kv_lengths is not None:
        kwargs["key_value_seq_lengths"] = jnp.asarray(kv_lengths, jnp.int32)
    with jax.default_matmul_precision(_precision_name(precision)):
        out = jax.nn.dot_product_attention(query, key, value, is_causal=is_causal,
                                           implementation=backend, **kwargs)
    if mask is not None:
        # jax.nn returns the average of the values on fully masked rows; we return zeros.
        row_any = jnp.any(mask, axis=-1)  # [b, n, T] (broadcast axes stay 1)
        row_any = jnp.transpose(row_any, (0, 2, 1))[..., None]  # [b, T, n, 1]
        out = jnp.where(row_any, out, jnp.zeros((), out.dtype))
    if kv_lengths is not None:  # a row without any key: zeros too
        out = jnp.where((jnp.asarray(kv_lengths) > 0)[:, None, None, None], out,
                        jnp.zeros((), out.dtype))
    return out.astype(query.dtype)


def _structured_mask(mask, is_causal: bool, kv_lengths, t: int, s: int):
    """``mask`` combined with the causal and key-length masks as one boolean mask."""
    if is_causal:
        causal = jnp.arange(t)[:, None] >= jnp.arange(s)[None, :]  # [T, S], as jax.nn
        mask = causal[None, None] if mask is None else mask & causal[None, None]
    if kv_lengths is not None:
        valid = jnp.arange(s)[None, :] < jnp.asarray(kv_lengths)[:, None]  # [B, S]
        valid = valid[:, None, None, :]  # [B, 1, 1, S]
        mask = valid if mask is None else mask & valid
    return mask


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


def _index_causal(spec: AttentionSpec, t: int, s: int) -> bool:
    """Whether the causal term of ``spec`` is the plain ``j <= i`` of ``is_causal``."""
    return (spec.causal and spec.q_positions is None and spec.k_positions is None
            and spec.alibi_slopes is None and t == s)


def _with_dense_spec(spec: AttentionSpec, mask, bias, t: int, s: int):
    """``mask`` and ``bias`` combined with the dense terms of ``spec``."""
    spec_mask, spec_bias = spec.dense(t, s)
    if spec_bias is not None:
        bias = spec_bias if bias is None else bias.astype(jnp.float32) + spec_bias
    return combine_masks(mask, spec_mask), bias


# ----------------------------------------------------------------------------- public API


def dot_product_attention(
    query,
    key,
    value,
    *,
    mask=None,
    bias=None,
    spec: AttentionSpec | None = None,
    dropout_rate: float = 0.0,
    dropout_rng=None,
    implementation: str = "xla",
    chunk_size: int = 512,
    query_chunk_size: int | None = None,
    return_weights: bool = False,
    precision=None,
    jax_backend: str | None = None,
    is_causal: bool = False,
    key_value_seq_lengths=None,
):
    """Scaled dot-product attention ``softmax(q k^T / sqrt(H) + bias, masked) v``.

    Args:
      query: ``[B, T, N, H]``.
      key: ``[B, S, N, H]``.
      value: ``[B, S, N, H]``.
      mask: optional bool, rank 4, broadcastable to ``[B, N, T, S]``; True = attend.
      bias: optional float, rank 4, broadcastable to ``[B, N, T, S]``; added to the scaled
        logits (e.g. ALiBi or relative position biases). Differentiable.
      spec: optional ``AttentionSpec`` (causal order, packed segments, key padding, ALiBi
        slopes from ``[B, T]`` / ``[B, S]`` arrays), combined with ``mask`` and ``bias``.
        ``"chunked"`` builds it block by block; the others build it densely.
      dropout_rate: probability of dropping an attention weight (inverted dropout).
      dropout_rng: PRNG key; dropout is applied only when this is given and the rate is > 0.
        ``"xla"`` draws one ``[B, N, T, S]`` keep mask from it; ``"chunked"`` draws the mask of
        key block ``i`` from ``fold_in(dropout_rng, i)`` (deterministic, but a different draw
        than ``"xla"``); ``"jax"`` does not support dropout (ValueError).
      implementation: ``"xla"`` | ``"chunked"`` | ``"jax"`` | ``"splash"`` (see the module
        docstring).
      chunk_size: key block size for ``"chunked"`` (S is padded with masked keys to a multiple
        of it; a block never exceeds S).
      query_chunk_size: query block size for ``"chunked"`` (default ``chunk_size``).
      return_weights: also return the float32 ``[B, N, T, S]`` attention weights (before
        dropout). Only ``"xla"``.
      precision: ``jax.lax.Precision`` (or "highest", ...) for the matmuls.
      jax_backend: for ``"jax"`` only, the ``implementation`` passed to
        ``jax.nn.dot_product_attention``; default: ``"cudnn"`` on GPU for bf16/fp16, else
        ``"xla"``.
      is_causal: query ``i`` attends keys ``j <= i`` only, as in ``jax.nn`` (combined with
        ``mask``).
      key_value_seq_lengths: optional int ``[B]``: keys at positions ``>= length`` are padding.
        With ``"jax"`` on a GPU these two reach cuDNN's flash attention as its own causal and
        padding masks, without a ``[T, S]`` mask array; the others build the boolean mask.

    Returns:
      ``[B, T, N, H]`` in the query dtype, or ``(out, weights)`` when ``return_weights``.
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"Unknown attention implementation {implementation!r}; use one of {IMPLEMENTATIONS}."
        )
    query, key, value = jnp.asarray(query), jnp.asarray(key), jnp.asarray(value)
    b, t, s, n, _ = _check_qkv(query, key, value)
    target = (b, n, t, s)
    _check_broadcast("mask", mask, target)
    _check_broadcast("bias", bias, target)
    _check_mask_dtype(mask)
    use_dropout = _check_dropout(dropout_rate, dropout_rng)
    if spec is not None:
        spec.check(b, n, t, s)
    if implementation == "splash":
        if use_dropout or return_weights:
            raise ValueError(
                "implementation='splash' has no attention dropout and never materialises the "
                "weights; use 'xla' or 'chunked' (or dropout_rate=0, return_weights=False).")
        return splash_attention.splash_attention(
            query, key, value, spec=spec, mask=mask, bias=bias, is_causal=is_causal,
            kv_lengths=key_value_seq_lengths)
    if spec is not None:
        if implementation == "jax" and _index_causal(spec, t, s):
            # "key index <= query index": cuDNN's own causal mask, no [T, S] array.
            spec, is_causal = dataclasses.replace(spec, causal=False), True
        if implementation != "chunked":
            mask, bias = _with_dense_spec(spec, mask, bias, t, s)
            spec = None
    if return_weights and implementation != "xla":
        raise ValueError(
            f"return_weights=True needs implementation='xla'; {implementation!r} never "
            "materialises the [B, N, T, S] weights."
        )

    if implementation != "jax":
        mask = _structured_mask(mask, is_causal, key_value_seq_lengths, t, s)
    if implementation == "xla":
        out, weights = _xla_attention(query, key, value, mask, bias, dropout_rate,
                                      dropout_rng if use_dropout else None, precision)
        return (out, weights) if return_weights else out
    if implementation == "chunked":
        return chunked_attention.chunked_dot_product_attention(
            query, key, value, mask=mask, bias=bias, spec=spec,
            dropout_rate=dropout_rate if use_dropout else 0.0,
            dropout_rng=dropout_rng if use_dropout else None, chunk_size=chunk_size,
            query_chunk_size=query_chunk_size, precision=precision)
    if use_dropout:
        raise ValueError(
            "implementation='jax' (jax.nn.dot_product_attention) does not support attention "
            "dropout; use implementation='xla' or 'chunked', or dropout_rate=0."
        )
    return _jax_attention(query, key, value, mask, bias, precision, jax_backend, is_causal,
                          key_value_seq_lengths)

