"""The ``parallelism`` config value -> a strategy (the one place that maps names to classes)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax

from transformer_jax.errors import ConfigError
from transformer_jax.parallel.data import Pmap, ShardMap, SingleDevice
from transformer_jax.parallel.mesh import Sharded
from transformer_jax.parallel.strategy import Strategy

__all__ = ["PARALLELISM", "STRATEGIES", "make_strategy", "resolve_parallelism"]

STRATEGIES = {cls.name: cls for cls in (SingleDevice, Pmap, ShardMap, Sharded)}
PARALLELISM = ("auto", *STRATEGIES)  # the allowed ``parallelism`` config values


def resolve_parallelism(parallelism: str | None, num_devices: int) -> str:
    """``"auto"``/None -> ``"none"`` on one device, else ``"shard_map"``."""
    if parallelism in (None, "", "auto"):
        return "none" if num_devices == 1 else "shard_map"
    if parallelism not in STRATEGIES:
        raise ConfigError(f"parallelism={parallelism!r}; choose {', '.join(PARALLELISM)}.")
    return parallelism


def make_strategy(parallelism: str | None = "auto", sharding: Mapping | None = None,
                  devices: Sequence[Any] | None = None) -> Strategy:
    """The strategy for a ``parallelism`` config value over ``devices`` (default: all).

    Args:
      parallelism: one of ``PARALLELISM``.
      sharding: the ``sharding`` config section ("sharded" only).
      devices: the devices to run on (default ``jax.devices()``).
    """
    devices = list(jax.devices() if devices is None else devices)
    name = resolve_parallelism(parallelism, len(devices))
    if name == Sharded.name:
        return Sharded(sharding or {}, devices)
    return STRATEGIES[name](devices)
