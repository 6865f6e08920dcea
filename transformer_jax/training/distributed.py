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
(``jax.local_devices()``). Devices are used process-major (:func:`process_major`), so each
process loads one contiguous block of every global batch (:func:`process_rows`) and the
drivers assemble the global batch with its global shape (:func:`global_batch`); orbax writes
one checkpoint collectively.

Decisions that change control flow are agreed by all processes, never taken by one alone:

* :func:`chief_first` (process 0 prepares the tokenizer/data first), :func:`from_chief`
  (a value computed by process 0) and :func:`barrier` wait on the coordination service's
  key-value store with a timeout (``distributed.barrier_timeout``): a failed or lost chief is
  an error on every process, never a hang in a device collective;
* :class:`StopVote` all-reduces the SIGTERM/Ctrl-C flag each update, so every process stops
  after the same one; :func:`agree` gathers one int per process (checkpoint outcomes);
* a process that dies stops sending heartbeats: after ``distributed.heartbeat_timeout``
  seconds JAX's coordination service ends every other process (non-zero exit, naming it).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax._src import distributed as jax_distributed  # the coordination-service client
from jax.experimental import multihost_utils

from transformer_jax.training.errors import ConfigError

__all__ = [
    "LAUNCHER_ENV",
    "DistributedError",
    "StopVote",
    "agree",
    "barrier",
    "check_distributed_config",
    "chief_first",
    "default_distributed_config",
    "from_chief",
    "global_batch",
    "initialize",
    "launcher_detected",
    "ordered_mesh",
    "process_major",
    "process_rows",
    "put_global",
    "to_local",
]

log = logging.getLogger(__name__)
T = TypeVar("T")
DEFAULT_BARRIER_TIMEOUT_S = 3600.0


class DistributedError(RuntimeError):
    """Another process failed, or did not arrive in time, at a point where all must agree."""


def default_distributed_config() -> ml_collections.ConfigDict:
    """``distributed.*`` keys: empty address = single process or the launcher's environment."""
    c = ml_collections.ConfigDict()
    c.coordinator_address = ""  # "host:port" of process 0; "" = from the environment / none
    c.num_processes = 0  # with coordinator_address: total processes (>= 1)
    c.process_id = -1  # with coordinator_address: this process, 0 .. num_processes - 1
    c.initialization_timeout = 300  # seconds to wait for all processes to connect
    # a process that stops sending heartbeats this long (killed, machine lost) ends the job:
    # every other process exits non-zero naming it (JAX's coordination service)
    c.heartbeat_timeout = 100
    # seconds processes wait for each other outside device collectives (process 0 preparing
    # the data, agreeing on the checkpoint to restore) before they give up with an error
    c.barrier_timeout = int(DEFAULT_BARRIER_TIMEOUT_S)
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
    for key in ("heartbeat_timeout", "barrier_timeout", "initialization_timeout"):
        if key in c and not (isinstance(c[key], int) and c[key] >= 1):
            raise ConfigError(f"distributed.{key}={c[key]!r} must be a positive number of "
                              "seconds.")
    if not (isinstance(i, int) and 0 <= i < n):
        raise ConfigError(
            f"distributed.process_id={i!r} must be in [0, {n}) when coordinator_address is set."
        )


