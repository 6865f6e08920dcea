"""Compile for a TPU topology or export for CUDA without the accelerator: ``python -m
transformer_jax.aot``.

The train step of a training config is built the way ``train.py`` builds it (config defaults
and validation, ``make_optimizer``, ``create_train_state``, the per-device ``train_step`` and
the parallel driver with its mesh), but from abstract inputs: no data is read or prepared and
no parameter is materialised. The vocabulary size is ``data.vocab_size`` (``--vocab_size``
overrides it) and a micro-batch is ``batch_size x data.max_length`` token ids, with the
segment/position arrays of packed rows when ``data.packing``. The cached decode programs
(greedy and beam search; ``eval_batch_size`` rows split over the devices, as the evaluator
decodes) are built too.

Two targets:

* ``--topology v5e:2x2`` (needs libtpu, ``pip install -e .[aot]``): every program is compiled
  by XLA:TPU for that topology. The train step reports per-chip memory
  (``compiled.memory_analysis()``), FLOPs (``cost_analysis()``) and whether it fits the chip.
* ``--platform cuda`` (or ``tpu``): every program is exported with ``jax.export`` to
  StableHLO for that platform over ``--num_devices`` devices (CPU devices stand in for the
  accelerators: an export keeps the shardings, not the devices). Reports the StableHLO size,
  custom calls, host callbacks and float64 types found.

``parallelism="pmap"`` is built as the same per-device step under ``shard_map`` (pmap cannot
be exported or compiled ahead of time; it runs that program). Exit codes: 0 done, 1 a program
does not fit the chip or holds a host callback or float64, 2 a problem with the arguments,
the config or the environment (one line on stderr).

  python -m transformer_jax.aot --config configs/wmt14_ende_big.py --topology v5e:2x2 \\
      --json aot.json
  python -m transformer_jax.aot --config configs/wmt14_ende_base.py --platform cuda
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from transformer_jax import decoding
from transformer_jax.config import ModelConfig, count_params
from transformer_jax.errors import ConfigError
from transformer_jax.inference import make_translate_fn
from transformer_jax.nn import build_model, split_model
from transformer_jax.training.defaults import validate_config
from transformer_jax.training.evaluate import ROWS, split_rows
from transformer_jax.training.optim import make_optimizer
from transformer_jax.training.parallel import AXIS, DataParallel, resolve_mode
from transformer_jax.training.sharding import BATCH_AXES, Sharded
from transformer_jax.training.step import create_train_state, train_step

__all__ = [
    "AotError",
    "load_config",
    "main",
    "problems",
    "summary",
    "write_json",
    "Program",
    "build_programs",
    "compile_for_topology",
    "export_programs",
    "inspect_stablehlo",
    "run",
    "stand_in_devices",
    "tpu_devices",
]

GIB = 1024**3
# High-bandwidth memory per chip by ``device_kind`` (public TPU specs).
TPU_HBM_BYTES = {
    "TPU v4": 32 * GIB,
    "TPU v5 lite": 16 * GIB,
    "TPU v5": 95 * GIB,
    "TPU v5p": 95 * GIB,
    "TPU v6 lite": 32 * GIB,
}
EXPORT_PLATFORMS = ("cuda", "tpu", "rocm", "cpu")
_CALLBACK = re.compile(r"callback", re.IGNORECASE)


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


def _driver(config, devices: Sequence[Any]):
    """The training driver for ``config.parallelism`` over ``devices`` (pmap -> shard_map)."""
    if config.parallelism == "sharded":
        return Sharded(config.sharding, devices)
    mode = resolve_mode(config.parallelism, len(devices))
    return DataParallel("shard_map" if mode == "pmap" else mode, devices)


def _mesh_shape(dp) -> dict[str, int]:
    return {str(k): int(v) for k, v in dp.mesh.shape.items()}


def _abstract(tree, shardings):
    return jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _batch_spec(config, rows: int, sharding) -> dict[str, jax.ShapeDtypeStruct]:
    """Abstract micro-batch as the data pipeline yields it: int32 ``[rows, max_length]``."""
    sides = ["targets"] if config.model_kind == "decoder_only" else ["inputs", "targets"]
    suffixes = ["", "_segmentation", "_position"] if config.data.packing else [""]
    shape = (rows, int(config.data.max_length))
    return {f"{side}{suffix}": jax.ShapeDtypeStruct(shape, jnp.int32, sharding=sharding)
            for side in sides for suffix in suffixes}


def _model_config(config, vocab_size: int | None) -> ModelConfig:
    fields = config.model.to_dict()
    fields["vocab_size"] = int(vocab_size or config.data.vocab_size)
    try:
        return ModelConfig.from_dict(fields)
    except ValueError as err:
        raise ConfigError(f"model config: {err}") from err


def _train_program(config, model_cfg: ModelConfig, model, devices) -> tuple[Program, dict]:
    """The micro-batch train step exactly as ``training.loop`` compiles it."""
    dp = _driver(config, devices)
    dp.check_batch_size(config.batch_size)
    dp.prepare(model)  # sharded: parameter shardings from the logical axis names
    model_def, params = split_model(model)
    opt = config.optimizer
    tx, schedule = make_optimizer(opt, d_model=model_cfg.d_model,
                                  num_train_steps=config.num_train_steps)
    state = jax.eval_shape(lambda p: create_train_state(p, tx), params)
    per_device = functools.partial(
        train_step, model_def=model_def, tx=tx, schedule=schedule,
        label_smoothing=float(opt.label_smoothing), dropout=model_cfg.uses_dropout,
        grad_accum_steps=int(opt.grad_accum_steps), pad_id=model_cfg.pad_id)
    replicated = NamedSharding(dp.mesh, P())
    state_shardings = dp.state_shardings(state)
    if isinstance(dp, Sharded):
        batch_sharding = NamedSharding(dp.mesh, P(BATCH_AXES))
    else:
        batch_sharding = NamedSharding(dp.mesh, P(AXIS) if dp.mode != "none" else P())
    rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=replicated)
    args = (_abstract(state, state_shardings), _batch_spec(config, config.batch_size,
                                                           batch_sharding), rng)
    step = jax.jit(dp.train_step(per_device), donate_argnums=0)
    info = {"parallelism": dp.mode, "mesh": _mesh_shape(dp)}
    if config.parallelism == "pmap":
        info["note"] = "pmap runs this per-device step; built under shard_map"
    return Program("train_step", step, args, len(dp.devices)), info


def _lm_generate(model_def, *, max_length: int, beam_size: int) -> Callable:
    """``generate(params, start_ids [B]) -> ids [B, max_length]`` of a ``DecoderOnlyLM``."""

    def generate(params, start_ids):
        model = model_def.merge(params)
        batch = start_ids.shape[0]
        cache = model.init_cache(batch, max_length)

        def tokens_to_logits(ids, cache):  # ids [B', 1]
            logits, cache = model.decode(ids, cache=cache)  # [B', 1, V]
            return logits[:, 0, :], cache

        if beam_size == 1:
            return decoding.greedy_search(cache, tokens_to_logits, batch_size=batch,
                                          max_len=max_length, start_ids=start_ids)
        return decoding.beam_search(cache, tokens_to_logits, batch_size=batch,
                                    beam_size=beam_size, max_len=max_length,
                                    start_ids=start_ids)[0][:, 0]

    return generate


def _decode_programs(config, model, devices) -> list[Program]:
    """Greedy and beam-search decoding as the evaluator runs them: params replicated, the
    ``eval_batch_size`` rows (padded to a multiple of the devices) split over ``devices``."""
    model_def, params = split_model(model)
    rows = int(config.eval_batch_size or config.batch_size)
    rows = -(-rows // len(devices)) * len(devices)
    length = int(config.data.max_length)
    beam = int(config.eval_beam_size) if config.eval_beam_size > 1 else 4
    programs = []
    for name, beam_size in (("decode_greedy", 1), (f"decode_beam{beam}", beam)):
        if config.model_kind == "decoder_only":
            fn = _lm_generate(model_def, max_length=length, beam_size=beam_size)
            shape = (rows,)
        else:
            fn = make_translate_fn(model_def, max_length=length, beam_size=beam_size,
                                   length_penalty=float(config.eval_length_penalty))
            shape = (rows, length)
        step, mesh = split_rows(fn, list(devices))
        replicated, split = NamedSharding(mesh, P()), NamedSharding(mesh, P(ROWS))
        args = (_abstract(params, jax.tree_util.tree_map(lambda _, r=replicated: r, params)),
                jax.ShapeDtypeStruct(shape, jnp.int32, sharding=split))
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
    model_cfg = _model_config(config, vocab_size)
    decoder_only = config.model_kind == "decoder_only"
    model = nnx.eval_shape(lambda: build_model(config.model_kind, model_cfg,
                                               nnx.Rngs(config.seed)))
    train, info = _train_program(config, model_cfg, model, devices)
    programs = [train]
    if decode:
        programs += _decode_programs(config, model, devices)
    info.update({
        "model_kind": config.model_kind,
        "params": count_params(model_cfg, decoder_only=decoder_only),
        "vocab_size": model_cfg.vocab_size,
        "dtype": model_cfg.dtype,
        "attention_impl": model_cfg.attention_impl,
        "batch": [int(config.batch_size), int(config.data.max_length)],
        "grad_accum_steps": int(config.optimizer.grad_accum_steps),
        "num_devices": len(devices),
    })
    return programs, info


# ------------------------------------------------------------------------------ targets


def inspect_stablehlo(text: str) -> dict:
    """Custom calls, host callbacks and float64 types in a StableHLO module's text."""
    calls = sorted(set(re.findall(r"custom_call\s*@([\w$.\-]+)", text))
                   | set(re.findall(r'call_target_name\s*=\s*"([^"]+)"', text)))
    return {
        "stablehlo_bytes": len(text.encode()),
        "custom_calls": calls,
        "host_callbacks": [c for c in calls if _CALLBACK.search(c)],
        "f64": bool(re.search(r"\bf64\b|xf64>|complex<f64>", text)),
    }


