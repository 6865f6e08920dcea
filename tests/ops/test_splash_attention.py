"""implementation="splash": Pallas' TPU flash kernel (run by Pallas' interpreter on CPU) gives
the numbers and gradients of the "xla" reference for the masks it takes, refuses the others
with one clear sentence, and compiles to a Mosaic kernel for a TPU topology (libtpu)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import needs_libtpu
from references import HI

from transformer_jax import aot, ops
from transformer_jax.config import ModelConfig
from transformer_jax.ops import partition

TOL = 2e-5


def _rand(rng, *shape):
    return jnp.asarray(rng.standard_normal(shape).astype(np.float32))


def _packed(lengths_per_row, width):
    """Segment ids and per-segment positions of packed rows (0 = padding), as the packer
    writes them."""
    seg = np.zeros((len(lengths_per_row), width), np.int32)
    pos = np.zeros_like(seg)
    for r, lengths in enumerate(lengths_per_row):
        start = 0
        for i, n in enumerate(lengths):
            seg[r, start:start + n] = i + 1
            pos[r, start:start + n] = np.arange(n)
            start += n
    return jnp.asarray(seg), jnp.asarray(pos)


def _cases():
    seg_t, pos_t = _packed([[3, 5, 4], [7, 2]], 14)  # row 0 ends in 2 pads, row 1 in 5
    seg_s, _ = _packed([[6, 2, 9], [10, 1]], 19)  # sources of the same segments, no pad row
    valid = jnp.asarray(np.arange(19)[None] < np.array([[19], [11]]))
    return {
        "decoder_packed": (14, 14, dict(spec=ops.AttentionSpec(
            causal=True, q_positions=pos_t, k_positions=pos_t, q_segments=seg_t,
            k_segments=seg_t))),
        "decoder_unpacked": (14, 14, dict(spec=ops.AttentionSpec(causal=True))),
        "encoder_padded": (19, 19, dict(spec=ops.AttentionSpec(k_valid=valid))),
        # target rows 1 has 2 segments, its source 2: pad queries see no key at all
        "cross_packed": (14, 19, dict(spec=ops.AttentionSpec(q_segments=seg_t,
                                                             k_segments=seg_s))),
        "lengths_causal": (14, 14, dict(is_causal=True,
                                        key_value_seq_lengths=jnp.asarray([14, 6]))),
    }


@pytest.mark.parametrize("kind", list(_cases()))
def test_splash_matches_xla_values_and_gradients(kind):
    t, s, kwargs = _cases()[kind]
    rng = np.random.default_rng(len(kind))
    q, k, v, cot = _rand(rng, 2, t, 2, 8), _rand(rng, 2, s, 2, 8), _rand(rng, 2, s, 2, 8), None
    cot = _rand(rng, 2, t, 2, 8)

    def run(impl):
        fn = jax.jit(lambda q, k, v: ops.dot_product_attention(
            q, k, v, implementation=impl, precision=HI, **kwargs))
        out = fn(q, k, v)
        grads = jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v) * cot), argnums=(0, 1, 2))(q, k, v)
        return out, grads

    want, want_grads = run("xla")
    got, grads = run("splash")
    np.testing.assert_allclose(got, want, atol=TOL, rtol=TOL)
    for name, g, g_ref in zip("qkv", grads, want_grads, strict=True):
        assert np.all(np.isfinite(g)), name
        np.testing.assert_allclose(g, g_ref, atol=TOL, rtol=TOL, err_msg=f"d{name}")
    if kind == "cross_packed":  # padding queries: no key, zero output and gradient
        np.testing.assert_array_equal(got[0, 12:], 0.0)
        np.testing.assert_array_equal(grads[0][0, 12:], 0.0)
        assert np.all(got[0, :12] != 0)


def test_partitioned_runs_one_kernel_per_device_with_equal_numbers():
    # jit + shardings cannot split a Pallas kernel; `partitioned` wraps it in shard_map
    # (rows over "data", heads over "tensor"), as parallelism="sharded" traces its steps.
    t, _, kwargs = _cases()["decoder_packed"]
    rng = np.random.default_rng(5)
    q, k, v = (_rand(rng, 4, t, 2, 8) for _ in range(3))
    spec = kwargs["spec"]
    spec = ops.AttentionSpec(causal=True, q_positions=jnp.tile(spec.q_positions, (2, 1)),
                             k_positions=jnp.tile(spec.k_positions, (2, 1)),
                             q_segments=jnp.tile(spec.q_segments, (2, 1)),
                             k_segments=jnp.tile(spec.k_segments, (2, 1)))
    mesh = jax.make_mesh((2, 2), ("data", "tensor"), devices=jax.devices()[:4],
                         axis_types=(jax.sharding.AxisType.Auto,) * 2)

    def attend(q, k, v):
        return ops.dot_product_attention(q, k, v, spec=spec, implementation="splash")

    def partitioned(q, k, v):
        with partition.partitioned(mesh, ("data",), ("tensor",)):
            return attend(q, k, v)

    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    fn = jax.jit(partitioned, in_shardings=(rows,) * 3)
    assert "shard_map" in str(jax.make_jaxpr(partitioned)(q, k, v))
    np.testing.assert_allclose(fn(q, k, v), jax.jit(attend)(q, k, v), atol=1e-6)


@pytest.mark.parametrize("kwargs, message", [
    (dict(mask=jnp.ones((1, 1, 4, 4), bool)), "no dense mask or bias"),
    (dict(bias=jnp.zeros((1, 1, 4, 4))), "no dense mask or bias"),
    (dict(spec=ops.AttentionSpec(alibi_slopes=jnp.ones(2))), "no ALiBi"),
    (dict(dropout_rate=0.1, dropout_rng=jax.random.key(0)),
     "'splash' does not support attention dropout"),
    (dict(return_weights=True), "never materialises the weights"),
    (dict(spec=ops.AttentionSpec(causal=True, q_positions=jnp.arange(4)[None],
                                 k_positions=jnp.arange(4)[None])), "explicit positions"),
])
def test_splash_refuses_what_it_cannot_express(kwargs, message):
    x = jnp.zeros((1, 4, 2, 8))
    with pytest.raises(ValueError, match=message):
        ops.dot_product_attention(x, x, x, implementation="splash", **kwargs)
    for kwargs in (dict(is_causal=True), dict(local_window_size=(1, 1))):
        with pytest.raises(ValueError, match="needs T == S for a causal mask or a sliding"):
            ops.dot_product_attention(x[:, :3], x, x, implementation="splash", **kwargs)


def test_model_config_refuses_splash_with_attention_dropout_or_alibi():
    with pytest.raises(ValueError, match="'splash' does not support attention dropout"):
        ModelConfig(attention_impl="splash", attention_dropout_rate=0.1)
    with pytest.raises(ValueError, match="'splash' has no ALiBi"):
        ModelConfig(attention_impl="splash", positional="alibi")


def test_model_with_splash_matches_xla_on_packed_rows_and_decodes():
    from flax import nnx

    from transformer_jax.inference import make_translate_fn
    from transformer_jax.nn import Transformer, split_model

    seg, pos = _packed([[5, 4, 3], [9, 2]], 12)
    rng = np.random.default_rng(3)
    src = jnp.asarray(rng.integers(3, 50, (2, 12)), jnp.int32) * (seg > 0)
    tgt = jnp.asarray(rng.integers(3, 50, (2, 12)), jnp.int32) * (seg > 0)

    def loss_and_grads(impl):
        cfg = ModelConfig(vocab_size=50, d_model=16, num_heads=2, num_layers=1, d_ff=32,
                          max_len=16, attention_impl=impl, attention_precision="highest")
        model = Transformer(cfg, rngs=nnx.Rngs(0))

        def loss(model):
            logits = model({"inputs": src, "targets": tgt, "inputs_segmentation": seg,
                            "targets_segmentation": seg, "inputs_position": pos,
                            "targets_position": pos})
            return jnp.sum(jnp.where(seg[..., None] > 0, logits, 0.0) ** 2) / 1e3

        return nnx.value_and_grad(loss)(model), model

    (want, want_grads), xla_model = loss_and_grads("xla")
    (got, grads), splash_model = loss_and_grads("splash")
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for (path, g), (_, g_ref) in zip(nnx.to_flat_state(nnx.state(grads)),
                                     nnx.to_flat_state(nnx.state(want_grads)), strict=True):
        np.testing.assert_allclose(g[...], g_ref[...], atol=1e-5, rtol=1e-4, err_msg=str(path))
    # Translation: the encoder runs splash, the cached one-token decode steps "xla".
    sources = src * (seg == 1)  # each row's first sentence, right-padded

    def translate(model):
        model_def, params = split_model(model)
        return make_translate_fn(model_def, max_length=6)(params, sources)

    np.testing.assert_array_equal(translate(splash_model), translate(xla_model))


@needs_libtpu
@pytest.mark.parametrize("parallelism", ["shard_map", "sharded"])
def test_splash_compiles_to_a_mosaic_kernel_for_a_tpu_topology(parallelism):
    from test_aot import tiny_config

    config = tiny_config(parallelism=parallelism)
    config.sharding.fsdp, config.sharding.tensor = 2, 2  # "sharded": rows and heads split
    config.model.attention_impl = "splash"
    config.model.attention_dropout_rate = 0.0
    config.data.packing = True
    report = aot.run(config, topology="v5e:2x2")
    assert report["compiled"] and report["fits"]
    assert "tpu_custom_call" in report["custom_calls"]  # the splash kernels, not XLA attention
    for name in ("decode_greedy", "decode_beam4"):  # decoding compiles through "xla"
        assert report["programs"][name]["compiled"], name
