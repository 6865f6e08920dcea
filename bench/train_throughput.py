"""Training throughput: our jitted train step vs PyTorch ``torch.nn.Transformer``, and MFU.

Both sides train the same encoder-decoder on the same random batch, each in its own process
(this one runs ours; torch runs in a worker subprocess driven over a pipe):

* ours: ``transformer_jax.training.train_step`` compiled the way the trainer does it
  (``make_strategy("none").compile_train_step``: ``jax.jit`` on one device, the state
  donated), paper optimizer ``make_optimizer`` (Adam 0.9/0.98/1e-9, rsqrt warm-up
  schedule), label smoothing 0.1;
* torch: ``torch.nn.Transformer`` (batch_first, post-LN, ReLU, no final stack LayerNorm, like
  ours) with one shared embedding table tied to the output layer, sinusoidal positions,
  ``cross_entropy(label_smoothing=0.1, ignore_index=pad)``, ``torch.optim.Adam(betas=(0.9,
  0.98), eps=1e-9, fused=True)`` (falls back to ``foreach`` where fused is unavailable) and the
  same learning-rate schedule.

Dropout 0.1 on residuals, embeddings and attention weights in both (``nn.Transformer`` drops
attention weights; ours sets ``attention_dropout_rate``). Allocator: ours runs with what our
entry points do by default (``transformer_jax.runtime.configure_malloc``: this script
re-executes itself once with mimalloc preloaded, or the glibc tunables where mimalloc is not
installed); the torch worker gets glibc's defaults (``GLIBC_TUNABLES``, ``LD_PRELOAD`` and
``MIMALLOC_*`` removed from its environment). The two run
alternately, A B A B, for ``--rounds`` rounds of ``--steps`` steps each after a
warm-up (compilation is not timed); the fp32 matmul peak (a jitted ``jnp.dot`` of 2048^3,
median of several runs) is measured in every round too. Reported numbers are medians over
rounds, with min/max as the spread. Process CPU seconds per step are recorded for each side
too (``cpu_time_ratio`` = torch CPU s / ours CPU s): on a loaded machine they are steadier than
wall time, but they also count threads that spin while waiting.

Tokens: source + target non-pad tokens per step (the random batch has no padding, so a step
is ``batch * (src_len + tgt_len)`` tokens).

Model FLOPs per training step (forward + backward = 3 x forward; a matmul of ``m x k x n``
is ``2mkn`` FLOPs forward):

  6 * [B*S * (Le * (4 D^2 + 2 D F) + Ld * 2 D^2)          # encoder layers, cross-attn K/V
     + B*T * (Ld * (6 D^2 + 2 D F) + D V)]                 # decoder layers, output layer
  + 3 * 4 * B * D * (Le * S^2 + Ld * T^2 + Ld * T * S)     # scores q.k and weights.v

The embedding lookup is a gather (no FLOPs); the tied output projection is a D x V matmul per
target token. Self-attention scores count the full square (what is computed), not the causal
half. Biases, LayerNorm, softmax and the optimizer update are left out. MFU = model FLOPs per
second / measured fp32 matmul peak. XLA's own cost analysis of the compiled step is reported
next to it.

Usage: python bench/train_throughput.py --config small|base [--rounds 5] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time

from benchlib import machine_info, write_json

HERE = os.path.dirname(os.path.abspath(__file__))

CONFIGS = {
    # name: (d_model, heads, enc layers, dec layers, d_ff, vocab, batch, src_len, tgt_len)
    "small": dict(d_model=256, num_heads=4, layers=3, d_ff=1024, vocab=8000, batch=64,
                  src_len=32, tgt_len=32, steps=4),
    "base": dict(d_model=512, num_heads=8, layers=6, d_ff=2048, vocab=32000, batch=16,
                 src_len=32, tgt_len=32, steps=3),
}
DROPOUT = 0.1
LABEL_SMOOTHING = 0.1
WARMUP_STEPS = 4000


def model_flops(c: dict) -> float:
    """Training FLOPs of one step (formula in the module docstring)."""
    d, f, v, le = c["d_model"], c["d_ff"], c["vocab"], c["layers"]
    ld = le
    b, s, t = c["batch"], c["src_len"], c["tgt_len"]
    per_src = le * (4 * d * d + 2 * d * f) + ld * 2 * d * d
    per_tgt = ld * (6 * d * d + 2 * d * f) + d * v
    matmuls = 6 * (b * s * per_src + b * t * per_tgt)
    attention = 3 * 4 * b * d * (le * s * s + ld * t * t + ld * t * s)
    return float(matmuls + attention)


def make_batch(c: dict, seed: int = 0):
    """Random full rows: ids in [3, V) ending with EOS (1); int32 numpy arrays."""
    import numpy as np

    rng = np.random.default_rng(seed)
    b = c["batch"]
    src = rng.integers(3, c["vocab"], (b, c["src_len"]), dtype=np.int32)
    tgt = rng.integers(3, c["vocab"], (b, c["tgt_len"]), dtype=np.int32)
    src[:, -1] = 1
    tgt[:, -1] = 1
    return {"inputs": src, "targets": tgt}


# ----------------------------------------------------------------------------- ours (JAX)


class Ours:
    def __init__(self, c: dict, batch):
        import jax
        from flax import nnx

        from transformer_jax.config import ModelConfig
        from transformer_jax.nn import Transformer, split_model
        from transformer_jax.parallel import make_strategy
        from transformer_jax.training import create_train_state, make_optimizer, train_step
        from transformer_jax.training.defaults import default_optimizer_config

        self.jax = jax
        cfg = ModelConfig(vocab_size=c["vocab"], d_model=c["d_model"], num_heads=c["num_heads"],
                          num_layers=c["layers"], d_ff=c["d_ff"], dropout_rate=DROPOUT,
                          attention_dropout_rate=DROPOUT, max_len=max(c["src_len"], c["tgt_len"]))
        model_def, params = split_model(Transformer(cfg, rngs=nnx.Rngs(0)))
        self.num_params = sum(x.size for x in jax.tree_util.tree_leaves(params))
        opt = default_optimizer_config()
        opt.warmup_steps = WARMUP_STEPS
        tx, schedule = make_optimizer(opt, d_model=cfg.d_model, num_train_steps=10**6)
        dp = make_strategy("none")
        per_device = lambda s, b, r, axis_name=None: train_step(  # noqa: E731
            s, b, r, model_def=model_def, tx=tx, schedule=schedule,
            label_smoothing=LABEL_SMOOTHING, dropout=True, pad_id=cfg.pad_id,
            axis_name=axis_name)
        state = create_train_state(params, tx)
        self.step_fn = dp.compile_train_step(per_device, state)
        self.state = dp.put_state(state)
        self.batch = dp.put_batch(batch)
        self.rng = dp.put_rng(jax.random.key(1))
        self.xla_flops = None
        try:
            compiled = self.step_fn.lower(self.state, self.batch, self.rng).compile()
            cost = compiled.cost_analysis()
            cost = cost[0] if isinstance(cost, list) else cost
            self.xla_flops = float(cost.get("flops", float("nan")))
        except Exception as err:  # cost analysis is informative only
            print(f"(XLA cost analysis unavailable: {err})", file=sys.stderr)

    def run(self, steps: int) -> float:
        """Runs ``steps`` steps; returns seconds (device synchronised at the end)."""
        start = time.perf_counter()
        for _ in range(steps):
            self.state, metrics = self.step_fn(self.state, self.batch, self.rng)
        loss = float(metrics["loss"])  # waits for the device, like the loop's log step
        elapsed = time.perf_counter() - start
        if not math.isfinite(loss):
            raise RuntimeError(f"ours: the loss is {loss}")
        self.loss = loss
        return elapsed


# ----------------------------------------------------------------------------- torch


class Torch:
    def __init__(self, c: dict, batch, optimizer: str):
        import torch
        from torch import nn

        torch.manual_seed(0)
        self.torch = torch
        d, v = c["d_model"], c["vocab"]
        enc_layer = nn.TransformerEncoderLayer(d, c["num_heads"], c["d_ff"], DROPOUT,
                                               batch_first=True)
        dec_layer = nn.TransformerDecoderLayer(d, c["num_heads"], c["d_ff"], DROPOUT,
                                               batch_first=True)
        encoder = nn.TransformerEncoder(enc_layer, c["layers"], norm=None,
                                        enable_nested_tensor=False)
        decoder = nn.TransformerDecoder(dec_layer, c["layers"], norm=None)
        self.core = nn.Transformer(d, c["num_heads"], custom_encoder=encoder,
                                   custom_decoder=decoder, dropout=DROPOUT, batch_first=True)
        self.embed = nn.Embedding(v, d)
        nn.init.normal_(self.embed.weight, std=d**-0.5)
        self.drop = nn.Dropout(DROPOUT)
        length = max(c["src_len"], c["tgt_len"])
        pos = torch.arange(length, dtype=torch.float32)[:, None]
        inv = torch.exp(torch.arange(0, d, 2, dtype=torch.float32) * (-math.log(10000.0) / d))
        pe = torch.zeros(length, d)
        pe[:, 0::2], pe[:, 1::2] = torch.sin(pos * inv), torch.cos(pos * inv)
        self.pe = pe
        self.scale = math.sqrt(d)
        self.params = list(self.core.parameters()) + list(self.embed.parameters())
        self.num_params = sum(p.numel() for p in self.params)
        kwargs = dict(lr=1.0, betas=(0.9, 0.98), eps=1e-9)
        self.optimizer_name = optimizer
        if optimizer == "fused":
            try:
                self.opt = torch.optim.Adam(self.params, fused=True, **kwargs)
            except (RuntimeError, TypeError) as err:
                print(f"(torch fused Adam unavailable: {err}; using foreach)", file=sys.stderr)
                self.optimizer_name = "foreach"
        if self.optimizer_name == "foreach":
            self.opt = torch.optim.Adam(self.params, foreach=True, **kwargs)
        factor = d**-0.5
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda n: factor * min((n + 1) ** -0.5, (n + 1) * WARMUP_STEPS**-1.5))
        self.src = torch.from_numpy(batch["inputs"]).long()
        self.tgt = torch.from_numpy(batch["targets"]).long()
        self.tgt_in = torch.cat([torch.zeros_like(self.tgt[:, :1]), self.tgt[:, :-1]], dim=1)
        self.causal = nn.Transformer.generate_square_subsequent_mask(c["tgt_len"])
        self.core.train()

    def _embed(self, ids):
        x = self.embed(ids) * self.scale + self.pe[: ids.shape[1]]
        return self.drop(x)

    def step(self):
        torch = self.torch
        src_pad = self.src == 0
        out = self.core(self._embed(self.src), self._embed(self.tgt_in), tgt_mask=self.causal,
                        src_key_padding_mask=src_pad, memory_key_padding_mask=src_pad,
                        tgt_is_causal=True)  # [B, T, D]
        logits = out @ self.embed.weight.t()  # [B, T, V]
        targets = self.tgt.reshape(-1)
        tokens = (targets != 0).sum()
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), targets, ignore_index=0,
            label_smoothing=LABEL_SMOOTHING, reduction="sum") / tokens
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.sched.step()
        return loss

    def run(self, steps: int) -> float:
        start = time.perf_counter()
        for _ in range(steps):
            loss = self.step()
        loss = loss.item()
        elapsed = time.perf_counter() - start
        if not math.isfinite(loss):
            raise RuntimeError(f"torch: the loss is {loss}")
        self.loss = loss
        return elapsed


# ----------------------------------------------------------------------------- torch worker


def torch_worker(config: str, optimizer: str, warmup: int) -> int:
    """Subprocess side: builds Torch, then answers ``<steps>`` lines on stdin with JSON lines."""
    c = CONFIGS[config]
    runner = Torch(c, make_batch(c), optimizer)
    runner.run(warmup)
    print(json.dumps({"ready": True, "optimizer": runner.optimizer_name,
                      "params": runner.num_params, "threads": runner.torch.get_num_threads()}),
          flush=True)
    for line in sys.stdin:
        steps = int(line)
        cpu = time.process_time()
        wall = runner.run(steps)
        print(json.dumps({"wall": wall, "cpu": time.process_time() - cpu, "loss": runner.loss}),
              flush=True)
    return 0


class TorchProcess:
    """``Torch`` in a subprocess with glibc's default allocator settings."""

    def __init__(self, config: str, optimizer: str, warmup: int):
        env = {k: v for k, v in os.environ.items()
               if k not in ("GLIBC_TUNABLES", "LD_PRELOAD") and not k.startswith("MIMALLOC_")}
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--torch-worker", "--config", config,
             "--torch-optimizer", optimizer, "--warmup", str(warmup)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        info = self._read()
        self.optimizer_name, self.num_params = info["optimizer"], info["params"]
        self.threads, self.loss, self.cpu = info["threads"], None, None

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the torch worker exited with status {self.proc.wait()}")
        return json.loads(line)

    def run(self, steps: int) -> float:
        self.proc.stdin.write(f"{steps}\n")
        self.proc.stdin.flush()
        out = self._read()
        if not math.isfinite(out["loss"]):
            raise RuntimeError(f"torch: the loss is {out['loss']}")
        self.loss, self.cpu = out["loss"], out["cpu"]
        return out["wall"]

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


