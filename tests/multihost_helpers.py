"""Launch ``train.py`` as several CPU processes on 127.0.0.1 (jax.distributed, gloo)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np

from transformer_jax.checkpoints import load_params

LR = 0.003
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = [  # a tiny model, 300 training pairs, no decoding: seconds per run
    "--config.batch_size=8", "--config.log_every_steps=1",
    "--config.eval_metrics=", "--config.eval_num_sentences=0", "--config.eval_every_steps=0",
    "--config.data.numbers_train_size=300", "--config.data.numbers_validation_size=16",
    "--config.data.numbers_test_size=16", "--config.data.test_split=",
    "--config.data.vocab_size=64", "--config.data.max_length=16",
    "--config.model.d_model=16", "--config.model.num_heads=2", "--config.model.d_ff=32",
    "--config.model.max_len=32", "--config.model.num_layers=1",
    "--config.optimizer.name=adam", "--config.optimizer.schedule=constant",
    f"--config.optimizer.learning_rate={LR}", "--config.optimizer.label_smoothing=0.1",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(workdir, *args: str, process_id: int | None = None, num_processes: int = 1,
            port: int = 0, script: tuple[str, ...] = ()) -> list[str]:
    """``train.py`` (or ``script``: a program and its first arguments that take train.py's
    flags) with the tiny config, ``args`` and the ranks of one process."""
    program = list(script) or [os.path.join(ROOT, "train.py")]
    cmd = [sys.executable, *program, "--config", os.path.join(ROOT, "configs", "default.py"),
           "--workdir", str(workdir), *TINY, *args]
    if process_id is not None:
        cmd += [f"--config.distributed.coordinator_address=127.0.0.1:{port}",
                f"--config.distributed.num_processes={num_processes}",
                f"--config.distributed.process_id={process_id}"]
    return cmd


def environment(devices: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(devices), PYTHONUNBUFFERED="1")
    return env


class Job:
    """``num_processes`` train.py processes; always killed (their own process groups) on exit."""

    def __init__(self, workdir, *args: str, num_processes: int = 2, devices: int = 2,
                 via_environment: bool = False, script: tuple[str, ...] = ()):
        """``via_environment``: ranks in ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES``
        / ``JAX_PROCESS_ID`` (as a launcher sets them) instead of ``--config.distributed.*``;
        ``script``: run instead of train.py (see :func:`command`)."""
        self.workdir = str(workdir)
        os.makedirs(self.workdir, exist_ok=True)
        port = free_port()
        self.logs = [os.path.join(self.workdir, f"process{i}.log") for i in range(num_processes)]
        self.procs = []
        for i in range(num_processes):
            env = environment(devices)
            if via_environment:
                env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                           JAX_NUM_PROCESSES=str(num_processes), JAX_PROCESS_ID=str(i))
                cmd = command(workdir, *args, script=script)
            else:
                cmd = command(workdir, *args, process_id=i, num_processes=num_processes,
                              port=port, script=script)
            with open(self.logs[i], "w") as log:
                self.procs.append(subprocess.Popen(
                    cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                    start_new_session=True))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.kill()
        return False

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait()

    def wait(self, timeout: float) -> list[int]:
        deadline = time.monotonic() + timeout
        for p in self.procs:
            p.wait(timeout=max(deadline - time.monotonic(), 1))
        return [p.returncode for p in self.procs]

    def log(self, i: int) -> str:
        with open(self.logs[i]) as f:
            return f.read()

    def wait_for(self, text: str, timeout: float, process: int = 0) -> None:
        """Until ``text`` appears in a process's log (e.g. a step of the progress bar)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.log(process):
                return
            if any(p.poll() is not None for p in self.procs):
                raise AssertionError(f"a process ended early:\n{self.log(process)[-3000:]}")
            time.sleep(0.5)
        raise AssertionError(f"{text!r} not seen in {timeout} s:\n{self.log(process)[-3000:]}")

    def tails(self) -> str:
        return "\n".join(f"--- process {i}\n{self.log(i)[-2500:]}" for i in range(len(self.procs)))


def run_single(workdir, *args: str, devices: int = 1) -> subprocess.CompletedProcess:
    return subprocess.run(command(workdir, *args), cwd=ROOT, env=environment(devices),
                          capture_output=True, text=True, timeout=600, check=False)


def compare_params(workdir_a, workdir_b) -> float:
    """Largest ``||a - b|| / ||b||`` over the parameter leaves of two runs' last checkpoints.

    Every leaf counts, key biases included (``ops.inert_key_bias`` gives them an exact zero
    gradient, so they cannot drift with the order of float additions).
    """
    a, b = load_params(str(workdir_a)), load_params(str(workdir_b))
    worst = 0.0
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves(b),
                            strict=True):
        x, y = np.asarray(x), np.asarray(y)
        if not np.any(y):  # an all-zero leaf (e.g. a key bias) must stay exactly zero
            assert not np.any(x), jax.tree_util.keystr(path)
            continue
        worst = max(worst, float(np.linalg.norm(x - y) / np.linalg.norm(y)))
    return worst
