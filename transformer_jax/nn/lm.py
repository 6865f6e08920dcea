"""Decoder-only language model: the decoder stack of ``nn.transformer`` without cross-attention.

Masks: causal AND ``segment_mask(segments, segments)`` for packed rows. Dropout: ``dropout_rng``
is the stack key (embedding ``fold_in(rng, 0)``, layer ``i`` ``fold_in(rng, i + 1)``).
"""

from __future__ import annotations

from flax import nnx

from transformer_jax.config import ModelConfig
from transformer_jax.nn.embeddings import TokenEmbedding
from transformer_jax.nn.stacks import Decoder

__all__ = ["DecoderOnlyLM"]


class DecoderOnlyLM(nnx.Module):
    """Token embedding + DecoderLayers (self-attention + feed-forward) + output logits.

    Uses ``config.decoder_layers`` layers; ``share_embeddings`` is irrelevant (one table),
    ``tie_output`` chooses between the tied table and a Dense output layer.

    Args:
      config: ``ModelConfig``.
      rngs: ``nnx.Rngs``.
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        tokens = TokenEmbedding(config, rngs=rngs)
        self.decoder = Decoder(config, tokens, cross_attention=False, rngs=rngs)

    def __call__(self, ids, *, segments=None, positions=None, dropout_rng=None):
        """Parallel (teacher-forced) pass -> float32 logits ``[B, T, V]``.

        Args:
          ids: ``[B, T]`` input ids.
          segments: ``[B, T]`` segment ids of packed rows (0 = padding) or None.
          positions: ``[B, T]`` per-segment positions or None (``arange(T)``).
          dropout_rng: PRNG key; dropout is active iff it is given.
        """
        logits, _, _ = self.decoder(
            ids, tgt_segments=segments, positions=positions, dropout_rng=dropout_rng
        )
        return logits

    def with_attention(self, ids, *, segments=None, positions=None, dropout_rng=None):
        """``__call__`` that also returns ``{"decoder_self": [L, B, N, T, T]}`` weights."""
        logits, _, weights = self.decoder(
            ids,
            tgt_segments=segments,
            positions=positions,
            dropout_rng=dropout_rng,
            return_attention=True,
        )
        return logits, {"decoder_self": weights["self"]}

    def init_cache(self, batch: int, max_len: int, *, dtype=None):
        """``{"layers": [{"self": {"key": [B,L,N,H], "value": [B,L,N,H], "index": int32 []}}]}``."""
        return self.decoder.init_cache(batch, max_len, dtype=dtype)

    def decode(self, ids, *, cache, dropout_rng=None):
        """Incremental step: ``ids [B, T]`` (usually T = 1) at the cache index.

        Returns:
          ``(logits [B, T, V] float32, new_cache)``, as ``Transformer.decode``.
        """
        logits, new_cache, _ = self.decoder(ids, cache=cache, dropout_rng=dropout_rng)
        return logits, new_cache
