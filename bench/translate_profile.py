"""Where a decoding step's time goes: one decoder step alone against the search loops.

For the work directory of ``bench/translate_speed.py`` (``--root``), times in one process,
interleaved over ``--repeats`` rounds (median):

* ``model``: ``--tokens`` decoder steps in a ``fori_loop`` feeding back the argmax, no search
  (B rows, and B * K rows with and without reordering the cache every step);
* ``greedy``: ``greedy_search`` of ``--tokens`` steps at batch B;
* ``beam``: ``beam_search`` (K = 4) of ``--tokens`` steps at batch B, over the model's beam
  cache (``init_decoding(..., beams=K)``, what ``Translator`` runs) and over the B-row cache
  expanded to B * K rows whose every self-attention cache row is copied to follow the beams.

Each is one jitted call that also encodes the source; the encoder's time (timed alone) is
subtracted and the rest divided by the steps. Search minus model is what the search adds
(loop bookkeeping, masking, top-k, the cache reorder).

  python bench/translate_profile.py --root /tmp/translate_speed_full [--batch 32]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

from benchlib import write_json


def build(workdir: str, batch: int, tokens: int, beam: int):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from transformer_jax import decoding
    from transformer_jax.inference import Translator

    tr = Translator.from_workdir(workdir)
    model_def, params, eos = tr.model_def, tr.params, 1
    src = jnp.asarray(np.random.RandomState(0).randint(3, 1000, (batch, 16)), jnp.int32)

    def prepared(p, rows, length, beams=1):
        model = model_def.merge(p)
        cache, start = model.init_decoding(src, length, beams=beams)
        if rows != batch and beams == 1:
            cache, start = decoding.expand_for_beam((cache, start), rows // batch)

        def fn(ids, cache):
            logits, cache = model.decode(ids, cache=cache)
            return logits[:, 0], cache
        return cache, start, fn

    def model_loop(p, rows, reorder=False):  # the model alone: `tokens` steps, no search
        cache, start, fn = prepared(p, rows, tokens)
        order = jnp.tile(jnp.arange(beam)[::-1], (batch, 1))

        def body(_, carry):
            ids, cache = carry
            logits, cache = fn(ids, cache)
            if reorder:
                cache = decoding.gather_beams(cache, order, batch, beam)
            return jnp.argmax(logits, -1).astype(jnp.int32)[:, None], cache
        return jax.lax.fori_loop(0, tokens, body, (start[:, None], cache))[0]

    def greedy(p):
        cache, start, fn = prepared(p, batch, tokens)
        return decoding.greedy_search(cache, fn, batch_size=batch, max_len=tokens, eos_id=eos,
                                      start_ids=start, min_len=tokens)

    def beam_fn(p, beams=beam):
        cache, start, fn = prepared(p, batch, tokens, beams)
        return decoding.beam_search(cache, fn, batch_size=batch, beam_size=beam,
                                    max_len=tokens, eos_id=eos, start_ids=start,
                                    min_len=tokens, beam_cache=beams > 1)[0]

    rows = batch * beam
    cases = {"init B": lambda p: prepared(p, batch, tokens)[0],
             "model B": lambda p: model_loop(p, batch),
             "greedy B": greedy,
             "init BK": lambda p: prepared(p, rows, tokens)[0],
             "model BK": lambda p: model_loop(p, rows),
             "model+reorder BK": lambda p: model_loop(p, rows, reorder=True),
             "init beam cache": lambda p: prepared(p, rows, tokens, beam)[0],
             "beam B": beam_fn,
             "beam B expanded": lambda p: beam_fn(p, 1)}
    return params, {k: jax.jit(f) for k, f in cases.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="/tmp/translate_speed_full")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--beam", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    import jax

    params, cases = build(os.path.join(args.root, "jax_workdir"), args.batch, args.tokens,
                          args.beam)
    for fn in cases.values():  # compile + warm up
        jax.block_until_ready(fn(params))
    times = {k: [] for k in cases}
    for _ in range(args.repeats):
        for k, fn in cases.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(params))
            times[k].append(time.perf_counter() - start)
    t = {k: 1000 * statistics.median(v) for k, v in times.items()}
    n = args.tokens
    rows = {"encoder + cache (ms per batch)": t["init B"],
            "model step B": (t["model B"] - t["init B"]) / n,
            "greedy step B": (t["greedy B"] - t["init B"]) / n,
            "model step BK": (t["model BK"] - t["init BK"]) / n,
            "model step BK + cache reorder": (t["model+reorder BK"] - t["init BK"]) / n,
            "beam step B x K": (t["beam B"] - t["init beam cache"]) / n,
            "beam step B x K, expanded cache": (t["beam B expanded"] - t["init B"]) / n,
            "beam B x K, whole call (ms)": t["beam B"],
            "beam B x K, expanded cache, whole call (ms)": t["beam B expanded"]}
    rows = {k: round(v, 2) for k, v in rows.items()}
    print(f"batch {args.batch}, beam {args.beam}, {n} steps; ms per step", file=sys.stderr)
    for k, ms in rows.items():
        print(f"{k:>32}: {ms:8.2f}", file=sys.stderr)
    result = {"command": "python bench/translate_profile.py " + " ".join(sys.argv[1:]),
              "ms": rows, "load_avg_1m": os.getloadavg()[0]}
    if args.json:
        write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
