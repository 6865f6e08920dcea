"""Process-wide settings for fast CPU runs, applied by the command-line entry points.

``configure_malloc()`` keeps freed memory in the process. XLA's CPU runtime allocates the
temporary buffer of every compiled call (all activations and gradients of a training step)
and frees it when the call ends. With glibc's defaults a block that large gets its own
``mmap`` and is unmapped on ``free``, so the next step faults every page back in, zeroed by
the kernel (``docs/cpu_speed.md`` measures the page faults and the system time this costs).

The entry points (``train.py``, ``python -m transformer_jax.translate``, the benchmarks)
therefore re-execute themselves once, before JAX is imported, with one of:

1. **mimalloc** (default on Linux x86-64/aarch64): ``LD_PRELOAD`` of ``libmimalloc.so`` from
   the ``cmeel-mimalloc`` wheel (a dependency) with ``MIMALLOC_PURGE_DELAY=-1``: freed pages
   are never returned to the OS, so a step reuses the previous step's pages.
2. **glibc tunables** (where mimalloc is not installed, or ``TRANSFORMER_JAX_MALLOC=glibc``),
   appended to the user's ``GLIBC_TUNABLES`` (the user's values win):

   ``glibc.malloc.arena_max=1``   one heap for all threads (brk-grown, so big blocks fit)
   ``glibc.malloc.mmap_max=0``    no block gets its own mapping
   ``glibc.malloc.tcache_count=0`` freed tails coalesce, so the same block is reused
   ``glibc.malloc.trim_threshold=1 GiB``  free space at the top of the heap is kept

   ``mallopt`` from inside the process cannot do this: worker threads allocate from
   per-thread arenas that cannot hold a block over 64 MiB, and the thread cache keeps the
   small tail that ``posix_memalign`` splits off, so a freed block never merges back.

Only glibc-based Linux is touched; ``TRANSFORMER_JAX_MALLOC=default`` changes nothing.
"""

from __future__ import annotations

import logging
import os
import platform
import signal
import sys
import threading

__all__ = ["MALLOC_ENV", "MALLOC_TUNABLES", "StopFlag", "configure_malloc", "defer_stop_signals",
           "malloc_environment", "mimalloc_library", "skip_absent_tpu", "take_early_signal"]

MALLOC_ENV = "TRANSFORMER_JAX_MALLOC"
MALLOC_TUNABLES = (
    "glibc.malloc.arena_max=1",
    "glibc.malloc.mmap_max=0",
    "glibc.malloc.tcache_count=0",
    "glibc.malloc.trim_threshold=1073741824",
)


_log = logging.getLogger(__name__)


def _is_glibc() -> bool:
    return sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


def mimalloc_library() -> str | None:
    """Path of ``libmimalloc.so`` from the ``cmeel-mimalloc`` wheel, or None if absent."""
    from importlib import metadata

    try:
        files = metadata.distribution("cmeel-mimalloc").files or ()
    except metadata.PackageNotFoundError:
        return None
    for f in files:
        if f.name.startswith("libmimalloc.so"):
            path = str(f.locate())
            if os.path.isfile(path):
                return os.path.realpath(path)
    return None


_DISCOVER = object()


def malloc_environment(environ=None, *, library=_DISCOVER) -> dict[str, str] | None:
    """The environment to re-execute with, or None when nothing needs to change.

    With mimalloc available (``library``: its path; default: :func:`mimalloc_library`), it is
    preloaded with ``MIMALLOC_PURGE_DELAY=-1`` (freed memory stays with the process); otherwise
    the glibc tunables of ``MALLOC_TUNABLES`` are appended to ``GLIBC_TUNABLES``. None when the
    C library is not glibc, when ``TRANSFORMER_JAX_MALLOC=default``, or when the environment
    already holds the change. ``TRANSFORMER_JAX_MALLOC=glibc`` picks the tunables over mimalloc.
    """
    env = dict(os.environ if environ is None else environ)
    choice = env.get(MALLOC_ENV, "").strip().lower()
    if choice in ("default", "applied") or not _is_glibc():
        return None
    if library is _DISCOVER:
        library = mimalloc_library() if choice != "glibc" else None
    if library:
        preload = [p for p in env.get("LD_PRELOAD", "").replace(" ", ":").split(":") if p]
        if any("mimalloc" in os.path.basename(p) for p in preload):
            return None
        env["LD_PRELOAD"] = ":".join([library, *preload])
        env.setdefault("MIMALLOC_PURGE_DELAY", "-1")  # the user's value wins
        env[MALLOC_ENV] = "applied"
        return env
    current = [t for t in env.get("GLIBC_TUNABLES", "").split(":") if t]
    if all(t in current for t in MALLOC_TUNABLES):
        return None
    names = {t.split("=", 1)[0] for t in current}
    added = [t for t in MALLOC_TUNABLES if t.split("=", 1)[0] not in names]  # user's win
    if not added:
        return None
    env["GLIBC_TUNABLES"] = ":".join(current + added)
    env[MALLOC_ENV] = "applied"  # never re-execute twice, even if glibc ignored a tunable
    return env