def export_programs(programs: Sequence[Program], platform: str) -> dict[str, dict]:
    """``jax.export`` each program for ``platform``; returns per-program StableHLO facts."""
    if platform not in EXPORT_PLATFORMS:
        raise AotError(f"--platform={platform!r} is not one of {', '.join(EXPORT_PLATFORMS)}.")
    out = {}
    for program in programs:
        start = time.perf_counter()
        exported = jax.export.export(program.fn, platforms=(platform,))(*program.args)
        facts = inspect_stablehlo(exported.mlir_module())
        facts.update(exported=True, nr_devices=exported.nr_devices,
                     seconds=round(time.perf_counter() - start, 2))
        out[program.name] = facts
    return out


def _memory(compiled) -> dict[str, int]:
    stats = compiled.memory_analysis()
    parts = {
        "argument_bytes": stats.argument_size_in_bytes,
        "output_bytes": stats.output_size_in_bytes,
        "alias_bytes": stats.alias_size_in_bytes,
        "temp_bytes": stats.temp_size_in_bytes,
        "code_bytes": stats.generated_code_size_in_bytes,
    }
    parts = {k: int(v) for k, v in parts.items()}
    # Donated state is both argument and output: count it once.
    parts["per_device_bytes"] = (parts["argument_bytes"] + parts["output_bytes"]
                                 - parts["alias_bytes"] + parts["temp_bytes"]
                                 + parts["code_bytes"])
    return parts


