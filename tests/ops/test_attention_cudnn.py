"""Structured masks (``is_causal``, ``key_value_seq_lengths``) and the cuDNN path of "jax".

The numbers are checked on CPU against a numpy reference for every implementation; the cuDNN
kernel itself cannot run here, so one test proves that the "jax" path LOWERS to cuDNN's fused
attention for CUDA (``lower(lowering_platforms=("cuda",))``), with jax's cuDNN version probe
patched (private API, isolated in that test).
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from transformer_jax import ops

B, T, N, H = 3, 8, 2, 16
LENGTHS = np.array([8, 5, 0], np.int32)  # the last row has no valid key at all


def qkv(dtype=jnp.float32):
    keys = jax.random.split(jax.random.key(1), 3)
    return [jax.random.normal(k, (B, T, N, H), dtype) for k in keys]


def numpy_attention(q, k, v, causal: bool, lengths):
    """Loops over rows, heads and queries; masked rows give zeros."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    out = np.zeros_like(q)
    for b in range(B):
        for n in range(N):
            for i in range(T):
                keys = [j for j in range(T) if j < lengths[b] and (not causal or j <= i)]
                if not keys:
                    continue
                scores = np.array([q[b, i, n] @ k[b, j, n] for j in keys]) / np.sqrt(H)
                w = np.exp(scores - scores.max())
                w /= w.sum()
                out[b, i, n] = sum(wj * v[b, j, n] for wj, j in zip(w, keys, strict=True))
    return out


@pytest.mark.parametrize("implementation", ["xla", "chunked", "jax"])
@pytest.mark.parametrize("causal", [False, True])
def test_structured_masks_match_numpy(implementation, causal):
    q, k, v = qkv()
    out = ops.dot_product_attention(q, k, v, is_causal=causal, key_value_seq_lengths=LENGTHS,
                                    implementation=implementation, chunk_size=4)
    np.testing.assert_allclose(out, numpy_attention(q, k, v, causal, LENGTHS), atol=1e-5)


def test_structured_masks_combine_with_a_dense_mask_and_match_jax_nn():
    q, k, v = qkv()
    lengths = np.array([8, 5, 2], np.int32)
    dense = jnp.asarray(np.random.default_rng(0).random((B, 1, T, T)) > 0.3)
    dense = dense | jnp.eye(T, dtype=bool)
    ours = ops.dot_product_attention(q, k, v, mask=dense, is_causal=True,
                                     key_value_seq_lengths=lengths, implementation="chunked")
    ref = jax.nn.dot_product_attention(q, k, v, mask=dense, is_causal=True,
                                       key_value_seq_lengths=lengths)
    rows_with_keys = np.asarray(jnp.any(dense & jnp.tril(jnp.ones((T, T), bool))
                                        & (jnp.arange(T) < lengths[:, None, None, None]), -1))
    keep = np.transpose(rows_with_keys, (0, 2, 1))[..., None]  # [B, T, 1, 1]
    np.testing.assert_allclose(np.where(keep, ours, 0), np.where(keep, ref, 0), atol=1e-5)


def test_structured_mask_gradients_match_xla():
    q, k, v = qkv()

    def loss(impl, q, k, v):
        out = ops.dot_product_attention(q, k, v, is_causal=True, key_value_seq_lengths=LENGTHS,
                                        implementation=impl, chunk_size=4)
        return jnp.sum(out * jnp.arange(H))

    ref = jax.grad(lambda *a: loss("xla", *a), argnums=(0, 1, 2))(q, k, v)
    for impl in ("chunked", "jax"):
        got = jax.grad(lambda *a, impl=impl: loss(impl, *a), argnums=(0, 1, 2))(q, k, v)
        for g, r in zip(got, ref, strict=True):
            assert np.all(np.isfinite(g))
            np.testing.assert_allclose(g, r, atol=1e-4)


@pytest.fixture
def claim_cudnn(monkeypatch):
    # Private: jax asks the local CUDA install for the cuDNN version while tracing; there is
    # none on this machine, so claim cuDNN 9.10 (what jax 0.10 wheels ship with).
    from jax._src.cudnn import fused_attention_stablehlo as cudnn

    monkeypatch.setattr(cudnn, "check_cudnn_version", lambda: 91000)


def cuda_custom_calls(fn, *args) -> set[str]:
    # Lowered, not exported: cuDNN's custom calls carry no export compatibility promise.
    text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "f64" not in text
    return set(re.findall(r'custom_call @"?([\w$]+)', text))


