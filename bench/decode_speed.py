"""Decoding speed: KV-cached vs uncached greedy search, and cached beam search.

For each output length N the benchmark decodes a batch of random source sentences with a
randomly initialised Transformer, EOS disabled (``eos_id = vocab_size``, an id the model cannot
emit) so every run produces exactly N tokens per sentence:

* ``cached``: ``greedy_search`` over the model's KV cache (encoder once, one decoder position
  per step; the cross-attention keys/values projected once);
* ``uncached``: the same ``greedy_search`` loop, but every step re-runs the full decoder over
  the whole prefix, kept in a fixed ``[B, N]`` buffer so the program compiles once (positions
  after the prefix are hidden by the causal mask); the encoder output is still computed once;
* ``beam``: cached ``beam_search`` with ``--beam`` beams (alpha 0.6).

Every function is jitted and compiled (plus one warm-up run) before timing; the timed runs are
interleaved across all cases (the machine is shared) and the median is reported.

Usage: python bench/decode_speed.py [--lengths 32,64,128] [--batch 16] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

from benchlib import machine_info


def build(args):
    """Model params and jitted ``cached / uncached / beam`` decoders per output length."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from jax import lax

    from transformer_jax import decoding
    from transformer_jax.config import ModelConfig
    from transformer_jax.nn import Transformer, split_model

    lengths = [int(n) for n in args.lengths.split(",")]
    config = ModelConfig(
        vocab_size=args.vocab, d_model=args.d_model, num_heads=args.heads,
        num_layers=args.layers, d_ff=args.d_ff, dropout_rate=0.0,
        max_len=max(lengths + [args.src_len]))
    model_def, params = split_model(Transformer(config, rngs=nnx.Rngs(0)))
    never = args.vocab  # an EOS id the model cannot produce: every run decodes N tokens

    def cached(params, src, n):
        model = model_def.merge(params)
        cache = model.init_cache(src.shape[0], n, encoded=model.encode(src), src_ids=src)

        def tokens_to_logits(ids, cache):  # ids [B, 1]
            logits, cache = model.decode(ids, cache=cache)  # [B, 1, V]
            return logits[:, 0], cache

        return cache, tokens_to_logits

    def greedy_cached(params, src, n):
        cache, fn = cached(params, src, n)
        return decoding.greedy_search(cache, fn, batch_size=src.shape[0], max_len=n,
                                      eos_id=never)

    def greedy_uncached(params, src, n):
        model = model_def.merge(params)
        encoded = model.encode(src)  # [B, S, D]
        prefix = {"ids": jnp.zeros((src.shape[0], n), jnp.int32), "index": jnp.int32(0)}

        def tokens_to_logits(ids, prefix):  # ids [B, 1] written at the prefix end
            buf = lax.dynamic_update_slice(prefix["ids"], ids, (0, prefix["index"]))
            # [B, N, V]: the whole buffer
            logits, _ = model.decode(buf, encoded=encoded, src_ids=src)
            logits = lax.dynamic_index_in_dim(logits, prefix["index"], 1, keepdims=False)
            return logits, {"ids": buf, "index": prefix["index"] + 1}

        return decoding.greedy_search(prefix, tokens_to_logits, batch_size=src.shape[0],
                                      max_len=n, eos_id=never)

    def beam(params, src, n):
        cache, fn = cached(params, src, n)
        return decoding.beam_search(cache, fn, batch_size=src.shape[0], beam_size=args.beam,
                                    max_len=n, eos_id=never, alpha=0.6)[0]

    kinds = {"cached": greedy_cached, "uncached": greedy_uncached, "beam": beam}
    fns = {(kind, n): jax.jit(lambda p, s, f=f, n=n: f(p, s, n))
           for n in lengths for kind, f in kinds.items()}
    rng = jax.random.key(1)
    src = jax.random.randint(rng, (args.batch, args.src_len), 3, args.vocab, jnp.int32)
    return config, params, src, fns


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="32,64,128", help="output tokens per sentence")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--src-len", type=int, default=32)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--layers", type=int, default=3, help="encoder and decoder layers")
    parser.add_argument("--d-ff", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--beam", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per case")
    parser.add_argument("--kinds", default="cached,uncached,beam")
    parser.add_argument(
        "--json", default=os.path.join(os.path.dirname(__file__), "results", "decode_speed.json"))
    args = parser.parse_args()

    import jax

    config, params, src, fns = build(args)
    kinds = args.kinds.split(",")
    cases = [case for case in fns if case[0] in kinds]
    load_before = os.getloadavg()
    compile_s = {}
    for case in cases:  # compile + one warm-up run, excluded from the timings
        start = time.perf_counter()
        jax.block_until_ready(fns[case](params, src))
        compile_s[case] = time.perf_counter() - start
        print(f"warm-up {case[0]:>8} N={case[1]:<4} {compile_s[case]:7.2f} s", flush=True)
    agreement = {}  # cached and uncached greedy must pick the same tokens
    for n in sorted({n for _, n in cases}):
        if ("cached", n) in fns and ("uncached", n) in fns and {"cached", "uncached"} <= set(kinds):
            a, b = (jax.device_get(fns[(k, n)](params, src)) for k in ("cached", "uncached"))
            agreement[n] = float((a == b).mean())
    times = {case: [] for case in cases}
    for r in range(args.repeats):  # interleaved: every case once per round
        for case in cases:
            start = time.perf_counter()
            jax.block_until_ready(fns[case](params, src))
            times[case].append(time.perf_counter() - start)
        print(f"round {r + 1}/{args.repeats} done", flush=True)

    rows = []
    for kind, n in cases:
        t = statistics.median(times[(kind, n)])
        row = {"kind": kind, "tokens": n, "median_s": round(t, 4),
               "runs_s": [round(x, 4) for x in times[(kind, n)]],
               "warmup_s": round(compile_s[(kind, n)], 2),
               "ms_per_step": round(1000 * t / n, 3),
               "sentences_per_s": round(args.batch / t, 2)}
        if kind != "beam":
            row["tokens_per_s"] = round(args.batch * n / t, 1)
        rows.append(row)
    by = {(r["kind"], r["tokens"]): r for r in rows}
    for row in rows:
        other = by.get(("uncached", row["tokens"]))
        if row["kind"] == "cached" and other:
            row["speedup_vs_uncached"] = round(other["median_s"] / row["median_s"], 2)
            # the same ratio paired within each round, less exposed to load drifting
            ratios = [u / c for u, c in zip(other["runs_s"], row["runs_s"], strict=True)]
            row["speedup_per_round"] = [round(x, 2) for x in ratios]
            row["speedup_median_per_round"] = round(statistics.median(ratios), 2)
            row["same_tokens_as_uncached"] = agreement.get(row["tokens"])

    print(f"\nD {args.d_model}, {args.heads} heads, {args.layers}+{args.layers} layers, "
          f"F {args.d_ff}, vocab {args.vocab}, batch {args.batch}, source {args.src_len}, "
          f"beam {args.beam}; median of {args.repeats}")
    print(f"{'tokens':>6} | {'cached s':>9} | {'uncached s':>10} | {'speedup':>7} | "
          f"{'cached tok/s':>12} | {'beam-' + str(args.beam) + ' sent/s':>12}")
    for n in sorted({r["tokens"] for r in rows}):
        c, u, b = by.get(("cached", n)), by.get(("uncached", n)), by.get(("beam", n))

        def cell(row, key, width, fmt):
            return f"{row[key]:{width}{fmt}}" if row and key in row else " " * (width - 1) + "-"

        print(f"{n:>6} | {cell(c, 'median_s', 9, '.3f')} | {cell(u, 'median_s', 10, '.3f')} | "
              f"{cell(c, 'speedup_vs_uncached', 7, '.1f')} | {cell(c, 'tokens_per_s', 12, '.0f')}"
              f" | {cell(b, 'sentences_per_s', 12, '.1f')}")

    result = {
        "benchmark": "greedy decoding with vs without KV cache; cached beam search",
        "command": "python bench/decode_speed.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "json"),
        "config": {"model": {k: getattr(config, k) for k in (
            "vocab_size", "d_model", "num_heads", "num_layers", "d_ff")},
            "batch": args.batch, "source_length": args.src_len, "beam": args.beam,
            "repeats": args.repeats, "eos": "disabled (every run decodes N tokens)"},
        "machine": machine_info("jax", "flax", loadavg_before=load_before,
                                loadavg_after=os.getloadavg()),
        "rows": rows,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
