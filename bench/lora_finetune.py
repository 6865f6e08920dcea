"""LoRA against full fine-tuning on CPU: trainable parameters, optimizer memory, step time.

Builds the training run of ``train.py`` (``training.build_run``) twice for the same model —
full fine-tuning and LoRA (``model.lora_rank``) — and measures on random token batches:

* trainable parameters: all of them, or the adapters' share of the adapted model;
* optimizer state bytes: the sum of the arrays in ``TrainState.opt_state`` (Adam's moments);
* compiled peak bytes of the train step (``compiled.memory_analysis()``: arguments, outputs
  and temporaries);
* step time: median wall time of ``--steps`` train steps after two warm-up steps.

Usage:
  python bench/lora_finetune.py [--smoke] [--json bench/results/lora_finetune.json]
  python bench/lora_finetune.py --bleu [--smoke] [--json bench/results/lora_finetune_bleu.json]

The default model has the size of an OPUS-MT model (D 512, N 8, 6+6 layers, F 2048) with V 8000,
batch 16 x 32 + 32 tokens); ``--smoke`` uses a tiny one for a few seconds. ``--bleu`` compares
the two by BLEU on a new domain after the same wall time of fine-tuning (bench/lora_bleu.py).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax
import lora_bleu
import numpy as np
from benchlib import machine_info, write_json

from transformer_jax.nn.adapters import adapter_params
from transformer_jax.training import build_run, default_config, validate_config


def _config(args, lora_rank: int):
    c = default_config()
    m = c.model
    m.d_model, m.num_heads, m.num_layers, m.d_ff = args.d_model, args.heads, args.layers, args.d_ff
    m.max_len = args.length
    m.lora_rank, m.lora_alpha, m.lora_targets = lora_rank, 16.0, args.targets
    c.data.max_length, c.data.vocab_size = args.length, args.vocab
    c.batch_size, c.parallelism = args.batch, "none"
    c.optimizer.name, c.optimizer.schedule = "adam", "constant"
    c.optimizer.learning_rate = 1e-4
    return validate_config(c)


def _bytes(tree) -> int:
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree) if hasattr(x, "size")))


def measure(args, lora_rank: int) -> dict:
    run = build_run(_config(args, lora_rank), vocab_size=args.vocab)
    state = run.init_state()
    rng = np.random.default_rng(0)
    shape = (args.batch, args.length)
    batch = {k: rng.integers(3, args.vocab, shape).astype(np.int32) for k in ("inputs", "targets")}
    key = jax.random.key(0)
    total = sum(x.size for x in jax.tree.leaves(state.params))
    trainable = sum(x.size for x in jax.tree.leaves(adapter_params(state.params))) \
        if lora_rank else total
    memory = run.train_step.lower(state, batch, key).compile().memory_analysis()
    times = []
    for i in range(args.steps + 2):
        start = time.perf_counter()
        state, metrics = run.train_step(state, batch, key)
        jax.block_until_ready(metrics["loss"])
        if i >= 2:
            times.append(time.perf_counter() - start)
    peak = memory.argument_size_in_bytes + memory.output_size_in_bytes \
        + memory.temp_size_in_bytes - memory.alias_size_in_bytes
    return {"mode": f"lora r={lora_rank}" if lora_rank else "full", "params": int(total),
            "trainable": int(trainable), "trainable_pct": 100.0 * trainable / total,
            "opt_state_bytes": _bytes(state.opt_state), "step_peak_bytes": int(peak),
            "step_s_median": statistics.median(times), "steps": args.steps}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--targets", default="query,key,value,out")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--json", default="")
    p.add_argument("--bleu", action="store_true", help="BLEU of LoRA and full fine-tuning")
    lora_bleu.add_arguments(p)
    args = p.parse_args()
    if args.bleu:
        return bleu_main(args)
    size = (64, 4, 1, 128, 500, 4, 16) if args.smoke else (512, 8, 6, 2048, 8000, 16, 32)
    (args.d_model, args.heads, args.layers, args.d_ff, args.vocab, args.batch,
     args.length) = size
    rows = [measure(args, 0), measure(args, args.rank)]
    print("| mode | trainable params | % | optimizer state | step peak | step time |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['trainable']:,} | {r['trainable_pct']:.2f} | "
              f"{r['opt_state_bytes'] / 2**20:.1f} MiB | {r['step_peak_bytes'] / 2**20:.0f} MiB | "
              f"{1000 * r['step_s_median']:.0f} ms |")
    if args.json:
        write_json(args.json, {"model": dict(zip(("d_model", "heads", "layers", "d_ff", "vocab",
                                                  "batch", "length"), size, strict=True)),
                               "targets": args.targets, "rows": rows})


def bleu_main(args) -> None:
    """``--bleu``: the protocol of bench/lora_bleu.py, its table and JSON."""
    lora_bleu.configure(args)
    before = machine_info("jax")
    result = lora_bleu.run_protocol(args)
    print(lora_bleu.table(result))
    if args.json:
        options = ("smoke", "base_minutes", "ft_minutes", "full_lr", "d_model", "heads", "layers",
                   "d_ff", "vocab", "batch", "max_length", "warmup")
        write_json(args.json, {
            "command": "python bench/lora_finetune.py " + " ".join(sys.argv[1:]),
            "settings": {k: getattr(args, k) for k in options},
            "domain_b_words": lora_bleu.ANIMAL_WORDS, **result,
            "machine_start": before, "load_avg_end": [round(x, 2) for x in os.getloadavg()],
            "note": "wall-clock budgets on a shared 2-core CPU: updates done depend on the load"})


if __name__ == "__main__":
    main()
