"""Translation speed on CPU: this library against CTranslate2 and transformers ``generate``.

One random MarianMT model of OPUS-MT en-de's dimensions (d_model 512, 6 + 6 layers, 8 heads,
FFN 2048, swish; init std 0.05 so that outputs vary) with SentencePiece models trained on
Multi30k and a ``vocab.json`` laid out as OPUS-MT's (``</s>`` 0, ``<unk>`` 1, the pieces of
both models, ``<pad>`` last) is written once and converted

* to this library with ``python -m transformer_jax.interop.marian import`` (engine ``jax``;
  ``jax-int8``: the same with ``Translator(..., quantize="int8")``),
* to CTranslate2 with its ``TransformersConverter`` (engine ``ct2``; fp32 and int8, with its
  default kernels and with ``CT2_FORCE_CPU_ISA=AVX512``),
* and run as is by transformers' ``generate`` (engine ``hf``).

Every engine decodes the same length-sorted batches of Multi30k test sentences, and every
output is forced to exactly ``--tokens`` decoder steps (EOS masked until then: CTranslate2
``min_decoding_length = max_decoding_length``, transformers ``min_new_tokens =
max_new_tokens``, this library ``min_length = max_length``), so all do the same work. Modes:
greedy and beam 4 at batch 32, and greedy at batch 1 (latency). Each engine runs in its own
process pinned to the same cores (``--cores``) with that many threads; each mode is run once
to warm up (compilation) and then ``--repeats`` times: the median is reported. The greedy
fp32 token ids of all engines are compared (the first ``tokens - 1``: this library's last
step is the forced EOS).

  python bench/translate_speed.py                      # full run (about 20 min on 2 cores)
  python bench/translate_speed.py --smoke              # tiny model, seconds; CI runs it

Engines that are not installed are skipped with a note (``pip install -e .[bench]``).
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
DATA = os.path.join(REPO, "..", "shared", "data", "multi30k")
MODES = ("greedy32", "beam32", "greedy1")
ENGINES = ("jax", "jax-int8", "ct2", "ct2-avx512", "ct2-int8", "ct2-int8-avx512", "hf")
FULL = dict(d_model=512, layers=6, heads=8, ffn=2048, vocab=8000, sentences=500,
            latency_sentences=50, tokens=32, repeats=3, spm_lines=29000)
SMOKE = dict(d_model=32, layers=2, heads=4, ffn=64, vocab=150, sentences=16,
             latency_sentences=2, tokens=8, repeats=1, spm_lines=1000)
SMOKE_ENGINES = ("jax", "ct2", "ct2-int8", "hf")  # the AVX-512 runs only in the full one


# ------------------------------------------------------------------------------- model files
def read_lines(path: str, count: int) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n") for _, line in zip(range(count), f, strict=False)]


def train_spm(lines: list[str], vocab_size: int) -> bytes:
    """A unigram SentencePiece model (SentencePiece's ids: unk 0, s 1, /s 2)."""
    import sentencepiece as spm

    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=buffer, vocab_size=vocab_size,
        model_type="unigram", character_coverage=1.0, num_threads=2, minloglevel=2,
        hard_vocab_limit=False)
    return buffer.getvalue()


