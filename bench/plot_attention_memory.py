"""Plot bench/results/attention_memory_model.json (peak MiB vs length, log-log) to a PNG.

Usage: python bench/plot_attention_memory.py [JSON] [PNG]
"""

from __future__ import annotations

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    src = argv[0] if argv else "bench/results/attention_memory_model.json"
    out = argv[1] if len(argv) > 1 else "docs/images/long_sequences_memory.png"
    with open(src) as f:
        rows = json.load(f)["rows"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    groups = sorted({(r["model"], r["positional"], r["impl"]) for r in rows})
    for model, positional, impl in groups:
        pts = sorted((r["length"], r["peak_bytes"] / 2**20) for r in rows
                     if (r["model"], r["positional"], r["impl"]) == (model, positional, impl))
        ax.plot(*zip(*pts, strict=True), marker="o" if impl == "chunked" else "x",
                linestyle="-" if positional == "sinusoidal" else "--",
                label=f"{model} {positional} {impl}")
    ax.set(xscale="log", yscale="log", xlabel="sequence length (tokens)",
           ylabel="train-step peak (MiB, memory_analysis)",
           title="Whole-model train step: xla O(L^2) vs chunked O(L)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
