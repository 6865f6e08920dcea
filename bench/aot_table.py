"""Per-chip memory and FLOPs of training steps on TPU v5e slices, measured by the compiler.

Every cell is a real XLA:TPU compile of the train step (``transformer_jax.aot``, needs
libtpu: ``pip install -e .[aot]``) of a model x layout x slice:

  models   base, big (configs/wmt14_ende_*.py, 96 x 256 tokens per side per update) and
           lm1b (a ~1B-parameter decoder-only LM, D 2048, 18 layers, 64 x 1024 tokens)
  layouts  data   (parallelism="shard_map": params and Adam state replicated on every chip)
           fsdp   (parallelism="sharded", sharding.fsdp = all chips: ZeRO-3 style)
           tensor (parallelism="sharded", sharding.tensor = 4 (8 for lm1b), data the rest)
  slices   v5e-8 ... v5e-256 (``--slices``)
  remat    model.remat of every cell (``--remat none|full|dots``, activation rematerialisation)

The global batch is kept at the config's rows when the chips divide it, else rounded to a
multiple of the batch shards (noted per row). Rows are appended to ``--out`` (JSON lines)
as they finish, so a long run can be stopped and resumed; ``--table`` prints the markdown.

  python bench/aot_table.py --models base,big --layouts data,fsdp,tensor \\
      --slices v5e:2x4,v5e:4x4 --out bench/results/aot_table.jsonl
  python bench/aot_table.py --table bench/results/aot_table.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from transformer_jax import aot  # noqa: E402
from transformer_jax.config import REMAT_POLICIES  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SLICES = {"v5e:2x4": 8, "v5e:4x4": 16, "v5e:4x8": 32, "v5e:8x8": 64, "v5e:8x16": 128,
          "v5e:16x16": 256}


def model_config(name: str):
    if name in ("base", "big"):
        return aot.load_config(os.path.join(ROOT, "configs", f"wmt14_ende_{name}.py"))
    if name == "lm1b":
        c = aot.load_config(os.path.join(ROOT, "configs", "lm_text.py"))
        c.data.max_length, c.data.vocab_size, c.batch_size = 1024, 32000, 64
        m = c.model
        m.d_model, m.num_heads, m.num_layers, m.d_ff, m.max_len = 2048, 16, 18, 8192, 1024
        m.pre_norm = True
        return c
    raise SystemExit(f"error: unknown model {name!r}; use base, big or lm1b.")


def layout_config(config, layout: str, chips: int):
    tensor = 8 if config.model.d_model >= 2048 else 4
    if layout == "data":
        config.parallelism = "shard_map"
        shards = chips
    elif layout == "fsdp":
        config.parallelism = "sharded"
        config.sharding.data, config.sharding.fsdp, config.sharding.tensor = 1, -1, 1
        shards = chips
    elif layout == "tensor":
        config.parallelism = "sharded"
        config.sharding.data, config.sharding.fsdp, config.sharding.tensor = -1, 1, tensor
        shards = chips // tensor
    else:
        raise SystemExit(f"error: unknown layout {layout!r}; use data, fsdp or tensor.")
    rows = config.batch_size
    if rows % shards:
        config.batch_size = shards * max(1, round(rows / shards))
    return config


def measure(model: str, layout: str, topology: str, remat: str = "none") -> dict:
    chips = SLICES.get(topology)
    config = layout_config(model_config(model), layout, chips or 0)
    config.model.remat = remat
    start = time.perf_counter()
    cpu0 = resource.getrusage(resource.RUSAGE_SELF).ru_utime
    report = aot.run(config, topology=topology, decode=False)
    return {
        "model": model, "layout": layout, "remat": remat, "topology": topology,
        "chips": report["num_devices"],
        "params": report["params"], "batch": report["batch"], "mesh": report["mesh"],
        "per_device_bytes": report["per_device_bytes"],
        "device_memory_bytes": report["device_memory_bytes"], "fits": report["fits"],
        # A step XLA:TPU refuses for lack of HBM has no FLOPs (per_device_bytes: what it asked).
        "compiled": report["compiled"],
        "flops_per_step": report.get("flops_per_step"),
        "flops_per_device": report.get("flops_per_device"),
        "compile_wall_s": round(time.perf_counter() - start, 1),
        "compile_cpu_s": round(resource.getrusage(resource.RUSAGE_SELF).ru_utime - cpu0, 1),
    }


def _tflop(row: dict) -> str:
    flops = row.get("flops_per_step")
    return "not compiled (out of HBM)" if flops is None else f"{flops / 1e12:.1f}"


def table(rows: list[dict]) -> str:
    lines = ["| model | layout | remat | slice | mesh | batch | per-chip memory | fits 16 GiB | "
             "TFLOP/step (all chips) | compile CPU s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        mesh = "x".join(f"{k}{v}" for k, v in r["mesh"].items() if v > 1) or "1"
        lines.append(
            f"| {r['model']} ({r['params'] / 1e6:.0f}M) | {r['layout']} | "
            f"{r.get('remat', 'none')} | v5e-{r['chips']} | "
            f"{mesh} | {r['batch'][0]}x{r['batch'][1]} | "
            f"{r['per_device_bytes'] / 2**30:.2f} GiB | {'yes' if r['fits'] else 'NO'} | "
            f"{_tflop(r)} | {r['compile_cpu_s']:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="base,big,lm1b")
    parser.add_argument("--layouts", default="data,fsdp,tensor")
    parser.add_argument("--slices", default=",".join(SLICES))
    parser.add_argument("--remat", default="none", choices=REMAT_POLICIES,
                        help="model.remat of every cell (activation rematerialisation)")
    parser.add_argument("--out", default=os.path.join(ROOT, "bench", "results",
                                                      "aot_table.jsonl"))
    parser.add_argument("--table", help="print the markdown table of this JSON-lines file")
    args = parser.parse_args(argv)
    if args.table:
        with open(args.table) as f:
            print(table([json.loads(line) for line in f if line.strip()]))
        return 0
    done = set()
    if os.path.exists(args.out):
        with open(args.out) as f:
            done = {(r["model"], r["layout"], r["topology"], r.get("remat", "none"))
                    for r in map(json.loads, filter(str.strip, f))}
    for model in args.models.split(","):
        for layout in args.layouts.split(","):
            for topology in args.slices.split(","):
                if (model, layout, topology, args.remat) in done:
                    continue
                row = measure(model, layout, topology, args.remat)
                with open(args.out, "a") as f:
                    f.write(json.dumps(row) + "\n")
                print(table([row]).splitlines()[-1], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
