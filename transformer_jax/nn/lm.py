"""Decoder-only language model: the decoder stack of ``nn.transformer`` without cross-attention.

It answers the model protocol of ``nn.model`` on the target side of a batch: ``targets``
(and, for packed rows, ``targets_segmentation`` / ``targets_position``); ``inputs`` is not
read. Masks: causal AND ``segment_mask(segments, segments)`` for packed rows. Dropout:
``dropout_rng`` is the stack key (embedding ``fold_in(rng, 0)``, layer ``i``
``fold_in(rng, i + 1)``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from transformer_jax.config import ModelConfig
from transformer_jax.nn.embeddings import TokenEmbedding
from transformer_jax.nn.model import decoder_inputs
from transformer_jax.nn.stacks import Decoder, check_ids

__all__ = ["DecoderOnlyLM"]


class DecoderOnlyLM(nnx.Module):
    """Token embedding + DecoderLayers (self-attention + feed-forward) + output logits.

    Uses ``config.decoder_layers`` layers; ``share_embeddings`` is irrelevant (one table),
    ``tie_output`` chooses between the tied table and a Dense output layer.

    Args:
      config: ``ModelConfig``.
      rngs: ``nnx.Rngs``.
    """

    batch_keys = ("targets",)
    translates = False

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        tokens = TokenEmbedding(config, rngs=rngs)
        self.decoder = Decoder(config, tokens, cross_attention=False, rngs=rngs)

    def __call__(self, batch, *, dropout_rng=None) -> jax.Array:
        """Teacher-forced float32 logits ``[B, T, V]``: position t predicts ``targets[:, t]``
        from ``targets[:, :t]`` (the decoder reads ``shift_right(targets)``).

        Args:
          batch: ``targets [B, T]`` and optionally ``targets_segmentation`` (0 = padding) and
            ``targets_position`` of packed rows.
          dropout_rng: PRNG key; dropout is active iff it is given.
        """
        return self.logits(self.hidden(batch, dropout_rng=dropout_rng))

    def hidden(self, batch, *, dropout_rng=None) -> jax.Array:
        """Final hidden states ``[B, T, D]`` (see :meth:`__call__`)."""
        return self._forward(batch, dropout_rng=dropout_rng)[0]

    def logits(self, hidden) -> jax.Array:
        """Output projection: ``[B, T, D]`` -> float32 logits ``[B, T, V]``."""
        return self.decoder.output(hidden)

    def output_projection(self) -> tuple[jax.Array, jax.Array | None]:
        """``(kernel [D, V], bias [V] or None)`` of :meth:`logits` (see ``nn.model``)."""
        return self.decoder.output.weights()

    def with_attention(self, batch):
        """``__call__`` that also returns ``{"decoder_self": [L, B, N, T, T]}`` weights."""
        hidden, weights = self._forward(batch, return_attention=True)
        return self.logits(hidden), {"decoder_self": weights["self"]}

    def _forward(self, batch, *, dropout_rng=None, return_attention: bool = False):
        hidden, _, weights = self.decoder(
            decoder_inputs(batch, self.config.pad_id),
            tgt_segments=batch.get("targets_segmentation"),
            positions=batch.get("targets_position"),
            dropout_rng=dropout_rng,
            return_attention=return_attention,
        )
        return hidden, weights

    def init_cache(self, batch: int, max_len: int, *, dtype=None):
        """``{"layers": [{"self": {"key": [B,N,L,H], "value": [B,N,L,H], "index": int32 []}}]}``."""
        return self.decoder.init_cache(batch, max_len, dtype=dtype)

    def init_decoding(self, context, max_len: int, *, dtype=None, beams: int = 1):
        """Reads the prompt ``context [B, P]`` (P >= 0, all rows the same length) through the
        cache in one parallel pass: ``(cache, start_ids [B])`` to continue it by up to
        ``max_len`` tokens; with ``beams`` = K every cache row is repeated K times (rows
        ``b * K .. b * K + K - 1``) for the ``B * K`` rows of a beam search.

        Training saw ``shift_right(targets)``: position 0 holds the BOS (pad id) and every
        later position the previous token. So ``[BOS, p_1 .. p_{P-1}]`` fills the cache and
        decoding starts from ``p_P``; an empty prompt starts from the BOS.
        """
        prompt = jnp.asarray(context, jnp.int32)
        if prompt.ndim != 2:
            raise ValueError(f"a prompt must be token ids [B, P]; got shape {prompt.shape}.")
        batch, length = prompt.shape
        cache = self.init_cache(batch, length + max_len, dtype=dtype)
        start = jnp.full((batch,), self.config.pad_id, jnp.int32)
        if length:
            check_ids("prompt", prompt)
            bos = jnp.full((batch, 1), self.config.pad_id, jnp.int32)
            _, cache = self.decode(jnp.concatenate([bos, prompt[:, :-1]], axis=1), cache=cache)
            start = prompt[:, -1]
        cache = jax.tree.map(lambda x: jnp.repeat(x, beams, axis=0) if x.ndim else x, cache)
        return cache, start

    def decode(self, ids, *, cache, dropout_rng=None):
        """Incremental step: ``ids [B, T]`` (usually T = 1) at the cache index.

        Returns:
          ``(logits [B, T, V] float32, new_cache)``, as ``Transformer.decode``.
        """
        hidden, new_cache, _ = self.decoder(ids, cache=cache, dropout_rng=dropout_rng)
        return self.logits(hidden), new_cache
