"""Grouped-query heads, sliding windows and T5 relative bias in the modules: against numpy
references written here (repeated key/value heads, explicit band masks, bias tables looked up
by hand), cached decoding against the full pass, parameter counts and cache sizes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from transformer_jax import ops
from transformer_jax.config import ModelConfig
from transformer_jax.nn import MultiHeadAttention, build_model, split_model
from transformer_jax.param_count import count_params

B, T, S, D, N = 2, 5, 7, 16, 4
H = D // N
V = 29


def _softmax(x, mask):
    x = np.where(mask, x, -np.inf)
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _reference(p, xq, xkv, mask, xp=np):
    """Multi-head attention (numpy, or jnp for gradients) with the K key/value heads repeated
    to N."""
    q = xp.einsum("btd,dnh->btnh", xq, p["query"]) + p["query_bias"]
    k = xp.einsum("bsd,dkh->bskh", xkv, p["key"]) + p["key_bias"]
    v = xp.einsum("bsd,dkh->bskh", xkv, p["value"]) + p["value_bias"]
    group = q.shape[2] // k.shape[2]
    k, v = xp.repeat(k, group, axis=2), xp.repeat(v, group, axis=2)  # [B, S, N, H]
    logits = xp.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1])
    logits = xp.where(mask, logits, -1e30)
    weights = xp.exp(logits - logits.max(-1, keepdims=True))
    weights = weights / weights.sum(-1, keepdims=True)
    heads = xp.einsum("bnts,bsnh->btnh", weights, v)
    return xp.einsum("btnh,nhd->btd", heads, p["out"]) + p["out_bias"], weights


def _random_mha(num_kv_heads, impl="xla"):
    module = MultiHeadAttention(D, N, num_kv_heads=num_kv_heads, implementation=impl,
                                chunk_size=4, precision="highest", rngs=nnx.Rngs(0))
    rng = np.random.default_rng(1)
    for name in ("query_bias", "key_bias", "value_bias", "out_bias"):
        param = getattr(module, name)
        param[...] = jnp.asarray(rng.normal(size=param.shape), jnp.float32)
    return module


@pytest.mark.parametrize("num_kv_heads, impl", [(1, "xla"), (2, "chunked"), (2, "jax")])
def test_grouped_query_module_equals_repeated_heads_reference(num_kv_heads, impl):
    module = _random_mha(num_kv_heads, impl)
    p = {k: np.asarray(v, np.float64) for k, v in module.params_dict().items()}
    assert p["key"].shape == (D, num_kv_heads, H) and p["value_bias"].shape == (num_kv_heads, H)
    rng = np.random.default_rng(2)
    xq, xkv = rng.normal(size=(B, T, D)), rng.normal(size=(B, S, D))
    valid = np.arange(S)[None] < np.array([[S], [4]])  # [B, S] source padding
    spec = ops.AttentionSpec(k_valid=jnp.asarray(valid))
    cross, _, _ = module(jnp.asarray(xq, jnp.float32), jnp.asarray(xkv, jnp.float32), spec=spec)
    want, _ = _reference(p, xq, xkv, valid[:, None, None, :])
    np.testing.assert_allclose(cross, want, atol=2e-5)
    causal = np.tril(np.ones((T, T), bool))[None, None]
    out, _, _ = module(jnp.asarray(xq, jnp.float32), spec=ops.AttentionSpec(causal=True))
    np.testing.assert_allclose(out, _reference(p, xq, xq, causal)[0], atol=2e-5)


def test_grouped_query_cache_shrinks_and_gradients_reach_shared_heads():
    module = _random_mha(2)
    cache = module.init_cache(B, 8)
    assert cache["key"].shape == cache["value"].shape == (B, 2, 8, H)  # [B, K, L, H]
    ring = module.init_cache(B, 100, window=3)
    assert ring["key"].shape == (B, 2, 4, H)  # the window and the query's own position
    xq = jnp.asarray(np.random.default_rng(3).normal(size=(B, T, D)), jnp.float32)
    graphdef, state = nnx.split(module)
    grads = jax.grad(lambda st: jnp.sum(nnx.merge(graphdef, st)(xq)[0] ** 2))(state)
    params = dict(module.params_dict())
    everything = np.ones((1, 1, 1, T), bool)
    want = jax.grad(lambda p: jnp.sum(_reference(p, xq, xq, everything, jnp)[0] ** 2))(params)
    for name in ("key", "value", "value_bias"):  # shared heads sum their groups' gradients
        assert grads[name][...].shape == want[name].shape
        np.testing.assert_allclose(grads[name][...], want[name], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="num_kv_heads=3 must be a positive divisor"):
        MultiHeadAttention(D, N, num_kv_heads=3, rngs=nnx.Rngs(0))


# ------------------------------------------------------------------------- whole models

VARIANTS = {
    "gqa": dict(num_kv_heads=2),
    "mqa_window": dict(local_window_size=3, num_kv_heads=1),
    "t5_gqa": dict(positional="t5_relative", relative_num_buckets=8, relative_max_distance=12,
                   num_kv_heads=2),
    "t5_window_chunked": dict(positional="t5_relative", relative_num_buckets=8,
                              relative_max_distance=12, local_window_size=2, num_kv_heads=2,
                              attention_impl="chunked", attention_chunk_size=4),
}


def _config(**overrides):
    base = dict(vocab_size=V, d_model=D, num_heads=N, num_layers=1, d_ff=32, dropout_rate=0.0,
                max_len=32, attention_precision="highest")
    return ModelConfig(**{**base, **overrides})


def _ids(seed, rows, length):
    return jnp.asarray(np.random.default_rng(seed).integers(3, V, (rows, length)), jnp.int32)


# every variant in the LM (a prompt wider than the window, then a ring buffer); cross-attention
# and the encoder's side in the encoder-decoder with grouped heads, with and without T5 + window
CASES = [("decoder_only", v) for v in sorted(VARIANTS)] + [
    ("encoder_decoder", "gqa"), ("encoder_decoder", "t5_window_chunked")]


@pytest.mark.parametrize("kind, variant", CASES)
def test_cached_decoding_equals_the_full_pass(kind, variant):
    config = _config(**VARIANTS[variant])
    model = build_model(kind, config, nnx.Rngs(3))
    assert count_params(config, decoder_only=kind == "decoder_only") == sum(
        x.size for x in jax.tree.leaves(split_model(model)[1]))
    src, tgt = _ids(0, B, S), _ids(1, B, 9)
    full = model({"inputs": src, "targets": tgt})  # [B, 9, V]
    ids = jnp.concatenate([jnp.zeros((B, 1), jnp.int32), tgt[:, :-1]], axis=1)
    if kind == "encoder_decoder":
        cache = model.init_cache(B, 9, encoded=model.encode(src), src_ids=src)
        first = 1
    else:  # a prompt of 4 > window + 1 tokens in one call, then one token at a time
        cache, first = model.init_cache(B, 9), 4
    model_def, params = split_model(model)
    decode = jax.jit(lambda p, i, c: model_def.merge(p).decode(i, cache=c))
    steps, cache = model.decode(ids[:, :first], cache=cache)
    steps = [steps]
    for t in range(first, 9):
        logits, cache = decode(params, ids[:, t:t + 1], cache)
        steps.append(logits)
    np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, atol=2e-5)
    window = config.local_window_size
    kv = config.kv_heads
    assert cache["layers"][0]["self"]["key"].shape == (
        B, kv, 9 if window is None else window + 1, D // N)


def test_sliding_window_sees_only_its_window():
    """A one-layer LM: the logit at t depends on inputs t - w .. t only (and on all of them)."""
    model = build_model("decoder_only", _config(num_layers=1, local_window_size=2), nnx.Rngs(0))
    tgt = _ids(4, 1, 10)
    base = model({"targets": tgt})
    changed = model({"targets": tgt.at[0, 3].set(1)})  # decoder input 4 (shifted right)
    moved = np.abs(np.asarray(changed - base)).max(-1)[0]  # [T]
    assert np.all(moved[[0, 1, 2, 3, 7, 8, 9]] == 0) and np.all(moved[4:7] > 0)


def test_sliding_window_encoder_is_two_sided():
    model = build_model("encoder_decoder", _config(num_encoder_layers=1, local_window_size=1),
                        nnx.Rngs(0))
    src = _ids(5, 1, 8)
    base, changed = model.encode(src), model.encode(src.at[0, 4].set(1))
    moved = np.abs(np.asarray(changed - base)).max(-1)[0]  # [S]
    assert np.all(moved[[0, 1, 2, 6, 7]] == 0) and np.all(moved[3:6] > 0)


def _layer0_weights(model, attention, q_side, src, tgt):
    """Attention weights of layer 0's self-attention by hand: tokens (no absolute positions for
    "t5_relative"), q/k projections, and the stack's table looked up by bucket."""
    stack = model.encoder if q_side == "encoder" else model.decoder
    ids = src if q_side == "encoder" else jnp.concatenate(
        [jnp.zeros((1, 1), jnp.int32), tgt[:, :-1]], axis=1)
    x = np.asarray(stack.embedding.tokens(ids), np.float64)[0]  # [L, D]
    p = {k: np.asarray(v, np.float64) for k, v in
         stack.layers[0].self_attention.params_dict().items()}
    q = np.einsum("td,dnh->nth", x, p["query"]) + p["query_bias"].transpose(1, 0)[:, None]
    k = np.einsum("td,dnh->nth", x, p["key"]) + p["key_bias"].transpose(1, 0)[:, None]
    length = x.shape[0]
    rel = np.arange(length)[None, :] - np.arange(length)[:, None]  # key - query
    bidirectional = q_side == "encoder"
    bucket = np.asarray(ops.relative_position_buckets(
        rel, bidirectional=bidirectional, num_buckets=8, max_distance=12))
    table = np.asarray(stack.relative_bias.table[...], np.float64)  # [buckets, N]
    logits = q @ k.transpose(0, 2, 1) / np.sqrt(H) + table[bucket].transpose(2, 0, 1)
    mask = np.ones((length, length), bool) if bidirectional else rel <= 0
    name = "encoder_self" if q_side == "encoder" else "decoder_self"
    return np.asarray(attention[name][0, 0]), _softmax(logits, mask)


