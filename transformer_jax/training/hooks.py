"""What the training loop does between updates, one hook per concern.

After every optimizer update the loop (``training.loop``) asks each hook whether it is due;
when one that needs fresh metrics is, the loop first fetches and logs the training metrics
(the devices are idle after that, so timings and evaluations see finished work), then calls
the due hooks in order. A hook reads and updates the :class:`~transformer_jax.training
.session.Session` it is given, and nothing else::

    class Hook(Protocol):
        needs_metrics: bool
        def due(self, session, stopping: bool) -> bool: ...
        def __call__(self, session, stopping: bool) -> None: ...

``stopping`` is True on the last update of a run stopped early (a signal, the time limit).
The default hooks, in order: :class:`WarnDropped`, :class:`FitToTime`,
:class:`SaveCheckpoint`, :class:`Evaluate`.
"""

from __future__ import annotations

import logging
from typing import Protocol

import jax
import jax.numpy as jnp
from tqdm.auto import tqdm

from transformer_jax.errors import TrainingDivergedError
from transformer_jax.parallel import StopVote
from transformer_jax.training.budget import fit_num_train_steps
from transformer_jax.training.session import Session

__all__ = [
    "Evaluate",
    "FitToTime",
    "Hook",
    "SaveCheckpoint",
    "WarnDropped",
    "default_hooks",
    "diverged_message",
    "evaluate",
    "save",
]

log = logging.getLogger(__name__)


class Hook(Protocol):
    """One concern of the loop between updates (see the module docstring)."""

    needs_metrics: bool  # the loop fetches and logs the training metrics before calling it

    def due(self, session: Session, stopping: bool) -> bool: ...

    def __call__(self, session: Session, stopping: bool) -> None: ...


class WarnDropped:
    """Early in the run, a warning when training pairs were dropped (too long, or outside
    ``data.max_length_ratio``), so a long run is not wasted on half the data."""

    needs_metrics = False

    def due(self, session: Session, stopping: bool) -> bool:
        p = session.progress
        return p.step == p.first_step + session.config.log_every_steps

    def __call__(self, session: Session, stopping: bool) -> None:
        warn_dropped(session)


class FitToTime:
    """``fit_steps_to_time``: at the first update after the warm-up that follows a timed one
    (the first update of a process compiles and is not timed), lower ``num_train_steps`` to
    the updates that fit in the time left (all processes agree on the smallest count) and
    rebuild the schedule to span them."""

    needs_metrics = True

    def __init__(self, vote: StopVote):
        self.vote = vote

    def due(self, session: Session, stopping: bool) -> bool:
        p, config = session.progress, session.config
        return (not stopping and config.fit_steps_to_time and p.fitted_steps is None
                and p.step >= max(int(config.optimizer.warmup_steps), p.first_step + 2))

    def __call__(self, session: Session, stopping: bool) -> None:
        p, config = session.progress, session.config
        per_update = session.throughput.seconds_per_update
        left = session.budget.seconds_left()
        asked = p.num_train_steps
        steps = self.vote.agree_min(fit_num_train_steps(p.step, per_update, left, asked))
        session.run = session.run.with_num_train_steps(steps)
        p.num_train_steps = p.fitted_steps = steps
        message = (f"fit_steps_to_time: {per_update:.3f} s per update and "
                   f"{left / 60:.1f} of max_train_minutes={config.max_train_minutes:g} left "
                   f"at update {p.step}: training for {steps} updates (num_train_steps="
                   f"{asked})")
        log.info(message)
        tqdm.write(message)


class SaveCheckpoint:
    """A checkpoint every ``checkpoint_every_steps``, at the last update, and when stopping."""

    needs_metrics = True

    def due(self, session: Session, stopping: bool) -> bool:
        p = session.progress
        return (stopping or p.step % session.config.checkpoint_every_steps == 0
                or p.step == p.num_train_steps)

    def __call__(self, session: Session, stopping: bool) -> None:
        save(session)
        session.throughput.restart()


class Evaluate:
    """An evaluation of the eval split every ``eval_every_steps`` (not when stopping)."""

    needs_metrics = True

    def due(self, session: Session, stopping: bool) -> bool:
        every = session.config.eval_every_steps
        return not stopping and bool(every) and session.progress.step % every == 0

    def __call__(self, session: Session, stopping: bool) -> None:
        config, p = session.config, session.progress
        p.last_eval = (p.step, evaluate(session, config.data.eval_split,
                                        config.eval_num_sentences))
        tqdm.write(f"step {p.step}: {_fmt(p.last_eval[1])}")
        session.throughput.restart()


def default_hooks(vote: StopVote) -> list[Hook]:
    """The trainer's hooks, in the order they run (``vote`` lets the processes agree)."""
    return [WarnDropped(), FitToTime(vote), SaveCheckpoint(), Evaluate()]


# ---------------------------------------------------------------------------- the actions
def warn_dropped(session: Session) -> None:
    stats = session.prepared.stats
    if stats.dropped_train_ids:  # too long, or outside data.max_length_ratio
        log.warning("%s (data.max_length=%d); raise data.max_length to train on them.",
                    stats.dropped_summary(), session.config.data.max_length)


@jax.jit
def _all_finite(params) -> jax.Array:
    leaves = jax.tree_util.tree_leaves(params)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def save(session: Session) -> None:
    """Checkpoint the current state (every process takes part)."""
    p = session.progress
    view = session.strategy.get_state(p.state)  # global arrays orbax saves from every process
    if not bool(_all_finite(view.params)):
        raise TrainingDivergedError(diverged_message("parameters", p.step, session))
    extra = {} if p.fitted_steps is None else {"fitted_num_train_steps": p.fitted_steps}
    session.checkpointer.save(p.step, view, rng=p.rng, data_state=session.train_it.get_state(),
                              config=session.config.to_dict(),
                              tokenizer=session.tokenizer_ref, extra=extra)


def evaluate(session: Session, split: str, num_sentences: int, *, params=None,
             tag: str | None = None) -> dict:
    """Metrics of ``params`` (default: the current ones) on ``split``, logged as ``tag``."""
    p = session.progress
    params = session.strategy.get_state(p.state).params if params is None else params
    metrics = session.evaluator.evaluate(params, split, num_sentences)
    session.log_metrics(tag or ("eval" if split == session.config.data.eval_split else split),
                        metrics)
    return metrics


def diverged_message(what: str, step: int, session: Session) -> str:
    checkpointer = session.checkpointer
    last = checkpointer.latest_step()
    where = (f"the last good checkpoint is step {last} in {checkpointer.directory}"
             if last is not None else "no checkpoint was written before")
    return (f"training diverged: {what} is not finite at step {step}; {where}. Lower "
            "optimizer.learning_rate (or raise optimizer.warmup_steps / set "
            "optimizer.clip_norm) and run again; it resumes from that checkpoint.")


def _fmt(metrics: dict) -> str:
    return ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, float))
