"""Logical axis names on parameters, for model (tensor / FSDP) sharding.

Every large parameter carries ``out_sharding`` NNX metadata naming its axes with these
logical names; the mesh strategy (``transformer_jax.parallel.mesh``) maps them to mesh axes
with one rules table, so the modules never mention a mesh:

  "vocab"  token table rows / output logits       V
  "embed"  model width                            D
  "heads"  attention heads                        N
  "kv"     head dimension                         H
  "mlp"    feed-forward hidden width              F

``eager_sharding=False`` keeps creation mesh-free: the names are only read when the training
code asks for them (:func:`logical_specs`). Layer norms and position tables have no names
(replicated).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from flax import nnx

__all__ = ["LOGICAL_AXES", "logical_init", "logical_param", "logical_specs"]

LOGICAL_AXES = ("vocab", "embed", "heads", "kv", "mlp")


def logical_init(init: Callable, names: Sequence[str | None]) -> Callable:
    """Initializer whose parameter carries the logical axis ``names`` (one per dimension)."""
    return nnx.with_partitioning(init, tuple(names), eager_sharding=False)


def logical_param(value, names: Sequence[str | None]) -> nnx.Param:
    """``nnx.Param(value)`` carrying the logical axis ``names`` (one per dimension)."""
    return nnx.Param(value, out_sharding=tuple(names), eager_sharding=False)


def logical_specs(model: nnx.Module) -> dict:
    """The model's params pytree (as ``split_model`` gives it) of ``PartitionSpec``s holding
    logical axis names (None for unnamed dimensions); works on abstract models too."""
    return nnx.to_pure_dict(nnx.get_partition_spec(nnx.state(model, nnx.Param)))
