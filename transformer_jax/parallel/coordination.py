"""Decisions every process agrees on, never taken by one process alone.

* :func:`chief_first` (process 0 prepares the tokenizer/data first), :func:`from_chief` (a
  value computed by process 0) and :func:`barrier` wait for each other at a barrier of JAX's
  coordination service with a timeout (``distributed.barrier_timeout``): a failed or lost
  chief is an error on every process, never a hang in a device collective. Once all are at
  the barrier, the outcome (a value, or process 0's error message) goes to every process in a
  small device collective, which cannot hang any more.
* :class:`StopVote` all-reduces the SIGTERM/Ctrl-C flag each update, so every process stops
  after the same one; :func:`agree` gathers one int per process (checkpoint outcomes).
* :func:`first_failure`: once all agreed that one of them failed (the training loop's vote),
  every process learns which one and its message, in one small device collective.

With one process every function here is a plain call.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from orbax.checkpoint import multihost

from transformer_jax.errors import DistributedError
from transformer_jax.parallel.placement import ordered_mesh, process_major
from transformer_jax.parallel.processes import DEFAULT_BARRIER_TIMEOUT_S

__all__ = ["StopVote", "agree", "barrier", "chief_first", "first_failure", "from_chief"]

T = TypeVar("T")
STATUS_BYTES = 512  # an error message sent between processes is cut to this many bytes

_KEY_USES: dict[str, int] = {}


def _unique(name: str) -> str:
    """``name`` numbered by how often this process used it (all processes count alike)."""
    _KEY_USES[name] = _KEY_USES.get(name, 0) + 1
    return f"transformer_jax/{name}/{_KEY_USES[name]}"


def _wait(key: str, timeout_s: float, waiting: str) -> None:
    """Barrier ``key`` of every process (coordination service), or DistributedError after
    ``timeout_s``; ``waiting`` says for what, in the message."""
    try:
        multihost.get_barrier_sync_fn()(key=key, timeout_ms=int(timeout_s * 1000))
    except Exception as err:  # noqa: BLE001 - jaxlib raises its own error types
        raise DistributedError(
            f"process {jax.process_index()} waited {timeout_s:.0f} s {waiting} and gave up "
            f"({' '.join(str(err).split())[:200]}); check the other processes' logs, or "
            "raise distributed.barrier_timeout if they are only slow."
        ) from None


def _status(error: BaseException | None) -> str:
    return "ok" if error is None else f"error: {' '.join(str(error).split())}"


def _broadcast_text(text: str) -> str:
    """Process 0's ``text`` on every process (the others pass anything)."""
    data = np.frombuffer(text.encode("utf-8"), np.uint8)
    size = int(multihost_utils.broadcast_one_to_all(np.asarray(data.size, np.int32)))
    if jax.process_index() != 0:
        data = np.zeros((size,), np.uint8)
    if size == 0:
        return ""
    return bytes(np.asarray(multihost_utils.broadcast_one_to_all(data))).decode("utf-8")


def _gather_statuses(status: str) -> list[str]:
    """Every process's status line (cut to ``STATUS_BYTES``), in process order."""
    raw = status.encode("utf-8")[:STATUS_BYTES].ljust(STATUS_BYTES, b"\0")
    gathered = multihost_utils.process_allgather(np.frombuffer(raw, np.uint8))
    rows = np.asarray(gathered).reshape(jax.process_count(), STATUS_BYTES)
    return [bytes(row).rstrip(b"\0").decode("utf-8", "replace") for row in rows]


def _run(fn: Callable[[], T]) -> tuple[T | None, BaseException | None]:
    try:
        return fn(), None
    except Exception as err:  # noqa: BLE001 - handed to every process, then re-raised
        return None, err


