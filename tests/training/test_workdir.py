"""The work directory's lock (``fcntl.flock``): one holder, freed by the OS when it dies."""

import json
import os
import signal
import subprocess
import sys

import pytest

from transformer_jax.training.workdir import LOCK_FILE, WorkdirLock

pytestmark = pytest.mark.faults  # the fault-injection table in docs/errors.md


def test_second_holder_is_refused_with_the_holders_pid_and_host(tmp_path):
    first, second = WorkdirLock(str(tmp_path)), WorkdirLock(str(tmp_path))
    assert first.acquire() == ""
    recorded = (tmp_path / LOCK_FILE).read_text()
    message = second.acquire()
    assert f"(process {os.getpid()} on " in message and "in use by another run" in message
    assert (tmp_path / LOCK_FILE).read_text() == recorded  # the refused one wrote nothing
    first.release()
    assert second.acquire() == ""
    second.release()


def test_a_stale_lock_file_never_blocks(tmp_path):
    (tmp_path / LOCK_FILE).write_text("999999 deadhost\n")
    lock = WorkdirLock(str(tmp_path))
    assert lock.acquire() == ""
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()


def test_the_lock_of_a_killed_holder_is_free(tmp_path):
    code = ("import sys, time; from transformer_jax.training.workdir import WorkdirLock; "
            f"lock = WorkdirLock({str(tmp_path)!r}); assert lock.acquire() == ''; "
            "print('held', flush=True); "
            "time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert "in use by another run" in WorkdirLock(str(tmp_path)).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    lock = WorkdirLock(str(tmp_path))
    assert lock.acquire() == ""
    lock.release()


def test_only_the_chief_writes_the_history(tmp_path):
    from transformer_jax.training.reporting import HISTORY_FILE, History

    other = History(str(tmp_path), 0, enabled=False)  # a process other than 0
    other.add(1, "train", {"loss": 1.0})
    assert not (tmp_path / HISTORY_FILE).exists()
    chief = History(str(tmp_path), 0)
    chief.add(1, "train", {"loss": 1.0})
    assert json.loads((tmp_path / HISTORY_FILE).read_text()) == {
        "step": 1, "split": "train", "loss": 1.0}


def test_json_writes_do_not_collide_on_a_repeated_process_id(tmp_path):
    """In containers every host may have the same pid: a temp name built from it collides
    with another host's; ``mkstemp`` names do not."""
    from transformer_jax.training.reporting import write_json

    path = tmp_path / "summary.json"
    (tmp_path / f"summary.json.tmp-{os.getpid()}").mkdir()  # another host's write in flight
    write_json(str(path), {"a": 1})
    assert json.loads(path.read_text()) == {"a": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "summary.json", f"summary.json.tmp-{os.getpid()}"]
