"""Token embeddings (scaled by sqrt(D)), additive position encodings and the output layer.

Positional kinds (``config.positional``): "sinusoidal" adds ``ops.sinusoidal_encoding``
("sinusoidal_split": the same with ``split=True``, Marian's layout), "learned" adds rows of a
``[max_len, D]`` table; "rope" and "alibi" add nothing here (they act inside self-attention,
see ``nn.attention`` and ``nn.transformer``); "t5_relative" adds nothing here either: each
stack owns a ``RelativePositionBias`` whose bias enters its self-attention layers.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from transformer_jax import ops
from transformer_jax.config import ModelConfig
from transformer_jax.nn.int8 import INT8_SUFFIX, quantize_weight
from transformer_jax.nn.partitioning import logical_init
from transformer_jax.ops import dropout

__all__ = ["TokenEmbedding", "InputEmbedding", "OutputProjection", "RelativePositionBias"]


class TokenEmbedding(nnx.Module):
    """Token table ``[V, D]`` initialised with N(0, 1/D) so that ``E[ids] * sqrt(D)`` has unit
    scale; ``attend`` gives tied output logits ``x E^T``. ``config.scale_embedding=False``
    looks rows up without the sqrt(D) factor."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.d_model = config.d_model
        self.scale = math.sqrt(config.d_model) if config.scale_embedding else None
        self.vocab_size = config.vocab_size
        self.dtype = config.compute_dtype
        self.embed = nnx.Embed(
            config.vocab_size,
            config.d_model,
            dtype=config.compute_dtype,
            param_dtype=config.params_dtype,
            embedding_init=logical_init(
                jax.nn.initializers.normal(stddev=config.d_model**-0.5), ("vocab", "embed")),
            rngs=rngs,
        )

    def __call__(self, ids) -> jax.Array:
        """``ids [B, T]`` int -> ``[B, T, D]`` (compute dtype), multiplied by sqrt(D)."""
        table = self.embed.embedding[...].astype(self.dtype)  # [V, D]
        rows = jnp.take(table, ids, axis=0)  # [B, T, D]
        return rows if self.scale is None else rows * jnp.asarray(self.scale, self.dtype)

    def attend(self, x) -> jax.Array:
        """Tied output projection ``[B, T, D]`` -> float32 logits ``[B, T, V]``."""
        table = self.embed.embedding[...].astype(self.dtype)  # [V, D]
        return jnp.einsum(
            "BTD,VD->BTV", x.astype(self.dtype), table, preferred_element_type=jnp.float32
        )


class InputEmbedding(nnx.Module):
    """``Dropout(TokenEmbedding(ids) + PE(positions))`` for one stack (encoder or decoder).

    Args:
      config: the model config.
      tokens: the (possibly shared) ``TokenEmbedding``.
      rngs: ``nnx.Rngs`` (for the learned position table).
    """

    def __init__(self, config: ModelConfig, tokens: TokenEmbedding, *, rngs: nnx.Rngs):
        self.tokens = tokens
        self.positional = config.positional
        self.d_model, self.max_len = config.d_model, config.max_len
        self.dropout_rate = config.dropout_rate
        self.dtype = config.compute_dtype
        if config.positional == "learned":
            init = jax.nn.initializers.normal(stddev=config.d_model**-0.5)
            self.position_table = nnx.Param(
                init(rngs.params(), (config.max_len, config.d_model), config.params_dtype)
            )

    def __call__(self, ids, positions, *, dropout_rng=None) -> jax.Array:
        """``ids [B, T]``, ``positions [B, T]`` -> ``[B, T, D]``."""
        x = self.tokens(ids)  # [B, T, D]
        if self.positional in ("sinusoidal", "sinusoidal_split"):
            pe = ops.sinusoidal_encoding(positions, self.d_model,
                                         split=self.positional == "sinusoidal_split")
            x = x + pe.astype(self.dtype)
        elif self.positional == "learned":
            table = self.position_table[...].astype(self.dtype)  # [max_len, D]
            x = x + jnp.take(table, positions, axis=0)
        return dropout(x, self.dropout_rate, dropout_rng)


