"""Encoder and decoder stacks (``Encoder``, ``Decoder``) shared by ``Transformer`` and the LM.

Masks and biases are passed as ``ops.AttentionSpec`` — ``[B, T]`` / ``[B, S]`` arrays that
"chunked" attention turns into terms block by block, so no ``[T, S]`` array exists in the model
(True = attend):

* encoder self-attention: key padding ``src != pad`` AND, for packed rows, equal segment ids;
  padded query rows attend the real keys (their outputs are never used);
* decoder self-attention: causal (by position) AND equal segment ids. No padding mask from the
  decoder inputs: their first token is the BOS = pad id 0, and trailing padding can only
  influence later (padding) positions under the causal mask;
* cross-attention: keys masked where ``src == pad`` AND equal segment ids (target vs source).

Positions default to ``arange(length)`` (``cache index + arange(T)`` when decoding with a cache);
packed rows pass per-segment positions. "rope" rotates q/k in self-attention only, "alibi"
adds ``ops.alibi_bias`` and "t5_relative" the stack's ``RelativePositionBias`` (bidirectional
in the encoder, unidirectional in the decoder) to self-attention only; cross-attention has no
positional term. ``local_window_size = w`` restricts self-attention to a window of positions:
``(w, w)`` in the encoder, ``(w, 0)`` with the causal order in the decoder, whose decoding
cache is then a ring buffer of ``w + 1`` positions (``nn.attention``).

Dropout keys (all ``jax.random.fold_in``, so the same ``dropout_rng`` gives the same masks):
``Transformer`` uses ``fold_in(rng, 0)`` for the encoder and ``fold_in(rng, 1)`` for the
decoder; inside a stack the embedding dropout uses ``fold_in(stack_rng, 0)`` and layer ``i``
``fold_in(stack_rng, i + 1)`` (the layer-internal scheme is in ``nn.layers``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from transformer_jax import ops
from transformer_jax.config import ModelConfig
from transformer_jax.nn.embeddings import (
    InputEmbedding,
    OutputProjection,
    RelativePositionBias,
    TokenEmbedding,
)
from transformer_jax.nn.layers import DecoderLayer, EncoderLayer, LayerNorm, fold

__all__ = ["Encoder", "Decoder"]


# ----------------------------------------------------------------------------- helpers


def check_ids(name: str, ids) -> jax.Array:
    ids = jnp.asarray(ids)
    if ids.ndim != 2 or not jnp.issubdtype(ids.dtype, jnp.integer):
        raise ValueError(
            f"{name} must be integer token ids [B, length]; got {ids.dtype} {tuple(ids.shape)}."
        )
    return ids


def _positions(config: ModelConfig, ids, positions, name: str, offset=0) -> jax.Array:
    """``[B, T]`` positions: the given ones or ``offset + arange(T)``."""
    batch, length = ids.shape
    if positions is None:
        if (
            config.positional == "learned"
            and isinstance(offset, int)
            and (offset + length > config.max_len)
        ):
            raise ValueError(
                f"{name} has length {length} but the learned position table covers "
                f"max_len={config.max_len} positions; raise max_len or shorten the input."
            )
        return jnp.broadcast_to(offset + jnp.arange(length, dtype=jnp.int32), (batch, length))
    positions = jnp.asarray(positions)
    if positions.shape != ids.shape:
        raise ValueError(
            f"{name} positions {tuple(positions.shape)} must have the shape of the ids "
            f"{tuple(ids.shape)}."
        )
    return positions


def _alibi_slopes(config: ModelConfig):
    """``[N]`` ALiBi slopes for self-attention, or None for other positional kinds."""
    return ops.alibi_slopes(config.num_heads) if config.positional == "alibi" else None


def _window(config: ModelConfig, *, causal: bool):
    """The self-attention window ``(left, right)`` of a stack, or None."""
    w = config.local_window_size
    return None if w is None else (w, 0 if causal else w)


def _relative_bias(config: ModelConfig, *, bidirectional: bool, rngs: nnx.Rngs):
    """The stack's T5 relative bias table for ``positional="t5_relative"``, else None."""
    if config.positional != "t5_relative":
        return None
    return RelativePositionBias(config, bidirectional=bidirectional, rngs=rngs)


