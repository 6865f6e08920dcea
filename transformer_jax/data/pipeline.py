"""grain input pipelines: training (shuffled, packed or padded) and evaluation (ordered, padded).

Training (:mod:`transformer_jax.data.streams`): row ``r`` of every global batch of ``B`` rows
comes from its own stream of the seeded, per-epoch reshuffled training indices (every
``B``-th one, starting at ``r``), their token ids (EOS appended) read from the split's
token-id cache that :func:`prepare` builds once (``token_cache.py``; subword sampling
tokenizes as it reads), pairs longer than max_length dropped (counted in Prepared.stats),
then packed first-fit into rows of max_length (segment ids 1..k, positions per segment) or
padded one pair per row. Each process materialises its
own block of rows. The sequence of global batches therefore depends on the data, the seed
and ``B`` only, and the iterator's ``get_state()`` — the positions of all ``B`` row streams,
a small JSON-serialisable dict, equal on every process — restores under any process count.

Evaluation: pairs in data-source order (ids from the same cache), one per row, inputs/targets
trimmed to max_length (the last kept token replaced by EOS; counted), never packed; the last
batch is filled with all-pad rows, and each row carries ``index`` (position in the split, -1
for filler rows), so every example is evaluated exactly once and outputs align with
:func:`raw_pairs`.

Batch keys (all int32): inputs, targets, inputs_segmentation, targets_segmentation,
inputs_position, targets_position ([rows, max_length]); eval batches also index ([rows]).
Padding positions have segment 0 and position 0.
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import logging
import os
import threading
import weakref

import grain
import jax
import ml_collections
import numpy as np

import transformer_jax.data.examples as examples
import transformer_jax.data.sources as sources
import transformer_jax.data.streams as streams
import transformer_jax.data.token_cache as token_cache
import transformer_jax.data.workers as workers
from transformer_jax.data.config import check_data_config
from transformer_jax.data.streams import BATCH_KEYS
from transformer_jax.data.tokenizer import TOKENIZER_FILE, Tokenizer
from transformer_jax.data.validation import DataError

__all__ = [
    "BATCH_KEYS",
    "PipelineStats",
    "Prepared",
    "eval_batches",
    "prepare",
    "raw_pairs",
    "train_iterator",
]

log = logging.getLogger(__name__)


@dataclasses.dataclass
class PipelineStats:
    """What the pipelines left out or cut (in this process; filled as data is read)."""

    dropped_train_ids: set[int] = dataclasses.field(default_factory=set)
    trimmed_eval_ids: dict[str, set[int]] = dataclasses.field(default_factory=dict)
    _lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False)

    def dropped_summary(self) -> str:
        return (f"{len(self.dropped_train_ids)} distinct training pairs read so far were "
                "skipped as longer than max_length or outside max_length_ratio")

    def __getstate__(self):  # worker processes get empty counters of their own
        return {}

    def __setstate__(self, state):
        self.__init__()


@dataclasses.dataclass
class Prepared:
    """Everything the pipelines need: config, prepared TFDS data, the tokenizer and the
    splits' token ids (``token_ids(split)``, cached on disk beside the data)."""

    config: ml_collections.ConfigDict  # the data.* config (a copy)
    data_dir: str  # where the TFDS array_record data lives
    tokenizer: Tokenizer
    tokenizer_path: str
    builder: object  # the prepared tfds builder
    stats: PipelineStats = dataclasses.field(default_factory=PipelineStats)
    _sources: dict = dataclasses.field(default_factory=dict, repr=False)
    _token_ids: dict = dataclasses.field(default_factory=dict, repr=False)  # by cache key

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    @property
    def max_length(self) -> int:
        return self.config.max_length

    def source(self, split: str) -> sources.PairSource:
        """Random-access (source, target) pairs of ``split`` (opened once, then cached)."""
        if split not in self._sources:
            self._sources[split] = sources.open_split(self.config, self.builder, split)
        return self._sources[split]

    @property
    def cache_dir(self) -> str:
        """Where the token-id caches of the splits live (beside the prepared dataset)."""
        return os.path.join(getattr(self.builder, "data_dir", self.data_dir), "token_ids")

    def token_ids(self, split: str) -> token_cache.TokenIds:
        """The split's token ids (EOS appended, see ``token_cache``): read from the cache
        beside the prepared data, built there on first use or when the key changed."""
        source = self.source(split)
        key = json.dumps(token_cache.cache_key(self.tokenizer, self.config.max_length,
                                               source.preprocessor, split, source.name),
                         sort_keys=True)
        if key not in self._token_ids:
            self._token_ids[key] = token_cache.load_or_build(
                self.cache_dir, split, source, self.tokenizer, self.config.max_length)
        return self._token_ids[key]


