"""What every benchmark records about the machine it ran on (imported by the bench scripts)."""

from __future__ import annotations

import importlib
import os
import platform

_ENV_KEYS = ("XLA_FLAGS", "LD_PRELOAD", "GLIBC_TUNABLES", "MIMALLOC_PURGE_DELAY", "OMP_NUM_THREADS",
             "MALLOC_CONF", "TCMALLOC_RELEASE_RATE")


def cpu_model() -> str:
    """The ``model name`` line of /proc/cpuinfo ("" where there is none)."""
    if not os.path.exists("/proc/cpuinfo"):
        return ""
    with open("/proc/cpuinfo") as f:
        return next((line.split(":", 1)[1].strip() for line in f
                     if line.startswith("model name")), "")


def machine_info(*packages: str, **extra) -> dict:
    """CPU, load, platform, the versions of ``packages`` and the environment that tunes them.

    The 1-minute load average is recorded because these machines are often shared: a number
    measured next to other work is not the machine's speed.
    """
    info = {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }
    for name in packages:
        module = importlib.import_module(name)
        info[name] = getattr(module, "__version__", "")
    if "jax" in packages:
        import jax

        info["backend"] = jax.default_backend()
        info["device"] = str(jax.devices()[0].device_kind)
    info["env"] = {k: os.environ[k] for k in _ENV_KEYS if k in os.environ}
    info.update(extra)
    return info


def write_json(path: str, result: dict) -> None:
    """Write a benchmark result as indented JSON (creating the folder), whole: a temporary file
    renamed over ``path``, so a reader (or a run killed mid-write) never sees half a file."""
    import json

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(result, f, indent=2, default=str)
        f.write("\n")
    os.replace(path + ".tmp", path)
