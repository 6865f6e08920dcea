"""GPU benchmark: ours vs ``torch.nn.Transformer`` on the same GPU, in one run (``bench/gpu.sh``).

Sections (each writes its rows into one JSON file):

* ``peak``: measured dense matmul peaks, bf16 and fp32 (TF32 tensor cores), jax and torch.
* ``train``: training updates of the paper's base and big models, ~25k source + ~25k target
  tokens per update (96 rows x 256), fp32 (TF32 matmuls) and bf16: ours (jit, donated state)
  and ``torch.nn.Transformer`` (same sizes, tied embeddings, label smoothing 0.1,
  ``Adam(fused=True)``, ``autocast`` for bf16). Tokens/s, MFU against the measured peak of the
  same precision, peak memory. Each row runs in a process of its own (``--train_rows``), so
  the memory one row's framework keeps cannot starve the next.
* ``attention``: forward + backward of one attention call, bf16, causal, B 8 x T 2048 x N 16 x
  H 64: "xla" vs "chunked" vs cuDNN (``implementation="jax"``).
* ``decode``: cached greedy decoding of the base model (batch 64, 64 source tokens, 64 steps).

Imports only jax, flax, optax, numpy and torch (plus ``transformer_jax.config/nn/ops/decoding``,
which import nothing else), so it runs where tfds, grain and ml_collections are absent.
``--smoke`` runs every section with tiny sizes on whatever device there is (CPU here) in
seconds, to catch mistakes before a GPU run. A section that runs out of ``--budget_s`` or
fails is recorded as skipped with its reason; the others still run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch shares the GPU

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from benchlib import machine_info, write_json  # noqa: E402
from flax import nnx  # noqa: E402

from transformer_jax import decoding, ops  # noqa: E402
from transformer_jax.config import ModelConfig  # noqa: E402
from transformer_jax.nn import Transformer  # noqa: E402
from transformer_jax.param_count import count_params  # noqa: E402

FORBIDDEN = ("tensorflow_datasets", "grain", "array_record", "ml_collections", "num2words",
             "tensorboardX")
SIZES = {  # name: (model overrides, rows, length, timed steps)
    "full": {"base": (dict(), 96, 256, 10), "big": (dict(d_model=1024, num_heads=16,
                                                         d_ff=4096), 96, 256, 10)},
    "smoke": {"base": (dict(d_model=32, num_heads=2, d_ff=64, num_layers=1), 4, 16, 1),
              "big": (dict(d_model=64, num_heads=4, d_ff=128, num_layers=1), 4, 16, 1)},
}
VOCAB = {"full": 37000, "smoke": 128}
PRECISIONS = ("tf32", "bf16")
IMPLS = ("ours", "torch")


def timed(fn, steps: int) -> float:
    """Median-free mean seconds per call of ``fn()`` (returns something to block on)."""
    jax.block_until_ready(fn())  # compile / warm up
    jax.block_until_ready(fn())
    start = time.perf_counter()
    for _ in range(steps):
        out = fn()
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / steps


# ------------------------------------------------------------------------------ peaks


def peak_section(smoke: bool) -> dict:
    n = 256 if smoke else 8192
    out = {}
    for name, dtype in (("bf16", jnp.bfloat16), ("tf32", jnp.float32)):
        a = jnp.ones((n, n), dtype)
        mm = jax.jit(lambda x, y: x @ y)  # default precision: TF32 tensor cores for fp32
        sec = timed(lambda a=a, mm=mm: mm(a, a), 5 if smoke else 20)
        out[f"jax_{name}_tflops"] = 2 * n**3 / sec / 1e12
    torch = _torch()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.backends.cuda.matmul.allow_tf32 = True  # as in the train rows (off by default)
    for name, dtype in (("bf16", torch.bfloat16), ("tf32", torch.float32)):
        a = torch.ones((n, n), dtype=dtype, device=dev)
        sec = _torch_timed(lambda a=a: a @ a, 5 if smoke else 20)
        out[f"torch_{name}_tflops"] = 2 * n**3 / sec / 1e12
    out["bf16_tflops"] = max(out["jax_bf16_tflops"], out["torch_bf16_tflops"])
    out["tf32_tflops"] = max(out["jax_tf32_tflops"], out["torch_tf32_tflops"])
    return out


# ------------------------------------------------------------------------------ FLOPs


def model_flops(cfg: ModelConfig, rows: int, src: int, tgt: int) -> float:
    """Matmul FLOPs of one training update (forward x 3) of the encoder-decoder."""
    d, f, v = cfg.d_model, cfg.d_ff, cfg.vocab_size
    enc = cfg.encoder_layers * (src * (8 * d * d + 4 * d * f) + 4 * src * src * d)
    dec = cfg.decoder_layers * (tgt * (12 * d * d + 4 * d * f) + 4 * src * d * d
                                + 4 * tgt * tgt * d + 4 * tgt * src * d)
    out = 2 * tgt * d * v
    return 3.0 * rows * (enc + dec + out)


# ------------------------------------------------------------------------------ ours


def _batch(rows: int, length: int, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(length // 2, length + 1, size=(2, rows))
    out = {}
    for side, lens in zip(("inputs", "targets"), lengths, strict=True):
        ids = rng.integers(3, vocab, size=(rows, length)).astype(np.int32)
        ids[np.arange(length)[None, :] >= lens[:, None]] = 0
        out[side] = ids
    return out


def ours_train(cfg: ModelConfig, batch: dict, steps: int, loss_chunk: int = 0) -> dict:
    """One update of ours; ``loss_chunk > 0``: the fused loss (``ops.fused_cross_entropy``)."""
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = optax.adam(1e-4, b1=0.9, b2=0.98, eps=1e-9)

    def loss_fn(p, b, rng):
        m = nnx.merge(graphdef, p, rest)
        weights = (b["targets"] != 0).astype(jnp.float32)
        if loss_chunk:
            kernel, bias = m.output_projection()
            out = ops.fused_cross_entropy(m.hidden(b, dropout_rng=rng), kernel, b["targets"],
                                          weights, bias=bias, label_smoothing=0.1,
                                          chunk=loss_chunk)
            return out.loss_sum / out.weight_sum
        logits = m(b, dropout_rng=rng)  # [B, T, V]
        total, count = ops.cross_entropy(logits.astype(jnp.float32), b["targets"], weights, 0.1)
        return total / count

    def step(state, b, rng):
        p, o = state
        loss, grads = jax.value_and_grad(loss_fn)(p, b, rng)
        updates, o = tx.update(grads, o, p)
        return (optax.apply_updates(p, updates), o), loss

    state = (params, tx.init(params))
    jitted = jax.jit(step, donate_argnums=0)
    b = jax.device_put(batch)
    key = jax.random.key(0)
    mem = jitted.lower(state, b, key).compile().memory_analysis()
    holder = {"state": state}

    def run():
        holder["state"], loss = jitted(holder["state"], b, key)
        return loss

    sec = timed(run, steps)
    peak = None
    if mem is not None:
        peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes
                - mem.alias_size_in_bytes + mem.temp_size_in_bytes)
    return {"seconds_per_step": sec, "peak_bytes": peak}


# ------------------------------------------------------------------------------ torch


def _torch():
    import torch  # imported lazily: the JAX sections must not wait for it

    return torch


def _torch_timed(fn, steps: int) -> float:
    torch = _torch()
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    fn()
    fn()
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    sync()
    return (time.perf_counter() - start) / steps


def torch_train(cfg: ModelConfig, batch: dict, steps: int, bf16: bool) -> dict:
    torch = _torch()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    d, v = cfg.d_model, cfg.vocab_size
    core = torch.nn.Transformer(
        d, cfg.num_heads, cfg.encoder_layers, cfg.decoder_layers, cfg.d_ff,
        cfg.dropout_rate, batch_first=True, norm_first=cfg.pre_norm).to(dev)
    embed = torch.nn.Embedding(v, d, padding_idx=0).to(dev)
    params = list(core.parameters()) + list(embed.parameters())
    opt = torch.optim.Adam(params, lr=1e-4, betas=(0.9, 0.98), eps=1e-9,
                           fused=dev == "cuda")
    src = torch.as_tensor(batch["inputs"], device=dev).long()
    tgt = torch.as_tensor(batch["targets"], device=dev).long()
    tgt_in = torch.nn.functional.pad(tgt[:, :-1], (1, 0))
    causal = torch.triu(torch.ones(tgt.shape[1], tgt.shape[1], dtype=torch.bool,
                                   device=dev), 1)  # True = may not attend
    loss_fn = torch.nn.CrossEntropyLoss(ignore_index=0, label_smoothing=0.1)
    scale = d**0.5

    def step():
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=bf16):
            out = core(embed(src) * scale, embed(tgt_in) * scale, tgt_mask=causal,
                       tgt_is_causal=True,
                       src_key_padding_mask=src == 0, tgt_key_padding_mask=tgt_in == 0,
                       memory_key_padding_mask=src == 0)
            logits = out @ embed.weight.T  # tied output layer
            loss = loss_fn(logits.float().reshape(-1, v), tgt.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sec = _torch_timed(step, steps)
    peak = torch.cuda.max_memory_allocated() if dev == "cuda" else None
    return {"seconds_per_step": sec, "peak_bytes": peak}


# ------------------------------------------------------------------------------ sections


def _free_memory() -> None:
    """Hands the memory of the run before back: torch's caching allocator keeps what it freed
    (28 GiB after the base model), which the next jax program then cannot get."""
    import gc

    gc.collect()
    jax.clear_caches()
    torch = _torch()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def train_section(size: str, peaks: dict, only: set[str] | None = None) -> list[dict]:
    """Rows ``model/precision/impl``; ``only`` picks some of them (e.g. ``{"big/tf32/ours"}``)."""
    rows_out = []
    for name, (overrides, rows, length, steps) in SIZES[size].items():
        batch = _batch(rows, length, VOCAB[size])
        tokens = int((batch["inputs"] != 0).sum() + (batch["targets"] != 0).sum())
        for precision in PRECISIONS:
            cfg = ModelConfig(vocab_size=VOCAB[size], max_len=max(length, 16),
                              dtype="bfloat16" if precision == "bf16" else "float32",
                              **overrides)
            flops = model_flops(cfg, rows, length, length)
            for impl in IMPLS:
                if only and f"{name}/{precision}/{impl}" not in only:
                    continue
                row = {"model": name, "precision": precision, "impl": impl,
                       "params": count_params(cfg), "rows": rows, "length": length,
                       "tokens_per_step": tokens}
                try:
                    if impl == "ours":
                        res = ours_train(cfg, batch, steps)
                    else:
                        res = torch_train(cfg, batch, steps, bf16=precision == "bf16")
                except Exception as err:  # e.g. out of memory: keep the other rows
                    traceback.print_exc()
                    rows_out.append({**row, "skipped": f"{type(err).__name__}: {err}"[:300]})
                    continue
                finally:
                    _free_memory()
                sec = res["seconds_per_step"]
                rows_out.append(_with_mfu({
                    **row, "tokens_per_s": tokens / sec,
                    "seconds_per_step": sec, "model_tflops": flops / sec / 1e12,
                    "peak_gib": None if res["peak_bytes"] is None else res["peak_bytes"] / 2**30,
                }, peaks))
                print(_fmt(rows_out[-1]), flush=True)
    return rows_out


DATASHEET_TFLOPS = {"bf16": 989.0, "tf32": 495.0}  # H100/H200 SXM, dense


def _with_mfu(row: dict, peaks: dict) -> dict:
    """``row`` with ``mfu``: its model TFLOP/s over the measured peak of its precision (None
    when that peak was not measured in this run), and ``mfu_datasheet`` over the H100/H200
    SXM datasheet's dense peak (on an H100/H200 only)."""
    peak = peaks.get(f"{row['precision']}_tflops")
    kind = jax.devices()[0].device_kind
    sheet = DATASHEET_TFLOPS.get(row["precision"]) if ("H100" in kind or "H200" in kind) else None
    return {**row, "mfu": row["model_tflops"] / peak if peak else None,
            "mfu_datasheet": row["model_tflops"] / sheet if sheet else None}


