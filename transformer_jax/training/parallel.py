"""Parallelism drivers: one per-device step, placed and compiled by a :class:`Parallel`.

* ``"none"``: ``jax.jit`` on a single device.
* ``"pmap"``: ``jax.pmap`` over ALL devices of the job in process-major order (each process
  feeds its local devices); the state carries a leading local-device axis.
* ``"shard_map"``: ``jax.jit(jax.shard_map(...))`` over a 1-D mesh with axis ``"data"``;
  the state is replicated with a ``NamedSharding``, the batch split along its first axis.
* ``"sharded"``: ``jax.jit`` over a ("data", "fsdp", "tensor") mesh (``sharding.Sharded``).

The per-device functions (``step.train_step`` / ``step.eval_step`` with ``axis_name="data"``)
sum gradients and counts explicitly with ``lax.psum``. ``shard_map`` runs with
``check_vma=False`` so that, as under ``pmap``, the gradient of a replicated parameter is the
device's own gradient (with the default ``check_vma=True`` it would come back already summed
over the axis and the explicit ``psum`` would count it ``n`` times).

Devices are ordered process-major everywhere, so the global batch rows ``[i * B / P, (i + 1) *
B / P)`` of process ``i`` (of ``P``) land on its own devices: :meth:`Parallel.data_shard` says
which rows a process loads, and ``put_batch`` assembles the global batch with its global shape.

Callers only move data through the driver: ``put_state`` / ``get_state`` for the train state
(``get_state`` gives one global, replicated or sharded view that orbax can save from every
process), ``put_batch`` for this process's host rows, ``metrics`` for the step outputs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from transformer_jax.training.distributed import (
    global_batch,
    ordered_mesh,
    process_major,
    process_rows,
    put_global,
)
from transformer_jax.training.errors import ConfigError

__all__ = ["AXIS", "MODES", "DataParallel", "Parallel", "resolve_mode"]

AXIS = "data"
MODES = ("none", "pmap", "shard_map")


@runtime_checkable
class Parallel(Protocol):
    """What the training loop and the evaluator need from a parallelism driver."""

    mode: str
    devices: list  # every device of the job that runs the step, process-major
    num_devices: int

    def prepare(self, model) -> None:
        """Read what the driver needs from the model (parameter shardings) before placing."""

    def check_batch_size(self, batch_size: int) -> int:
        """Validate a global batch size; return the rows this process loads."""

    def data_shard(self) -> tuple[int, int]:
        """``(index, count)``: this process loads row block ``index`` of ``count`` equal
        blocks of every global batch (processes that share a block load the same rows)."""

    def state_shardings(self, tree):
        """Shardings of :meth:`get_state`'s view of ``tree`` (targets for a restore)."""

    def put_state(self, tree): ...

    def get_state(self, tree): ...

    def put_batch(self, batch: Mapping[str, np.ndarray]): ...

    def put_rng(self, key): ...

    def metrics(self, tree) -> dict[str, float]: ...

    def train_step(self, per_device: Callable) -> Callable: ...

    def eval_step(self, per_device: Callable) -> Callable: ...


def resolve_mode(mode: str | None, num_devices: int) -> str:
    """``"auto"``/None -> ``"none"`` on one device, else ``"shard_map"``."""
    if mode in (None, "", "auto"):
        return "none" if num_devices == 1 else "shard_map"
    if mode not in MODES:
        raise ValueError(
            f"unknown parallelism={mode!r}; choose one of {', '.join(MODES)} or 'auto'."
        )
    return mode


def check_divisible(batch_size: int, shards: int, what: str) -> int:
    """Rows per process of a global batch split into ``shards`` equal parts."""
    n = int(np.lcm(shards, jax.process_count()))
    if batch_size < 1 or batch_size % n:
        procs = f" and {jax.process_count()} processes" if jax.process_count() > 1 else ""
        raise ConfigError(
            f"batch_size={batch_size} is not divisible by {what}{procs}; use a multiple of {n}."
        )
    return batch_size // jax.process_count()