# Variables that launchers set for multi-process jobs; JAX's cluster detection reads them.
LAUNCHER_ENV = (
    "JAX_COORDINATOR_ADDRESS",  # any launcher: with JAX_NUM_PROCESSES / JAX_PROCESS_ID (ours)
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


def _ranks_from(env: Mapping[str, str]) -> dict:
    """``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID`` (next to ``JAX_COORDINATOR_ADDRESS``, which
    JAX reads itself) as ``jax.distributed.initialize`` arguments."""
    out = {}
    for arg, name in (("num_processes", "JAX_NUM_PROCESSES"), ("process_id", "JAX_PROCESS_ID")):
        value = env.get(name, "").strip()
        if value:
            if not value.isdigit():
                raise ConfigError(f"{name}={value!r} must be a non-negative integer.")
            out[arg] = int(value)
    return out


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
    timeouts = {"initialization_timeout": int(c["initialization_timeout"]),
                "heartbeat_timeout_seconds": int(c["heartbeat_timeout"])}
    if c["coordinator_address"]:
        jax.distributed.initialize(
            c["coordinator_address"], c["num_processes"], c["process_id"], **timeouts)
        how = "config"
    elif (name := launcher_detected(environ)) is not None:
        log.info("multi-process launcher detected (%s); calling jax.distributed.initialize()",
                 name)
        jax.distributed.initialize(**_ranks_from(os.environ if environ is None else environ),
                                   **timeouts)
        how = "environment"
    else:
        return "single"
    log.info("process %d of %d, %d local / %d global devices", jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count())
    return how


def _client():
    """JAX's coordination-service client (key-value store, barriers); None without one."""
    return jax_distributed.global_state.client


_KEY_USES: dict[str, int] = {}


def _unique(name: str) -> str:
    """``name`` numbered by how often this process used it (all processes count alike)."""
    _KEY_USES[name] = _KEY_USES.get(name, 0) + 1
    return f"transformer_jax/{name}/{_KEY_USES[name]}"


def _publish(key: str, value: str) -> None:
    _client().key_value_set(key, value, allow_overwrite=True)


def _await(key: str, timeout_s: float, waiting_for: str) -> str:
    try:
        return _client().blocking_key_value_get(key, int(timeout_s * 1000))
    except Exception as err:  # noqa: BLE001 - jaxlib raises its own error types
        raise DistributedError(
            f"process {jax.process_index()} waited {timeout_s:.0f} s for {waiting_for} and "
            f"gave up ({' '.join(str(err).split())[:200]}); check that process's log, or raise "
            "distributed.barrier_timeout if it is only slow."
        ) from None


def chief_first(fn: Callable[[], T], name: str = "chief_first", *,
                timeout_s: float = DEFAULT_BARRIER_TIMEOUT_S) -> T:
    """Run ``fn`` on process 0, then on the other processes (which then find its outputs).

    For one-time preparation in a directory that all processes share (tokenizer training,
    dataset preparation); with a single process it is just ``fn()``. The processes wait on
    the coordination service's key-value store, never in a device collective: when ``fn``
    fails on the chief every other process raises :class:`DistributedError` saying so, and a
    process that waits longer than ``timeout_s`` (chief lost or stuck) raises too.
    """
    if jax.process_count() == 1 or _client() is None:
        return fn()
    name = _unique(name)
    me, count = jax.process_index(), jax.process_count()
    if me == 0:
        try:
            result = fn()
        except Exception as err:
            _publish(f"{name}/0", f"error: {' '.join(str(err).split())[:500]}")
            raise
        _publish(f"{name}/0", "ok")
    else:
        status = _await(f"{name}/0", timeout_s, f"process 0 to finish {name!r}")
        if status != "ok":
            raise DistributedError(f"process 0 failed in {name!r}: {status[len('error: '):]}")
        try:
            result = fn()
        except Exception as err:
            _publish(f"{name}/{me}", f"error: {' '.join(str(err).split())[:500]}")
            raise
        _publish(f"{name}/{me}", "ok")
    for other in range(1, count):  # everyone leaves together, or with the reason
        if other == me:
            continue
        status = _await(f"{name}/{other}", timeout_s, f"process {other} to finish {name!r}")
        if status != "ok":
            raise DistributedError(
                f"process {other} failed in {name!r}: {status[len('error: '):]}")
    return result


def from_chief(name: str, fn: Callable[[], Any],
               timeout_s: float = DEFAULT_BARRIER_TIMEOUT_S) -> Any:
    """``fn()`` computed on process 0 and sent (as JSON) to every process."""
    if jax.process_count() == 1 or _client() is None:
        return fn()
    key = _unique(name)
    if jax.process_index() == 0:
        value = fn()
        _publish(key, json.dumps(value))
        return value
    return json.loads(_await(key, timeout_s, f"process 0 to send {name!r}"))


def barrier(name: str, timeout_s: float = DEFAULT_BARRIER_TIMEOUT_S) -> None:
    """Wait until every process arrives here (coordination service, not a device collective);
    raises :class:`DistributedError` after ``timeout_s``."""
    if jax.process_count() == 1 or _client() is None:
        return
    try:
        _client().wait_at_barrier(_unique(name), int(timeout_s * 1000))
    except Exception as err:  # noqa: BLE001 - jaxlib raises its own error types
        raise DistributedError(
            f"process {jax.process_index()} waited {timeout_s:.0f} s at {name!r} for the other "
            f"processes and gave up ({' '.join(str(err).split())[:200]})."
        ) from None


class StopVote:
    """Agree across processes on stopping after the same update (SIGTERM to any one of them).

    Each update every process calls :meth:`vote` with its own flag; the flags are all-reduced
    (max) by a tiny computation over every device of the job, and the answer returned is the
    agreed flag of the *previous* vote, so that reading it waits at most for the previous
    update and the host keeps one update queued ahead. With one process the flag is used as
    it is.

    Args:
      devices: every device of the job (default ``jax.devices()``).
    """

    def __init__(self, devices: Sequence[Any] | None = None):
        self._multi = jax.process_count() > 1
        self._pending = None
        if not self._multi:
            return
        devices = process_major(jax.devices() if devices is None else devices)
        mesh = ordered_mesh((len(devices),), ("p",), devices, jax.sharding.AxisType.Explicit)
        self._split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("p"))
        self._local = sum(d.process_index == jax.process_index() for d in devices)
        self._any = jax.jit(lambda x: jnp.max(x), out_shardings=jax.sharding.NamedSharding(
            mesh, jax.sharding.PartitionSpec()))

    def vote(self, stop: int) -> int:
        """Submit this process's flag (0: go on, > 0: a reason to stop); returns the largest
        flag of all processes (0 when every process goes on)."""
        if not self._multi:
            return int(stop)
        flags = np.full((self._local,), int(stop), np.int32)
        agreed = self._any(jax.make_array_from_process_local_data(
            self._split, flags, (self._split.mesh.size,)))
        previous, self._pending = self._pending, agreed
        return 0 if previous is None else int(previous.addressable_shards[0].data)

    def agree_min(self, value: int) -> int:
        """The smallest of every process's ``value``, now (waits for all of them)."""
        if not self._multi:
            return int(value)
        flags = np.full((self._local,), -int(value), np.int32)
        agreed = self._any(jax.make_array_from_process_local_data(
            self._split, flags, (self._split.mesh.size,)))
        return -int(agreed.addressable_shards[0].data)


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


def agree(value: int) -> list[int]:
    """Every process's ``value`` (one int each), on every process; ``[value]`` alone."""
    if jax.process_count() == 1:
        return [int(value)]
    gathered = multihost_utils.process_allgather(np.asarray(value, np.int64))
    return [int(v) for v in np.asarray(gathered).reshape(-1)]
