"""Restore straight into the target shardings: each device receives only its shards."""

import collections

import jax
import numpy as np
import pytest
from flax import nnx
from helpers import adam_step, init_state, tiny_config

from transformer_jax.checkpoints import Checkpointer
from transformer_jax.nn import Transformer, split_model
from transformer_jax.parallel import Sharded, default_sharding_config


def _bytes_per_device(tree) -> dict:
    out = collections.Counter()
    for leaf in jax.tree_util.tree_leaves(tree):
        for shard in leaf.addressable_shards:
            out[shard.device] += shard.data.nbytes
    return out


def test_sharded_restore_reads_only_each_devices_shards(tmp_path):
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices (tests/conftest.py sets 8 virtual CPU devices)")
    config = default_sharding_config().to_dict()
    config.update(data=1, fsdp=8, tensor=1)
    config["rules"].update(embed="fsdp", mlp="fsdp", vocab="fsdp")
    model = Transformer(tiny_config(d_model=64, d_ff=128), rngs=nnx.Rngs(0))
    dp = Sharded(config, devices=jax.devices()[:8]).for_model(model)
    _, params = split_model(model)
    tx, _ = adam_step(None)
    state = dp.put_state(init_state(params, tx))
    ckpt = Checkpointer(str(tmp_path), async_save=False)
    ckpt.save(1, state, rng=jax.random.key(0))
    ckpt.wait()

    template = jax.eval_shape(lambda: init_state(params, tx))  # nothing allocated
    restored = ckpt.restore(template, 1, shardings=dp.state_shardings(template))["state"]
    ckpt.close()

    total = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(template.params)
                + jax.tree_util.tree_leaves(template.opt_state))
    per_device = _bytes_per_device((restored.params, restored.opt_state))
    assert set(per_device) == set(jax.devices()[:8])
    # fsdp=8 splits every large leaf; what stays replicated (norms, biases, counts) is small
    assert max(per_device.values()) < 0.25 * total, (per_device, total)
    # same placement as the state that was saved, and the same numbers
    for got, want in zip(jax.tree_util.tree_leaves(restored.params),
                         jax.tree_util.tree_leaves(state.params), strict=True):
        assert got.sharding.is_equivalent_to(want.sharding, got.ndim)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    # the former restore (all of it on the first device) for scale
    whole = Checkpointer(str(tmp_path)).restore(template, 1)["state"]
    assert _bytes_per_device((whole.params, whole.opt_state))[jax.devices()[0]] == total
