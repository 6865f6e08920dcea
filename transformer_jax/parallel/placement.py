"""Devices and arrays across processes: ordering, meshes, row blocks, global arrays.

Devices are used process-major (:func:`process_major`), so each process loads one contiguous
block of every global batch (:func:`process_rows`) and the strategies assemble the global
batch with its global shape (:func:`global_batch`). :func:`put_global` places a pytree that
every process holds in full; :func:`to_local` brings a global one back to this process.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from transformer_jax.errors import ConfigError

__all__ = [
    "global_batch",
    "ordered_mesh",
    "process_major",
    "process_rows",
    "put_global",
    "to_local",
]


def put_global(tree, shardings):
    """``jax.device_put(tree, shardings)`` that also works with several processes; copies.

    With one process this is ``device_put``. With several, ``device_put`` refuses arrays
    committed to a local device (a restored checkpoint, a key); here every process passes the
    same full value and keeps its addressable shards (``make_array_from_callback``). Arrays
    that already span processes are resharded with ``device_put``.
    """
    if jax.process_count() == 1:
        return jax.device_put(tree, shardings, may_alias=False)

    def one(x, sharding):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return jax.device_put(x, sharding, may_alias=False)
        if jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key):
            data = one(jax.random.key_data(x), sharding)
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
        host = np.asarray(jax.device_get(x))
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    if isinstance(shardings, jax.sharding.Sharding):
        return jax.tree_util.tree_map(lambda x: one(x, shardings), tree)
    return jax.tree_util.tree_map(one, tree, shardings)


def to_local(tree, device=None):
    """Copy of ``tree`` on one local device (default the first), also for global arrays.

    Replicated arrays that span processes take this process's copy; arrays split across
    processes are gathered (a collective: every process must call this together).
    """
    device = jax.local_devices()[0] if device is None else device

    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            if x.is_fully_replicated:
                x = x.addressable_shards[0].data
            else:
                x = multihost_utils.process_allgather(x, tiled=True)
        return jax.device_put(x, device)

    return jax.tree_util.tree_map(one, tree)


def process_major(devices: Sequence[Any]) -> list:
    """Devices sorted by (process, id): process ``i``'s devices form the ``i``-th block."""
    return sorted(devices, key=lambda d: (d.process_index, d.id))


def ordered_mesh(shape: Sequence[int], axis_names: Sequence[str], devices: Sequence[Any],
                 axis_type) -> jax.sharding.Mesh:
    """A mesh over ``devices`` (all axes of ``axis_type``) that keeps each process's devices
    together.

    ``jax.make_mesh`` orders TPU devices by their physical coordinates; that order is kept
    where it leaves every process's devices in one block, else the mesh takes ``devices`` in
    their given (``process_major``) order: on v5e-256 the physical order gave process 0 batch
    blocks 0, 1, 16 and 17 of a 256-device data axis, not one contiguous run of rows to load.
    """
    mesh = jax.make_mesh(tuple(shape), tuple(axis_names), devices=list(devices),
                         axis_types=(axis_type,) * len(axis_names))
    processes = [d.process_index for d in mesh.devices.flat]
    if processes == sorted(processes):
        return mesh
    grid = np.asarray(list(devices), dtype=object).reshape(tuple(shape))
    return jax.sharding.Mesh(grid, tuple(axis_names),
                             axis_types=(axis_type,) * len(axis_names))


def process_rows(sharding: jax.sharding.Sharding, shards: int) -> tuple[int, int]:
    """``(index, count)`` of the batch rows this process must hold under ``sharding``.

    The rows of a global batch split into ``shards`` blocks (over its first axis) that this
    process's devices hold must be one contiguous run of ``1 / count`` of the batch, starting
    at block ``index``; a mesh that interleaves processes is a :class:`ConfigError`.
    Processes that share a block (a replicated axis spanning processes) load the same rows.
    """
    held = {sl[0].indices(shards)[:2]
            for sl in sharding.addressable_devices_indices_map((shards,)).values()}
    lo, hi = min(a for a, _ in held), max(b for _, b in held)
    covered = set().union(*(range(a, b) for a, b in held))
    size = hi - lo
    if covered != set(range(lo, hi)) or shards % size or lo % size:
        raise ConfigError(
            f"the device mesh gives process {jax.process_index()} batch blocks "
            f"{sorted(covered)} of {shards}, which are not one aligned run; order the mesh "
            "devices process-major (jax.devices() order) or change sharding.data/fsdp/tensor."
        )
    return lo // size, shards // size


def global_batch(sharding: jax.sharding.Sharding, batch: Mapping[str, np.ndarray],
                 count: int) -> dict:
    """This process's rows (one of ``count`` row blocks) -> global arrays under ``sharding``.

    The global shape is given explicitly, so that JAX checks the rows against the mesh
    instead of assuming the process order.
    """
    out = {}
    for key, value in batch.items():
        value = np.asarray(value)
        shape = (value.shape[0] * count, *value.shape[1:])
        out[key] = jax.make_array_from_process_local_data(sharding, value, shape)
    return out
