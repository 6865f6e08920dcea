"""The main job: ``train_and_evaluate(config, workdir)``.

Order of work: validate the config, prepare data and tokenizer (the tokenizer's vocabulary
size becomes ``model.vocab_size``), build the model and optimizer, resume from the newest
checkpoint in ``workdir`` if there is one, then train with periodic logging, evaluation and
checkpoints. At the end: final evaluation (eval and test split), optional checkpoint
averaging, ``summary.json`` and ``learning_curve.png`` in the work directory.

SIGTERM / SIGINT: the current update finishes, a checkpoint is written and the function
returns normally (``summary["interrupted"] = True``). A NaN/inf loss raises
:class:`TrainingDivergedError`; the checkpoints written before stay valid.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import shutil
import signal
import threading
import time

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx
from tqdm.auto import tqdm

import transformer_jax.training.evaluate as evaluate
import transformer_jax.training.reporting as reporting
from transformer_jax import data as data_lib
from transformer_jax.checkpoints import check_compatible, load_params
from transformer_jax.config import ModelConfig
from transformer_jax.errors import ConfigError, TrainingDivergedError, WorkdirError
from transformer_jax.nn import DecoderOnlyLM, Transformer, split_model
from transformer_jax.training.average import average_into_workdir
from transformer_jax.training.checkpoint import Checkpointer
from transformer_jax.training.defaults import parse_metrics, validate_config
from transformer_jax.training.distributed import chief_first
from transformer_jax.training.optim import make_optimizer
from transformer_jax.training.sharding import Sharded, make_parallel
from transformer_jax.training.step import create_train_state, train_step

__all__ = ["train_and_evaluate"]

log = logging.getLogger(__name__)


class _StopFlag:
    """Set by SIGTERM/SIGINT while training; restores the old handlers on exit."""

    def __init__(self):
        self.signum: int | None = None
        self._old = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, _frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: stop at once
        self.signum = signum
        log.warning("received signal %d: finishing this update, then saving", signum)

    def __exit__(self, *exc):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        return False


def _model_config(config: ml_collections.ConfigDict, vocab_size: int) -> ModelConfig:
    model = config.model.to_dict()
    model["vocab_size"] = int(vocab_size)
    try:
        return ModelConfig.from_dict(model)
    except ValueError as err:
        raise ConfigError(f"model config: {err}") from err


def _make_workdir(workdir: str) -> bool:
    """Create ``workdir`` and check that it takes a write; returns whether it was created."""
    created = not os.path.isdir(workdir)
    probe = os.path.join(workdir, f".write_check_{os.getpid()}")
    try:
        os.makedirs(workdir, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"\0" * 4096)
            f.flush()
            os.fsync(f.fileno())
        os.remove(probe)
    except OSError as err:
        with contextlib.suppress(OSError):
            os.remove(probe)
        if created:
            shutil.rmtree(workdir, ignore_errors=True)
        raise WorkdirError(
            f"cannot write to the work directory {workdir} ({err.strerror or err}); choose a "
            "--workdir on a writable file system with free space."
        ) from None
    return created


def _tokenizer_ref(prepared) -> dict:
    import hashlib

    with open(prepared.tokenizer_path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    return {"path": os.path.abspath(prepared.tokenizer_path), "sha256": digest}


@functools.partial(jax.jit)
def _all_finite(params) -> jax.Array:
    leaves = jax.tree_util.tree_leaves(params)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


class _Throughput:
    """Source + target tokens per second between synchronisation points.

    The interval that ends with the first update of a run (compilation) is not counted, nor
    time spent in evaluation or checkpointing.
    """

    def __init__(self):
        self.tokens = 0.0
        self.seconds = 0.0
        self._mark: float | None = None

    def sync(self, tokens: float) -> None:
        """Called right after the metrics of the last steps were fetched (device idle)."""
        now = time.perf_counter()
        if self._mark is not None:
            self.tokens += tokens
            self.seconds += now - self._mark
        self._mark = now

    def restart(self) -> None:
        """Called after work that should not count (evaluation, checkpoints)."""
        self._mark = time.perf_counter()

    @property
    def rate(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("nan")


def _mean_metrics(rows: list[dict[str, float]]) -> dict[str, float]:
    """Token-weighted means of per-step metrics; token counts summed."""
    tokens = sum(r["tokens"] for r in rows)
    out = {}
    for key in ("loss", "nll", "accuracy"):
        out[key] = sum(r[key] * r["tokens"] for r in rows) / max(tokens, 1.0)
    out["grad_norm"] = sum(r["grad_norm"] for r in rows) / len(rows)
    out["learning_rate"] = rows[-1]["learning_rate"]
    out["tokens"] = tokens
    out["src_tokens"] = sum(r["src_tokens"] for r in rows)
    return out


def train_and_evaluate(config, workdir: str) -> dict:
    """Train (or resume), evaluate and write the run's outputs into ``workdir``.

    Args:
      config: ConfigDict/dict of training keys (see ``transformer_jax.training.defaults``);
        missing keys take their defaults, unknown keys raise ``ConfigError``.
      workdir: run directory (created); holds tokenizer, checkpoints, logs and summary.

    Returns:
      The summary dict also written to ``<workdir>/summary.json``.
    """
    wall_start = time.perf_counter()
    config = validate_config(config)
    metric_names = parse_metrics(config.eval_metrics)
    workdir = os.path.abspath(workdir)
    is_chief = jax.process_index() == 0
    dp = make_parallel(config)
    dp.check_batch_size(config.batch_size)
    eval_batch_size = config.eval_batch_size or config.batch_size
    dp.check_batch_size(eval_batch_size)
    _model_config(config, config.data.vocab_size)  # model errors before anything is written
    created = _make_workdir(workdir)
    try:
        prepared = chief_first(lambda: data_lib.prepare(config.data, workdir), "prepare")
    except Exception:
        if created and is_chief:  # bad data: leave no half-prepared work directory behind
            shutil.rmtree(workdir, ignore_errors=True)
        raise
    model_cfg = _model_config(config, prepared.vocab_size)
    config.model.vocab_size = model_cfg.vocab_size
    config_dict = config.to_dict()
    checkpointer = Checkpointer(workdir, keep=config.keep_checkpoints)
    latest = checkpointer.latest_meta()  # (step, meta) of the newest readable checkpoint
    if latest is not None:  # fail before touching anything if the run cannot continue
        check_compatible(latest[1].get("config", {}), config_dict, workdir)
    if is_chief:
        reporting.write_json(os.path.join(workdir, reporting.CONFIG_FILE), config_dict)

    decoder_only = config.model_kind == "decoder_only"
    model_cls = DecoderOnlyLM if decoder_only else Transformer
    model = model_cls(model_cfg, rngs=nnx.Rngs(config.seed))
    if isinstance(dp, Sharded):
        dp.bind(model)  # parameter shardings from the logical axis names
    model_def, params = split_model(model)
    del model
    opt = config.optimizer
    accum = int(opt.grad_accum_steps)
    tx, schedule = make_optimizer(opt, d_model=model_cfg.d_model,
                                  num_train_steps=config.num_train_steps)
    state = create_train_state(params, tx)
    rng = jax.random.fold_in(jax.random.key(config.seed), 1)  # dropout stream
    train_it = data_lib.train_iterator(prepared, config.batch_size, config.seed)
    tokenizer_ref = _tokenizer_ref(prepared)
    # The newest checkpoint that can be read; damaged newer ones are set aside with a warning.
    # A params-only checkpoint (a model imported by interop.marian) starts a fine-tuning run.
    if latest is not None and latest[1].get("params_only"):
        state = create_train_state(load_params(workdir, latest[0]), tx)
        restored = None
    else:
        restored = checkpointer.restore_latest(state, config=config_dict)
    resumed_step = 0
    if restored is not None:
        state, rng = restored["state"], restored["rng"]
        if restored["data_state"] is not None:
            train_it.set_state(restored["data_state"])
        resumed_step = int(restored["meta"]["step"])
        log.info("resuming from step %d", resumed_step)
        print(f"resuming from step {resumed_step}", flush=True)
    micro = int(state.step)
    history = reporting.History(workdir, resumed_step)
    writer = reporting.MetricWriter(workdir, enabled=is_chief)

    per_device = functools.partial(
        train_step, model_def=model_def, tx=tx, schedule=schedule,
        label_smoothing=float(opt.label_smoothing),
        dropout=model_cfg.dropout_rate > 0 or model_cfg.attention_dropout_rate > 0
        or getattr(model_cfg, "ff_dropout_rate", 0.0) > 0,
        grad_accum_steps=accum, pad_id=model_cfg.pad_id,
    )
    step_fn = dp.train_step(per_device)
    evaluator = evaluate.Evaluator(
        dp, model_def, prepared, label_smoothing=float(opt.label_smoothing),
        batch_size=eval_batch_size, metric_names=metric_names,
        beam_size=config.eval_beam_size, length_penalty=config.eval_length_penalty,
        pad_id=model_cfg.pad_id,
    )
    state = dp.put_state(state)
    rng_dev = dp.put_rng(rng)

    def save(step: int) -> None:
        host_state = dp.get_state(state)
        if not bool(_all_finite(host_state.params)):
            raise TrainingDivergedError(_diverged_message("parameters", step, checkpointer))
        checkpointer.save(step, host_state, rng=rng, data_state=train_it.get_state(),
                          config=config_dict, tokenizer=tokenizer_ref)

    def run_eval(step: int, split: str, num_sentences: int, *, params=None, tag=None) -> dict:
        params = dp.get_state(state).params if params is None else params
        metrics = evaluator.evaluate(params, split, num_sentences)
        tag = tag or ("eval" if split == config.data.eval_split else split)
        if is_chief:
            history.add(step, tag, metrics)
            writer.scalars(step, tag, metrics)
        return metrics

    total_steps = config.num_train_steps
    step = first_step = micro // accum
    throughput = _Throughput()
    pending: list = []
    last_train: dict[str, float] = {}
    last_eval: tuple[int, dict] | None = None
    interrupted = False
    bar = tqdm(total=total_steps, initial=step, desc="train", disable=not is_chief,
               dynamic_ncols=True)
    try:
        with _StopFlag() as stop:
            while step < total_steps:
                batch = next(train_it)
                if decoder_only:  # the LM reads the target side only
                    batch = {k: v for k, v in batch.items() if k.startswith("targets")}
                state, metrics = step_fn(state, dp.put_batch(batch), rng_dev)
                pending.append(metrics)
                micro += 1
                if micro % accum:
                    continue
                step = micro // accum
                bar.update(1)
                due_eval = bool(config.eval_every_steps) and step % config.eval_every_steps == 0
                due_ckpt = step % config.checkpoint_every_steps == 0 or step == total_steps
                stopping = stop.signum is not None
                if (step % config.log_every_steps == 0 or due_eval or due_ckpt or stopping
                        or step == first_step + 1):
                    rows = [dp.metrics(m) for m in pending]  # waits for the device
                    pending.clear()
                    throughput.sync(sum(r["tokens"] + r["src_tokens"] for r in rows))
                    last_train = _mean_metrics(rows)
                    if not all(math.isfinite(last_train[k]) for k in ("loss", "grad_norm")):
                        checkpointer.wait()
                        raise TrainingDivergedError(_diverged_message(
                            f"the loss ({last_train['loss']})", step, checkpointer))
                    last_train["tokens_per_s"] = throughput.rate
                    if is_chief:
                        history.add(step, "train", last_train)
                        writer.scalars(step, "train", last_train)
                    bar.set_postfix(loss=f"{last_train['loss']:.3f}",
                                    tok_s=f"{throughput.rate:.0f}", refresh=False)
                if due_ckpt or stopping:
                    save(step)
                if stopping:
                    interrupted = True
                    break
                if due_eval:
                    last_eval = (step, run_eval(step, config.data.eval_split,
                                                config.eval_num_sentences))
                    bar.write(f"step {step}: {_fmt(last_eval[1])}")
                if due_ckpt or due_eval:
                    throughput.restart()
    finally:
        bar.close()
        checkpointer.wait()
    summary: dict = {
        "workdir": workdir,
        "step": step,
        "interrupted": interrupted,
        "train": last_train,
        "train_tokens_per_s": throughput.rate,
        "train_seconds": throughput.seconds,
    }
    try:
        if not interrupted:
            if last_eval is None or last_eval[0] != step:
                last_eval = (step, run_eval(step, config.data.eval_split,
                                            config.eval_num_sentences))
            summary["eval"] = last_eval[1]
            summary.update(_final_evaluation(config, workdir, step, run_eval, checkpointer))
    finally:
        checkpointer.close()
        summary["wall_seconds"] = time.perf_counter() - wall_start
        if is_chief:
            reporting.write_json(os.path.join(workdir, reporting.SUMMARY_FILE), summary)
            with contextlib.suppress(Exception):  # a plot must never fail a finished run
                reporting.plot_learning_curve(
                    history, os.path.join(workdir, reporting.CURVE_FILE), metric_names)
        writer.close()
    return summary


def _final_evaluation(config, workdir, step, run_eval, checkpointer) -> dict:
    """Test-split metrics on all its sentences; the same for averaged checkpoints."""
    out: dict = {}
    test_split = config.data.test_split
    if test_split:
        out["test"] = run_eval(step, test_split, -1)
    if config.average_last > 1 and len(checkpointer.all_steps()) > 1:
        path, steps = average_into_workdir(workdir, config.average_last)
        out["averaged"] = {"steps": steps, "path": path}
        if test_split:
            params = load_params(path)
            out["averaged"]["test"] = run_eval(step, test_split, -1, params=params,
                                               tag=f"{test_split}_averaged")
    return out


def _diverged_message(what: str, step: int, checkpointer: Checkpointer) -> str:
    last = checkpointer.latest_step()
    where = (f"the last good checkpoint is step {last} in {checkpointer.directory}"
             if last is not None else "no checkpoint was written before")
    return (f"training diverged: {what} is not finite at step {step}; {where}. Lower "
            "optimizer.learning_rate (or raise optimizer.warmup_steps / set "
            "optimizer.clip_norm) and run again; it resumes from that checkpoint.")


def _fmt(metrics: dict) -> str:
    return ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, float))
