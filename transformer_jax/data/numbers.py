"""The built-in offline task: English number words -> German number words.

``4732`` gives the pair ``("four thousand seven hundred thirty-two",
"viertausendsiebenhundertzweiunddreißig")``. Both sides come from the ``num2words`` package.

English is normalised to one spelling per number by :func:`normalize_english`: lower case, the
commas and the British "and" that ``num2words`` writes ("four thousand, seven hundred and
thirty-two") are dropped, and compound tens get a hyphen ("thirty-two", standard orthography;
"thirty two" is joined the same way). The same function runs on the training pairs and, because
a work directory records ``data.source = "numbers"``, on every sentence ``translate`` reads from
such a run (``source_normalizer``), so "Three hundred and thirty-nine thousand, five hundred and
sixty-four", "one hundred five" and "One hundred and five" all reach the model in the spelling
it was trained on. Normalising (rather than training on random spelling variants) is exact for
every variant it knows, spends none of the tiny model's capacity or training steps on
formatting, and also fixes runs trained before it existed.

German is written as one word, as German does; the tokenizer learns the compound pieces
("tausend", "hundert", "und", "zwanzig", ...), so the model must reorder units and tens
("zweiunddreißig" = two-and-thirty).

Splits are disjoint sets of numbers: a permutation of ``range(max_number)`` seeded by ``seed``
is cut into ``train`` / ``validation`` / ``test`` slices of the requested sizes, so no test
number is ever seen in training.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import numpy as np
from num2words import num2words

__all__ = [
    "NUMBER_SPLITS",
    "MAX_SUPPORTED",
    "english_words",
    "english_spellings",
    "normalize_english",
    "source_normalizer",
    "german_words",
    "split_numbers",
]

NUMBER_SPLITS = ("train", "validation", "test")
MAX_SUPPORTED = 1_000_000  # German num2words writes "eine Million" (two words) from here on.

_AND = re.compile(r"\band\b")
_SPACES = re.compile(r"\s+")
_PUNCTUATION = re.compile(r"[,;.!?\-]")
_TENS = "twenty|thirty|forty|fifty|sixty|seventy|eighty|ninety"
_UNITS = "one|two|three|four|five|six|seven|eight|nine"
_COMPOUND = re.compile(rf"\b({_TENS}) ({_UNITS})\b")


def normalize_english(text: str) -> str:
    """The one spelling the numbers task trains on.

    Lower case; commas, other punctuation and the word "and" dropped; runs of spaces collapsed;
    tens and units joined by a hyphen. ``"Three hundred and thirty-nine thousand, five hundred
    and sixty four"`` -> ``"three hundred thirty-nine thousand five hundred sixty-four"``.
    Idempotent; text that is not a number is only lower-cased and de-punctuated.
    """
    text = _PUNCTUATION.sub(" ", text.lower())
    text = _SPACES.sub(" ", _AND.sub(" ", text)).strip()
    return _COMPOUND.sub(r"\1-\2", text)


def english_words(n: int) -> str:
    """``n`` in English words, normalised: 4732 -> "four thousand seven hundred thirty-two"."""
    return normalize_english(num2words(int(n), lang="en"))


def english_spellings(n: int) -> dict[str, str]:
    """Ways people write ``n`` (for tests and evaluation), keyed by a short name.

    ``"plain"`` is the training spelling; ``"num2words"`` is that package's own ("four
    thousand, seven hundred and thirty-two"); ``"capitalised"`` starts with a capital and has
    neither "and" nor hyphens ("Four thousand seven hundred thirty two"); ``"and"`` keeps the
    British "and" without commas.
    """
    raw = num2words(int(n), lang="en")
    plain = english_words(n)
    no_hyphen = plain.replace("-", " ")
    return {
        "plain": plain,
        "num2words": raw,
        "capitalised": no_hyphen[:1].upper() + no_hyphen[1:],
        "and": raw.replace(",", ""),
    }


def source_normalizer(data_config) -> Callable[[str], str] | None:
    """The source-side normaliser of a run's data config (a mapping or ml_collections dict):
    :func:`normalize_english` for the numbers task with English sources, else None."""
    get = data_config.get
    if get("source") == "numbers" and get("source_lang", "en") == "en":
        return normalize_english
    return None


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
