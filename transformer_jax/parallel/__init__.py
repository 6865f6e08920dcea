"""Parallelism as strategies: where state and batches live, and how steps are compiled.

``make_strategy(config.parallelism, config.sharding)`` gives one of

  ``"none"``       :class:`SingleDevice`  jax.jit on one device
  ``"pmap"``       :class:`Pmap`          jax.pmap over every device of the job
  ``"shard_map"``  :class:`ShardMap`      jax.jit(jax.shard_map) over a "data" mesh axis
  ``"sharded"``    :class:`Sharded`       jax.jit over a data/fsdp/tensor mesh

all implementing :class:`Strategy` (``parallel.strategy``). Several processes:
``initialize`` connects them (``parallel.processes``), ``parallel.coordination`` makes them
agree (``chief_first``, ``from_chief``, ``barrier``, ``agree``, ``StopVote``,
``first_failure``) and
``parallel.placement`` lays arrays out over their devices.
"""

from transformer_jax.parallel.choose import (
    PARALLELISM,
    STRATEGIES,
    make_strategy,
    resolve_parallelism,
)
from transformer_jax.parallel.coordination import (
    StopVote,
    agree,
    barrier,
    chief_first,
    first_failure,
    from_chief,
)
from transformer_jax.parallel.data import DataParallel, Pmap, ShardMap, SingleDevice
from transformer_jax.parallel.mesh import (
    Sharded,
    check_sharding_config,
    default_sharding_config,
    make_mesh,
)
from transformer_jax.parallel.placement import (
    global_batch,
    ordered_mesh,
    process_major,
    process_rows,
    put_global,
    to_local,
)
from transformer_jax.parallel.processes import (
    check_distributed_config,
    default_distributed_config,
    initialize,
)
from transformer_jax.parallel.strategy import AXIS, Strategy, check_divisible

__all__ = [
    "AXIS",
    "PARALLELISM",
    "STRATEGIES",
    "DataParallel",
    "Pmap",
    "ShardMap",
    "Sharded",
    "SingleDevice",
    "StopVote",
    "Strategy",
    "agree",
    "barrier",
    "check_distributed_config",
    "check_divisible",
    "check_sharding_config",
    "chief_first",
    "default_distributed_config",
    "default_sharding_config",
    "first_failure",
    "from_chief",
    "global_batch",
    "initialize",
    "make_mesh",
    "make_strategy",
    "ordered_mesh",
    "process_major",
    "process_rows",
    "put_global",
    "resolve_parallelism",
    "to_local",
]
