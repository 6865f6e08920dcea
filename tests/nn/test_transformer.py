"""Model-level invariances of Transformer and DecoderOnlyLM for every positional kind:
padding does not change real outputs, future tokens do not change earlier logits, cached
decoding equals the full pass (post- and pre-LN, "xla" and "chunked"); KV cache overflow;
beam search over a beam decoding cache."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from transformer_jax import decoding
from transformer_jax.config import ModelConfig
from transformer_jax.nn import DecoderOnlyLM, MultiHeadAttention, Transformer, shift_right

KINDS = ["sinusoidal", "learned", "rope", "alibi"]
V, T, S = 23, 6, 5


def _model(cls, positional, impl="xla", pre_norm=False):
    config = ModelConfig(vocab_size=V, d_model=16, num_heads=2, num_layers=2, d_ff=32,
                         dropout_rate=0.0, max_len=16, positional=positional, pre_norm=pre_norm,
                         attention_impl=impl, attention_chunk_size=2)
    return cls(config, rngs=nnx.Rngs(3))


def _ids(seed, b, n):
    return jnp.asarray(np.random.default_rng(seed).integers(3, V, (b, n)), jnp.int32)


@pytest.mark.parametrize("positional", KINDS)
def test_source_padding_does_not_change_outputs(positional):
    model = _model(Transformer, positional, impl="chunked")
    src, tgt = _ids(0, 2, S), _ids(1, 2, T)
    padded = jnp.concatenate([src, jnp.zeros((2, 4), jnp.int32)], axis=1)  # 4 PAD tokens
    np.testing.assert_allclose(model({"inputs": padded, "targets": tgt}),
                               model({"inputs": src, "targets": tgt}), atol=1e-5)
    encoded = model.encode(padded)
    np.testing.assert_allclose(encoded[:, :S], model.encode(src), atol=1e-5)


@pytest.mark.parametrize("positional", KINDS)
def test_future_tokens_do_not_change_earlier_logits(positional):
    src = _ids(2, 2, S)
    for model, call in ((_model(Transformer, positional),
                         lambda m, t: m({"inputs": src, "targets": t})),
                        (_model(DecoderOnlyLM, positional, impl="chunked"),
                         lambda m, t: m({"targets": t}))):
        tgt = _ids(3, 2, T)
        changed = tgt.at[:, 3:].set(_ids(4, 2, T - 3))
        a, b = call(model, tgt), call(model, changed)
        # logits t read targets before t (the decoder input is shift_right(targets))
        np.testing.assert_allclose(a[:, :4], b[:, :4], atol=1e-5)
        assert np.abs(np.asarray(a[:, 4:] - b[:, 4:])).max() > 1e-3  # the change is seen


@pytest.mark.parametrize("positional, pre_norm, impl", [
    *[(kind, False, "xla") for kind in KINDS], ("alibi", True, "chunked"),
    ("sinusoidal", True, "xla"), ("rope", False, "chunked")])
def test_cached_decoding_equals_the_full_pass(positional, pre_norm, impl):
    model = _model(Transformer, positional, impl, pre_norm)
    src = _ids(5, 2, S).at[1, 3:].set(0)  # row 1 padded
    tgt = _ids(6, 2, T)
    full = model({"inputs": src, "targets": tgt})  # [B, T, V]
    tgt_in = shift_right(tgt)
    cache = model.init_cache(2, 8, encoded=model.encode(src), src_ids=src)
    step = jax.jit(lambda ids, c: model.decode(ids, cache=c))
    got = []
    for t in range(T):
        logits, cache = step(tgt_in[:, t : t + 1], cache)
        got.append(logits)
    np.testing.assert_allclose(jnp.concatenate(got, axis=1), full, atol=2e-5)
    # init_decoding builds the same cache from the source alone
    cache, start = model.init_decoding(src, 8)
    np.testing.assert_array_equal(start, [0, 0])
    first, _ = model.decode(start[:, None], cache=cache)
    np.testing.assert_allclose(first[:, 0], full[:, 0], atol=2e-5)


@pytest.mark.parametrize("cls", [Transformer, DecoderOnlyLM])
def test_hidden_and_logits_compose_to_the_call(cls):
    model = _model(cls, "sinusoidal")
    batch = {"inputs": _ids(7, 2, S), "targets": _ids(8, 2, T)}
    hidden = model.hidden(batch)
    assert hidden.shape == (2, T, 16)
    np.testing.assert_array_equal(model.logits(hidden), model(batch))
    # the projection works on any piece of the positions (a chunked loss relies on it)
    np.testing.assert_allclose(model.logits(hidden[:, 2:4]), model(batch)[:, 2:4], atol=1e-6)


def test_lm_prompt_through_init_decoding_equals_the_full_pass():
    model = _model(DecoderOnlyLM, "rope")
    tgt = _ids(9, 2, T)
    full = model({"targets": tgt})  # [B, T, V]: position t predicts tgt[:, t]
    cache, start = model.init_decoding(tgt[:, :3], 4)  # prompt of 3 tokens
    prompt_cache = cache
    np.testing.assert_array_equal(start, tgt[:, 2])
    logits, cache = model.decode(start[:, None], cache=cache)  # predicts tgt[:, 3]
    np.testing.assert_allclose(logits[:, 0], full[:, 3], atol=2e-5)
    logits, _ = model.decode(tgt[:, 3:4], cache=cache)
    np.testing.assert_allclose(logits[:, 0], full[:, 4], atol=2e-5)
    # for a beam search: every row of the prompt's cache repeated, once per beam
    beams, start = model.init_decoding(tgt[:, :3], 4, beams=2)
    np.testing.assert_array_equal(start, tgt[:, 2])
    layer, ref = beams["layers"][0]["self"], prompt_cache["layers"][0]["self"]
    np.testing.assert_array_equal(layer["key"], jnp.repeat(ref["key"], 2, 0))
    assert int(layer["index"]) == 3


def test_kv_cache_overflow_raises_eagerly_and_poisons_under_jit():
    module = MultiHeadAttention(8, 2, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (1, 5, 8))
    cache = module.init_cache(1, 3)
    for t in range(3):
        _, cache, _ = module(x[:, t : t + 1], cache=cache)
    with pytest.raises(ValueError, match="position 3 overflows the KV cache of length 3"):
        module(x[:, 3:4], cache=cache)
    step = jax.jit(lambda x_t, c: module(x_t, cache=c)[:2])
    cache, outs = module.init_cache(1, 3), []
    for t in range(5):
        out, cache = step(x[:, t : t + 1], cache)
        outs.append(np.asarray(out))
    assert all(np.isfinite(o).all() for o in outs[:3])
    assert all(np.isnan(o).all() for o in outs[3:])


@pytest.mark.parametrize("positional", ["rope", "alibi"])
def test_beam_search_over_a_beam_decoding_cache_equals_the_expanded_cache(positional):
    # init_decoding(beams=K): beam caches (ALiBi: rows repeated K times) and cross keys one
    # per example; the search over it equals the search that expands the B-row cache.
    model = _model(Transformer, positional)
    src = _ids(10, 2, S).at[1, 3:].set(0)

    def fn(ids, cache):
        logits, cache = model.decode(ids, cache=cache)
        return logits[:, 0], cache

    @functools.partial(jax.jit, static_argnames="beams")
    def search(src, beams):
        cache, start = model.init_decoding(src, 6, beams=beams)
        return decoding.beam_search(cache, fn, batch_size=2, beam_size=3, max_len=6,
                                    start_ids=start, beam_cache=beams > 1)

    (seqs, scores), (ref_seqs, ref_scores) = search(src, 3), search(src, 1)
    np.testing.assert_array_equal(seqs, ref_seqs)
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-5)
