"""The encoder-decoder ``Transformer`` of Vaswani et al. (2017) and ``shift_right``.

Masks, positions and dropout keys are described in ``nn.stacks``; ``Transformer`` uses
``fold_in(dropout_rng, 0)`` as the encoder key and ``fold_in(dropout_rng, 1)`` as the decoder key.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from transformer_jax.config import ModelConfig
from transformer_jax.nn.embeddings import TokenEmbedding
from transformer_jax.nn.layers import fold
from transformer_jax.nn.stacks import Decoder, Encoder, check_ids

__all__ = ["Transformer", "shift_right"]


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


class Transformer(nnx.Module):
    """Encoder-decoder Transformer of Vaswani et al. (2017).

    Args:
      config: ``ModelConfig``.
      rngs: ``nnx.Rngs`` (``params`` stream).
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        src_tokens = TokenEmbedding(config, rngs=rngs)
        tgt_tokens = src_tokens if config.share_embeddings else TokenEmbedding(config, rngs=rngs)
        self.encoder = Encoder(config, src_tokens, rngs=rngs)
        self.decoder = Decoder(config, tgt_tokens, cross_attention=True, rngs=rngs)

    def __call__(
        self,
        src_ids,
        tgt_in_ids,
        *,
        src_segments=None,
        tgt_segments=None,
        src_positions=None,
        tgt_positions=None,
        dropout_rng=None,
    ):
        """Teacher-forced forward pass -> float32 logits ``[B, T, V]``.

        Args:
          src_ids: ``[B, S]`` source ids (pad 0).
          tgt_in_ids: ``[B, T]`` decoder inputs (``shift_right(targets, tgt_segments)``).
          src_segments, tgt_segments: packed-row segment ids (both or neither).
          src_positions, tgt_positions: per-segment positions of packed rows.
          dropout_rng: PRNG key; dropout is active iff it is given.
        """
        return self._forward(src_ids, tgt_in_ids, src_segments=src_segments,
                             tgt_segments=tgt_segments, src_positions=src_positions,
                             tgt_positions=tgt_positions, dropout_rng=dropout_rng)[0]

    def with_attention(self, src_ids, tgt_in_ids, **kwargs):
        """``__call__`` that also returns the attention weights (float32, before dropout).

        Returns:
          ``(logits [B, T, V], {"encoder_self": [L,B,N,S,S], "decoder_self": [L,B,N,T,T],
          "decoder_cross": [L,B,N,T,S]})``.
        """
        return self._forward(src_ids, tgt_in_ids, return_attention=True, **kwargs)

    def _forward(self, src_ids, tgt_in_ids, *, src_segments=None, tgt_segments=None,
                 src_positions=None, tgt_positions=None, dropout_rng=None,
                 return_attention: bool = False):
        """``(logits, attention)``; the dict is empty unless ``return_attention``."""
        if (src_segments is None) != (tgt_segments is None):
            raise ValueError(
                "Pass src_segments and tgt_segments together (packed rows) or neither."
            )
        encoded, enc_weights = self.encoder(
            src_ids,
            segments=src_segments,
            positions=src_positions,
            dropout_rng=fold(dropout_rng, 0),
            return_attention=return_attention,
        )
        logits, _, dec_weights = self.decoder(
            tgt_in_ids,
            encoded,
            src_valid=self._src_valid(src_ids),
            src_segments=src_segments,
            tgt_segments=tgt_segments,
            positions=tgt_positions,
            dropout_rng=fold(dropout_rng, 1),
            return_attention=return_attention,
        )
        if not return_attention:
            return logits, {}
        return logits, {
            "encoder_self": enc_weights["self"],
            "decoder_self": dec_weights["self"],
            "decoder_cross": dec_weights["cross"],
        }

    def _src_valid(self, src_ids):
        """``[B, S]`` bool, True at real source tokens (None when ``src_ids`` is None)."""
        if src_ids is None:
            return None
        return check_ids("src_ids", src_ids) != self.config.pad_id

    def encode(self, src_ids, *, src_segments=None, src_positions=None, dropout_rng=None):
        """``src_ids [B, S]`` -> encoded ``[B, S, D]``.

        ``dropout_rng`` is used as the encoder stack key directly.
        """
        encoded, _ = self.encoder(
            src_ids, segments=src_segments, positions=src_positions, dropout_rng=dropout_rng
        )
        return encoded

    def decode(
        self,
        tgt_in_ids,
        *,
        encoded=None,
        src_ids=None,
        src_segments=None,
        tgt_segments=None,
        tgt_positions=None,
        cache=None,
        dropout_rng=None,
    ):
        """Decoder pass: ``(logits [B, T, V] float32, new_cache)``.

        Two uses: ``decode(tgt_in_ids, encoded=..., src_ids=...)`` runs all T positions in
        parallel under a causal mask (``new_cache`` is None); ``decode(ids, cache=cache)``
        continues at the cache index (``ids`` usually ``[B, 1]``), with the encoder output
        already in a cache built by ``init_cache(..., encoded=...)``.

        Args:
          tgt_in_ids: ``[B, T]`` decoder inputs.
          encoded: ``[B, S, D]`` from ``encode`` (not needed when the cache holds it).
          src_ids: ``[B, S]`` source ids for the padding mask (default: from the cache, or
            every source position is valid).
          src_segments, tgt_segments, tgt_positions: as in ``__call__`` (no cache only).
          cache: None or a cache from ``init_cache``.
          dropout_rng: decoder stack key (None = no dropout).
        """
        logits, new_cache, _ = self.decoder(
            tgt_in_ids,
            encoded,
            src_valid=self._src_valid(src_ids),
            src_segments=src_segments,
            tgt_segments=tgt_segments,
            positions=tgt_positions,
            cache=cache,
            dropout_rng=dropout_rng,
        )
        return logits, new_cache

    def init_cache(self, batch: int, max_len: int, *, encoded=None, src_ids=None, dtype=None):
        """Decoding cache (see ``Decoder.init_cache``).

        With ``encoded [B, S, D]`` (and ``src_ids [B, S]`` for the padding mask) the
        cross-attention keys/values are projected once and kept in the cache, so decoding
        steps can call ``decode(ids, cache=cache)``. Every array leaf has the batch as axis 0
        except the int32 scalar ``index`` of each layer.
        """
        return self.decoder.init_cache(
            batch, max_len, encoded=encoded, src_valid=self._src_valid(src_ids), dtype=dtype
        )