def configure_malloc() -> None:
    """Re-executes the current command once with mimalloc or the glibc tunables (module doc).

    Call it first thing in ``if __name__ == "__main__":`` of an entry point, before JAX is
    imported. Returns without doing anything where ``malloc_environment()`` is None; on
    success it does not return (``os.execve`` replaces the process, same arguments).
    """
    env = malloc_environment()  # None once applied (TRANSFORMER_JAX_MALLOC=applied)
    if env is None:
        return
    argv = list(getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv])
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *argv[1:]], env)


# --------------------------------------------------------------------------- platforms
_TPU_DEVICE_FILES = ("/dev/accel*", "/dev/vfio/[0-9]*")  # how a TPU VM exposes its chips
_GPU_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin",
                "jax_rocm7_plugin")


def skip_absent_tpu(environ=None) -> bool:
    """Keeps JAX from probing for a TPU that is not there when libtpu is installed anyway.

    libtpu (the ``aot`` extra, for compiling TPU programs on any machine) makes every JAX
    process try to start a TPU backend: off a TPU VM that costs ~0.25 s and prints a
    multi-line libtpu error about worker hostnames. Where libtpu is installed, no TPU device
    file exists, no GPU plugin is installed and the user chose no platform, this sets
    ``JAX_PLATFORMS=cpu`` (call it before JAX is imported). Returns whether it did.
    """
    import glob
    import importlib.util

    environ = os.environ if environ is None else environ
    if "JAX_PLATFORMS" in environ or importlib.util.find_spec("libtpu") is None:
        return False
    if any(glob.glob(pattern) for pattern in _TPU_DEVICE_FILES):
        return False
    if any(importlib.util.find_spec(name) is not None for name in _GPU_PLUGINS):
        return False
    environ["JAX_PLATFORMS"] = "cpu"
    return True


# --------------------------------------------------------------------------- early stop signals
_EARLY_SIGNALS: list[int] = []


def _record_signal(signum, _frame) -> None:
    if _EARLY_SIGNALS and signum == signal.SIGINT:
        raise KeyboardInterrupt  # a second Ctrl-C: stop at once
    _EARLY_SIGNALS.append(signum)


def defer_stop_signals() -> None:
    """Records SIGTERM / SIGINT that arrive while the entry point is still importing.

    A multi-process job must stop every process at the same update, so a signal to one
    process during start-up cannot simply kill it (the others would wait for it until the
    heartbeat timeout). The training loop installs its own handlers later and acts on a
    recorded signal at its first update (:func:`take_early_signal`).
    """
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, _record_signal)


def take_early_signal() -> int | None:
    """The first signal :func:`defer_stop_signals` recorded (None if none), and forget it."""
    signum = _EARLY_SIGNALS[0] if _EARLY_SIGNALS else None
    _EARLY_SIGNALS.clear()
    return signum


class StopFlag:
    """Set by SIGTERM/SIGINT while set up or training; restores the old handlers on exit.

    Re-entrant: the trainer enters it around set-up and training (a signal that arrives while
    compiling is acted on at the first update) and around training alone. A signal that came
    while the program was still importing (``defer_stop_signals``) is taken over on entry.
    """

    def __init__(self):
        self.signum: int | None = None
        self._old = {}
        self._depth = 0

    def __enter__(self):
        self._depth += 1
        if self._depth == 1 and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
            early = take_early_signal()  # one that arrived while train.py was importing
            if early is not None and self.signum is None:
                self._handle(early, None)
        return self

    def _handle(self, signum, _frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: stop at once
        self.signum = signum
        _log.warning("received signal %d: finishing this update, then saving", signum)

    def __exit__(self, *exc):
        self._depth -= 1
        if self._depth == 0:
            for sig, handler in self._old.items():
                signal.signal(sig, handler)
            self._old = {}
        return False
