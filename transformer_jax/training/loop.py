"""The main job: ``train_and_evaluate(config, workdir)``.

Order of work: validate the config, prepare data and tokenizer (the tokenizer's vocabulary
size becomes ``model.vocab_size``), build the model and optimizer, resume from the newest
checkpoint in ``workdir`` if there is one, then train with periodic logging, evaluation and
checkpoints. At the end: final evaluation (eval and test split), optional checkpoint
averaging, ``summary.json`` and ``learning_curve.png`` in the work directory.

The work is done by a :class:`Trainer` (``setup`` -> ``train`` -> ``finish``) that drives any
``parallel.Parallel`` (none / pmap / shard_map / sharded) the same way.

SIGTERM / SIGINT to any process: every process finishes the same update, a checkpoint is
written and the function returns normally (``summary["interrupted"] = True``). A NaN/inf loss
raises :class:`TrainingDivergedError`; the checkpoints written before stay valid.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import math
import os
import shutil
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
from transformer_jax.nn import build_model, split_model
from transformer_jax.runtime import StopFlag
from transformer_jax.training.budget import Throughput, fit_num_train_steps
from transformer_jax.training.checkpoint import Checkpointer
from transformer_jax.training.defaults import parse_metrics, validate_config
from transformer_jax.training.distributed import StopVote, chief_first
from transformer_jax.training.optim import make_optimizer
from transformer_jax.training.parallel import Parallel
from transformer_jax.training.sharding import make_parallel
from transformer_jax.training.step import create_train_state, train_step

__all__ = ["Trainer", "train_and_evaluate"]

log = logging.getLogger(__name__)


# Reasons to stop early, agreed across processes by StopVote (the largest wins).
_OUT_OF_TIME = 1  # max_train_minutes reached: checkpoint, then finish as usual
_SIGNALLED = 2  # SIGTERM/SIGINT: checkpoint and exit (resume later)


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
    with open(prepared.tokenizer_path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    return {"path": os.path.abspath(prepared.tokenizer_path), "sha256": digest}


def _local_int(x) -> int:
    """A replicated scalar (host value or jax.Array, also one spanning processes) as int."""
    if isinstance(x, jax.Array):
        x = x.addressable_shards[0].data
    return int(jax.device_get(x))


@functools.partial(jax.jit)
def _all_finite(params) -> jax.Array:
    leaves = jax.tree_util.tree_leaves(params)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


class _Keys:
    """An iterator of batches that keeps the keys starting with ``prefix`` (None: all)."""

    def __init__(self, iterator, prefix: str | None):
        self._it, self._prefix = iterator, prefix

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        batch = next(self._it)
        if self._prefix is None:
            return batch
        return {k: v for k, v in batch.items() if k.startswith(self._prefix)}

    def get_state(self):
        return self._it.get_state()

    def set_state(self, state) -> None:
        self._it.set_state(state)


def train_batches(prepared, config, dp: Parallel) -> _Keys:
    """The training batches of this process (the one place the loop builds its iterator).

    This process materialises row block ``index`` of ``count`` (``Parallel.data_shard``) of
    every global batch; the global batch sequence, and the iterator state saved with each
    checkpoint, depend only on the data, the seed and the global batch size
    (``data/streams.py``), so a run resumes on any number of processes or devices.
    """
    index, count = dp.data_shard()
    iterator = data_lib.train_iterator(prepared, config.batch_size, config.seed,
                                       process_index=index, process_count=count)
    prefix = "targets" if config.model_kind == "decoder_only" else None  # an LM reads targets
    return _Keys(iterator, prefix)


class Trainer:
    """One training run: ``setup()`` -> ``train()`` -> ``finish()`` (``run()`` does all three).

    Args:
      config: ConfigDict/dict of training keys (see ``transformer_jax.training.defaults``).
      workdir: run directory (created); holds tokenizer, checkpoints, logs and summary.
    """

    def __init__(self, config, workdir: str):
        self.wall_start = time.perf_counter()
        self.config = validate_config(config)
        self.workdir = os.path.abspath(workdir)
        self.is_chief = jax.process_index() == 0
        self.metric_names = parse_metrics(self.config.eval_metrics)
        self.step = 0
        self.interrupted = False
        self.out_of_time = False  # stopped by max_train_minutes (then finished normally)
        self.fitted_steps: int | None = None  # num_train_steps fitted to max_train_minutes
        self.last_train: dict[str, float] = {}
        self.last_eval: tuple[int, dict] | None = None
        self.throughput = Throughput()
        self.signals = StopFlag()

    def run(self) -> dict:
        with self.signals:
            self.setup()
            self.train()
        return self.finish()

    # ------------------------------------------------------------------------ setup
    def setup(self) -> None:
        """Check the config, prepare data, build model and optimizer, resume, compile."""
        config = self.config
        self.dp = make_parallel(config)
        self.dp.check_batch_size(config.batch_size)
        self.eval_batch_size = config.eval_batch_size or config.batch_size
        self.dp.check_batch_size(self.eval_batch_size)
        _model_config(config, config.data.vocab_size)  # model errors before anything is written
        self.prepared = self._prepare_data()
        self.model_cfg = _model_config(config, self.prepared.vocab_size)
        config.model.vocab_size = self.model_cfg.vocab_size
        self.config_dict = config.to_dict()
        self.checkpointer = Checkpointer(self.workdir, keep=config.keep_checkpoints)
        latest = self.checkpointer.latest_meta()  # fail before touching anything if the run
        if latest is not None:  # cannot continue
            check_compatible(latest[1].get("config", {}), self.config_dict, self.workdir)
        # A params-only checkpoint (a model imported by interop.marian) starts a fine-tuning run.
        self.init_params_step = latest[0] if latest and latest[1].get("params_only") else None
        if self.is_chief:
            reporting.write_json(os.path.join(self.workdir, reporting.CONFIG_FILE),
                                 self.config_dict)
        self.train_it = train_batches(self.prepared, config, self.dp)
        self.tokenizer_ref = _tokenizer_ref(self.prepared)
        self._build_and_restore()
        self._compile()

    def _prepare_data(self):
        created = _make_workdir(self.workdir)
        try:
            return chief_first(lambda: data_lib.prepare(self.config.data, self.workdir),
                               "prepare", timeout_s=self.config.distributed.barrier_timeout)
        except Exception:
            if created and self.is_chief:  # bad data: no half-prepared work directory
                shutil.rmtree(self.workdir, ignore_errors=True)
            raise

    def _build_and_restore(self) -> None:
        """Model and optimizer; the state restored into its shardings, or initialised there."""
        config, opt = self.config, self.config.optimizer

        def make():
            return build_model(config.model_kind, self.model_cfg, nnx.Rngs(config.seed))

        abstract = nnx.eval_shape(make)  # nothing allocated
        self.dp.prepare(abstract)  # parameter shardings from the logical axis names
        self.model_def, abstract_params = split_model(abstract)
        self.accum = int(opt.grad_accum_steps)
        self.tx, self.schedule = make_optimizer(opt, d_model=self.model_cfg.d_model,
                                                num_train_steps=config.num_train_steps)
        template = jax.eval_shape(lambda p: create_train_state(p, self.tx), abstract_params)
        shardings = self.dp.state_shardings(template)
        # The newest checkpoint that can be read; damaged newer ones are set aside.
        restored = None
        if self.init_params_step is None:
            restored = self.checkpointer.restore_latest(template, config=self.config_dict,
                                                        shardings=shardings)
        self.rng = jax.random.fold_in(jax.random.key(config.seed), 1)  # dropout stream
        self.resumed_step = 0
        if self.init_params_step is not None:
            params = load_params(self.workdir, self.init_params_step)
            state = jax.jit(lambda p: create_train_state(p, self.tx),
                            out_shardings=shardings)(params)
        elif restored is None:
            state = jax.jit(lambda: create_train_state(split_model(make())[1], self.tx),
                            out_shardings=shardings)()
        else:
            state, self.rng = restored["state"], restored["rng"]
            if restored["data_state"] is not None:
                self.train_it.set_state(restored["data_state"])
            self.resumed_step = int(restored["meta"]["step"])
            fitted = restored["meta"].get("fitted_num_train_steps")
            if fitted is not None and config.fit_steps_to_time:
                self._set_num_train_steps(int(fitted))  # the schedule the run started with
            log.info("resuming from step %d", self.resumed_step)
            print(f"resuming from step {self.resumed_step}", flush=True)
        self.micro = _local_int(state.step)
        self.state = self.dp.put_state(state)
        del state, restored
        self.rng_dev = self.dp.put_rng(self.rng)

    def _make_step_fn(self) -> None:
        """The jitted update for ``self.tx`` (compiled at its first call)."""
        per_device = functools.partial(
            train_step, model_def=self.model_def, tx=self.tx, schedule=self.schedule,
            label_smoothing=float(self.config.optimizer.label_smoothing),
            dropout=self.model_cfg.uses_dropout,
            grad_accum_steps=self.accum, pad_id=self.model_cfg.pad_id,
        )
        self.step_fn = self.dp.train_step(per_device)

    def _set_num_train_steps(self, steps: int) -> None:
        """Train for ``steps`` updates: the optimizer's schedule is rebuilt to span them (its
        state's structure does not depend on the length) and the step re-made."""
        self.fitted_steps = steps
        self.config.num_train_steps = self.config_dict["num_train_steps"] = steps
        self.tx, self.schedule = make_optimizer(self.config.optimizer,
                                                d_model=self.model_cfg.d_model,
                                                num_train_steps=steps)
        if hasattr(self, "step_fn"):
            self._make_step_fn()

    def _compile(self) -> None:
        config, opt, cfg = self.config, self.config.optimizer, self.model_cfg
        self._make_step_fn()
        self.evaluator = evaluate.Evaluator(
            self.dp, self.model_def, self.prepared, label_smoothing=float(opt.label_smoothing),
            batch_size=self.eval_batch_size, metric_names=self.metric_names,
            beam_size=config.eval_beam_size, length_penalty=config.eval_length_penalty,
            pad_id=cfg.pad_id,
        )
        self.history = reporting.History(self.workdir, self.resumed_step)
        self.writer = reporting.MetricWriter(self.workdir, enabled=self.is_chief)

    # ------------------------------------------------------------------------ train
    def train(self) -> None:
        """Run updates until ``num_train_steps``, ``max_train_minutes`` or an agreed stop (a
        signal to any process); every process stops after the same update."""
        self.step = self.first_step = self.micro // self.accum
        self.pending: list = []
        self.bar = tqdm(total=self.config.num_train_steps, initial=self.step, desc="train",
                        disable=not self.is_chief, dynamic_ncols=True)
        vote = self.vote = StopVote(self.dp.devices)
        try:
            with self.signals as signals:
                while self.step < self.config.num_train_steps:
                    batch = self.dp.put_batch(next(self.train_it))
                    self.state, metrics = self.step_fn(self.state, batch, self.rng_dev)
                    self.pending.append(metrics)
                    self.micro += 1
                    if self.micro % self.accum:
                        continue
                    self.step = self.micro // self.accum
                    self.bar.update(1)
                    reason = vote.vote(_SIGNALLED if signals.signum is not None
                                       else _OUT_OF_TIME if self._out_of_time() else 0)
                    if self._after_update(stopping=bool(reason)):
                        self.interrupted = reason == _SIGNALLED
                        self.out_of_time = reason == _OUT_OF_TIME
                        break
        finally:
            self.bar.close()
            self.checkpointer.wait()
        if self.out_of_time:
            log.warning("max_train_minutes=%s reached after update %d of %d; finishing there.",
                        self.config.max_train_minutes, self.step, self.config.num_train_steps)
        self._warn_dropped()

    def _warn_dropped(self) -> None:
        if self.prepared.stats.dropped_train_ids:  # too long, or outside data.max_length_ratio
            log.warning("%s (data.max_length=%d); raise data.max_length to train on them.",
                        self.prepared.stats.dropped_summary(), self.config.data.max_length)

    def _seconds_left(self) -> float:
        """Time until max_train_minutes (counted from the start of the process)."""
        return (60.0 * float(self.config.max_train_minutes)
                - (time.perf_counter() - self.wall_start))

    def _out_of_time(self) -> bool:
        return float(self.config.max_train_minutes) > 0 and self._seconds_left() <= 0

    def _fit_due(self) -> bool:
        """fit_steps_to_time: fit at the first update after the warm-up that follows a timed
        one (the first update of a process compiles and is not timed)."""
        return (self.config.fit_steps_to_time and self.fitted_steps is None
                and self.step >= max(int(self.config.optimizer.warmup_steps),
                                     self.first_step + 2))

    def _fit_steps_to_time(self) -> None:
        """Lower num_train_steps to the updates that fit in the time left (all processes
        agree on the smallest count); called right after a metrics fetch, so the timing is of
        finished updates."""
        config = self.config
        per_update = self.throughput.seconds_per_update
        left = self._seconds_left()
        asked = config.num_train_steps
        steps = self.vote.agree_min(fit_num_train_steps(self.step, per_update, left, asked))
        self._set_num_train_steps(steps)
        self.bar.total = steps
        message = (f"fit_steps_to_time: {per_update:.3f} s per update and "
                   f"{left / 60:.1f} of max_train_minutes={config.max_train_minutes:g} left "
                   f"at update {self.step}: training for {steps} updates (num_train_steps="
                   f"{asked})")
        log.info(message)
        self.bar.write(message)

    def _after_update(self, stopping: bool) -> bool:
        """Logging, checkpoint and evaluation due after this update; True to stop now."""
        config, step = self.config, self.step
        due_eval = bool(config.eval_every_steps) and step % config.eval_every_steps == 0
        due_ckpt = step % config.checkpoint_every_steps == 0 or step == config.num_train_steps
        fit_now = not stopping and self._fit_due()
        if (step % config.log_every_steps == 0 or due_eval or due_ckpt or stopping or fit_now
                or step == self.first_step + 1):
            self._log_train()
        if step == self.first_step + config.log_every_steps:
            self._warn_dropped()  # early, so a long run is not wasted on half the data
        if fit_now:
            self._fit_steps_to_time()
        if due_ckpt or stopping:
            self.save()
        if stopping:
            return True
        if due_eval:
            self.last_eval = (step, self.evaluate(config.data.eval_split,
                                                  config.eval_num_sentences))
            self.bar.write(f"step {step}: {_fmt(self.last_eval[1])}")
        if due_ckpt or due_eval:
            self.throughput.restart()
        return False

    def _log_train(self) -> None:
        rows = [self.dp.metrics(m) for m in self.pending]  # waits for the device
        self.pending.clear()
        self.throughput.sync(sum(r["tokens"] + r["src_tokens"] for r in rows),
                             len(rows) / self.accum)
        last = self.last_train = reporting.mean_metrics(rows)
        if not all(math.isfinite(last[k]) for k in ("loss", "grad_norm")):
            self.checkpointer.wait()  # the same numbers on every process: all stop here
            raise TrainingDivergedError(_diverged_message(
                f"the loss ({last['loss']})", self.step, self.checkpointer))
        last["tokens_per_s"] = self.throughput.rate
        if self.is_chief:
            self.history.add(self.step, "train", last)
            self.writer.scalars(self.step, "train", last)
        self.bar.set_postfix(loss=f"{last['loss']:.3f}", tok_s=f"{self.throughput.rate:.0f}",
                             refresh=False)

    def save(self) -> None:
        """Checkpoint the current state (every process takes part)."""
        view = self.dp.get_state(self.state)  # global arrays orbax saves from every process
        if not bool(_all_finite(view.params)):
            raise TrainingDivergedError(_diverged_message("parameters", self.step,
                                                          self.checkpointer))
        extra = {} if self.fitted_steps is None else {"fitted_num_train_steps": self.fitted_steps}
        self.checkpointer.save(self.step, view, rng=self.rng, data_state=self.train_it.get_state(),
                               config=self.config_dict, tokenizer=self.tokenizer_ref, extra=extra)

    def evaluate(self, split: str, num_sentences: int, *, params=None, tag=None) -> dict:
        params = self.dp.get_state(self.state).params if params is None else params
        metrics = self.evaluator.evaluate(params, split, num_sentences)
        tag = tag or ("eval" if split == self.config.data.eval_split else split)
        if self.is_chief:
            self.history.add(self.step, tag, metrics)
            self.writer.scalars(self.step, tag, metrics)
        return metrics

    # ------------------------------------------------------------------------ finish
    def finish(self) -> dict:
        """Final evaluation (unless interrupted), ``summary.json`` and the learning curve."""
        summary: dict = {
            "workdir": self.workdir,
            "step": self.step,
            "num_train_steps": self.config.num_train_steps,
            "interrupted": self.interrupted,
            "stopped_by_time_limit": self.out_of_time,
            "train": self.last_train,
            "train_tokens_per_s": self.throughput.rate,
            "train_seconds": self.throughput.seconds,
            "train_pairs_dropped": len(self.prepared.stats.dropped_train_ids),
        }
        try:
            if not self.interrupted:
                if self.last_eval is None or self.last_eval[0] != self.step:
                    self.last_eval = (self.step, self.evaluate(self.config.data.eval_split,
                                                               self.config.eval_num_sentences))
                summary["eval"] = self.last_eval[1]
                summary.update(evaluate.final_evaluation(self.config, self.workdir, self.evaluate,
                                                          self.checkpointer))
        finally:
            self.checkpointer.close()
            summary["wall_seconds"] = time.perf_counter() - self.wall_start
            if self.is_chief:
                reporting.write_json(os.path.join(self.workdir, reporting.SUMMARY_FILE), summary)
                with contextlib.suppress(Exception):  # a plot must never fail a finished run
                    reporting.plot_learning_curve(
                        self.history, os.path.join(self.workdir, reporting.CURVE_FILE),
                        self.metric_names)
            self.writer.close()
        return summary


def train_and_evaluate(config, workdir: str) -> dict:
    """Train (or resume), evaluate and write the run's outputs into ``workdir``.

    Args:
      config: ConfigDict/dict of training keys (see ``transformer_jax.training.defaults``);
        missing keys take their defaults, unknown keys raise ``ConfigError``.
      workdir: run directory (created); holds tokenizer, checkpoints, logs and summary.

    Returns:
      The summary dict also written to ``<workdir>/summary.json``.
    """
    return Trainer(config, workdir).run()


def _diverged_message(what: str, step: int, checkpointer: Checkpointer) -> str:
    last = checkpointer.latest_step()
    where = (f"the last good checkpoint is step {last} in {checkpointer.directory}"
             if last is not None else "no checkpoint was written before")
    return (f"training diverged: {what} is not finite at step {step}; {where}. Lower "
            "optimizer.learning_rate (or raise optimizer.warmup_steps / set "
            "optimizer.clip_norm) and run again; it resumes from that checkpoint.")


def _fmt(metrics: dict) -> str:
    return ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, float))
