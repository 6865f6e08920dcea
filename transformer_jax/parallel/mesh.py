"""Model sharding (``parallelism="sharded"``): jit over a ("data", "fsdp", "tensor") mesh.

Parameters carry logical axis names (``transformer_jax.nn.partitioning``: "vocab", "embed",
"heads", "kv", "mlp"). One rules table (config ``sharding.rules``) maps each logical name to
mesh axes; the batch is split over ("data", "fsdp"). The train step is the single-device
``training.step.train_step`` (``axis_name=None``) compiled by ``jax.jit`` with
``NamedSharding`` in/out shardings: XLA's SPMD partitioner inserts the collectives
(all-gathers of FSDP-sharded weights, reduce-scatters of their gradients, all-reduces of
tensor-parallel partial sums).

Default rules (``default_sharding_config``)::

    vocab -> tensor    embed -> fsdp    heads -> tensor    kv -> (replicated)    mlp -> tensor

so ``sharding.fsdp = k`` is ZeRO-3 style sharding of weights and optimizer state over k
devices, ``sharding.tensor = k`` Megatron-style splitting of heads / hidden units / vocab, and
``sharding.data`` plain replication. A dimension that the mesh axes do not divide is left
replicated (logged once), so odd vocabulary sizes still run.

:class:`Sharded` implements ``parallel.Strategy``. The mesh is laid out process-major; a
process loads the rows its devices hold (``data_shard``: with a "tensor" axis spanning
processes, several processes load the same rows) and the global batch is assembled with its
global shape.
"""

from __future__ import annotations

import copy
import functools
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from transformer_jax.errors import ConfigError
from transformer_jax.nn.partitioning import LOGICAL_AXES, logical_specs
from transformer_jax.ops import partition
from transformer_jax.parallel.placement import (
    global_batch,
    ordered_mesh,
    process_major,
    process_rows,
    put_global,
)
from transformer_jax.parallel.strategy import check_divisible

__all__ = [
    "BATCH_AXES",
    "MESH_AXES",
    "Sharded",
    "check_sharding_config",
    "default_sharding_config",
    "make_mesh",
    "mesh_shape",
    "mesh_specs",
]

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the batch dimension is split over both


def default_sharding_config() -> ml_collections.ConfigDict:
    """``sharding.*`` keys (used with ``parallelism="sharded"``)."""
    c = ml_collections.ConfigDict()
    c.data = -1  # mesh size of "data" (-1: the devices left over by the other two)
    c.fsdp = 1  # mesh size of "fsdp": parameters + optimizer state split, batch split too
    c.tensor = 1  # mesh size of "tensor": heads / feed-forward units / vocabulary split
    # logical axis -> mesh axis ("" replicated; "fsdp,tensor" splits over both)
    c.rules = ml_collections.ConfigDict(
        {"vocab": "tensor", "embed": "fsdp", "heads": "tensor", "kv": "", "mlp": "tensor"})
    return c


def _rule_axes(value) -> tuple[str, ...]:
    if isinstance(value, str):
        return tuple(a.strip() for a in value.split(",") if a.strip())
    return tuple(value or ())


def check_sharding_config(c: Mapping) -> None:
    """Raises ConfigError for bad mesh sizes or rules that name unknown mesh axes."""
    sizes = [c[a] for a in MESH_AXES]
    for axis, size in zip(MESH_AXES, sizes, strict=True):
        if not (isinstance(size, int) and (size == -1 or size >= 1)):
            raise ConfigError(f"sharding.{axis}={size!r} must be a positive integer or -1.")
    if sizes.count(-1) > 1:
        raise ConfigError("at most one of sharding.data/fsdp/tensor may be -1 (the rest).")
    for name, value in dict(c["rules"]).items():
        if name not in LOGICAL_AXES:
            raise ConfigError(f"sharding.rules.{name}: unknown logical axis; use {LOGICAL_AXES}.")
        for axis in _rule_axes(value):
            if axis not in MESH_AXES:
                raise ConfigError(
                    f"sharding.rules.{name}={value!r} names mesh axis {axis!r}; use "
                    f"{', '.join(MESH_AXES)} (comma-separated) or '' for replicated."
                )


