"""Where a traced step runs on a device mesh, for kernels XLA cannot partition.

Under ``jax.jit`` with sharded inputs XLA's SPMD partitioner splits every XLA operation over
the devices, but not a Pallas (Mosaic) kernel: "Mosaic kernels cannot be automatically
partitioned". The training code (``parallelism="sharded"``) traces its steps inside
:func:`partitioned`, and ``ops.splash_attention`` then runs its kernel under ``shard_map``,
one call per device on that device's rows and heads. Outside the context nothing changes
(inside ``shard_map`` or ``pmap`` the kernel already runs per device).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Any, NamedTuple

__all__ = ["Partition", "current", "partitioned"]


class Partition(NamedTuple):
    mesh: Any  # jax.sharding.Mesh
    batch_axes: tuple[str, ...]  # mesh axes the batch (rows) is split over
    head_axes: tuple[str, ...]  # mesh axes the attention heads are split over

    def divides(self, length: int, axes: tuple[str, ...]) -> tuple[str, ...]:
        """``axes`` when their mesh sizes divide ``length``, else () (not split)."""
        return axes if length % math.prod(self.mesh.shape[a] for a in axes) == 0 else ()


_CURRENT: contextvars.ContextVar = contextvars.ContextVar("partition", default=None)


@contextlib.contextmanager
def partitioned(mesh, batch_axes=(), head_axes=()):
    """Trace inside: rows on ``batch_axes``, attention heads on ``head_axes`` of ``mesh``."""
    token = _CURRENT.set(Partition(mesh, tuple(batch_axes), tuple(head_axes)))
    try:
        yield
    finally:
        _CURRENT.reset(token)


def current() -> Partition | None:
    """The active :func:`partitioned` layout, or None."""
    return _CURRENT.get()
