"""What the row streams read (token ids of examples) and how a batch is laid out with numpy.

A reader answers ``read(row, start, count)`` — examples ``start .. start+count-1`` of row
``row``'s stream (see ``streams.py``) as a :class:`Chunk` of plain lists (the packing loop
touches only their lengths) — and ``tokens(refs, side)``, the ids behind a batch's examples:

* :class:`CachedReader`: ids from the token-id cache (``token_cache.py``); an example is its
  index in the split and nothing is tokenized while training;
* :class:`OnlineReader`: reads the text and tokenizes it (subword sampling draws a new
  segmentation every epoch; sources without a cache); an example is its pair of id arrays.
  The tokenizing can run in worker processes (``workers.py``): the result is the same.

:func:`layout_rows` turns rows of examples into the batch arrays in a few numpy calls over
all tokens of the batch at once.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from transformer_jax.data.tokenizer import EOS_ID

_GROUP_PAIRS = 256  # chunks started ahead are read and sent to the workers this many at once

__all__ = ["CachedIds", "CachedReader", "Chunk", "OnlineReader", "layout_rows"]


@dataclasses.dataclass
class Chunk:
    """Examples ``start ..`` of one stream: parallel lists (``keep`` False: dropped)."""

    start: int
    refs: list
    source_lengths: list[int]
    target_lengths: list[int]
    keep: list[bool]


def _ratio_keep(source_lengths: np.ndarray, target_lengths: np.ndarray, ratio: float):
    """``Preprocessor.keep`` on arrays of lengths (EOS included)."""
    if not ratio:
        return np.ones(len(source_lengths), bool)
    a, b = np.maximum(source_lengths - 1, 1), np.maximum(target_lengths - 1, 1)
    return np.maximum(a, b) <= ratio * np.minimum(a, b)


def _keys(positions: np.ndarray) -> list[int]:
    """Subword-sampling draw keys: source ``2p``, target ``2p + 1`` of global position ``p``."""
    p = positions.tolist()
    return [2 * q for q in p] + [2 * q + 1 for q in p]


def _record_dropped(stats, indices) -> None:
    if len(indices):
        with stats._lock:
            stats.dropped_train_ids.update(indices)


class CachedIds:
    """Examples are indices into a split's cached ids (``token_cache.TokenIds``)."""

    def __init__(self, token_ids):
        self.token_ids = token_ids
        self._stored = token_ids.stored_lengths  # [2, n]

    def tokens(self, refs: list, side: int):
        """(ids [T], starts [E], lengths [E]) of side ``side`` (0 source, 1 target) of refs."""
        index = np.asarray(refs, np.int64)
        return self.token_ids.ids, self.token_ids.starts[side, index], self._stored[side, index]


class CachedReader(CachedIds):
    """Examples from cached token ids: a few numpy gathers per chunk, no tokenizing."""

    def __init__(self, spec, token_ids, preprocessor):
        super().__init__(token_ids)
        self.spec = spec
        lengths = token_ids.lengths  # [2, n], untrimmed
        ratio = preprocessor.max_length_ratio if preprocessor is not None else 0.0
        self._keep = ((lengths.max(axis=0) <= spec.max_length)
                      & _ratio_keep(lengths[0], lengths[1], ratio))  # [n]

    def read(self, row: int, start: int, count: int) -> Chunk:
        spec = self.spec
        stop = min(row + (start + count) * spec.batch_size, spec.end)
        positions = np.arange(row + start * spec.batch_size, stop, spec.batch_size)
        index = spec.order(positions)  # [m]
        keep = self._keep[index]
        _record_dropped(spec.stats, index[~keep].tolist())
        lens = self._stored[:, index]
        return Chunk(start, index.tolist(), lens[0].tolist(), lens[1].tolist(), keep.tolist())


@dataclasses.dataclass
class _Job:
    """A chunk being tokenized: its example indices and, once there, ids or a pool handle."""

    positions: np.ndarray
    indices: list[int]
    ids: list | None = None
    part: object = None  # workers.TokenizerPool handle, once sent


