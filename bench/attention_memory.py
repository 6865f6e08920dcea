"""Peak memory and time of self-attention forward + backward: "xla" vs "chunked".

For each sequence length L the benchmark differentiates ``sum(dot_product_attention(q, k, v))``
with respect to q, k and v (B=1, N=8, H=64, float32, no mask) under ``jax.jit`` and reports

* the compiler's buffer assignment (``compiled.memory_analysis()``): arguments + outputs +
  temporaries — deterministic and exactly what XLA will allocate for that program;
* the resident-memory growth of a fresh process while the compiled step runs (sampled RSS);
* the median wall time of a few runs after a warm-up run.

Each case runs in its own subprocess so the RSS numbers do not leak between cases. Cases whose
analysed peak exceeds ``--max-run-gib``, or twice which exceeds the available memory (on CPU the
process grows to about 1.8x the analysed peak for "xla"), are compiled to report the memory but
not run.

Usage: python bench/attention_memory.py [--lengths 1024,2048] [--json PATH]

``--model`` instead compiles a whole-model training step (loss, gradients, SGD update; nothing
is run) for the encoder-decoder (source = target length) and the decoder-only LM, with
sinusoidal and ALiBi positions, "xla" vs "chunked" attention, and records the compiler's peak
bytes as rows ``{model, positional, impl, length, peak_bytes}``:

  python bench/attention_memory.py --model --json bench/results/attention_memory_model.json

``--window`` compiles (runs nothing) causal self-attention forward + backward with and without
a sliding window (``local_window_size=(W, 0)``, default W = 512) for "xla" and "chunked" and
records the compiler's FLOPs and peak bytes per length. XLA's cost analysis counts a loop body
once, so the FLOPs of "chunked" come from the same program with its block loops unrolled
(``chunked_dot_product_attention(unroll=True)``; unrolled, XLA may also merge the forward's
and the backward's recomputation of the same block of scores), and the peak bytes from the
program as it runs (loops rolled):

  python bench/attention_memory.py --window --json bench/results/attention_window.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time

from benchlib import machine_info, write_json

GIB = 2.0**30
DEFAULT_LENGTHS = "1024,2048,4096,8192,16384"


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


class _PeakRss:
    """Samples this process's RSS every few milliseconds in a background thread."""

    def __init__(self, interval: float = 0.002):
        self.interval, self.peak, self._stop = interval, _rss(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss())
            time.sleep(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())


def run_case(impl: str, length: int, args) -> dict:
    """Compiles (and unless too big, runs) one case in this process; returns a result row."""
    import jax
    import jax.numpy as jnp

    from transformer_jax.ops import dot_product_attention

    shape = (args.batch, length, args.heads, args.head_dim)

    def loss(q, k, v):
        out = dot_product_attention(q, k, v, implementation=impl, chunk_size=args.chunk_size)
        return jnp.sum(out)

    step = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    spec = jax.ShapeDtypeStruct(shape, jnp.float32)
    t0 = time.perf_counter()
    compiled = step.lower(spec, spec, spec).compile()
    compile_s = time.perf_counter() - t0
    ma = compiled.memory_analysis()
    peak = ma.argument_size_in_bytes + ma.output_size_in_bytes + ma.temp_size_in_bytes
    peak -= ma.alias_size_in_bytes
    row = {
        "implementation": impl,
        "length": length,
        "compile_s": round(compile_s, 2),
        "xla_temp_gib": ma.temp_size_in_bytes / GIB,
        "xla_peak_gib": peak / GIB,
        "scores_tensor_gib": args.batch * args.heads * length * length * 4 / GIB,
    }
    import psutil

    available = psutil.virtual_memory().available
    if peak / GIB > args.max_run_gib or 2 * peak > available:
        # On CPU the process grows to ~1.8x the analysed peak (measured), so keep a 2x margin.
        row["skipped"] = (
            f"skipped: would need {peak / GIB:.1f} GiB (limit {args.max_run_gib} GiB, "
            f"{available / GIB:.1f} GiB available)"
        )
        return row
    keys = jax.random.split(jax.random.key(0), 3)
    q, k, v = (jax.random.normal(key, shape, jnp.float32) for key in keys)
    jax.block_until_ready((q, k, v))
    rss_before = _rss()
    with _PeakRss() as sampler:
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(q, k, v))
        first_s = time.perf_counter() - t0
    times = []
    for _ in range(args.repeats if first_s < 20 else 1):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(q, k, v))
        times.append(time.perf_counter() - t0)
    row.update(
        rss_delta_gib=(sampler.peak - rss_before) / GIB,
        first_run_s=round(first_s, 3),
        median_s=round(statistics.median(times), 3),
        runs=len(times),
    )
    return row




