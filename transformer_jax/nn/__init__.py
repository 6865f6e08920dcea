"""Flax NNX modules of the Transformer, composed from ``transformer_jax.ops``.

Main entry points: ``Transformer`` (encoder-decoder), ``DecoderOnlyLM``, ``build_model(kind,
config, rngs)`` (either, by name), ``split_model`` / ``ModelDef``, ``shift_right`` and the
building blocks ``MultiHeadAttention``, ``FeedForward``, ``Residual``, ``EncoderLayer``,
``DecoderLayer``. All modules work as pure functions of ``nnx.split(model)`` under ``jax.jit``::

    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, src, tgt_in, rng):
        return nnx.merge(graphdef, state)(src, tgt_in, dropout_rng=rng)
"""

from transformer_jax.nn.attention import MultiHeadAttention
from transformer_jax.nn.build import (
    MODEL_KINDS,
    ModelDef,
    abstract_params,
    build_model,
    model_kind,
    split_model,
)
from transformer_jax.nn.embeddings import InputEmbedding, OutputProjection, TokenEmbedding
from transformer_jax.nn.layers import (
    DecoderLayer,
    EncoderLayer,
    FeedForward,
    LayerNorm,
    Residual,
    TransformerLayer,
    dropout,
)
from transformer_jax.nn.lm import DecoderOnlyLM
from transformer_jax.nn.stacks import Decoder, Encoder
from transformer_jax.nn.transformer import Transformer, shift_right

__all__ = [
    "MODEL_KINDS",
    "ModelDef",
    "abstract_params",
    "build_model",
    "model_kind",
    "split_model",
    "Decoder",
    "DecoderLayer",
    "DecoderOnlyLM",
    "Encoder",
    "EncoderLayer",
    "FeedForward",
    "InputEmbedding",
    "LayerNorm",
    "MultiHeadAttention",
    "OutputProjection",
    "Residual",
    "TokenEmbedding",
    "Transformer",
    "TransformerLayer",
    "dropout",
    "shift_right",
]
