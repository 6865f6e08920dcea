"""Where a training step's CPU time goes: XLA's own per-thunk timings, grouped by kind.

Builds the same jitted train step as ``bench/train_throughput.py`` (``--config small|base``:
same model, batch, dropout, label smoothing and optimizer), runs ``--steps`` steps under
``jax.profiler`` and reads the trace back with ``jax``'s ``ProfileData``: every event on
XLA's CPU worker threads is one executed thunk (a fusion, a matmul, a copy ...). Time is
summed per kind (the event name without its ``.N`` suffix: ``ynn_fusion`` = matmuls run by
YNNPACK, ``copy_bitcast_fusion`` = layout copies, ...) and reported in milliseconds of thread
time per step, next to the step's wall time and process CPU time. Thread time that is in no
thunk (waiting for work, spinning, the allocator, Python dispatch) is the difference between
process CPU time and the thunk total.

Usage: python bench/profile_step.py --config small|base [--steps 3] [--top 15] [--json OUT]
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]  # bench/ (benchlib, train_throughput), the repo

from benchlib import machine_info, write_json  # noqa: E402


def profile(config: str, steps: int) -> dict:
    import jax
    from jax._src.lib import _profile_data
    from train_throughput import CONFIGS, Ours, make_batch

    c = CONFIGS[config]
    ours = Ours(c, make_batch(c))
    ours.run(2)  # compile and warm up
    with tempfile.TemporaryDirectory() as trace_dir:
        wall, cpu = time.perf_counter(), time.process_time()
        jax.profiler.start_trace(trace_dir)
        ours.run(steps)
        jax.profiler.stop_trace()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        path = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)[0]
        data = _profile_data.ProfileData.from_file(path)
        kinds: collections.Counter = collections.Counter()
        for plane in data.planes:
            for line in plane.lines:
                if "XLAEigen" not in line.name:  # XLA's CPU worker threads
                    continue
                for event in line.events:
                    if event.name.startswith("ThunkExecutor"):  # the enclosing executor span
                        continue
                    kinds[re.sub(r"\.\d+$", "", event.name)] += event.duration_ns
    per_step = {k: v / 1e6 / steps for k, v in kinds.items()}  # ms of thread time per step
    return {
        "config": config,
        "steps": steps,
        "wall_ms_per_step": 1e3 * wall / steps,
        "process_cpu_ms_per_step": 1e3 * cpu / steps,
        "thunk_ms_per_step": sum(per_step.values()),
        "by_kind_ms_per_step": dict(sorted(per_step.items(), key=lambda kv: -kv[1])),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", choices=["small", "base"], default="small")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--top", type=int, default=15, help="kinds to print")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    from transformer_jax.runtime import configure_malloc

    configure_malloc()  # as train.py and train_throughput.py run (re-executes once)
    result = profile(args.config, args.steps)
    result["machine"] = machine_info("jax", "jaxlib")
    total = result["thunk_ms_per_step"]
    print(f"{args.config}: {result['wall_ms_per_step']:.0f} ms wall, "
          f"{result['process_cpu_ms_per_step']:.0f} ms process CPU, {total:.0f} ms in XLA "
          "thunks per step")
    for kind, ms in list(result["by_kind_ms_per_step"].items())[:args.top]:
        print(f"  {ms:8.1f} ms  {100 * ms / total:5.1f}%  {kind}")
    if args.json:
        write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
