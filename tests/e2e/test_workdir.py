"""The work directory through ``train.py``: one run at a time, a resume keeps the run's
tokenizer, and a refused resume leaves every file (``config.json`` included) as it was."""

import fcntl
import os

import pytest
from helpers import error_line, run_train

from transformer_jax.data.pipeline import TOKENIZER_FILE

pytestmark = pytest.mark.faults  # the fault-injection table in docs/errors.md


def _snapshot(root, skip=(".lock",)):
    """Every file's path and bytes (a refused run must change none; by default not counting
    the lock file, where the refused run had recorded itself as the holder)."""
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            if f in skip:
                continue
            with open(os.path.join(d, f), "rb") as fh:
                out[os.path.relpath(os.path.join(d, f), root)] = fh.read()
    return out


def test_refused_resume_keeps_the_runs_config_json(data_dir, reference_copy):
    """Another batch size changes the global batch order: the data state refuses it, after
    the restore; config.json must still be the first run's."""
    before = _snapshot(reference_copy)
    proc = run_train(reference_copy, data_dir, batch_size=16)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "batch_size" in error_line(proc) and "Traceback" not in proc.stderr
    assert _snapshot(reference_copy) == before


def test_a_held_work_directory_refuses_a_second_run(data_dir, reference_copy):
    lock_path = os.path.join(reference_copy, ".lock")
    with open(lock_path, "w") as holder:
        holder.write('{"pid": 4242, "host": "otherhost"}\n')
        holder.flush()
        fcntl.flock(holder.fileno(), fcntl.LOCK_EX)
        before = _snapshot(reference_copy, skip=())
        proc = run_train(reference_copy, data_dir, num_train_steps=12)
        after = _snapshot(reference_copy, skip=())
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert error_line(proc) == (
        f"error: the work directory {reference_copy} is in use by another run (process 4242 on "
        f"otherhost, see {lock_path}); wait for it to end or stop it, or choose another "
        "--workdir.")
    assert after == before


@pytest.mark.parametrize("damage", ["missing", "other"])
def test_resume_refuses_another_tokenizer(damage, data_dir, reference_copy):
    path = os.path.join(reference_copy, TOKENIZER_FILE)
    if damage == "missing":
        os.remove(path)
        want = (f"error: {reference_copy} holds checkpoint step 10 but not its tokenizer {path}; "
                "restore the run's tokenizer/spm.model (a new one would not fit the trained "
                "embeddings) or choose a fresh --workdir.")
    else:
        with open(path, "ab") as f:
            f.write(b"\0")
        want = (f"error: the tokenizer {path} is not the one checkpoint step 10 in "
                f"{reference_copy} was trained with (sha256 differs); restore the run's "
                "tokenizer/spm.model or choose a fresh --workdir.")
    before = _snapshot(reference_copy)
    proc = run_train(reference_copy, data_dir, num_train_steps=12)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert error_line(proc) == want
    assert _snapshot(reference_copy) == before
