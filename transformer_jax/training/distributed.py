"""Multi-process (multi-host) start-up: ``jax.distributed`` from the config or the launcher.

One Python process per host (per GPU node, per TPU VM) runs the same command. Before any JAX
computation each process calls :func:`initialize`, which connects it to the others:

* ``distributed.coordinator_address`` set (``"10.0.0.1:1234"``): explicit start-up with
  ``distributed.num_processes`` and ``distributed.process_id`` (the coordinator is process 0).
* otherwise, when the environment shows a multi-process launcher (:data:`LAUNCHER_ENV`:
  ``JAX_COORDINATOR_ADDRESS``, SLURM with several tasks, Open MPI with several ranks, a
  multi-host Cloud TPU slice), ``jax.distributed.initialize()`` without arguments lets JAX's
  cluster detection read the addresses and ranks.
* otherwise nothing happens: a single process.

After that every process sees all devices (``jax.devices()``) and its own
(``jax.local_devices()``); the data pipeline reads shard ``jax.process_index()`` of
``jax.process_count()``, ``DataParallel`` assembles the global batch with
``jax.make_array_from_process_local_data`` and orbax writes one checkpoint collectively.
Work that must happen once per shared directory (training the tokenizer, preparing the TFDS
data) runs on process 0 first: :func:`chief_first`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from typing import TypeVar

import jax
import ml_collections
import numpy as np

from transformer_jax.training.errors import ConfigError

__all__ = [
    "LAUNCHER_ENV",
    "check_distributed_config",
    "chief_first",
    "default_distributed_config",
    "initialize",
    "launcher_detected",
    "put_global",
    "to_local",
]

log = logging.getLogger(__name__)
T = TypeVar("T")


def default_distributed_config() -> ml_collections.ConfigDict:
    """``distributed.*`` keys: empty address = single process or the launcher's environment."""
    c = ml_collections.ConfigDict()
    c.coordinator_address = ""  # "host:port" of process 0; "" = from the environment / none
    c.num_processes = 0  # with coordinator_address: total processes (>= 1)
    c.process_id = -1  # with coordinator_address: this process, 0 .. num_processes - 1
    c.initialization_timeout = 300  # seconds to wait for all processes to connect
    return c


def check_distributed_config(c: Mapping) -> None:
    """Raises ConfigError for an explicit set-up that cannot connect."""
    if not c["coordinator_address"]:
        return
    if ":" not in c["coordinator_address"]:
        raise ConfigError(
            f"distributed.coordinator_address={c['coordinator_address']!r} needs a port; "
            "write it as host:port (e.g. 10.0.0.1:1234)."
        )
    n, i = c["num_processes"], c["process_id"]
    if not (isinstance(n, int) and n >= 1):
        raise ConfigError(
            f"distributed.num_processes={n!r} must be >= 1 when coordinator_address is set."
        )
    if not (isinstance(i, int) and 0 <= i < n):
        raise ConfigError(
            f"distributed.process_id={i!r} must be in [0, {n}) when coordinator_address is set."
        )


# Variables that launchers set for multi-process jobs; JAX's cluster detection reads them.
LAUNCHER_ENV = (
    "JAX_COORDINATOR_ADDRESS",  # any launcher: with JAX_NUM_PROCESSES / JAX_PROCESS_ID
    "SLURM_NTASKS",  # srun with > 1 task
    "OMPI_COMM_WORLD_SIZE",  # mpirun with > 1 rank
    "TPU_WORKER_HOSTNAMES",  # Cloud TPU VM slice with > 1 host
    "MEGASCALE_COORDINATOR_ADDRESS",  # multi-slice TPU
)


def launcher_detected(environ: Mapping[str, str] | None = None) -> str | None:
    """Name of the first variable in :data:`LAUNCHER_ENV` that signals several processes."""
    env = os.environ if environ is None else environ
    for name in LAUNCHER_ENV:
        value = env.get(name, "").strip()
        if not value:
            continue
        if name in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
            if value.isdigit() and int(value) > 1:
                return name
        elif name == "TPU_WORKER_HOSTNAMES":
            if "," in value:
                return name
        else:
            return name
    return None


def initialize(config: Mapping | None = None, environ: Mapping[str, str] | None = None) -> str:
    """Connect this process to the others (see the module docstring); call before any JAX work.

    Args:
      config: the ``distributed`` config section (dict or ConfigDict) or None.
      environ: environment to inspect (default ``os.environ``).

    Returns:
      How the job started: ``"config"``, ``"environment"``, ``"already"`` (initialised before)
      or ``"single"``.
    """
    c = dict(default_distributed_config().to_dict(), **dict(config or {}))
    check_distributed_config(c)
    if jax.distributed.is_initialized():
        return "already"
    timeout = int(c["initialization_timeout"])
    if c["coordinator_address"]:
        jax.distributed.initialize(
            c["coordinator_address"], c["num_processes"], c["process_id"],
            initialization_timeout=timeout,
        )
        how = "config"
    elif (name := launcher_detected(environ)) is not None:
        log.info("multi-process launcher detected (%s); calling jax.distributed.initialize()",
                 name)
        jax.distributed.initialize(initialization_timeout=timeout)
        how = "environment"
    else:
        return "single"
    log.info("process %d of %d, %d local / %d global devices", jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count())
    return how


def chief_first(fn: Callable[[], T], name: str = "chief_first") -> T:
    """Run ``fn`` on process 0, then on the other processes (which then find its outputs).

    For one-time preparation in a directory that all processes share (tokenizer training,
    dataset preparation); with a single process it is just ``fn()``.
    """
    if jax.process_count() == 1:
        return fn()
    from jax.experimental import multihost_utils

    result = fn() if jax.process_index() == 0 else None
    multihost_utils.sync_global_devices(f"{name}:chief_done")
    if jax.process_index() != 0:
        result = fn()
    multihost_utils.sync_global_devices(f"{name}:all_done")
    return result  # type: ignore[return-value]


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
                from jax.experimental import multihost_utils

                x = multihost_utils.process_allgather(x, tiled=True)
        return jax.device_put(x, device)

    return jax.tree_util.tree_map(one, tree)
