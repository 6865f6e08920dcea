"""Model sharding (``parallelism="sharded"``): jit over a ("data", "fsdp", "tensor") mesh.

Parameters carry logical axis names (``transformer_jax.nn.partitioning``: "vocab", "embed",
"heads", "kv", "mlp"). One rules table (config ``sharding.rules``) maps each logical name to
mesh axes; the batch is split over ("data", "fsdp"). The train step is the single-device
``step.train_step`` (``axis_name=None``) compiled by ``jax.jit`` with ``NamedSharding`` in/out
shardings: XLA's SPMD partitioner inserts the collectives (all-gathers of FSDP-sharded
weights, reduce-scatters of their gradients, all-reduces of tensor-parallel partial sums).

Default rules (``default_sharding_config``)::

    vocab -> tensor    embed -> fsdp    heads -> tensor    kv -> (replicated)    mlp -> tensor

so ``sharding.fsdp = k`` is ZeRO-3 style sharding of weights and optimizer state over k
devices, ``sharding.tensor = k`` Megatron-style splitting of heads / hidden units / vocab, and
``sharding.data`` plain replication. A dimension that the mesh axes do not divide is left
replicated (logged once), so odd vocabulary sizes still run.

:class:`Sharded` implements ``parallel.Parallel`` like ``parallel.DataParallel``
(``prepare``, ``put_state``, ``put_batch``, ``train_step`` ...), so the training loop and the
evaluator drive every mode the same way. The mesh is laid out process-major; a process loads
the rows its devices hold (``data_shard``: with a "tensor" axis spanning processes, several
processes load the same rows) and the global batch is assembled with its global shape.
"""

from __future__ import annotations

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

from transformer_jax.nn.partitioning import LOGICAL_AXES
from transformer_jax.ops import partition
from transformer_jax.training.distributed import (
    global_batch,
    ordered_mesh,
    process_major,
    process_rows,
    put_global,
)
from transformer_jax.training.errors import ConfigError
from transformer_jax.training.parallel import DataParallel, check_divisible
from transformer_jax.training.step import params_before_use

