"""Token-level losses and metrics, computed in float32."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

__all__ = ["cross_entropy", "token_accuracy"]


def _check(logits, targets, weights):
    logits = jnp.asarray(logits)
    targets = jnp.asarray(targets)
    if logits.ndim < 1 or logits.shape[:-1] != targets.shape:
        raise ValueError(
            f"logits must have shape targets.shape + (V,); got logits {tuple(logits.shape)} and "
            f"targets {tuple(targets.shape)}."
        )
    if weights is not None:
        weights = jnp.asarray(weights)
        if weights.shape != targets.shape:
            raise ValueError(
                f"weights {tuple(weights.shape)} must have the same shape as targets "
                f"{tuple(targets.shape)}."
            )
        weights = weights.astype(jnp.float32)
    return logits, targets, weights


def cross_entropy(logits, targets, weights=None, label_smoothing: float = 0.0):
    """Summed (label-smoothed) cross entropy.

    With smoothing ``eps`` the target distribution puts ``1 - eps`` on the target and
    ``eps / (V - 1)`` on every other token (as in Vaswani et al. 2017 / Tensor2Tensor). The
    entropy of that distribution is subtracted, so the loss is the KL divergence to it and a
    model that predicts it exactly scores 0. With ``eps = 0`` this is the usual negative
    log-likelihood.

    Args:
      logits: ``[..., V]`` unnormalised scores (any float dtype; computed in float32).
      targets: ``[...]`` integer token ids.
      weights: optional ``[...]`` per-token weights (e.g. ``targets != 0``); default all ones.
      label_smoothing: eps in ``[0, 1)``.

    Returns:
      ``(loss_sum, weight_sum)`` float32 scalars; the mean loss is ``loss_sum / weight_sum``.
    """
    logits, targets, weights = _check(logits, targets, weights)
    vocab = logits.shape[-1]
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1); got {label_smoothing}.")
    if label_smoothing > 0 and vocab < 2:
        raise ValueError(f"label smoothing needs a vocabulary of at least 2; got V={vocab}.")
    # Written with logsumexp and a one-hot select instead of a materialised log_softmax and a
    # gather: XLA fuses all of it into reductions over the logits, and the gradient is one
    # elementwise pass (no scatter into a zero [..., V] buffer). Same numbers, ~14% less CPU
    # time per training step at D 256 / V 8000 (bench/train_throughput.py).
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)  # [...]
    onehot = jnp.arange(vocab, dtype=jnp.int32) == targets[..., None].astype(jnp.int32)
    logp_target = jnp.sum(jnp.where(onehot, logits, 0.0), axis=-1) - lse  # [...]
    if label_smoothing > 0:
        confidence = 1.0 - label_smoothing
        low = label_smoothing / (vocab - 1)
        sum_logp = jnp.sum(logits, axis=-1) - vocab * lse  # sum_v log p_v
        # -sum_v q_v log p_v with q = low everywhere except confidence on the target.
        loss = -(confidence - low) * logp_target - low * sum_logp
        entropy = -(confidence * math.log(confidence) + (vocab - 1) * low * math.log(low))
        loss = loss - entropy
    else:
        loss = -logp_target
    if weights is None:
        return jnp.sum(loss), jnp.asarray(loss.size, jnp.float32)
    return jnp.sum(loss * weights), jnp.sum(weights)


def token_accuracy(logits, targets, weights=None):
    """Number of tokens whose argmax prediction equals the target.

    Args:
      logits: ``[..., V]``.
      targets: ``[...]`` integer ids.
      weights: optional ``[...]`` weights (default all ones).

    Returns:
      ``(correct_sum, weight_sum)`` float32 scalars.
    """
    logits, targets, weights = _check(logits, targets, weights)
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    if weights is None:
        return jnp.sum(correct), jnp.asarray(correct.size, jnp.float32)
    return jnp.sum(correct * weights), jnp.sum(weights)