def _training_sentences(source: sources.PairSource, sample_size: int, seed: int):
    """Source and target sentences of at most ``sample_size`` pairs, in a seeded fixed order."""
    n = len(source)
    if n > sample_size:
        ids = np.sort(np.random.default_rng(seed).choice(n, sample_size, replace=False))
    else:
        ids = np.arange(n)
    for start in range(0, len(ids), 4096):
        for src, tgt in source.__getitems__(ids[start : start + 4096].tolist()):
            yield src
            yield tgt


def prepare(data_config, workdir: str, *, tokenizer_path: str | None = None) -> Prepared:
    """Prepares the dataset (once), loads or trains the tokenizer (once per workdir) and
    tokenizes the train / eval / test splits into their token-id caches (once per tokenizer,
    max_length and preprocessing; the train split not with subword sampling).

    Args:
      data_config: the ``data.*`` ConfigDict (see ``default_data_config``).
      workdir: run directory; the tokenizer lives at ``<workdir>/tokenizer/spm.model`` and,
        unless ``data.data_dir`` is set, prepared data at ``<workdir>/data``.
      tokenizer_path: use this model file instead of the workdir one.

    Raises:
      DataError: bad input files, unknown splits, or a tokenizer that does not match the config.
    """
    config = ml_collections.ConfigDict(data_config.to_dict())
    check_data_config(config)
    data_dir = sources.resolve_data_dir(config, workdir)
    builder = sources.get_builder(config, data_dir)
    path = tokenizer_path or os.path.join(workdir, TOKENIZER_FILE)
    prepared = Prepared(config, data_dir, None, path, builder)  # type: ignore[arg-type]
    for split in (config.train_split, config.eval_split, config.test_split):
        if split:
            prepared.source(split)  # checks the split exists
    if os.path.isfile(path):
        tokenizer = Tokenizer.load(path)
        if tokenizer.vocab_size != config.vocab_size:
            raise DataError(
                f"The tokenizer at {path} has {tokenizer.vocab_size} pieces but data.vocab_size="
                f"{config.vocab_size}; use a fresh workdir or set data.vocab_size="
                f"{tokenizer.vocab_size}."
            )
    else:
        log.info("Training a %d-piece %s tokenizer on %s", config.vocab_size,
                 config.tokenizer_model_type, config.train_split)
        sentences = _training_sentences(prepared.source(config.train_split),
                                        config.tokenizer_sample_size, config.tokenizer_seed)
        tokenizer = Tokenizer.train(
            sentences, vocab_size=config.vocab_size, model_type=config.tokenizer_model_type,
            character_coverage=config.tokenizer_character_coverage, path=path)
    prepared.tokenizer = tokenizer
    for split in (config.train_split, config.eval_split, config.test_split):
        if split and not (split == config.train_split and config.subword_sampling_alpha > 0):
            prepared.token_ids(split)  # tokenized once, here (subword sampling: per epoch)
    return prepared


# --------------------------------------------------------------------------- helpers


def _resolve_process(process_index, process_count) -> tuple[int, int]:
    if process_index is None or process_count is None:
        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} must be in [0, {process_count}).")
    return process_index, process_count


def _local_rows(batch_size: int, process_count: int) -> int:
    if batch_size < 1 or batch_size % process_count:
        raise ValueError(
            f"batch_size={batch_size} (global rows) must be a positive multiple of "
            f"process_count={process_count}; each process reads batch_size / process_count rows."
        )
    return batch_size // process_count


# --------------------------------------------------------------------------- training


def _gather_for(process_count: int):
    """How ``get_state`` collects every process's rows (None: this process has them all).

    Several jax processes may share a row block (``process_count`` < ``jax.process_count()``,
    e.g. a tensor-parallel axis across processes): the gather then sees each block more than
    once, which ``merge_states`` accepts.
    """
    if process_count == 1:
        return None
    if jax.process_count() > 1 and process_count <= jax.process_count():
        return streams.allgather_states

    def refuse(local):
        raise ValueError(
            f"process_count={process_count} was given but jax runs {jax.process_count()} "
            "process(es), so the rows of the other processes cannot be gathered; combine "
            "every process's local_state() with transformer_jax.data.merge_states.")
    return refuse


