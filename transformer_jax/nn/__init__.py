"""Flax NNX modules of the Transformer, composed from ``transformer_jax.ops``.

Main entry points: ``Transformer`` (encoder-decoder), ``DecoderOnlyLM``, ``build_model(kind,
config, rngs)`` (either, by name), ``split_model`` / ``ModelDef``, ``shift_right``, the model
protocol ``Model`` (``nn.model``: ``model(batch)``, ``hidden`` / ``logits``,
``init_decoding`` / ``decode``) and the building blocks ``MultiHeadAttention``,
``FeedForward``, ``Residual``, ``TransformerLayer`` (``EncoderLayer``, ``DecoderLayer``);
``quantize_int8(model)`` gives a built model int8 weights for decoding (``nn.int8``). All
modules work as pure functions of ``split_model(model)`` under ``jax.jit``::

    model_def, params = split_model(model)

    @jax.jit
    def forward(params, batch, rng):
        return model_def.merge(params)(batch, dropout_rng=rng)   # [B, T, V]
"""

from transformer_jax.nn.attention import MultiHeadAttention
from transformer_jax.nn.build import (
    DEFAULT_MODEL_KIND,
    MODEL_KINDS,
    ModelDef,
    abstract_model,
    abstract_params,
    build_model,
    model_class,
    split_model,
)
from transformer_jax.nn.embeddings import InputEmbedding, OutputProjection, TokenEmbedding
from transformer_jax.nn.int8 import QUANTIZE_MODES, Int8Dense, quantize_int8
from transformer_jax.nn.layers import (
    DecoderLayer,
    EncoderLayer,
    FeedForward,
    LayerNorm,
    Residual,
    TransformerLayer,
)
from transformer_jax.nn.lm import DecoderOnlyLM
from transformer_jax.nn.model import Model, shift_right
from transformer_jax.nn.partitioning import logical_specs
from transformer_jax.nn.stacks import Decoder, Encoder
from transformer_jax.nn.transformer import Transformer

__all__ = [
    "DEFAULT_MODEL_KIND",
    "MODEL_KINDS",
    "QUANTIZE_MODES",
    "Model",
    "ModelDef",
    "abstract_model",
    "abstract_params",
    "build_model",
    "logical_specs",
    "model_class",
    "quantize_int8",
    "split_model",
    "Decoder",
    "DecoderLayer",
    "DecoderOnlyLM",
    "Encoder",
    "EncoderLayer",
    "FeedForward",
    "InputEmbedding",
    "Int8Dense",
    "LayerNorm",
    "MultiHeadAttention",
    "OutputProjection",
    "Residual",
    "TokenEmbedding",
    "Transformer",
    "TransformerLayer",
    "shift_right",
]
