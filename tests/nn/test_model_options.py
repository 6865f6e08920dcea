"""ModelConfig options beyond the paper (used by Marian models): activation, positions in the
split layout, unscaled embeddings, final logits bias, pad never predicted by search."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from transformer_jax import decoding, ops
from transformer_jax.config import ACTIVATIONS, ModelConfig
from transformer_jax.nn import (
    FeedForward,
    InputEmbedding,
    OutputProjection,
    TokenEmbedding,
    Transformer,
)
from transformer_jax.param_count import count_params

CFG = ModelConfig(vocab_size=20, d_model=8, num_heads=2, num_layers=1, d_ff=16, max_len=10,
                  dropout_rate=0.0)

_REF = {  # numpy references, written from the formulas
    "relu": lambda x: np.maximum(x, 0),
    "gelu": np.vectorize(lambda v: 0.5 * v * (1 + math.erf(v / math.sqrt(2)))),
    "gelu_tanh": lambda x: 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3))),
    "quick_gelu": lambda x: x / (1 + np.exp(-1.702 * x)),
    "silu": lambda x: x / (1 + np.exp(-x)),
    "tanh": np.tanh,
    "sigmoid": lambda x: 1 / (1 + np.exp(-x)),
    "mish": lambda x: x * np.tanh(np.log1p(np.exp(x))),
    "relu6": lambda x: np.clip(x, 0, 6),
}


def test_activation_names_all_implemented():
    assert set(ACTIVATIONS) == set(_REF)


@pytest.mark.parametrize("name", ACTIVATIONS)
def test_feed_forward_activation(name):
    ff = FeedForward(CFG.replace(activation=name), rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 3, 8)) * 3
    w1, b1 = np.asarray(ff.wi.kernel[...]), np.asarray(ff.wi.bias[...])
    w2, b2 = np.asarray(ff.wo.kernel[...]), np.asarray(ff.wo.bias[...])
    ref = _REF[name](np.asarray(x) @ w1 + b1) @ w2 + b2
    np.testing.assert_allclose(ff(x), ref, atol=2e-5)


def test_bad_options_are_one_sentence():
    with pytest.raises(ValueError, match=r"activation='swiglu' is unknown; use one of"):
        CFG.replace(activation="swiglu")
    with pytest.raises(ValueError, match="scale_embedding=1 must be True or False"):
        CFG.replace(scale_embedding=1)
    with pytest.raises(ValueError, match="positional='sinusoidal_split' needs an even d_model"):
        ModelConfig(d_model=9, num_heads=3, positional="sinusoidal_split")


def test_split_sinusoid_is_marians_table():
    d, positions = 6, np.arange(5)
    got = np.asarray(ops.sinusoidal_encoding(positions, d, split=True))
    for pos in positions:  # transformers' MarianSinusoidalPositionalEmbedding, loop form
        angles = [pos / 10000 ** (2 * (j // 2) / d) for j in range(d)]
        want = [math.sin(a) for a in angles[0::2]] + [math.cos(a) for a in angles[1::2]]
        np.testing.assert_allclose(got[pos], want, atol=1e-6)
    interleaved = np.asarray(ops.sinusoidal_encoding(positions, d))
    np.testing.assert_allclose(got[:, :3], interleaved[:, 0::2], atol=1e-7)


@pytest.mark.parametrize("scale", [True, False])
def test_unscaled_embedding_and_split_positions(scale):
    cfg = CFG.replace(positional="sinusoidal_split", scale_embedding=scale)
    tokens = TokenEmbedding(cfg, rngs=nnx.Rngs(0))
    emb = InputEmbedding(cfg, tokens, rngs=nnx.Rngs(1))
    ids, positions = jnp.array([[3, 4, 5]]), jnp.array([[0, 1, 2]])
    rows = np.asarray(tokens.embed.embedding[...])[np.asarray(ids)]
    pe = np.asarray(ops.sinusoidal_encoding(positions, 8, split=True))
    want = rows * (math.sqrt(8) if scale else 1.0) + pe
    np.testing.assert_allclose(emb(ids, positions), want, atol=1e-6)


@pytest.mark.parametrize("tie", [True, False])
def test_final_logits_bias(tie):
    cfg = CFG.replace(final_logits_bias=True, tie_output=tie)
    tokens = TokenEmbedding(cfg, rngs=nnx.Rngs(0))
    out = OutputProjection(cfg, tokens, rngs=nnx.Rngs(1))
    out.logits_bias[...] = jnp.linspace(-2, 2, 20)
    x = jax.random.normal(jax.random.key(2), (2, 3, 8))
    weight = (np.asarray(tokens.embed.embedding[...]).T if tie
              else np.asarray(out.dense.kernel[...]))
    if not tie:
        assert out.dense.bias is None  # the logits bias replaces the Dense bias
    np.testing.assert_allclose(out(x), np.asarray(x) @ weight + np.linspace(-2, 2, 20),
                               atol=1e-5)


@pytest.mark.parametrize("tie,share", [(True, True), (False, False)])
def test_count_params_with_logits_bias(tie, share):
    cfg = CFG.replace(final_logits_bias=True, tie_output=tie, share_embeddings=share)
    model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    leaves = jax.tree_util.tree_leaves(nnx.state(model, nnx.Param))
    assert count_params(cfg) == sum(int(np.prod(x.shape)) for x in leaves)


def test_search_never_chooses_forbidden_ids():
    logits = jnp.array([[5.0, 1.0, 0.0, 2.0]])  # token 0 always best

    def step(ids, cache):
        return jnp.tile(logits, (ids.shape[0], 1)), cache

    greedy = decoding.greedy_search({}, step, batch_size=1, max_len=3, eos_id=1,
                                    forbid_ids=(0,), pad_id=2)
    np.testing.assert_array_equal(greedy, [[3, 3, 1]])
    beams, _ = decoding.beam_search({}, step, batch_size=1, beam_size=2, max_len=3, eos_id=1,
                                    forbid_ids=(0,), pad_id=2)
    assert 0 not in np.asarray(beams[0, 0]).tolist()


def test_huggingface_length_penalty():
    np.testing.assert_allclose(decoding.length_penalty(4, 0.5, "huggingface"), 2.0)
    np.testing.assert_allclose(decoding.length_penalty(7, 1.0), 2.0)  # GNMT (5+7)/6
    with pytest.raises(ValueError, match="convention='x' is unknown"):
        decoding.beam_search({}, lambda i, c: (jnp.zeros((2, 3)), c), batch_size=1,
                             beam_size=2, max_len=2, convention="x")


def test_decoder_heads_and_width_of_its_own():
    cfg = CFG.replace(num_decoder_heads=4, decoder_d_ff=12)
    model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    enc, dec = model.encoder.layers[0], model.decoder.layers[0]
    assert enc.self_attention.query.shape == (8, 2, 4)  # [D, N, H]
    assert enc.feed_forward.wi.kernel.shape == (8, 16)
    assert dec.cross_attention.query.shape == (8, 4, 2)
    assert dec.feed_forward.wi.kernel.shape == (8, 12)
    leaves = jax.tree_util.tree_leaves(nnx.state(model, nnx.Param))
    assert count_params(cfg) == sum(int(np.prod(x.shape)) for x in leaves)
    with pytest.raises(ValueError, match="not divisible by num_decoder_heads=3"):
        CFG.replace(num_decoder_heads=3)