def train_iterator(
    prepared: Prepared,
    batch_size: int,
    seed: int,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
    num_epochs: int | None = None,
    split: str | None = None,
) -> streams.TrainBatches:
    """This process's rows of every global training batch (see the module docstring).

    Args:
      batch_size: global rows per batch; this process yields rows
        ``[process_index * R, (process_index + 1) * R)``, ``R = batch_size // process_count``.
      seed: shuffle seed, 0 <= seed < 2**32.
      process_index, process_count: this process's share; default ``jax.process_index()`` /
        ``jax.process_count()``.
      num_epochs: None repeats forever (training); an int ends every row's stream after that
        many passes over the split, and iteration stops once all of this process's rows have
        ended (rows that end earlier are all padding).
      split: defaults to ``data.train_split``.

    Token ids come from the split's cache (``Prepared.token_ids``); with subword sampling the
    text is segmented as it is read, in ``data.num_workers`` worker processes (0: in this
    one). Neither changes any batch.

    Returns:
      An iterator of dicts of int32 ``[R, max_length]`` arrays (keys ``BATCH_KEYS``) with
      ``get_state()`` (global, JSON-serialisable, the same on every process; a collective
      when there are several processes), ``set_state(state)`` (a state saved under any
      process and worker count), ``local_state()`` and ``close()``.
    """
    cfg = prepared.config
    process_index, process_count = _resolve_process(process_index, process_count)
    rows = _local_rows(batch_size, process_count)
    if not 0 <= seed < 2**32:
        raise ValueError(f"seed={seed} must be in [0, 2**32).")
    split = split or cfg.train_split
    sampling = cfg.subword_sampling_alpha > 0
    spec = streams.StreamSpec(
        prepared.source(split), prepared.tokenizer, prepared.stats,
        batch_size=batch_size, seed=seed, max_length=cfg.max_length, packing=cfg.packing,
        bins=cfg.packing_bins_per_row, num_epochs=num_epochs,
        subword_sampling=(cfg.subword_sampling_alpha, cfg.subword_sampling_nbest)
        if sampling else None,
        token_ids=None if sampling else prepared.token_ids(split),
        pool=workers.shared_pool(prepared.tokenizer, cfg.num_workers)
        if sampling and cfg.get("num_workers", 0) > 0 else None)
    iterator = streams.TrainBatches(
        spec, process_index * rows, (process_index + 1) * rows,
        gather=_gather_for(process_count), prefetch=cfg.prefetch_batches)
    _OPEN_ITERATORS.add(iterator)
    return iterator


# Prefetching iterators own a thread; stop it at exit while the interpreter is intact.
_OPEN_ITERATORS: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _close_open_iterators() -> None:
    for iterator in list(_OPEN_ITERATORS):
        iterator.close()


# --------------------------------------------------------------------------- evaluation


class _EvalBatch(grain.transforms.Map):
    """Batch number -> padded eval batch of this process's rows, with example ``index``."""

    def __init__(self, prepared: Prepared, split: str, batch_size: int, rows: int, offset: int):
        self._ids = examples.CachedIds(prepared.token_ids(split))
        self._stats, self._split = prepared.stats, split
        self._length = prepared.config.max_length
        self._batch_size, self._rows, self._offset = batch_size, rows, offset

    def map(self, batch_number):
        start = int(batch_number) * self._batch_size + self._offset
        index = np.arange(start, start + self._rows)  # [rows]
        valid = index < len(self._ids.token_ids)
        lengths = self._ids.token_ids.lengths[:, index[valid]]  # [2, valid rows], untrimmed
        trimmed = index[valid][lengths.max(axis=0, initial=0) > self._length].tolist()
        if trimmed:
            with self._stats._lock:
                self._stats.trimmed_eval_ids.setdefault(self._split, set()).update(trimmed)
        rows = [[int(i)] if v else [] for i, v in zip(index, valid, strict=True)]
        out = examples.layout_rows(rows, self._ids, self._length)
        out = {k: out[k] for k in BATCH_KEYS}
        out["index"] = np.where(valid, index, -1).astype(np.int32)  # [rows]
        return out


def eval_batches(
    prepared: Prepared,
    split: str,
    batch_size: int,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
) -> grain.MapDataset:
    """Evaluation batches of ``split``: a grain MapDataset (``len`` = number of batches).

    Global batch ``b`` holds examples ``b * batch_size + [0, batch_size)``; this process gets
    rows ``[process_index * r, (process_index + 1) * r)`` of it, ``r = batch_size //
    process_count``, so every process yields the same number of batches. Filler rows past
    the end of the split are all padding (zero loss weight) with ``index == -1``.

    Each element: int32 ``[r, max_length]`` arrays for ``BATCH_KEYS`` and ``index`` ``[r]``.
    """
    process_index, process_count = _resolve_process(process_index, process_count)
    rows = _local_rows(batch_size, process_count)
    n = len(prepared.source(split))
    num_batches = -(-n // batch_size)
    return grain.MapDataset.range(num_batches).map(
        _EvalBatch(prepared, split, batch_size, rows, process_index * rows))


def raw_pairs(prepared: Prepared, split: str) -> list[tuple[str, str]]:
    """All (source, target) texts of ``split``; entry ``i`` is eval ``index`` ``i``."""
    source = prepared.source(split)
    out: list[tuple[str, str]] = []
    for start in range(0, len(source), 4096):
        out.extend(source.__getitems__(list(range(start, min(start + 4096, len(source))))))
    return out
