"""A run killed at any point (kill -9, also during an asynchronous checkpoint save) or stopped
with SIGTERM resumes with the same command and ends bit-identical to an uninterrupted run."""

import random
import signal
import time

import pytest
from helpers import (
    RUN_STEPS,
    assert_bit_identical,
    checkpoint_entries,
    final_params,
    finish,
    run_train,
    start_train,
    wait_for,
)

pytestmark = pytest.mark.faults  # the fault-injection table in docs/errors.md


@pytest.mark.parametrize("seed,delay", [(0, 0.0), (1, 0.05), (2, 0.2)])
def test_kill9_then_resume_is_bit_identical(seed, delay, data_dir, reference, tmp_path):
    """kill -9 ``delay`` seconds after checkpoint ``k`` (random per seed) starts to appear.

    Saving after every update makes it likely that the kill lands inside an asynchronous
    save (delay 0: right after orbax created its temporary directory); the run must then
    resume from the newest complete checkpoint. Longer delays land in later updates.
    """
    kill_step = random.Random(seed).randint(1, RUN_STEPS - 2)
    workdir = str(tmp_path / "run")
    proc = start_train(workdir, data_dir, str(tmp_path / "log1.txt"), checkpoint_every_steps=1)
    prefix = f"{kill_step}"
    wait_for(lambda: any(e == prefix or e.startswith(prefix + ".")
                         for e in checkpoint_entries(workdir)), proc)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    assert finish(proc) == -signal.SIGKILL
    left = sorted(checkpoint_entries(workdir))
    complete = [int(e) for e in left if e.isdigit()]

    resumed = run_train(workdir, data_dir, checkpoint_every_steps=1)
    context = f"killed at {kill_step} (+{delay:.2f} s), left {left}:\n{resumed.stderr[-3000:]}"
    assert resumed.returncode == 0, context
    if complete:  # else the kill came before the first save finished: a fresh start
        assert f"resuming from step {max(complete)}" in resumed.stdout, context
    assert_bit_identical(final_params(workdir), reference[1], context)


def test_sigterm_saves_exits_zero_and_resumes_bit_identical(data_dir, reference, tmp_path):
    workdir = str(tmp_path / "run")
    log = str(tmp_path / "log1.txt")
    proc = start_train(workdir, data_dir, log, checkpoint_every_steps=1)
    wait_for(lambda: "1" in checkpoint_entries(workdir), proc)
    proc.send_signal(signal.SIGTERM)
    assert finish(proc) == 0
    with open(log) as f:
        out = f.read()
    assert "Traceback" not in out
    line = next(ln for ln in out.splitlines() if ln.startswith("interrupted at step"))
    step = int(line.split()[3].rstrip(";"))
    assert 1 <= step < RUN_STEPS, line
    assert line == f"interrupted at step {step}; checkpoint saved in {workdir}"
    assert str(step) in checkpoint_entries(workdir)

    resumed = run_train(workdir, data_dir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from step {step}" in resumed.stdout
    assert_bit_identical(final_params(workdir), reference[1])
