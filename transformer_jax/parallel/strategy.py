"""The interface every parallelism strategy implements, and what they share.

A strategy decides where the training state and the batches live and compiles the per-device
steps of ``training.step`` for that layout. The trainer, the evaluator and ahead-of-time
compilation drive every strategy through this interface alone, so adding a mode means adding
one class (``parallel.data``: none, pmap, shard_map; ``parallel.mesh``: a data/fsdp/tensor
mesh) and one entry in ``parallel.choose``::

    strategy = make_strategy("shard_map", sharding_config)
    rows = strategy.check_batch_size(batch_size)       # rows this process loads
    strategy = strategy.for_model(abstract_model)      # parameter layout (mesh strategy)
    step = strategy.compile_train_step(per_device, abstract_state)
    state = strategy.put_state(state)
    state, metrics = step(state, strategy.put_batch(rows), strategy.put_rng(key))
    strategy.metrics(metrics)                          # host floats

Per-device functions are called as ``per_device(state, batch, rng, axis_name=...)`` (and
``per_device(params, batch, axis_name=...)`` for evaluation); a strategy that needs the
parameters constrained before use also passes ``param_constraint=``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

import jax
import numpy as np

from transformer_jax.errors import ConfigError

__all__ = ["AXIS", "Strategy", "check_divisible"]

AXIS = "data"  # the mesh axis the data-parallel strategies split the batch over


class Strategy(Protocol):
    """Placement and compilation for one parallelism mode."""

    name: str  # the ``parallelism`` config value
    mesh: jax.sharding.Mesh  # the devices the step runs on
    devices: list  # every device of the job that runs the step, process-major
    batch_sharding: jax.sharding.Sharding  # a global batch inside the compiled step
    replicated: jax.sharding.Sharding  # a value every device holds (the PRNG key)

    def check_batch_size(self, batch_size: int) -> int:
        """Validate a global batch size (ConfigError); return the rows this process loads."""

    def data_shard(self) -> tuple[int, int]:
        """``(index, count)``: this process loads row block ``index`` of ``count`` equal
        blocks of every global batch (processes that share a block load the same rows)."""

    def for_model(self, model) -> Strategy:
        """The strategy for this (abstract) model's parameters; place state after it."""

    def state_shardings(self, tree) -> Any:
        """Shardings of :meth:`get_state`'s view of ``tree`` (targets for a restore)."""

    def put_state(self, tree) -> Any:
        """Any-placed pytree (also :meth:`get_state`'s view) -> the step's placement; copies."""

    def get_state(self, tree) -> Any:
        """The step's placement -> one global array per leaf that orbax saves from every
        process."""

    def put_batch(self, batch: Mapping[str, np.ndarray]) -> dict:
        """This process's rows of the global batch -> device arrays."""

    def put_rng(self, key) -> jax.Array:
        """A PRNG key placed the way the compiled step expects it."""

    def metrics(self, tree) -> dict[str, float]:
        """Step outputs (already summed over devices) -> host floats."""

    def compile_train_step(self, per_device: Callable, state) -> Callable:
        """``step(state, batch, rng) -> (state, metrics)`` that donates ``state``; ``state``
        (abstract is enough) gives the state's structure."""

    def compile_eval_step(self, per_device: Callable) -> Callable:
        """``eval(params, batch) -> summed metrics``."""

    def exportable(self) -> Strategy:
        """The strategy whose compiled steps are ``jax.jit`` functions that ``jax.export`` and
        ahead-of-time compilation take (itself, except for pmap)."""


def check_divisible(batch_size: int, shards: int, what: str) -> int:
    """Rows per process of a global batch split into ``shards`` equal parts."""
    n = int(np.lcm(shards, jax.process_count()))
    if batch_size < 1 or batch_size % n:
        procs = f" and {jax.process_count()} processes" if jax.process_count() > 1 else ""
        raise ConfigError(
            f"batch_size={batch_size} is not divisible by {what}{procs}; use a multiple of {n}."
        )
    return batch_size // jax.process_count()