# name: (ModelConfig overrides, optimizer.loss_chunk, rows per update); applied in order, each
# on top of the previous one, so consecutive rows A/B one lever.
LEVERS = (
    ("xla_attention", {}, 0, 1),
    ("cudnn_attention", {"attention_impl": "jax"}, 0, 1),
    ("fused_loss", {"attention_impl": "jax"}, 4096, 1),
    ("remat_dots", {"attention_impl": "jax", "remat": "dots"}, 4096, 1),
    ("rows_x2", {"attention_impl": "jax"}, 4096, 2),
)


def lever_section(size: str, peaks: dict) -> list[dict]:
    """bf16 training rows of ours, one MFU lever changed per row (:data:`LEVERS`)."""
    rows_out = []
    for name, (overrides, rows, length, steps) in SIZES[size].items():
        for lever, extra, chunk, factor in LEVERS:
            batch = _batch(rows * factor, length, VOCAB[size])
            tokens = int((batch["inputs"] != 0).sum() + (batch["targets"] != 0).sum())
            cfg = ModelConfig(vocab_size=VOCAB[size], max_len=max(length, 16), dtype="bfloat16",
                              **{**overrides, **extra})
            row = {"model": name, "precision": "bf16", "impl": "ours", "lever": lever,
                   "rows": rows * factor, "length": length, "loss_chunk": chunk,
                   "tokens_per_step": tokens}
            try:
                res = ours_train(cfg, batch, steps, loss_chunk=min(chunk, rows * factor * length))
            except Exception as err:  # e.g. out of memory or no cuDNN: keep the other rows
                rows_out.append({**row, "skipped": f"{type(err).__name__}: {err}"[:300]})
                continue
            finally:
                _free_memory()
            sec = res["seconds_per_step"]
            flops = model_flops(cfg, rows * factor, length, length)
            rows_out.append(_with_mfu({
                **row, "tokens_per_s": tokens / sec, "seconds_per_step": sec,
                "model_tflops": flops / sec / 1e12,
                "peak_gib": None if res["peak_bytes"] is None else res["peak_bytes"] / 2**30,
            }, peaks))
            print(_fmt(rows_out[-1]), flush=True)
    return rows_out