def mesh_shape(c: Mapping, num_devices: int) -> tuple[int, int, int]:
    """``(data, fsdp, tensor)`` sizes for ``num_devices``, filling in the -1."""
    check_sharding_config(c)
    sizes = [c[a] for a in MESH_AXES]
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ConfigError(
                f"the mesh needs a multiple of {known} devices (sharding.data/fsdp/tensor) "
                f"but there are {num_devices}; change the mesh sizes."
            )
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ConfigError(
            f"mesh data x fsdp x tensor = {' x '.join(map(str, sizes))} = {math.prod(sizes)} "
            f"devices but there are {num_devices}; make the product match (or use -1)."
        )
    return tuple(sizes)  # type: ignore[return-value]


def make_mesh(c: Mapping, devices: Sequence[Any] | None = None) -> jax.sharding.Mesh:
    """A ("data", "fsdp", "tensor") mesh with Auto axes (XLA propagates the shardings)."""
    devices = process_major(jax.devices() if devices is None else devices)
    auto = jax.sharding.AxisType.Auto
    return ordered_mesh(mesh_shape(c, len(devices)), MESH_AXES, devices, auto)


def mesh_specs(logical: dict, params: dict, rules: Mapping, mesh) -> tuple[dict, list[str]]:
    """Logical PartitionSpecs -> mesh PartitionSpecs through ``rules``.

    Returns:
      ``(specs, notes)``: the mesh specs (params structure) and one note per dimension left
      replicated because its size is not divisible by the mesh axes of its rule.
    """
    notes: list[str] = []
    rules = {k: _rule_axes(v) for k, v in dict(rules).items()}

    def one(path, spec, x):
        spec = tuple(spec) + (None,) * (np.ndim(x) - len(spec))
        used: set[str] = set()
        out = []
        for dim, name in enumerate(spec):
            axes = [a for a in rules.get(name, ()) if a not in used and mesh.shape[a] > 1]
            size = math.prod(mesh.shape[a] for a in axes)
            if axes and np.shape(x)[dim] % size:
                notes.append(f"{jax.tree_util.keystr(path)} dim {dim} ({name}, size "
                             f"{np.shape(x)[dim]}) is not divisible by {size}: replicated")
                axes = []
            used.update(axes)
            out.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
        return P(*out)

    specs = jax.tree_util.tree_map_with_path(
        one, logical, params, is_leaf=lambda s: isinstance(s, P))
    return specs, notes


def _without_axis(spec: P, axis: str) -> P:
    """``spec`` with mesh axis ``axis`` removed from every dimension."""
    def drop(entry):
        if entry == axis:
            return None
        if isinstance(entry, tuple):
            kept = tuple(a for a in entry if a != axis)
            return None if not kept else kept[0] if len(kept) == 1 else kept
        return entry

    return P(*(drop(e) for e in spec))


