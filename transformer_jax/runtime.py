"""Process-wide settings for fast CPU runs, applied by the command-line entry points.

``configure_malloc()`` makes glibc keep freed memory in the process. XLA's CPU runtime
allocates the temporary buffer of every compiled call (all activations and gradients of a
training step: about 600 MB for the ``small`` benchmark model) with ``posix_memalign`` and frees
it when the call ends. With glibc's defaults a block that large gets its own ``mmap`` and is
unmapped on ``free``, so the next step faults every page back in, zeroed by the kernel
(~150,000 minor page faults and a large share of system time per step). ``mallopt`` from
inside the process cannot fix it: worker threads allocate from per-thread arenas that cannot
hold a block over 64 MiB (they fall back to ``mmap``), and the thread cache (tcache) keeps
the small tail that ``posix_memalign`` splits off, so a freed block never merges back and is
never reused. Both are only configurable by ``GLIBC_TUNABLES`` at process start, so the entry
points (``train.py``, ``python -m transformer_jax.translate``) re-execute themselves once
with

  ``glibc.malloc.arena_max=1``   one heap for all threads (brk-grown, so big blocks fit)
  ``glibc.malloc.mmap_max=0``    no block gets its own mapping
  ``glibc.malloc.tcache_count=0`` freed tails coalesce, so the same block is reused
  ``glibc.malloc.trim_threshold=1 GiB``  free space at the top of the heap is kept

appended to whatever ``GLIBC_TUNABLES`` the user set. Only glibc on Linux is touched.
``TRANSFORMER_JAX_MALLOC=default`` keeps glibc's own settings (no re-execution).
"""

from __future__ import annotations

import os
import platform
import signal
import sys
import threading

__all__ = ["MALLOC_ENV", "MALLOC_TUNABLES", "configure_malloc", "defer_stop_signals",
           "malloc_environment", "take_early_signal"]

MALLOC_ENV = "TRANSFORMER_JAX_MALLOC"
MALLOC_TUNABLES = (
    "glibc.malloc.arena_max=1",
    "glibc.malloc.mmap_max=0",
    "glibc.malloc.tcache_count=0",
    "glibc.malloc.trim_threshold=1073741824",
)


def _is_glibc() -> bool:
    return sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


def malloc_environment(environ=None) -> dict[str, str] | None:
    """The environment to re-execute with, or None when nothing needs to change.

    None when the C library is not glibc, when ``TRANSFORMER_JAX_MALLOC=default``, or when
    ``GLIBC_TUNABLES`` already holds every tunable of ``MALLOC_TUNABLES``.
    """
    env = dict(os.environ if environ is None else environ)
    if env.get(MALLOC_ENV, "").strip().lower() == "default" or not _is_glibc():
        return None
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
    """Re-executes the current command once with the glibc tunables (see the module docstring).

    Call it first thing in ``if __name__ == "__main__":`` of an entry point, before JAX is
    imported. Returns without doing anything where ``malloc_environment()`` is None; on
    success it does not return (``os.execve`` replaces the process, same arguments).
    """
    env = malloc_environment()
    if env is None or os.environ.get(MALLOC_ENV) == "applied":
        return
    argv = list(getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv])
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *argv[1:]], env)


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
