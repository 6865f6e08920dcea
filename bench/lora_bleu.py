"""LoRA against full fine-tuning in the same wall time: BLEU on a new domain, on CPU.

``python bench/lora_finetune.py --bleu`` runs this protocol (all of it deterministic):

1. Two domains of Multi30k (``data.path``: ``{train,val,test2016}.{en,de}``), by the English
   side: domain B ("animals") is every pair whose English names an animal (ANIMAL_WORDS as
   whole words, any case: 2,750 of the 29,000 training pairs), domain A everything else.
   The halves differ in what they talk about: the words for dogs, horses, birds, balls and
   water are rare or absent in A.
2. The base: a small Transformer (D 128, 4 heads, 3+3 layers, F 512; a 4,000-piece tokenizer
   trained on A) trained by ``train_and_evaluate`` on A's training pairs alone for
   ``--base-minutes`` (set-up included), its warm-up + cosine schedule fitted to the time.
3. Domain B's training pairs split in file order: every fifth is the held-out domain-B test
   set (550 pairs), the other four fifths (2,200) the in-domain fine-tuning set. Domain A's
   test set is the first 500 of test2016's 888 domain-A pairs.
4. Two fine-tunings from the base's work directory (``init_from``), each for
   ``--ft-minutes`` of wall time (``max_train_minutes``; set-up and compilation included, as
   train.py counts): LoRA with configs/finetune_lora.py's settings (rank 8 on query, key,
   value, out; Adam at a constant 1e-3) and full fine-tuning (every weight; Adam at a
   constant ``--full-lr``). Neither learning rate was tuned for this comparison.
5. BLEU (sacreBLEU, cased, greedy decoding) of the base, the LoRA model (adapters merged)
   and the fully fine-tuned model on both test sets; trainable parameters, optimizer state
   (the bytes of ``TrainState.opt_state``), updates done in the budget and seconds per
   update (the trainer's timed updates, compilation excluded).

The 1-minute load average is recorded at every phase: on a shared machine the updates done in
the budget depend on what else runs. ``--smoke`` runs the same code on a generated toy corpus
with a tiny model for a few updates (seconds; no Multi30k needed).
"""

from __future__ import annotations

import importlib.util
import os
import re
import tempfile
import time

import jax
import numpy as np

from transformer_jax import metrics
from transformer_jax.inference import load
from transformer_jax.training import build_run, train_and_evaluate, validate_config
from transformer_jax.training.init_from import finetune_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ANIMAL_WORDS = (
    "dog dogs puppy puppies cat cats kitten kittens horse horses pony ponies bird birds cow "
    "cows cattle bull bulls sheep goat goats animal animals camel camels elephant elephants "
    "duck ducks goose geese pig pigs chicken chickens fish monkey monkeys donkey donkeys mule "
    "ox oxen deer pigeon pigeons seagull seagulls lamb calf rooster").split()
_ANIMAL = re.compile(r"\b(" + "|".join(ANIMAL_WORDS) + r")\b", re.IGNORECASE)
TEST_EVERY = 5  # every fifth domain-B training pair is held out for the domain-B test set
A_TEST_PAIRS = 500  # the first test2016 pairs of domain A


def in_domain_b(english: str) -> bool:
    """Whether an English sentence names an animal (domain B)."""
    return _ANIMAL.search(english) is not None


def _read(path: str, split: str, src: str = "en", tgt: str = "de") -> list[tuple[str, str]]:
    with open(os.path.join(path, f"{split}.{src}"), encoding="utf-8") as f:
        sources = f.read().splitlines()
    with open(os.path.join(path, f"{split}.{tgt}"), encoding="utf-8") as f:
        targets = f.read().splitlines()
    return list(zip(sources, targets, strict=True))


def split_domains(path: str) -> dict[str, list[tuple[str, str]]]:
    """The splits of the protocol (module docstring), as lists of (English, German) pairs."""
    train, val, test = (_read(path, s) for s in ("train", "val", "test2016"))
    b_train = [p for p in train if in_domain_b(p[0])]
    return {
        "a_train": [p for p in train if not in_domain_b(p[0])],
        "a_val": [p for p in val if not in_domain_b(p[0])],
        "a_test": [p for p in test if not in_domain_b(p[0])][:A_TEST_PAIRS],
        "b_train": [p for i, p in enumerate(b_train) if i % TEST_EVERY],
        "b_val": [p for p in val if in_domain_b(p[0])],
        "b_test": [p for i, p in enumerate(b_train) if not i % TEST_EVERY],
    }


