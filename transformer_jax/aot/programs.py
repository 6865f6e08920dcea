"""The programs of a training config, built the way ``train.py`` builds them.

The train step comes from ``training.build.build_run`` (config defaults and validation, the
optimizer, the parallelism strategy with its mesh, the per-device step), with
``exportable=True`` (``parallelism="pmap"`` becomes the same per-device step under
``shard_map``: pmap cannot be exported or compiled ahead of time, and that is the program it
runs), from abstract inputs: no data is read or prepared and no parameter is materialised.
The cached decode programs (greedy and beam search, ``eval_batch_size`` rows split over the
devices, as the evaluator decodes) are the inference ones; a model's decoding context is a
``[rows, data.max_length]`` batch of token ids (a source to translate, or a prompt that a
language model continues by as many tokens).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from transformer_jax.inference import make_translate_fn
from transformer_jax.parallel import make_strategy
from transformer_jax.training.build import Run, build_run
from transformer_jax.training.defaults import validate_config
from transformer_jax.training.evaluate import ROWS, split_rows

__all__ = ["AotError", "Program", "build_programs", "stand_in_devices", "tpu_devices"]


class AotError(ValueError):
    """A problem with the target (topology, platform, libtpu) or the config."""


@dataclasses.dataclass(frozen=True)
class Program:
    """One jitted function with the abstract arguments to lower it with."""

    name: str
    fn: Callable
    args: tuple
    devices: int  # devices the program spans


# ------------------------------------------------------------------------------ devices
def tpu_devices(topology: str) -> list:
    """Devices of a TPU topology such as ``"v5e:2x2"`` (compile-only; needs libtpu)."""
    if importlib.util.find_spec("libtpu") is None:
        raise AotError(
            "compiling for a TPU topology needs libtpu, which is not installed; run "
            "`pip install -e .[aot]` (or use --platform cuda/tpu to export instead)."
        )
    # Off a TPU VM libtpu cannot discover its host: tell it that it is alone (no warnings),
    # and let it load while another process holds its lock file (compiling needs no chip).
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-4")
    from jax.experimental import topologies

    try:
        return list(topologies.get_topology_desc(topology, "tpu").devices)
    except Exception as err:  # JaxRuntimeError / ValueError from libtpu
        detail = " ".join(str(err).split())[:200]
        raise AotError(
            f"unknown or unsupported TPU topology {topology!r} ({detail}); use e.g. v5e:2x2, "
            "v5e:4x8, v4:2x2x1 or v5p:2x2x1."
        ) from None


def stand_in_devices(num_devices: int) -> list:
    """``num_devices`` CPU devices standing in for accelerators in an export."""
    if num_devices < 1:
        raise AotError(f"--num_devices={num_devices} must be at least 1.")
    with_cpu = jax.devices("cpu")
    if len(with_cpu) < num_devices:
        raise AotError(
            f"only {len(with_cpu)} CPU devices exist but {num_devices} are needed; start "
            f"Python with XLA_FLAGS=--xla_force_host_platform_device_count={num_devices}."
        )
    return with_cpu[:num_devices]


# ------------------------------------------------------------------------------ programs
def _train_program(run: Run, strategy) -> tuple[Program, dict]:
    """The micro-batch train step exactly as the trainer compiles it."""
    run.strategy.check_batch_size(int(run.config.batch_size))
    mesh = {str(k): int(v) for k, v in run.strategy.mesh.shape.items()}
    info: dict[str, Any] = {"parallelism": run.strategy.name, "mesh": mesh}
    if run.strategy.name != strategy.name:
        info["note"] = (f"{strategy.name} runs this per-device step; built under "
                        f"{run.strategy.name}")
    program = Program("train_step", run.train_step, run.abstract_args(),
                      len(run.strategy.devices))
    return program, info


def _decode_programs(run: Run, devices) -> list[Program]:
    """Greedy and beam-search decoding as the evaluator runs them: params replicated, the
    ``eval_batch_size`` rows (padded to a multiple of the devices) split over ``devices``."""
    config = run.config
    rows = int(config.eval_batch_size or config.batch_size)
    rows = -(-rows // len(devices)) * len(devices)
    length = int(config.data.max_length)
    beam = int(config.eval_beam_size) if config.eval_beam_size > 1 else 4
    params = run.abstract_state.params
    programs = []
    for name, beam_size in (("decode_greedy", 1), (f"decode_beam{beam}", beam)):
        fn = make_translate_fn(run.model_def, max_length=length, beam_size=beam_size,
                               length_penalty=float(config.eval_length_penalty))
        step, mesh = split_rows(fn, list(devices))
        replicated, split = NamedSharding(mesh, P()), NamedSharding(mesh, P(ROWS))
        args = (jax.tree_util.tree_map(
                    lambda x, r=replicated: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=r),
                    params),
                jax.ShapeDtypeStruct((rows, length), jnp.int32, sharding=split))
        programs.append(Program(name, step, args, len(devices)))
    return programs


def build_programs(config, devices: Sequence[Any], *, vocab_size: int | None = None,
                   decode: bool = True) -> tuple[list[Program], dict]:
    """Train step (and decode programs) of a training config over ``devices``.

    Args:
      config: training ConfigDict/dict (``configs/*.py`` ``get_config()``); validated here.
      devices: the devices the train step spans (TPU topology devices or CPU stand-ins).
      vocab_size: V (default ``data.vocab_size``, the tokenizer's size).
      decode: also build the greedy and beam-search decode programs.

    Returns:
      ``(programs, info)``: info holds the model kind, parameter count, resolved parallelism,
      mesh shape and batch shape.
    """
    config = validate_config(config)
    strategy = make_strategy(config.parallelism, config.sharding, devices)
    run = build_run(config, vocab_size=vocab_size, strategy=strategy, exportable=True)
    train, info = _train_program(run, strategy)
    programs = [train]
    if decode:
        programs += _decode_programs(run, devices)
    model_cfg = run.model_config
    info.update({
        "model_kind": config.model_kind,
        "params": sum(x.size for x in jax.tree_util.tree_leaves(run.abstract_state.params)),
        "vocab_size": model_cfg.vocab_size,
        "dtype": model_cfg.dtype,
        "attention_impl": model_cfg.attention_impl,
        "batch": [int(config.batch_size), int(config.data.max_length)],
        "grad_accum_steps": int(config.optimizer.grad_accum_steps),
        "num_devices": len(devices),
    })
    return programs, info