def chief_first(fn: Callable[[], T], name: str = "chief_first", *,
                timeout_s: float = DEFAULT_BARRIER_TIMEOUT_S) -> T:
    """Run ``fn`` on process 0, then on the other processes (which then find its outputs).

    For one-time preparation in a directory that all processes share (tokenizer training,
    dataset preparation); with a single process it is just ``fn()``. When ``fn`` fails on
    the chief, every other process raises :class:`DistributedError` with its message (and
    skips ``fn``); when it fails elsewhere, that process raises its own error and the others
    a DistributedError naming it. A process that waits longer than ``timeout_s`` (chief lost
    or stuck) raises too.
    """
    if jax.process_count() == 1:
        return fn()
    key, me = _unique(name), jax.process_index()
    result, error = _run(fn) if me == 0 else (None, None)
    _wait(f"{key}/chief", timeout_s, f"for process 0 to finish {name!r}")
    chief = _broadcast_text(_status(error))
    if error is not None:
        raise error
    if chief != "ok":
        raise DistributedError(f"process 0 failed in {name!r}: {chief[len('error: '):]}")
    if me != 0:
        result, error = _run(fn)
    _wait(f"{key}/all", timeout_s, f"for the other processes to finish {name!r}")
    statuses = _gather_statuses(_status(error))
    if error is not None:
        raise error
    for other, status in enumerate(statuses):
        if status != "ok":
            raise DistributedError(
                f"process {other} failed in {name!r}: {status[len('error: '):]}")
    return result


def from_chief(name: str, fn: Callable[[], Any],
               timeout_s: float = DEFAULT_BARRIER_TIMEOUT_S) -> Any:
    """``fn()`` computed on process 0 and sent (as JSON) to every process; an error there is
    raised on process 0 and a :class:`DistributedError` with its message elsewhere."""
    if jax.process_count() == 1:
        return fn()
    key = _unique(name)
    value, error = _run(fn) if jax.process_index() == 0 else (None, None)
    _wait(key, timeout_s, f"for process 0 to send {name!r}")
    text = _broadcast_text(_status(error) if error else "ok " + json.dumps(value))
    if error is not None:
        raise error
    if not text.startswith("ok "):
        raise DistributedError(f"process 0 failed in {name!r}: {text[len('error: '):]}")
    return json.loads(text[len("ok "):])


def first_failure(message: str | None) -> tuple[int, str] | None:
    """The lowest process whose ``message`` is not None, and its message (cut to
    ``STATUS_BYTES``); None when no process passes one. Every process calls this at the same
    point (once they have agreed that one failed), so it cannot wait for a lost one."""
    if jax.process_count() == 1:
        return None if message is None else (0, message)
    statuses = _gather_statuses("ok" if message is None else f"error: {message}")
    for index, status in enumerate(statuses):
        if status != "ok":
            return index, status[len("error: "):]
    return None


def barrier(name: str, timeout_s: float = DEFAULT_BARRIER_TIMEOUT_S) -> None:
    """Wait until every process arrives here (coordination service, not a device collective);
    raises :class:`DistributedError` after ``timeout_s``."""
    if jax.process_count() == 1:
        return
    _wait(_unique(name), timeout_s, f"at {name!r} for the other processes")


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
        self._last = 0  # one process: the last flag
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
            self._last = int(stop)
            return self._last
        flags = np.full((self._local,), int(stop), np.int32)
        agreed = self._any(jax.make_array_from_process_local_data(
            self._split, flags, (self._split.mesh.size,)))
        previous, self._pending = self._pending, agreed
        return 0 if previous is None else int(previous.addressable_shards[0].data)

    def current(self) -> int:
        """The largest flag of the last :meth:`vote`, now (waits for that vote to finish; the
        next vote answers it again). Costs no collective: the vote's is already under way."""
        if not self._multi:
            return self._last
        return 0 if self._pending is None else int(self._pending.addressable_shards[0].data)

    def agree_min(self, value: int) -> int:
        """The smallest of every process's ``value``, now (waits for all of them)."""
        if not self._multi:
            return int(value)
        flags = np.full((self._local,), -int(value), np.int32)
        agreed = self._any(jax.make_array_from_process_local_data(
            self._split, flags, (self._split.mesh.size,)))
        return -int(agreed.addressable_shards[0].data)


def agree(value: int) -> list[int]:
    """Every process's ``value`` (one int each), on every process; ``[value]`` alone."""
    if jax.process_count() == 1:
        return [int(value)]
    gathered = multihost_utils.process_allgather(np.asarray(value, np.int64))
    return [int(v) for v in np.asarray(gathered).reshape(-1)]
