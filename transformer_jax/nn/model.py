"""What every model answers: one call on a batch, the hidden/logits split, and decoding.

Both models (``Transformer``, ``DecoderOnlyLM``) implement :class:`Model`, so training,
evaluation, decoding and ahead-of-time compilation never ask which kind they hold::

    logits = model(batch)                          # [B, T, V] float32, teacher forced
    hidden = model.hidden(batch)                   # [B, T, D] final hidden states
    logits = model.logits(hidden)                  # [B, T, V] the output projection alone
    kernel, bias = model.output_projection()       # [D, V], [V] or None: logits' weights
    logits, weights = model.with_attention(batch)  # + attention weights per layer
    cache, start = model.init_decoding(context, max_len)   # ready for decoding.* searches
    logits, cache = model.decode(ids, cache=cache)          # one step: ids [B, 1]

A batch is a dict of int32 arrays named as the data pipeline yields them: ``targets [B, T]``
(what the logits predict; the decoder reads ``shift_right(targets)``), ``inputs [B, S]`` (the
source, encoder-decoder only) and, for packed rows, ``targets_segmentation`` /
``targets_position`` (``inputs_*`` likewise). ``model.batch_keys`` names the arrays a model
reads; others are ignored.

``hidden`` and ``logits`` are separate so that a loss can apply the output projection to
pieces of the hidden states (e.g. chunks of positions) and never hold the float32
``[B, T, V]`` logits of the whole batch at once (``ops.fused_cross_entropy`` of ``hidden``
and ``output_projection()``); ``model(batch)`` is ``model.logits(model.hidden(batch))``.
"""

from __future__ import annotations

from typing import Protocol

import jax
import jax.numpy as jnp

from transformer_jax.config import ModelConfig

__all__ = ["Model", "shift_right"]


class Model(Protocol):
    """The interface of every model (see the module docstring)."""

    config: ModelConfig
    batch_keys: tuple[str, ...]  # batch arrays the model reads (packing arrays optional)
    translates: bool  # maps a source ("inputs") to a target: decode metrics apply

    def __call__(self, batch, *, dropout_rng=None) -> jax.Array:
        """Teacher-forced float32 logits ``[B, T, V]``; dropout is on iff a key is given."""

    def hidden(self, batch, *, dropout_rng=None) -> jax.Array:
        """Final hidden states ``[B, T, D]`` (compute dtype), before the output projection."""

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Output projection ``[..., D]`` -> float32 logits ``[..., V]``."""

    def output_projection(self) -> tuple[jax.Array, jax.Array | None]:
        """``(kernel [D, V] in the compute dtype, bias [V] float32 or None)``: ``logits(h)`` is
        ``einsum(h, kernel, preferred_element_type=float32) + bias`` (tied or untied), for a
        loss that applies the projection itself (``ops.fused_cross_entropy``)."""

    def with_attention(self, batch) -> tuple[jax.Array, dict]:
        """``(logits, {name: [L, B, N, T, S]})`` attention weights of every layer."""

    def init_decoding(self, context, max_len: int, *, dtype=None,
                      beams: int = 1) -> tuple[dict, jax.Array]:
        """``(cache, start_ids [B])`` to produce up to ``max_len`` tokens after ``context``
        ``[B, C]`` (the source of a translation model, the prompt of a language model); with
        ``beams`` = K the cache serves ``B * K`` rows, the K beams of each example in a row
        (``decoding.beam_search(..., beam_cache=True)``): leaves that lead with ``B * K`` are
        per row, those that lead with B are shared by an example's beams."""

    def decode(self, ids, *, cache, dropout_rng=None) -> tuple[jax.Array, dict]:
        """One incremental step: ``ids [B, T]`` -> ``(logits [B, T, V], new cache)``."""


def shift_right(targets, segments=None, pad_id: int = 0) -> jax.Array:
    """Decoder inputs: ``targets`` shifted right by one with ``pad_id`` as BOS.

    Args:
      targets: ``[B, T]`` int token ids.
      segments: optional ``[B, T]`` segment ids of packed rows; every position where the
        segment id changes (the start of a packed example) also gets the BOS.
      pad_id: the BOS/pad id (0).

    Returns:
      ``[B, T]`` with ``out[:, 0] = pad_id`` and ``out[:, t] = targets[:, t - 1]`` otherwise.
    """
    targets = jnp.asarray(targets)
    if targets.ndim != 2:
        raise ValueError(f"shift_right expects targets [B, T]; got shape {tuple(targets.shape)}.")
    bos = jnp.full_like(targets[:, :1], pad_id)
    shifted = jnp.concatenate([bos, targets[:, :-1]], axis=1)  # [B, T]
    if segments is not None:
        segments = jnp.asarray(segments)
        if segments.shape != targets.shape:
            raise ValueError(
                f"segments {tuple(segments.shape)} must have the shape of targets "
                f"{tuple(targets.shape)}."
            )
        starts = jnp.concatenate(
            [jnp.ones_like(segments[:, :1], bool), segments[:, 1:] != segments[:, :-1]], axis=1
        )  # [B, T] True at the first token of every segment
        shifted = jnp.where(starts, jnp.asarray(pad_id, targets.dtype), shifted)
    return shifted


def decoder_inputs(batch, pad_id: int) -> jax.Array:
    """``shift_right(batch["targets"], batch.get("targets_segmentation"))`` ``[B, T]``."""
    if "targets" not in batch:
        raise ValueError(f"a batch needs 'targets' [B, T]; got keys {sorted(batch)}.")
    return shift_right(batch["targets"], batch.get("targets_segmentation"), pad_id)
