"""Worker processes for the per-example work left on the training path: subword sampling.

With ``data.subword_sampling_alpha > 0`` every epoch segments each sentence anew (n-best
SentencePiece + a draw), which costs far more than the rest of the pipeline. A
:class:`TokenizerPool` runs :meth:`Tokenizer.encode_sampled` in ``data.num_workers``
processes (``spawn``; 0 = in the main process). The draw is a function of ``(seed, key)``
alone, so which worker segments a sentence changes nothing: the batches are the same under
any worker count.

* Workers never outlive the run: each polls its parent process id and exits when it changes
  (the parent ended, however: SIGTERM, kill -9 or a normal exit).
* A worker's exception reaches the main process as one :class:`DataError` line naming it.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import dataclasses
import hashlib
import multiprocessing
import os
import threading
import time
from concurrent.futures.process import BrokenProcessPool

from transformer_jax.data.tokenizer import Tokenizer
from transformer_jax.data.validation import DataError

__all__ = ["TokenizerPool", "shared_pool"]

_PARENT_POLL_S = 0.2
_GROUP_TEXTS = 512  # texts per worker task (16 chunks of 32 pairs)
_worker_tokenizer: Tokenizer | None = None


def _exit_with_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(_PARENT_POLL_S)
    os._exit(1)  # the parent is gone: nothing to deliver to


def _init_worker(model_proto: bytes) -> None:
    global _worker_tokenizer
    _worker_tokenizer = Tokenizer(model_proto)
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True,
                     name="exit-with-parent").start()


def _encode_sampled(texts, keys, alpha, nbest_size, seed):
    """In a worker: ("ok", ids) or ("error", one line)."""
    try:
        return "ok", _worker_tokenizer.encode_sampled(texts, keys, alpha=alpha,
                                                      nbest_size=nbest_size, seed=seed)
    except Exception as e:  # noqa: BLE001 - reported to the main process as one line
        message = " ".join(f"{type(e).__name__}: {e}".split())
        return "error", f"data worker process {os.getpid()} failed: {message}"


class _Group:
    """Submissions sent to the workers as one task."""

    def __init__(self, settings: tuple):
        self.settings, self.texts, self.keys, self.future = settings, [], [], None

    def add(self, texts: list, keys: list) -> _Part:
        part = _Part(self, len(self.texts), len(texts))
        self.texts += texts
        self.keys += keys
        return part


@dataclasses.dataclass
class _Part:
    """One submission's texts within a group."""

    group: _Group
    offset: int
    count: int


class TokenizerPool:
    """``num_workers`` processes segmenting text with one tokenizer (see the module doc)."""

    def __init__(self, tokenizer: Tokenizer, num_workers: int):
        if num_workers < 1:
            raise ValueError(f"num_workers={num_workers} must be >= 1 for a pool.")
        self.num_workers, self.broken = num_workers, False
        self._group: _Group | None = None  # submissions not sent yet
        self._executor = concurrent.futures.ProcessPoolExecutor(
            num_workers, mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_worker, initargs=(tokenizer.model_proto,))

    def submit(self, texts, keys, alpha: float, nbest_size: int, seed: int) -> _Part:
        """A handle on ``Tokenizer.encode_sampled(texts, keys, ...)``, for :meth:`result`.

        Submissions are sent to the workers in groups of at least ``_GROUP_TEXTS`` texts (or
        at :meth:`flush`): one task per group keeps the per-task cost off the main process.
        """
        settings = (alpha, nbest_size, seed)
        if self._group is not None and self._group.settings != settings:
            self.flush()
        if self._group is None:
            self._group = _Group(settings)
        part = self._group.add(list(texts), list(keys))
        if len(self._group.texts) >= _GROUP_TEXTS:
            self.flush()
        return part

    def flush(self) -> None:
        """Sends the submissions not yet sent."""
        group, self._group = self._group, None
        if group is not None:
            group.future = self._executor.submit(_encode_sampled, group.texts, group.keys,
                                                 *group.settings)

    def result(self, part: _Part) -> list[list[int]]:
        """The ids of a :meth:`submit`; a worker's failure raises one DataError line."""
        if part.group.future is None:
            self.flush()
        try:
            status, value = part.group.future.result()
        except BrokenProcessPool:
            self.broken = True
            _forget_broken()
            raise DataError("a data worker process died (killed, or out of memory); "
                            "set data.num_workers=0 to tokenize in the main process.") from None
        if status == "error":
            raise DataError(value)
        return value[part.offset : part.offset + part.count]

    def encode_sampled(self, texts, keys, alpha: float, nbest_size: int, seed: int):
        return self.result(self.submit(texts, keys, alpha, nbest_size, seed))

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)


_POOLS: dict[tuple[str, int], TokenizerPool] = {}
_POOLS_LOCK = threading.Lock()


def _forget_broken() -> None:
    """Drops pools whose workers died, so the next iterator starts fresh ones."""
    with _POOLS_LOCK:
        for key, pool in list(_POOLS.items()):
            if pool.broken:
                del _POOLS[key]


def shared_pool(tokenizer: Tokenizer, num_workers: int) -> TokenizerPool:
    """One pool per tokenizer and worker count, started on first use, closed at exit."""
    key = (hashlib.sha256(tokenizer.model_proto).hexdigest(), num_workers)
    with _POOLS_LOCK:
        if key not in _POOLS:
            _POOLS[key] = TokenizerPool(tokenizer, num_workers)
        return _POOLS[key]


@atexit.register
def _close_pools() -> None:
    for pool in _POOLS.values():
        pool.close()
    _POOLS.clear()
