"""Data parallelism: one per-device step, three drivers.

* ``"none"``: ``jax.jit`` on a single device.
* ``"pmap"``: ``jax.pmap`` over the local devices; the state carries a leading device axis.
* ``"shard_map"``: ``jax.jit(jax.shard_map(...))`` over a 1-D mesh with axis ``"data"``;
  the state is replicated with a ``NamedSharding``, the batch split along its first axis.

The per-device functions (``step.train_step`` / ``step.eval_step`` with ``axis_name="data"``)
sum gradients and counts explicitly with ``lax.psum``. ``shard_map`` runs with
``check_vma=False`` so that, as under ``pmap``, the gradient of a replicated parameter is the
device's own gradient (with the default ``check_vma=True`` it would come back already summed
over the axis and the explicit ``psum`` would count it ``n`` times).

Callers only move data through :class:`DataParallel`: ``put_state`` / ``get_state`` for the
train state, ``put_batch`` for a host batch, ``metrics`` for the step outputs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from transformer_jax.training.distributed import put_global

__all__ = ["AXIS", "MODES", "DataParallel", "resolve_mode"]

AXIS = "data"
MODES = ("none", "pmap", "shard_map")


def resolve_mode(mode: str | None, num_devices: int) -> str:
    """``"auto"``/None -> ``"none"`` on one device, else ``"shard_map"``."""
    if mode in (None, "", "auto"):
        return "none" if num_devices == 1 else "shard_map"
    if mode not in MODES:
        raise ValueError(
            f"unknown parallelism={mode!r}; choose one of {', '.join(MODES)} or 'auto'."
        )
    return mode


class DataParallel:
    """Places state and batches and compiles per-device steps for one parallelism mode.

    Args:
      mode: ``"none"``, ``"pmap"``, ``"shard_map"`` or ``"auto"``.
      devices: devices to use (default: all devices; ``"none"`` uses the first one, ``"pmap"``
        the local ones).
    """

    def __init__(self, mode: str | None = "auto", devices: Sequence[Any] | None = None):
        devices = list(jax.devices() if devices is None else devices)
        self.mode = resolve_mode(mode, len(devices))
        if self.mode == "none":
            if jax.process_count() > 1:
                raise ValueError(
                    "parallelism='none' runs on one device but this job has "
                    f"{jax.process_count()} processes; use 'shard_map' or 'pmap'."
                )
            devices = devices[:1]
        elif self.mode == "pmap":
            devices = [d for d in devices if d.process_index == jax.process_index()]
        self.devices = devices
        self.num_devices = len(devices)  # devices in this process for pmap, global otherwise
        self.mesh = jax.make_mesh(
            (len(devices),), (AXIS,), axis_types=(jax.sharding.AxisType.Explicit,),
            devices=devices,
        )
        self._replicated = NamedSharding(self.mesh, P())
        self._split = NamedSharding(self.mesh, P(AXIS))

    # ----------------------------------------------------------------- batch size
    @property
    def global_devices(self) -> int:
        """Devices across all processes that share one global batch."""
        if self.mode == "pmap":
            return self.num_devices * jax.process_count()
        return self.num_devices

    def check_batch_size(self, batch_size: int) -> int:
        """Validate the global batch and return the rows each process loads."""
        n = self.global_devices
        if batch_size < 1 or batch_size % n:
            raise ValueError(
                f"batch_size={batch_size} is not divisible by the {n} devices; "
                f"use a multiple of {n}."
            )
        return batch_size // jax.process_count()

    # ----------------------------------------------------------------- placement
    def put_state(self, tree):
        """Host/any-placed pytree -> the placement the compiled step expects.

        Always copies, so donating the result never deletes the caller's arrays.
        """
        if self.mode == "none":
            return jax.device_put(tree, self.devices[0], may_alias=False)
        if self.mode == "shard_map":
            return put_global(tree, self._replicated)  # also across processes
        n = self.num_devices

        def stack(x):
            x = jnp.asarray(x)
            return jax.device_put(jnp.broadcast_to(x[None], (n, *x.shape)), self._split)

        return jax.tree_util.tree_map(stack, tree)

    def get_state(self, tree):
        """Inverse of :meth:`put_state`: one copy per leaf (still jax arrays)."""
        if self.mode != "pmap":
            return tree

        def first(x):
            shard = x.addressable_shards[0].data  # [1, ...]
            return shard[0]

        return jax.tree_util.tree_map(first, tree)

    def put_batch(self, batch: dict[str, np.ndarray]):
        """Process-local host batch ``[b, ...]`` -> device arrays split over devices."""
        if self.mode == "none":
            return jax.device_put(batch, self.devices[0])
        if self.mode == "shard_map":
            return {
                k: jax.make_array_from_process_local_data(self._split, np.asarray(v))
                for k, v in batch.items()
            }
        n = self.num_devices

        def reshape(x):
            x = np.asarray(x)
            if x.shape[0] % n:
                raise ValueError(
                    f"a batch of {x.shape[0]} rows cannot be split over {n} local devices; "
                    f"use a multiple of {n}."
                )
            return jax.device_put(x.reshape(n, x.shape[0] // n, *x.shape[1:]), self._split)

        return {k: reshape(v) for k, v in batch.items()}

    def metrics(self, tree) -> dict[str, float]:
        """Step outputs (already summed over devices) -> host floats."""
        tree = self.get_state(tree)
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
                devices=self.devices,
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

    def put_rng(self, key):
        """Replicate a PRNG key the way the compiled step expects it."""
        if self.mode == "shard_map":
            return put_global(key, self._replicated)
        return jax.device_put(key, self.devices[0])