def _bias_fn(stack):
    """The self-attention ``position_bias`` of a stack (None without a relative table)."""
    return None if stack.relative_bias is None else stack.relative_bias.bias_fn()


def _check_segments(q_segments, k_segments, what: str) -> None:
    if (q_segments is None) != (k_segments is None):
        raise ValueError(
            f"{what} needs both segment arrays or neither; pass src_segments and tgt_segments "
            "together for packed rows."
        )


_SAVED = {"full": None, "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


def _apply(config: ModelConfig, layer, x, **kwargs):
    """``layer(x, **kwargs)``, rematerialised per ``config.remat`` when there is no cache:
    the backward pass recomputes the layer from its input instead of reading stored
    activations (same numbers, less memory, more compute)."""
    if config.remat == "none" or kwargs.get("cache") is not None:
        return layer(x, **kwargs)
    return nnx.remat(lambda layer, x: layer(x, **kwargs), policy=_SAVED[config.remat])(
        layer, x)


def _stack(weights: list[dict], key: str):
    """Stacks per-layer ``[B, N, T, S]`` weights to ``[L, B, N, T, S]`` (None if absent)."""
    arrays = [w[key] for w in weights if key in w]
    return jnp.stack(arrays) if arrays else None


# ----------------------------------------------------------------------------- stacks


class Encoder(nnx.Module):
    """Embedding + ``encoder_layers`` EncoderLayers (+ final LayerNorm when pre-LN)."""

    def __init__(self, config: ModelConfig, tokens: TokenEmbedding, *, rngs: nnx.Rngs):
        self.config = config
        self.embedding = InputEmbedding(config, tokens, rngs=rngs)
        self.layers = nnx.List(
            [EncoderLayer(config, rngs=rngs) for _ in range(config.encoder_layers)]
        )
        self.relative_bias = _relative_bias(config, bidirectional=True, rngs=rngs)
        if config.pre_norm:
            self.final_norm = LayerNorm(config, rngs=rngs)

    def __call__(
        self,
        src_ids,
        *,
        segments=None,
        positions=None,
        dropout_rng=None,
        return_attention: bool = False,
    ):
        """``src_ids [B, S]`` -> ``(encoded [B, S, D], {"self": [L, B, N, S, S]})``.

        The dict is empty unless ``return_attention`` (the same pair structure either way).
        """
        config = self.config
        src_ids = check_ids("src_ids", src_ids)
        positions = _positions(config, src_ids, positions, "src_ids")
        spec = ops.AttentionSpec(
            q_positions=positions,
            k_positions=positions,
            q_segments=segments,
            k_segments=segments,
            k_valid=src_ids != config.pad_id,  # [B, S]
            alibi_slopes=_alibi_slopes(config),
            window=_window(config, causal=False),
        )
        position_bias = _bias_fn(self)
        x = self.embedding(src_ids, positions, dropout_rng=fold(dropout_rng, 0))
        weights = []
        for i, layer in enumerate(self.layers):
            x, _, w = _apply(
                config,
                layer,
                x,
                spec=spec,
                positions=positions,
                position_bias=position_bias,
                dropout_rng=fold(dropout_rng, i + 1),
                return_attention=return_attention,
            )
            weights.append(w)
        if config.pre_norm:
            x = self.final_norm(x)
        return x, ({"self": _stack(weights, "self")} if return_attention else {})


class Decoder(nnx.Module):
    """Embedding + ``decoder_layers`` DecoderLayers (+ final LN when pre-LN), and the output
    projection ``output`` (hidden states -> logits; applied by the models).

    With ``cross_attention=False`` this is the stack of a decoder-only language model.
    """

    def __init__(
        self,
        config: ModelConfig,
        tokens: TokenEmbedding,
        *,
        cross_attention: bool = True,
        rngs: nnx.Rngs,
    ):
        if config.decoder_layers < 1:
            raise ValueError("A decoder needs num_decoder_layers >= 1 (or num_layers >= 1).")
        config = config.decoder_side()  # num_decoder_heads / decoder_d_ff, when set
        self.config = config
        self.cross_attention = cross_attention
        self.embedding = InputEmbedding(config, tokens, rngs=rngs)
        self.layers = nnx.List(
            [
                DecoderLayer(config, cross_attention=cross_attention, rngs=rngs)
                for _ in range(config.decoder_layers)
            ]
        )
        self.relative_bias = _relative_bias(config, bidirectional=False, rngs=rngs)
        if config.pre_norm:
            self.final_norm = LayerNorm(config, rngs=rngs)
        self.output = OutputProjection(config, tokens, rngs=rngs)

    def init_cache(self, batch: int, max_len: int, *, encoded=None, src_valid=None, dtype=None,
                   beams: int = 1):
        """Decoding cache for ``max_len`` target positions.

        Args:
          batch: B.
          max_len: L, the most target tokens the cache holds.
          encoded: optional ``[B, S, D]`` encoder output; its cross-attention keys/values are
            then computed once here and stored in the cache.
          src_valid: optional ``[B, S]`` bool (True = real source token), stored with them.
          dtype: dtype of the keys/values (default: the compute dtype).
          beams: G; the cache then serves ``B * G`` rows (beam search), rows ``b * G ..
            b * G + G - 1`` the beams of example ``b``: beam caches (``nn.attention``) for
            self-attention, or per-row caches of ``B * G`` rows with ALiBi, a relative bias or
            a window; the cross-attention keys/values and ``src_valid`` stay one per example.

        Returns:
          ``{"layers": [{"self": {"key": [B,K,L,H], "value": [B,K,L,H], "index": int32 []},
          "cross": {"key": [B,K,H,S], "value": [B,K,S,H]}}, ...], "src_valid": [B,S] bool}``
          ("cross" and "src_valid" only when ``encoded`` is given); K key/value heads, and
          L = ``min(max_len, local_window_size + 1)`` with a sliding window (a ring buffer).
        """
        shared = beams > 1 and self.config.local_window_size is None and (
            self.config.positional not in ("alibi", "t5_relative"))
        if self.config.positional == "learned" and max_len > self.config.max_len:
            raise ValueError(
                f"A cache of max_len={max_len} exceeds the learned position table "
                f"(config.max_len={self.config.max_len}); use a shorter cache."
            )
        layers = []
        for layer in self.layers:
            entry = {"self": layer.self_attention.init_cache(
                batch, max_len, dtype, beams=beams) if shared else
                layer.self_attention.init_cache(batch * beams, max_len, dtype,
                                                window=self.config.local_window_size)}
            if encoded is not None and self.cross_attention:
                kv = layer.cross_attention.precompute_kv(encoded)
                entry["cross"] = jax.tree.map(lambda a: a.astype(dtype or a.dtype), kv)
            layers.append(entry)
        cache = {"layers": layers}
        if encoded is not None and self.cross_attention:
            if src_valid is None:
                src_valid = jnp.ones(jnp.shape(encoded)[:2], bool)
            cache["src_valid"] = jnp.asarray(src_valid, bool)
        return cache

    def __call__(
        self,
        tgt_ids,
        encoded=None,
        *,
        src_valid=None,
        src_segments=None,
        tgt_segments=None,
        positions=None,
        cache=None,
        dropout_rng=None,
        return_attention: bool = False,
    ):
        """Decodes ``tgt_ids [B, T]`` to the final hidden states (``output`` makes logits).

        Without a cache: all T positions in parallel under a causal mask. With a cache (from
        ``init_cache``): the T new tokens continue at the cache index (usually T = 1).

        Args:
          tgt_ids: ``[B, T]`` decoder input ids (``shift_right(targets)`` in training).
          encoded: ``[B, S, D]`` encoder output (cross-attention; not needed when the cache
            holds precomputed cross keys/values).
          src_valid: ``[B, S]`` bool, True at real source tokens (default: from the cache, or
            all valid).
          src_segments, tgt_segments: ``[B, S]`` / ``[B, T]`` segment ids of packed rows.
          positions: ``[B, T]`` target positions (default ``arange(T)`` / ``index + arange``).
          cache: None or a cache from ``init_cache``.
          dropout_rng: stack key (None = no dropout).
          return_attention: also return the attention weights.

        Returns:
          ``(hidden [B, T, D], new_cache or None, {"self": [L,B,N,T,K], "cross":
          [L,B,N,T,S]})``; the dict is empty unless ``return_attention``.
        """
        tgt_ids = check_ids("tgt_ids", tgt_ids)
        if cache is None:
            layer_caches = [None] * len(self.layers)
            self_spec, positions = self._parallel_spec(tgt_ids, tgt_segments, positions)
        else:
            if tgt_segments is not None or src_segments is not None:
                raise ValueError("Packed rows (segments) are not supported with a decode cache.")
            layer_caches = self._layer_caches(cache)
            index = layer_caches[0]["self"]["index"]
            positions = _positions(self.config, tgt_ids, positions, "tgt_ids", offset=index)
            # the cache adds the causal term and the slot positions itself
            self_spec = ops.AttentionSpec(alibi_slopes=_alibi_slopes(self.config),
                                          window=_window(self.config, causal=True))
            if src_valid is None:
                src_valid = cache.get("src_valid")
        cross_spec = None
        if self.cross_attention:
            _check_segments(tgt_segments, src_segments, "cross-attention")
            cross_spec = ops.AttentionSpec(
                q_segments=tgt_segments, k_segments=src_segments, k_valid=src_valid
            )
        x = self.embedding(tgt_ids, positions, dropout_rng=fold(dropout_rng, 0))
        new_layers, weights = [], []
        position_bias = _bias_fn(self)
        for i, layer in enumerate(self.layers):
            x, layer_cache, w = _apply(
                self.config, layer, x, spec=self_spec, positions=positions,
                position_bias=position_bias, encoded=encoded,
                cross_spec=cross_spec, cache=layer_caches[i],
                dropout_rng=fold(dropout_rng, i + 1), return_attention=return_attention)
            new_layers.append(layer_cache)
            weights.append(w)
        if self.config.pre_norm:
            x = self.final_norm(x)
        new_cache = None if cache is None else dict(cache, layers=new_layers)
        return x, new_cache, self._attention(weights, return_attention)

    def _parallel_spec(self, tgt_ids, tgt_segments, positions):
        """Self-attention spec and ``[B, T]`` positions of a pass without a cache."""
        # Without given positions the causal term is "key index <= query index": leave the
        # spec's positions unset (their default) so attention_impl="jax" can hand it to
        # cuDNN as its own causal mask instead of a dense [T, T] one.
        spec = ops.AttentionSpec(
            causal=True,
            q_positions=positions,
            k_positions=positions,
            q_segments=tgt_segments,
            k_segments=tgt_segments,
            alibi_slopes=_alibi_slopes(self.config),
            window=_window(self.config, causal=True),
        )
        return spec, _positions(self.config, tgt_ids, positions, "tgt_ids")

    def _layer_caches(self, cache) -> list:
        layer_caches = cache["layers"]
        if len(layer_caches) != len(self.layers):
            raise ValueError(
                f"The cache has {len(layer_caches)} layers but the decoder has "
                f"{len(self.layers)}; build it with this model's init_cache."
            )
        return layer_caches

    def _attention(self, weights: list[dict], wanted: bool) -> dict:
        if not wanted:
            return {}
        attention = {"self": _stack(weights, "self")}
        if self.cross_attention:
            attention["cross"] = _stack(weights, "cross")
        return attention