def test_jax_implementation_lowers_to_cudnn_for_cuda(claim_cudnn):
    q, k, v = qkv(jnp.bfloat16)
    packed = jnp.asarray(np.random.default_rng(0).random((B, 1, T, T)) > 0.3)

    def loss(q, k, v, mask):
        out = ops.dot_product_attention(
            q, k, v, mask=mask, is_causal=mask is None,
            key_value_seq_lengths=None if mask is not None else LENGTHS,
            implementation="jax", jax_backend="cudnn")
        return jnp.sum(out.astype(jnp.float32))

    # Causal + padding: cuDNN's own mask types; a dense (packed-row) mask: an additive bias.
    for mask, kernel in ((None, "__cudnn$fmhaSoftmax"), (packed, "__cudnn$fmhaScaleBiasSoftmax")):
        calls = cuda_custom_calls(jax.value_and_grad(loss, argnums=(0, 1, 2)), q, k, v, mask)
        assert calls == {kernel, f"{kernel}Backward"}, calls


def test_model_decoder_self_attention_reaches_cudnn_causal_mask(claim_cudnn, monkeypatch):
    # A Transformer with attention_impl="jax" in bfloat16, traced as on a GPU (the backend
    # test of ops.attention answers "GPU"): the decoder's causal self-attention goes to cuDNN
    # as its own causal mask (fmhaSoftmax: no [T, T] array); the encoder's and the
    # cross-attention's key padding still arrive as a dense bias (fmhaScaleBiasSoftmax).
    from flax import nnx

    from transformer_jax.config import ModelConfig
    from transformer_jax.nn import Transformer, split_model
    from transformer_jax.ops import attention as attention_module

    monkeypatch.setattr(attention_module, "_cudnn_ok", lambda q: q.dtype == jnp.bfloat16)
    cfg = ModelConfig(vocab_size=64, d_model=64, num_heads=4, num_layers=1, d_ff=128,
                      max_len=16, dtype="bfloat16", attention_impl="jax")
    model_def, params = split_model(Transformer(cfg, rngs=nnx.Rngs(0)))
    src = jnp.asarray(np.random.default_rng(0).integers(3, 64, (2, 16)), jnp.int32)

    def loss(params, src, tgt):
        logits = model_def.merge(params)({"inputs": src, "targets": tgt})
        return jnp.mean(logits.astype(jnp.float32))

    calls = cuda_custom_calls(jax.value_and_grad(loss), params, src, src)
    assert {"__cudnn$fmhaSoftmax", "__cudnn$fmhaSoftmaxBackward"} <= calls, calls
    assert "__cudnn$fmhaScaleBiasSoftmax" in calls, calls


def test_grouped_query_and_sliding_window_lower_to_cudnn(claim_cudnn):
    # 4 query heads on 2 key/value heads; a causal window reaches cuDNN as its own sliding
    # window (no [T, S] array); a window with a right side and no causal mask, which cuDNN's
    # window cannot express, arrives as a dense bias instead of failing.
    keys = jax.random.split(jax.random.key(2), 3)
    q = jax.random.normal(keys[0], (B, T, 4, H), jnp.bfloat16)
    k, v = (jax.random.normal(x, (B, T, 2, H), jnp.bfloat16) for x in keys[1:])

    def loss(q, k, v, causal, window):
        out = ops.dot_product_attention(q, k, v, is_causal=causal, local_window_size=window,
                                        implementation="jax", jax_backend="cudnn")
        return jnp.sum(out.astype(jnp.float32))

    for causal, window, kernel in ((True, (3, 0), "__cudnn$fmhaSoftmax"),
                                   (False, (3, 0), "__cudnn$fmhaSoftmax"),
                                   (False, (2, 1), "__cudnn$fmhaScaleBiasSoftmax")):
        fn = jax.value_and_grad(lambda q, k, v, c=causal, w=window: loss(q, k, v, c, w),
                                argnums=(0, 1, 2))
        calls = cuda_custom_calls(fn, q, k, v)
        assert calls == {kernel, f"{kernel}Backward"}, (causal, window, calls)
    text = jax.jit(lambda q, k, v: loss(q, k, v, True, (3, 0))).trace(q, k, v).lower(
        lowering_platforms=("cuda",)).as_text()
    # keys i-3 .. i: cuDNN's window counts the query itself, (i - 4, i]
    assert re.search(r"sliding_window_length\\22: 4\b", text), text[:2000]
