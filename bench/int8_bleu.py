"""BLEU of a trained run with float and with int8 weights: the translate CLI on a test set.

Runs ``python -m transformer_jax.translate --workdir W --reference REF --input SRC`` once with
``--quantize none`` and once with ``--quantize int8`` (beam 4 and the run's length penalty by
default), and writes both sacrebleu scores (BLEU cased, 13a; chrF), their differences and the
share of identical output lines to a JSON file.

  python bench/int8_bleu.py --workdir runs/m30k --source ../shared/data/multi30k/test2016.en \\
      --reference ../shared/data/multi30k/test2016.de
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

from benchlib import machine_info, write_json

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def translate(args, quantize: str) -> dict:
    command = [sys.executable, "-m", "transformer_jax.translate", "--workdir", args.workdir,
               "--input", args.source, "--reference", args.reference, "--beam",
               str(args.beam), "--quantize", quantize, "--compile_cache", "none"]
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{proc.stderr[-2000:]}")
    scores = proc.stderr.strip().splitlines()[-1].split()  # "bleu X  chrf Y  exact_match Z ..."
    return {"command": " ".join(["python", *command[1:]]), "lines": proc.stdout.splitlines(),
            "wall_s": round(time.perf_counter() - start, 1),
            "bleu": float(scores[scores.index("bleu") + 1]),
            "chrf": float(scores[scores.index("chrf") + 1])}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--source", required=True)
    parser.add_argument("--reference", required=True)
    parser.add_argument("--beam", type=int, default=4)
    parser.add_argument("--json", default=os.path.join(os.path.dirname(__file__), "results",
                                                       "int8_bleu.json"))
    args = parser.parse_args(argv)
    runs = {q: translate(args, q) for q in ("none", "int8")}
    same = sum(a == b for a, b in zip(runs["none"]["lines"], runs["int8"]["lines"],
                                      strict=True)) / max(len(runs["none"]["lines"]), 1)
    result = {
        "benchmark": "translate CLI BLEU with float vs int8 weights",
        "command": " ".join(["python bench/int8_bleu.py",
                             *(sys.argv[1:] if argv is None else argv)]),
        "float": {k: v for k, v in runs["none"].items() if k != "lines"},
        "int8": {k: v for k, v in runs["int8"].items() if k != "lines"},
        "bleu_int8_minus_float": round(runs["int8"]["bleu"] - runs["none"]["bleu"], 4),
        "chrf_int8_minus_float": round(runs["int8"]["chrf"] - runs["none"]["chrf"], 4),
        "identical_lines": round(same, 4), "sentences": len(runs["none"]["lines"]),
        "machine": machine_info()}
    print({k: result[k] for k in ("bleu_int8_minus_float", "chrf_int8_minus_float",
                                  "identical_lines")}, result["float"]["bleu"],
          result["int8"]["bleu"])
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
