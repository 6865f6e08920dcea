"""One projection on XLA:CPU: float32 ``x @ w`` against ``ops.int8_matmul`` (rows of ``x``
quantised at run time, int8 x int8 -> int32) by row count, for the shapes of the OPUS-MT-sized
model's decoding step. It picks ``nn.int8.MIN_ROWS``, the rows from which the int8 path runs.

Each case is jitted and warmed up; the timed calls (``--calls`` back to back) of all cases are
interleaved, ``--repeats`` times, and the median reported, so a shared machine's load hits
every case alike. ``ratio`` is float32 time / int8 time (> 1: int8 is faster).

  python bench/int8_matmul.py [--rows 1,2,4,8,16,32,64,128] [--repeats 7]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

from benchlib import machine_info, write_json

SHAPES = {"qkvo 512x512": (512, 512), "ffn in 512x2048": (512, 2048),
          "ffn out 2048x512": (2048, 512), "logits 512x14k": (512, 14336)}


def cases(rows_list: list[int]):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from transformer_jax import ops

    rng = np.random.default_rng(0)
    out = {}
    for name, (d_in, d_out) in SHAPES.items():
        w = jnp.asarray(rng.normal(size=(d_in, d_out)).astype(np.float32) * 0.05)
        q, scale = ops.quantize_per_channel(w)
        for rows in rows_list:
            x = jnp.asarray(rng.normal(size=(rows, d_in)).astype(np.float32))
            fp32 = jax.jit(lambda x, w: x @ w)
            int8 = jax.jit(lambda x, q, s: ops.int8_matmul(x, q, s))
            out[(name, rows)] = ((lambda f=fp32, x=x, w=w: f(x, w)),
                                 (lambda f=int8, x=x, q=q, s=scale: f(x, q, s)))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,2,4,8,16,32,64,128")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--calls", type=int, default=20, help="calls per timing")
    parser.add_argument("--json", default=os.path.join(os.path.dirname(__file__), "results",
                                                       "int8_matmul.json"))
    args = parser.parse_args(argv)
    load_before = os.getloadavg()
    fns = cases([int(r) for r in args.rows.split(",")])
    times = {key: ([], []) for key in fns}
    for pair in fns.values():
        for fn in pair:
            fn().block_until_ready()
    for _ in range(args.repeats):
        for key, pair in fns.items():
            for fn, store in zip(pair, times[key], strict=True):
                start = time.perf_counter()
                for _ in range(args.calls):
                    result = fn()
                result.block_until_ready()
                store.append((time.perf_counter() - start) / args.calls)
    rows = []
    for (name, r), (fp32, int8) in times.items():
        f, i = statistics.median(fp32), statistics.median(int8)
        rows.append({"shape": name, "rows": r, "fp32_us": round(f * 1e6, 1),
                     "int8_us": round(i * 1e6, 1), "ratio": round(f / i, 2)})
        print(f"{name:>18} rows {r:4d}: fp32 {f * 1e6:9.1f} us  int8 {i * 1e6:9.1f} us  "
              f"fp32/int8 {f / i:5.2f}")
    write_json(args.json, {
        "benchmark": "float32 matmul vs ops.int8_matmul by rows (median, interleaved)",
        "command": " ".join(["python bench/int8_matmul.py", *(sys.argv[1:] if argv is None
                                                                else argv)]),
        "repeats": args.repeats, "calls": args.calls, "results": rows,
        "machine": machine_info("jax", loadavg_before=load_before,
                                loadavg_after=os.getloadavg())})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
