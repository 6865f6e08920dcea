"""Throughput of the training input pipeline: examples/s and tokens/s per configuration.

Runs the real pipeline (`transformer_jax.data.train_iterator`: read array_record -> tokenize
-> drop too long -> pack or pad -> batch -> prefetch) on Multi30k en->de when
``../shared/data/multi30k`` exists, otherwise on the built-in numbers task, and reports for each
configuration:

* examples/s — pairs delivered per second;
* tokens/s — real (non-pad) source + target tokens per second;
* fill — real tokens / all token slots in the batches (what packing buys);
* the cost of subword sampling (``data.subword_sampling_*``: n-best segmentations per sentence);
* headroom — tokens/s divided by what a training step consumes (``--step-tokens-per-s``, the
  real tokens per second of the training step on this machine); > 1 means the pipeline keeps
  up. Left empty until that number is given.

One-time costs (preparing the dataset, training the tokenizer) are measured separately and
do not count towards throughput. The first few batches (warm-up) are not timed either.

Usage: python bench/data_throughput.py [--batches 300] [--step-tokens-per-s 4400]
                                       [--json bench/results/data_throughput.json]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

import numpy as np
from benchlib import machine_info, write_json

HERE = os.path.dirname(os.path.abspath(__file__))
MULTI30K = os.path.normpath(os.path.join(HERE, "..", "..", "shared", "data", "multi30k"))


def _config(dataset: str):
    from transformer_jax.data import default_data_config

    cfg = default_data_config()
    if dataset == "multi30k":
        cfg.update(dict(source="text", path=MULTI30K, source_lang="en", target_lang="de",
                        train_split="train", eval_split="val", test_split="test2016",
                        vocab_size=8000, max_length=64))
    return cfg




def _measure(prepared, batch_size: int, batches: int, warmup: int) -> dict:
    from transformer_jax.data import train_iterator

    it = train_iterator(prepared, batch_size, seed=0, process_index=0, process_count=1)
    start = time.perf_counter()
    for _ in range(warmup):
        next(it)
    first_s = time.perf_counter() - start
    examples = tokens = slots = 0
    start = time.perf_counter()
    for _ in range(batches):
        batch = next(it)
        examples += int(batch["inputs_segmentation"].max(axis=1).sum())
        tokens += int(np.count_nonzero(batch["inputs"]) + np.count_nonzero(batch["targets"]))
        slots += batch["inputs"].size + batch["targets"].size
    elapsed = time.perf_counter() - start
    it.close()
    return {
        "warmup_s": round(first_s, 3),
        "batches": batches,
        "seconds": round(elapsed, 3),
        "batches_per_s": round(batches / elapsed, 1),
        "examples_per_s": round(examples / elapsed),
        "tokens_per_s": round(tokens / elapsed),
        "fill": round(tokens / slots, 3),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=300, help="timed batches per config")
    parser.add_argument("--warmup", type=int, default=5, help="untimed batches first")
    parser.add_argument("--batch-size", type=int, default=64, help="rows per batch")
    parser.add_argument("--step-tokens-per-s", type=float, default=None,
                        help="real tokens/s one training step consumes (fills 'headroom')")
    parser.add_argument("--dataset", choices=["auto", "multi30k", "numbers"], default="auto")
    parser.add_argument("--json", default=os.path.join(HERE, "results", "data_throughput.json"))
    args = parser.parse_args(argv)

    sys.path.insert(0, os.path.dirname(HERE))
    import tensorflow_datasets as tfds

    from transformer_jax.data import prepare

    tfds.disable_progress_bar()
    dataset = args.dataset
    if dataset == "auto":
        dataset = "multi30k" if os.path.isdir(MULTI30K) else "numbers"
    base = _config(dataset)
    workdir = tempfile.mkdtemp(prefix="data_throughput_")
    try:
        start = time.perf_counter()
        prepare(base, workdir)  # dataset + tokenizer, timed apart from the throughput
        prepare_s = time.perf_counter() - start
        cases = [
            ("packed, 4 bins per row, prefetch 2", dict(packing=True)),
            ("padded, prefetch 2", dict(packing=False)),
            ("packed, 4 bins per row, no prefetch", dict(packing=True, prefetch_batches=0)),
            ("packed, 1 bin per row, no prefetch", dict(packing=True, packing_bins_per_row=1,
                                                        prefetch_batches=0)),
            ("packed, subword sampling alpha 0.2 of 16-best, no prefetch",
             dict(packing=True, prefetch_batches=0, subword_sampling_alpha=0.2,
                  subword_sampling_nbest=16)),
            ("packed, subword sampling alpha 0.1 of 64-best, no prefetch",
             dict(packing=True, prefetch_batches=0, subword_sampling_alpha=0.1,
                  subword_sampling_nbest=64)),
        ]
        rows = []
        for name, overrides in cases:
            cfg = base.copy_and_resolve_references()
            cfg.update(overrides)
            case = prepare(cfg, workdir)  # reuses the prepared data and tokenizer
            row = {"config": name, **overrides, **_measure(case, args.batch_size,
                                                             args.batches, args.warmup)}
            if args.step_tokens_per_s:
                row["headroom"] = round(row["tokens_per_s"] / args.step_tokens_per_s, 1)
            rows.append(row)
            print(f"  {name}: {row['tokens_per_s']} tokens/s", file=sys.stderr)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    result = {
        "benchmark": "training input pipeline throughput (transformer_jax.data.train_iterator)",
        "dataset": dataset,
        "settings": {"batch_size": args.batch_size, "max_length": base.max_length,
                     "vocab_size": base.vocab_size, "batches": args.batches,
                     "warmup": args.warmup, "step_tokens_per_s": args.step_tokens_per_s},
        "one_time": {"prepare_and_tokenizer_s": round(prepare_s, 2)},
        "machine": machine_info("grain", "sentencepiece", "tensorflow_datasets"),
        "rows": rows,
    }
    print(f"\nInput pipeline on {dataset} (batch {args.batch_size} x {base.max_length}, "
          f"{result['machine']['cpu_count']} CPUs); prepare + tokenizer once: {prepare_s:.1f} s\n")
    print("| config | examples/s | tokens/s | fill | batches/s | headroom vs step |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        head = r.get("headroom", "")
        print(f"| {r['config']} | {r['examples_per_s']} | {r['tokens_per_s']} | {r['fill']} "
              f"| {r['batches_per_s']} | {head} |")
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