def _out_of_memory(err: Exception) -> int | None:
    """Bytes XLA:TPU said a program needs when it refused to compile it for lack of HBM."""
    found = re.search(r"Ran out of memory.*?\(([\d.]+)([KMGT])\)", str(err), re.DOTALL)
    if found is None:
        return None
    return int(float(found.group(1)) * 1024 ** ("KMGT".index(found.group(2)) + 1))


def compile_for_topology(programs: Sequence[Program], devices: Sequence[Any]) -> dict[str, dict]:
    """Compile each program for the devices its arguments are placed on (a TPU topology).

    A program XLA refuses for lack of HBM is reported (``compiled`` False, ``fits`` False,
    ``per_device_bytes`` the temporaries it asked for), not raised. One progress line per
    program goes to stderr: a big model takes minutes on a small CPU.
    """
    hbm = TPU_HBM_BYTES.get(devices[0].device_kind)
    out = {}
    for program in programs:
        print(f"compiling {program.name} ...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        try:
            compiled = program.fn.trace(*program.args).lower().compile()
        except Exception as err:  # JaxRuntimeError: RESOURCE_EXHAUSTED
            needed = _out_of_memory(err)
            if needed is None:
                raise
            out[program.name] = {
                "compiled": False, "fits": False, "per_device_bytes": needed,
                "device_memory_bytes": hbm, "error": " ".join(str(err).split())[:300],
                "seconds": round(time.perf_counter() - start, 2)}
            continue
        facts: dict[str, Any] = {"compiled": True}
        facts.update(_memory(compiled))
        cost = compiled.cost_analysis() or {}
        cost = cost[0] if isinstance(cost, list) else cost
        flops = float(cost.get("flops", float("nan")))
        facts["flops_per_device"] = flops
        facts["flops_per_step"] = flops * program.devices
        facts["device_memory_bytes"] = hbm
        facts["fits"] = None if hbm is None else facts["per_device_bytes"] <= hbm
        # Kernels in the compiled program (tpu_custom_call = a Pallas/Mosaic kernel).
        facts["custom_calls"] = sorted(set(re.findall(r'custom_call_target="([^"]+)"',
                                                      compiled.as_text())))
        facts["seconds"] = round(time.perf_counter() - start, 2)
        out[program.name] = facts
    return out


def run(config, *, topology: str | None = None, platform: str | None = None,
        num_devices: int = 8, vocab_size: int | None = None, decode: bool = True) -> dict:
    """Build the programs of ``config`` and compile (``topology``) or export (``platform``).

    Returns:
      The JSON report: the train step's facts at the top level (``compiled`` or ``exported``,
      ``platform``, ``num_devices``, ``mesh``, memory and FLOPs for a topology) and every
      program's under ``programs``.
    """
    if (topology is None) == (platform is None):
        raise AotError("give exactly one of --topology (compile) or --platform (export).")
    devices = tpu_devices(topology) if topology else stand_in_devices(num_devices)
    programs, info = build_programs(config, devices, vocab_size=vocab_size, decode=decode)
    if topology:
        results = compile_for_topology(programs, devices)
        target = {"platform": "tpu", "topology": topology,
                  "device_kind": devices[0].device_kind}
    else:
        results = export_programs(programs, platform)
        target = {"platform": platform}
    report = {**info, **target, **results["train_step"], "programs": results}
    report.pop("seconds", None)
    return report


# The command line and its report (``python -m transformer_jax.aot``) live in ``aot/cli.py``.
from transformer_jax.aot.cli import load_config, main, problems, summary, write_json  # noqa: E402
