"""``python -m transformer_jax.aot``: arguments, config loading, the stdout summary and the
JSON report of :func:`transformer_jax.aot.run` (see the package docstring for the targets)."""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import sys
from collections.abc import Sequence

import jax
from absl import flags
from ml_collections import config_flags

from transformer_jax.aot.programs import AotError
from transformer_jax.aot.targets import EXPORT_PLATFORMS, GIB, run
from transformer_jax.errors import ConfigError
from transformer_jax.training.reporting import write_json

__all__ = ["load_config", "main", "problems", "summary"]

# ------------------------------------------------------------------------------ CLI


def _gib(n) -> str:
    return "?" if n is None or (isinstance(n, float) and math.isnan(n)) else f"{n / GIB:.2f} GiB"


def summary(report: dict) -> str:
    """Human-readable lines of a :func:`run` report."""
    mesh = " x ".join(f"{k} {v}" for k, v in report["mesh"].items())
    where = report.get("topology") or f"{report['platform']} (export)"
    lines = [f"{report['model_kind']}: {report['params'] / 1e6:.1f}M params, "
             f"{report['dtype']}, batch {report['batch'][0]} x {report['batch'][1]}, "
             f"{report['parallelism']} over {report['num_devices']} devices ({mesh}) "
             f"on {where}"]
    for name, facts in report["programs"].items():
        if facts.get("compiled") is False:
            lines.append(f"  {name:<14} DOES NOT FIT: XLA asked for "
                         f"{_gib(facts['per_device_bytes'])} of temporaries per chip of "
                         f"{_gib(facts['device_memory_bytes'])}")
        elif facts.get("compiled"):
            fits = {True: "fits", False: "DOES NOT FIT", None: "capacity unknown"}[facts["fits"]]
            lines.append(
                f"  {name:<14} compiled in {facts['seconds']:.1f} s: "
                f"{_gib(facts['per_device_bytes'])} per chip of "
                f"{_gib(facts['device_memory_bytes'])} ({fits}), "
                f"{facts['flops_per_step'] / 1e12:.2f} TFLOP per step, custom calls: "
                f"{', '.join(facts['custom_calls']) or 'none'}")
        else:
            calls = ", ".join(facts["custom_calls"]) or "none"
            lines.append(
                f"  {name:<14} exported in {facts['seconds']:.1f} s: "
                f"{facts['stablehlo_bytes'] / 1e6:.2f} MB StableHLO, custom calls: {calls}, "
                f"host callbacks: {len(facts['host_callbacks'])}, f64: {facts['f64']}")
    return "\n".join(lines)


def problems(report: dict) -> list[str]:
    """Why a report is not good for the target (empty when it is)."""
    out = []
    for name, facts in report["programs"].items():
        if facts.get("fits") is False:
            out.append(f"{name} needs {_gib(facts['per_device_bytes'])} per chip, more than "
                       f"the {_gib(facts['device_memory_bytes'])} a chip has")
        if facts.get("host_callbacks"):
            out.append(f"{name} calls back to the host ({', '.join(facts['host_callbacks'])})")
        if facts.get("f64"):
            out.append(f"{name} computes in float64")
    return out


def load_config(path: str, overrides: Sequence[str] = ()):
    """``get_config()`` of a config file, with ``config.a.b=value`` overrides applied."""
    if not os.path.isfile(path):
        raise AotError(f"config file {path} does not exist; pass e.g. --config configs/default.py.")
    spec = importlib.util.spec_from_file_location("aot_config", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        config = module.get_config()
    except Exception as err:  # a broken config file: say where, do not dump a traceback
        raise AotError(f"config file {path} could not be loaded: "
                       f"{type(err).__name__}: {err}") from None
    return _apply_overrides(config, overrides)


def _apply_overrides(config, overrides: Sequence[str]):
    """``--config.a.b=value`` overrides parsed as train.py parses them (ml_collections'
    config flags: typed by the field, ``int | None`` placeholders included)."""
    argv = ["aot"]
    for item in overrides:
        key, _, text = item.partition("=")
        path = key.removeprefix("--").removeprefix("config.")
        argv.append(f"--config.{path}={text}")
        *parents, leaf = path.split(".")
        section = config
        try:
            for name in parents:
                section = section[name]
            section[leaf]  # noqa: B018 - the key must exist
        except (KeyError, AttributeError, TypeError):
            raise AotError(f"unknown config key {key!r} in override {item!r}.") from None
    values = flags.FlagValues()
    try:
        holder = config_flags.DEFINE_config_dict("config", config, flag_values=values,
                                                 sys_argv=argv, lock_config=True)
        values(argv)
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as err:
        raise AotError(f"cannot apply the --config overrides ({' '.join(str(err).split())});"
                       " check the names and values.") from None
    return holder.value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m transformer_jax.aot",
        description="Compile a training config for a TPU topology or export it for CUDA, "
                    "without the accelerator. Extra --config.KEY=VALUE arguments override "
                    "config values as in train.py.")
    parser.add_argument("--config", required=True, help="training config file (configs/*.py)")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--topology", help="TPU topology to compile for, e.g. v5e:2x2")
    target.add_argument("--platform", choices=EXPORT_PLATFORMS,
                        help="platform to export StableHLO for, e.g. cuda")
    parser.add_argument("--num_devices", type=int, default=8,
                        help="devices of an export (default 8)")
    parser.add_argument("--vocab_size", type=int, default=None,
                        help="vocabulary size (default: data.vocab_size)")
    parser.add_argument("--no_decode", action="store_true", help="skip the decode programs")
    parser.add_argument("--json", help="write the report here")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; see the module docstring. Returns the exit code."""
    parser = _parser()
    args, rest = parser.parse_known_args(argv)
    bad = [a for a in rest if not a.startswith("--config.") or "=" not in a]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)}")
    if args.num_devices > 1 and args.platform:
        jax.config.update("jax_num_cpu_devices", args.num_devices)
    try:
        config = load_config(args.config, rest)
        report = run(config, topology=args.topology, platform=args.platform,
                     num_devices=args.num_devices, vocab_size=args.vocab_size,
                     decode=not args.no_decode)
    except (AotError, ConfigError, ValueError) as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    report["config"] = args.config
    print(summary(report))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        write_json(args.json, report)
    found = problems(report)
    for line in found:
        print(f"problem: {line}", file=sys.stderr)
    return 1 if found else 0
