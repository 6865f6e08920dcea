"""Start-up of ``python -m transformer_jax.translate`` for one sentence, cold and warm.

Each round runs, for every variant, the command twice on a fresh compilation cache: ``cold``
(an empty cache: everything is traced, lowered and compiled) and ``warm`` (the second run:
programs come from the caches), then CTranslate2's equivalent once (load the converted model,
translate the sentence; nothing to compile). Variants are this checkout (``after``) and,
with ``--before DIR``, a copy of the package from another commit (``git archive <commit>
transformer_jax | tar -x -C DIR``); each is put first on ``PYTHONPATH`` and run from outside
the repository. Rounds interleave the variants, so a change in the machine's load hits all
of them alike; the medians, ranges and after/before ratios of wall-clock and user+system CPU
seconds go to the JSON, with the load average around every run.

  python bench/startup.py --before /tmp/before --runs 5     # the OPUS-MT-sized model
  python bench/startup.py --smoke --workdir runs/demo       # one cold + warm pair; CI runs it

The default model is ``bench/translate_speed.py``'s (``/tmp/translate_speed_full``: the
imported ``jax_workdir``, ``ct2`` and ``marian/source.spm``).
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
ROOT = "/tmp/translate_speed_full"
SENTENCE = "a man is riding a bike"

CT2 = """
import sys, ctranslate2, sentencepiece as spm
sp = spm.SentencePieceProcessor(model_file=sys.argv[2])
tr = ctranslate2.Translator(sys.argv[1], device="cpu", inter_threads=1, intra_threads=2)
for line in sys.stdin:
    out = tr.translate_batch([sp.encode(line.strip(), out_type=str) + ["</s>"]],
                             beam_size=4, max_decoding_length=57)
    print(" ".join(out[0].hypotheses[0]))
"""


def timed(cmd: list[str], env: dict, stdin: bytes) -> dict:
    """Wall-clock and user+system CPU seconds of one command, its output and the load."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    load = os.getloadavg()[0]
    start = time.perf_counter()
    proc = subprocess.run(cmd, input=stdin, capture_output=True, env=env, cwd=tempfile.gettempdir(),
                          timeout=600, check=False)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr.decode()[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall": round(wall, 3), "cpu": round(cpu, 3), "load": round(load, 2),
            "output": proc.stdout.decode()}


def translate_runs(package: str, args, cache: str) -> dict:
    """A cold and a warm run of the command with ``package`` first on ``PYTHONPATH``."""
    inherited = os.environ.get("PYTHONPATH")
    env = dict(os.environ, PYTHONPATH=package + (os.pathsep + inherited if inherited else ""))
    cmd = [sys.executable, "-m", "transformer_jax.translate", "--workdir", args.workdir,
           "--beam", str(args.beam), "--compile_cache", cache]
    shutil.rmtree(cache, ignore_errors=True)
    line = (args.sentence + "\n").encode()
    return {run: timed(cmd, env, line) for run in ("cold", "warm")}


def summary(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 3), "min": min(values),
            "max": max(values), "runs": values}


def measure(args) -> dict:
    variants = {"after": REPO}
    if args.before:
        variants = {"before": os.path.abspath(args.before), **variants}
    runs: dict[str, list] = {f"{v} {r}": [] for v in variants for r in ("cold", "warm")}
    if args.ct2:
        runs["ctranslate2"] = []
    outputs = set()
    with tempfile.TemporaryDirectory(prefix="startup-cache-") as tmp:
        for number in range(args.runs):
            for name, package in variants.items():
                for run, result in translate_runs(package, args, os.path.join(tmp, name)).items():
                    runs[f"{name} {run}"].append(result)
                    outputs.add(result.pop("output"))
            if args.ct2:
                cmd = [sys.executable, "-c", CT2, args.ct2, args.spm]
                result = timed(cmd, dict(os.environ), (args.sentence + "\n").encode())
                result.pop("output")
                runs["ctranslate2"].append(result)
            print(f"round {number + 1}/{args.runs}: " + ", ".join(
                f"{k} {v[-1]['wall']:.2f} s" for k, v in runs.items()), file=sys.stderr)
    table = {k: {"wall": summary([r["wall"] for r in v]), "cpu": summary([r["cpu"] for r in v]),
                 "load": [r["load"] for r in v]} for k, v in runs.items()}
    ratios = {}
    if args.before:
        for run in ("cold", "warm"):
            for what in ("wall", "cpu"):
                ratios[f"{run} {what} after/before"] = round(
                    table[f"after {run}"][what]["median"]
                    / table[f"before {run}"][what]["median"], 3)
    return {"results": table, "ratios": ratios, "identical_outputs": len(outputs) == 1,
            "output": sorted(outputs)}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=os.path.join(ROOT, "jax_workdir"))
    parser.add_argument("--before", default=None,
                        help="folder holding the transformer_jax package of another commit")
    parser.add_argument("--ct2", default=None, help="CTranslate2 model (default <root>/ct2)")
    parser.add_argument("--spm", default=None, help="its SentencePiece model")
    parser.add_argument("--runs", type=int, default=5, help="rounds")
    parser.add_argument("--beam", type=int, default=4)
    parser.add_argument("--sentence", default=SENTENCE)
    parser.add_argument("--smoke", action="store_true",
                        help="one round of this checkout alone, no CTranslate2")
    parser.add_argument("--json", default=None, help="result file")
    args = parser.parse_args(argv)
    root = os.path.dirname(os.path.abspath(args.workdir))
    if args.smoke:
        args.runs, args.ct2, args.before = 1, None, None
    elif args.ct2 is None and os.path.isdir(os.path.join(root, "ct2")):
        args.ct2 = os.path.join(root, "ct2")
    if args.ct2 and args.spm is None:
        args.spm = os.path.join(os.path.dirname(os.path.abspath(args.ct2)), "marian", "source.spm")
    if args.ct2:
        import importlib.util

        if importlib.util.find_spec("ctranslate2") is None:
            print("note: ctranslate2 is not installed; skipping it (pip install -e .[bench])",
                  file=sys.stderr)
            args.ct2 = None
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    load_before = os.getloadavg()
    result = measure(args)
    sys.path.insert(0, HERE)
    from benchlib import machine_info, write_json

    command = "python bench/startup.py" + " ".join(
        [""] + (argv if argv is not None else sys.argv[1:]))
    for name, row in result["results"].items():
        print(f"{name:14s} wall {row['wall']['median']:6.2f} s ({row['wall']['min']:.2f}-"
              f"{row['wall']['max']:.2f})  cpu {row['cpu']['median']:6.2f} s")
    for name, ratio in result["ratios"].items():
        print(f"{name}: {ratio:.3f}")
    print(f"identical outputs: {result['identical_outputs']}")
    path = args.json or os.path.join(HERE, "results",
                                     f"startup{'_smoke' if args.smoke else ''}.json")
    write_json(path, {
        "benchmark": "start-up of python -m transformer_jax.translate, one sentence",
        "command": command, "workdir": args.workdir, "beam": args.beam,
        "sentence": args.sentence, "ctranslate2": args.ct2, **result,
        "machine": machine_info("jax", "flax", "orbax.checkpoint", loadavg_before=load_before,
                                loadavg_after=os.getloadavg())})
    print(f"wrote {path}")
    return 0 if result["identical_outputs"] else 1


if __name__ == "__main__":
    sys.exit(main())
