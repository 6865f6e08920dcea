"""Damaged checkpoints are set aside; other read errors stop and leave the checkpoint alone."""

import errno
import glob
import json
import os

import jax
import jax.numpy as jnp
import optax
import pytest

from transformer_jax.checkpoints import Checkpointer, CorruptCheckpointError, is_corruption
from transformer_jax.errors import CheckpointMismatchError, CheckpointReadError
from transformer_jax.training.step import create_train_state


@pytest.fixture
def two_checkpoints(tmp_path):
    state = create_train_state({"w": jnp.arange(64.0).reshape(8, 8)}, optax.adam(1e-3))
    ckpt = Checkpointer(str(tmp_path), async_save=False)
    for step in (1, 2):
        ckpt.save(step, state, rng=jax.random.key(0))
    ckpt.close()
    return tmp_path, state


def test_truncated_files_are_corruption(two_checkpoints):
    workdir, state = two_checkpoints
    for f in glob.glob(str(workdir / "checkpoints" / "2" / "params" / "**" / "*"), recursive=True):
        if os.path.isfile(f) and "ocdbt" in f:
            with open(f, "r+b") as fh:
                fh.truncate(os.path.getsize(f) // 2)
    ckpt = Checkpointer(str(workdir))
    with pytest.raises(CorruptCheckpointError, match="checkpoint step 2 .* is damaged"):
        ckpt.restore(state, 2)
    assert int(ckpt.restore_latest(state)["meta"]["step"]) == 1
    ckpt.close()
    assert os.path.isdir(workdir / "corrupt_checkpoints" / "2")  # set aside


@pytest.mark.parametrize("error", [
    MemoryError(), OSError(errno.EIO, "Input/output error"), PermissionError(13, "denied")])
def test_other_errors_stop_and_leave_the_checkpoint(two_checkpoints, monkeypatch, error):
    workdir, state = two_checkpoints
    ckpt = Checkpointer(str(workdir))

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(ckpt, "restore", fail)
    with pytest.raises(CheckpointReadError, match=r"checkpoint step 2 .* could not be read "
                       r"\(.*\); it is not damaged, so it was left in place"):
        ckpt.restore_latest(state)
    ckpt.close()
    assert sorted(os.listdir(workdir / "checkpoints")) == ["1", "2"]
    assert not os.path.exists(workdir / "corrupt_checkpoints")


def test_corruption_is_told_apart():
    assert is_corruption(FileNotFoundError("meta/metadata"))
    assert is_corruption(json.JSONDecodeError("bad", "{", 1))
    inner = ValueError('DATA_LOSS: Error reading "w/.zarray" in OCDBT database')
    outer = CheckpointMismatchError("wrapped")
    outer.__cause__ = inner
    assert is_corruption(outer)
    try:  # orbax re-raises tensorstore's error as a plain Exception while handling it
        try:
            raise ValueError('FAILED_PRECONDITION: Error reading "w/0.0" in OCDBT database: '
                             "Truncated Zstd-compressed stream; at byte 0")
        except ValueError:
            raise Exception("Encountered error while reading array index") from None  # noqa: TRY002
    except Exception as err:  # noqa: BLE001
        assert is_corruption(err)
    assert not is_corruption(MemoryError())
    assert not is_corruption(OSError(errno.EIO, "Input/output error"))
    assert not is_corruption(ValueError("shape (8, 8) does not match (4, 4)"))


@pytest.mark.parametrize("message", [
    'UNAVAILABLE: Error reading "runs/checksum_corrupt/checkpoints/5/d/0.0": connection reset',
    'DEADLINE_EXCEEDED: reading gs://bucket/truncated/checkpoints/5/d/0.0',
    "cannot reach /mnt/corrupt-tests/truncated/5/manifest.ocdbt (server busy)",
    "FAILED_PRECONDITION: lock held on 'checksum.corrupt' by another writer",
])
def test_paths_never_make_an_error_damage(message):
    """A transient error under a path that says "checksum", "corrupt" or "truncated" must not
    move a good checkpoint aside: the path is a name, not a diagnosis."""
    assert not is_corruption(ValueError(message))
    wrapped = Exception("Encountered error while reading array index")
    wrapped.__cause__ = ValueError(message)
    assert not is_corruption(wrapped)


def test_a_step_seen_late_is_tried_again_not_set_aside(two_checkpoints, monkeypatch):
    """A network file system can show another host's fresh files late: a step that looks
    damaged once is listed and read again before it is moved aside."""
    workdir, state = two_checkpoints
    ckpt = Checkpointer(str(workdir))
    real, calls = ckpt.restore, []

    def late(*args, **kwargs):
        calls.append(args)
        if len(calls) == 1:
            raise FileNotFoundError("params/ocdbt.process_0/manifest.ocdbt")
        return real(*args, **kwargs)

    monkeypatch.setattr(ckpt, "restore", late)
    assert int(ckpt.restore_latest(state)["meta"]["step"]) == 2
    ckpt.close()
    assert sorted(os.listdir(workdir / "checkpoints")) == ["1", "2"]


def test_restore_agreements_use_the_configured_barrier_timeout(two_checkpoints, monkeypatch):
    import transformer_jax.checkpoints.manager as manager

    workdir, state = two_checkpoints
    seen = []
    real_from_chief, real_barrier = manager.from_chief, manager.barrier
    monkeypatch.setattr(manager, "from_chief", lambda name, fn, timeout_s=None: (
        seen.append(timeout_s), real_from_chief(name, fn))[1])
    monkeypatch.setattr(manager, "barrier", lambda name, timeout_s=None: (
        seen.append(timeout_s), real_barrier(name))[1])
    for f in glob.glob(str(workdir / "checkpoints" / "2" / "params" / "**" / "*"), recursive=True):
        if os.path.isfile(f) and "ocdbt" in f:  # damaged: set aside after a barrier
            with open(f, "r+b") as fh:
                fh.truncate(os.path.getsize(f) // 2)
    ckpt = Checkpointer(str(workdir), barrier_timeout=7)
    assert int(ckpt.restore_latest(state)["meta"]["step"]) == 1
    ckpt.close()
    assert seen == [7, 7]
