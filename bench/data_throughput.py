"""Throughput of the training input pipeline through its public API, against what accelerators eat.

Runs ``data.prepare(config.data, workdir)`` then ``data.train_iterator(prepared,
batch_size=256, seed=0)`` with the data settings of ``configs/multi30k.py`` on Multi30k
(``../shared/data/multi30k``; the built-in numbers task when it is absent) and reports:

* real (non-pad, source + target) tokens/s of wall time after the first batch, for
  ``--seconds``; packing fill (real tokens / token slots); batches/s;
* first-batch latency (``train_iterator`` to the first batch);
* one-off costs: dataset + tokenizer + token-id cache from scratch, the token-id cache alone
  (rebuilt after deleting it), and ``prepare`` when everything is cached;
* the pipeline's resident memory: the process RSS after the timed run minus before
  ``prepare`` (worker processes are not included);
* subword sampling (``data.subword_sampling_alpha=0.2``, 16-best) with ``data.num_workers``
  0, 1 and 2, and the 2-vs-1 speed-up;
* beside them, what one H100 consumed (docs/accelerators.md: Transformer-base bf16,
  586,697 tokens/s at 17.2% MFU; ~1.5M at 45% MFU) and a host of 4 or 8 such GPUs, with the
  headroom (pipeline tokens/s of one host process / what the host consumes).

Usage: python bench/data_throughput.py [--seconds 20] [--json bench/results/data_throughput.json]
       python bench/data_throughput.py --smoke --json /tmp/smoke.json   # a few seconds
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import sys
import tempfile
import time

import numpy as np
from benchlib import machine_info, write_json

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
MULTI30K = os.path.normpath(os.path.join(ROOT, "..", "shared", "data", "multi30k"))
H100_BASE_BF16 = 586_697  # tokens/s, docs/accelerators.md (17.2% MFU)
H100_MFU, TARGET_MFU = 0.172, 0.45


def _config(dataset: str):
    """The data.* settings of configs/multi30k.py (Multi30k) or the numbers task."""
    if dataset.startswith("numbers"):
        from transformer_jax.data import default_data_config

        cfg = default_data_config()
        if dataset == "numbers-small":  # --smoke without Multi30k: prepared in a second
            cfg.update(dict(numbers_max=5000, numbers_train_size=2000,
                            numbers_validation_size=100, numbers_test_size=100, vocab_size=100))
        return cfg
    spec = importlib.util.spec_from_file_location("multi30k", os.path.join(ROOT, "configs",
                                                                          "multi30k.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.get_config().data
    cfg.path = MULTI30K
    return cfg


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return kib / 1024


def _measure(prepared, batch_size: int, seconds: float) -> dict:
    from transformer_jax.data import train_iterator

    start = time.perf_counter()
    it = train_iterator(prepared, batch_size, seed=0, process_index=0, process_count=1)
    next(it)
    first_s = time.perf_counter() - start
    batches = tokens = slots = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds or batches < 2:
        batch = next(it)
        tokens += int(np.count_nonzero(batch["inputs"]) + np.count_nonzero(batch["targets"]))
        slots += batch["inputs"].size + batch["targets"].size
        batches += 1
    elapsed = time.perf_counter() - start
    it.close()
    return {"first_batch_s": round(first_s, 3), "seconds": round(elapsed, 2),
            "batches": batches, "batches_per_s": round(batches / elapsed, 1),
            "tokens_per_s": round(tokens / elapsed), "fill": round(tokens / slots, 3)}


def _one_off(cfg, workdir: str) -> tuple[dict, object]:
    from transformer_jax.data import prepare

    start = time.perf_counter()
    prepared = prepare(cfg, workdir)  # dataset, tokenizer, token-id caches
    scratch = time.perf_counter() - start
    shutil.rmtree(prepared.cache_dir)
    start = time.perf_counter()
    prepare(cfg, workdir)  # the caches alone are rebuilt
    rebuild = time.perf_counter() - start
    start = time.perf_counter()
    prepared = prepare(cfg, workdir)  # everything reused
    reuse = time.perf_counter() - start
    return {"prepare_from_scratch_s": round(scratch, 2),
            "token_cache_build_s": round(rebuild - reuse, 2),
            "prepare_cached_s": round(reuse, 2)}, prepared


def _accelerators(tokens_per_s: float) -> list[dict]:
    at_target = H100_BASE_BF16 * TARGET_MFU / H100_MFU
    rows = []
    for label, per_gpu in (("H100 base bf16, measured (17.2% MFU)", H100_BASE_BF16),
                           ("H100 base bf16 at 45% MFU (scaled)", at_target)):
        for gpus in (1, 4, 8):
            need = per_gpu * gpus
            rows.append({"consumer": label, "gpus_per_host": gpus, "tokens_per_s": round(need),
                         "headroom": round(tokens_per_s / need, 2)})
    return rows


def _sampling(base, workdir: str, batch_size: int, seconds: float) -> list[dict]:
    from transformer_jax.data import prepare

    rows = []
    for workers in (0, 1, 2):
        cfg = base.copy_and_resolve_references()
        cfg.update(dict(subword_sampling_alpha=0.2, subword_sampling_nbest=16,
                        num_workers=workers))
        row = {"num_workers": workers, **_measure(prepare(cfg, workdir), batch_size, seconds)}
        rows.append(row)
        print(f"  subword sampling, {workers} workers: {row['tokens_per_s']} tokens/s",
              file=sys.stderr)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="timed seconds per case")
    parser.add_argument("--sampling-seconds", type=float, default=10.0)
    parser.add_argument("--batch-size", type=int, default=256, help="global rows per batch")
    parser.add_argument("--dataset", default="auto",
                        choices=["auto", "multi30k", "numbers", "numbers-small"])
    parser.add_argument("--smoke", action="store_true", help="a few seconds in all")
    parser.add_argument("--json", default=os.path.join(HERE, "results", "data_throughput.json"))
    args = parser.parse_args(argv)
    if args.smoke:
        args.seconds, args.sampling_seconds = 1.0, 0.5

    sys.path.insert(0, ROOT)
    import tensorflow_datasets as tfds

    tfds.disable_progress_bar()
    dataset = args.dataset
    if dataset == "auto":
        dataset = "multi30k" if os.path.isdir(MULTI30K) else "numbers"
    if dataset == "numbers" and args.smoke:
        dataset = "numbers-small"
    base = _config(dataset)
    workdir = tempfile.mkdtemp(prefix="data_throughput_")
    try:
        rss_before = _rss_mib()
        one_off, prepared = _one_off(base, workdir)
        main_row = _measure(prepared, args.batch_size, args.seconds)
        main_row["rss_delta_mib"] = round(_rss_mib() - rss_before, 1)
        print(f"  packed: {main_row['tokens_per_s']} tokens/s", file=sys.stderr)
        sampling = _sampling(base, workdir, args.batch_size, args.sampling_seconds)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    one, two = sampling[1]["tokens_per_s"], sampling[2]["tokens_per_s"]
    result = {
        "benchmark": "training input pipeline (data.prepare + data.train_iterator)",
        "command": "python bench/data_throughput.py" + (" --smoke" if args.smoke else ""),
        "dataset": dataset,
        "settings": {"batch_size": args.batch_size, "max_length": base.max_length,
                     "vocab_size": base.vocab_size, "packing": base.packing,
                     "packing_bins_per_row": base.packing_bins_per_row,
                     "prefetch_batches": base.prefetch_batches, "seconds": args.seconds},
        "machine": machine_info("grain", "sentencepiece", "numpy"),
        "one_off": one_off,
        "train": main_row,
        "subword_sampling": sampling,
        "sampling_2_vs_1_workers": round(two / one, 2) if one else None,
        "accelerators": _accelerators(main_row["tokens_per_s"]),
    }
    _print(result)
    write_json(args.json, result)
    return 0


def _print(r: dict) -> None:
    t, s = r["train"], r["settings"]
    print(f"\nInput pipeline on {r['dataset']}, {s['batch_size']} x {s['max_length']}, "
          f"{r['machine']['cpu_count']} CPUs, load {r['machine']['load_avg_1m']}")
    print(f"real tokens/s {t['tokens_per_s']:,}  fill {t['fill']}  first batch "
          f"{t['first_batch_s']} s  RSS +{t['rss_delta_mib']} MiB  one-off {r['one_off']}")
    print("subword sampling tokens/s by workers: "
          + ", ".join(f"{x['num_workers']}: {x['tokens_per_s']:,}" for x in r["subword_sampling"])
          + f"  (2 vs 1: {r['sampling_2_vs_1_workers']}x)")
    print("| consumer | GPUs per host | tokens/s needed | headroom |\n|---|---:|---:|---:|")
    for a in r["accelerators"]:
        print(f"| {a['consumer']} | {a['gpus_per_host']} | {a['tokens_per_s']:,} "
              f"| {a['headroom']}x |")


if __name__ == "__main__":
    sys.exit(main())
