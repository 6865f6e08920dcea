"""Regenerate the README's performance tables (Markdown, on stdout) from ``bench/results/*.json``.

Known results get their own table: ``train_throughput_*.json`` (bench/train_throughput.py),
``data_throughput.json`` (bench/data_throughput.py), ``attention_memory.json``
(bench/attention_memory.py, rendered by that script's own ``markdown_table``). Any other JSON
file with a ``rows`` list (e.g. ``decode_speed.json``) is rendered generically, one column per
key; a benchmark script that defines ``markdown_table(rows)`` renders its own.

Usage: python bench/make_tables.py [--results bench/results]
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def _load(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def _machine_line(result: dict) -> str:
    m = result.get("machine", {})
    parts = [m.get("cpu"), f"{m.get('cpu_count')} cores" if m.get("cpu_count") else None]
    for key in ("jax", "torch"):
        if m.get(key):
            parts.append(f"{key} {m[key]}")
    return ", ".join(p for p in parts if p)


def _allocator(result: dict) -> str:
    env = result.get("machine", {}).get("env", {})
    preload = env.get("LD_PRELOAD", "")
    for name in ("mimalloc", "tcmalloc", "jemalloc"):
        if name in preload:
            return name
    return "glibc tunables" if env.get("GLIBC_TUNABLES") else "glibc"


def train_table(results: list[dict]) -> str:
    """One row per train_throughput result (config x allocator)."""
    lines = [
        "| config | allocator | ours tokens/s | torch tokens/s | ours / torch (min-max) "
        "| ours MFU | torch MFU | fp32 peak GFLOP/s | ours CPU-s/step | load avg |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    order = {"small": 0, "base": 1}
    for r in sorted(results, key=lambda r: (order.get(r["config"], 9), _allocator(r))):
        spread = (r.get("spread") or {}).get("ratio") or {}
        ratio = _fmt(r.get("ratio"))
        if spread:
            ratio += f" ({spread['min']:.2f}-{spread['max']:.2f})"
        mfu = f"{100 * r['mfu']:.0f}%" if r.get("mfu") is not None else "-"
        tmfu = f"{100 * r['torch_mfu']:.0f}%" if r.get("torch_mfu") is not None else "-"
        machine = r.get("machine", {})
        load = machine.get("load_avg_1m", machine.get("load_avg_1m_at_start"))  # older results
        lines.append(
            f"| {r['config']} | {_allocator(r)} | {_fmt(r['ours_tokens_per_s'])} "
            f"| {_fmt(r.get('torch_tokens_per_s'))} | {ratio} | {mfu} | {tmfu} "
            f"| {_fmt(r.get('peak_gflops'))} | {_fmt((r.get('cpu_s_per_step') or {}).get('ours'))} "
            f"| {_fmt(load)} |"
        )
    first = results[0]
    s = first.get("settings", {})
    lines.append("")
    lines.append(
        f"Medians over {s.get('rounds')} alternating rounds (ours, torch, ours, torch, ...) in one "
        f"process; tokens = source + target non-pad tokens; dropout {s.get('dropout')}, label "
        f"smoothing {s.get('label_smoothing')}, torch optimizer Adam({s.get('torch_optimizer')}); "
        f"load avg = the machine's 1-minute load average when the run started (other jobs). "
        f"Machine: {_machine_line(first)}."
    )
    return "\n".join(lines)


def data_table(result: dict, step_tokens_per_s: float | None) -> str:
    """Input pipeline rows; headroom against the training step when its rate is known."""
    step = result.get("settings", {}).get("step_tokens_per_s") or step_tokens_per_s
    lines = [
        "| pipeline config | examples/s | tokens/s | fill | batches/s | headroom vs step |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        head = r.get("headroom") or (round(r["tokens_per_s"] / step, 1) if step else "-")
        lines.append(
            f"| {r['config']} | {r['examples_per_s']} | {r['tokens_per_s']} | {r['fill']} "
            f"| {r['batches_per_s']} | {head}x |"
        )
    s = result.get("settings", {})
    lines.append("")
    step_note = ""
    if step:
        step_note = f"; headroom = pipeline tokens/s / {step:.0f} training-step tokens/s"
    lines.append(
        f"{result.get('dataset')}, batch {s.get('batch_size')} x {s.get('max_length')}, "
        f"{s.get('batches')} timed batches{step_note}. Machine: {_machine_line(result)}."
    )
    return "\n".join(lines)


def _script_table(name: str, rows: list[dict]) -> str | None:
    """``bench/<name>.py``'s own ``markdown_table(rows)``, if it has one."""
    path = os.path.join(HERE, f"{name}.py")
    if not os.path.exists(path):
        return None
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception:  # a script that cannot be imported here falls back to the generic table
        return None
    render = getattr(module, "markdown_table", None)
    return render(rows) if callable(render) else None


def generic_table(rows: list[dict]) -> str:
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys and not isinstance(row[k], dict | list)]
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(k)) for k in keys) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", default=os.path.join(HERE, "results"))
    args = p.parse_args(argv)
    paths = sorted(glob.glob(os.path.join(args.results, "*.json")))
    if not paths:
        print(f"no results in {args.results}; run the bench/*.py scripts first.", file=sys.stderr)
        return 1
    results = {os.path.splitext(os.path.basename(p))[0]: _load(p) for p in paths}
    sections = []
    train = [r for name, r in results.items() if name.startswith("train_throughput")]
    step_rate = None
    if train:
        sections.append("### Training throughput (ours vs PyTorch)\n\n" + train_table(train))
        small = [r for r in train if r["config"] == "small" and _allocator(r) == "glibc"]
        step_rate = small[0]["ours_tokens_per_s"] if small else None
    if "data_throughput" in results:
        sections.append("### Input pipeline\n\n" + data_table(results["data_throughput"],
                                                              step_rate))
    for name, result in results.items():
        if name.startswith("train_throughput") or name == "data_throughput":
            continue
        rows = result.get("rows")
        if not isinstance(rows, list) or not rows:
            continue
        table = _script_table(name, rows) or generic_table(rows)
        title = result.get("benchmark", name)
        sections.append(f"### {name}: {title}\n\n{table}")
    print("\n\n".join(sections))
    return 0


if __name__ == "__main__":
    sys.exit(main())
