"""int8 weights for decoding: the module that takes a projection's place, and the call that
quantises a built model.

``quantize_int8(model)`` gives every projection of the model (attention "query", "key",
"value", "out"; feed-forward "wi", "wo"; the output projection, tied to the embedding table
or not) an ``Int8Dense`` beside its weight, under the weight's name plus ``_int8``
(``.../self_attention/query_int8/q``), in the slot a LoRA adapter uses (``nn.lora``): the
layer calls it as ``adapter(x, w)`` with its ``[D_in, D_out]`` weight. The weight itself is
replaced by its dequantised value ``q * scale``, so the model computes with int8 weights
everywhere; a tied embedding table is quantised per row as the output projection, so the
look-ups read the int8 values too (CTranslate2's int8 quantises every weight, embeddings
included). Untied embedding tables stay as they are (a look-up has no matmul to speed up).

``Int8Dense(x, w)`` picks its path statically, from the rows of ``x`` (the product of its
leading axes, known when the program is traced): ``min_rows`` rows or more quantise ``x`` per
row and run the int8 x int8 -> int32 matmul (``ops.int8_matmul``); fewer rows multiply by the
dequantised float ``w``, because on XLA:CPU the int8 dot loses to the float one for a handful
of rows (docs/decoding.md, "int8"). In a decoding step the rows are the batch (times the beam),
in the encoder the batch times the source length.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from transformer_jax import ops
from transformer_jax.nn.lora import is_adapter

__all__ = ["INT8_SUFFIX", "MIN_ROWS", "Int8Dense", "QUANTIZE_MODES", "quantize_int8",
           "quantize_weight"]

INT8_SUFFIX = "_int8"
MIN_ROWS = 16  # fewer rows: the dequantised float weight (measured, docs/decoding.md)
QUANTIZE_MODES = ("int8",)


class Int8Dense(nnx.Module):
    """A ``[D_in, D_out]`` weight as int8 ``q`` with float32 per-output-channel ``scale``.

    Args:
      q: int8 ``[D_in, D_out]``; scale: float32 ``[D_out]`` (``ops.quantize_per_channel``).
      min_rows: rows of ``x`` from which the int8 matmul is used.
    """

    def __init__(self, q, scale, *, min_rows: int = MIN_ROWS):
        self.q = nnx.Param(jnp.asarray(q, jnp.int8))
        self.scale = nnx.Param(jnp.asarray(scale, jnp.float32))
        self.min_rows = int(min_rows)

    def uses_int8(self, x) -> bool:
        """Whether ``x [..., D_in]`` has the rows (``min_rows`` or more) for the int8 matmul;
        known when the program is traced."""
        return math.prod(x.shape[:-1]) >= self.min_rows

    def __call__(self, x, w, *, dtype=None) -> jax.Array:
        """``x [..., D_in]`` -> ``[..., D_out]`` in ``dtype`` (default ``x``'s); ``w [D_in,
        D_out]`` is the dequantised weight, used below ``min_rows`` rows."""
        dtype = x.dtype if dtype is None else dtype
        if not self.uses_int8(x):
            return jnp.einsum("...i,io->...o", x, w.astype(x.dtype),
                              preferred_element_type=jnp.float32).astype(dtype)
        return ops.int8_matmul(x, self.q[...], self.scale[...], dtype=dtype)


def quantize_weight(param: nnx.Variable, d_in: int, *, transpose: bool = False,
                    min_rows: int = MIN_ROWS) -> Int8Dense:
    """Quantises the weight held by ``param`` as ``[d_in, D_out]`` (its leading axes up to
    ``d_in`` are the input; ``transpose``: ``param`` holds ``[D_out, d_in]``, an embedding
    table used as an output projection) and stores its dequantised value back in ``param``.
    Returns the ``Int8Dense`` of the layer's ``adapter(x, w)`` slot."""
    value = param[...]
    w = value.T if transpose else value.reshape(d_in, -1)  # [D_in, D_out]
    q, scale = ops.quantize_per_channel(w)
    restored = ops.dequantize(q, scale, value.dtype)  # [D_in, D_out]
    param[...] = restored.T if transpose else restored.reshape(value.shape)
    return Int8Dense(q, scale, min_rows=min_rows)


def quantize_int8(model: nnx.Module, *, min_rows: int = MIN_ROWS) -> nnx.Module:
    """Gives every projection of ``model`` int8 weights, in place (see the module
    docstring); returns ``model``. Each module with projections does its own part
    (``quantize_int8`` methods of ``FeedForward``, ``MultiHeadAttention`` and
    ``OutputProjection``); a shared embedding table is quantised once.

    Raises:
      ValueError: the model has LoRA adapters (merge them first: ``nn.adapters.merge_lora``)
        or is already quantised.
    """
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    paths = [path for path, _ in jax.tree_util.tree_leaves_with_path(params)]
    if any(is_adapter(path) for path in paths):
        raise ValueError("the model has LoRA adapters; fold them into its weights first "
                         "(nn.adapters.merge_lora), then quantise.")
    if any(INT8_SUFFIX in jax.tree_util.keystr(path) for path in paths):
        raise ValueError("the model is already quantised; quantise the float model once.")
    for _, module in list(nnx.iter_modules(model)):  # shared modules are visited once
        method = getattr(module, "quantize_int8", None)
        if method is not None:
            method(min_rows=min_rows)
    return model
