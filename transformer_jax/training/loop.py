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

An error on one process of several where the others cannot see it (its training batches,
process 0's metric writes: a ``session.Failure``) must not leave the others waiting in the
next collective until the heartbeat timeout. The process keeps taking part, on its last
batch again (:class:`Feed`), and votes ``FAILED`` in the stop vote that ends every update;
once that vote is read (at the next update, or at once where the loop waits for the devices
anyway: before logging and the hooks), every process stops: the failed one with its own
error, the others with :class:`ProcessFailedError` naming it (:func:`raise_failure`). No
update made with a stand-in batch is logged, saved or evaluated. The start (first batch) and
the end of training and of :func:`finish` agree once more.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Sequence
from typing import NoReturn

import jax
from tqdm.auto import tqdm

import transformer_jax.training.evaluate as evaluate_lib
import transformer_jax.training.reporting as reporting
from transformer_jax.errors import ProcessFailedError, TrainingDivergedError
from transformer_jax.parallel import StopVote, agree, first_failure, initialize
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

__all__ = ["Feed", "finish", "raise_failure", "stop_if_failed", "train", "train_and_evaluate"]

log = logging.getLogger(__name__)

# Reasons to stop early, agreed across processes by StopVote (the largest wins).
OUT_OF_TIME = 1  # max_train_minutes reached: checkpoint, then finish as usual
SIGNALLED = 2  # SIGTERM/SIGINT: checkpoint and exit (resume later)
FAILED = 3  # a process failed (session.Failure): every process raises, nothing is saved


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
    signal to any process, a failed process); every process stops after the same update.
    After every update the due ``hooks`` run (default: ``hooks.default_hooks``)."""
    p = session.progress
    accum = int(session.config.optimizer.grad_accum_steps)
    vote = StopVote(session.strategy.devices)
    hooks = default_hooks(vote) if hooks is None else list(hooks)
    feed = Feed(session)
    bar = tqdm(total=p.num_train_steps, initial=p.step, desc="train",
               disable=not session.is_chief, dynamic_ncols=True)
    try:
        with session.signals as signals:
            while p.step < p.num_train_steps:
                p.state, metrics = session.run.train_step(p.state, feed(), p.rng_dev)
                p.pending.append(metrics)
                p.micro += 1
                if p.micro % accum:
                    continue
                p.step = p.micro // accum
                bar.update(1)
                reason = vote.vote(FAILED if session.failure.error is not None
                                   else SIGNALLED if signals.signum is not None
                                   else OUT_OF_TIME if session.budget.exhausted() else 0)
                after_update(session, hooks, bar, vote, reason)
                bar.total = p.num_train_steps
                if reason:
                    p.interrupted, p.out_of_time = reason == SIGNALLED, reason == OUT_OF_TIME
                    break
            stop_if_failed(session)  # in the hooks of the last update
    finally:
        bar.close()
        session.checkpointer.wait()
    if p.out_of_time:
        log.warning("max_train_minutes=%s reached after update %d of %d; finishing there.",
                    session.config.max_train_minutes, p.step, p.num_train_steps)
    warn_dropped(session)


class Feed:
    """The placed training batches. Once this process failed (its ``Failure``: several
    processes only) it gives the last batch again, so that the process keeps taking part in
    the steps until the stop vote has been read. The first call agrees on the first batch
    (a collective), so a failed process always has a last one."""

    def __init__(self, session: Session):
        self.session, self.batch, self.first = session, None, True

    def __call__(self):
        s = self.session
        if s.failure.error is None:
            try:
                self.batch = s.strategy.put_batch(next(s.train_it))
            except Exception as err:
                if not s.failure.record(err, s.progress.step + 1):
                    raise
        if self.first:
            self.first = False
            stop_if_failed(s)
        return self.batch


def after_update(session: Session, hooks: Sequence[Hook], bar, vote: StopVote,
                 reason: int) -> None:
    """Log the training metrics when due (their cadence, the first update, a stop) or when
    a due hook needs them; then run the due hooks in order. Where that waits for the devices
    anyway, this update's stop vote is read first: when a process failed, every process
    stops before the update is logged, saved or evaluated."""
    p, config = session.progress, session.config
    stopping = bool(reason)
    due = [hook for hook in hooks if hook.due(session, stopping)]
    logging_now = (p.step % config.log_every_steps == 0 or p.step == p.first_step + 1
                   or stopping or any(hook.needs_metrics for hook in due))
    if reason == FAILED or (logging_now and vote.current() == FAILED):
        raise_failure(session)
    if logging_now:
        log_train(session, bar)
    for hook in due:
        hook(session, stopping)


def stop_if_failed(session: Session) -> None:
    """Every process stops (:func:`raise_failure`) when one has a ``Failure``; a collective:
    every process calls it at the same point."""
    if max(agree(FAILED if session.failure.error is not None else 0)) == FAILED:
        raise_failure(session)


def raise_failure(session: Session) -> NoReturn:
    """Once every process agreed that one failed: that one raises its own error, the others
    :class:`ProcessFailedError` with the first failed process's message."""
    failure, checkpointer = session.failure, session.checkpointer
    mine = (None if failure.error is None
            else f"at update {failure.update}: {failure.message()}")
    index, message = first_failure(mine)  # every process's, in one collective
    if failure.error is not None:
        raise failure.error
    last = checkpointer.latest_step()
    kept = (f"the checkpoints written before stay valid (the newest is step {last} in "
            f"{checkpointer.directory}); once the cause is fixed the same command resumes "
            "from it" if last is not None else "no checkpoint was written before")
    raise ProcessFailedError(f"process {index} of {jax.process_count()} failed {message}; "
                             f"every process stopped, {kept}.")


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
    session.log_metrics("train", last)
    bar.set_postfix(loss=f"{last['loss']:.3f}", tok_s=f"{throughput.rate:.0f}", refresh=False)


def finish(session: Session) -> dict:
    """Final evaluation (unless interrupted), ``summary.json`` and the learning curve; then
    every process stops alike if process 0 failed to write them (:func:`stop_if_failed`)."""
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
        # an error below is this process's Failure (several processes), so that all stop alike
        session.failure.attempt(session.checkpointer.close, p.step)
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
            session.failure.attempt(lambda: reporting.write_json(
                os.path.join(session.workdir, reporting.SUMMARY_FILE), summary), p.step)
            with contextlib.suppress(Exception):  # a plot must never fail a finished run
                reporting.plot_learning_curve(
                    session.history, os.path.join(session.workdir, reporting.CURVE_FILE),
                    session.metric_names)
        session.failure.attempt(session.writer.close, p.step)
        session.release()  # the work directory's lock
    stop_if_failed(session)  # process 0's writes since the last update: all stop alike
    return summary