MODEL_LENGTHS = "1024,2048,4096,8192,16384,32768"


def model_case(model: str, positional: str, impl: str, length: int, args) -> dict:
    """Compile-time peak bytes of one training step of a small model (B=1, nothing run)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from transformer_jax import ops
    from transformer_jax.config import ModelConfig
    from transformer_jax.nn import build_model

    config = ModelConfig(
        vocab_size=args.vocab, d_model=args.d_model, num_heads=args.heads, num_layers=2,
        d_ff=4 * args.d_model, dropout_rate=0.0, max_len=length, positional=positional,
        attention_impl=impl, attention_chunk_size=args.chunk_size,
    )
    graphdef, params = nnx.split(nnx.eval_shape(
        lambda: build_model(model, config, nnx.Rngs(0))))

    def step(params, ids):  # ids [1, L]: source and target the same here
        def loss(params):
            logits = nnx.merge(graphdef, params)({"inputs": ids, "targets": ids})
            return ops.cross_entropy(logits, ids)[0]  # (summed loss, token count)
        grads = jax.grad(loss)(params)
        return jax.tree.map(lambda p, g: p - 1e-3 * g, params, grads)

    ids = jax.ShapeDtypeStruct((1, length), jnp.int32)
    t0 = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=0).lower(params, ids).compile()
    ma = compiled.memory_analysis()
    peak = (ma.argument_size_in_bytes + ma.output_size_in_bytes + ma.temp_size_in_bytes
            - ma.alias_size_in_bytes)
    return {"model": model, "positional": positional, "impl": impl, "length": length,
            "peak_bytes": int(peak), "temp_bytes": int(ma.temp_size_in_bytes),
            "compile_s": round(time.perf_counter() - t0, 2)}


def model_table(rows: list[dict]) -> str:
    lengths = sorted({r["length"] for r in rows})
    lines = ["| model | positional | impl | " + " | ".join(f"{n // 1024}k" for n in lengths)
             + " | growth 8k->16k |", "|---|---|---|" + "---:|" * (len(lengths) + 1)]
    groups = sorted({(r["model"], r["positional"], r["impl"]) for r in rows})
    for group in groups:
        mib = {r["length"]: r["peak_bytes"] / 2**20 for r in rows
               if (r["model"], r["positional"], r["impl"]) == group and "peak_bytes" in r}
        cells = [f"{mib[n]:,.0f}" if n in mib else "-" for n in lengths]
        growth = f"{mib[16384] / mib[8192]:.2f}x" if 8192 in mib and 16384 in mib else "-"
        lines.append(f"| {' | '.join(group)} | " + " | ".join(cells) + f" | {growth} |")
    return "\n".join(lines)


def run_model_bench(args) -> int:
    rows = []
    for model in ("encoder_decoder", "decoder_only"):
        for positional in ("sinusoidal", "alibi"):
            for impl in [x for x in args.implementations.split(",") if x]:
                for length in [int(x) for x in args.lengths.split(",") if x]:
                    if impl == "xla" and length > args.max_xla_length:
                        continue
                    rows.append(model_case(model, positional, impl, length, args))
                    print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    table = model_table(rows)
    print(table)
    result = {
        "benchmark": "whole-model train step, compile-time peak bytes (memory_analysis)",
        "config": {"batch": 1, "d_model": args.d_model, "heads": args.heads, "layers": 2,
                   "d_ff": 4 * args.d_model, "vocab": args.vocab, "dtype": "float32",
                   "chunk_size": args.chunk_size},
        "machine": machine_info("jax"),
        "rows": rows,
        "table": table,
    }
    write_json(args.json, result)
    print(f"wrote {args.json}")
    return 0


WINDOW_LENGTHS = "1024,2048,4096,8192,16384"


def window_case(impl: str, window: int | None, length: int, args) -> dict:
    """Compiled FLOPs and peak bytes of causal self-attention fwd+bwd (nothing is run)."""
    import jax
    import jax.numpy as jnp

    from transformer_jax import ops
    from transformer_jax.ops.chunked_attention import chunked_dot_product_attention

    x = jax.ShapeDtypeStruct((args.batch, length, args.heads, args.head_dim), jnp.float32)
    kv = jax.ShapeDtypeStruct((args.batch, length, args.kv_heads, args.head_dim), jnp.float32)
    local = None if window is None else (window, 0)

    def compiled(unroll: bool):
        def loss(q, k, v):
            if unroll:
                spec = ops.AttentionSpec(causal=True, window=local)
                out = chunked_dot_product_attention(q, k, v, spec=spec, unroll=True,
                                                    chunk_size=args.chunk_size)
            else:
                out = ops.dot_product_attention(q, k, v, is_causal=True, local_window_size=local,
                                                implementation=impl, chunk_size=args.chunk_size)
            return jnp.sum(out)
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(x, kv, kv).compile()

    t0 = time.perf_counter()
    rolled = compiled(unroll=False)
    ma = rolled.memory_analysis()
    row = {"implementation": impl, "window": window, "length": length,
           "peak_bytes": int(ma.argument_size_in_bytes + ma.output_size_in_bytes
                             + ma.temp_size_in_bytes - ma.alias_size_in_bytes)}
    blocks = -(-length // args.chunk_size)
    unrolled_blocks = blocks * blocks if window is None else blocks
    if impl == "chunked" and unrolled_blocks > args.max_unrolled_blocks:
        row["flops"] = None  # too many blocks to unroll in reasonable compile time
    else:
        counted = compiled(unroll=True) if impl == "chunked" else rolled
        cost = counted.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        row["flops"] = float(cost["flops"])
    row["compile_s"] = round(time.perf_counter() - t0, 2)
    return row


def window_table(rows: list[dict], key: str, scale: float, unit: str) -> str:
    lengths = sorted({r["length"] for r in rows})
    head = " | ".join(f"{n // 1024}k" for n in lengths)
    lines = [f"| impl | window | {head} | growth, last doubling |",
             "|---|---|" + "---:|" * (len(lengths) + 1)]
    for impl, window in sorted({(r["implementation"], r["window"] or 0) for r in rows}):
        got = {r["length"]: r[key] for r in rows if r["implementation"] == impl
               and (r["window"] or 0) == window and r.get(key) is not None}
        cells = [f"{got[n] / scale:,.1f}" if n in got else "-" for n in lengths]
        have = [n for n in lengths if n in got]
        a, b = (have[-2], have[-1]) if len(have) > 1 else (None, None)
        growth = f"{got[b] / got[a]:.2f}x ({a // 1024}k->{b // 1024}k)" if a else "-"
        label = f"({window}, 0)" if window else "none"
        lines.append(f"| {impl} | {label} | " + " | ".join(cells) + f" | {growth} |")
    return f"{unit}:\n\n" + "\n".join(lines)


def run_window_bench(args) -> int:
    rows = []
    for impl in [x for x in args.implementations.split(",") if x]:
        for window in (None, args.window):
            for length in [int(x) for x in args.lengths.split(",") if x]:
                rows.append(window_case(impl, window, length, args))
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    table = (window_table(rows, "flops", 1e9, "GFLOP (compiled, fwd+bwd)") + "\n\n"
             + window_table(rows, "peak_bytes", 2**20, "peak MiB (compiled, fwd+bwd)"))
    print(table)
    result = {
        "benchmark": "causal self-attention fwd+bwd with a sliding window: compiled FLOPs "
                     "(chunked: loops unrolled) and peak bytes (memory_analysis)",
        "config": {"batch": args.batch, "heads": args.heads, "kv_heads": args.kv_heads,
                   "head_dim": args.head_dim, "dtype": "float32", "chunk_size": args.chunk_size,
                   "window": [args.window, 0]},
        "machine": machine_info("jax"),
        "rows": rows,
        "table": table,
    }
    write_json(args.json, result)
    print(f"wrote {args.json}")
    return 0


def markdown_table(rows: list[dict]) -> str:
    lines = [
        "| impl | tokens | XLA peak (GiB) | growth per doubling | RSS delta (GiB) | fwd+bwd (s) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    prev: dict[str, float] = {}
    for r in rows:
        impl = r["implementation"]
        growth = ""
        if impl in prev:
            growth = f"{r['xla_peak_gib'] / prev[impl]:.2f}x"
        prev[impl] = r["xla_peak_gib"]
        rss = f"{r['rss_delta_gib']:.3f}" if "rss_delta_gib" in r else "-"
        time_s = f"{r['median_s']:.3f}" if "median_s" in r else r.get("skipped", r.get("error"))
        lines.append(
            f"| {impl} | {r['length']} | {r['xla_peak_gib']:.3f} | {growth} | {rss} | {time_s} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", default=DEFAULT_LENGTHS, help="comma-separated token counts")
    p.add_argument("--implementations", default="xla,chunked")
    p.add_argument(
        "--json",
        default=os.path.join(os.path.dirname(__file__), "results", "attention_memory.json"),
    )
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--chunk-size", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-run-gib", type=float, default=12.0)
    p.add_argument("--timeout", type=float, default=400.0, help="seconds per case")
    p.add_argument("--case", help=argparse.SUPPRESS)  # internal: "impl,length" in a subprocess
    p.add_argument("--model", action="store_true", help="whole-model train step (compile only)")
    p.add_argument("--d-model", type=int, default=128, help="--model: D (N from --heads)")
    p.add_argument("--vocab", type=int, default=1024, help="--model: vocabulary size")
    p.add_argument("--max-xla-length", type=int, default=16384,
                   help="--model: longest length compiled for 'xla'")
    p.add_argument("--window", type=int, nargs="?", const=512, default=None,
                   help="sliding-window FLOPs and memory (left window W, default 512)")
    p.add_argument("--kv-heads", type=int, default=None, help="--window: K (default N)")
    p.add_argument("--max-unrolled-blocks", type=int, default=256,
                   help="--window: most query x key blocks unrolled to count chunked FLOPs")
    args = p.parse_args(argv)
    if args.window is not None:
        args.kv_heads = args.kv_heads or args.heads
        if args.json.endswith("attention_memory.json"):
            args.json = args.json.replace("attention_memory.json", "attention_window.json")
        return run_window_bench(args)
    if args.model:
        if args.lengths == DEFAULT_LENGTHS:
            args.lengths = MODEL_LENGTHS
        return run_model_bench(args)

    if args.case:
        impl, length = args.case.split(",")
        print(json.dumps(run_case(impl, int(length), args)))
        return 0

    lengths = [int(x) for x in args.lengths.split(",") if x]
    impls = [x for x in args.implementations.split(",") if x]
    passthrough = [
        f"--batch={args.batch}",
        f"--heads={args.heads}",
        f"--head-dim={args.head_dim}",
        f"--chunk-size={args.chunk_size}",
        f"--repeats={args.repeats}",
        f"--max-run-gib={args.max_run_gib}",
    ]
    rows = []
    for impl in impls:
        for length in lengths:
            cmd = [sys.executable, os.path.abspath(__file__), f"--case={impl},{length}"]
            try:
                proc = subprocess.run(
                    cmd + passthrough, capture_output=True, text=True, timeout=args.timeout
                )
                if proc.returncode != 0:
                    raise RuntimeError(proc.stderr.strip().splitlines()[-1])
                row = json.loads(proc.stdout.strip().splitlines()[-1])
            except (subprocess.TimeoutExpired, RuntimeError) as e:
                row = {
                    "implementation": impl,
                    "length": length,
                    "xla_peak_gib": float("nan"),
                    "error": f"failed: {e}",
                }
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)

    table = markdown_table(rows)
    print(table)
    result = {
        "benchmark": "self-attention forward+backward (grad of sum wrt q, k, v)",
        "config": {
            "batch": args.batch,
            "heads": args.heads,
            "head_dim": args.head_dim,
            "dtype": "float32",
            "chunk_size": args.chunk_size,
            "repeats": args.repeats,
        },
        "machine": machine_info("jax"),
        "rows": rows,
        "table": table,
    }
    if args.json:
        write_json(args.json, result)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
