"""Token ids of a split, tokenized once and stored beside the prepared data.

``<prepared dataset folder>/token_ids/<split>.{ids,starts,lengths}.npy`` and ``<split>.json``:

* ``ids`` int32 ``[T]``: every source sentence's ids, then every target sentence's, each with
  EOS appended; a sentence longer than ``max_length`` (EOS included) keeps its first
  ``max_length - 1`` ids and EOS (what evaluation feeds; training drops such pairs);
* ``starts`` int64 ``[2, n]``: where pair ``i``'s source (row 0) and target (row 1) begin;
* ``lengths`` int32 ``[2, n]``: their untrimmed lengths, EOS included (stored: at most
  ``max_length``);
* ``<split>.json``: the key — everything that changes the ids: the tokenizer's SHA-256,
  ``max_length``, the EOS convention, the text preprocessing and the split.

A cache whose key differs (another tokenizer, length limit or preprocessing) is rebuilt, with
one log line. Files are written to temporary names and renamed; the key file goes last, so a
crash leaves either no key (rebuilt next time) or a complete cache. Plain ``.npy`` (read
with ``allow_pickle=False``; ``ids`` memory-mapped). Delete the ``token_ids`` folder to clear it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import re

import numpy as np

from transformer_jax.data.files import write_atomically
from transformer_jax.data.tokenizer import EOS_ID

__all__ = ["CACHE_FORMAT", "TokenIds", "cache_key", "load_or_build"]

log = logging.getLogger(__name__)

CACHE_FORMAT = "token_ids/1"
EOS_CONVENTION = f"EOS={EOS_ID} appended, no BOS; over max_length: first max_length-1 ids + EOS"
_ARRAYS = ("ids", "starts", "lengths")
_CHUNK = 4096  # pairs read and tokenized at once while building


@dataclasses.dataclass(frozen=True)
class TokenIds:
    """The cached ids of one split (see the module docstring)."""

    ids: np.ndarray  # int32 [T]
    starts: np.ndarray  # int64 [2, n]
    lengths: np.ndarray  # int32 [2, n], untrimmed, EOS included
    max_length: int

    def __len__(self) -> int:
        return self.starts.shape[1]

    @property
    def stored_lengths(self) -> np.ndarray:
        """int32 [2, n]: tokens stored per sentence (at most max_length)."""
        return np.minimum(self.lengths, self.max_length)


def cache_key(tokenizer, max_length: int, preprocessor, split: str, source_name: str) -> dict:
    """Everything the cached ids depend on (JSON)."""
    text = dataclasses.asdict(preprocessor)
    text.pop("max_length_ratio", None)  # a filter applied when reading, not a change of ids
    return {"format": CACHE_FORMAT, "source": source_name, "split": split,
            "tokenizer_sha256": hashlib.sha256(tokenizer.model_proto).hexdigest(),
            "max_length": int(max_length), "eos": EOS_CONVENTION, "preprocessing": text}


def _file_stem(directory: str, split: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", split)
    if safe != split:  # e.g. "train[:10%]": keep distinct names distinct
        safe += "-" + hashlib.sha256(split.encode()).hexdigest()[:8]
    return os.path.join(directory, safe)


def _with_eos(flat: np.ndarray, lengths: np.ndarray, max_length: int) -> np.ndarray:
    """Sentences ``flat`` (lengths ``[m]``, no EOS) -> each cut to max_length - 1, plus EOS."""
    kept = np.minimum(lengths, max_length - 1)  # [m]
    out_len = kept + 1
    out = np.full(int(out_len.sum()), EOS_ID, np.int32)
    src_start = np.cumsum(lengths) - lengths
    out_start = np.cumsum(out_len) - out_len
    sentence = np.repeat(np.arange(len(kept)), kept)  # [sum(kept)]
    within = np.arange(len(sentence)) - np.repeat(np.cumsum(kept) - kept, kept)
    out[out_start[sentence] + within] = flat[src_start[sentence] + within]
    return out


def _tokenize(source, tokenizer, max_length: int) -> TokenIds:
    n = len(source)
    sides: list[list[np.ndarray]] = [[], []]
    lengths = np.zeros((2, n), np.int32)
    for start in range(0, n, _CHUNK):
        pairs = source.__getitems__(list(range(start, min(start + _CHUNK, n))))
        for side in (0, 1):
            encoded = tokenizer.encode([p[side] for p in pairs])
            lens = np.fromiter(map(len, encoded), np.int64, len(encoded))
            flat = np.fromiter((i for ids in encoded for i in ids), np.int32, int(lens.sum()))
            sides[side].append(_with_eos(flat, lens, max_length))
            lengths[side, start : start + len(pairs)] = lens + 1
    stored = np.minimum(lengths, max_length).astype(np.int64)
    ends = np.cumsum(stored.reshape(-1)).reshape(2, n)  # source sentences first, then targets
    ids = np.concatenate([a for side in sides for a in side]) if n else np.zeros(0, np.int32)
    return TokenIds(ids, ends - stored, lengths, max_length)


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _save(stem: str, token_ids: TokenIds, key: dict) -> None:
    os.makedirs(os.path.dirname(stem), exist_ok=True)
    if os.path.exists(stem + ".json"):
        os.remove(stem + ".json")  # invalid until every array is in place
    for name in _ARRAYS:
        write_atomically(f"{stem}.{name}.npy", _npy_bytes(getattr(token_ids, name)))
    write_atomically(stem + ".json", json.dumps(key, indent=1, sort_keys=True).encode())


def _load(stem: str, max_length: int) -> TokenIds:
    ids = np.asarray(np.load(stem + ".ids.npy", mmap_mode="r", allow_pickle=False))  # mapped
    starts = np.load(stem + ".starts.npy", allow_pickle=False)
    lengths = np.load(stem + ".lengths.npy", allow_pickle=False)
    return TokenIds(ids, starts, lengths, max_length)


def _stored_key(stem: str) -> dict | None:
    try:
        with open(stem + ".json") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def load_or_build(directory: str, split: str, source, tokenizer, max_length: int) -> TokenIds:
    """The cached ids of ``split`` in ``directory``: read when the key matches, else built."""
    key = cache_key(tokenizer, max_length, source.preprocessor, split,
                    getattr(source, "name", ""))
    stem = _file_stem(directory, split)
    stored = _stored_key(stem)
    if stored == key:
        try:
            return _load(stem, max_length)
        except (OSError, ValueError) as e:
            log.warning("Token-id cache %s is unreadable (%s); rebuilding it.", stem, e)
    elif stored is not None:
        changed = sorted(k for k in key if stored.get(k) != key[k])
        log.info("Token-id cache of %r was built for another %s; rebuilding it in %s.",
                 split, "/".join(changed), directory)
    token_ids = _tokenize(source, tokenizer, max_length)
    try:
        _save(stem, token_ids, key)
    except OSError as e:  # a read-only data folder: keep the ids in memory only
        log.warning("Cannot write the token-id cache to %s (%s); using it in memory only.",
                    directory, e)
    return token_ids
