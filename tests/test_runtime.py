"""transformer_jax.runtime: the glibc malloc tunables and the re-execution of entry points."""

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from transformer_jax import runtime
from transformer_jax.training import loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GLIBC = runtime._is_glibc()

# Allocates and frees a 256 MiB aligned block 4 times in a worker thread (as XLA does with a
# step's temporary buffer) and prints the minor page faults of the last 3 rounds.
_SCRIPT = textwrap.dedent("""
    import ctypes, os, resource, sys, threading
    sys.path.insert(0, {root!r})
    from transformer_jax.runtime import configure_malloc
    if sys.argv[1] == "configure":
        configure_malloc()
    libc = ctypes.CDLL("libc.so.6")
    libc.posix_memalign.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_size_t,
                                    ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    size, faults = 256 << 20, []
    def work():
        for _ in range(4):
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            p = ctypes.c_void_p()
            assert libc.posix_memalign(ctypes.byref(p), 64, size) == 0
            ctypes.memset(p, 1, size)
            libc.free(p)
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    t = threading.Thread(target=work)
    t.start(); t.join()
    print(os.environ.get("GLIBC_TUNABLES", ""), sum(faults[1:]))
""")


def test_environment_appends_tunables_and_keeps_the_users():
    env = runtime.malloc_environment({"GLIBC_TUNABLES": "glibc.malloc.arena_max=4"})
    tunables = env["GLIBC_TUNABLES"].split(":")
    assert tunables[0] == "glibc.malloc.arena_max=4"  # the user's value wins
    assert "glibc.malloc.arena_max=1" not in tunables
    assert set(runtime.MALLOC_TUNABLES[1:]) <= set(tunables)
    assert env[runtime.MALLOC_ENV] == "applied"


def test_environment_opt_out_and_already_set():
    assert runtime.malloc_environment({runtime.MALLOC_ENV: "default"}) is None
    done = {"GLIBC_TUNABLES": ":".join(runtime.MALLOC_TUNABLES)}
    assert runtime.malloc_environment(done) is None


@pytest.mark.skipif(not GLIBC, reason="the tunables are glibc's")
def test_reexecuted_process_reuses_a_freed_big_block(tmp_path):
    script = tmp_path / "alloc.py"
    script.write_text(_SCRIPT.format(root=ROOT))
    env = {k: v for k, v in os.environ.items()
           if k not in ("GLIBC_TUNABLES", runtime.MALLOC_ENV)}

    def run(mode):
        out = subprocess.run([sys.executable, str(script), mode], env=env, check=True,
                             capture_output=True, text=True).stdout.split()
        return (out[0] if len(out) == 2 else ""), int(out[-1])

    plain_tunables, plain_faults = run("plain")
    tunables, faults = run("configure")
    assert plain_tunables == "" and tunables == ":".join(runtime.MALLOC_TUNABLES)
    pages = 3 * (256 << 20) // 4096
    assert plain_faults > 0.9 * pages  # glibc default: every round faults the block in again
    assert faults < 0.05 * pages  # the block stays mapped and is reused


def test_a_stop_signal_during_start_up_is_kept_for_the_training_loop():
    old = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        runtime.defer_stop_signals()
        os.kill(os.getpid(), signal.SIGTERM)  # delivered to this (main) thread at once
        flag = loop._StopFlag()
        with flag:  # the loop's handler takes over and acts on the recorded signal
            assert flag.signum == signal.SIGTERM
        assert runtime.take_early_signal() is None  # taken once
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
