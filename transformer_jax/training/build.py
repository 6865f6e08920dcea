"""One build path for a training run: model, optimizer, strategy, state layout, compiled steps.

The trainer (``training.loop``) and ahead-of-time compilation (``transformer_jax.aot``) both
call :func:`build_run`, so the program compiled for a TPU topology is the one ``train.py``
runs. Nothing is materialised: the model is abstract until :meth:`Run.init_state`::

    config = validate_config(config)
    run = build_run(config, vocab_size=tokenizer.vocab_size)
    state = run.strategy.put_state(run.init_state())
    state, metrics = run.train_step(state, run.strategy.put_batch(run.select(batch)), rng)
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from transformer_jax.config import ModelConfig
from transformer_jax.nn import ModelDef, build_model, split_model
from transformer_jax.nn.adapters import adapter_params
from transformer_jax.parallel import Strategy, make_strategy
from transformer_jax.training.defaults import model_config
from transformer_jax.training.lora import for_adapters
from transformer_jax.training.optim import make_optimizer
from transformer_jax.training.step import TrainState, create_train_state, eval_step, train_step

__all__ = ["PACKING_SUFFIXES", "Run", "build_run"]

PACKING_SUFFIXES = ("_segmentation", "_position")  # the arrays of packed rows, per side


@dataclasses.dataclass(frozen=True)
class Run:
    """Everything static about a training run, built once by :func:`build_run`.

    Attributes:
      config: the validated config as run (``model.vocab_size`` is the vocabulary's size).
      model_config: the ``ModelConfig``.
      model_def: the model's static definition (``nn.split_model``).
      batch_keys: the batch arrays the model reads (``nn.Model.batch_keys``).
      strategy: the parallelism strategy, bound to the model's parameters.
      tx, schedule: the optimizer and its learning-rate schedule.
      num_train_steps: the optimizer updates the schedule spans.
      abstract_state: the ``TrainState`` as ``jax.ShapeDtypeStruct``s.
      state_shardings: ``strategy.state_shardings(abstract_state)``.
      train_step: compiled ``(state, batch, rng) -> (state, metrics)`` (donates ``state``).
      eval_step: compiled ``(params, batch) -> summed metrics``.
    """

    config: ml_collections.ConfigDict
    model_config: ModelConfig
    model_def: ModelDef
    batch_keys: tuple[str, ...]
    strategy: Strategy
    tx: optax.GradientTransformation
    schedule: Callable
    num_train_steps: int
    abstract_state: TrainState
    state_shardings: Any
    train_step: Callable
    eval_step: Callable

    def select(self, batch: Mapping) -> dict:
        """The arrays of ``batch`` the model reads (its ``batch_keys`` and their packing
        arrays); a language model's batches leave the source side behind."""
        wanted = {key + suffix for key in self.batch_keys for suffix in ("", *PACKING_SUFFIXES)}
        return {k: v for k, v in batch.items() if k in wanted}

    def abstract_batch(self, rows: int) -> dict[str, jax.ShapeDtypeStruct]:
        """A micro-batch as the data pipeline yields it: int32 ``[rows, data.max_length]``
        per array (with the packing arrays when ``data.packing``), laid out as the compiled
        train step reads it."""
        suffixes = ("", *PACKING_SUFFIXES) if self.config.data.packing else ("",)
        shape = (rows, int(self.config.data.max_length))
        sharding = self.strategy.batch_sharding
        return {key + suffix: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=sharding)
                for key in self.batch_keys for suffix in suffixes}

    def abstract_args(self) -> tuple:
        """``(state, batch, rng)`` of the train step as placed ``jax.ShapeDtypeStruct``s."""
        state = jax.tree_util.tree_map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
            self.abstract_state, self.state_shardings)
        rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype,
                                   sharding=self.strategy.replicated)
        return state, self.abstract_batch(int(self.config.batch_size)), rng

    def init_state(self) -> TrainState:
        """A fresh state from ``config.seed``, created in :attr:`state_shardings`."""
        kind, cfg, seed = self.config.model_kind, self.model_config, self.config.seed
        make = functools.partial(build_model, kind, cfg)
        return jax.jit(lambda: create_train_state(split_model(make(nnx.Rngs(seed)))[1], self.tx),
                       out_shardings=self.state_shardings)()

    def state_from_params(self, params) -> TrainState:
        """A state at step 0 around given parameters (fine-tuning an imported model); leaves
        the given tree lacks (the LoRA adapters of a base trained without them) keep their
        fresh initial values."""
        kind, cfg, seed = self.config.model_kind, self.model_config, self.config.seed
        given = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(params)}

        def make(given):
            fresh = split_model(build_model(kind, cfg, nnx.Rngs(seed)))[1]
            full = jax.tree_util.tree_map_with_path(
                lambda p, x: given.get(jax.tree_util.keystr(p), x), fresh)
            return create_train_state(full, self.tx)

        return jax.jit(make, out_shardings=self.state_shardings)(given)

    def param_counts(self) -> dict[str, int]:
        """``{"total": ..., "trainable": ...}`` parameters of the model; training updates the
        LoRA adapters alone when the model has them (``model.lora_rank > 0``), else all."""
        params = self.abstract_state.params
        total = sum(x.size for x in jax.tree.leaves(params))
        trainable = (sum(x.size for x in jax.tree.leaves(adapter_params(params)))
                     if self.model_config.lora_rank else total)
        return {"total": int(total), "trainable": int(trainable)}

    def with_num_train_steps(self, steps: int) -> Run:
        """This run with a schedule that spans ``steps`` updates (and its step recompiled);
        the optimizer state's structure does not depend on the length."""
        tx, schedule = make_optimizer(self.config.optimizer, d_model=self.model_config.d_model,
                                      num_train_steps=steps)
        _, tx = for_adapters(self.model_config.lora_rank, self.model_def, tx)
        return dataclasses.replace(
            self, tx=tx, schedule=schedule, num_train_steps=steps,
            train_step=_compile_train_step(self, tx, schedule))


