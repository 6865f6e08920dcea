"""Building models by kind, and splitting them into a static definition and a params dict.

The model kinds share one entry point, so no caller writes the "Transformer or
DecoderOnlyLM" choice out itself, and every model answers the same calls (``nn.model``)::

    model = build_model("encoder_decoder", config, rngs=nnx.Rngs(0))
    model_def, params = split_model(model)     # static part, nested dict of arrays
    model = model_def.merge(params)             # and back (inside jax.jit too)
    shapes = abstract_params("decoder_only", config)   # ShapeDtypeStructs, nothing allocated
    model = abstract_model("encoder_decoder", config)  # the module, ShapeDtypeStruct values
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
from flax import nnx

from transformer_jax.config import ModelConfig
from transformer_jax.nn.lm import DecoderOnlyLM
from transformer_jax.nn.model import Model
from transformer_jax.nn.transformer import Transformer

__all__ = ["DEFAULT_MODEL_KIND", "MODEL_KINDS", "ModelDef", "abstract_model", "abstract_params",
           "build_model", "model_class", "split_model"]

MODEL_CLASSES = {"encoder_decoder": Transformer, "decoder_only": DecoderOnlyLM}
MODEL_KINDS = tuple(MODEL_CLASSES)
DEFAULT_MODEL_KIND = "encoder_decoder"  # the training default; also checkpoints without one


def _config(config: ModelConfig | Mapping) -> ModelConfig:
    return ModelConfig.from_dict(dict(config)) if isinstance(config, Mapping) else config


def model_class(kind: str) -> type[Model]:
    """The class of model ``kind`` (one of ``MODEL_KINDS``): its ``batch_keys`` and
    ``translates`` describe the kind without building a model."""
    if kind not in MODEL_CLASSES:
        raise ValueError(f"model kind {kind!r} is unknown; choose {' or '.join(MODEL_KINDS)}.")
    return MODEL_CLASSES[kind]


def build_model(kind: str, config: ModelConfig | Mapping, rngs: nnx.Rngs) -> Model:
    """``Transformer`` for ``kind="encoder_decoder"``, ``DecoderOnlyLM`` for "decoder_only".

    Args:
      kind: one of ``MODEL_KINDS``.
      config: a ``ModelConfig`` or its dict (``ModelConfig.to_dict()``).
      rngs: ``nnx.Rngs`` for the parameter initialisers.
    """
    return model_class(kind)(_config(config), rngs=rngs)


class _OneKeyStream(nnx.RngStream):
    """An RNG stream that hands out its key without counting: the values of an abstract
    model are never computed, and bumping a traced counter makes flax look up a tracer's
    ``sharding``, whose error message jax builds over the whole trace (quadratic)."""

    def __call__(self) -> jax.Array:
        return self.key[...]


def abstract_model(kind: str, config: ModelConfig | Mapping) -> Model:
    """The model with ``jax.ShapeDtypeStruct`` values (nothing is allocated), for a single
    device: no sharding is attached (``nnx.eval_shape`` adds it under a mesh).

    The model is built once under ``jax.eval_shape`` with an RNG stream that does not count
    (``_OneKeyStream``) and split there; its graph definition is static, so it is taken out
    of the trace as it is and merged with the shapes. For a model of OPUS-MT's size this is
    several times faster than ``nnx.eval_shape``. No module keeps an RNG stream, so the
    result is the model ``nnx.eval_shape`` builds (``tests/nn/test_build.py``)."""
    graphdefs = []

    def build():
        rngs = nnx.Rngs(0)
        rngs.default = _OneKeyStream(jax.random.key(0), tag="default")
        graphdef, state = nnx.split(build_model(kind, config, rngs))
        graphdefs.append(graphdef)
        return state

    state = jax.eval_shape(build)
    return nnx.merge(graphdefs[0], state)


def abstract_params(kind: str, config: ModelConfig | Mapping) -> dict:
    """Params pytree of ``jax.ShapeDtypeStruct`` for a model (nothing is allocated)."""
    return nnx.to_pure_dict(nnx.state(abstract_model(kind, config), nnx.Param))


@dataclasses.dataclass(frozen=True)
class ModelDef:
    """Static part of an ``nnx`` model: its graph definition and non-parameter state.

    Hashable by identity, so it can be bound with ``functools.partial`` into jitted steps.
    """

    graphdef: Any
    rest: Any  # nnx.State of non-Param variables (usually empty)

    def merge(self, params):
        """Rebuild the module from a params pytree (nested dict of arrays)."""
        return nnx.merge(self.graphdef, params, self.rest)

    __hash__ = object.__hash__
    __eq__ = object.__eq__


def split_model(model: nnx.Module) -> tuple[ModelDef, dict]:
    """``model -> (ModelDef, params)`` with params as a plain nested dict of arrays."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return ModelDef(graphdef, rest), nnx.to_pure_dict(params)
