"""Training batches as independent row streams: the batch order ignores the process count.

Row ``r`` of every global batch (``0 <= r < B``, ``B`` the global batch size) comes from its
own stream, and only from it::

    order  = the training indices, shuffled with ``seed`` and reshuffled every epoch, repeated
    stream r = order[r], order[r + B], order[r + 2B], ...     (example k of row r: order[r + kB])
      -> token ids with EOS, from the split's token-id cache (tokenized once, see
         token_cache.py), or with data.subword_sampling_alpha > 0 tokenized now (a
         segmentation drawn per example, side and epoch, keyed by the global position);
         pairs longer than max_length are skipped (and counted)
      -> packed: windows of ``bins`` rows filled first-fit; at the first example that fits
         none of its rows the window is packed again largest-first with it (once); a
         window closes at the first example that fits none, and its rows are emitted in order
         padded: one example per row

Which process reads a row changes nothing about the row, so the sequence of global batches
depends on the data, the seed and ``B`` only. The position of row ``r`` is two integers:
``(window_start, emitted)`` — the stream index ``k`` of the first example of the current
window and how many of its rows were already emitted. Re-packing the window from
``window_start`` is deterministic, so these two numbers restore the row exactly. The global
state is the list of all ``B`` positions: the same on every process, and valid under any
process count that divides ``B``.

The packing loop touches only example lengths (Python ints, a few per example); the batch's
arrays are laid out by ``examples.layout_rows`` in numpy over all its tokens at once.
"""

from __future__ import annotations

import queue
import sys
import threading
from collections.abc import Callable, Sequence

import numpy as np
from jax.experimental import multihost_utils

from transformer_jax.data.examples import CachedReader, Chunk, OnlineReader, layout_rows
from transformer_jax.data.order import EpochOrder
from transformer_jax.errors import ConfigError

__all__ = ["BATCH_KEYS", "RowStream", "StreamSpec", "TrainBatches", "allgather_states",
           "merge_states"]

STATE_FORMAT = "row_streams/1"
PACKER = "first_fit/largest_first_once"  # how windows are packed (part of a state's identity)
_READ_CHUNK = 32  # examples read and tokenized at once per row
BATCH_KEYS = (
    "inputs", "targets", "inputs_segmentation", "targets_segmentation",
    "inputs_position", "targets_position",
)


class StreamSpec:
    """What fixes the streams: the data order, global batch size, length and packing.

    ``token_ids`` (the split's ``token_cache.TokenIds``) makes the streams read cached ids;
    without it, or with subword sampling, they tokenize the text as they go (``pool``: a
    ``workers.TokenizerPool`` doing that in worker processes).
    """

    def __init__(self, source, tokenizer, stats, *, batch_size: int, seed: int,
                 max_length: int, packing: bool, bins: int, num_epochs: int | None = None,
                 subword_sampling: tuple[float, int] | None = None, token_ids=None, pool=None):
        self.source, self.tokenizer, self.stats = source, tokenizer, stats
        self.subword_sampling = subword_sampling  # (alpha, nbest_size) or None
        self.batch_size, self.seed, self.max_length = batch_size, seed, max_length
        self.packing, self.bins = packing, bins if packing else 1
        self.order = EpochOrder(len(source), seed)  # = grain's range(n).shuffle(seed).repeat()
        # Global positions past the last epoch (finite epochs only).
        self.end = len(source) * num_epochs if num_epochs is not None else sys.maxsize
        if token_ids is not None and not subword_sampling:
            self.reader = CachedReader(self, token_ids, getattr(source, "preprocessor", None))
        else:
            self.reader = OnlineReader(self, source, tokenizer, pool)

    def identity(self) -> dict:
        """The settings a saved state is only valid for."""
        return {"batch_size": self.batch_size, "seed": self.seed, "max_length": self.max_length,
                "packing": self.packing, "bins": self.bins, "packer": PACKER,
                "subword_sampling": list(self.subword_sampling) if self.subword_sampling else None}


_MAX_SKIPPED = 10_000  # consecutive dropped pairs that stop training with an error


def _largest_first(items: list[tuple], nbins: int, length: int):
    """First fit decreasing (by source + target length; ties in stream order) of
    ``(ref, source length, target length)`` items: (rows of refs, used source, used target),
    or None when they do not all fit in ``nbins`` rows of ``length``."""
    bins: list[list] = [[] for _ in range(nbins)]
    used_source, used_target = [0] * nbins, [0] * nbins
    for t in sorted(range(len(items)), key=lambda t: (-items[t][1] - items[t][2], t)):
        ref, a, b = items[t]
        for i in range(nbins):
            if used_source[i] + a <= length and used_target[i] + b <= length:
                bins[i].append(ref)
                used_source[i] += a
                used_target[i] += b
                break
        else:
            return None
    return bins, used_source, used_target


