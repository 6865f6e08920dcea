"""Feed-forward network, the residual sublayer wrapper and the encoder/decoder layers.

Encoder and decoder layers are the same class (``TransformerLayer``) varied by arguments:
self-attention, an optional cross-attention, and the feed-forward network, each wrapped by one
``Residual`` (dropout + residual + LayerNorm, post-LN as in the paper or pre-LN).

Dropout keys inside a layer (deterministic, derived from the layer key with ``fold_in``):
sublayer ``j`` (0 self-attention, 1 cross-attention if present, then feed-forward) gets
``k_j = fold_in(layer_key, j)``; its residual dropout uses ``fold_in(k_j, 0)`` and its inner
dropout (attention weights, or ReLU activations) ``fold_in(k_j, 1)``.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from transformer_jax.config import ACTIVATIONS, ModelConfig
from transformer_jax.nn.attention import MultiHeadAttention
from transformer_jax.nn.int8 import INT8_SUFFIX, quantize_weight
from transformer_jax.nn.lora import make_lora
from transformer_jax.nn.partitioning import logical_init
from transformer_jax.ops import dropout

__all__ = [
    "LayerNorm",
    "FeedForward",
    "Residual",
    "TransformerLayer",
    "EncoderLayer",
    "DecoderLayer",
    "fold",
]

_dense_init = jax.nn.initializers.xavier_uniform()


def fold(rng, index: int):
    """``jax.random.fold_in(rng, index)``, passing None through."""
    return None if rng is None else jax.random.fold_in(rng, index)


class LayerNorm(nnx.Module):
    """``nnx.LayerNorm`` computed in float32, returning the compute dtype."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.dtype = config.compute_dtype
        self.norm = nnx.LayerNorm(
            config.d_model,
            epsilon=config.layer_norm_epsilon,
            dtype=jnp.float32,
            param_dtype=config.params_dtype,
            rngs=rngs,
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        """``[..., D]`` -> ``[..., D]``."""
        return self.norm(x.astype(jnp.float32)).astype(self.dtype)


class FeedForward(nnx.Module):
    """Position-wise feed-forward network ``max(0, x W1 + b1) W2 + b2`` (D -> F -> D).

    ``config.activation`` replaces the ReLU ``max(0, .)`` (e.g. "gelu", "silu");
    ``config.ff_dropout_rate`` > 0 adds dropout on the activations (off in the paper).
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        kwargs = dict(
            use_bias=config.use_bias,
            dtype=config.compute_dtype,
            param_dtype=config.params_dtype,
            rngs=rngs,
        )
        zeros = nnx.initializers.zeros_init()
        self.dropout_rate = config.ff_dropout_rate
        self.activation = config.activation
        self.wi = nnx.Linear(config.d_model, config.d_ff,  # logical axes: nn.partitioning
                             kernel_init=logical_init(_dense_init, ("embed", "mlp")),
                             bias_init=logical_init(zeros, ("mlp",)), **kwargs)
        self.wo = nnx.Linear(config.d_ff, config.d_model,
                             kernel_init=logical_init(_dense_init, ("mlp", "embed")),
                             bias_init=logical_init(zeros, ("embed",)), **kwargs)
        self.wi_lora = make_lora(config, "wi", config.d_model, config.d_ff, rngs)
        self.wo_lora = make_lora(config, "wo", config.d_ff, config.d_model, rngs)

    def __call__(self, x: jax.Array, *, dropout_rng=None) -> jax.Array:
        """``[B, T, D]`` -> ``[B, T, D]``."""
        hidden = ACTIVATIONS[self.activation](self._dense("wi", x))  # [B, T, F]
        hidden = dropout(hidden, self.dropout_rate, dropout_rng)
        return self._dense("wo", hidden)  # [B, T, D]

    def _dense(self, name: str, x) -> jax.Array:
        """Projection ``name`` of ``x``, through what sits beside its weight (a LoRA adapter,
        or int8 weights after ``nn.int8.quantize_int8``) when there is one."""
        linear = getattr(self, name)
        adapter = getattr(self, f"{name}_lora")
        adapter = getattr(self, name + INT8_SUFFIX, None) if adapter is None else adapter
        if adapter is None:
            return linear(x)
        x = x.astype(linear.dtype)
        out = adapter(x, linear.kernel[...].astype(linear.dtype))
        return out if linear.bias is None else out + linear.bias[...].astype(linear.dtype)

    def quantize_int8(self, *, min_rows: int) -> None:
        """int8 weights for ``wi`` and ``wo`` (``nn.int8.quantize_int8``)."""
        for name in ("wi", "wo"):
            linear = getattr(self, name)
            setattr(self, name + INT8_SUFFIX,
                    quantize_weight(linear.kernel, linear.in_features, min_rows=min_rows))


class Residual(nnx.Module):
    """The sublayer connection shared by every encoder and decoder sublayer.

    post-LN (paper): ``LN(x + Dropout(f(x)))``; pre-LN: ``x + Dropout(f(LN(x)))``.
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.pre_norm = config.pre_norm
        self.dropout_rate = config.dropout_rate
        self.norm = LayerNorm(config, rngs=rngs)

    def __call__(self, x: jax.Array, fn: Callable, *, dropout_rng=None):
        """Applies ``fn(x') -> (y, aux)`` inside the connection; returns ``(out, aux)``.

        ``fn`` gets ``fold_in(dropout_rng, 1)`` (or None) as its only keyword ``dropout_rng``;
        the residual dropout uses ``fold_in(dropout_rng, 0)``.
        """
        y, aux = fn(self.norm(x) if self.pre_norm else x, dropout_rng=fold(dropout_rng, 1))
        out = x + dropout(y.astype(x.dtype), self.dropout_rate, fold(dropout_rng, 0))
        return (out if self.pre_norm else self.norm(out)), aux


class TransformerLayer(nnx.Module):
    """Self-attention [+ cross-attention] + feed-forward, each in a ``Residual``.

    Encoder and decoder layers are this class with different arguments; a new sublayer or
    attention variant is added here once for both.

    Args:
      config: the model config.
      cross_attention: add encoder-decoder attention after self-attention.
      rngs: ``nnx.Rngs``.
    """

    def __init__(self, config: ModelConfig, *, cross_attention: bool, rngs: nnx.Rngs):
        attn = dict(
            d_model=config.d_model,
            num_heads=config.num_heads,
            num_kv_heads=config.kv_heads,
            use_bias=config.use_bias,
            dropout_rate=config.attention_dropout_rate,
            implementation=config.attention_impl,
            chunk_size=config.attention_chunk_size,
            precision=config.attention_precision,
            dtype=config.compute_dtype,
            param_dtype=config.params_dtype,
            lora=dict(rank=config.lora_rank, alpha=config.lora_alpha,
                      targets=config.lora_target_names) if config.lora_rank else None,
            rngs=rngs,
        )
        self.has_cross_attention = cross_attention
        self.self_attention = MultiHeadAttention(rope=config.positional == "rope", **attn)
        self.self_residual = Residual(config, rngs=rngs)
        if cross_attention:
            self.cross_attention = MultiHeadAttention(rope=False, **attn)
            self.cross_residual = Residual(config, rngs=rngs)
        self.feed_forward = FeedForward(config, rngs=rngs)
        self.ff_residual = Residual(config, rngs=rngs)

    def __call__(self, x, *, spec=None, positions=None, position_bias=None, encoded=None,
                 cross_spec=None, cache=None, dropout_rng=None, return_attention: bool = False):
        """One layer.

        Args:
          x: ``[B, T, D]``.
          spec: self-attention ``ops.AttentionSpec`` (causal order, segments, key padding,
            ALiBi slopes); with a cache the cache adds its causal term and slot positions.
          positions: ``[B, T]`` positions for RoPE and ``position_bias``.
          position_bias: self-attention bias from query and key positions (T5's relative
            bias; see ``MultiHeadAttention``), or None.
          encoded: ``[B, S, D]`` encoder output (cross-attention layers; may be None when the
            cache holds precomputed cross keys/values).
          cross_spec: cross-attention ``ops.AttentionSpec`` (source padding, segments).
          cache: None or ``{"self": MHA cache, "cross": precomputed {"key","value"}
            (optional)}``.
          dropout_rng: layer key (None = no dropout); see the module docstring.
          return_attention: also return the attention weights.

        Returns:
          ``(x [B, T, D], new_cache or None, {"self": [B,N,T,S], "cross": [B,N,T,S]} or {})``.
        """
        cache = {} if cache is None else cache
        new_cache, weights = {}, {}
        sub = iter(range(3))  # sublayer index j of the dropout keys

        def attend(module, **kwargs):
            def fn(h, *, dropout_rng):
                out, c, w = module(h, dropout_rng=dropout_rng,
                                   return_weights=return_attention, **kwargs)
                return out, (c, w)
            return fn

        self_fn = attend(self.self_attention, spec=spec, positions=positions,
                         position_bias=position_bias, cache=cache.get("self"))
        x, (new_cache["self"], weights["self"]) = self.self_residual(
            x, self_fn, dropout_rng=fold(dropout_rng, next(sub)))
        if self.has_cross_attention:
            if encoded is None and "cross" not in cache:
                raise ValueError(
                    "A cross-attention layer needs the encoder output (encoded=[B, S, D]) or a "
                    "cache with precomputed cross keys/values."
                )
            cross_fn = attend(self.cross_attention, inputs_kv=encoded, spec=cross_spec,
                              cache=cache.get("cross"))
            x, (new_cache["cross"], weights["cross"]) = self.cross_residual(
                x, cross_fn, dropout_rng=fold(dropout_rng, next(sub)))

        def ff_fn(h, *, dropout_rng):
            return self.feed_forward(h, dropout_rng=dropout_rng), None

        x, _ = self.ff_residual(x, ff_fn, dropout_rng=fold(dropout_rng, next(sub)))
        new_cache = {k: v for k, v in new_cache.items() if v is not None} or None
        weights = {k: v for k, v in weights.items() if v is not None}
        return x, new_cache, weights


class EncoderLayer(TransformerLayer):
    """Encoder layer: bidirectional self-attention + feed-forward."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        super().__init__(config, cross_attention=False, rngs=rngs)


class DecoderLayer(TransformerLayer):
    """Decoder layer: (causal) self-attention, optional cross-attention, feed-forward.

    ``cross_attention=False`` gives the layer of a decoder-only language model.
    """

    def __init__(self, config: ModelConfig, *, cross_attention: bool = True, rngs: nnx.Rngs):
        super().__init__(config, cross_attention=cross_attention, rngs=rngs)
