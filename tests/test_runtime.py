"""transformer_jax.runtime: mimalloc / glibc malloc tunables, the re-execution of entry points,
the TPU probe and early stop signals."""

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from transformer_jax import runtime

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
    libc = ctypes.CDLL(None)  # the global namespace: an LD_PRELOADed allocator comes first
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
    print(os.environ.get("LD_PRELOAD") or os.environ.get("GLIBC_TUNABLES", ""), sum(faults[1:]))
""")


def test_environment_appends_tunables_and_keeps_the_users():
    env = runtime.malloc_environment({"GLIBC_TUNABLES": "glibc.malloc.arena_max=4"},
                                     library=None)
    tunables = env["GLIBC_TUNABLES"].split(":")
    assert tunables[0] == "glibc.malloc.arena_max=4"  # the user's value wins
    assert "glibc.malloc.arena_max=1" not in tunables
    assert set(runtime.MALLOC_TUNABLES[1:]) <= set(tunables)
    assert env[runtime.MALLOC_ENV] == "applied"


def test_environment_opt_out_and_already_set():
    assert runtime.malloc_environment({runtime.MALLOC_ENV: "default"}) is None
    done = {"GLIBC_TUNABLES": ":".join(runtime.MALLOC_TUNABLES)}
    assert runtime.malloc_environment(done, library=None) is None
    assert runtime.malloc_environment({"LD_PRELOAD": "/x/libmimalloc.so.3"},
                                      library="/y/libmimalloc.so") is None


def test_environment_preloads_mimalloc_before_the_users_preload():
    env = runtime.malloc_environment({"LD_PRELOAD": "/opt/libfoo.so"}, library="/m/libmimalloc.so")
    assert env["LD_PRELOAD"] == "/m/libmimalloc.so:/opt/libfoo.so"
    assert env["MIMALLOC_PURGE_DELAY"] == "-1" and env[runtime.MALLOC_ENV] == "applied"
    env = runtime.malloc_environment({"MIMALLOC_PURGE_DELAY": "100"}, library="/m/libmimalloc.so")
    assert env["MIMALLOC_PURGE_DELAY"] == "100"  # the user's value wins
    # TRANSFORMER_JAX_MALLOC=glibc: the tunables even where mimalloc is installed.
    env = runtime.malloc_environment({runtime.MALLOC_ENV: "glibc"})
    assert "LD_PRELOAD" not in env and "glibc.malloc.mmap_max=0" in env["GLIBC_TUNABLES"]


@pytest.mark.skipif(runtime.mimalloc_library() is None, reason="cmeel-mimalloc not installed")
def test_installed_mimalloc_is_found_and_loads():
    path = runtime.mimalloc_library()
    assert os.path.isfile(path) and "libmimalloc.so" in os.path.basename(path)
    code = "import os; print(open('/proc/self/maps').read().count('libmimalloc'))"
    env = {**os.environ, "LD_PRELOAD": path}
    out = subprocess.run([sys.executable, "-c", code], env=env, text=True, capture_output=True,
                         timeout=60, check=True).stdout
    assert int(out) > 0


@pytest.mark.skipif(not GLIBC, reason="the tunables are glibc's")
@pytest.mark.parametrize("allocator", ["glibc", "mimalloc"])
def test_reexecuted_process_reuses_a_freed_big_block(tmp_path, allocator):
    if allocator == "mimalloc" and runtime.mimalloc_library() is None:
        pytest.skip("cmeel-mimalloc not installed")
    script = tmp_path / "alloc.py"
    script.write_text(_SCRIPT.format(root=ROOT))
    env = {k: v for k, v in os.environ.items()
           if k not in ("GLIBC_TUNABLES", "LD_PRELOAD", runtime.MALLOC_ENV)}

    def run(mode, choice=""):
        out = subprocess.run([sys.executable, str(script), mode],
                             env={**env, runtime.MALLOC_ENV: choice}, check=True,
                             capture_output=True, text=True).stdout.split()
        return (out[0] if len(out) == 2 else ""), int(out[-1])

    plain_setting, plain_faults = run("plain")
    setting, faults = run("configure", "glibc" if allocator == "glibc" else "")
    assert plain_setting == ""
    if allocator == "glibc":
        assert setting == ":".join(runtime.MALLOC_TUNABLES)
    else:
        assert setting == runtime.mimalloc_library()
    pages = 3 * (256 << 20) // 4096
    assert plain_faults > 0.9 * pages  # glibc default: every round faults the block in again
    assert faults < 0.05 * pages  # the block stays mapped and is reused


def test_a_stop_signal_during_start_up_is_kept_for_the_training_loop():
    old = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        runtime.defer_stop_signals()
        os.kill(os.getpid(), signal.SIGTERM)  # delivered to this (main) thread at once
        flag = runtime.StopFlag()
        with flag:  # the loop's handler takes over and acts on the recorded signal
            assert flag.signum == signal.SIGTERM
        assert runtime.take_early_signal() is None  # taken once
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def test_skip_absent_tpu_only_where_libtpu_is_installed_and_no_chip(monkeypatch):
    import importlib.util

    installed = {"libtpu"}
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name: object() if name in installed else None)
    monkeypatch.setattr("glob.glob", lambda pattern: [])
    env = {}
    assert runtime.skip_absent_tpu(env) and env == {"JAX_PLATFORMS": "cpu"}
    env = {"JAX_PLATFORMS": "tpu"}  # the user's choice wins
    assert not runtime.skip_absent_tpu(env) and env == {"JAX_PLATFORMS": "tpu"}
    monkeypatch.setattr("glob.glob", lambda pattern: ["/dev/accel0"] if "accel" in pattern else [])
    assert not runtime.skip_absent_tpu(env := {}) and env == {}  # a TPU VM
    monkeypatch.setattr("glob.glob", lambda pattern: [])
    installed.add("jax_cuda12_plugin")  # a GPU machine keeps JAX's own platform choice
    assert not runtime.skip_absent_tpu(env := {}) and env == {}
    installed.clear()  # no libtpu: nothing to skip
    assert not runtime.skip_absent_tpu(env := {}) and env == {}


def test_entry_point_start_is_quiet_with_libtpu_installed():
    # What train.py and translate do before importing JAX; with the aot extra installed a
    # bare `import jax; jax.devices()` prints libtpu's worker-hostname error on this machine.
    code = ("from transformer_jax.runtime import skip_absent_tpu; skip_absent_tpu(); "
            "import jax; print(jax.devices()[0].platform)")
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, text=True,
                          capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "cpu"
    assert "TPU" not in proc.stderr and "libtpu" not in proc.stderr, proc.stderr
