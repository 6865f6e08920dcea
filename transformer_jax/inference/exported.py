"""Translate programs kept on disk as ``jax.export`` artifacts, so a later process skips
tracing and lowering them (JAX's persistent compilation cache then skips compiling them).

``ProgramStore(directory).wrap(fn, settings)`` turns a jitted ``fn(params, src_ids)`` into a
callable of the same arguments. For each new ``src_ids`` shape it looks for a file whose name
is a sha256 over everything the program depends on:

* the search settings (``settings``: beam, length penalty, decode buffer, ...);
* the params' tree structure, shapes and dtypes (hence the model config) and ``src_ids``'s
  shape and dtype; the param *values* are arguments, never baked in, so a retrained or
  averaged checkpoint of the same architecture shares the program;
* the JAX and jaxlib versions, the backend and its device kind, the JAX settings that change
  lowering (x64, default matmul precision);
* the source of the ``transformer_jax`` package (every ``.py`` file), so an edited model or
  search never runs a stale program.

Found: the program is deserialized and called (``jax.jit(exported.call)``). Missing: ``fn``
is exported, written (checksummed, atomically) and called the same way, so the first and
later runs run one and the same program. A file that fails its checksum, does not
deserialize or takes other arguments is reported in one warning line on stderr and written
anew; a program that cannot be exported, or a store that cannot be written, falls back to
``fn`` with one warning.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import sys
import tempfile
from collections.abc import Callable, Mapping

import jax
import numpy as np

__all__ = ["ProgramStore", "source_digest"]

MAGIC = b"transformer_jax exported program v1\n"
SUFFIX = ".jaxexport"
_DIGEST = 64  # hex characters of a sha256


@functools.lru_cache(maxsize=1)
def source_digest() -> str:
    """sha256 over the relative paths and contents of the package's ``.py`` files."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    digest = hashlib.sha256()
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files):
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                digest.update(os.path.relpath(path, root).encode() + b"\0")
                with open(path, "rb") as f:
                    digest.update(f.read() + b"\0")
    return digest.hexdigest()


def _environment() -> dict:
    device = jax.local_devices()[0]
    return {
        "jax": jax.__version__,
        "jaxlib": jax.lib.__version__,
        "backend": jax.default_backend(),
        "device_kind": device.device_kind,
        "x64": bool(jax.config.jax_enable_x64),
        "matmul_precision": str(jax.config.jax_default_matmul_precision),
        "source": source_digest(),
    }


def _avals(leaves) -> list[tuple[tuple[int, ...], str]]:
    return [(tuple(int(d) for d in np.shape(x)), str(np.dtype(x.dtype))) for x in leaves]


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def _one_line(err: Exception, limit: int = 160) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


class ProgramStore:
    """Exported programs in ``directory`` (made when first written)."""

    def __init__(self, directory: str):
        self.directory = os.path.abspath(os.path.expanduser(directory))
        self._environment: dict | None = None
        self.writable = True

    def key(self, settings: Mapping, treedef, leaves, src) -> str:
        """The file name stem of a program: a sha256 over all it depends on."""
        if self._environment is None:
            self._environment = _environment()
        described = {
            "settings": {str(k): repr(v) for k, v in sorted(settings.items())},
            "tree": str(treedef),
            "params": _avals(leaves),
            "src": _avals([src]),
            "environment": self._environment,
        }
        return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()

    def path(self, key: str) -> str:
        return os.path.join(self.directory, key + SUFFIX)

    def wrap(self, fn: Callable, settings: Mapping) -> Callable:
        """``fn(params, src_ids)`` (jitted), answered by exported programs, one per shape."""
        if importlib.util.find_spec("flatbuffers") is None:  # jax.export's serialization
            if self.writable:
                _warn("flatbuffers is not installed, so translate programs are traced in "
                      "every run; pip install flatbuffers to keep them.")
            self.writable = False
            return fn
        by_shape: dict[tuple, Callable] = {}

        def call(params, src_ids):
            leaves, treedef = jax.tree_util.tree_flatten(params)
            shape = (treedef, tuple(_avals(leaves)), tuple(_avals([src_ids])))
            if shape not in by_shape:
                by_shape[shape] = self._program(fn, settings, treedef, leaves, src_ids)
            return by_shape[shape](leaves, src_ids)

        return call

    # ------------------------------------------------------------------ one program
    def _program(self, fn, settings, treedef, leaves, src) -> Callable:
        """``program(leaves, src_ids)``: the stored export, a new one, or ``fn`` itself."""
        key = self.key(settings, treedef, leaves, src)
        exported = self._read(self.path(key), leaves, src)
        if exported is None:
            flat = jax.jit(lambda flat_params, ids: fn(treedef.unflatten(flat_params), ids))
            try:
                exported = jax.export.export(flat)(
                    [jax.ShapeDtypeStruct(np.shape(x), x.dtype) for x in leaves],
                    jax.ShapeDtypeStruct(np.shape(src), src.dtype))
            except Exception as err:  # e.g. a custom call without export guarantees
                _warn(f"the translate program cannot be exported ({_one_line(err)}); it is "
                      "traced in every run.")
                return lambda flat_params, ids: fn(treedef.unflatten(flat_params), ids)
            self._write(self.path(key), exported)
        return jax.jit(exported.call)

    def _read(self, path: str, leaves, src):
        """The ``Exported`` in ``path``; None (with a warning when it exists) if unusable."""
        try:
            with open(path, "rb") as f:
                blob = f.read()
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as err:
            _warn(f"cannot read the exported program {path} ({err.strerror}); exporting it "
                  "again.")
            return None
        head = len(MAGIC) + _DIGEST + 1
        payload = blob[head:]
        digest = blob[len(MAGIC): head - 1].decode("ascii", "replace")
        if not blob.startswith(MAGIC) or hashlib.sha256(payload).hexdigest() != digest:
            _warn(f"the exported program {path} is damaged (checksum); exporting it again.")
            return None
        try:
            exported = jax.export.deserialize(bytearray(payload))
        except Exception as err:
            _warn(f"the exported program {path} cannot be read ({_one_line(err)}); exporting "
                  "it again.")
            return None
        expected = _avals(leaves) + _avals([src])
        if _avals(exported.in_avals) != expected or len(exported.out_avals) != 1:
            _warn(f"the exported program {path} takes other arguments than this model's; "
                  "exporting it again.")
            return None
        return exported

    def _write(self, path: str, exported) -> None:
        """``MAGIC``, the payload's sha256, the payload; written whole or not at all."""
        if not self.writable:
            return
        payload = bytes(exported.serialize())
        blob = MAGIC + hashlib.sha256(payload).hexdigest().encode("ascii") + b"\n" + payload
        try:
            os.makedirs(self.directory, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".tmp-", suffix=SUFFIX)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(blob)
                os.replace(tmp, path)
            except BaseException:
                os.unlink(tmp)
                raise
        except OSError as err:
            self.writable = False
            _warn(f"cannot keep exported programs in {self.directory} ({err.strerror}); they "
                  "are traced in every run.")
