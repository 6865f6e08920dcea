"""Sinusoidal encodings, RoPE and ALiBi against their formulas; T5 relative position buckets
and biases against a loop over the definition and against transformers' T5Attention."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from transformer_jax import ops


def test_sinusoidal_matches_paper_formula():
    d = 8
    got = np.asarray(ops.sinusoidal_encoding(np.arange(6), d))
    assert got.shape == (6, d) and got.dtype == np.float32
    for pos in range(6):
        for i in range(d // 2):
            angle = pos / 10000 ** (2 * i / d)
            assert got[pos, 2 * i] == pytest.approx(math.sin(angle), abs=1e-6)
            assert got[pos, 2 * i + 1] == pytest.approx(math.cos(angle), abs=1e-6)


def test_sinusoidal_batched_positions_and_errors():
    pos = np.array([[0, 1, 2], [0, 0, 1]])
    got = ops.sinusoidal_encoding(pos, 4)
    assert got.shape == (2, 3, 4)
    np.testing.assert_allclose(got[1, 1], ops.sinusoidal_encoding(np.arange(1), 4)[0])
    np.testing.assert_allclose(got[0, 0], [0, 1, 0, 1])
    with pytest.raises(ValueError, match="even d_model; got 5"):
        ops.sinusoidal_encoding(pos, 5)


def _rand(rng, *shape):
    return jnp.asarray(rng.standard_normal(shape), jnp.float32)


def test_rope_matches_half_split_formula_and_preserves_norm():
    rng = np.random.default_rng(0)
    x = _rand(rng, 2, 3, 2, 6)
    pos = np.array([[0, 1, 5], [7, 2, 3]])
    got = np.asarray(ops.apply_rope(x, pos))
    xn = np.asarray(x, np.float64)
    for b in range(2):
        for t in range(3):
            for i in range(3):
                theta = pos[b, t] / 10000 ** (2 * i / 6)
                c, s = math.cos(theta), math.sin(theta)
                x1, x2 = xn[b, t, :, i], xn[b, t, :, i + 3]
                np.testing.assert_allclose(got[b, t, :, i], x1 * c - x2 * s, atol=1e-5)
                np.testing.assert_allclose(got[b, t, :, i + 3], x2 * c + x1 * s, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=-1), np.linalg.norm(xn, axis=-1), rtol=1e-5)
    np.testing.assert_allclose(ops.apply_rope(x, np.zeros((2, 3), int)), x, atol=1e-7)


def test_rope_dot_products_depend_only_on_relative_position():
    rng = np.random.default_rng(1)
    q, k = _rand(rng, 1, 4, 2, 8), _rand(rng, 1, 4, 2, 8)
    pos = jnp.array([[0, 3, 4, 9]])

    def scores(shift):
        qr, kr = ops.apply_rope(q, pos + shift), ops.apply_rope(k, pos + shift)
        return jnp.einsum("BTNH,BSNH->BNTS", qr, kr, precision=jax.lax.Precision.HIGHEST)

    base = scores(0)
    np.testing.assert_allclose(scores(17), base, atol=1e-4)
    np.testing.assert_allclose(scores(250), base, atol=1e-4)
    plain = jnp.einsum("BTNH,BSNH->BNTS", q, k, precision=jax.lax.Precision.HIGHEST)
    assert not np.allclose(base, plain, atol=1e-2)  # rotation changes off-diagonal scores


def test_rope_errors():
    with pytest.raises(ValueError, match=r"even head dimension H; got x shape \(1, 2, 1, 3\)"):
        ops.apply_rope(jnp.ones((1, 2, 1, 3)), jnp.zeros((1, 2), int))
    with pytest.raises(ValueError, match=r"positions must have shape \[B, T\] = \[1, 2\]"):
        ops.apply_rope(jnp.ones((1, 2, 1, 4)), jnp.zeros((1, 3), int))


def test_alibi_slopes_power_of_two():
    np.testing.assert_allclose(ops.alibi_slopes(8), [2.0**-i for i in range(1, 9)], rtol=1e-6)
    np.testing.assert_allclose(ops.alibi_slopes(4), [2.0**-2, 2.0**-4, 2.0**-6, 2.0**-8])


def test_alibi_slopes_non_power_of_two():
    # n=6: the 4-head slopes 1/4, 1/16, 1/64, 1/256, then the 1st and 3rd of the 8-head ones.
    np.testing.assert_allclose(
        ops.alibi_slopes(6), [1 / 4, 1 / 16, 1 / 64, 1 / 256, 1 / 2, 1 / 8], rtol=1e-6
    )
    # n=12: the 8-head slopes, then 16-head slopes 2^-0.5, 2^-1.5, 2^-2.5, 2^-3.5.
    want = [2.0**-i for i in range(1, 9)] + [2.0**-0.5, 2.0**-1.5, 2.0**-2.5, 2.0**-3.5]
    np.testing.assert_allclose(ops.alibi_slopes(12), want, rtol=1e-6)


def test_alibi_bias_values():
    q_pos = np.array([[0, 1, 2]])
    k_pos = np.array([[0, 1, 2, 3]])
    got = np.asarray(ops.alibi_bias(2, q_pos, k_pos))
    assert got.shape == (1, 2, 3, 4)
    slopes = [2.0**-4, 2.0**-8]
    for n in range(2):
        for i in range(3):
            for j in range(4):
                assert got[0, n, i, j] == pytest.approx(-slopes[n] * abs(i - j))


# ----------------------------------------------------------------------------- T5 buckets


def _bucket_by_definition(rel, bidirectional, num_buckets, max_distance):
    """One relative position at a time, in Python floats where T5 uses float32 (away from a
    bucket boundary the two agree)."""
    bucket = 0
    if bidirectional:
        num_buckets //= 2
        bucket = num_buckets if rel > 0 else 0
        dist = abs(rel)
    else:
        dist = max(-rel, 0)
    exact = num_buckets // 2
    if dist < exact:
        return bucket + dist
    steps = math.log(dist / exact) / math.log(max_distance / exact) * (num_buckets - exact)
    return bucket + min(exact + int(steps), num_buckets - 1)


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("num_buckets, max_distance", [(32, 128), (8, 20), (64, 256)])
def test_relative_position_buckets_match_the_definition(bidirectional, num_buckets, max_distance):
    rel = np.arange(-400, 401)
    got = np.asarray(ops.relative_position_buckets(
        rel, bidirectional=bidirectional, num_buckets=num_buckets, max_distance=max_distance))
    want = [_bucket_by_definition(int(r), bidirectional, num_buckets, max_distance) for r in rel]
    np.testing.assert_array_equal(got, want)
    assert got.dtype == np.int32 and got.min() == 0 and got.max() == num_buckets - 1
    if not bidirectional:  # later keys share the query's own bucket
        assert np.all(got[rel >= 0] == 0)


def test_relative_position_bucket_errors():
    with pytest.raises(ValueError, match="num_buckets >= 4 and max_distance"):
        ops.relative_position_buckets(np.arange(3), bidirectional=True, num_buckets=2)
    with pytest.raises(ValueError, match="max_distance=4"):
        ops.relative_position_buckets(np.arange(3), num_buckets=32, max_distance=4)
    with pytest.raises(ValueError, match=r"table must be \[num_buckets, N\]"):
        ops.relative_position_bias(np.zeros(32), np.arange(3), np.arange(3))


def test_relative_position_bias_gradient_sums_over_each_bucket():
    rng = np.random.default_rng(0)
    table = jnp.asarray(rng.standard_normal((8, 3)), jnp.float32)
    q_pos, k_pos = np.array([[0, 1, 2, 9]]), np.array([[0, 3, 5, 6, 30]])
    cot = rng.standard_normal((1, 3, 4, 5))
    grad = jax.grad(lambda t: jnp.sum(ops.relative_position_bias(
        t, q_pos, k_pos, bidirectional=False, max_distance=10) * cot))(table)
    want = np.zeros((8, 3))
    for i in range(4):
        for j in range(5):
            b = _bucket_by_definition(int(k_pos[0, j] - q_pos[0, i]), False, 8, 10)
            want[b] += cot[0, :, i, j]
    np.testing.assert_allclose(grad, want, atol=1e-5)


def _t5_attention(bidirectional, num_buckets, max_distance, d_model=16, heads=4):
    torch = pytest.importorskip("torch")
    t5 = pytest.importorskip("transformers.models.t5.modeling_t5")
    config = t5.T5Config(d_model=d_model, d_kv=d_model // heads, num_heads=heads,
                         relative_attention_num_buckets=num_buckets,
                         relative_attention_max_distance=max_distance,
                         is_decoder=not bidirectional, dropout_rate=0.0)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    attn = t5.T5Attention(config, has_relative_attention_bias=True, layer_idx=0).eval()
    with torch.no_grad():  # a random table instead of the zero-ish initialisation
        attn.relative_attention_bias.weight.normal_()
    return torch, attn


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("t, s, past", [(7, 7, 0), (5, 300, 0), (1, 200, 150), (300, 4, 0)])
def test_relative_position_bias_matches_transformers_t5(bidirectional, t, s, past):
    torch, attn = _t5_attention(bidirectional, num_buckets=32, max_distance=128)
    table = attn.relative_attention_bias.weight.detach().numpy()  # [num_buckets, N]
    with torch.no_grad():
        want = attn.compute_bias(t, s, past_seen_tokens=past).numpy()  # [1, N, T, S]
    got = ops.relative_position_bias(table, past + np.arange(t), np.arange(s),
                                     bidirectional=bidirectional, max_distance=128)
    assert got.shape == want.shape == (1, 4, t, s)
    np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("bidirectional", [True, False])
def test_attention_with_t5_bias_matches_transformers_t5_attention(bidirectional):
    # T5 does not scale its logits: the query kernel carries sqrt(H) here instead.
    torch, attn = _t5_attention(bidirectional, num_buckets=8, max_distance=12)
    b, t, d, n = 2, 20, 16, 4
    h = d // n
    x = np.random.default_rng(1).standard_normal((b, t, d)).astype(np.float32)
    mask = None if bidirectional else torch.triu(torch.full((t, t), -1e9), 1)[None, None]
    with torch.no_grad():
        want = attn(torch.from_numpy(x), mask=mask)[0].numpy()

    def kernel(layer, heads):  # torch Linear [out, in] -> [D, heads, H]
        return layer.weight.detach().numpy().T.reshape(d, heads, h)

    params = {"query": kernel(attn.q, n) * math.sqrt(h), "key": kernel(attn.k, n),
              "value": kernel(attn.v, n),
              "out": attn.o.weight.detach().numpy().T.reshape(n, h, d)}
    bias = ops.relative_position_bias(attn.relative_attention_bias.weight.detach().numpy(),
                                      np.arange(t), np.arange(t), bidirectional=bidirectional,
                                      max_distance=12)
    spec = None if bidirectional else ops.AttentionSpec(causal=True)
    for impl in ("xla", "chunked"):
        got = ops.multi_head_attention(x, x, params, bias=bias, spec=spec, implementation=impl,
                                       chunk_size=8, precision="highest")
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5, err_msg=impl)
