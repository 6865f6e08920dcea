"""LoRA: adapted == base at start, merge == adapted, only adapters train (with optimizer state
for them alone), adapters saved alone and refused on another base."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import packed_batch, tiny_train_config

from transformer_jax.checkpoints import load_adapters, save_adapters
from transformer_jax.config import ModelConfig
from transformer_jax.nn import build_model, split_model
from transformer_jax.nn.adapters import adapter_params, base_params, merge_lora
from transformer_jax.param_count import count_params
from transformer_jax.training import build_run, validate_config

V = 31
ALL = "query,key,value,out,wi,wo"


def _config(**overrides):
    base = dict(vocab_size=V, d_model=16, num_heads=4, num_layers=1, d_ff=32, dropout_rate=0.0,
                max_len=16, lora_rank=2, lora_targets=ALL, attention_precision="highest",
                num_kv_heads=2)
    return ModelConfig(**{**base, **overrides})


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    return {"inputs": jnp.asarray(rng.integers(1, V, (2, 6)), jnp.int32),
            "targets": jnp.asarray(rng.integers(1, V, (2, 5)), jnp.int32)}


def _randomised_b(params, seed=1):
    """Adapters with non-zero ``b`` (fresh ones start at zero)."""
    keys = iter(jax.random.split(jax.random.key(seed), 100))
    return jax.tree_util.tree_map_with_path(
        lambda p, x: 0.3 * jax.random.normal(next(keys), x.shape)
        if "_lora" in jax.tree_util.keystr(p) and jax.tree_util.keystr(p).endswith("['b']")
        else x, params)


@pytest.mark.parametrize("kind", ["encoder_decoder", "decoder_only"])
def test_adapters_start_as_the_base_and_merge_into_it(kind):
    config = _config()
    model_def, params = split_model(build_model(kind, config, nnx.Rngs(0)))
    plain_cfg, merged = merge_lora(config, params)
    plain_def, _ = split_model(build_model(kind, plain_cfg, nnx.Rngs(0)))
    batch = _batch()
    np.testing.assert_allclose(model_def.merge(params)(batch),
                               plain_def.merge(base_params(params))(batch), atol=1e-6)
    adapted = _randomised_b(params)
    plain_cfg, merged = merge_lora(config, adapted)
    got, want = plain_def.merge(merged)(batch), model_def.merge(adapted)(batch)
    assert float(jnp.abs(want - model_def.merge(params)(batch)).max()) > 1e-3  # b matters
    np.testing.assert_allclose(got, want, atol=2e-5)
    n_adapter = sum(x.size for x in jax.tree.leaves(adapter_params(params)))
    heads = {"query": 16, "key": 8, "value": 8, "out": 16}  # D_out: N*H or K*H
    per_attention = sum(2 * (16 + d_out) for d_out in heads.values())
    per_ffn = 2 * (16 + 32) * 2
    layers_attention = 3 if kind == "encoder_decoder" else 1  # enc self, dec self + cross
    layers_ffn = 2 if kind == "encoder_decoder" else 1
    assert n_adapter == layers_attention * per_attention + layers_ffn * per_ffn
    decoder_only = kind == "decoder_only"
    assert count_params(config, decoder_only=decoder_only) == sum(
        x.size for x in jax.tree.leaves(params))
    assert count_params(config, decoder_only=decoder_only, trainable=True) == n_adapter


@pytest.mark.parametrize("kind", ["encoder_decoder", "decoder_only"])
@pytest.mark.parametrize("targets", ["value", "query,out,wo", ALL])
def test_count_params_counts_the_adapters_as_the_trainable_part(kind, targets):
    config = _config(lora_targets=targets, num_decoder_heads=2, decoder_d_ff=24, use_bias=True)
    model = nnx.eval_shape(lambda: build_model(kind, config, nnx.Rngs(0)))
    _, params = split_model(model)
    decoder_only = kind == "decoder_only"
    assert count_params(config, decoder_only=decoder_only) == sum(
        x.size for x in jax.tree.leaves(params))
    assert count_params(config, decoder_only=decoder_only, trainable=True) == sum(
        x.size for x in jax.tree.leaves(adapter_params(params)))
    plain = config.replace(lora_rank=0)  # no adapters: everything trains
    assert count_params(plain, decoder_only=decoder_only, trainable=True) == count_params(
        plain, decoder_only=decoder_only) == sum(x.size for x in jax.tree.leaves(
            base_params(params)))


def test_training_updates_only_the_adapters_with_state_for_them_alone():
    c = tiny_train_config()
    c.data.packing = True
    c.model.lora_rank, c.model.lora_targets = 4, "query,value,wi"
    run = build_run(validate_config(c), vocab_size=64)
    state = run.strategy.put_state(run.init_state())
    before = jax.tree.map(np.asarray, state.params)
    batch = run.strategy.put_batch(run.select(packed_batch(8, 16, seed=2)))
    for _ in range(2):
        state, metrics = run.train_step(state, batch, run.strategy.put_rng(jax.random.key(0)))
    after = jax.tree.map(np.asarray, state.params)
    for old, new in zip(jax.tree.leaves(base_params(before)), jax.tree.leaves(base_params(after)),
                        strict=True):
        np.testing.assert_array_equal(old, new)
    changed = [not np.array_equal(o, n) for o, n in zip(
        jax.tree.leaves(adapter_params(before)), jax.tree.leaves(adapter_params(after)),
        strict=True)]
    assert all(changed)
    n_adapter = sum(x.size for x in jax.tree.leaves(adapter_params(after)))
    n_state = sum(x.size for x in jax.tree.leaves(state.opt_state) if np.ndim(x) > 0)
    assert n_state == 2 * n_adapter  # Adam's two moments, for the adapters only
    assert np.isfinite(float(metrics["grad_norm"])) and float(metrics["grad_norm"]) > 0


def test_adapters_save_alone_and_refuse_another_base(tmp_path):
    config = _config()
    _, params = split_model(build_model("decoder_only", config, nnx.Rngs(0)))
    trained = _randomised_b(params)
    sha = save_adapters(str(tmp_path), trained, config)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapters.json", "adapters.npz"]
    loaded = load_adapters(str(tmp_path), params)  # same base, fresh adapters
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(trained), strict=True):
        np.testing.assert_array_equal(a, b)
    _, other = split_model(build_model("decoder_only", config, nnx.Rngs(1)))
    with pytest.raises(ValueError, match=f"trained on base {sha[:12]}") as err:
        load_adapters(str(tmp_path), other)
    assert "\n" not in str(err.value)
    _, wrong = split_model(build_model("decoder_only", _config(lora_rank=3), nnx.Rngs(0)))
    with pytest.raises(ValueError, match="do not fit"):
        load_adapters(str(tmp_path), wrong)


def test_bad_lora_settings_are_one_sentence():
    with pytest.raises(ValueError, match="lora_targets='query,ffn' must name projections"):
        _config(lora_targets="query,ffn")
    with pytest.raises(ValueError, match="lora_rank=-1 must be a non-negative integer"):
        _config(lora_rank=-1)
