"""The encoder-decoder ``Transformer`` of Vaswani et al. (2017).

It answers the model protocol of ``nn.model`` (``model(batch)``, ``hidden`` / ``logits``,
``with_attention``, ``init_decoding`` / ``decode``) and adds the pieces decoding is built from:
``encode``, ``decode`` (also without a cache) and ``init_cache``. Masks, positions and dropout
keys are described in ``nn.stacks``; the encoder uses ``fold_in(dropout_rng, 0)`` and the
decoder ``fold_in(dropout_rng, 1)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from transformer_jax.config import ModelConfig
from transformer_jax.nn.embeddings import TokenEmbedding
from transformer_jax.nn.layers import fold
from transformer_jax.nn.model import decoder_inputs
from transformer_jax.nn.stacks import Decoder, Encoder, check_ids

__all__ = ["Transformer"]


class Transformer(nnx.Module):
    """Encoder-decoder Transformer of Vaswani et al. (2017).

    Args:
      config: ``ModelConfig``.
      rngs: ``nnx.Rngs`` (``params`` stream).
    """

    batch_keys = ("inputs", "targets")
    translates = True

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        src_tokens = TokenEmbedding(config, rngs=rngs)
        tgt_tokens = src_tokens if config.share_embeddings else TokenEmbedding(config, rngs=rngs)
        self.encoder = Encoder(config, src_tokens, rngs=rngs)
        self.decoder = Decoder(config, tgt_tokens, cross_attention=True, rngs=rngs)

    # ------------------------------------------------------------------ the model protocol
    def __call__(self, batch, *, dropout_rng=None) -> jax.Array:
        """Teacher-forced float32 logits ``[B, T, V]`` of ``batch`` (see ``nn.model``).

        Reads ``inputs [B, S]``, ``targets [B, T]`` and, for packed rows, the
        ``*_segmentation`` / ``*_position`` arrays of both sides (segments: both or neither).
        Dropout is active iff ``dropout_rng`` is given.
        """
        return self.logits(self.hidden(batch, dropout_rng=dropout_rng))

    def hidden(self, batch, *, dropout_rng=None) -> jax.Array:
        """Final decoder hidden states ``[B, T, D]`` (see :meth:`__call__`)."""
        return self._forward(batch, dropout_rng=dropout_rng)[0]

    def logits(self, hidden) -> jax.Array:
        """Output projection: ``[B, T, D]`` -> float32 logits ``[B, T, V]``."""
        return self.decoder.output(hidden)

    def output_projection(self) -> tuple[jax.Array, jax.Array | None]:
        """``(kernel [D, V], bias [V] or None)`` of :meth:`logits` (see ``nn.model``)."""
        return self.decoder.output.weights()

    def with_attention(self, batch):
        """Logits and the attention weights (float32, before dropout).

        Returns:
          ``(logits [B, T, V], {"encoder_self": [L,B,N,S,S], "decoder_self": [L,B,N,T,T],
          "decoder_cross": [L,B,N,T,S]})``.
        """
        hidden, weights = self._forward(batch, return_attention=True)
        return self.logits(hidden), weights

    def init_decoding(self, context, max_len: int, *, dtype=None, beams: int = 1):
        """Encodes the source ``context [B, S]`` once: ``(cache, start_ids [B])`` for up to
        ``max_len`` target tokens, each search starting from the BOS (pad id); with ``beams``
        = K the cache serves the ``B * K`` rows of a beam search (``Decoder.init_cache``)."""
        src_ids = check_ids("src_ids", context)
        cache = self.init_cache(src_ids.shape[0], max_len, encoded=self.encode(src_ids),
                                src_ids=src_ids, dtype=dtype, beams=beams)
        return cache, jnp.full((src_ids.shape[0],), self.config.pad_id, jnp.int32)

    def _forward(self, batch, *, dropout_rng=None, return_attention: bool = False):
        """``(hidden [B, T, D], attention)``; the dict is empty unless ``return_attention``."""
        if "inputs" not in batch:
            raise ValueError(f"an encoder-decoder batch needs 'inputs' [B, S] and 'targets' "
                             f"[B, T]; got keys {sorted(batch)}.")
        src_segments = batch.get("inputs_segmentation")
        tgt_segments = batch.get("targets_segmentation")
        if (src_segments is None) != (tgt_segments is None):
            raise ValueError(
                "Pass inputs_segmentation and targets_segmentation together (packed rows) or "
                "neither."
            )
        encoded, enc_weights = self.encoder(
            batch["inputs"], segments=src_segments, positions=batch.get("inputs_position"),
            dropout_rng=fold(dropout_rng, 0), return_attention=return_attention)
        hidden, _, dec_weights = self.decoder(
            decoder_inputs(batch, self.config.pad_id), encoded,
            src_valid=self._src_valid(batch["inputs"]), src_segments=src_segments,
            tgt_segments=tgt_segments, positions=batch.get("targets_position"),
            dropout_rng=fold(dropout_rng, 1), return_attention=return_attention)
        if not return_attention:
            return hidden, {}
        return hidden, {
            "encoder_self": enc_weights["self"],
            "decoder_self": dec_weights["self"],
            "decoder_cross": dec_weights["cross"],
        }

    def _src_valid(self, src_ids):
        """``[B, S]`` bool, True at real source tokens (None when ``src_ids`` is None)."""
        if src_ids is None:
            return None
        return check_ids("src_ids", src_ids) != self.config.pad_id

    # ------------------------------------------------------------------ the pieces
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
        already in a cache built by ``init_cache(..., encoded=...)`` or ``init_decoding``.

        Args:
          tgt_in_ids: ``[B, T]`` decoder inputs.
          encoded: ``[B, S, D]`` from ``encode`` (not needed when the cache holds it).
          src_ids: ``[B, S]`` source ids for the padding mask (default: from the cache, or
            every source position is valid).
          src_segments, tgt_segments, tgt_positions: packed rows (no cache only).
          cache: None or a cache from ``init_cache``.
          dropout_rng: decoder stack key (None = no dropout).
        """
        hidden, new_cache, _ = self.decoder(
            tgt_in_ids,
            encoded,
            src_valid=self._src_valid(src_ids),
            src_segments=src_segments,
            tgt_segments=tgt_segments,
            positions=tgt_positions,
            cache=cache,
            dropout_rng=dropout_rng,
        )
        return self.logits(hidden), new_cache

    def init_cache(self, batch: int, max_len: int, *, encoded=None, src_ids=None, dtype=None,
                   beams: int = 1):
        """Decoding cache (see ``Decoder.init_cache``, also for ``beams``).

        With ``encoded [B, S, D]`` (and ``src_ids [B, S]`` for the padding mask) the
        cross-attention keys/values are projected once and kept in the cache, so decoding
        steps can call ``decode(ids, cache=cache)``. Every array leaf has the batch as axis 0
        except the int32 scalar ``index`` of each layer.
        """
        return self.decoder.init_cache(
            batch, max_len, encoded=encoded, src_valid=self._src_valid(src_ids), dtype=dtype,
            beams=beams)
