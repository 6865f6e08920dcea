"""Cross entropy fused with the output projection: never holds the float32 ``[B, T, V]`` logits.

``fused_cross_entropy(hidden, kernel, targets, weights)`` equals
``cross_entropy(hidden @ kernel + bias, targets, weights)`` (``ops.losses``) in value and
gradient, but walks the positions in chunks of ``chunk`` rows: only ``[chunk, V]`` float32
logits exist at a time. The projection runs in the dtype of ``hidden`` / ``kernel`` (bf16 in
mixed precision) with float32 accumulation; logsumexp, softmax and the loss are float32.

The gradient is computed in the same pass as the loss (the loss is a scalar sum, so its
cotangent only scales it): each chunk's ``dlogits = w (softmax - q)`` is multiplied into
``d hidden`` and ``d kernel`` at once, and the backward pass multiplies those by the incoming
cotangent. No logits are stored for the backward pass and none are recomputed. Without
``jax.grad`` only the loss and metrics are computed.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

__all__ = ["FusedLoss", "fused_cross_entropy"]


class FusedLoss(NamedTuple):
    """Float32 sums of :func:`fused_cross_entropy`; divide by ``weight_sum`` for means.

    Gradients flow through ``loss_sum`` only; ``nll_sum`` (the unsmoothed negative
    log-likelihood) and ``correct_sum`` (argmax == target) are metrics.
    """

    loss_sum: jax.Array
    nll_sum: jax.Array
    correct_sum: jax.Array
    weight_sum: jax.Array


def _smoothing(label_smoothing: float, vocab: int) -> tuple[float, float, float]:
    """``(confidence, low, entropy)`` of the smoothed target distribution (see ``ops.losses``)."""
    if label_smoothing == 0:
        return 1.0, 0.0, 0.0
    confidence, low = 1.0 - label_smoothing, label_smoothing / (vocab - 1)
    entropy = -(confidence * math.log(confidence) + (vocab - 1) * low * math.log(low))
    return confidence, low, entropy


def _chunk_stats(h, kernel, bias, targets, weights, label_smoothing):
    """One chunk: float32 logits ``[C, V]`` and their per-position loss pieces."""
    logits = jnp.einsum("CD,DV->CV", h, kernel, preferred_element_type=jnp.float32)
    if bias is not None:
        logits = logits + bias.astype(jnp.float32)
    vocab = logits.shape[-1]
    lse = jax.nn.logsumexp(logits, axis=-1)  # [C]
    onehot = jnp.arange(vocab, dtype=jnp.int32) == targets[:, None]  # [C, V]
    logp_target = jnp.sum(jnp.where(onehot, logits, 0.0), axis=-1) - lse  # [C]
    confidence, low, entropy = _smoothing(label_smoothing, vocab)
    loss = -logp_target
    if label_smoothing > 0:
        sum_logp = jnp.sum(logits, axis=-1) - vocab * lse  # sum_v log p_v
        loss = -(confidence - low) * logp_target - low * sum_logp - entropy
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    sums = jnp.stack([jnp.sum(loss * weights), jnp.sum(-logp_target * weights),
                      jnp.sum(correct * weights)])  # [3]
    return logits, lse, onehot, sums


def _chunks(hidden, targets, weights, chunk: int):
    """``[N, D]`` etc. padded with weight-0 rows to ``[N / C, C, ...]``."""
    n = hidden.shape[0]
    chunk = max(1, min(chunk, n))
    pad = -n % chunk
    hidden = jnp.pad(hidden, ((0, pad), (0, 0)))
    targets = jnp.pad(targets, (0, pad))
    weights = jnp.pad(weights, (0, pad))
    shape = (-1, chunk)
    return (hidden.reshape(*shape, hidden.shape[-1]), targets.reshape(shape),
            weights.reshape(shape), n)


def _forward(hidden, kernel, bias, targets, weights, label_smoothing, chunk, with_grad):
    """Scans the chunks; returns the sums ``[3]`` and, ``with_grad``, the gradient of
    ``loss_sum`` w.r.t. ``hidden`` ``[N, D]``, ``kernel`` and ``bias`` (float32)."""
    hs, ts, ws, n = _chunks(hidden, targets, weights, chunk)
    vocab = kernel.shape[-1]
    confidence, low, _ = _smoothing(label_smoothing, vocab)

    def body(carry, xs):
        sums, dkernel, dbias = carry
        h, t, w = xs
        logits, lse, onehot, chunk_sums = _chunk_stats(h, kernel, bias, t, w, label_smoothing)
        if not with_grad:
            return (sums + chunk_sums, dkernel, dbias), None
        probs = jnp.exp(logits - lse[:, None])  # [C, V]
        dlogits = w[:, None] * (probs - low - (confidence - low) * onehot)  # [C, V] f32
        g = dlogits.astype(kernel.dtype)
        dh = jnp.einsum("CV,DV->CD", g, kernel, preferred_element_type=jnp.float32)
        dkernel = dkernel + jnp.einsum("CD,CV->DV", h, g, preferred_element_type=jnp.float32)
        return (sums + chunk_sums, dkernel, dbias + jnp.sum(dlogits, axis=0)), dh.astype(h.dtype)

    zeros = jnp.zeros((3,), jnp.float32)
    if with_grad:
        carry = (zeros, jnp.zeros(kernel.shape, jnp.float32), jnp.zeros((vocab,), jnp.float32))
    else:
        carry = (zeros, None, None)
    (sums, dkernel, dbias), dh = jax.lax.scan(body, carry, (hs, ts, ws))
    if not with_grad:
        return sums, None
    return sums, (dh.reshape(-1, hidden.shape[-1])[:n], dkernel, dbias)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _fused(hidden, kernel, bias, targets, weights, label_smoothing, chunk):
    return _forward(hidden, kernel, bias, targets, weights, label_smoothing, chunk, False)[0]


def _fused_fwd(hidden, kernel, bias, targets, weights, label_smoothing, chunk):
    sums, (dh, dkernel, dbias) = _forward(hidden, kernel, bias, targets, weights,
                                          label_smoothing, chunk, True)
    dbias = None if bias is None else dbias.astype(bias.dtype)
    return sums, (dh, dkernel.astype(kernel.dtype), dbias)


def _fused_bwd(label_smoothing, chunk, residuals, cotangent):
    del label_smoothing, chunk
    g = cotangent[0]  # only loss_sum is differentiable; the other sums are metrics

    def scale(x):
        return None if x is None else (x.astype(jnp.float32) * g).astype(x.dtype)

    dh, dkernel, dbias = residuals
    return scale(dh), scale(dkernel), scale(dbias), None, None


_fused.defvjp(_fused_fwd, _fused_bwd)


def fused_cross_entropy(hidden, kernel, targets, weights=None, *, bias=None,
                        label_smoothing: float = 0.0, chunk: int = 1024) -> FusedLoss:
    """Summed (label-smoothed) cross entropy of ``hidden @ kernel + bias``, chunked.

    Equal to ``ops.cross_entropy(logits, targets, weights, label_smoothing)`` (and
    ``token_accuracy``) of ``logits = einsum(hidden, kernel, preferred_element_type=float32)
    + bias`` in value and in the gradient w.r.t. ``hidden``, ``kernel`` and ``bias``, while
    only ``[chunk, V]`` float32 logits exist at a time.

    Args:
      hidden: ``[..., D]`` final hidden states (compute dtype, e.g. bf16).
      kernel: ``[D, V]`` output projection (cast to the compute dtype by the caller).
      targets: ``[...]`` integer token ids.
      weights: optional ``[...]`` per-token weights (e.g. ``targets != 0``); no gradient.
      bias: optional ``[V]`` logits bias (added in float32).
      label_smoothing: eps in ``[0, 1)`` (see ``ops.cross_entropy``).
      chunk: positions per chunk; memory is ~3 ``[chunk, V]`` float32 buffers.

    Returns:
      :class:`FusedLoss` of float32 scalars.
    """
    hidden, kernel, targets = jnp.asarray(hidden), jnp.asarray(kernel), jnp.asarray(targets)
    d_model = hidden.shape[-1] if hidden.ndim else None
    if hidden.shape[:-1] != targets.shape or kernel.ndim != 2 or kernel.shape[0] != d_model:
        raise ValueError(
            f"fused_cross_entropy needs hidden [..., D], kernel [D, V] and targets [...]; got "
            f"hidden {tuple(hidden.shape)}, kernel {tuple(kernel.shape)}, targets "
            f"{tuple(targets.shape)}.")
    vocab = kernel.shape[1]
    if bias is not None and jnp.shape(bias) != (vocab,):
        raise ValueError(f"bias must have shape (V,) = ({vocab},); got {tuple(jnp.shape(bias))}.")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1); got {label_smoothing}.")
    if label_smoothing > 0 and vocab < 2:
        raise ValueError(f"label smoothing needs a vocabulary of at least 2; got V={vocab}.")
    if int(chunk) < 1:
        raise ValueError(f"chunk={chunk} must be a positive number of positions.")
    weights = (jnp.ones(targets.shape, jnp.float32) if weights is None
               else jnp.asarray(weights, jnp.float32))
    if weights.shape != targets.shape:
        raise ValueError(f"weights {tuple(weights.shape)} must have the same shape as targets "
                         f"{tuple(targets.shape)}.")
    flat = (hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1).astype(jnp.int32),
            weights.reshape(-1))
    sums = _fused(flat[0], kernel, bias, flat[1], flat[2], float(label_smoothing), int(chunk))
    metrics = jax.lax.stop_gradient(sums[1:])
    return FusedLoss(sums[0], metrics[0], metrics[1], jnp.sum(flat[2]))
