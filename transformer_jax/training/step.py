"""Pure training and evaluation steps over ``(graphdef, params)`` from ``nnx.split``.

The model object never enters the compiled functions: ``ModelDef`` (from ``nn.split_model``)
holds the static graph definition and ``params`` is a plain nested dict of arrays.
``train_step(state, batch, rng) -> (state, metrics)`` is written once, per device: when
``axis_name`` is given it sums gradients and counts over that axis, so the same function runs
under ``jax.jit`` (one device or a sharded mesh), ``jax.pmap`` and ``jax.shard_map`` (the
strategies of ``transformer_jax.parallel`` compile it). The model is called as every model
is, ``model(batch)`` (``nn.model``), so nothing here depends on the model's kind.

Loss normalisation: every device computes the *sum* of its token losses; sums of loss,
gradient and target-token count are added over devices, and the gradient is divided by the
global token count. One device and eight devices therefore see the same numbers (up to the
order of float additions). With gradient accumulation each micro-batch's gradient is its own
per-token mean and ``optax.MultiSteps`` averages the k means: equal to one k-times batch when
the micro-batches hold equally many target tokens (close to it with packed rows).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from transformer_jax.nn import ModelDef
from transformer_jax.ops import cross_entropy, fused_cross_entropy, token_accuracy

__all__ = [
    "TrainState",
    "create_train_state",
    "eval_step",
    "forward",
    "train_step",
]

Batch = dict[str, jax.Array]
# What a parallelism strategy applies to the parameters before the forward pass, e.g. the
# mesh strategy's sharding constraint that all-gathers FSDP-split weights (None: nothing).
ParamConstraint = Callable[[Any], Any] | None


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training, as one pytree.

    Attributes:
      step: int32 scalar, number of ``train_step`` calls done (micro-batches when gradients
        are accumulated; optimizer updates are ``step // grad_accum_steps``).
      params: nested dict of parameter arrays (float32 master weights).
      opt_state: optax state for ``params``.
    """

    step: jax.Array
    params: Any
    opt_state: Any


def create_train_state(params, tx: optax.GradientTransformation) -> TrainState:
    """Fresh state at step 0."""
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def forward(model_def: ModelDef, params, batch: Batch, dropout_rng=None, *,
            param_constraint: ParamConstraint = None, hidden: bool = False) -> jax.Array:
    """Teacher-forced float32 logits ``[B, T, V]`` of a batch of (possibly packed) rows:
    ``model(batch)`` of the model ``model_def.merge(params)`` (see ``nn.model``); with
    ``hidden=True`` the final hidden states ``[B, T, D]`` (``model.hidden(batch)``) instead.

    ``param_constraint`` (from the parallelism strategy) is applied to ``params`` first.
    """
    if param_constraint is not None:
        params = param_constraint(params)
    model = model_def.merge(params)
    if hidden:
        return model.hidden(batch, dropout_rng=dropout_rng)
    return model(batch, dropout_rng=dropout_rng).astype(jnp.float32)


def _sums(out, batch: Batch, label_smoothing: float, pad_id: int,
          projection=None, loss_chunk: int = 0) -> dict[str, jax.Array]:
    """Per-device sums: smoothed loss, NLL, correct tokens, target and source tokens.

    ``out`` is the logits ``[B, T, V]``, or with ``loss_chunk > 0`` the hidden states
    ``[B, T, D]`` and ``projection = (kernel, bias)``: then ``ops.fused_cross_entropy``
    applies the output projection ``loss_chunk`` positions at a time.
    """
    targets = batch["targets"]  # [B, T]
    weights = (targets != pad_id).astype(jnp.float32)  # [B, T]
    if loss_chunk > 0:
        kernel, bias = projection
        fused = fused_cross_entropy(out, kernel, targets, weights, bias=bias,
                                    label_smoothing=label_smoothing, chunk=loss_chunk)
        loss_sum, nll_sum, correct_sum, weight_sum = fused
    else:
        loss_sum, weight_sum = cross_entropy(out, targets, weights, label_smoothing)
        nll_sum = loss_sum
        if label_smoothing > 0:
            nll_sum, _ = cross_entropy(out, targets, weights, 0.0)
        correct_sum, _ = token_accuracy(out, targets, weights)
    inputs = batch.get("inputs")  # absent for a decoder-only LM
    src_tokens = jnp.zeros((), jnp.float32)
    if inputs is not None:
        src_tokens = jnp.sum((inputs != pad_id).astype(jnp.float32))
    return {
        "loss_sum": loss_sum,
        "nll_sum": nll_sum,
        "correct_sum": correct_sum,
        "weight_sum": weight_sum,
        "src_tokens": src_tokens,
    }


def _projection(model_def: ModelDef, params, param_constraint: ParamConstraint, loss_chunk):
    """``(kernel, bias)`` of the model's output layer for the fused loss (None without it)."""
    if loss_chunk <= 0:
        return None
    if param_constraint is not None:
        params = param_constraint(params)
    return model_def.merge(params).output_projection()


def _psum(tree, axis_name):
    return tree if axis_name is None else jax.lax.psum(tree, axis_name)