class DataParallel:
    """Places state and batches and compiles per-device steps for one data-parallel mode.

    Args:
      mode: ``"none"``, ``"pmap"``, ``"shard_map"`` or ``"auto"``.
      devices: devices to use (default: every device of the job; ``"none"`` uses the first).
    """

    def __init__(self, mode: str | None = "auto", devices: Sequence[Any] | None = None):
        devices = process_major(jax.devices() if devices is None else devices)
        self.mode = resolve_mode(mode, len(devices))
        if self.mode == "none":
            if jax.process_count() > 1:
                raise ConfigError(
                    "parallelism='none' runs on one device but this job has "
                    f"{jax.process_count()} processes; use 'shard_map', 'pmap' or 'sharded'."
                )
            devices = devices[:1]
        self.devices = devices
        self.num_devices = len(devices)
        self.local_devices = [d for d in devices if d.process_index == jax.process_index()]
        explicit = jax.sharding.AxisType.Explicit
        self.mesh = ordered_mesh((len(devices),), (AXIS,), devices, explicit)
        self._replicated = NamedSharding(self.mesh, P())
        self._split = NamedSharding(self.mesh, P(AXIS))
        # pmap takes (and returns) arrays with a leading axis over this process's devices
        self._local_mesh = ordered_mesh((len(self.local_devices),), (AXIS,),
                                        self.local_devices, explicit)
        self._local_split = NamedSharding(self._local_mesh, P(AXIS))
        self._data_shard = process_rows(self._split, self.num_devices)

    @property
    def global_devices(self) -> int:
        """Devices across all processes that share one global batch."""
        return self.num_devices

    def prepare(self, model) -> None:
        """Nothing to read from the model: parameters are replicated."""

    def check_batch_size(self, batch_size: int) -> int:
        """Validate the global batch and return the rows each process loads."""
        return check_divisible(batch_size, self.num_devices, f"the {self.num_devices} devices")

    def data_shard(self) -> tuple[int, int]:
        return self._data_shard

    # ----------------------------------------------------------------- placement
    def state_shardings(self, tree):
        one = (jax.sharding.SingleDeviceSharding(self.devices[0]) if self.mode == "none"
               else self._replicated)
        return jax.tree_util.tree_map(lambda _: one, tree)

    def put_state(self, tree):
        """Any-placed pytree (also :meth:`get_state`'s view) -> the step's placement.

        Always copies, so donating the result never deletes the caller's arrays.
        """
        if self.mode == "none":
            return jax.device_put(tree, self.devices[0], may_alias=False)
        if self.mode == "shard_map":
            return put_global(tree, self._replicated)
        n = len(self.local_devices)

        def stack(x):
            if isinstance(x, jax.Array) and not x.is_fully_addressable:
                x = x.addressable_shards[0].data  # replicated: this process's copy
            x = jax.device_put(x, self.local_devices[0], may_alias=False)
            return jax.device_put(jnp.broadcast_to(x[None], (n, *x.shape)), self._local_split)

        return jax.tree_util.tree_map(stack, tree)

    def get_state(self, tree):
        """Inverse of :meth:`put_state`: one global array per leaf, replicated over the job.

        For pmap the per-device copies become one replicated ``jax.Array`` over all devices
        (no copy), which every process can pass to orbax together.
        """
        if self.mode != "pmap":
            return tree

        def unstack(x):
            parts = [s.data.reshape(x.shape[1:]) for s in x.addressable_shards]
            return jax.make_array_from_single_device_arrays(x.shape[1:], self._replicated, parts)

        return jax.tree_util.tree_map(unstack, tree)

    def put_batch(self, batch: Mapping[str, np.ndarray]):
        """This process's rows ``[b, ...]`` of the global batch -> device arrays."""
        if self.mode == "none":
            return jax.device_put(dict(batch), self.devices[0])
        if self.mode == "shard_map":
            return global_batch(self._split, batch, self.data_shard()[1])
        n = len(self.local_devices)

        def reshape(x):
            x = np.asarray(x)
            if x.shape[0] % n:
                raise ConfigError(
                    f"a batch of {x.shape[0]} rows cannot be split over {n} local devices; "
                    f"use a multiple of {n}."
                )
            return jax.device_put(x.reshape(n, x.shape[0] // n, *x.shape[1:]), self._local_split)

        return {k: reshape(v) for k, v in batch.items()}

    def put_rng(self, key):
        """Replicate a PRNG key the way the compiled step expects it."""
        if self.mode == "shard_map":
            return put_global(key, self._replicated)
        return jax.device_put(key, self.local_devices[0])

    def metrics(self, tree) -> dict[str, float]:
        """Step outputs (already summed over devices) -> host floats."""
        if self.mode == "pmap":
            tree = jax.tree_util.tree_map(lambda x: x.addressable_shards[0].data[0], tree)
        return {k: float(v) for k, v in jax.device_get(tree).items()}

    # ----------------------------------------------------------------- compile
    def train_step(self, per_device: Callable) -> Callable:
        """Compile ``per_device(state, batch, rng, axis_name=...) -> (state, metrics)``.

        The returned ``step(state, batch, rng)`` donates ``state``.
        """
        if self.mode == "none":
            return jax.jit(lambda s, b, r: per_device(s, b, r, axis_name=None), donate_argnums=0)
        if self.mode == "pmap":
            return jax.pmap(
                lambda s, b, r: per_device(s, b, r, axis_name=AXIS),
                axis_name=AXIS,
                in_axes=(0, 0, None),
                donate_argnums=(0,),
                devices=self.devices,  # all devices of the job: psum spans the processes
            )
        mapped = jax.shard_map(
            lambda s, b, r: per_device(s, b, r, axis_name=AXIS),
            mesh=self.mesh,
            in_specs=(P(), P(AXIS), P()),
            out_specs=(P(), P()),
            check_vma=False,
        )
        return jax.jit(mapped, donate_argnums=0)

    def eval_step(self, per_device: Callable) -> Callable:
        """Compile ``per_device(params, batch, axis_name=...) -> summed metrics``."""
        if self.mode == "none":
            return jax.jit(lambda p, b: per_device(p, b, axis_name=None))
        if self.mode == "pmap":
            return jax.pmap(
                lambda p, b: per_device(p, b, axis_name=AXIS),
                axis_name=AXIS,
                devices=self.devices,
            )
        mapped = jax.shard_map(
            lambda p, b: per_device(p, b, axis_name=AXIS),
            mesh=self.mesh,
            in_specs=(P(), P(AXIS)),
            out_specs=P(),
            check_vma=False,
        )
        return jax.jit(mapped)
