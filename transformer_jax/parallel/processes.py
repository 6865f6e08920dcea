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
(``jax.local_devices()``); ``parallel.coordination`` makes them agree, ``parallel.placement``
lays data out over them. A process that dies stops sending heartbeats: after
``distributed.heartbeat_timeout`` seconds JAX's coordination service ends every other process
(non-zero exit, naming it).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

import jax
import ml_collections

from transformer_jax.errors import ConfigError

__all__ = [
    "DEFAULT_BARRIER_TIMEOUT_S",
    "LAUNCHER_ENV",
    "check_distributed_config",
    "default_distributed_config",
    "initialize",
    "launcher_detected",
    "ranks_from_environment",
]

log = logging.getLogger(__name__)
DEFAULT_BARRIER_TIMEOUT_S = 3600.0


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


def ranks_from_environment(env: Mapping[str, str]) -> dict:
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
        ranks = ranks_from_environment(os.environ if environ is None else environ)
        jax.distributed.initialize(**ranks, **timeouts)
        how = "environment"
    else:
        return "single"
    log.info("process %d of %d, %d local / %d global devices", jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count())
    return how