class OutputProjection(nnx.Module):
    """Final ``[B, T, D]`` -> float32 logits ``[B, T, V]``: tied to ``tokens`` or a Dense layer,
    plus a ``[V]`` ``logits_bias`` when ``config.final_logits_bias`` (initialised to zeros)."""

    def __init__(self, config: ModelConfig, tokens: TokenEmbedding, *, rngs: nnx.Rngs):
        self.tie = config.tie_output
        self.dtype = config.compute_dtype
        if config.final_logits_bias:
            self.logits_bias = nnx.Param(jnp.zeros((config.vocab_size,), config.params_dtype))
        if self.tie:
            self.tokens = tokens
        else:
            self.dense = nnx.Linear(
                config.d_model,
                config.vocab_size,
                use_bias=config.use_bias and not config.final_logits_bias,
                dtype=config.compute_dtype,
                param_dtype=config.params_dtype,
                kernel_init=logical_init(
                    jax.nn.initializers.xavier_uniform(), ("embed", "vocab")),
                bias_init=logical_init(nnx.initializers.zeros_init(), ("vocab",)),
                rngs=rngs,
            )

    def weights(self) -> tuple[jax.Array, jax.Array | None]:
        """``(kernel [D, V] in the compute dtype, bias [V] float32 or None)`` with
        ``self(x) == einsum(x, kernel, preferred_element_type=float32) + bias``."""
        if self.tie:
            kernel = self.tokens.embed.embedding[...].astype(self.dtype).T  # [D, V]
        else:
            kernel = self.dense.kernel[...].astype(self.dtype)  # [D, V]
        bias = None
        if hasattr(self, "logits_bias"):
            bias = self.logits_bias[...].astype(jnp.float32)
        elif not self.tie and self.dense.bias is not None:
            bias = self.dense.bias[...].astype(jnp.float32)
        return kernel, bias

    def __call__(self, x) -> jax.Array:
        int8 = getattr(self, "kernel" + INT8_SUFFIX, None)
        # after nn.int8.quantize_int8, with rows enough for the int8 matmul; fewer rows take
        # the float path below over the dequantised table, untransposed (docs/decoding.md)
        if int8 is not None and int8.uses_int8(x):
            kernel, bias = self.weights()
            logits = int8(x.astype(self.dtype), kernel, dtype=jnp.float32)  # [B, T, V]
            return logits if bias is None else logits + bias
        logits = self.tokens.attend(x) if self.tie else self._dense(x)  # [B, T, V]
        if hasattr(self, "logits_bias"):
            logits = logits + self.logits_bias[...].astype(jnp.float32)
        return logits

    def quantize_int8(self, *, min_rows: int) -> None:
        """int8 weights for the projection (``nn.int8.quantize_int8``); a tied table is
        quantised per row (per output logit), which its look-ups then read."""
        param = self.tokens.embed.embedding if self.tie else self.dense.kernel
        d_model = param[...].shape[1 if self.tie else 0]
        setattr(self, "kernel" + INT8_SUFFIX,
                quantize_weight(param, d_model, transpose=self.tie, min_rows=min_rows))

    def _dense(self, x) -> jax.Array:
        kernel = self.dense.kernel[...].astype(self.dtype)  # [D, V]
        logits = jnp.einsum(
            "BTD,DV->BTV", x.astype(self.dtype), kernel, preferred_element_type=jnp.float32
        )
        if self.dense.bias is not None:
            logits = logits + self.dense.bias[...].astype(jnp.float32)
        return logits


class RelativePositionBias(nnx.Module):
    """T5's relative position bias for one stack: a learned ``[num_buckets, N]`` table shared
    by all its self-attention layers (``ops.relative_position_bias``).

    Args:
      config: the model config (``relative_num_buckets``, ``relative_max_distance``, N).
      bidirectional: True in the encoder, False in a causal decoder.
      rngs: ``nnx.Rngs`` (``params`` stream).
    """

    def __init__(self, config: ModelConfig, *, bidirectional: bool, rngs: nnx.Rngs):
        self.bidirectional = bidirectional
        self.max_distance = config.relative_max_distance
        init = jax.nn.initializers.variance_scaling(1.0, "fan_avg", "uniform")  # as T5X
        shape = (config.relative_num_buckets, config.num_heads)
        self.table = nnx.Param(init(rngs.params(), shape, config.params_dtype))

    def bias_fn(self):
        """``f(q_positions [b, T], k_positions [b, S]) -> float32 [b, N, T, S]``, a pure
        function of the table's current value (safe to close over under ``nnx.remat``)."""
        return functools.partial(ops.relative_position_bias,
                                 self.table[...].astype(jnp.float32),
                                 bidirectional=self.bidirectional, max_distance=self.max_distance)
