"""How well the demo model (`make demo`) knows the numbers people type.

Translates every number from 0 to 9,999 and ``--large`` random numbers from 10,000 to 999,999
that the run never trained on, each in every spelling of ``numbers.english_spellings`` (plain
"three hundred five", num2words "three hundred and five", capitalised "Three hundred five",
punctuated "Three hundred and five.", digits "305"), and compares with ``german_words``. Each
spelling goes through ``python -m transformer_jax.translate`` (the command line, one call with
every line on stdin: what a user runs; default) or through ``Translator`` in this process
(``--via api``: the same code path without the command-line start-up), with the command line's
defaults (beam 4, the run's length penalty).

Writes JSON: per spelling, exact match per magnitude (0-9, 10-99, 100-999, 1000-9999, 10000-up)
with counts, and every failure as ``[number, input, output, expected]``.

Usage:
  python bench/demo_numbers.py --workdir runs/demo                  # a trained run
  python bench/demo_numbers.py --workdir runs/demo --train          # train it first (make demo)
  python bench/demo_numbers.py --workdir runs/demo --smoke          # 200 numbers, 2 spellings
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np
from benchlib import machine_info, write_json

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train(workdir: str, extra: list[str]) -> dict:
    """``make demo``'s command into ``workdir``; its wall time and the run's summary."""
    start = time.perf_counter()
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--config",
           os.path.join(ROOT, "configs", "default.py"), "--workdir", workdir, *extra]
    subprocess.run(cmd, cwd=ROOT, check=True)
    wall = time.perf_counter() - start
    with open(os.path.join(workdir, "summary.json"), encoding="utf-8") as f:
        summary = json.load(f)
    return {"command": " ".join(["python train.py --config configs/default.py --workdir",
                                 workdir, *extra]),
            "wall_seconds": wall, "summary": summary}


def numbers_to_check(workdir: str, large: int, seed: int) -> list[int]:
    """0..9,999, then ``large`` numbers >= 10,000 outside the run's training split (half with
    five digits, half with six where the run's range has them)."""
    from transformer_jax.data import numbers

    with open(os.path.join(workdir, "config.json"), encoding="utf-8") as f:
        data = json.load(f)["data"]
    top = int(data["numbers_max"])
    trained = set(numbers.split_numbers(top, data["numbers_train_size"],
                                        data["numbers_validation_size"],
                                        data["numbers_test_size"],
                                        data["numbers_seed"])["train"].tolist())
    small = list(range(min(10_000, top)))
    classes = [(lo, hi) for lo, hi in numbers.digit_classes(top) if lo >= 10_000]
    rng = np.random.default_rng(seed)
    drawn: list[int] = []
    for i, (lo, hi) in enumerate(classes):
        want = large // len(classes) + (i < large % len(classes))
        pool = np.setdiff1d(np.arange(lo, hi), np.fromiter(trained, np.int64))
        drawn += sorted(rng.choice(pool, min(want, len(pool)), replace=False).tolist())
    return small + drawn


def translate_cli(workdir: str, lines: list[str], beam: int) -> list[str]:
    """One ``python -m transformer_jax.translate`` call with every line on stdin."""
    proc = subprocess.run(
        [sys.executable, "-m", "transformer_jax.translate", "--workdir", workdir,
         "--beam", str(beam)],
        input="".join(f"{line}\n" for line in lines).encode("utf-8"), cwd=ROOT,
        capture_output=True, check=False)
    if proc.returncode:
        raise RuntimeError(proc.stderr.decode("utf-8", "replace")[-2000:])
    out = proc.stdout.decode("utf-8").split("\n")[:-1]
    assert len(out) == len(lines), (len(out), len(lines))
    return out


def make_api(workdir: str, beam: int):
    from transformer_jax.inference import Translator

    translator = Translator.from_workdir(workdir)

    def run(_workdir, lines, _beam):
        return translator.translate(lines, beam_size=beam, alpha=translator.length_penalty,
                                    batch_size=64)

    return run


def score(values: list[int], inputs: list[str], outputs: list[str]) -> dict:
    """Exact match per magnitude bucket (with counts) and the failures."""
    from transformer_jax.data import numbers
    from transformer_jax.metrics import MAGNITUDES

    lows = [low for _, low in MAGNITUDES]
    totals = {label: [0, 0] for label, _ in MAGNITUDES}
    failures = []
    for n, text, out in zip(values, inputs, outputs, strict=True):
        want = numbers.german_words(n)
        label = MAGNITUDES[int(np.searchsorted(lows, n, side="right")) - 1][0]
        totals[label][1] += 1
        if out.strip() == want:
            totals[label][0] += 1
        else:
            failures.append([n, text, out, want])
    by = {label: {"right": r, "total": t, "exact_match": 100.0 * r / t}
          for label, (r, t) in totals.items() if t}
    return {"by_magnitude": by, "right": len(values) - len(failures), "total": len(values),
            "failures": failures}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default=os.path.join(ROOT, "runs", "demo"))
    parser.add_argument("--train", action="store_true",
                        help="train the demo config into --workdir first (resumes if there)")
    parser.add_argument("--train_args", default="",
                        help="extra train.py flags, space-separated (e.g. config overrides)")
    parser.add_argument("--large", type=int, default=1_000,
                        help="random numbers >= 10,000 not in training")
    parser.add_argument("--spellings", default="plain,num2words,capitalised,punctuated,digits")
    parser.add_argument("--via", choices=("cli", "api"), default="cli")
    parser.add_argument("--beam", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true",
                        help="200 small + 20 large numbers, two spellings, via the API")
    parser.add_argument("--json", default=os.path.join(ROOT, "bench", "results",
                                                       "demo_numbers.json"))
    args = parser.parse_args(argv)
    sys.path.insert(0, ROOT)
    from transformer_jax.data import numbers

    result: dict = {"machine": machine_info("jax"), "workdir": args.workdir,
                    "via": args.via, "beam": args.beam}
    if args.train:
        result["training"] = train(args.workdir, args.train_args.split())
    values = numbers_to_check(args.workdir, 20 if args.smoke else args.large, args.seed)
    spellings = args.spellings.split(",")
    if args.smoke:
        values = values[:200] + values[10_000:]
        spellings, args.via = spellings[:2], "api"
    translate = translate_cli if args.via == "cli" else make_api(args.workdir, args.beam)
    result["spellings"] = {}
    for name in spellings:
        inputs = [numbers.english_spellings(n)[name] for n in values]
        start = time.perf_counter()
        outputs = translate(args.workdir, inputs, args.beam)
        scores = score(values, inputs, outputs)
        scores["seconds"] = time.perf_counter() - start
        result["spellings"][name] = scores
        by = ", ".join(f"{label} {s['exact_match']:.2f}% ({s['right']}/{s['total']})"
                       for label, s in scores["by_magnitude"].items())
        print(f"{name:12s} {by}; {len(scores['failures'])} failures "
              f"({scores['seconds']:.0f} s)", flush=True)
        write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
