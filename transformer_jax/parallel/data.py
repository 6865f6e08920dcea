"""Data-parallel strategies: parameters replicated, the batch split over a "data" axis.

* :class:`SingleDevice` (``"none"``): ``jax.jit`` on one device.
* :class:`ShardMap` (``"shard_map"``): ``jax.jit(jax.shard_map(...))`` over a 1-D mesh; the
  state is replicated with a ``NamedSharding``, the batch split along its first axis.
* :class:`Pmap` (``"pmap"``): ``jax.pmap`` over ALL devices of the job in process-major order
  (each process feeds its local devices); the state carries a leading local-device axis.

The per-device functions (``training.step`` with ``axis_name="data"``) sum gradients and
counts explicitly with ``lax.psum``. ``shard_map`` runs with ``check_vma=False`` so that, as
under ``pmap``, the gradient of a replicated parameter is the device's own gradient (with the
default ``check_vma=True`` it would come back already summed over the axis and the explicit
``psum`` would count it ``n`` times).

Devices are ordered process-major, so the global batch rows ``[i * B / P, (i + 1) * B / P)``
of process ``i`` (of ``P``) land on its own devices.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from transformer_jax.errors import ConfigError
from transformer_jax.parallel.placement import (
    global_batch,
    ordered_mesh,
    process_major,
    process_rows,
    put_global,
)
from transformer_jax.parallel.strategy import AXIS, check_divisible

__all__ = ["DataParallel", "Pmap", "ShardMap", "SingleDevice"]


class DataParallel:
    """What the data-parallel strategies share: a 1-D ``"data"`` mesh over their devices,
    replicated parameters and a batch split evenly over the devices.

    Args:
      devices: devices to use (default: every device of the job).
    """

    def __init__(self, devices: Sequence[Any] | None = None):
        devices = process_major(jax.devices() if devices is None else devices)
        self.devices = self._use(devices)
        self.num_devices = len(self.devices)
        self.local_devices = [d for d in self.devices
                              if d.process_index == jax.process_index()]
        explicit = jax.sharding.AxisType.Explicit
        self.mesh = ordered_mesh((self.num_devices,), (AXIS,), self.devices, explicit)
        self.replicated = NamedSharding(self.mesh, P())
        self.batch_sharding = NamedSharding(self.mesh, P(AXIS))
        self._data_shard = process_rows(NamedSharding(self.mesh, P(AXIS)), self.num_devices)

    def _use(self, devices: list) -> list:
        """The devices this strategy runs on, out of all given."""
        return devices

    def check_batch_size(self, batch_size: int) -> int:
        return check_divisible(batch_size, self.num_devices, f"the {self.num_devices} devices")

    def data_shard(self) -> tuple[int, int]:
        return self._data_shard

    def for_model(self, model) -> DataParallel:
        """Itself: parameters are replicated whatever the model."""
        return self

    def state_shardings(self, tree):
        return jax.tree_util.tree_map(lambda _: self.replicated, tree)

    def put_state(self, tree):
        return put_global(tree, self.replicated)

    def get_state(self, tree):
        return tree

    def put_batch(self, batch: Mapping[str, np.ndarray]):
        return global_batch(self.batch_sharding, batch, self.data_shard()[1])

    def put_rng(self, key):
        return put_global(key, self.replicated)

    def metrics(self, tree) -> dict[str, float]:
        return {k: float(v) for k, v in jax.device_get(tree).items()}

    def exportable(self) -> DataParallel:
        return self


class ShardMap(DataParallel):
    """``jax.jit(jax.shard_map(per_device))`` over the ``"data"`` axis (see the module)."""

    name = "shard_map"

    def compile_train_step(self, per_device: Callable, state=None) -> Callable:
        mapped = jax.shard_map(
            lambda s, b, r: per_device(s, b, r, axis_name=AXIS),
            mesh=self.mesh,
            in_specs=(P(), P(AXIS), P()),
            out_specs=(P(), P()),
            check_vma=False,
        )
        return jax.jit(mapped, donate_argnums=0)

    def compile_eval_step(self, per_device: Callable) -> Callable:
        mapped = jax.shard_map(
            lambda p, b: per_device(p, b, axis_name=AXIS),
            mesh=self.mesh,
            in_specs=(P(), P(AXIS)),
            out_specs=P(),
            check_vma=False,
        )
        return jax.jit(mapped)


class SingleDevice(DataParallel):
    """``jax.jit`` on the first device (one process only)."""

    name = "none"

    def __init__(self, devices: Sequence[Any] | None = None):
        if jax.process_count() > 1:
            raise ConfigError(
                "parallelism='none' runs on one device but this job has "
                f"{jax.process_count()} processes; use 'shard_map', 'pmap' or 'sharded'."
            )
        super().__init__(devices)
        self.device = self.devices[0]
        self.batch_sharding = self.replicated  # one device holds every row

    def _use(self, devices: list) -> list:
        return devices[:1]

    def state_shardings(self, tree):
        one = jax.sharding.SingleDeviceSharding(self.device)
        return jax.tree_util.tree_map(lambda _: one, tree)

    def put_state(self, tree):
        return jax.device_put(tree, self.device, may_alias=False)

    def put_batch(self, batch: Mapping[str, np.ndarray]):
        return jax.device_put(dict(batch), self.device)

    def put_rng(self, key):
        return jax.device_put(key, self.device)

    def compile_train_step(self, per_device: Callable, state=None) -> Callable:
        return jax.jit(lambda s, b, r: per_device(s, b, r, axis_name=None), donate_argnums=0)

    def compile_eval_step(self, per_device: Callable) -> Callable:
        return jax.jit(lambda p, b: per_device(p, b, axis_name=None))


class Pmap(DataParallel):
    """``jax.pmap`` over every device of the job; arrays carry a leading axis over this
    process's devices (see the module). Since JAX 0.8 pmap runs on jit + shard_map: it drives
    the same per-device step as :class:`ShardMap`."""

    name = "pmap"

    def __init__(self, devices: Sequence[Any] | None = None):
        super().__init__(devices)
        local = ordered_mesh((len(self.local_devices),), (AXIS,), self.local_devices,
                             jax.sharding.AxisType.Explicit)
        self._local_split = NamedSharding(local, P(AXIS))

    def put_state(self, tree):
        n = len(self.local_devices)

        def stack(x):
            if isinstance(x, jax.Array) and not x.is_fully_addressable:
                x = x.addressable_shards[0].data  # replicated: this process's copy
            x = jax.device_put(x, self.local_devices[0], may_alias=False)
            return jax.device_put(jnp.broadcast_to(x[None], (n, *x.shape)), self._local_split)

        return jax.tree_util.tree_map(stack, tree)

    def get_state(self, tree):
        """The per-device copies as one replicated ``jax.Array`` over all devices (no copy),
        which every process can pass to orbax together."""

        def unstack(x):
            parts = [s.data.reshape(x.shape[1:]) for s in x.addressable_shards]
            return jax.make_array_from_single_device_arrays(x.shape[1:], self.replicated, parts)

        return jax.tree_util.tree_map(unstack, tree)

    def put_batch(self, batch: Mapping[str, np.ndarray]):
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
        return jax.device_put(key, self.local_devices[0])

    def metrics(self, tree) -> dict[str, float]:
        tree = jax.tree_util.tree_map(lambda x: x.addressable_shards[0].data[0], tree)
        return super().metrics(tree)

    def compile_train_step(self, per_device: Callable, state=None) -> Callable:
        return jax.pmap(
            lambda s, b, r: per_device(s, b, r, axis_name=AXIS),
            axis_name=AXIS,
            in_axes=(0, 0, None),
            donate_argnums=(0,),
            devices=self.devices,  # all devices of the job: psum spans the processes
        )

    def compile_eval_step(self, per_device: Callable) -> Callable:
        return jax.pmap(lambda p, b: per_device(p, b, axis_name=AXIS), axis_name=AXIS,
                        devices=self.devices)

    def exportable(self) -> ShardMap:
        """pmap cannot be exported or compiled ahead of time: the same per-device step
        under ``shard_map`` over the same devices, which is the program pmap runs."""
        return ShardMap(self.devices)