def isolated_train_section(size: str, peaks: dict, smoke: bool) -> list[dict]:
    """:func:`train_section`, each row in a process of its own (this script with
    ``--train_rows``): jax's allocator keeps the pool an earlier row grew (40 GiB for big in
    fp32) and torch its cache, so in one process the big rows run out of memory on an 80 GiB
    GPU. MFU is taken against this process's measured ``peaks``."""
    import subprocess
    import tempfile

    rows_out = []
    keys = [f"{name}/{precision}/{impl}" for name in SIZES[size]
            for precision in PRECISIONS for impl in IMPLS]
    with tempfile.TemporaryDirectory() as tmp:
        for key in keys:
            out = os.path.join(tmp, key.replace("/", "_") + ".json")
            cmd = [sys.executable, os.path.abspath(__file__), "--sections", "train",
                   "--train_rows", key, "--out", out] + (["--smoke"] if smoke else [])
            proc = subprocess.run(cmd, capture_output=True, text=True)
            try:
                with open(out) as f:
                    (row,) = json.load(f)["sections"]["train"]
            except (OSError, ValueError, KeyError) as err:
                row = {"row": key, "skipped": f"exit {proc.returncode} ({err}): "
                                              f"{proc.stderr[-300:]}"}
            if "skipped" in row:
                print(f"{key}: skipped: {row['skipped']}", flush=True)
            else:
                row = _with_mfu(row, peaks)
                print(_fmt(row), flush=True)
            rows_out.append(row)
    return rows_out