def write_corpus(directory: str, splits: dict[str, list[tuple[str, str]]]) -> str:
    """``{split}.en`` / ``{split}.de`` text files for ``data.source = "text"``."""
    os.makedirs(directory, exist_ok=True)
    for split, pairs in splits.items():
        for side, lang in enumerate(("en", "de")):
            with open(os.path.join(directory, f"{split}.{lang}"), "w", encoding="utf-8") as f:
                f.write("".join(pair[side] + "\n" for pair in pairs))
    return directory


def toy_corpus(path: str) -> str:
    """A generated en-de corpus with both domains (people / animals) for ``--smoke``."""
    subjects = {"a man": "ein Mann", "a woman": "eine Frau", "a boy": "ein Junge",
                "a girl": "ein Mädchen", "a dog": "ein Hund", "a cat": "eine Katze",
                "a horse": "ein Pferd", "a bird": "ein Vogel"}
    verbs = {"runs": "läuft", "sits": "sitzt", "jumps": "springt", "plays": "spielt"}
    places = {"in the park": "im Park", "on the beach": "am Strand", "in the snow": "im Schnee",
              "near the water": "am Wasser"}
    pairs = [(f"{s} {v} {p}.", f"{sg} {vg} {pg}.") for s, sg in subjects.items()
             for v, vg in verbs.items() for p, pg in places.items()]
    rng = np.random.default_rng(0)
    order = rng.permutation(len(pairs))
    pairs = [pairs[i] for i in order]
    splits = {"train": pairs[:96] * 3, "val": pairs[96:112], "test2016": pairs[112:]}
    return write_corpus(path, splits)


def _load_config_file(name: str, *args):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", name))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(*args)


def _quiet(c, data_path: str, args) -> None:
    """Settings shared by the three runs: their data, no evaluations, one checkpoint."""
    c.data.path, c.data.train_split, c.data.eval_split, c.data.test_split = (
        data_path, "train", "val", "")
    c.eval_every_steps, c.eval_metrics, c.eval_num_sentences = 0, "", 0
    c.log_every_steps = args.log_every
    c.checkpoint_every_steps, c.keep_checkpoints = 100_000, 1
    c.parallelism = "none"


def base_config(args, data_path: str):
    """configs/multi30k.py with the base's size, on domain A, fitted to --base-minutes."""
    c = _load_config_file("multi30k.py")
    _quiet(c, data_path, args)
    m = c.model
    m.d_model, m.num_heads, m.num_layers, m.d_ff = args.d_model, args.heads, args.layers, args.d_ff
    m.max_len = max(args.max_length, 16)
    c.data.vocab_size, c.data.max_length = args.vocab, args.max_length
    c.batch_size = args.batch
    c.optimizer.warmup_steps = args.warmup
    if args.smoke:
        c.max_train_minutes, c.fit_steps_to_time, c.num_train_steps = 0.0, False, args.base_steps
    else:
        c.max_train_minutes, c.fit_steps_to_time = args.base_minutes, True
    return c