class Sharded:
    """Places state/batches and compiles steps over a ("data", "fsdp", "tensor") mesh.

    Args:
      config: the ``sharding`` config section.
      devices: devices of the mesh (default: all, across processes).

    :meth:`for_model` gives the strategy bound to a model's parameter layout, which placing
    and compiling the state needs.
    """

    name = "sharded"

    def __init__(self, config: Mapping, devices: Sequence[Any] | None = None):
        self.config = dict(config)
        self.mesh = make_mesh(self.config, devices)
        self.devices = list(self.mesh.devices.flat)
        self.num_devices = len(self.devices)
        self.replicated = NamedSharding(self.mesh, P())
        self.batch_sharding = NamedSharding(self.mesh, P(BATCH_AXES))
        self._data_shard = process_rows(self.batch_sharding, self.batch_shards)
        self.param_specs = None  # mesh PartitionSpecs of the params (for_model)

    @property
    def batch_shards(self) -> int:
        """Batch shards: rows must divide by data x fsdp."""
        return self.mesh.shape["data"] * self.mesh.shape["fsdp"]

    def check_batch_size(self, batch_size: int) -> int:
        check_divisible(batch_size, self.batch_shards,
                        f"the data x fsdp = {self.batch_shards} batch shards")
        return batch_size // self.data_shard()[1]

    def data_shard(self) -> tuple[int, int]:
        return self._data_shard

    def for_model(self, model: nnx.Module) -> Sharded:
        """A copy bound to the parameter shardings that ``sharding.rules`` give the model's
        logical axis names (an abstract model is enough)."""
        params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        specs, notes = mesh_specs(logical_specs(model), params, self.config["rules"], self.mesh)
        for note in notes:
            log.warning("sharding: %s", note)
        bound = copy.copy(self)
        bound.param_specs = specs
        return bound

    # ----------------------------------------------------------------- placement
    def _shardings(self, specs) -> Any:
        return jax.tree_util.tree_map(lambda s: NamedSharding(self.mesh, s), specs,
                                      is_leaf=lambda s: isinstance(s, P))

    def state_shardings(self, tree):
        """Params-shaped subtrees (params, Adam moments, accumulated gradients) get the
        parameter shardings, every other leaf is replicated."""
        if self.param_specs is None:
            raise RuntimeError("Sharded.for_model(model) gives the strategy for a model's "
                               "parameters; call it before placing or compiling state.")
        treedef = jax.tree_util.tree_structure(self.param_specs,
                                               is_leaf=lambda s: isinstance(s, P))
        param_shardings = self._shardings(self.param_specs)

        def params_like(x):
            return jax.tree_util.tree_structure(x) == treedef

        return jax.tree_util.tree_map(
            lambda sub: param_shardings if params_like(sub) else self.replicated, tree,
            is_leaf=params_like)

    def put_state(self, tree):
        """Any-placed pytree -> sharded copies (never aliases the input)."""
        return put_global(tree, self.state_shardings(tree))

    def get_state(self, tree):
        return tree

    def put_batch(self, batch: Mapping[str, np.ndarray]):
        """This process's rows (see :meth:`data_shard`) -> global arrays split over
        ("data", "fsdp")."""
        return global_batch(self.batch_sharding, batch, self.data_shard()[1])

    def put_rng(self, key):
        return put_global(key, self.replicated)

    def metrics(self, tree) -> dict[str, float]:
        return {k: float(v) for k, v in jax.device_get(tree).items()}

    def exportable(self) -> Sharded:
        return self

    # ----------------------------------------------------------------- compile
    def compile_train_step(self, per_device: Callable, state) -> Callable:
        """``step(state, batch, rng)`` jitted with the state's shardings; donates ``state``."""
        sh = self.state_shardings(state)
        return jax.jit(self._traced(per_device),
                       in_shardings=(sh, self.batch_sharding, self.replicated),
                       out_shardings=(sh, self.replicated), donate_argnums=0)

    def compile_eval_step(self, per_device: Callable) -> Callable:
        """``eval(params, batch)`` jitted; outputs replicated."""
        return jax.jit(self._traced(per_device), out_shardings=self.replicated)

    def _traced(self, fn: Callable) -> Callable:
        """``fn`` with the FSDP-split weights all-gathered before use (the ``param_constraint``
        of ``training.step``; left alone, XLA kept the weights split and every row of the
        batch on every device, docs/scaling.md), traced inside ``ops.partition.partitioned``
        (Pallas kernels per device on their rows, split over ("data", "fsdp"), and their
        heads)."""
        heads = _rule_axes(dict(self.config["rules"]).get("heads", ""))
        in_use = self._shardings(jax.tree_util.tree_map(
            lambda s: _without_axis(s, "fsdp"), self.param_specs,
            is_leaf=lambda s: isinstance(s, P)))
        gather = functools.partial(jax.lax.with_sharding_constraint, shardings=in_use)

        def traced(*args):
            with partition.partitioned(self.mesh, BATCH_AXES, heads):
                return fn(*args, axis_name=None, param_constraint=gather)

        return traced
