"""nn.build: models by kind name, abstract params, and the split into (ModelDef, params)."""

import jax
import numpy as np
import pytest
from flax import nnx
from helpers import tiny_config

from transformer_jax.nn import (
    DecoderOnlyLM,
    Transformer,
    abstract_model,
    abstract_params,
    build_model,
    model_class,
    split_model,
)


@pytest.mark.parametrize("kind, cls", [("encoder_decoder", Transformer),
                                       ("decoder_only", DecoderOnlyLM)])
def test_build_model_by_kind_and_back(kind, cls):
    model = build_model(kind, tiny_config(), nnx.Rngs(0))
    assert type(model) is cls and model_class(kind) is cls
    # A config dict builds the same parameters as the dataclass.
    same = build_model(kind, tiny_config().to_dict(), nnx.Rngs(0))
    _, a = split_model(model)
    _, b = split_model(same)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


def test_abstract_params_have_the_shapes_of_the_real_ones():
    _, params = split_model(build_model("decoder_only", tiny_config(), nnx.Rngs(0)))
    shapes = abstract_params("decoder_only", tiny_config())
    assert jax.tree_util.tree_structure(shapes) == jax.tree_util.tree_structure(params)
    for s, p in zip(jax.tree_util.tree_leaves(shapes), jax.tree_util.tree_leaves(params),
                    strict=True):
        assert isinstance(s, jax.ShapeDtypeStruct) and (s.shape, s.dtype) == (p.shape, p.dtype)


@pytest.mark.parametrize("kind, overrides", [
    ("encoder_decoder", {}),
    ("encoder_decoder", {"lora_rank": 2, "dropout_rate": 0.1, "share_embeddings": False}),
    ("decoder_only", {"num_kv_heads": 1}),
])
def test_abstract_model_is_the_one_nnx_eval_shape_builds(kind, overrides):
    config = tiny_config(**overrides)
    ours = abstract_model(kind, config)
    theirs = nnx.eval_shape(lambda: build_model(kind, config, nnx.Rngs(0)))
    (graph_a, state_a), (graph_b, state_b) = nnx.split(ours), nnx.split(theirs)
    assert graph_a == graph_b and type(ours) is type(theirs)
    assert (jax.tree_util.tree_structure(state_a) == jax.tree_util.tree_structure(state_b))
    for a, b in zip(jax.tree_util.tree_leaves(state_a), jax.tree_util.tree_leaves(state_b),
                    strict=True):
        assert isinstance(a, jax.ShapeDtypeStruct) and (a.shape, a.dtype) == (b.shape, b.dtype)


def test_split_model_round_trip_gives_the_same_logits():
    model = build_model("encoder_decoder", tiny_config(), nnx.Rngs(0))
    model_def, params = split_model(model)
    batch = {"inputs": np.array([[5, 6, 1, 0]]), "targets": np.array([[7, 8, 1]])}
    np.testing.assert_array_equal(model_def.merge(params)(batch), model(batch))


def test_unknown_kind_is_one_sentence():
    with pytest.raises(ValueError, match="model kind 'encoder' is unknown; choose "
                                         "encoder_decoder or decoder_only"):
        build_model("encoder", tiny_config(), nnx.Rngs(0))
    with pytest.raises(ValueError, match="model kind 'lm' is unknown"):
        model_class("lm")


def test_the_kinds_describe_their_batches():
    assert Transformer.batch_keys == ("inputs", "targets") and Transformer.translates
    assert DecoderOnlyLM.batch_keys == ("targets",) and not DecoderOnlyLM.translates