def finetune(args, base: str, data_path: str, workdir: str, lora: bool) -> dict:
    """One fine-tuning run from ``base``: its summary, optimizer bytes and settings."""
    c = (_load_config_file("finetune_lora.py", base) if lora else finetune_config(base))
    if not lora:
        c.optimizer.learning_rate = args.full_lr
    _quiet(c, data_path, args)
    if args.smoke:
        c.num_train_steps, c.max_train_minutes = args.ft_steps, 0.0
    else:
        c.num_train_steps, c.max_train_minutes = 1_000_000, args.ft_minutes
    config = validate_config(c)
    run = build_run(config)
    opt_bytes = sum(x.size * x.dtype.itemsize
                    for x in jax.tree.leaves(run.abstract_state.opt_state))
    load_before = os.getloadavg()[0]
    summary = train_and_evaluate(config, workdir)
    step = int(summary["step"])
    timed = max(step - args.log_every, 1)  # the first logging interval holds the compilation
    return {"mode": f"LoRA r={config.model.lora_rank} ({config.model.lora_targets})" if lora
            else "full fine-tuning",
            "learning_rate": float(config.optimizer.learning_rate),
            "trainable": summary["params"]["trainable"], "params": summary["params"]["total"],
            "trainable_pct": 100.0 * summary["params"]["trainable"] / summary["params"]["total"],
            "opt_state_mib": opt_bytes / 2**20, "updates": step,
            "step_s": summary["train_seconds"] / timed, "wall_s": summary["wall_seconds"],
            "stopped_by_time_limit": summary["stopped_by_time_limit"],
            "load_avg_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)]}


def score(workdir: str, tests: dict[str, list[tuple[str, str]]], batch: int) -> dict:
    """Cased sacreBLEU of greedy translations of each test set (decoded in one call)."""
    hyps = load(workdir).translate([s for pairs in tests.values() for s, _ in pairs],
                                   beam_size=1, batch_size=batch)
    out, start = {}, 0
    for name, pairs in tests.items():
        out[f"bleu_{name}"] = metrics.bleu(hyps[start:start + len(pairs)], [t for _, t in pairs])
        start += len(pairs)
    return out


def run_protocol(args) -> dict:
    """Steps 1-5 of the module docstring in a temporary directory; the result dict."""
    with tempfile.TemporaryDirectory(prefix="lora_bleu_") as tmp:
        source = toy_corpus(os.path.join(tmp, "toy")) if args.smoke else args.data
        splits = split_domains(source)
        if args.smoke:
            splits = {k: v[:args.test_pairs] if "test" in k else v for k, v in splits.items()}
        sizes = {k: len(v) for k, v in splits.items()}
        a_dir = write_corpus(os.path.join(tmp, "a"), {"train": splits["a_train"],
                                                       "val": splits["a_val"]})
        b_dir = write_corpus(os.path.join(tmp, "b"), {"train": splits["b_train"],
                                                       "val": splits["b_val"]})
        tests = {"b": splits["b_test"], "a": splits["a_test"]}
        base = os.path.join(tmp, "base")
        start, load_start = time.perf_counter(), os.getloadavg()[0]
        summary = train_and_evaluate(base_config(args, a_dir), base)
        base_row = {"mode": "base (before fine-tuning)", "updates": int(summary["step"]),
                    "wall_s": summary["wall_seconds"], "params": summary["params"]["total"],
                    "load_avg_1m": [round(load_start, 2), round(os.getloadavg()[0], 2)],
                    **score(base, tests, args.decode_batch)}
        rows = [base_row]
        for lora in (True, False):
            workdir = os.path.join(tmp, "lora" if lora else "full")
            row = finetune(args, base, b_dir, workdir, lora)
            row.update(score(workdir, tests, args.decode_batch))
            rows.append(row)
        return {"sizes": sizes, "rows": rows, "total_s": time.perf_counter() - start}


def table(result: dict) -> str:
    """The rows as a markdown table."""
    lines = ["| model | BLEU domain B (animals) | BLEU domain A | trainable params | optimizer "
             "state | updates in the budget | s / update |", "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        trainable = (f"{r['trainable']:,} ({r['trainable_pct']:.2f}%)" if "trainable" in r
                     else "—")
        opt = f"{r['opt_state_mib']:.2f} MiB" if "opt_state_mib" in r else "—"
        step = f"{r['step_s']:.2f}" if "step_s" in r else "—"
        lines.append(f"| {r['mode']} | {r['bleu_b']:.2f} | {r['bleu_a']:.2f} | {trainable} | "
                     f"{opt} | {r['updates']:,} | {step} |")
    return "\n".join(lines)


def add_arguments(p) -> None:
    """The ``--bleu`` options of bench/lora_finetune.py."""
    p.add_argument("--data", default=os.path.join(ROOT, "..", "shared", "data", "multi30k"),
                   help="Multi30k folder ({train,val,test2016}.{en,de})")
    p.add_argument("--base-minutes", type=float, default=7.0)
    p.add_argument("--ft-minutes", type=float, default=3.0)
    p.add_argument("--full-lr", type=float, default=1e-4)


def configure(args) -> None:
    """Model and run sizes of the protocol, or of ``--smoke``."""
    if args.smoke:
        (args.d_model, args.heads, args.layers, args.d_ff, args.vocab, args.batch,
         args.max_length, args.warmup) = (32, 2, 1, 64, 48, 8, 32, 2)
        args.base_steps, args.ft_steps, args.log_every = 6, 3, 1
        args.test_pairs, args.decode_batch = 8, 8
    else:
        (args.d_model, args.heads, args.layers, args.d_ff, args.vocab, args.batch,
         args.max_length, args.warmup) = (128, 4, 3, 512, 4000, 32, 64, 100)
        args.log_every, args.decode_batch = 10, 64
