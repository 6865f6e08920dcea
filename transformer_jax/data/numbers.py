"""The built-in offline task: English number words -> German number words.

``4732`` gives the pair ``("four thousand seven hundred thirty-two",
"viertausendsiebenhundertzweiunddreißig")``. Both sides come from the ``num2words`` package.

English is normalised to one spelling per number: the commas and the British "and" that
``num2words`` writes ("four thousand, seven hundred and thirty-two") are dropped, and the
hyphen of compound tens is kept ("thirty-two", standard orthography; the tokenizer splits it
off). German is written as one word, as German does; the tokenizer learns the compound pieces
("tausend", "hundert", "und", "zwanzig", ...), so the model must reorder units and tens
("zweiunddreißig" = two-and-thirty).

Splits are disjoint sets of numbers: a permutation of ``range(max_number)`` seeded by ``seed``
is cut into ``train`` / ``validation`` / ``test`` slices of the requested sizes, so no test
number is ever seen in training.
"""

from __future__ import annotations

import re

import numpy as np
from num2words import num2words

__all__ = ["NUMBER_SPLITS", "MAX_SUPPORTED", "english_words", "german_words", "split_numbers"]

NUMBER_SPLITS = ("train", "validation", "test")
MAX_SUPPORTED = 1_000_000  # German num2words writes "eine Million" (two words) from here on.

_AND = re.compile(r"\band\b")
_SPACES = re.compile(r"\s+")


def english_words(n: int) -> str:
    """``n`` in English words without commas or "and": 4732 -> "four thousand seven hundred
    thirty-two"."""
    text = num2words(int(n), lang="en").replace(",", " ")
    return _SPACES.sub(" ", _AND.sub(" ", text)).strip()


def german_words(n: int) -> str:
    """``n`` in German words, one word: 4732 -> "viertausendsiebenhundertzweiunddreißig"."""
    text = num2words(int(n), lang="de")
    # num2words writes 101000 as "einhunderteinstausend"; German says "einhunderteintausend"
    # ("eins" only stands alone at the very end of a number).
    return text.replace("einstausend", "eintausend")


def split_numbers(
    max_number: int, train_size: int, validation_size: int, test_size: int, seed: int
) -> dict[str, np.ndarray]:
    """Disjoint number sets per split, drawn from ``range(max_number)``.

    Returns:
      ``{"train": [train_size], "validation": [validation_size], "test": [test_size]}`` int64
      arrays; the same arguments always give the same arrays.

    Raises:
      ValueError: the sizes do not fit in the range, or the range is unsupported.
    """
    if not 1 <= max_number <= MAX_SUPPORTED:
        raise ValueError(
            f"data.numbers_max={max_number} must be between 1 and {MAX_SUPPORTED} "
            "(German spells one million as two words)."
        )
    sizes = {"train": train_size, "validation": validation_size, "test": test_size}
    for name, size in sizes.items():
        if size < 1:
            raise ValueError(f"The numbers task {name} size is {size}; it must be at least 1.")
    total = sum(sizes.values())
    if total > max_number:
        raise ValueError(
            f"The numbers task asks for {total} distinct numbers (train {train_size} + validation "
            f"{validation_size} + test {test_size}) but data.numbers_max={max_number} only has "
            f"{max_number}; raise numbers_max or lower the split sizes."
        )
    order = np.random.default_rng(seed).permutation(max_number)
    out, start = {}, 0
    for name in NUMBER_SPLITS:
        out[name] = order[start : start + sizes[name]]
        start += sizes[name]
    return out