def attention_section(smoke: bool) -> list[dict]:
    b, t, n, h = (2, 64, 2, 16) if smoke else (8, 2048, 16, 64)
    keys = jax.random.split(jax.random.key(0), 3)
    q, k, v = (jax.random.normal(kk, (b, t, n, h), jnp.bfloat16) for kk in keys)
    on_gpu = jax.default_backend() == "gpu"
    out = []
    for impl in ("xla", "chunked", "jax"):
        if impl == "jax" and not on_gpu:
            out.append({"impl": "cudnn", "skipped": "not on a GPU"})
            continue

        def loss(q, k, v, impl=impl):
            o = ops.dot_product_attention(q, k, v, is_causal=True, implementation=impl)
            return jnp.sum(o.astype(jnp.float32))

        grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
        sec = timed(lambda grad=grad: grad(q, k, v), 3 if smoke else 20)
        flops = 3.5 * 4 * b * n * t * t * h / 2  # fwd + bwd (2.5x), causal half
        out.append({"impl": "cudnn" if impl == "jax" else impl, "shape_BTNH": [b, t, n, h],
                    "ms": sec * 1e3, "tflops": flops / sec / 1e12})
        print(out[-1], flush=True)
    return out


def decode_section(size: str) -> dict:
    overrides, _, _, _ = SIZES[size]["base"]
    batch, src_len, steps = (4, 8, 8) if size == "smoke" else (64, 64, 64)
    cfg = ModelConfig(vocab_size=VOCAB[size], dropout_rate=0.0, **overrides)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    src = jnp.asarray(_batch(batch, src_len, cfg.vocab_size)["inputs"])

    @jax.jit
    def translate(p, src_ids):
        m = nnx.merge(graphdef, p, rest)
        cache = m.init_cache(batch, steps, encoded=m.encode(src_ids), src_ids=src_ids)

        def tokens_to_logits(ids, cache):
            logits, cache = m.decode(ids, cache=cache)
            return logits[:, 0, :], cache

        # EOS = an id the model cannot emit: every row decodes all ``steps`` positions.
        return decoding.greedy_search(cache, tokens_to_logits, batch_size=batch,
                                      max_len=steps, eos_id=cfg.vocab_size)

    sec = timed(lambda: translate(params, src), 3)
    return {"batch": batch, "steps": steps, "seconds": sec,
            "tokens_per_s": batch * steps / sec, "ms_per_step": sec / steps * 1e3}


