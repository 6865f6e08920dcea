"""The loop over an explicit Session: hooks run when due, after the metrics they need."""

import json
import os

import pytest
from helpers import tiny_train_config

from transformer_jax.runtime import StopFlag
from transformer_jax.training import validate_config
from transformer_jax.training.hooks import SaveCheckpoint, default_hooks
from transformer_jax.training.loop import finish, train
from transformer_jax.training.session import setup


class Recorder:
    """A hook due every ``every`` updates that records what it saw."""

    def __init__(self, every: int, needs_metrics: bool):
        self.every, self.needs_metrics, self.seen = every, needs_metrics, []

    def due(self, session, stopping):
        return session.progress.step % self.every == 0

    def __call__(self, session, stopping):
        p = session.progress
        self.seen.append((p.step, len(p.pending), dict(p.last_train)))


@pytest.fixture
def session(tmp_path):
    config = validate_config(tiny_train_config(num_train_steps=6, log_every_steps=100,
                                               checkpoint_every_steps=100))
    with StopFlag() as signals:
        yield setup(config, str(tmp_path / "run"), signals=signals)


def test_setup_builds_the_whole_state_and_the_loop_calls_the_hooks(session):
    p = session.progress
    assert (p.step, p.micro, p.first_step, p.resumed_step, p.num_train_steps) == (0, 0, 0, 0, 6)
    assert session.run.config.model.vocab_size == session.prepared.vocab_size
    fetching, quiet = Recorder(2, needs_metrics=True), Recorder(3, needs_metrics=False)
    train(session, hooks=[fetching, quiet, SaveCheckpoint()])
    assert p.step == p.micro == 6 and not p.interrupted
    # A hook that needs metrics sees them fetched: nothing pending, this update's numbers.
    assert [s for s, _, _ in fetching.seen] == [2, 4, 6]
    assert all(pending == 0 and last["tokens"] > 0 for _, pending, last in fetching.seen)
    # One that does not is called without a fetch: update 3's metrics are still on the device
    # (updates 2 and 4 fetched for the other hook; 1 is the first update, always logged).
    assert [(s, pending) for s, pending, _ in quiet.seen] == [(3, 1), (6, 0)]
    # SaveCheckpoint is due at the last update only (checkpoint_every_steps=100).
    assert session.checkpointer.all_steps() == [6]
    summary = finish(session)
    assert summary["step"] == 6 and summary["num_train_steps"] == 6
    with open(os.path.join(session.workdir, "history.jsonl")) as f:
        logged = [json.loads(line)["step"] for line in f if '"train"' in line]
    assert logged == [1, 2, 4, 6]  # the first update, then whenever a hook needed metrics


def test_the_default_hooks_are_the_trainers_concerns(session):
    names = [type(hook).__name__ for hook in default_hooks(vote=None)]
    assert names == ["WarnDropped", "FitToTime", "SaveCheckpoint", "Evaluate"]
    session.checkpointer.close()


def test_a_signal_after_the_last_update_is_handled(tmp_path, monkeypatch):
    """A SIGTERM during the final evaluation (after the last stop vote) meets the run's
    handler, not the default one that would kill this process alone on a pod."""
    import signal

    import transformer_jax.training.evaluate as evaluate_lib
    from transformer_jax.training import train_and_evaluate

    def final_evaluation(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return {}

    monkeypatch.setattr(evaluate_lib, "final_evaluation", final_evaluation)
    summary = train_and_evaluate(tiny_train_config(num_train_steps=2), str(tmp_path / "run"))
    assert summary["late_signal"] == signal.SIGTERM and not summary["interrupted"]
    with open(tmp_path / "run" / "summary.json") as f:
        assert json.load(f)["step"] == 2


class FailingBatches:
    """The session's batches, but the ``fail_at``-th one raises (an undecodable record)."""

    def __init__(self, batches, fail_at: int):
        self.batches, self.fail_at, self.calls = batches, fail_at, 0

    def __next__(self):
        self.calls += 1
        if self.calls == self.fail_at:
            raise ValueError("training record 17 cannot be decoded")
        return next(self.batches)

    def get_state(self):
        return self.batches.get_state()


@pytest.mark.faults
def test_one_process_raises_a_data_error_where_it_happens(session):
    """With one process an error of the training batches is raised at once, as it is: its
    type, and a traceback from the loop straight to the raise (no agreement with other
    processes in between)."""
    session.train_it = FailingBatches(session.train_it, fail_at=3)
    with pytest.raises(ValueError, match="record 17 cannot be decoded") as info:
        train(session, hooks=[SaveCheckpoint()])
    frames = [entry.name for entry in info.traceback]
    assert frames[-1] == "__next__" and "raise_failure" not in frames, frames
    assert session.progress.step == 2 and session.failure.error is None
    session.checkpointer.close()


@pytest.mark.faults
def test_one_process_raises_a_failed_history_write_at_once(session, monkeypatch):
    """With one process a failed metric write (a full disk) stops the run at that update."""
    def full_disk(step, split, metrics):
        raise OSError(28, "No space left on device", session.history.path)

    monkeypatch.setattr(session.history, "add", full_disk)
    with pytest.raises(OSError, match="No space left on device") as info:
        train(session, hooks=[SaveCheckpoint()])
    frames = [entry.name for entry in info.traceback]
    assert frames[-1] == "full_disk" and "raise_failure" not in frames, frames
    assert session.progress.step == 1 and session.failure.error is None
    session.checkpointer.close()