def _row_keys(rng, step, rows: int, axis_name: str | None) -> jax.Array:
    """Dropout keys ``[B]`` of this device's rows: ``fold_in(fold_in(rng, step), global row)``."""
    base = jax.random.fold_in(rng, step)
    first = 0 if axis_name is None else jax.lax.axis_index(axis_name) * rows
    return jax.vmap(lambda r: jax.random.fold_in(base, r))(first + jnp.arange(rows))


def _ratio(num, den):
    return num / jnp.maximum(den, 1.0)


def train_step(
    state: TrainState,
    batch: Batch,
    rng: jax.Array,
    *,
    model_def: ModelDef,
    tx: optax.GradientTransformation,
    schedule: Callable[[jax.Array], jax.Array],
    label_smoothing: float = 0.0,
    dropout: bool = True,
    grad_accum_steps: int = 1,
    pad_id: int = 0,
    axis_name: str | None = None,
    param_constraint: ParamConstraint = None,
    loss_chunk: int = 0,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer call on one (micro-)batch.

    Args:
      state: current :class:`TrainState` (donated by the compiled wrappers).
      batch: int32 arrays ``inputs [B, S]``, ``targets [B, T]`` and optionally the
        ``*_segmentation`` / ``*_position`` arrays of packed rows. ``B`` is the per-device
        batch when ``axis_name`` is set.
      rng: base PRNG key; batch row ``r`` of the global batch draws its dropout masks from
        ``fold_in(fold_in(rng, step), r)``, so a run is reproducible, resumable and the same
        on any number of devices and processes (devices hold consecutive global rows).
      model_def, tx, schedule: static model definition, optimizer and its schedule.
      label_smoothing: eps of the smoothed cross entropy.
      dropout: False runs the model deterministically.
      grad_accum_steps: k of ``optax.MultiSteps`` (only used to report the learning rate).
      pad_id: id whose target positions carry no loss.
      axis_name: mapped axis to sum over (``"data"``), or None on one device.
      param_constraint: applied to the parameters before the forward pass (the mesh
        strategy's all-gather of FSDP-split weights); None leaves them as they are.
      loss_chunk: 0 computes the loss from the float32 ``[B, T, V]`` logits; ``C > 0`` uses
        ``ops.fused_cross_entropy`` over chunks of ``C`` positions (same numbers, only
        ``[C, V]`` logits at a time).

    Returns:
      ``(new_state, metrics)`` with float32 scalars ``loss`` (smoothed, per target token),
      ``nll``, ``accuracy``, ``grad_norm`` (of the token-averaged gradient, before clipping),
      ``learning_rate``, ``tokens`` (non-pad target tokens) and ``src_tokens``.
    """
    def loss_fn(params):
        run = functools.partial(forward, model_def, params, param_constraint=param_constraint,
                                hidden=loss_chunk > 0)
        if dropout:  # one key per global row: masks do not depend on the device count
            keys = _row_keys(rng, state.step, batch["targets"].shape[0], axis_name)  # [B]
            out = jax.vmap(lambda row, key: run(  # [B, T, V] logits or [B, T, D] hidden
                jax.tree_util.tree_map(lambda x: x[None], row), key)[0])(batch, keys)
        else:
            out = run(batch)  # [B, T, V] logits or [B, T, D] hidden
        projection = _projection(model_def, params, param_constraint, loss_chunk)
        sums = _sums(out, batch, label_smoothing, pad_id, projection, loss_chunk)
        return sums["loss_sum"], sums

    grads, sums = jax.grad(loss_fn, has_aux=True)(state.params)
    grads, sums = _psum((grads, sums), axis_name)
    grads = jax.tree_util.tree_map(lambda g: g / jnp.maximum(sums["weight_sum"], 1.0), grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        "loss": _ratio(sums["loss_sum"], sums["weight_sum"]),
        "nll": _ratio(sums["nll_sum"], sums["weight_sum"]),
        "accuracy": _ratio(sums["correct_sum"], sums["weight_sum"]),
        "grad_norm": optax.tree.norm(grads),
        "learning_rate": jnp.asarray(schedule(state.step // grad_accum_steps), jnp.float32),
        "tokens": sums["weight_sum"],
        "src_tokens": sums["src_tokens"],
    }
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    return new_state, metrics


def eval_step(
    params,
    batch: Batch,
    *,
    model_def: ModelDef,
    label_smoothing: float = 0.0,
    pad_id: int = 0,
    axis_name: str | None = None,
    param_constraint: ParamConstraint = None,
    loss_chunk: int = 0,
) -> dict[str, jax.Array]:
    """Summed metrics of one evaluation batch (add them up, then divide by ``weight_sum``).

    Returns:
      float32 scalars ``loss_sum``, ``nll_sum``, ``correct_sum``, ``weight_sum``,
      ``src_tokens`` (summed over ``axis_name`` when given). ``loss_chunk`` as in
      :func:`train_step`.
    """
    out = forward(model_def, params, batch, param_constraint=param_constraint,
                  hidden=loss_chunk > 0)  # [B, T, V] logits or [B, T, D] hidden
    projection = _projection(model_def, params, param_constraint, loss_chunk)
    return _psum(_sums(out, batch, label_smoothing, pad_id, projection, loss_chunk), axis_name)
