"""Feed-forward, LayerNorm, the residual wrapper, embeddings and shift_right against numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from transformer_jax import ops
from transformer_jax.config import ModelConfig
from transformer_jax.nn import (
    FeedForward,
    InputEmbedding,
    LayerNorm,
    OutputProjection,
    Residual,
    TokenEmbedding,
    shift_right,
)
from transformer_jax.ops import dropout

CFG = ModelConfig.tiny(vocab_size=20, d_model=8, num_heads=2, d_ff=12, max_len=10)


def _x(shape=(2, 3, 8), seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _np_layer_norm(x, scale, bias, eps=1e-6):
    x = np.asarray(x, np.float64)
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * scale + bias


def test_layer_norm_matches_numpy_and_runs_in_float32():
    norm = LayerNorm(CFG, rngs=nnx.Rngs(0))
    norm.norm.scale[...] = jnp.linspace(0.5, 1.5, 8)
    norm.norm.bias[...] = jnp.linspace(-1, 1, 8)
    x = _x() * 3 + 1
    np.testing.assert_allclose(
        norm(x), _np_layer_norm(x, norm.norm.scale[...], norm.norm.bias[...]), atol=1e-5
    )
    bf16 = LayerNorm(CFG.replace(dtype="bfloat16"), rngs=nnx.Rngs(0))
    assert bf16(x.astype(jnp.bfloat16)).dtype == jnp.bfloat16


def test_feed_forward_matches_numpy():
    ff = FeedForward(CFG, rngs=nnx.Rngs(0))
    ff.wi.bias[...] = jnp.linspace(-1, 1, 12)
    ff.wo.bias[...] = jnp.linspace(-1, 1, 8)
    x = _x()
    w1, b1 = np.asarray(ff.wi.kernel[...]), np.asarray(ff.wi.bias[...])
    w2, b2 = np.asarray(ff.wo.kernel[...]), np.asarray(ff.wo.bias[...])
    ref = np.maximum(np.asarray(x) @ w1 + b1, 0.0) @ w2 + b2
    np.testing.assert_allclose(ff(x), ref, atol=1e-5)
    assert ff.wi.kernel.shape == (8, 12) and ff.wo.kernel.shape == (12, 8)


def test_feed_forward_activation_dropout_only_when_configured():
    x = _x()
    plain = FeedForward(CFG, rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(plain(x, dropout_rng=jax.random.key(0)), plain(x))
    drop = FeedForward(CFG.replace(ff_dropout_rate=0.5), rngs=nnx.Rngs(0))
    assert not np.allclose(drop(x, dropout_rng=jax.random.key(0)), drop(x))


@pytest.mark.parametrize("pre_norm", [False, True])
def test_residual_wrapper_post_and_pre_norm(pre_norm):
    res = Residual(CFG.replace(pre_norm=pre_norm), rngs=nnx.Rngs(0))
    res.norm.norm.scale[...] = jnp.linspace(0.5, 1.5, 8)
    scale, bias = np.asarray(res.norm.norm.scale[...]), np.zeros(8)
    x = _x()
    seen = {}

    def fn(h, *, dropout_rng):
        seen["input"], seen["rng"] = h, dropout_rng
        return 2.0 * h + 1.0, "aux"

    out, aux = res(x, fn)
    xn = np.asarray(x, np.float64)
    if pre_norm:  # x + f(LN(x))
        ref = xn + 2.0 * _np_layer_norm(xn, scale, bias) + 1.0
    else:  # LN(x + f(x))
        ref = _np_layer_norm(xn + 2.0 * xn + 1.0, scale, bias)
    assert aux == "aux" and seen["rng"] is None
    np.testing.assert_allclose(out, ref, atol=1e-5)


def test_residual_dropout_uses_folded_keys():
    res = Residual(CFG.replace(dropout_rate=0.5), rngs=nnx.Rngs(0))
    x = _x()
    key = jax.random.key(3)
    seen = {}

    def fn(h, *, dropout_rng):
        seen["rng"] = dropout_rng
        return jnp.ones_like(h), None

    out, _ = res(x, fn, dropout_rng=key)
    assert jnp.array_equal(
        jax.random.key_data(seen["rng"]), jax.random.key_data(jax.random.fold_in(key, 1))
    )
    kept = ops.keep_mask(jax.random.fold_in(key, 0), 0.5, x.shape)  # 16-bit masks (ops/dropout)
    ref = res.norm(x + jnp.where(kept, 2.0, 0.0))
    np.testing.assert_allclose(out, ref, atol=1e-6)


def test_dropout_helper():
    x = jnp.ones((1000,))
    assert dropout(x, 0.3, None) is x and dropout(x, 0.0, jax.random.key(0)) is x
    y = np.asarray(dropout(x, 0.25, jax.random.key(0)))
    np.testing.assert_allclose(np.unique(y), [0.0, 1.0 / 0.75], rtol=1e-6)
    assert 0.2 < (y == 0).mean() < 0.3


def test_token_embedding_scale_and_tied_logits():
    tokens = TokenEmbedding(CFG, rngs=nnx.Rngs(0))
    table = np.asarray(tokens.embed.embedding[...])
    ids = jnp.array([[1, 5, 0], [19, 2, 2]])
    np.testing.assert_allclose(tokens(ids), table[np.asarray(ids)] * np.sqrt(8), rtol=1e-6)
    x = _x()
    np.testing.assert_allclose(tokens.attend(x), np.asarray(x) @ table.T, atol=1e-5)
    out = OutputProjection(CFG, tokens, rngs=nnx.Rngs(0))
    assert out(x).dtype == jnp.float32
    np.testing.assert_allclose(out(x), np.asarray(x) @ table.T, atol=1e-5)


def test_untied_output_projection_is_a_dense_layer():
    cfg = CFG.replace(tie_output=False)
    tokens = TokenEmbedding(cfg, rngs=nnx.Rngs(0))
    out = OutputProjection(cfg, tokens, rngs=nnx.Rngs(1))
    out.dense.bias[...] = jnp.linspace(-1, 1, 20)
    x = _x()
    ref = np.asarray(x) @ np.asarray(out.dense.kernel[...]) + np.asarray(out.dense.bias[...])
    np.testing.assert_allclose(out(x), ref, atol=1e-5)


@pytest.mark.parametrize("positional", ["sinusoidal", "learned", "rope", "alibi"])
def test_input_embedding_positional_terms(positional):
    cfg = CFG.replace(positional=positional, dropout_rate=0.0)
    tokens = TokenEmbedding(cfg, rngs=nnx.Rngs(0))
    emb = InputEmbedding(cfg, tokens, rngs=nnx.Rngs(1))
    ids = jnp.array([[3, 4, 5, 6]])
    positions = jnp.array([[0, 1, 0, 2]])
    got = np.asarray(emb(ids, positions))
    scaled = np.asarray(tokens(ids))
    if positional == "sinusoidal":
        expected = scaled + np.asarray(ops.sinusoidal_encoding(positions, 8))
    elif positional == "learned":
        assert emb.position_table.shape == (10, 8)
        expected = scaled + np.asarray(emb.position_table[...])[np.asarray(positions)]
    else:  # rope and alibi act inside attention
        expected = scaled
    np.testing.assert_allclose(got, expected, atol=1e-6)


def _shift_right_loop(targets, segments):
    out = np.zeros_like(targets)
    for b in range(targets.shape[0]):
        for t in range(1, targets.shape[1]):
            starts_segment = segments is not None and segments[b, t] != segments[b, t - 1]
            out[b, t] = 0 if starts_segment else targets[b, t - 1]
    return out


def test_shift_right_plain_and_packed():
    targets = np.array([[5, 6, 7, 1, 0, 0], [8, 1, 9, 10, 1, 0]])
    segments = np.array([[1, 1, 1, 1, 0, 0], [1, 1, 2, 2, 2, 0]])
    np.testing.assert_array_equal(shift_right(targets), [[0, 5, 6, 7, 1, 0], [0, 8, 1, 9, 10, 1]])
    np.testing.assert_array_equal(shift_right(targets), _shift_right_loop(targets, None))
    packed = np.asarray(shift_right(targets, segments))
    np.testing.assert_array_equal(packed, [[0, 5, 6, 7, 0, 0], [0, 8, 0, 9, 10, 0]])
    np.testing.assert_array_equal(packed, _shift_right_loop(targets, segments))
    with pytest.raises(ValueError, match="must have the shape of targets"):
        shift_right(targets, segments[:, :3])
