"""train_step: token-normalised loss, accumulation, dropout keys, bf16 compute."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from helpers import VOCAB, init_state, synthetic_batch, tiny_model

from transformer_jax.nn import shift_right
from transformer_jax.ops import cross_entropy
from transformer_jax.training import make_optimizer, train_step
from transformer_jax.training.defaults import default_optimizer_config
from transformer_jax.training.step import forward

LS = 0.1


def _step(model_def, tx, **kwargs):
    fn = functools.partial(train_step, model_def=model_def, tx=tx, schedule=lambda c: 1.0,
                           label_smoothing=LS, **kwargs)
    return jax.jit(fn)


def _numpy_smoothed_loss(logits, targets, eps):
    """Mean over non-pad tokens of KL(q || softmax(logits)), by loops in float64."""
    logits = np.asarray(logits, np.float64)
    total, count = 0.0, 0
    vocab = logits.shape[-1]
    for b in range(targets.shape[0]):
        for t in range(targets.shape[1]):
            if targets[b, t] == 0:
                continue
            z = logits[b, t] - logits[b, t].max()
            logp = z - np.log(np.exp(z).sum())
            q = np.full(vocab, eps / (vocab - 1))
            q[targets[b, t]] = 1 - eps
            total += float(np.sum(q * (np.log(q) - logp)))
            count += 1
    return total / count, count


def test_loss_is_mean_over_non_pad_target_tokens():
    model_def, params = tiny_model()
    batch = synthetic_batch(4, length=8, seed=3)
    targets = batch["targets"]
    assert 0 < (targets == 0).sum() < targets.size  # some padding, some tokens

    def teacher_forced(p):  # the pieces, with the decoder inputs spelled out
        model = model_def.merge(p)
        return model.decode(shift_right(targets), encoded=model.encode(batch["inputs"]),
                            src_ids=batch["inputs"])[0]

    logits = jax.jit(teacher_forced)(params)  # [B, T, V]
    expected, count = _numpy_smoothed_loss(logits, targets, LS)
    loss_sum, weight_sum = jax.jit(cross_entropy, static_argnums=3)(logits, targets,
                                                                    targets != 0, LS)
    assert float(weight_sum) == count == int((targets != 0).sum())
    assert float(loss_sum) / count == pytest.approx(expected, rel=1e-5)

    tx = optax.sgd(1.0)  # params_new = params - grad
    step = _step(model_def, tx, dropout=False)
    state, metrics = step(init_state(params, tx), batch, jax.random.key(0))
    assert metrics["loss"] == pytest.approx(expected, rel=1e-5)
    assert metrics["tokens"] == count
    assert metrics["src_tokens"] == int((batch["inputs"] != 0).sum())

    # The applied gradient is that of the per-token mean, not of the per-row or summed loss.
    def mean_loss(p):
        lg = forward(model_def, p, batch)
        s, w = cross_entropy(lg, targets, targets != 0, LS)
        return s / w

    grads = jax.jit(jax.grad(mean_loss))(params)
    applied = jax.tree_util.tree_map(lambda a, b: a - b, params, state.params)
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), applied, grads)
    norm = np.sqrt(sum(np.sum(np.square(g)) for g in jax.tree_util.tree_leaves(grads)))
    assert metrics["grad_norm"] == pytest.approx(float(norm), rel=1e-5)

    # Extra all-padding rows add no tokens: same loss and the same update.
    padded = {k: np.concatenate([v, np.zeros_like(v[:2])]) for k, v in batch.items()}
    state2, metrics2 = step(init_state(params, tx), padded, jax.random.key(0))
    assert metrics2["tokens"] == count
    assert metrics2["loss"] == pytest.approx(float(metrics["loss"]), rel=1e-6)
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
        state2.params, state.params)


def _same_count_micro_batches(k, rows, seed):
    """k micro-batches whose targets have the same number of non-pad tokens."""
    first = synthetic_batch(rows, seed=seed)
    rng = np.random.default_rng(seed + 100)
    micro = [first]
    for _ in range(k - 1):
        other = synthetic_batch(rows, seed=int(rng.integers(1 << 30)))
        fresh = rng.integers(3, VOCAB, size=first["targets"].shape).astype(np.int32)
        other["targets"] = np.where(first["targets"] != 0, np.where(
            first["targets"] == 1, 1, fresh), 0).astype(np.int32)
        micro.append(other)
    return micro


def test_gradient_accumulation_equals_one_big_batch():
    """k micro-batches through optax.MultiSteps == one batch of k times the rows.

    train_step averages each micro-batch over its own tokens and MultiSteps averages the k
    gradients, so the two agree when the micro-batches hold equally many target tokens.
    """
    k, rows = 3, 4
    model_def, params = tiny_model(use_bias=False)
    opt = ml_collections.ConfigDict(default_optimizer_config().to_dict())
    opt.schedule, opt.learning_rate, opt.warmup_steps, opt.eps = "warmup_rsqrt", 1e-2, 2, 1e-3
    opt.clip_norm = 1.0
    big_tx, _ = make_optimizer(opt, d_model=32, num_train_steps=10)
    opt.grad_accum_steps = k
    acc_tx, schedule = make_optimizer(opt, d_model=32, num_train_steps=10)

    big_step = _step(model_def, big_tx, dropout=False)
    acc_step = jax.jit(functools.partial(
        train_step, model_def=model_def, tx=acc_tx, schedule=schedule, label_smoothing=LS,
        dropout=False, grad_accum_steps=k))
    big = init_state(params, big_tx)
    acc = init_state(params, acc_tx)
    rng = jax.random.key(0)
    lrs = []
    for update in range(2):  # two updates: Adam's moments and the schedule both matter
        micro = _same_count_micro_batches(k, rows, seed=10 * update)
        whole = {key: np.concatenate([m[key] for m in micro]) for key in micro[0]}
        big, _ = big_step(big, whole, rng)
        for i, m in enumerate(micro):
            before = acc.params
            acc, metrics = acc_step(acc, m, rng)
            lrs.append(float(metrics["learning_rate"]))
            if i < k - 1:  # nothing moves until the k-th micro-batch
                jax.tree_util.tree_map(np.testing.assert_array_equal, acc.params, before)
    assert int(acc.step) == 2 * k and int(big.step) == 2
    assert lrs == pytest.approx([float(schedule(0))] * k + [float(schedule(1))] * k)
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
        acc.params, big.params)
    moved = jax.tree_util.tree_map(lambda a, b: float(np.abs(a - b).max()), big.params, params)
    assert max(jax.tree_util.tree_leaves(moved)) > 1e-2


def test_dropout_keys_are_folded_with_the_step_and_the_row():
    model_def, params = tiny_model(dropout=0.3)
    batch = synthetic_batch(4, seed=5)
    tx = optax.sgd(0.0)  # parameters stay put: only the dropout mask changes the loss
    step = _step(model_def, tx, dropout=True)
    rng = jax.random.key(42)

    def loss_at(step_number, key=rng):
        state = init_state(params, tx).replace(step=np.int32(step_number))
        return float(step(state, batch, key)[1]["loss"])

    same = [loss_at(3), loss_at(3)]
    assert same[0] == same[1]  # same step, same key: the same masks
    assert len({loss_at(0), loss_at(1), same[0]}) == 3  # other steps: other masks
    assert loss_at(3, jax.random.key(43)) != same[0]
    # Row r's masks at step s are drawn from fold_in(fold_in(rng, s), r) (the global row, so
    # the masks do not depend on how rows are spread over devices).
    row_forward = jax.jit(forward, static_argnums=0)
    logits = np.concatenate([
        row_forward(model_def, params, {k: v[r:r + 1] for k, v in batch.items()},
                    jax.random.fold_in(jax.random.fold_in(rng, 3), r))
        for r in range(len(batch["targets"]))])
    expected, _ = _numpy_smoothed_loss(logits, batch["targets"], LS)
    assert same[0] == pytest.approx(expected, rel=1e-5)
    no_dropout = jax.jit(functools.partial(
        train_step, model_def=model_def, tx=tx, schedule=lambda c: 1.0, label_smoothing=LS,
        dropout=False))
    plain = float(no_dropout(init_state(params, tx), batch, rng)[1]["loss"])
    assert plain != same[0]


def test_bfloat16_compute_keeps_float32_master_weights():
    model_def, params = tiny_model(dtype="bfloat16")
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(params))
    tx = optax.adam(1e-5)  # steps far below bfloat16 resolution (2^-8 relative)
    step = _step(model_def, tx, dropout=False)
    state, metrics = step(init_state(params, tx), synthetic_batch(4, seed=6),
                          jax.random.key(0))
    assert metrics["loss"].dtype == jnp.float32 and np.isfinite(float(metrics["loss"]))
    leaves = jax.tree_util.tree_leaves(state.params)
    assert all(x.dtype == jnp.float32 for x in leaves)
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(state.opt_state)
               if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating))
    # The small updates survive: bfloat16 weights would have rounded them away.
    kernel_old = np.asarray(jax.tree_util.tree_leaves(params)[0])
    kernel_new = np.asarray(leaves[0])
    changed = np.abs(kernel_new - kernel_old) > 0
    assert changed.mean() > 0.5
    assert np.abs(kernel_new - kernel_old).max() < 2e-5
    rounded = np.asarray(jnp.asarray(kernel_new, jnp.bfloat16).astype(jnp.float32))
    assert not np.array_equal(rounded, kernel_new)