def _compile_train_step(run: Run, tx, schedule) -> Callable:
    opt, cfg = run.config.optimizer, run.model_config
    per_device = functools.partial(
        train_step, model_def=run.model_def, tx=tx, schedule=schedule,
        label_smoothing=float(opt.label_smoothing), dropout=cfg.uses_dropout,
        grad_accum_steps=int(opt.grad_accum_steps), pad_id=cfg.pad_id,
        loss_chunk=int(opt.loss_chunk))
    return run.strategy.compile_train_step(per_device, run.abstract_state)


def build_run(config: ml_collections.ConfigDict, *, vocab_size: int | None = None,
              strategy: Strategy | None = None, devices: Sequence[Any] | None = None,
              exportable: bool = False) -> Run:
    """The model, optimizer, state layout and compiled steps of a validated training config.

    Args:
      config: a config from ``validate_config``.
      vocab_size: V, the tokenizer's size (default ``data.vocab_size``).
      strategy: the parallelism strategy (default: ``make_strategy`` of the config's
        ``parallelism`` and ``sharding`` over ``devices``).
      devices: the devices of the default strategy (default: all).
      exportable: build with ``strategy.exportable()`` (steps that ``jax.export`` and
        ahead-of-time compilation take; pmap becomes the shard_map program it runs).
    """
    model_cfg = model_config(config, vocab_size)
    config = ml_collections.ConfigDict(config.to_dict())  # the config as run; the input stays
    config.model.vocab_size = model_cfg.vocab_size
    if strategy is None:
        strategy = make_strategy(config.parallelism, config.sharding, devices)
    if exportable:
        strategy = strategy.exportable()
    kind = config.model_kind
    abstract = nnx.eval_shape(lambda: build_model(kind, model_cfg, nnx.Rngs(config.seed)))
    strategy = strategy.for_model(abstract)  # parameter shardings from the logical axes
    model_def, params = split_model(abstract)
    steps = int(config.num_train_steps)
    tx, schedule = make_optimizer(config.optimizer, d_model=model_cfg.d_model,
                                  num_train_steps=steps)
    model_def, tx = for_adapters(model_cfg.lora_rank, model_def, tx)
    abstract_state = jax.eval_shape(lambda p: create_train_state(p, tx), params)
    eval_fn = functools.partial(eval_step, model_def=model_def,
                                label_smoothing=float(config.optimizer.label_smoothing),
                                pad_id=model_cfg.pad_id,
                                loss_chunk=int(config.optimizer.loss_chunk))
    run = Run(config=config, model_config=model_cfg, model_def=model_def,
              batch_keys=tuple(abstract.batch_keys), strategy=strategy, tx=tx,
              schedule=schedule, num_train_steps=steps, abstract_state=abstract_state,
              state_shardings=strategy.state_shardings(abstract_state), train_step=None,
              eval_step=strategy.compile_eval_step(eval_fn))
    return dataclasses.replace(run, train_step=_compile_train_step(run, tx, schedule))
