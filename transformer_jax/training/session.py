"""Setting up a training run: everything it holds, built in one place (:func:`setup`).

A :class:`Session` is the whole state of a run, in the open: what set-up built (the
:class:`~transformer_jax.training.build.Run`, the data, the checkpointer, the evaluator, the
writers) and the :class:`Progress` that the loop and its hooks advance. Nothing is set
elsewhere, so the loop (``training.loop``) and the hooks (``training.hooks``) read one object.

Order of set-up: the strategy checks the batch sizes and ``init_from`` is checked
(``training.init_from``; before anything is written), the work directory is created and
locked (``training.workdir``: one run at a time), a resume checks the tokenizer against its
checkpoint's, the data are prepared (the tokenizer's size becomes ``model.vocab_size``), the
run is built, the state is restored from the newest readable checkpoint, or started from the
weights of a fine-tuning's start, or initialised, and only then ``config.json`` records the
run.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import time
from collections.abc import Callable
from typing import Any

import jax
import ml_collections

import transformer_jax.training.reporting as reporting
from transformer_jax import data as data_lib
from transformer_jax.checkpoints import Checkpointer, check_compatible, load_params
from transformer_jax.errors import WorkdirError
from transformer_jax.parallel import Strategy, chief_first, from_chief, make_strategy
from transformer_jax.runtime import StopFlag
from transformer_jax.training.budget import Throughput, TimeBudget
from transformer_jax.training.build import Run, build_run
from transformer_jax.training.defaults import parse_metrics
from transformer_jax.training.evaluate import Evaluator
from transformer_jax.training.init_from import StartingPoint, starting_point
from transformer_jax.training.step import TrainState
from transformer_jax.training.workdir import (
    WorkdirLock,
    check_tokenizer,
    file_sha256,
    make_workdir,
)

__all__ = ["Failure", "Progress", "Session", "RunBatches", "setup"]

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Progress:
    """What changes while training; the loop and the hooks update it.

    Attributes:
      state: the train state, placed by the strategy.
      rng: the dropout key (host; saved with every checkpoint).
      rng_dev: ``rng`` placed for the compiled step.
      micro: micro-batches done (``train_step`` calls).
      step: optimizer updates done.
      first_step: the update this process started from (0, or the resumed one).
      resumed_step: the checkpoint step the run resumed from (0: a fresh start).
      num_train_steps: updates to run: configured, or fitted to the time limit.
      fitted_steps: the fitted count (``fit_steps_to_time``), None before the fit.
      pending: step metrics not fetched from the devices yet.
      last_train: the last logged training metrics.
      last_eval: ``(step, metrics)`` of the last evaluation.
      interrupted: stopped by a signal (checkpoint written, no final evaluation).
      out_of_time: stopped by ``max_train_minutes`` (then finished as usual).
    """

    state: TrainState
    rng: jax.Array
    rng_dev: jax.Array
    micro: int
    step: int
    first_step: int
    resumed_step: int
    num_train_steps: int
    fitted_steps: int | None = None
    pending: list = dataclasses.field(default_factory=list)
    last_train: dict = dataclasses.field(default_factory=dict)
    last_eval: tuple[int, dict] | None = None
    interrupted: bool = False
    out_of_time: bool = False


@dataclasses.dataclass
class Failure:
    """This process's first error where the other processes cannot see it (its training
    data, process 0's metric writes), kept until every process has agreed to stop
    (``training.loop``: the stop vote, then every process raises). With one process nothing
    is kept: the error is raised where it happens, as it is.

    Attributes:
      error: the error (None: none so far).
      update: the update it happened in.
    """

    error: Exception | None = None
    update: int = 0

    def record(self, error: Exception, update: int) -> bool:
        """Keep ``error`` (the first one) for the stop vote; False with one process (raise it)."""
        if jax.process_count() == 1:
            return False
        if self.error is None:
            self.error, self.update = error, update
            log.error("process %d of %d failed at update %d (%s); stopping every process",
                      jax.process_index(), jax.process_count(), update, self.message())
        return True

    def attempt(self, fn: Callable[[], Any], update: int) -> None:
        """``fn()``; its error is recorded (several processes) or raised (one process)."""
        try:
            fn()
        except Exception as err:
            if not self.record(err, update):
                raise

    def message(self) -> str:
        """The error as one line: its type and text."""
        return f"{type(self.error).__name__}: {' '.join(str(self.error).split())}"


@dataclasses.dataclass
class Session:
    """A training run: what :func:`setup` built and its :class:`Progress`.

    Attributes:
      config: the validated config as run (``model.vocab_size`` is the tokenizer's).
      workdir: absolute work directory.
      run: model, optimizer, strategy and compiled steps (``build_run``).
      prepared: the prepared data (``data.prepare``).
      train_it: this process's training batches (resumable).
      checkpointer: saves and restores ``<workdir>/checkpoints``.
      evaluator: loss and decoding metrics on a split.
      history, writer: ``history.jsonl`` and TensorBoard (process 0 writes them).
      throughput: measured update speed; budget: the time limit.
      signals: SIGTERM / Ctrl-C flag.
      tokenizer_ref: path and sha256 of the tokenizer, saved with every checkpoint.
      metric_names: decoding metrics of the evaluations.
      is_chief: this is process 0.
      progress: the state of the loop.
      lock: the work directory's lock (process 0 holds it until :meth:`release`).
      failure: this process's error that the other processes must hear of first.
    """

    config: ml_collections.ConfigDict
    workdir: str
    run: Run
    prepared: Any
    train_it: RunBatches
    checkpointer: Checkpointer
    evaluator: Evaluator
    history: reporting.History
    writer: reporting.MetricWriter
    throughput: Throughput
    budget: TimeBudget
    signals: StopFlag
    tokenizer_ref: dict
    metric_names: tuple[str, ...]
    is_chief: bool
    progress: Progress
    lock: WorkdirLock
    failure: Failure = dataclasses.field(default_factory=Failure)

    @property
    def strategy(self) -> Strategy:
        return self.run.strategy

    def release(self) -> None:
        """Let another run use the work directory (idempotent)."""
        self.lock.release()

    def log_metrics(self, tag: str, metrics: dict) -> None:
        """Process 0 adds ``metrics`` of the current update to the history and TensorBoard;
        an error there (a full disk) is this process's :class:`Failure`, raised once every
        process agreed to stop (with one process: at once)."""
        if self.is_chief:
            self.failure.attempt(lambda: self._write_metrics(tag, metrics), self.progress.step)

    def _write_metrics(self, tag: str, metrics: dict) -> None:
        self.history.add(self.progress.step, tag, metrics)
        self.writer.scalars(self.progress.step, tag, metrics)


class RunBatches:
    """This process's training batches, holding only the arrays the model reads.

    This process materialises row block ``index`` of ``count`` (``Strategy.data_shard``) of
    every global batch; the global batch sequence, and the iterator state saved with each
    checkpoint, depend only on the data, the seed and the global batch size
    (``data/streams.py``), so a run resumes on any number of processes or devices.
    """

    def __init__(self, prepared, run: Run):
        index, count = run.strategy.data_shard()
        self._it = data_lib.train_iterator(prepared, run.config.batch_size, run.config.seed,
                                           process_index=index, process_count=count)
        self._select = run.select

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        return self._select(next(self._it))

    def get_state(self):
        return self._it.get_state()

    def set_state(self, state) -> None:
        self._it.set_state(state)


def setup(config: ml_collections.ConfigDict, workdir: str, *, signals: StopFlag,
          wall_start: float | None = None) -> Session:
    """Prepare data, build the run, resume or initialise the state (module docstring).

    Args:
      config: a config from ``validate_config``.
      workdir: the run directory (created).
      signals: the SIGTERM / Ctrl-C flag of the run.
      wall_start: ``time.perf_counter()`` at the start of the process (the time limit
        counts from there; default now).
    """
    wall_start = time.perf_counter() if wall_start is None else wall_start
    workdir = os.path.abspath(workdir)
    strategy = make_strategy(config.parallelism, config.sharding)
    strategy.check_batch_size(config.batch_size)  # before anything is written
    eval_batch_size = config.eval_batch_size or config.batch_size
    strategy.check_batch_size(eval_batch_size)
    start = starting_point(config, workdir)  # None: fresh weights, a resume or an import
    is_chief = jax.process_index() == 0
    created = make_workdir(workdir)
    lock = WorkdirLock(workdir)
    try:
        _hold(lock, is_chief, config.distributed.barrier_timeout)
        checkpointer = Checkpointer(workdir, keep=config.keep_checkpoints,
                                    barrier_timeout_s=config.distributed.barrier_timeout)
        latest = checkpointer.latest_meta()  # fail before touching anything if the run
        if latest is not None:  # cannot continue
            check_tokenizer(workdir, *latest)
        prepared = _prepare_data(config, workdir, created, start if latest is None else None)
        run = build_run(config, vocab_size=prepared.vocab_size, strategy=strategy)
        if latest is not None:
            check_compatible(latest[1].get("config", {}), run.config.to_dict(), workdir)
        train_it = RunBatches(prepared, run)
        init_params = _initial_params(workdir, latest, start)
        run, progress = _start(run, checkpointer, train_it, init_params)

        def records():  # once the restore and the data state were accepted
            if is_chief and latest is None and start is not None:
                start.record(workdir, init_params)
            return _open_records(workdir, run.config, progress.resumed_step, is_chief)

        history, writer = chief_first(records, "records",
                                      timeout_s=config.distributed.barrier_timeout)
    except BaseException:
        lock.release()
        raise
    metric_names = parse_metrics(config.eval_metrics)
    return Session(
        config=run.config, workdir=workdir, run=run, prepared=prepared, train_it=train_it,
        checkpointer=checkpointer,
        evaluator=Evaluator.for_run(run, prepared, batch_size=eval_batch_size,
                                    metric_names=metric_names),
        history=history, writer=writer,
        throughput=Throughput(),
        budget=TimeBudget(float(config.max_train_minutes), wall_start),
        signals=signals, tokenizer_ref=_tokenizer_ref(prepared), metric_names=metric_names,
        is_chief=is_chief, progress=progress, lock=lock)


def _open_records(workdir: str, config, resumed_step: int, is_chief: bool):
    """The run's record (``config.json``), metric history and TensorBoard writer; process 0
    writes them (``chief_first``: its error, a full disk, reaches every process)."""
    if is_chief:
        reporting.write_json(os.path.join(workdir, reporting.CONFIG_FILE), config.to_dict())
    return (reporting.History(workdir, resumed_step, enabled=is_chief),
            reporting.MetricWriter(workdir, enabled=is_chief))


def _hold(lock: WorkdirLock, is_chief: bool, timeout_s: float) -> None:
    """Process 0 takes the work directory's lock; every process fails alike if it cannot."""
    refused = from_chief("workdir-lock", lambda: lock.acquire() if is_chief else "",
                         timeout_s=timeout_s)
    if refused:
        raise WorkdirError(refused)


def _initial_params(workdir: str, latest, start: StartingPoint | None):
    """The parameters a fine-tuning run starts from, or None (fresh weights or a resume): a
    params-only checkpoint (a model imported by interop.marian), or ``init_from``'s."""
    if latest is not None:
        return load_params(workdir, latest[0]) if latest[1].get("params_only") else None
    return None if start is None else start.params()


def _start(run: Run, checkpointer: Checkpointer, train_it: RunBatches,
           init_params) -> tuple[Run, Progress]:
    """The state restored into its shardings from the newest readable checkpoint (damaged
    newer ones are set aside), started from ``init_params`` (fine-tuning) or initialised
    there; the run with its fitted schedule."""
    restored = None
    if init_params is None:
        restored = checkpointer.restore_latest(run.abstract_state, config=run.config.to_dict(),
                                               shardings=run.state_shardings)
    rng = jax.random.fold_in(jax.random.key(run.config.seed), 1)  # dropout stream
    resumed_step, fitted = 0, None
    if init_params is not None:
        state = run.state_from_params(init_params)
    elif restored is None:
        state = run.init_state()
    else:
        state, rng = restored["state"], restored["rng"]
        if restored["data_state"] is not None:
            train_it.set_state(restored["data_state"])
        resumed_step = int(restored["meta"]["step"])
        fitted = restored["meta"].get("fitted_num_train_steps")
        fitted = int(fitted) if fitted is not None and run.config.fit_steps_to_time else None
        if fitted is not None:
            run = run.with_num_train_steps(fitted)  # the schedule the run started with
        log.info("resuming from step %d", resumed_step)
        print(f"resuming from step {resumed_step}", flush=True)
    micro = _local_int(state.step)
    step = micro // int(run.config.optimizer.grad_accum_steps)
    progress = Progress(
        state=run.strategy.put_state(state), rng=rng, rng_dev=run.strategy.put_rng(rng),
        micro=micro, step=step, first_step=step, resumed_step=resumed_step,
        num_train_steps=run.num_train_steps, fitted_steps=fitted)
    return run, progress


def _prepare_data(config, workdir: str, created: bool, start: StartingPoint | None):
    """The prepared data (with ``start``'s tokenizer), process 0 first; a failure leaves no
    half-prepared work directory behind (one this run ``created`` is removed)."""

    def prepare():
        if start is not None:
            start.install_tokenizer(workdir)
        return data_lib.prepare(config.data, workdir)

    try:
        return chief_first(prepare, "prepare", timeout_s=config.distributed.barrier_timeout)
    except Exception:
        if created and jax.process_index() == 0:
            shutil.rmtree(workdir, ignore_errors=True)
        raise


def _tokenizer_ref(prepared) -> dict:
    return {"path": os.path.abspath(prepared.tokenizer_path),
            "sha256": file_sha256(prepared.tokenizer_path)}


def _local_int(x) -> int:
    """A replicated scalar (host value or jax.Array, also one spanning processes) as int."""
    if isinstance(x, jax.Array):
        x = x.addressable_shards[0].data
    return int(jax.device_get(x))
