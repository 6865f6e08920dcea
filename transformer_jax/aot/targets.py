"""Compiling programs for a TPU topology, or exporting them for a platform, and what the
compiler says about them (memory, FLOPs, custom calls, host callbacks, float64)."""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax

from transformer_jax.aot.programs import AotError, Program, build_programs, stand_in_devices
from transformer_jax.aot.programs import tpu_devices as topology_devices

__all__ = [
    "EXPORT_PLATFORMS",
    "GIB",
    "TPU_HBM_BYTES",
    "compile_for_topology",
    "export_programs",
    "inspect_stablehlo",
    "run",
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
    devices = topology_devices(topology) if topology else stand_in_devices(num_devices)
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
