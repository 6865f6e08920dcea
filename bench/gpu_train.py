"""train.py end to end on one GPU: train Multi30k, time it, translate test2016, score it.

Sections (the JSON is rewritten after each, so a run cut short keeps what it measured):

1. ``env``: Python, glibc, jax and its devices.
2. ``train``: ``python train.py --config CONFIG --workdir W`` as a subprocess; the wall time
   at which each validation BLEU appears in ``history.jsonl``; train.py's tokens/s (median
   of its log points after the first) and GPU memory seen by ``nvidia-smi``.
3. ``synthetic``: the same model and batch shape (``build_run`` of the run's own config.json)
   stepping on random full batches in this process: steps/s, tokens/s, peak device memory;
   ``input_ratio`` = train.py's updates/s over these updates/s (1.0: input never waits).
4. ``test``: ``python -m transformer_jax.translate`` (beam 4) of test2016, sacreBLEU cased
   and lowercased.

    python bench/gpu_train.py --out bench/results/gpu_train_H100.json
    python bench/gpu_train.py --smoke --out /tmp/smoke.json    # tiny model, CPU, seconds
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from benchlib import write_json  # noqa: E402

# A model and run small enough for a CPU in seconds: the whole path, not the numbers.
SMOKE = ["--config.model.d_model=32", "--config.model.num_heads=2", "--config.model.d_ff=64",
         "--config.model.num_layers=1", "--config.batch_size=8", "--config.num_train_steps=4",
         "--config.max_train_minutes=0", "--config.fit_steps_to_time=false",
         "--config.optimizer.warmup_steps=2", "--config.eval_every_steps=4",
         "--config.log_every_steps=1", "--config.eval_num_sentences=4",
         "--config.eval_beam_size=1", "--config.checkpoint_every_steps=4",
         "--config.data.test_split=", "--config.data.max_length=32",
         "--config.model.max_len=32",
         "--config.data.vocab_size=300", "--config.data.tokenizer_sample_size=2000",
         "--config.optimizer.loss_chunk=64"]


def _env() -> dict:
    import jax

    return {"python": platform.python_version(), "glibc": "-".join(platform.libc_ver()),
            "jax": jax.__version__, "backend": jax.default_backend(),
            "devices": [d.device_kind for d in jax.devices()]}


def _gpu_memory_mib() -> int | None:
    """The largest ``memory.used`` over the GPUs now (None without nvidia-smi)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used",
                              "--format=csv,noheader,nounits"], capture_output=True,
                             text=True, timeout=10).stdout
        return max(int(x) for x in out.split())
    except (OSError, ValueError, subprocess.SubprocessError):
        return None