# ----------------------------------------------------------------------------- peak


class MatmulPeak:
    """fp32 GFLOP/s of a jitted ``jnp.dot`` of ``n x n`` matrices."""

    def __init__(self, n: int = 2048):
        import jax
        import jax.numpy as jnp

        self.n, self.jax = n, jax
        ka, kb = jax.random.split(jax.random.key(0))
        self.a = jax.random.normal(ka, (n, n), jnp.float32)
        self.b = jax.random.normal(kb, (n, n), jnp.float32)
        self.dot = jax.jit(jnp.dot)
        self.dot(self.a, self.b).block_until_ready()

    def measure(self, repeats: int = 5) -> float:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            self.dot(self.a, self.b).block_until_ready()
            times.append(time.perf_counter() - start)
        return 2 * self.n**3 / statistics.median(times) / 1e9


# ----------------------------------------------------------------------------- main


def _summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "values": [round(x, 1) for x in values]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", choices=sorted(CONFIGS), default="small")
    p.add_argument("--rounds", type=int, default=5, help="A B rounds (medians over them)")
    p.add_argument("--steps", type=int, default=None, help="steps per side per round")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per side first")
    p.add_argument("--torch-optimizer", choices=["fused", "foreach"], default="fused")
    p.add_argument("--skip-torch", action="store_true", help="time ours only")
    p.add_argument("--peak-n", type=int, default=2048, help="matmul size for the fp32 peak")
    p.add_argument("--json", default=None, help="write the result here")
    p.add_argument("--torch-worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.torch_worker:
        return torch_worker(args.config, args.torch_optimizer, args.warmup)

    c = dict(CONFIGS[args.config])
    steps = args.steps or c["steps"]
    batch = make_batch(c)
    tokens = int((batch["inputs"] != 0).sum() + (batch["targets"] != 0).sum())
    flops = model_flops(c)

    peak = MatmulPeak(args.peak_n)
    t0 = time.perf_counter()
    ours = Ours(c, batch)
    ours.run(args.warmup)
    compile_s = time.perf_counter() - t0
    theirs = None
    if not args.skip_torch:
        theirs = TorchProcess(args.config, args.torch_optimizer, args.warmup)

    ours_tps, torch_tps, peaks, ratios = [], [], [], []
    cpu = {"ours": [], "torch": []}  # process CPU seconds per step (both threads summed)

    def timed(side, runner):
        start = time.process_time()
        wall = runner.run(steps)
        used = time.process_time() - start if side == "ours" else runner.cpu
        cpu[side].append(used / steps)
        return steps * tokens / wall

    for r in range(args.rounds):
        peaks.append(peak.measure())
        ours_tps.append(timed("ours", ours))
        if theirs is not None:
            torch_tps.append(timed("torch", theirs))
            ratios.append(ours_tps[-1] / torch_tps[-1])
        line = f"round {r}: ours {ours_tps[-1]:.0f} tok/s"
        if theirs is not None:
            line += f", torch {torch_tps[-1]:.0f} tok/s, ratio {ratios[-1]:.2f}"
        print(line + f", peak {peaks[-1]:.0f} GFLOP/s", file=sys.stderr)

    peak_gflops = statistics.median(peaks)
    ours_med = statistics.median(ours_tps)
    step_s = tokens / ours_med
    result = {
        "benchmark": "training step throughput, ours (jax.jit) vs torch.nn.Transformer",
        "config": args.config,
        "settings": {**c, "steps_per_round": steps, "rounds": args.rounds,
                     "warmup_steps": args.warmup, "dropout": DROPOUT,
                     "label_smoothing": LABEL_SMOOTHING, "tokens_per_step": tokens,
                     "tokens_counted": "source + target non-pad tokens",
                     "torch_optimizer": None if theirs is None else theirs.optimizer_name,
                     "peak_matmul_n": args.peak_n},
        "params": {"ours": int(ours.num_params),
                   "torch": None if theirs is None else int(theirs.num_params)},
        "ours_tokens_per_s": round(ours_med, 1),
        "torch_tokens_per_s": round(statistics.median(torch_tps), 1) if torch_tps else None,
        "ratio": round(statistics.median(ratios), 3) if ratios else None,
        "mfu": round(flops / step_s / (peak_gflops * 1e9), 3),
        "torch_mfu": (round(flops * statistics.median(torch_tps) / tokens
                            / (peak_gflops * 1e9), 3) if torch_tps else None),
        "peak_gflops": round(peak_gflops, 1),
        "model_flops_per_step": flops,
        "xla_flops_per_step": ours.xla_flops,
        "ours_step_ms": round(1e3 * step_s, 1),
        "cpu_s_per_step": {k: round(statistics.median(v), 3) for k, v in cpu.items() if v},
        "cpu_time_ratio": (round(statistics.median(cpu["torch"]) / statistics.median(cpu["ours"]),
                                 3) if cpu["torch"] else None),
        "compile_and_warmup_s": round(compile_s, 1),
        "spread": {"ours_tokens_per_s": _summary(ours_tps),
                   "torch_tokens_per_s": _summary(torch_tps) if torch_tps else None,
                   "ratio": _summary(ratios) if ratios else None,
                   "peak_gflops": _summary(peaks)},
        "final_loss": {"ours": ours.loss, "torch": None if theirs is None else theirs.loss},
        "machine": machine_info("jax", "jaxlib", "flax", "optax", "torch",
                                torch_threads=None if theirs is None else theirs.threads,
                                malloc_ours=os.environ.get("LD_PRELOAD")
                                or os.environ.get("GLIBC_TUNABLES", "")),
    }
    if theirs is not None:
        theirs.close()
    print(json.dumps({k: result[k] for k in ("config", "ours_tokens_per_s",
                                             "torch_tokens_per_s", "ratio", "mfu",
                                             "peak_gflops")}))
    if args.json:
        write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(HERE))
    if "--torch-worker" not in sys.argv:
        from transformer_jax.runtime import configure_malloc

        configure_malloc()  # ours runs as train.py does (re-executes once)
    sys.exit(main())