def _fmt(row: dict) -> str:
    mfu = "-" if row["mfu"] is None else f"{row['mfu']:.1%}"
    mem = "-" if row["peak_gib"] is None else f"{row['peak_gib']:.1f} GiB"
    return (f"{row['model']:<5} {row['precision']:<5} {row['impl']:<6} {row.get('lever', ''):<15} "
            f"{row['tokens_per_s']:>10,.0f} tok/s  {row['seconds_per_step'] * 1e3:8.1f} ms  "
            f"MFU {mfu:>6}  peak {mem}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, any device")
    parser.add_argument("--out", default=None, help="JSON file (default bench/results/gpu_*)")
    parser.add_argument("--budget_s", type=float, default=420.0,
                        help="skip sections not started within this many seconds")
    parser.add_argument("--sections", default="peak,train,levers,attention,decode")
    parser.add_argument("--train_rows", default="",
                        help="comma-separated model/precision/impl rows of the train section, "
                             "e.g. big/tf32/ours, run in this process (default: every row, "
                             "each in a process of its own)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    size = "smoke" if args.smoke else "full"
    report = {"machine": machine_info("jax", "flax", "optax", smoke=args.smoke),
              "sections": {}}
    torch = _torch()
    if not torch.cuda.is_available():
        torch.set_num_threads(min(2, os.cpu_count() or 1))  # a CPU smoke run: no oversubscription
    report["machine"]["torch"] = torch.__version__
    report["machine"]["forbidden_imported"] = [m for m in FORBIDDEN if m in sys.modules]
    peaks: dict = {}
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   f"gpu_{'smoke' if args.smoke else 'run'}.json")
    jobs = {
        "peak": lambda: peak_section(args.smoke),
        "train": lambda: (train_section(size, peaks, set(args.train_rows.split(",")))
                          if args.train_rows else isolated_train_section(size, peaks, args.smoke)),
        "levers": lambda: lever_section(size, peaks),
        "attention": lambda: attention_section(args.smoke),
        "decode": lambda: decode_section(size),
    }
    for name in args.sections.split(","):
        elapsed = time.perf_counter() - start
        if elapsed > args.budget_s:
            report["sections"][name] = {"skipped": f"time budget spent ({elapsed:.0f} s)"}
            continue
        try:
            result = jobs[name]()
        except Exception as err:  # record and go on: one failure must not lose the rest
            traceback.print_exc()
            result = {"skipped": f"{type(err).__name__}: {err}"}
        if name == "peak" and "skipped" not in result:
            peaks.update(result)
        report["sections"][name] = result
        report["seconds"] = time.perf_counter() - start
        write_json(out, report)  # after every section: a run stopped by its limit keeps the rest
        print(f"[{report['seconds']:.0f} s] {name}: done", flush=True)
    print(f"wrote {out}")
    failed = [k for k, v in report["sections"].items() if isinstance(v, dict) and "skipped" in v]
    return 1 if failed and args.smoke else 0


if __name__ == "__main__":
    sys.exit(main())
