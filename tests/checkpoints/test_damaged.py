"""Damaged checkpoints are set aside; other read errors stop and leave the checkpoint alone."""

import errno
import glob
import json
import os

import jax
import jax.numpy as jnp
import optax
import pytest

from transformer_jax.checkpoints import Checkpointer, CorruptCheckpointError, is_corruption, manager
from transformer_jax.errors import CheckpointMismatchError, CheckpointReadError
from transformer_jax.training.step import create_train_state

pytestmark = pytest.mark.faults


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


@pytest.mark.parametrize("error", [
    ValueError('UNAVAILABLE: Error reading local file "/runs/checksum_sweep/checkpoints/2/'
               'params/d/1f": Input/output error'),
    ValueError('PERMISSION_DENIED: Error opening "/runs/corrupt-test/checkpoints/2/params"'),
    ValueError("Error reading /mnt/truncated_runs/checkpoints/2/params/d/1f: "
               "Input/output error"),
    PermissionError(13, "Permission denied", "/runs/corrupt/checkpoints/2/meta"),
    OSError(5, "Input/output error", "/runs/checksum/truncated/checkpoints/2"),
])
def test_a_damage_word_in_a_path_is_not_damage(error):
    assert not is_corruption(error)
    wrapped = Exception("Encountered error while reading array index")  # as orbax re-raises
    wrapped.__context__ = error
    assert not is_corruption(wrapped)


def test_storage_errors_under_a_damage_word_path_leave_the_checkpoint(two_checkpoints,
                                                                      monkeypatch):
    workdir, state = two_checkpoints
    ckpt = Checkpointer(str(workdir))

    def fail(*args, **kwargs):
        raise ValueError(f'UNAVAILABLE: Error reading "{workdir}/corrupt/checksum": timed out')

    monkeypatch.setattr(ckpt, "restore", fail)
    with pytest.raises(CheckpointReadError, match="it is not damaged, so it was left in place"):
        ckpt.restore_latest(state)
    ckpt.close()
    assert sorted(os.listdir(workdir / "checkpoints")) == ["1", "2"]


def test_a_step_not_visible_yet_is_listed_again_not_set_aside(two_checkpoints, monkeypatch):
    workdir, state = two_checkpoints
    ckpt = Checkpointer(str(workdir))
    real_restore, calls = ckpt.restore, []

    def late_file_system(template, step, **kwargs):  # step 2 shows up on the second look
        calls.append(step)
        if calls == [2]:
            raise FileNotFoundError(f"{workdir}/checkpoints/2/params/manifest.ocdbt")
        return real_restore(template, step, **kwargs)

    monkeypatch.setattr(ckpt, "restore", late_file_system)
    assert int(ckpt.restore_latest(state)["meta"]["step"]) == 2
    ckpt.close()
    assert calls == [2, 2]
    assert sorted(os.listdir(workdir / "checkpoints")) == ["1", "2"]
    assert not os.path.exists(workdir / "corrupt_checkpoints")


@pytest.mark.parametrize("given, config, expected", [
    (None, {"distributed": {"barrier_timeout": 7}}, 7.0),
    (5, {"distributed": {"barrier_timeout": 7}}, 5.0),
])
def test_restore_barriers_honour_barrier_timeout(two_checkpoints, monkeypatch, given, config,
                                                 expected):
    workdir, state = two_checkpoints
    for f in (workdir / "checkpoints" / "2" / "params").rglob("*"):
        if f.is_file() and "ocdbt" in str(f):  # damaged: restore sets it aside at a barrier
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    waited = []
    monkeypatch.setattr(manager, "from_chief",
                        lambda name, fn, timeout_s: waited.append(timeout_s) or fn())
    monkeypatch.setattr(manager, "chief_first",
                        lambda fn, name, timeout_s: waited.append(timeout_s) or fn())
    ckpt = Checkpointer(str(workdir), barrier_timeout_s=given)
    assert int(ckpt.restore_latest(state, config=config)["meta"]["step"]) == 1
    ckpt.close()
    assert waited == [expected, expected]
