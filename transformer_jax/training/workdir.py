"""The work directory of a training run: created and checked, held by one run, its tokenizer.

* :func:`make_workdir` creates the directory and checks that it takes a write.
* :class:`WorkdirLock` is ``fcntl.flock`` on ``<workdir>/.lock``, held for the run's life by
  process 0 (the file holds the holder's pid and host as JSON). A second run on the same directory
  fails at once with a message naming the holder; the operating system drops the lock when
  the holder exits, also on ``kill -9``, so a lock file left behind never blocks.
* :func:`check_tokenizer` refuses to resume checkpoints with another tokenizer than the one
  they were trained with (or with none: training would make a new one).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Mapping

from transformer_jax.data.pipeline import TOKENIZER_FILE
from transformer_jax.errors import WorkdirError

__all__ = ["LOCK_FILE", "WorkdirLock", "check_tokenizer", "file_sha256", "make_workdir"]

LOCK_FILE = ".lock"


def make_workdir(workdir: str) -> bool:
    """Create ``workdir`` and check that it takes a write; returns whether it was created.

    Raises:
      WorkdirError: it cannot be created or written (read-only, not a directory, full).
    """
    created = not os.path.isdir(workdir)
    probe = None
    try:
        os.makedirs(workdir, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write_check_", dir=workdir)
        with os.fdopen(fd, "wb") as f:
            f.write(b"\0" * 4096)
            f.flush()
            os.fsync(f.fileno())
        os.remove(probe)
    except OSError as err:
        if probe is not None:
            with contextlib.suppress(OSError):
                os.remove(probe)
        if created:
            shutil.rmtree(workdir, ignore_errors=True)
        raise WorkdirError(
            f"cannot write to the work directory {workdir} ({err.strerror or err}); choose a "
            "--workdir on a writable file system with free space."
        ) from None
    return created


class WorkdirLock:
    """An exclusive ``flock`` on ``<workdir>/.lock``; :meth:`release` (or process exit) frees it.

    Args:
      workdir: an existing directory.
    """

    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, LOCK_FILE)
        self._file = None

    def acquire(self) -> str:
        """Take the lock; returns "" or, when another run holds it, the one-line reason.

        Opening the file neither truncates nor rewrites it, so a refused run changes nothing.
        """
        f = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115 - held for the run's life
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            who = _holder(f.read())
            f.close()
            return (f"the work directory {os.path.dirname(self.path)} is in use by another run "
                    f"({who}, see {self.path}); wait for it to end or stop it, or choose "
                    "another --workdir.")
        f.seek(0)
        f.truncate()
        json.dump({"pid": os.getpid(), "host": socket.gethostname()}, f)
        f.write("\n")
        f.flush()
        self._file = f
        return ""

    def release(self) -> None:
        """Free the lock (idempotent); the file stays, so no other run can race on its inode."""
        if self._file is not None:
            self._file.close()  # closing the only descriptor drops the flock
            self._file = None


def _holder(text: str) -> str:
    """``process PID on HOST`` from a lock file's JSON (what an unreadable one says)."""
    try:
        record = json.loads(text)
        return f"process {int(record['pid'])} on {record['host']}"
    except (ValueError, KeyError, TypeError):
        return f"unknown holder: {' '.join(text.split())[:80]!r}"


def file_sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def check_tokenizer(workdir: str, step: int, meta: Mapping) -> None:
    """Refuse to resume checkpoint ``step`` (its ``meta``) of ``workdir`` with a tokenizer other
    than the one it was trained with, or without one (data preparation would train a new one).

    Raises:
      WorkdirError: one line naming the file and how to fix it.
    """
    want = (meta.get("tokenizer") or {}).get("sha256")
    if not want:
        return
    path = os.path.join(workdir, TOKENIZER_FILE)
    if not os.path.isfile(path):
        raise WorkdirError(
            f"{workdir} holds checkpoint step {step} but not its tokenizer {path}; restore the "
            "run's tokenizer/spm.model (a new one would not fit the trained embeddings) or "
            "choose a fresh --workdir.")
    if file_sha256(path) != want:
        raise WorkdirError(
            f"the tokenizer {path} is not the one checkpoint step {step} in {workdir} was "
            "trained with (sha256 differs); restore the run's tokenizer/spm.model or choose a "
            "fresh --workdir.")
