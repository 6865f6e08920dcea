"""A/B of two beam-search decoding paths on the model of ``bench/translate_speed.py``.

In one process, interleaved rounds (median and per-round ratios of wall time; process CPU
seconds too, which other jobs on a shared machine disturb less):

* ``before``: the B-row decoding cache expanded to B * K rows, each step copying every
  self-attention cache row to follow the beams (``init_decoding(src, L)`` +
  ``beam_search(...)``: the search of earlier versions);
* ``after``: the model's beam cache (``init_decoding(src, L, beams=K)`` +
  ``beam_search(..., beam_cache=True)``: what ``Translator`` runs now).

Both decode the benchmark's length-sorted sentences in batches of ``--batch``, every output
forced to ``--tokens`` steps (as ``bench/translate_speed.py`` does), and their token ids must be
equal. ``--ids FILE`` instead writes the ids of ``Translator.translate_ids`` (beam ``--beam``
and greedy) for the same batches, to compare checkouts.

  python bench/decode_ab.py --root /tmp/translate_speed_full --sentences 64 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

from benchlib import machine_info, write_json


def batches(root: str, count: int, batch: int, pad_id: int):
    """The benchmark's sentences as our ids, in padded ``[batch, S]`` int32 arrays."""
    import numpy as np

    with open(os.path.join(root, "sentences.json")) as f:
        rows = json.load(f)["batch"][:count]
    with open(os.path.join(root, "jax_workdir", "marian", "id_order.json")) as f:
        inverse = np.argsort(np.asarray(json.load(f)))  # Marian id -> ours
    out = []
    for start in range(0, len(rows), batch):
        chunk = [inverse[np.asarray(r)] for r in rows[start : start + batch]]
        width = -(-max(map(len, chunk)) // 8) * 8
        src = np.full((len(chunk), width), pad_id, np.int32)
        for i, r in enumerate(chunk):
            src[i, : len(r)] = r
        out.append(src)
    return out


def program(model_def, beam: int, tokens: int, beam_cache: bool):
    import jax
    import jax.numpy as jnp

    from transformer_jax import decoding

    def run(params, src):
        model = model_def.merge(params)
        cache, start = model.init_decoding(src, tokens, beams=beam if beam_cache else 1)

        def fn(ids, cache):
            logits, cache = model.decode(ids, cache=cache)
            return logits[:, 0], cache

        forbid = (model.config.pad_id,) if model.config.never_predict_pad else ()
        return decoding.beam_search(
            cache, fn, batch_size=src.shape[0], beam_size=beam, max_len=tokens, eos_id=1,
            alpha=1.0, max_lengths=jnp.sum(src != model.config.pad_id, axis=1) + tokens,
            forbid_ids=forbid,
            start_ids=start, min_len=tokens, beam_cache=beam_cache)[0][:, 0]

    return jax.jit(run)


def write_ids(args, tr, srcs) -> None:
    pad = tr.config.pad_id
    out = {}
    for beam in (args.beam, 1):
        out[str(beam)] = [tr.translate_ids([r[r != pad].tolist() for r in src], beam_size=beam,
                                           alpha=1.0, batch_size=args.batch,
                                           min_length=args.tokens).tolist() for src in srcs]
    with open(args.ids, "w") as f:
        json.dump(out, f)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="/tmp/translate_speed_full")
    parser.add_argument("--sentences", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--beam", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--ids", default=None, help="only write Translator ids to this file")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    import jax
    import numpy as np

    from transformer_jax.inference import Translator

    tr = Translator.from_workdir(os.path.join(args.root, "jax_workdir"),
                                 max_decode_length=args.tokens, extra_length=args.tokens)
    srcs = batches(args.root, args.sentences, args.batch, tr.config.pad_id)
    if args.ids:
        write_ids(args, tr, srcs)
        return 0
    sides = {name: program(tr.model_def, args.beam, args.tokens, name == "after")
             for name in ("before", "after")}
    ids = {name: [np.asarray(fn(tr.params, src)) for src in srcs]  # compiles
           for name, fn in sides.items()}
    same = all(np.array_equal(a, b) for a, b in zip(ids["before"], ids["after"], strict=True))
    times = {name: [] for name in sides}
    cpu = {name: [] for name in sides}  # process CPU seconds: less sensitive to other load
    for _ in range(args.rounds):
        for name, fn in sides.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            for src in srcs:
                jax.block_until_ready(fn(tr.params, src))
            times[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    tokens = args.sentences * args.tokens
    result = {
        "command": "python bench/decode_ab.py " + " ".join(sys.argv[1:]),
        "beam": args.beam, "batch": args.batch, "tokens": args.tokens,
        "sentences": args.sentences, "identical_ids": same,
        "seconds": {k: [round(t, 3) for t in v] for k, v in times.items()},
        "cpu_seconds": {k: [round(t, 3) for t in v] for k, v in cpu.items()},
        "cpu_speedup_median": round(statistics.median(cpu["before"])
                                    / statistics.median(cpu["after"]), 3),
        "tokens_per_s": {k: round(tokens / statistics.median(v), 1) for k, v in times.items()},
        "speedup_per_round": [round(b / a, 3) for b, a in
                              zip(times["before"], times["after"], strict=True)],
        "machine": machine_info("jax", "jaxlib")}
    result["speedup_median"] = statistics.median(result["speedup_per_round"])
    print(json.dumps(result, indent=1))
    if args.json:
        write_json(args.json, result)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