def _history(workdir: str) -> list[dict]:
    path = os.path.join(workdir, "history.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def train(args, extra: list[str], record) -> dict:
    """Runs train.py; polls its history for validation BLEU and nvidia-smi for memory."""
    cmd = [sys.executable, os.path.join(REPO, "train.py"), "--config", args.config,
           "--workdir", args.workdir, *extra]
    out: dict = {"command": " ".join(cmd), "bleu_at_s": [], "gpu_memory_mib_max": None}
    start = time.perf_counter()
    with open(os.path.join(args.workdir + ".log"), "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        seen = 0
        while proc.poll() is None or seen < len(_history(args.workdir)):
            time.sleep(0.5)
            mem = _gpu_memory_mib()
            if mem is not None:
                out["gpu_memory_mib_max"] = max(mem, out["gpu_memory_mib_max"] or 0)
            rows = _history(args.workdir)
            for row in rows[seen:]:
                if row.get("split") in ("eval", "test") and "bleu" in row:
                    out["bleu_at_s"].append({"split": row["split"], "step": row["step"],
                                             "bleu": row["bleu"],
                                             "s": round(time.perf_counter() - start, 1)})
                    record()
            seen = len(rows)
    out["returncode"] = proc.returncode
    out["wall_s"] = round(time.perf_counter() - start, 1)
    rates = [r["tokens_per_s"] for r in _history(args.workdir)
             if r.get("split") == "train" and r.get("tokens_per_s") == r.get("tokens_per_s")]
    tokens = [r["tokens"] for r in _history(args.workdir) if r.get("split") == "train"]
    logs = [r for r in _history(args.workdir) if r.get("split") == "train"]
    out["tokens_per_s"] = statistics.median(rates[1:] or rates) if rates else None
    if len(logs) > 1:  # tokens of one update: the log's sum over its steps per step
        steps = logs[-1]["step"] - logs[-2]["step"]
        out["tokens_per_update"] = tokens[-1] / max(steps, 1)
    summary = os.path.join(args.workdir, "summary.json")
    if os.path.exists(summary):
        with open(summary) as f:
            out["summary"] = json.load(f)
    return out


def synthetic(workdir: str, steps: int) -> dict:
    """The run's own train step on random full batches: updates/s, tokens/s, peak memory."""
    import jax
    import ml_collections
    import numpy as np

    from transformer_jax.training import build_run

    with open(os.path.join(workdir, "config.json")) as f:
        config = ml_collections.ConfigDict(json.load(f))
    run = build_run(config, vocab_size=int(config.model.vocab_size))
    state = run.strategy.put_state(run.init_state())
    rng = np.random.default_rng(0)
    shape = (int(config.batch_size), int(config.data.max_length))
    batch = {k: rng.integers(3, int(config.model.vocab_size), shape).astype(np.int32)
             for k in run.abstract_batch(shape[0])}
    batch = run.strategy.put_batch(batch)
    key = jax.random.key(0)
    state, metrics = run.train_step(state, batch, key)  # compile
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = run.train_step(state, batch, key)
    jax.block_until_ready(metrics)
    seconds = time.perf_counter() - start
    stats = jax.devices()[0].memory_stats() or {}
    return {"steps": steps, "updates_per_s": steps / seconds,
            "tokens_per_s": steps * shape[0] * shape[1] / seconds, "batch": list(shape),
            "peak_bytes_in_use": stats.get("peak_bytes_in_use")}


def test_bleu(args) -> dict:
    """Translates test2016 with the translate CLI; sacreBLEU cased and lowercased."""
    import sacrebleu

    src = os.path.join(args.data, "test2016.en")
    with open(os.path.join(args.data, "test2016.de")) as f:
        refs = f.read().splitlines()
    with open(src) as f:
        lines = f.read().splitlines()[: args.test_lines or None]
    refs = refs[: len(lines)]
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "transformer_jax.translate", "--workdir", args.workdir,
         "--beam", "4"], input="\n".join(lines) + "\n", capture_output=True, text=True,
        cwd=REPO, check=False)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1:]}
    hyps = done.stdout.splitlines()
    return {"sentences": len(lines), "translate_s": round(time.perf_counter() - start, 1),
            "bleu_cased": sacrebleu.corpus_bleu(hyps, [refs]).score,
            "bleu_lowercased": sacrebleu.corpus_bleu(hyps, [refs], lowercase=True).score}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=os.path.join(REPO, "configs", "multi30k_gpu.py"))
    parser.add_argument("--workdir", default="/tmp/gpu_train_run")
    parser.add_argument("--data", default=os.path.join(REPO, "..", "shared", "data",
                                                       "multi30k"))
    parser.add_argument("--out", required=True)
    parser.add_argument("--smoke", action="store_true", help="tiny model, CPU, seconds")
    parser.add_argument("--synthetic_steps", type=int, default=50)
    parser.add_argument("--test_lines", type=int, default=0, help="0: all of test2016")
    args, extra = parser.parse_known_args(argv)
    if not os.path.isdir(args.data):
        print(f"Multi30k is not at {args.data}; pass --data DIR.", file=sys.stderr)
        return 2
    if os.path.exists(args.workdir):
        print(f"{args.workdir} exists; pass a new --workdir.", file=sys.stderr)
        return 2
    if args.smoke:
        extra = SMOKE + extra
        args.synthetic_steps, args.test_lines = 2, args.test_lines or 4
    extra.append(f"--config.data.path={args.data}")
    result: dict = {"smoke": args.smoke, "config": args.config, "overrides": extra}

    def record():
        write_json(args.out, result)

    result["env"] = _env()
    record()
    result["train"] = train(args, extra, record)
    record()
    if result["train"]["returncode"] != 0:
        print(f"train.py failed; see {args.workdir}.log", file=sys.stderr)
        return 1
    result["synthetic"] = synthetic(args.workdir, args.synthetic_steps)
    train_rate = result["train"]["tokens_per_s"]
    per_update = result["train"].get("tokens_per_update")
    if train_rate and per_update:
        result["input_ratio"] = (train_rate / per_update) / result["synthetic"]["updates_per_s"]
    record()
    result["test"] = test_bleu(args)
    record()
    print(json.dumps({k: result.get(k) for k in ("input_ratio", "test")}, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