def write_tokenizer(path: str, data: str, vocab_size: int, lines: int) -> int:
    """source.spm (English) and target.spm (German) + OPUS-MT's joint vocab.json; returns
    the vocabulary size (``<pad>`` is the last id)."""
    import sentencepiece as spm

    protos = [train_spm(read_lines(os.path.join(data, f"train.{lang}"), lines), vocab_size)
              for lang in ("en", "de")]
    vocab = {"</s>": 0, "<unk>": 1}
    for proto in protos:
        sp = spm.SentencePieceProcessor(model_proto=proto)
        for i in range(3, sp.get_piece_size()):
            vocab.setdefault(sp.id_to_piece(i), len(vocab))
    vocab["<pad>"] = len(vocab)
    for name, blob in zip(("source.spm", "target.spm"), protos, strict=True):
        with open(os.path.join(path, name), "wb") as f:
            f.write(blob)
    with open(os.path.join(path, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(path, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump({"source_lang": "en", "target_lang": "de"}, f)
    return len(vocab)


def write_marian(path: str, size: dict, vocab: int) -> None:
    """A random ``MarianMTModel`` as OPUS-MT's (shared embeddings, swish, scaled embeddings)."""
    import torch
    import transformers

    config = transformers.MarianConfig(
        vocab_size=vocab, decoder_vocab_size=vocab, d_model=size["d_model"],
        encoder_layers=size["layers"], decoder_layers=size["layers"],
        encoder_attention_heads=size["heads"], decoder_attention_heads=size["heads"],
        encoder_ffn_dim=size["ffn"], decoder_ffn_dim=size["ffn"], max_position_embeddings=512,
        activation_function="swish", pad_token_id=vocab - 1, decoder_start_token_id=vocab - 1,
        eos_token_id=0, forced_eos_token_id=0, scale_embedding=True, init_std=0.05,
        share_encoder_decoder_embeddings=True)
    torch.manual_seed(0)
    model = transformers.MarianMTModel(config).eval()
    with torch.no_grad():
        model.final_logits_bias.normal_(std=0.05)
    model.save_pretrained(path)


def prepare(root: str, size: dict, data: str) -> dict:
    """Writes (once per size) the Marian model, its imports and the tokenized sentences."""
    stamp = os.path.join(root, "prepared.json")
    model_keys = {k: size[k] for k in ("d_model", "layers", "heads", "ffn", "vocab", "spm_lines")}
    if os.path.isfile(stamp):
        with open(stamp) as f:
            if json.load(f).get("model") == model_keys:  # same model: only new sentences
                _write_sentences(root, os.path.join(root, "marian"), data, size)
                return _read_prepared(root)
    os.makedirs(root, exist_ok=True)
    marian, workdir = os.path.join(root, "marian"), os.path.join(root, "jax_workdir")
    subprocess.run(["rm", "-rf", marian, workdir, os.path.join(root, "ct2")], check=True)
    os.makedirs(marian)
    vocab = write_tokenizer(marian, data, size["vocab"], size["spm_lines"])
    write_marian(marian, size, vocab)
    importer = subprocess.Popen(  # runs while CTranslate2 converts
        [sys.executable, "-m", "transformer_jax.interop.marian", "import", marian, "--workdir",
         workdir], env=child_env(), stdout=subprocess.DEVNULL)
    if importlib.util.find_spec("ctranslate2") is not None:
        from ctranslate2.converters import TransformersConverter

        TransformersConverter(marian).convert(os.path.join(root, "ct2"), force=True)
    _write_sentences(root, marian, data, size)
    if importer.wait() != 0:
        raise RuntimeError(f"python -m transformer_jax.interop.marian import {marian} failed")
    with open(stamp, "w") as f:
        json.dump({"model": model_keys}, f)
    return _read_prepared(root)


def _write_sentences(root: str, marian: str, data: str, size: dict) -> None:
    """Marian source ids (EOS appended) and pieces of the test sentences, sorted by length."""
    sys.path.insert(0, REPO)
    from transformer_jax.interop.marian import MarianTokenizer

    tokenizer = MarianTokenizer.from_directory(marian)
    count = max(size["sentences"], size["latency_sentences"])
    rows = [ids + [tokenizer.eos_id] for ids in tokenizer.encode(
        read_lines(os.path.join(data, "test2016.en"), count))]
    batch_rows = sorted(rows[: size["sentences"]], key=len)
    with open(os.path.join(root, "sentences.json"), "w") as f:
        json.dump({"batch": batch_rows, "latency": rows[: size["latency_sentences"]],
                   "pieces": tokenizer.pieces, "pad_id": tokenizer.pad_id}, f)


def _read_prepared(root: str) -> dict:
    with open(os.path.join(root, "sentences.json")) as f:
        return json.load(f)


# ----------------------------------------------------------------------------------- engines
def jax_engine(root: str, threads: int, quantize: str | None):
    """``decode(rows, beam, batch, tokens) -> Marian ids``: ``Translator.translate_ids``."""
    import numpy as np

    from transformer_jax.inference import Translator

    with open(os.path.join(root, "jax_workdir", "marian", "id_order.json")) as f:
        order = np.asarray(json.load(f))  # our id k is Marian's order[k]
    inverse = np.argsort(order)
    kwargs = {"quantize": quantize} if quantize else {}
    translators = {}

    def decode(rows, beam, batch, tokens):
        if tokens not in translators:
            translators[tokens] = Translator.from_workdir(
                os.path.join(root, "jax_workdir"), max_decode_length=tokens,
                extra_length=tokens, **kwargs)
        ours = [inverse[np.asarray(r)].tolist() for r in rows]
        out = []  # batches of ``batch`` sentences in the given order, as the other engines
        for start in range(0, len(ours), batch):
            out += order[translators[tokens].translate_ids(
                ours[start : start + batch], beam_size=beam, alpha=1.0, batch_size=batch,
                min_length=tokens)].tolist()
        return out

    return decode


def ct2_engine(root: str, threads: int, compute_type: str):
    import ctranslate2

    prepared = _read_prepared(root)
    pieces = prepared["pieces"]  # the converter drops <pad> (never generated)
    index = {p: i for i, p in enumerate(pieces)}
    model = ctranslate2.Translator(os.path.join(root, "ct2"), device="cpu",
                                   compute_type=compute_type, intra_threads=threads,
                                   inter_threads=1)

    def decode(rows, beam, batch, tokens):
        out = model.translate_batch(
            [[pieces[i] for i in r] for r in rows], beam_size=beam, max_batch_size=batch,
            min_decoding_length=tokens, max_decoding_length=tokens, length_penalty=1.0)
        return [[index[p] for p in r.hypotheses[0]] for r in out]

    return decode


def hf_engine(root: str, threads: int):
    import torch
    import transformers

    torch.set_num_threads(threads)
    model = transformers.MarianMTModel.from_pretrained(os.path.join(root, "marian")).eval()
    pad = model.config.pad_token_id

    def decode(rows, beam, batch, tokens):
        outputs = []
        for start in range(0, len(rows), batch):
            chunk = rows[start : start + batch]
            src = torch.full((len(chunk), max(map(len, chunk))), pad, dtype=torch.long)
            for i, r in enumerate(chunk):
                src[i, : len(r)] = torch.as_tensor(r)
            with torch.inference_mode():
                out = model.generate(
                    src, attention_mask=(src != pad).long(), num_beams=beam, do_sample=False,
                    min_new_tokens=tokens, max_new_tokens=tokens, forced_eos_token_id=None,
                    bad_words_ids=[[pad]], length_penalty=1.0, early_stopping=False)
            outputs += out[:, 1:].tolist()  # without the decoder start token
        return outputs

    return decode


def make_engine(name: str, root: str, threads: int):
    if name == "jax":
        return jax_engine(root, threads, None)
    if name == "jax-int8":
        return jax_engine(root, threads, "int8")
    if name.startswith("ct2"):
        return ct2_engine(root, threads, "int8" if "int8" in name else "float32")
    return hf_engine(root, threads)


def run_engine(args) -> None:
    """Child process: time every mode of one engine; JSON on ``--out``."""
    os.sched_setaffinity(0, args.core_list)
    prepared = _read_prepared(args.root)
    threads = len(args.core_list)
    start = time.perf_counter()
    decode = make_engine(args.engine, args.root, threads)
    result = {"engine": args.engine, "load_s": round(time.perf_counter() - start, 2),
              "threads": threads, "modes": {}}
    for mode in args.modes.split(","):
        rows = prepared["latency" if mode == "greedy1" else "batch"]
        beam, batch = (4, 32) if mode == "beam32" else (1, 1 if mode == "greedy1" else 32)
        start = time.perf_counter()
        out = decode(rows, beam, batch, args.tokens)  # warm-up: compiles every shape
        warm = time.perf_counter() - start
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            decode(rows, beam, batch, args.tokens)
            times.append(time.perf_counter() - start)
        median = statistics.median(times)
        result["modes"][mode] = {
            "sentences": len(rows), "beam": beam, "batch": batch, "warmup_s": round(warm, 3),
            "runs_s": [round(t, 4) for t in times], "median_s": round(median, 4),
            "sentences_per_s": round(len(rows) / median, 2),
            "tokens_per_s": round(len(rows) * args.tokens / median, 1),
            "ms_per_sentence": round(1000 * median / len(rows), 2),
            "lengths": sorted({len(r) for r in out})}
        if mode == "greedy32":
            result["greedy_ids"] = out
        print(f"  {args.engine:>16} {mode:>9}: {result['modes'][mode]['tokens_per_s']:8.1f} "
              f"tok/s", file=sys.stderr, flush=True)
    with open(args.out, "w") as f:
        json.dump(result, f)


# ------------------------------------------------------------------------------------ parent
def available(engines: list[str]) -> list[str]:
    """The engines whose packages are installed (a note on stderr for each one skipped)."""
    need = {"ct2": "ctranslate2", "hf": "transformers"}
    keep = []
    for name in engines:
        module = need.get(name.split("-")[0])
        if module and importlib.util.find_spec(module) is None:
            print(f"note: skipping {name}: {module} is not installed (pip install -e .[bench])",
                  file=sys.stderr)
        else:
            keep.append(name)
    return keep


def child_env() -> dict:
    """This checkout first on the path; JAX on the CPU without probing for a TPU."""
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.setdefault("JAX_PLATFORMS", "cpu")
    return env


def run_child(args, engine: str) -> dict | None:
    out = os.path.join(args.root, f"result_{engine}.json")
    env = child_env()
    if engine.endswith("avx512"):
        env["CT2_FORCE_CPU_ISA"] = "AVX512"
    command = [sys.executable, os.path.abspath(__file__), "--engine", engine, "--root",
               args.root, "--out", out, "--cores", args.cores, "--modes", args.modes,
               "--tokens", str(args.size["tokens"]), "--repeats", str(args.size["repeats"])]
    if subprocess.run(command, env=env).returncode != 0:
        print(f"note: engine {engine} failed (see above); left out", file=sys.stderr)
        return None
    with open(out) as f:
        return json.load(f)


def agreement(results: dict, tokens: int) -> dict:
    """Share of sentences whose first ``tokens - 1`` greedy ids equal the first fp32 engine's
    (every other engine, int8 ones included)."""
    fp32 = [e for e in results if "int8" not in e and "greedy_ids" in results[e]]
    if not fp32:
        return {}
    ref = results[fp32[0]]["greedy_ids"]
    return {f"{e} vs {fp32[0]}": round(sum(
        a[: tokens - 1] == b[: tokens - 1] for a, b in zip(ref, results[e]["greedy_ids"],
                                                           strict=True)) / len(ref), 4)
        for e in results if e != fp32[0] and "greedy_ids" in results[e]}


def table(results: dict) -> str:
    """Markdown: target tokens/s per mode and engine (batch 1 also in ms per sentence)."""
    engines = list(results)
    lines = ["| mode | " + " | ".join(engines) + " |", "|---" + "|---:" * len(engines) + "|"]
    for mode in MODES:
        cells = []
        for e in engines:
            row = results[e]["modes"].get(mode)
            text = "-" if row is None else f"{row['tokens_per_s']:,.0f}"
            if row is not None and mode == "greedy1":
                text += f" ({row['ms_per_sentence']:.0f} ms)"
            cells.append(text)
        lines.append(f"| {mode} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ratios(results: dict) -> dict:
    """This library's tokens/s over the fastest CTranslate2 fp32 and over transformers."""
    out = {}
    for mine in ("jax", "jax-int8"):
        for mode in MODES:
            row = results.get(mine, {}).get("modes", {}).get(mode)
            if row is None:
                continue
            kind = "int8" if mine.endswith("int8") else "fp32"
            ct2 = [r["modes"][mode]["tokens_per_s"] for e, r in results.items()
                   if e.startswith("ct2") and ("int8" in e) == (kind == "int8")
                   and mode in r["modes"]]
            if ct2:
                out[f"{mine} / ct2 {kind} {mode}"] = round(row["tokens_per_s"] / max(ct2), 2)
            hf = results.get("hf", {}).get("modes", {}).get(mode)
            if hf:
                out[f"{mine} / hf {mode}"] = round(row["tokens_per_s"] / hf["tokens_per_s"], 2)
    return out


def versions() -> dict:
    from importlib import metadata

    out = {}
    for name in ("jax", "jaxlib", "flax", "ctranslate2", "transformers", "torch"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny model, few sentences")
    parser.add_argument("--engines", default=None,
                        help=f"comma-separated, of {','.join(ENGINES)} (default all; "
                             f"--smoke: {','.join(SMOKE_ENGINES)})")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--cores", default=None,
                        help="CPU ids every engine is pinned to (default: all of this process)")
    parser.add_argument("--root", default=None, help="model files (default /tmp/...)")
    parser.add_argument("--data", default=DATA, help="Multi30k directory")
    parser.add_argument("--json", default=None, help="result file")
    for key in ("sentences", "latency_sentences", "tokens", "repeats", "vocab"):
        parser.add_argument("--" + key.replace("_", "-"), type=int, default=None)
    # child process
    parser.add_argument("--engine", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    size = dict(SMOKE if args.smoke else FULL)
    for key in ("sentences", "latency_sentences", "tokens", "repeats", "vocab"):
        if getattr(args, key) is not None:
            size[key] = getattr(args, key)
    args.size = size
    args.engines = args.engines or ",".join(SMOKE_ENGINES if args.smoke else ENGINES)
    args.cores = args.cores or ",".join(map(str, sorted(os.sched_getaffinity(0))))
    args.core_list = [int(c) for c in args.cores.split(",")]
    args.root = args.root or os.path.join(
        "/tmp", f"translate_speed_{'smoke' if args.smoke else 'full'}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.engine:
        args.tokens, args.repeats = args.size["tokens"], args.size["repeats"]
        run_engine(args)
        return 0
    for module in ("transformers", "torch", "sentencepiece"):
        if importlib.util.find_spec(module) is None:
            print(f"error: {module} is needed to write the random Marian model; "
                  "pip install -e .[bench]", file=sys.stderr)
            return 2
    load_before, start = os.getloadavg(), time.perf_counter()
    prepared = prepare(args.root, args.size, args.data)
    engines = available(args.engines.split(","))
    results = {}
    print(f"prepared in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    for engine in engines:
        result = run_child(args, engine)
        if result is not None:
            results[engine] = result
    sys.path.insert(0, HERE)
    from benchlib import machine_info, write_json

    agree = agreement(results, args.size["tokens"])
    speed = ratios(results)
    print(table(results))
    print(json.dumps({"agreement": agree, "ratios": speed}, indent=1))
    command = "python bench/translate_speed.py" + " ".join(
        [""] + (argv if argv is not None else sys.argv[1:]))
    for r in results.values():
        r.pop("greedy_ids", None)
    json_path = args.json or os.path.join(
        HERE, "results", f"translate_speed{'_smoke' if args.smoke else ''}.json")
    write_json(json_path, {
        "benchmark": "translation speed: this library vs CTranslate2 vs transformers generate",
        "command": command, "size": args.size, "cores": args.core_list,
        "vocab_size": len(prepared["pieces"]), "results": results, "agreement": agree,
        "ratios": speed, "table": table(results),
        "machine": machine_info(loadavg_before=load_before, loadavg_after=os.getloadavg(),
                                versions=versions())})
    print(f"wrote {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