class RowStream:
    """Row ``row`` of every global batch (see the module docstring)."""

    def __init__(self, spec: StreamSpec, row: int):
        self.spec, self.row = spec, row
        self.window_start, self.emitted = 0, 0
        self._window: list[list] | None = None  # rows (lists of examples) of the window
        self._window_end = 0
        self._chunk: Chunk | None = None  # examples read last

    @property
    def position(self) -> tuple[int, int]:
        return self.window_start, self.emitted

    def set_position(self, window_start: int, emitted: int) -> None:
        self.window_start, self.emitted = int(window_start), int(emitted)
        self._window = None

    def _chunk_at(self, k: int) -> Chunk:
        """The chunk holding example ``k`` of this stream (read if needed; empty at the end)."""
        chunk = self._chunk
        if chunk is None or not chunk.start <= k < chunk.start + len(chunk.keep):
            chunk = self._chunk = self.spec.reader.read(self.row, k, _READ_CHUNK)
        return chunk

    def _pack_window(self) -> None:
        """First fit of the examples from ``window_start`` into ``bins`` rows. At the first
        example that fits none, the window's examples and it are packed again, largest
        first (once per window); the window closes if that fails too, and this example
        starts the next one. Plain ints: no numpy per example."""
        spec = self.spec
        length, nbins, packing = spec.max_length, spec.bins, spec.packing
        bins: list[list] = [[] for _ in range(nbins)]
        used_source, used_target = [0] * nbins, [0] * nbins
        items: list[tuple] = []  # (ref, source length, target length) in stream order
        k, skipped, limit = self.window_start, 0, max(len(spec.source), _MAX_SKIPPED)
        repacked = not packing or nbins == 1
        chunk = self._chunk_at(k)
        while True:
            j = k - chunk.start
            if j >= len(chunk.keep):
                chunk = self._chunk_at(k)
                j = 0
                if not chunk.keep:  # finite epochs: the stream ended
                    break
            if not chunk.keep[j]:
                skipped += 1  # dropped in a row; the limit or the whole data set: none fits
                if skipped >= limit:
                    raise ConfigError(
                        f"none of {skipped} training pairs in a row fits data.max_length="
                        f"{length} tokens (EOS included) and data.max_length_ratio; raise "
                        "data.max_length.")
                k += 1
                continue
            skipped = 0
            item = (chunk.refs[j], chunk.source_lengths[j], chunk.target_lengths[j])
            for i in range(nbins):
                if used_source[i] + item[1] <= length and used_target[i] + item[2] <= length \
                        and (packing or not bins[i]):
                    bins[i].append(item[0])
                    used_source[i] += item[1]
                    used_target[i] += item[2]
                    break
            else:
                packed = None if repacked else _largest_first([*items, item], nbins, length)
                if packed is None:
                    break  # closes the window; this example starts the next one
                bins, used_source, used_target = packed
                repacked = True
            items.append(item)
            k += 1
        self._window = [b for b in bins if b]
        self._window_end = k

    def start_reading(self) -> None:
        """Lets the reader start the chunk the next window needs (worker processes)."""
        chunk = self._chunk
        if self._window is None and (chunk is None or not chunk.start <= self.window_start
                                     < chunk.start + len(chunk.keep)):
            self.spec.reader.expect(self.row, self.window_start, _READ_CHUNK)

    def next_row(self) -> list | None:
        """The examples of the next packed row, or None once a finite stream is exhausted."""
        if self._window is None:
            self._pack_window()
        if self.emitted >= len(self._window):  # only an exhausted (finite) stream
            return None
        row = self._window[self.emitted]
        self.emitted += 1
        if self.emitted == len(self._window):
            self.window_start, self.emitted, self._window = self._window_end, 0, None
        return row


def merge_states(local_states: Sequence[dict]) -> dict:
    """One global state from the ``local_state()`` of every process (any order)."""
    first = local_states[0]
    positions: dict[int, list[int]] = {}
    for local in local_states:
        if local["identity"] != first["identity"]:
            raise ValueError("local states come from iterators with different settings: "
                             f"{local['identity']} vs {first['identity']}.")
        for row, pos in zip(local["rows"], local["positions"], strict=True):
            positions[int(row)] = [int(p) for p in pos]
    batch_size = first["identity"]["batch_size"]
    if sorted(positions) != list(range(batch_size)):
        raise ValueError(f"local states cover rows {sorted(positions)}, not all of "
                         f"0..{batch_size - 1}; pass the local state of every process.")
    return {"format": STATE_FORMAT, **first["identity"],
            "positions": [positions[r] for r in range(batch_size)]}


