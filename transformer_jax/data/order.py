"""The shuffled training order, a whole epoch at a time in numpy.

Position ``p`` of the training order is example ``shuffle(p % n)`` of epoch ``p // n``:
``grain.MapDataset.range(n).shuffle(seed).repeat()``, whose permutation of epoch ``e`` is
``grain.experimental.index_shuffle(i, max_index=n - 1, seed=(seed + e) % 2**32, rounds=4)``
— a Simon block cipher on ``B`` bits (``B`` = the even number >= max(16, ceil(log2(n - 1))))
with round keys from C++'s ``std::seed_seq``, applied again while the result exceeds
``n - 1`` (cycle walking). grain evaluates it one Python call per index (~5 us); this module
evaluates the same cipher on a whole epoch with numpy (~1 ms for 29,000 examples), so the
order, and with it every batch, stays what grain defines (``tests/data/test_order.py``
compares the two).
"""

from __future__ import annotations

import math
from collections import OrderedDict

import numpy as np
from grain.experimental import index_shuffle

__all__ = ["EpochOrder"]

_M32 = 0xFFFFFFFF
_ROUNDS = 4
_SCALAR_BELOW = 4096  # smaller epochs: grain's own function, one call per index


def _seed_seq(seed: int, n: int) -> list[int]:
    """``std::seed_seq{seed}.generate`` of ``n`` 32-bit words (C++ [rand.util.seedseq])."""
    out = [0x8B8B8B8B] * n
    s = 1
    t = 11 if n >= 623 else 7 if n >= 68 else 5 if n >= 39 else 3 if n >= 7 else (n - 1) // 2
    p = (n - t) // 2
    q = p + t
    m = max(s + 1, n)

    def mix(x: int) -> int:
        return x ^ (x >> 27)

    for k in range(m):
        r1 = (1664525 * mix(out[k % n] ^ out[(k + p) % n] ^ out[(k - 1) % n])) & _M32
        r2 = (r1 + (s if k == 0 else (k % n + seed) if k <= s else k % n)) & _M32
        out[(k + p) % n] = (out[(k + p) % n] + r1) & _M32
        out[(k + q) % n] = (out[(k + q) % n] + r2) & _M32
        out[k % n] = r2
    for k in range(m, m + n):
        r3 = (1566083941 * mix((out[k % n] + out[(k + p) % n] + out[(k - 1) % n]) & _M32)) & _M32
        r4 = (r3 - k % n) & _M32
        out[(k + p) % n] ^= r3
        out[(k + q) % n] ^= r4
        out[k % n] = r4
    return out


def _simon(values: np.ndarray, keys: list[int], word: int) -> np.ndarray:
    """The Simon rounds of grain's cipher on ``2 * word``-bit blocks (uint64 in and out)."""
    mask = np.uint64((1 << word) - 1)

    def rotl(x, r):
        return ((x << np.uint64(r)) | (x >> np.uint64(word - r))) & mask

    def f(x):
        return (rotl(x, 1) & rotl(x, 8)) ^ rotl(x, 2)

    left, right = (values >> np.uint64(word)) & mask, values & mask  # as std::bitset<word>
    for i in range(0, len(keys), 2):
        left ^= f(right) ^ np.uint64(keys[i] & int(mask))
        right ^= f(left) ^ np.uint64(keys[i + 1] & int(mask))
    return (left << np.uint64(word)) | right


def epoch_permutation(n: int, seed: int) -> np.ndarray:
    """``[index_shuffle(i, n - 1, seed, 4) for i in range(n)]`` as an int64 array."""
    if n <= 1:
        return np.zeros(n, np.int64)
    max_index = n - 1
    if n <= _SCALAR_BELOW:  # few values in a 2**16 block: long cycle walks, cheap in C++
        return np.array([index_shuffle(i, max_index=max_index, seed=seed % 2**32, rounds=_ROUNDS)
                         for i in range(n)], np.int64)
    bits = math.ceil(math.log2(max_index))
    bits = max(bits + bits % 2, 16)
    keys = _seed_seq(seed % 2**32, _ROUNDS)
    out = np.arange(n, dtype=np.uint64)
    todo = np.arange(n)
    while len(todo):  # cycle walking: re-encrypt what landed past max_index
        out[todo] = _simon(out[todo], keys, bits // 2)
        todo = todo[out[todo] > max_index]
    return out.astype(np.int64)


class EpochOrder:
    """Example index at each global position of the seeded, per-epoch reshuffled order."""

    def __init__(self, n: int, seed: int, keep_epochs: int = 4):
        self.n, self.seed, self._keep = n, seed, keep_epochs
        self._epochs: OrderedDict[int, np.ndarray] = OrderedDict()

    def epoch(self, e: int) -> np.ndarray:
        """The permutation of epoch ``e`` (the last few are kept)."""
        if e not in self._epochs:
            self._epochs[e] = epoch_permutation(self.n, self.seed + e)
            while len(self._epochs) > self._keep:
                self._epochs.popitem(last=False)
        return self._epochs[e]

    def __call__(self, positions: np.ndarray) -> np.ndarray:
        """Example indices ``[m]`` at global ``positions`` ``[m]`` (int64)."""
        epochs, within = np.divmod(positions, self.n)
        if len(epochs) and epochs[0] == epochs[-1]:  # positions are increasing
            return self.epoch(int(epochs[0]))[within]
        out = np.empty(len(positions), np.int64)
        for e in np.unique(epochs):
            sel = epochs == e
            out[sel] = self.epoch(int(e))[within[sel]]
        return out
