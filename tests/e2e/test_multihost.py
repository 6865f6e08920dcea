"""``train.py`` on several CPU processes (127.0.0.1, jax.distributed + gloo) against one process.

Every process runs the same command with ``--config.distributed.*`` (coordinator, count, id);
each owns 2 CPU devices (``JAX_NUM_CPU_DEVICES=2``).
"""

import json
import os
import signal
import time

import jax
import numpy as np
import pytest
from fault_train import MESSAGES, SCRIPT
from multihost_helpers import Job, compare_params, run_single

from transformer_jax.checkpoints import load_params

STEPS = 3
# Subword sampling on: the segmentation drawn for a pair must not depend on which process reads it.
SAMPLING = ["--config.data.subword_sampling_alpha=0.5", "--config.data.subword_sampling_nbest=4",
            "--config.data.tokenizer_model_type=unigram"]  # sampling needs n-best lists
TIMEOUT_S = 300  # generous: the CI machine is shared; a healthy 2-process run takes ~40 s


@pytest.fixture(scope="module")
def single_process(tmp_path_factory):
    """The reference: one process, one device, dropout on."""
    workdir = tmp_path_factory.mktemp("single") / "run"
    proc = run_single(workdir, f"--config.num_train_steps={STEPS}", "--config.parallelism=none",
                      "--config.model.dropout_rate=0.1", *SAMPLING)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return workdir


@pytest.mark.parametrize("mode", ["pmap", "sharded"])
def test_two_processes_match_one_process(mode, single_process, tmp_path):
    """2 processes x 2 devices == 1 process x 1 device (dropout on: masks follow global rows;
    subword sampling on: segmentations follow positions in the data order)."""
    args = [f"--config.num_train_steps={STEPS}", f"--config.parallelism={mode}",
            "--config.model.dropout_rate=0.1", f"--config.checkpoint_every_steps={STEPS}",
            *SAMPLING]
    if mode == "sharded":  # parameters split over fsdp across the processes
        args += ["--config.sharding.data=2", "--config.sharding.fsdp=2"]
    with Job(tmp_path / "run", *args) as job:
        codes = job.wait(TIMEOUT_S)
        assert codes == [0, 0], job.tails()
    assert f"done: step {STEPS}" in job.log(0)
    with open(tmp_path / "run" / "summary.json") as f:
        assert json.load(f)["step"] == STEPS
    assert compare_params(tmp_path / "run", single_process) <= 1e-5


def test_time_fitted_run_agrees_on_one_update_count(tmp_path):
    """fit_steps_to_time on 2 processes: each times its own updates, both train for the
    smallest fitted count and stop after the same update (a disagreement would leave one
    process waiting in a collective until the timeout)."""
    args = ["--config.num_train_steps=1000000", "--config.checkpoint_every_steps=1000000",
            "--config.parallelism=shard_map", "--config.max_train_minutes=1",
            "--config.fit_steps_to_time=true", "--config.log_every_steps=10",
            "--config.optimizer.schedule=warmup_cosine", "--config.optimizer.warmup_steps=20"]
    with Job(tmp_path / "run", *args) as job:
        codes = job.wait(TIMEOUT_S)
        assert codes == [0, 0], job.tails()
    with open(tmp_path / "run" / "summary.json") as f:
        summary = json.load(f)
    fitted = summary["num_train_steps"]
    assert 20 < fitted < 1000000, summary
    assert f"at update 20: training for {fitted} updates" in job.log(0), job.tails()
    assert summary["step"] == fitted or summary["stopped_by_time_limit"], summary
    assert os.listdir(tmp_path / "run" / "checkpoints") == [str(summary["step"])]


