"""MultiHeadAttention module: against the pure op, flax's own attention, numpy, and its cache."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from transformer_jax import ops
from transformer_jax.nn import MultiHeadAttention

B, T, S, D, N = 2, 5, 7, 16, 4
H = D // N


def _mha(**kwargs):
    module = MultiHeadAttention(D, N, rngs=nnx.Rngs(0), **kwargs)
    # Non-zero biases so that a forgotten bias term shows up.
    rng = np.random.default_rng(1)
    for name in ("query_bias", "key_bias", "value_bias", "out_bias"):
        if hasattr(module, name):
            param = getattr(module, name)
            param[...] = jnp.asarray(rng.normal(size=param.shape), jnp.float32)
    return module


def _inputs(seed=0, t=T, s=S):
    rng = np.random.default_rng(seed)
    return (
        jnp.asarray(rng.normal(size=(B, t, D)), jnp.float32),
        jnp.asarray(rng.normal(size=(B, s, D)), jnp.float32),
    )


def test_param_layout_and_params_dict():
    module = _mha()
    p = module.params_dict()
    assert {k: v.shape for k, v in p.items()} == {
        "query": (D, N, H),
        "key": (D, N, H),
        "value": (D, N, H),
        "out": (N, H, D),
        "query_bias": (N, H),
        "key_bias": (N, H),
        "value_bias": (N, H),
        "out_bias": (D,),
    }
    no_bias = MultiHeadAttention(D, N, use_bias=False, rngs=nnx.Rngs(0))
    assert set(no_bias.params_dict()) == {"query", "key", "value", "out"}
    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(no_bias, nnx.Param)))
    assert n_params == 4 * D * D


def test_module_equals_pure_op_with_its_params():
    module = _mha()
    xq, xkv = _inputs()
    valid = jnp.arange(S)[None, :] < jnp.array([[S], [3]])  # [B, S]
    mask = ops.padding_mask(jnp.ones((B, T), bool), valid)
    bias = ops.alibi_bias(N, jnp.arange(T), jnp.arange(S))
    out, cache, weights = module(xq, xkv, mask=mask, bias=bias, return_weights=True)
    ref, ref_w = ops.multi_head_attention(
        xq, xkv, module.params_dict(), mask=mask, bias=bias, return_weights=True
    )
    assert cache is None
    np.testing.assert_allclose(out, ref, atol=1e-6)
    np.testing.assert_allclose(weights, ref_w, atol=1e-6)
    # weights of row b sum to one over the valid keys and vanish on padding
    np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-6)
    assert float(jnp.abs(weights[1, :, :, 3:]).max()) == 0.0


def test_module_equals_flax_multi_head_attention():
    module = _mha()
    flax_mha = nnx.MultiHeadAttention(N, D, decode=False, rngs=nnx.Rngs(5))
    p = module.params_dict()
    for name in ("query", "key", "value", "out"):
        getattr(flax_mha, name).kernel[...] = p[name]
        getattr(flax_mha, name).bias[...] = p[f"{name}_bias"]
    xq, xkv = _inputs(3)
    mask = jnp.asarray(np.random.default_rng(2).random((B, 1, T, S)) < 0.7).at[..., 0].set(True)
    ours, _, _ = module(xq, xkv, mask=mask)
    theirs = flax_mha(xq, xkv, mask=mask, deterministic=True)
    np.testing.assert_allclose(ours, theirs, atol=2e-5)


def test_self_attention_against_numpy_loops_with_rope_positions():
    module = _mha(rope=True)
    x, _ = _inputs(4)
    positions = jnp.array([[0, 1, 2, 3, 4], [4, 2, 0, 1, 3]])
    out, _, _ = module(x, positions=positions)
    p = {k: np.asarray(v, np.float64) for k, v in module.params_dict().items()}
    xn = np.asarray(x, np.float64)

    def rotate(v, pos):  # v [H], half-split rotary pairing written per pair
        half, res = H // 2, np.empty(H)
        for i in range(half):
            angle = pos * 10000.0 ** (-2.0 * i / H)
            c, s = np.cos(angle), np.sin(angle)
            res[i] = v[i] * c - v[i + half] * s
            res[i + half] = v[i + half] * c + v[i] * s
        return res

    ref = np.zeros((B, T, D))
    for b in range(B):
        heads = np.zeros((T, N, H))
        for n in range(N):
            q = xn[b] @ p["query"][:, n] + p["query_bias"][n]
            k = xn[b] @ p["key"][:, n] + p["key_bias"][n]
            v = xn[b] @ p["value"][:, n] + p["value_bias"][n]
            pos = np.asarray(positions[b])
            q = np.stack([rotate(q[t], pos[t]) for t in range(T)])
            k = np.stack([rotate(k[t], pos[t]) for t in range(T)])
            logits = q @ k.T / np.sqrt(H)
            w = np.exp(logits - logits.max(-1, keepdims=True))
            heads[:, n] = (w / w.sum(-1, keepdims=True)) @ v
        ref[b] = np.einsum("TNH,NHD->TD", heads, p["out"]) + p["out_bias"]
    np.testing.assert_allclose(out, ref, atol=2e-5)


@pytest.mark.parametrize("rope", [False, True])
def test_incremental_cache_equals_causal_full_pass(rope):
    module = _mha(rope=rope)
    x, _ = _inputs(6)
    bias = ops.alibi_bias(N, jnp.arange(T), jnp.arange(T))
    full, _, _ = module(x, mask=ops.causal_mask(T), bias=bias)
    cache = module.init_cache(B, 8)
    assert cache["key"].shape == (B, N, 8, H) and cache["index"].dtype == jnp.int32  # heads-first
    step = jax.jit(lambda x_t, c, b_t: module(x_t, cache=c, bias=b_t))
    outs = []
    for t in range(T):
        bias_t = ops.alibi_bias(N, jnp.array([t]), jnp.arange(8))  # [1, N, 1, 8]
        out, cache, _ = step(x[:, t : t + 1], cache, bias_t)
        outs.append(out)
    assert int(cache["index"]) == T
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, atol=1e-5)
    # The unused tail of the cache is untouched.
    assert float(jnp.abs(cache["key"][:, :, T:]).max()) == 0.0


def test_prefill_several_tokens_then_one_step():
    module = _mha(rope=True)
    x, _ = _inputs(7)
    full, _, _ = module(x, mask=ops.causal_mask(T))
    cache = module.init_cache(B, T)
    first, cache, _ = module(x[:, :3], cache=cache)
    rest, cache, _ = module(x[:, 3:], cache=cache)
    np.testing.assert_allclose(jnp.concatenate([first, rest], 1), full, atol=1e-5)


def test_precomputed_cross_kv_equals_projection_each_call():
    module = _mha()
    xq, xkv = _inputs(8)
    kv = module.precompute_kv(xkv)
    assert kv["key"].shape == (B, N, H, S) and kv["value"].shape == (B, N, S, H)
    assert "index" not in kv
    direct, _, _ = module(xq, xkv)
    cached, same, _ = module(xq, cache=kv)
    assert same is kv
    np.testing.assert_allclose(cached, direct, atol=1e-6)


def test_attention_dropout_is_keyed_by_the_rng():
    module = _mha(dropout_rate=0.5)
    x, _ = _inputs(9)
    clean, _, _ = module(x)
    a, _, _ = module(x, dropout_rng=jax.random.key(0))
    b, _, _ = module(x, dropout_rng=jax.random.key(0))
    c, _, _ = module(x, dropout_rng=jax.random.key(1))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, clean) and not np.allclose(a, c)
    np.testing.assert_array_equal(module(x)[0], clean)


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="d_model=10 is not divisible by num_heads=4"):
        MultiHeadAttention(10, 4, rngs=nnx.Rngs(0))
    module = _mha()
    with pytest.raises(ValueError, match=r"inputs_q must have shape \[B, T, 16\]"):
        module(jnp.zeros((B, T, 8)))
    with pytest.raises(ValueError, match=r"init_cache\(batch=2"):
        module(jnp.zeros((B, 1, D)), cache=module.init_cache(3, 4))


@pytest.mark.parametrize("rope,kv_heads", [(False, None), (True, 2)])
def test_beam_cache_equals_row_caches_copied_to_follow_the_beams(rope, kv_heads):
    # G beams of each of B examples: the beam cache (keys one per example, a per-row slot
    # index that the search permutes) gives the outputs of per-row caches whose rows are
    # copied to follow the beams, whatever the parents.
    G, L = 3, 6
    module = _mha(rope=rope, num_kv_heads=kv_heads)
    rng = np.random.default_rng(10)
    x = jnp.asarray(rng.normal(size=(B * G, L, D)), jnp.float32)
    rows, beams = module.init_cache(B * G, L), module.init_cache(B, L, beams=G)
    assert beams["key"].shape == (B, module.num_kv_heads, L * G, H)
    assert beams["beam_slot"].shape == (B * G, L)
    step = jax.jit(lambda x_t, c: module(x_t, cache=c)[:2])
    for t in range(L):
        ref, rows = step(x[:, t : t + 1], rows)
        out, beams = step(x[:, t : t + 1], beams)
        np.testing.assert_allclose(out, ref, atol=1e-5)
        parents = rng.integers(0, G, (B, G))  # the beam each new beam continues
        order = (np.arange(B)[:, None] * G + parents).reshape(-1)
        rows = {k: v if k == "index" else v[order] for k, v in rows.items()}
        beams = dict(beams, beam_slot=beams["beam_slot"][order])
    overflow, _ = step(x[:, :1], beams)  # index L: poisoned, not wrong
    assert np.isnan(np.asarray(overflow)).all()
    with pytest.raises(ValueError, match="one token per beam"):
        module(x[:, :2], cache=module.init_cache(B, L, beams=G))


def test_precomputed_keys_serve_the_beams_of_each_example():
    # G * B query rows over keys precomputed for B examples: as if every row had its own copy
    G = 3
    module = _mha()
    _, xkv = _inputs(11)
    xq = jnp.asarray(np.random.default_rng(12).normal(size=(B * G, T, D)), jnp.float32)
    out, _, weights = module(xq, cache=module.precompute_kv(xkv), return_weights=True)
    ref, _, ref_weights = module(xq, jnp.repeat(xkv, G, axis=0), return_weights=True)
    np.testing.assert_allclose(out, ref, atol=1e-5)
    np.testing.assert_allclose(weights, ref_weights, atol=1e-6)
    with pytest.raises(ValueError, match="do not divide into"):
        module(xq[:5], cache=module.precompute_kv(xkv))