class OnlineReader:
    """Examples read as text and tokenized now; with a ``workers.TokenizerPool`` the sampled
    segmentation runs in worker processes, and each stream's next chunk is started ahead
    (chunks are read and sent to the workers in groups: one read and one task per group)."""

    def __init__(self, spec, source, tokenizer, pool=None):
        self.spec, self.source, self.tokenizer = spec, source, tokenizer
        self.pool = pool if spec.subword_sampling else None
        self._pending: dict[tuple[int, int, int], _Job] = {}  # started chunks
        self._unsent: list[_Job] = []  # started, text not read yet

    def _start(self, row: int, start: int, count: int) -> _Job:
        spec = self.spec
        stop = min(row + (start + count) * spec.batch_size, spec.end)
        positions = np.arange(row + start * spec.batch_size, stop, spec.batch_size)
        job = _Job(positions, spec.order(positions).tolist())
        if self.pool is not None:
            self._unsent.append(job)
            if sum(len(j.indices) for j in self._unsent) >= _GROUP_PAIRS:
                self.flush()
            return job
        texts = self._texts(job.indices)
        if not spec.subword_sampling:
            job.ids = self.tokenizer.encode(texts)
        else:
            alpha, nbest_size = spec.subword_sampling
            job.ids = self.tokenizer.encode_sampled(texts, _keys(job.positions), alpha=alpha,
                                                    nbest_size=nbest_size, seed=spec.seed)
        return job

    def _texts(self, indices: list[int]) -> list[str]:
        pairs = self.source.__getitems__(indices) if indices else []
        return [s for s, _ in pairs] + [t for _, t in pairs]

    def flush(self) -> None:
        """Reads the text of the chunks started and sends it to the workers."""
        jobs, self._unsent = self._unsent, []
        if not jobs:
            return
        pairs = self.source.__getitems__([i for j in jobs for i in j.indices])
        alpha, nbest_size = self.spec.subword_sampling  # a new draw per side, example, epoch
        at = 0
        for job in jobs:
            mine = pairs[at : at + len(job.indices)]
            at += len(job.indices)
            job.part = self.pool.submit([s for s, _ in mine] + [t for _, t in mine],
                                        _keys(job.positions), alpha, nbest_size, self.spec.seed)
        self.pool.flush()

    def expect(self, row: int, start: int, count: int) -> None:
        """Starts the chunk in the workers now, so it is ready when read (pool only)."""
        key = (row, start, count)
        if (self.pool is not None and key not in self._pending
                and row + start * self.spec.batch_size < self.spec.end):
            self._pending[key] = self._start(row, start, count)

    def forget(self) -> None:
        """Drops the chunks started ahead (the streams moved: ``set_state``)."""
        self._pending.clear()
        self._unsent.clear()

    def read(self, row: int, start: int, count: int) -> Chunk:
        job = self._pending.pop((row, start, count), None) or self._start(row, start, count)
        self.expect(row, start + count, count)  # this stream's next chunk
        if self.pool is not None:
            if job.part is None:
                self.flush()
            job.ids = self.pool.result(job.part)
        ids, indices, m = job.ids, job.indices, len(job.indices)
        refs = [(np.asarray(ids[i] + [EOS_ID], np.int32), np.asarray(ids[m + i] + [EOS_ID],
                                                                        np.int32))
                for i in range(m)]
        src = np.fromiter((len(r[0]) for r in refs), np.int64, m)
        tgt = np.fromiter((len(r[1]) for r in refs), np.int64, m)
        preprocessor = getattr(self.source, "preprocessor", None)  # PairSource has one
        ratio = preprocessor.max_length_ratio if preprocessor is not None else 0.0
        keep = (np.maximum(src, tgt) <= self.spec.max_length) & _ratio_keep(src, tgt, ratio)
        _record_dropped(self.spec.stats, [i for i, k in zip(indices, keep, strict=True) if not k])
        return Chunk(start, refs, src.tolist(), tgt.tolist(), keep.tolist())

    def tokens(self, refs: list, side: int):
        arrays = [r[side] for r in refs]
        lengths = np.fromiter(map(len, arrays), np.int64, len(arrays))
        flat = np.concatenate(arrays) if arrays else np.zeros(0, np.int32)
        return flat, np.cumsum(lengths) - lengths, lengths


def layout_rows(rows: list[list], reader, length: int) -> dict[str, np.ndarray]:
    """Rows of examples (``reader`` refs, in segment order) -> int32 ``[R, length]`` arrays.

    Example ``j`` of a row is segment ``j + 1``; its tokens follow the previous example's
    (positions restart at 0); everything after the last example is 0.
    """
    num_rows = len(rows)
    counts = np.fromiter(map(len, rows), np.int64, num_rows)  # [R]
    refs = [ref for row in rows for ref in row]  # [E]
    row_of = np.repeat(np.arange(num_rows), counts)  # [E]
    segment = np.arange(len(refs)) - np.repeat(np.cumsum(counts) - counts, counts) + 1  # [E]
    out = {f"{key}{part}": np.zeros((num_rows, length), np.int32)
           for key in ("inputs", "targets") for part in ("", "_segmentation", "_position")}
    if not refs:
        return out
    for side, key in enumerate(("inputs", "targets")):
        flat, starts, lens = reader.tokens(refs, side)  # lens [E]
        first = np.cumsum(lens) - lens  # where each example begins among all tokens
        before_row = np.bincount(row_of, weights=lens, minlength=num_rows).astype(np.int64)
        row_start = np.cumsum(before_row) - before_row  # [R] tokens of the rows before
        example = np.repeat(np.arange(len(refs)), lens)  # [T]: the example of each token
        within = np.arange(len(example)) - first[example]  # [T]: position in its example
        where = (row_of * length + first - row_start[row_of])[example] + within  # [T]
        out[key].reshape(-1)[where] = flat[starts[example] + within]
        out[f"{key}_segmentation"].reshape(-1)[where] = segment[example]
        out[f"{key}_position"].reshape(-1)[where] = within
    return out
