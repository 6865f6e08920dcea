"""Two CPU processes (jax.distributed over 127.0.0.1, gloo collectives) vs one process."""

import json
import os
import signal
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx
from helpers import (
    MP_LENGTH,
    MP_ROWS,
    MP_STEPS,
    adam_step,
    init_state,
    packed_batch,
    tiny_config,
)

from transformer_jax.checkpoints import load_params
from transformer_jax.nn import Transformer, split_model
from transformer_jax.parallel import processes

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "mp_worker.py")
# "sharded" (data 2 x fsdp 2): the batch, parameters and optimizer state are split across the
# two processes and replicated leaves (step, RNG, layer norms) take the cross-process
# placement path of "shard_map" too; "tensor" (tensor 4): the tensor axis spans the processes,
# so both load all rows of the global batch (global shape given explicitly).
# `python tests/e2e/mp_worker.py ... shard_map,sharded,tensor` runs them by hand.
MODES = ("sharded", "tensor")
TIMEOUT_S = 240  # generous: the CI machine is shared; a healthy run takes ~60 s


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_workers(workdir) -> None:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # 2 devices each, set
    env["JAX_PLATFORMS"] = "cpu"  # by the worker with jax_num_cpu_devices
    port = _free_port()
    logs, procs = [], []
    try:
        for i in range(2):
            log = open(os.path.join(workdir, f"worker{i}.log"), "w")  # noqa: SIM115
            logs.append(log)
            procs.append(subprocess.Popen(
                [sys.executable, WORKER, str(i), str(port), str(workdir), ",".join(MODES)],
                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        for p in procs:
            p.wait(timeout=TIMEOUT_S)
    finally:
        for p in procs:  # never leave a worker behind (its own process group only)
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        for log in logs:
            log.close()
    for i, p in enumerate(procs):
        if p.returncode != 0:
            with open(os.path.join(workdir, f"worker{i}.log")) as f:
                tail = f.read()[-3000:]
            pytest.fail(f"worker {i} exited with {p.returncode}:\n{tail}")


def _one_process_reference():
    """The same training on one device with the whole global batch."""
    model_def, params = split_model(Transformer(tiny_config(), rngs=nnx.Rngs(0)))
    tx, per_device = adam_step(model_def)
    step = jax.jit(lambda s, b: per_device(s, b, jax.random.key(0)))
    batch = packed_batch(MP_ROWS, MP_LENGTH, seed=5)
    state, losses = init_state(params, tx), []
    for _ in range(MP_STEPS):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    return losses, state.params


def test_two_processes_match_one_process_and_checkpoint_restores(tmp_path):
    _run_workers(tmp_path)
    want_losses, want_params = _one_process_reference()
    for mode in MODES:
        with open(tmp_path / mode / "losses.json") as f:
            got = json.load(f)
        assert got["devices"] == 4
        np.testing.assert_allclose(got["losses"], want_losses, rtol=1e-5, err_msg=mode)
        # The checkpoint written by both processes restores in this single process (each
        # worker also compared it with its own shards, exactly). Key biases are skipped: their
        # gradient is zero up to rounding (softmax ignores a per-query constant), and Adam
        # scales that rounding noise up to +-learning_rate.
        restored = load_params(str(tmp_path / mode))
        for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(restored),
                                     jax.tree_util.tree_leaves(want_params), strict=True):
            name = jax.tree_util.keystr(path)
            if not name.endswith("['key_bias']"):
                np.testing.assert_allclose(got, want, atol=2e-5, err_msg=f"{mode} {name}")


def test_launcher_detection_reads_the_environment():
    assert processes.launcher_detected({}) is None
    assert processes.launcher_detected({"SLURM_NTASKS": "1"}) is None
    assert processes.launcher_detected({"SLURM_NTASKS": "4"}) == "SLURM_NTASKS"
    assert processes.launcher_detected({"TPU_WORKER_HOSTNAMES": "a"}) is None
    assert processes.launcher_detected({"TPU_WORKER_HOSTNAMES": "a,b"}) == "TPU_WORKER_HOSTNAMES"
    env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}
    assert processes.launcher_detected(env) == "JAX_COORDINATOR_ADDRESS"
    ranks = {"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}
    assert processes.ranks_from_environment(ranks) == {"num_processes": 2, "process_id": 1}
    with pytest.raises(ValueError, match="JAX_PROCESS_ID='x' must be a non-negative integer"):
        processes.ranks_from_environment({"JAX_PROCESS_ID": "x"})
    # no launcher, no address: a single process, nothing initialised
    assert processes.initialize({}, environ={}) == "single"


@pytest.mark.parametrize("bad, match", [
    ({"coordinator_address": "10.0.0.1"}, "host:port"),
    ({"coordinator_address": "h:1", "num_processes": 0}, "num_processes"),
    ({"coordinator_address": "h:1", "num_processes": 2, "process_id": 2}, "process_id"),
])
def test_explicit_distributed_config_is_checked(bad, match):
    with pytest.raises(ValueError, match=match):
        processes.initialize(bad, environ={})
