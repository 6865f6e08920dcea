"""Test-wide setup: eight virtual CPU devices so multi-device code runs on one host, and one
XLA compilation cache for the session.

The end-to-end tests start many ``train.py`` processes that compile the same tiny programs;
JAX's persistent compilation cache lets every process after the first load them instead. The
cache lives in a temporary folder made by the pytest process that loads this file first (the
pytest-xdist controller), is inherited through the environment by the workers and every
subprocess they start, and is deleted when that process exits. Set
``JAX_COMPILATION_CACHE_DIR`` yourself to keep a cache between sessions (or to an empty string
to compile everything afresh).
"""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="transformer-jax-tests-xla-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