def test_sigterm_to_one_process_saves_on_all(tmp_path):
    """SIGTERM to process 1 only: both stop after the same update, save it and exit 0.

    Started as a launcher would (``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``,
    ``JAX_PROCESS_ID``)."""
    with Job(tmp_path / "run", "--config.num_train_steps=100000",
             "--config.checkpoint_every_steps=100000", "--config.parallelism=pmap",
             via_environment=True) as job:
        job.wait_for("train:", TIMEOUT_S)  # both are training (collectives need both)
        job.wait_for("loss=", TIMEOUT_S)
        job.procs[1].send_signal(signal.SIGTERM)
        codes = job.wait(TIMEOUT_S)
        assert codes == [0, 0], job.tails()
    steps = os.listdir(tmp_path / "run" / "checkpoints")
    assert len(steps) == 1, steps
    for i in range(2):
        assert f"interrupted at step {steps[0]}; checkpoint saved" in job.log(i), job.tails()
    # both resume from it (restored into the step's placement on each process) and finish
    end = int(steps[0]) + 1
    with Job(tmp_path / "run", f"--config.num_train_steps={end}", "--config.parallelism=pmap",
             via_environment=True) as job:
        assert job.wait(TIMEOUT_S) == [0, 0], job.tails()
    for i in range(2):
        assert f"resuming from step {steps[0]}" in job.log(i), job.tails()
    assert f"done: step {end}" in job.log(0)


def test_killed_process_ends_the_others(tmp_path):
    """kill -9 of process 1: process 0 exits non-zero within the heartbeat timeout, naming it."""
    with Job(tmp_path / "run", "--config.num_train_steps=100000",
             "--config.checkpoint_every_steps=100000", "--config.parallelism=shard_map",
             "--config.distributed.heartbeat_timeout=5") as job:
        job.wait_for("loss=", TIMEOUT_S)
        job.procs[1].kill()
        codes = job.wait(60)  # bounded: 5 s heartbeat timeout plus detection slack
    assert codes[0] != 0
    log = job.log(0)
    assert "tasks are unhealthy (stopped sending heartbeats):\n1\n" in log, log[-3000:]


def _wait_for_text(job: Job, process: int, text: str) -> None:
    """Until ``text`` appears in a process's log or the process ends (the start of the fault)."""
    deadline = time.monotonic() + TIMEOUT_S
    while (time.monotonic() < deadline and job.procs[process].poll() is None
           and text not in job.log(process)):
        time.sleep(0.2)


@pytest.mark.faults
@pytest.mark.parametrize("fault, failing, args", [
    # process 1's batch of update 3 cannot be read; nothing is logged at update 3, so the
    # vote of update 3 is read at update 4 (which process 1 runs on its last batch again)
    ("data", 1, ["--config.log_every_steps=100"]),
    # process 0 cannot append update 3 to history.jsonl; metrics are logged every update,
    # so the vote is read at once, before update 4 is logged or saved
    ("history", 0, []),
])
def test_an_error_on_one_process_stops_every_process(fault, failing, args, tmp_path):
    """An error on one process only: every process exits non-zero within seconds (not after
    the heartbeat timeout), each naming the failed process and its message; checkpoint 2
    (before the fault) is the newest and loads; the update made with a stand-in batch is
    never saved (checkpoint 4 would be due)."""
    with Job(tmp_path / "run", "--config.num_train_steps=8", "--config.checkpoint_every_steps=2",
             "--config.parallelism=shard_map", *args,
             script=(SCRIPT, fault, str(failing), "3")) as job:
        _wait_for_text(job, failing, MESSAGES[fault])
        codes = job.wait(60)  # bounded: the heartbeat timeout (100 s) would be too late
    # the failed process raises its own error (exit 2: data or disk); the other one a
    # ProcessFailedError (exit 1)
    assert codes[failing] == 2 and codes[1 - failing] == 1, job.tails()
    for i in range(2):
        assert f"process {failing} of 2 failed at update 3" in job.log(i), job.tails()
        assert MESSAGES[fault] in job.log(i), job.tails()
    assert "the newest is step 2" in job.log(1 - failing), job.tails()
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["2"]
    params = load_params(str(tmp_path / "run"))
    assert all(np.isfinite(leaf).all() for leaf in jax.tree_util.tree_leaves(params))
