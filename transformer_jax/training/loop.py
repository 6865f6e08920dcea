"""The main job: ``train_and_evaluate(config, workdir)``.

Order of work: validate the config (once), connect the processes of a multi-host job, set
up (``training.session.setup``: data and tokenizer, the run from ``training.build``, resume
from the newest checkpoint in ``workdir`` if there is one), train (:func:`train`: updates,
and after each the hooks of ``training.hooks``: logging, the time budget, checkpoints,
evaluation), finish (:func:`finish`: final evaluation on the eval and test splits, optional
checkpoint averaging, ``summary.json`` and ``learning_curve.png`` in the work directory).

SIGTERM / SIGINT to any process: every process finishes the same update, a checkpoint is
written and the function returns normally (``summary["interrupted"] = True``). A NaN/inf loss
raises :class:`TrainingDivergedError`; the checkpoints written before stay valid.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Sequence

from tqdm.auto import tqdm

import transformer_jax.training.evaluate as evaluate_lib
import transformer_jax.training.reporting as reporting
from transformer_jax.errors import TrainingDivergedError
from transformer_jax.parallel import StopVote, initialize
from transformer_jax.runtime import StopFlag
from transformer_jax.training.defaults import validate_config
from transformer_jax.training.hooks import (
    Hook,
    default_hooks,
    diverged_message,
    evaluate,
    warn_dropped,
)
from transformer_jax.training.session import Session, setup

__all__ = ["finish", "train", "train_and_evaluate"]

log = logging.getLogger(__name__)

# Reasons to stop early, agreed across processes by StopVote (the largest wins).
OUT_OF_TIME = 1  # max_train_minutes reached: checkpoint, then finish as usual
SIGNALLED = 2  # SIGTERM/SIGINT: checkpoint and exit (resume later)


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
    config = validate_config(config)  # every key, before anything touches the disk
    initialize(config.distributed)  # a multi-process job connects (no-op for one process)
    with StopFlag() as signals:  # also through finish: a late SIGTERM must not kill one
        session = setup(config, workdir, signals=signals, wall_start=wall_start)  # process
        try:
            train(session)
        except BaseException:
            session.release()  # the work directory's lock
            raise
        return finish(session)


def train(session: Session, hooks: Sequence[Hook] | None = None) -> None:
    """Run updates until ``num_train_steps``, ``max_train_minutes`` or an agreed stop (a
    signal to any process); every process stops after the same update. After every update
    the due ``hooks`` run (default: ``hooks.default_hooks``)."""
    p = session.progress
    accum = int(session.config.optimizer.grad_accum_steps)
    vote = StopVote(session.strategy.devices)
    hooks = default_hooks(vote) if hooks is None else list(hooks)
    bar = tqdm(total=p.num_train_steps, initial=p.step, desc="train",
               disable=not session.is_chief, dynamic_ncols=True)
    try:
        with session.signals as signals:
            while p.step < p.num_train_steps:
                batch = session.strategy.put_batch(next(session.train_it))
                p.state, metrics = session.run.train_step(p.state, batch, p.rng_dev)
                p.pending.append(metrics)
                p.micro += 1
                if p.micro % accum:
                    continue
                p.step = p.micro // accum
                bar.update(1)
                reason = vote.vote(SIGNALLED if signals.signum is not None
                                   else OUT_OF_TIME if session.budget.exhausted() else 0)
                after_update(session, hooks, bar, stopping=bool(reason))
                bar.total = p.num_train_steps
                if reason:
                    p.interrupted, p.out_of_time = reason == SIGNALLED, reason == OUT_OF_TIME
                    break
    finally:
        bar.close()
        session.checkpointer.wait()
    if p.out_of_time:
        log.warning("max_train_minutes=%s reached after update %d of %d; finishing there.",
                    session.config.max_train_minutes, p.step, p.num_train_steps)
    warn_dropped(session)


def after_update(session: Session, hooks: Sequence[Hook], bar, *, stopping: bool) -> None:
    """Log the training metrics when due (their cadence, the first update, a stop) or when
    a due hook needs them; then run the due hooks in order."""
    p, config = session.progress, session.config
    due = [hook for hook in hooks if hook.due(session, stopping)]
    if (p.step % config.log_every_steps == 0 or p.step == p.first_step + 1 or stopping
            or any(hook.needs_metrics for hook in due)):
        log_train(session, bar)
    for hook in due:
        hook(session, stopping)


def log_train(session: Session, bar) -> None:
    """Fetch the metrics of the updates since the last fetch (waits for the devices), check
    them for divergence and write them to the history, TensorBoard and the progress bar."""
    p, throughput = session.progress, session.throughput
    rows = [session.strategy.metrics(m) for m in p.pending]  # waits for the device
    p.pending.clear()
    accum = int(session.config.optimizer.grad_accum_steps)
    throughput.sync(sum(r["tokens"] + r["src_tokens"] for r in rows), len(rows) / accum)
    last = p.last_train = reporting.mean_metrics(rows)
    if not all(math.isfinite(last[k]) for k in ("loss", "grad_norm")):
        session.checkpointer.wait()  # the same numbers on every process: all stop here
        raise TrainingDivergedError(diverged_message(f"the loss ({last['loss']})", p.step,
                                                     session))
    last["tokens_per_s"] = throughput.rate
    if session.is_chief:
        session.history.add(p.step, "train", last)
        session.writer.scalars(p.step, "train", last)
    bar.set_postfix(loss=f"{last['loss']:.3f}", tok_s=f"{throughput.rate:.0f}", refresh=False)


def finish(session: Session) -> dict:
    """Final evaluation (unless interrupted), ``summary.json`` and the learning curve."""
    p, config = session.progress, session.config
    summary: dict = {
        "workdir": session.workdir,
        "step": p.step,
        "num_train_steps": p.num_train_steps,
        "interrupted": p.interrupted,
        "stopped_by_time_limit": p.out_of_time,
        "train": p.last_train,
        "train_tokens_per_s": session.throughput.rate,
        "train_seconds": session.throughput.seconds,
        "train_pairs_dropped": len(session.prepared.stats.dropped_train_ids),
        "params": session.run.param_counts(),  # total, and trainable (LoRA: adapters only)
    }
    try:
        if not p.interrupted:
            if p.last_eval is None or p.last_eval[0] != p.step:
                p.last_eval = (p.step, evaluate(session, config.data.eval_split,
                                                config.eval_num_sentences))
            summary["eval"] = p.last_eval[1]
            summary.update(evaluate_lib.final_evaluation(
                config, session.workdir,
                lambda split, n, **kw: evaluate(session, split, n, **kw),
                session.checkpointer))
    finally:
        session.checkpointer.close()
        # evaluation pairs whose source or target was cut to data.max_length, per split:
        # their scores are those of the cut sentences
        summary["eval_max_length"] = int(config.data.max_length)
        summary["eval_pairs_cut_to_max_length"] = {
            split: len(ids) for split, ids in sorted(
                session.prepared.stats.trimmed_eval_ids.items())}
        if session.signals.signum is not None and not p.interrupted:
            # after the last stop vote (final evaluation, averaging): every process finishes
            # alike; the last checkpoint is written already
            log.warning("signal %d arrived after the last update; finished the run first",
                        session.signals.signum)
            summary["late_signal"] = int(session.signals.signum)
        summary["wall_seconds"] = time.perf_counter() - session.budget.start
        if session.is_chief:
            reporting.write_json(os.path.join(session.workdir, reporting.SUMMARY_FILE), summary)
            with contextlib.suppress(Exception):  # a plot must never fail a finished run
                reporting.plot_learning_curve(
                    session.history, os.path.join(session.workdir, reporting.CURVE_FILE),
                    session.metric_names)
        session.writer.close()
        session.release()  # the work directory's lock
    return summary
