"""build_run: one build of model, optimizer, strategy, state layout and steps, for any kind."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import packed_batch, tiny_train_config

from transformer_jax.training import build_run, validate_config


def _config(kind="encoder_decoder", **top):
    c = tiny_train_config(model_kind=kind, **top)
    c.data.packing = True
    return validate_config(c)


@pytest.mark.parametrize("kind, keys", [
    ("encoder_decoder", {"inputs", "inputs_segmentation", "inputs_position", "targets",
                         "targets_segmentation", "targets_position"}),
    ("decoder_only", {"targets", "targets_segmentation", "targets_position"}),
])
def test_the_model_kind_decides_the_batch_and_nothing_else_asks(kind, keys):
    run = build_run(_config(kind), vocab_size=50)
    assert run.model_config.vocab_size == 50 and run.config.model.vocab_size == 50
    assert set(run.abstract_batch(8)) == keys
    batch = packed_batch(8, 16, seed=1)  # both sides, plus an index the model never reads
    batch["index"] = np.arange(8)
    assert set(run.select(batch)) == keys
    assert all(s.shape == (8, 16) and s.dtype == jnp.int32 for s in run.abstract_batch(8).values())


def test_the_run_trains_from_its_own_state():
    run = build_run(_config(), vocab_size=64)
    assert run.strategy.name == "none"
    state = run.strategy.put_state(run.init_state())
    assert jax.tree_util.tree_structure(state) == jax.tree_util.tree_structure(
        run.abstract_state)
    batch = run.strategy.put_batch(run.select(packed_batch(8, 16, seed=2)))
    rng = run.strategy.put_rng(jax.random.key(0))
    losses = []
    for _ in range(3):
        state, metrics = run.train_step(state, batch, rng)
        losses.append(run.strategy.metrics(metrics)["loss"])
    assert int(state.step) == 3 and losses[2] < losses[0]
    sums = run.strategy.metrics(run.eval_step(state.params, batch))
    assert sums["weight_sum"] == float((packed_batch(8, 16, seed=2)["targets"] != 0).sum())


def test_a_new_length_rebuilds_the_schedule_not_the_state():
    config = tiny_train_config(num_train_steps=100)
    config.optimizer.schedule = "warmup_cosine"
    run = build_run(validate_config(config), vocab_size=64)
    shorter = run.with_num_train_steps(10)
    assert shorter.num_train_steps == 10 and shorter.train_step is not run.train_step
    assert jax.tree_util.tree_structure(shorter.abstract_state) == jax.tree_util.tree_structure(
        run.abstract_state)
    peak = config.optimizer.learning_rate
    assert float(shorter.schedule(10)) == pytest.approx(0.0, abs=1e-9)  # annealed at 10
    assert float(run.schedule(10)) > 0.9 * peak  # 100 updates: still near the peak


def test_abstract_args_are_placed_for_the_compiled_step():
    run = build_run(_config(parallelism="shard_map", batch_size=8), vocab_size=64)
    state, batch, rng = run.abstract_args()
    assert run.strategy.name == "shard_map" and len(run.strategy.devices) == 8
    assert batch["targets"].sharding == run.strategy.batch_sharding
    lowered = run.train_step.trace(state, batch, rng).lower()  # compiles for the mesh
    assert "all-reduce" in lowered.as_text() or "all_reduce" in lowered.as_text()