__all__ = [
    "BATCH_AXES",
    "MESH_AXES",
    "Sharded",
    "check_sharding_config",
    "default_sharding_config",
    "logical_specs",
    "make_mesh",
    "make_parallel",
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


def logical_specs(model: nnx.Module) -> dict:
    """Params pytree (as ``step.split_model``) of PartitionSpecs with logical names."""
    specs = nnx.get_partition_spec(nnx.state(model, nnx.Param))
    return nnx.to_pure_dict(specs)


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

    Call :meth:`prepare` (or :meth:`bind`) with the model before placing state.
    """

    mode = "sharded"

    def __init__(self, config: Mapping, devices: Sequence[Any] | None = None):
        self.config = dict(config)
        self.mesh = make_mesh(self.config, devices)
        self.devices = list(self.mesh.devices.flat)
        self.num_devices = len(self.devices)
        self._replicated = NamedSharding(self.mesh, P())
        self._batch = NamedSharding(self.mesh, P(BATCH_AXES))
        self._data_shard = process_rows(self._batch, self.global_devices)
        self.param_shardings = None
        self._param_treedef = None

    @property
    def global_devices(self) -> int:
        """Batch shards: rows must divide by data x fsdp."""
        return self.mesh.shape["data"] * self.mesh.shape["fsdp"]

    def check_batch_size(self, batch_size: int) -> int:
        """Validate the global batch and return the rows this process loads."""
        check_divisible(batch_size, self.global_devices,
                        f"the data x fsdp = {self.global_devices} batch shards")
        return batch_size // self.data_shard()[1]

    def data_shard(self) -> tuple[int, int]:
        return self._data_shard

    def prepare(self, model: nnx.Module) -> None:
        self.bind(model)

    def bind(self, model: nnx.Module) -> None:
        """Derive the parameter shardings from the model's logical axis metadata."""
        params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        specs, notes = mesh_specs(logical_specs(model), params, self.config["rules"], self.mesh)
        for note in notes:
            log.warning("sharding: %s", note)
        self.param_specs = specs
        self.param_shardings = jax.tree_util.tree_map(
            lambda s: NamedSharding(self.mesh, s), specs, is_leaf=lambda s: isinstance(s, P))
        # the layout a weight is used in: its FSDP split gathered, tensor splits kept
        self._use_shardings = jax.tree_util.tree_map(
            lambda s: NamedSharding(self.mesh, _without_axis(s, "fsdp")), specs,
            is_leaf=lambda s: isinstance(s, P))
        self._param_treedef = jax.tree_util.tree_structure(params)

    # ----------------------------------------------------------------- placement
    def shardings_for(self, tree):
        """Shardings for ``tree``: params-shaped subtrees (params, Adam moments, accumulated
        gradients) get the parameter shardings, every other leaf is replicated."""
        if self.param_shardings is None:
            raise RuntimeError("Sharded.bind(model) must be called before placing state.")

        def params_like(x):
            return jax.tree_util.tree_structure(x) == self._param_treedef

        def one(sub):
            if params_like(sub):
                return self.param_shardings
            return self._replicated

        return jax.tree_util.tree_map(one, tree, is_leaf=params_like)

    def state_shardings(self, tree):
        return self.shardings_for(tree)

    def put_state(self, tree):
        """Any-placed pytree -> sharded copies (never aliases the input)."""
        return put_global(tree, self.shardings_for(tree))

    def get_state(self, tree):
        return tree

    def put_batch(self, batch: Mapping[str, np.ndarray]):
        """This process's rows (see :meth:`data_shard`) -> global arrays split over
        ("data", "fsdp")."""
        return global_batch(self._batch, batch, self.data_shard()[1])

    def put_rng(self, key):
        return put_global(key, self._replicated)

    def metrics(self, tree) -> dict[str, float]:
        return {k: float(v) for k, v in jax.device_get(tree).items()}

    # ----------------------------------------------------------------- compile
    def train_step(self, per_device: Callable) -> Callable:
        """``step(state, batch, rng)`` jitted with the state's shardings; donates ``state``."""
        compiled: dict[str, Callable] = {}

        def step(state, batch, rng):
            if "fn" not in compiled:
                sh = self.shardings_for(state)
                compiled["fn"] = jax.jit(
                    lambda s, b, r: self._traced(per_device, s, b, r, axis_name=None),
                    in_shardings=(sh, self._batch, self._replicated),
                    out_shardings=(sh, self._replicated),
                    donate_argnums=0,
                )
            return compiled["fn"](state, batch, rng)

        return step

    def _traced(self, fn: Callable, *args, **kwargs):
        """``fn`` traced with the FSDP-split weights all-gathered before use
        (``step.params_before_use``; left alone, XLA kept the weights split and every row of
        the batch on every device: 8.4x the temporaries of data parallelism on 8 chips) and
        inside ``ops.partition.partitioned`` (Pallas kernels per device on their rows, split
        over ("data", "fsdp"), and their heads)."""
        heads = _rule_axes(dict(self.config["rules"]).get("heads", ""))
        gather = functools.partial(jax.lax.with_sharding_constraint,
                                   shardings=self._use_shardings)
        with partition.partitioned(self.mesh, BATCH_AXES, heads), params_before_use(gather):
            return fn(*args, **kwargs)

    def eval_step(self, per_device: Callable) -> Callable:
        """``eval(params, batch)`` jitted; outputs replicated."""
        return jax.jit(lambda p, b: self._traced(per_device, p, b, axis_name=None),
                       out_shardings=self._replicated)


def make_parallel(config: Mapping):
    """The placement/compilation driver of a validated training config.

    ``parallelism="sharded"`` -> :class:`Sharded`; anything else -> ``parallel.DataParallel``.
    Call ``prepare(model)`` before placing state.
    """
    if config["parallelism"] == "sharded":
        return Sharded(config["sharding"])
    return DataParallel(config["parallelism"])