def test_t5_relative_bias_in_the_stacks():
    model = build_model("encoder_decoder", _config(positional="t5_relative",
                                                   relative_num_buckets=8,
                                                   relative_max_distance=12), nnx.Rngs(6))
    src, tgt = _ids(7, 1, 6), _ids(8, 1, 5)
    _, attention = model.with_attention({"inputs": src, "targets": tgt})
    for q_side in ("encoder", "decoder"):  # bidirectional, then unidirectional
        got, want = _layer0_weights(model, attention, q_side, src, tgt)
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_t5_relative_bias_is_one_table_per_stack_and_shift_invariant():
    config = _config(positional="t5_relative", relative_num_buckets=8, relative_max_distance=12)
    model = build_model("decoder_only", config, nnx.Rngs(0))
    _, params = split_model(model)
    tables = [jax.tree_util.keystr(path) for path, _ in
              jax.tree_util.tree_leaves_with_path(params) if "relative_bias" in str(path)]
    assert tables == ["['decoder']['relative_bias']['table']"]
    tgt = _ids(9, 1, 6)
    at_zero = model({"targets": tgt})
    shifted = model({"targets": tgt, "targets_segmentation": jnp.ones_like(tgt),
                     "targets_position": 5 + jnp.arange(6)[None]})  # relative positions only
    np.testing.assert_allclose(shifted, at_zero, atol=1e-5)


@pytest.mark.parametrize("overrides, message", [
    (dict(num_kv_heads=3), "num_kv_heads=3 does not divide the 4 query heads"),
    (dict(num_kv_heads=0), "num_kv_heads=0 must be a positive integer or None"),
    (dict(num_kv_heads=2, num_decoder_heads=1), "does not divide the 1 query heads"),
    (dict(local_window_size=0), "local_window_size=0 must be a positive integer or None"),
    (dict(positional="t5_relative", relative_num_buckets=2), "relative_num_buckets >= 4"),
    (dict(positional="t5_relative", attention_impl="splash"), "takes no bias"),
])
def test_bad_settings_are_one_sentence(overrides, message):
    with pytest.raises(ValueError, match=message) as err:
        _config(**overrides)
    assert "\n" not in str(err.value)