def allgather_states(local: dict) -> list[dict]:
    """Every process's ``local_state()`` (a collective: all processes call it together)."""
    rows = np.asarray([[r, *p] for r, p in zip(local["rows"], local["positions"], strict=True)],
                      np.int64)  # [R, 3]: row, window_start, emitted
    if rows.max(initial=0) >= 2**31:
        raise OverflowError("row stream position beyond 2**31 cannot be gathered as int32.")
    gathered = np.asarray(multihost_utils.process_allgather(rows.astype(np.int32)))  # [P, R, 3]
    return [{"identity": local["identity"], "rows": g[:, 0].tolist(),
             "positions": g[:, 1:].tolist()} for g in gathered]


class TrainBatches:
    """This process's rows ``[lo, hi)`` of each global batch, with global state.

    Args:
      spec: the streams' definition.
      lo, hi: the global rows this process materialises.
      gather: ``local_state -> list of every process's local_state`` (a collective when there
        are several processes; None for one process).
      prefetch: batches prepared ahead in a background thread (0: none).
    """

    def __init__(self, spec: StreamSpec, lo: int, hi: int, *,
                 gather: Callable[[dict], list[dict]] | None, prefetch: int = 0):
        self.spec = spec
        self._rows = list(range(lo, hi))
        self._streams = [RowStream(spec, r) for r in self._rows]
        self._gather = gather
        self._prefetch = prefetch
        self._consumed = [s.position for s in self._streams]
        self._queue: queue.Queue | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ batches
    def _produce(self):
        """(batch, positions after it) or None when every local stream has ended."""
        if getattr(self.spec.reader, "pool", None) is not None:
            for stream in self._streams:  # all chunks this batch needs, in the workers at once
                stream.start_reading()
            self.spec.reader.flush()
        rows = [s.next_row() for s in self._streams]
        if all(r is None for r in rows):
            return None
        arrays = layout_rows([r or [] for r in rows], self.spec.reader, self.spec.max_length)
        batch = {k: arrays[k] for k in BATCH_KEYS}  # [rows, L] each; ended rows are padding
        return batch, [s.position for s in self._streams]

    def _put(self, item) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def _worker(self) -> None:
        try:
            item = ()
            while item is not None and not self._stop.is_set():
                item = self._produce()
                self._put(item)
        except Exception as error:  # handed to the consumer
            self._put(error)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._prefetch <= 0:
            item = self._produce()
        else:
            if self._thread is None:
                self._queue = queue.Queue(maxsize=self._prefetch)
                self._stop.clear()
                self._thread = threading.Thread(target=self._worker, daemon=True,
                                                name="row-stream-prefetch")
                self._thread.start()
            item = self._queue.get()
            if item is None or isinstance(item, BaseException):
                self._queue.put_nowait(item)  # the thread has finished: answer the same again
            if isinstance(item, BaseException):
                raise item
        if item is None:
            raise StopIteration
        batch, self._consumed = item
        return batch

    def close(self) -> None:
        """Stops the prefetch thread (batches already prepared are discarded)."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            for stream, pos in zip(self._streams, self._consumed, strict=True):
                stream.set_position(*pos)

    # ------------------------------------------------------------------ state
    def local_state(self) -> dict:
        """Positions of this process's rows after the batches consumed so far."""
        return {"identity": self.spec.identity(), "rows": list(self._rows),
                "positions": [list(p) for p in self._consumed]}

    def get_state(self) -> dict:
        """The global, JSON-serialisable state (equal on every process).

        With several processes this gathers every process's rows: all processes must call it
        together (as they do when saving a checkpoint).
        """
        local = self.local_state()
        return merge_states(self._gather(local) if self._gather else [local])

    def set_state(self, state: dict) -> None:
        """Continue after the batches ``state`` was taken at, under any process count."""
        if state.get("format") != STATE_FORMAT:
            raise ValueError(
                f"training data state has format {state.get('format')!r}, expected "
                f"{STATE_FORMAT!r} (it was written by another version of the input pipeline); "
                "start from a fresh --workdir.")
        for key, want in self.spec.identity().items():
            if state.get(key) != want:
                raise ValueError(
                    f"training data state was saved with {key}={state.get(key)!r} but this run "
                    f"uses {key}={want!r}; resume with the same setting (the global batch order "
                    "depends on it) or start from a fresh --workdir.")
        positions = state["positions"]
        self.close()
        if hasattr(self.spec.reader, "forget"):
            self.spec.reader.forget()
        self._consumed = [tuple(int(p) for p in positions[r]) for r in self._rows]
        for stream, pos in zip(self._streams, self._consumed, strict=True):
            stream.set_position(*pos)

