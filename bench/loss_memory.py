"""Compiled memory of the Transformer-base training step with and without the fused loss.

Compiles the train step that ``train.py`` runs (``training.build.build_run`` of
configs/wmt14_ende_base.py: 96 rows x 256 tokens, V 37,000) on this machine's CPU for float32
and bfloat16 compute, with ``optimizer.loss_chunk=0`` (float32 ``[B, T, V]`` logits) and with
the fused loss, and records XLA's ``memory_analysis()``: ``temp`` is the scratch the step
needs beyond its arguments and outputs (activations, logits, gradients in flight). Nothing is
run; compiling takes a minute or two per row on 2 cores.

    python bench/loss_memory.py                      # CPU, f32 + bf16, chunk 0 vs 1024
    python bench/loss_memory.py --chunks 0,512,2048 --dtypes bfloat16
    python bench/loss_memory.py --topology v5e:2x2   # per chip on a TPU topology (libtpu)

Writes bench/results/loss_memory.json (after every row) and prints a table.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchlib import machine_info, write_json  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def _config(dtype: str, chunk: int, rows: int, length: int, parallelism: str):
    spec = importlib.util.spec_from_file_location(
        "wmt14_ende_base", os.path.join(os.path.dirname(RESULTS), "..", "configs",
                                        "wmt14_ende_base.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.model.dtype = dtype
    config.optimizer.loss_chunk = chunk
    config.batch_size = rows
    config.data.max_length = length
    config.parallelism = parallelism
    return config


def measure(dtype: str, chunk: int, rows: int, length: int, topology: str | None) -> dict:
    """Compile one train step; its memory analysis in bytes (per device)."""
    import jax

    from transformer_jax.aot.programs import build_programs, tpu_devices

    devices = tpu_devices(topology) if topology else jax.devices("cpu")[:1]
    config = _config(dtype, chunk, rows, length, "auto" if topology else "none")
    start = time.perf_counter()
    programs, info = build_programs(config, devices, decode=False)
    train = programs[0]
    compiled = train.fn.lower(*train.args).compile()
    mem = compiled.memory_analysis()
    return {
        "dtype": dtype, "loss_chunk": chunk, "batch": [rows, length],
        "vocab_size": info["vocab_size"], "params": info["params"],
        "devices": len(devices), "platform": devices[0].platform,
        "device_kind": devices[0].device_kind,
        "temp_bytes": int(mem.temp_size_in_bytes),
        "argument_bytes": int(mem.argument_size_in_bytes),
        "output_bytes": int(mem.output_size_in_bytes),
        "alias_bytes": int(mem.alias_size_in_bytes),
        "compile_s": round(time.perf_counter() - start, 1),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--chunks", default="0,1024", help="optimizer.loss_chunk values")
    parser.add_argument("--rows", type=int, default=96)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--topology", default=None, help="TPU topology, e.g. v5e:2x2")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    name = "loss_memory" + (f"_{args.topology.replace(':', '_')}" if args.topology else "")
    path = args.json or os.path.join(RESULTS, name + ".json")
    result = {"command": "python bench/loss_memory.py " + " ".join(argv or sys.argv[1:]),
              "machine": machine_info("jax", "jaxlib"), "rows": []}
    print(f"{'dtype':9} {'chunk':>6} {'temp GiB':>9} {'args GiB':>9} {'compile s':>9}")
    for dtype in args.dtypes.split(","):
        for chunk in (int(c) for c in args.chunks.split(",")):
            row = measure(dtype, chunk, args.rows, args.length, args.topology)
            result["rows"].append(row)
            write_json(path, result)
            print(f"{dtype:9} {chunk:6d} {row['temp_bytes'] / 2**30:9.2f} "
                  f"{row['argument_bytes'] / 2**30:9.2f} {row['compile_s']:9.1f}", flush=True)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
