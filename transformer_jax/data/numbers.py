"""The built-in offline task: English number words -> German number words.

``4732`` gives the pair ``("four thousand seven hundred thirty-two",
"viertausendsiebenhundertzweiunddreißig")``. Both sides come from the ``num2words`` package.

English is normalised to one spelling per number by :func:`normalize_english`: lower case,
punctuation and the British "and" that ``num2words`` writes ("four thousand, seven hundred and
thirty-two") dropped, "a hundred" read as "one hundred", compound tens hyphenated
("thirty-two", standard orthography; "thirty two" is joined the same way), and a number written
in digits ("4732", "4,732") spelled out. The same function runs on the training pairs and,
because a work directory records ``data.source = "numbers"``, on every sentence ``translate``
reads from such a run (``source_normalizer``), so "Three hundred and thirty-nine thousand, five
hundred and sixty-four.", "one hundred five" and "One hundred and five" all reach the model in
the spelling it was trained on. Normalising (rather than training on random spelling variants)
is exact for every variant it knows, spends none of the tiny model's capacity or training steps
on formatting, and also fixes runs trained before it existed.

German is written as one word, as German does; the tokenizer learns the compound pieces
("tausend", "hundert", "und", "zwanzig", ...), so the model must reorder units and tens
("zweiunddreißig" = two-and-thirty).

Which numbers (:func:`split_numbers`): the range is cut into digit classes (0-9, 10-99,
100-999, ...) and every split gives each class an equal share of its size. Drawing uniformly
from ``range(10**6)`` would leave the numbers people type first almost unseen (fewer than one in
a thousand has three digits or fewer) and unmeasured. A class with fewer numbers than its
training share is in training completely, each number repeated (with 54,000 pairs below a
million: 900 copies of 0-9, 100 of 10-99, 10 of 100-999 and every number from 1,000 to 9,999
once); a larger class gives a random subset. Validation and test are drawn the same way, never
repeat a number, never share one with each other, and take only numbers that are not in
training — except from a class that training holds completely, where there are none: there
they measure whether the model learned the numbers it was taught (the small numbers are a
finite set that people type, so the task teaches all of them), while the larger classes measure
numbers never seen in training.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import numpy as np
from num2words import num2words

__all__ = [
    "NUMBER_SPLITS",
    "MAX_SUPPORTED",
    "digit_classes",
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
_PUNCTUATION = re.compile(r"[^\w\s]|_")  # anything but letters, digits and spaces
_DIGITS = re.compile(r"\d+|\d{1,3}(?:[, \u00a0\u202f']\d{3})+")  # 4732, 4,732, 4 732
_A_HUNDRED = re.compile(r"(?:^|\ba )(hundred|thousand)\b")  # "a hundred", a leading "thousand"
_TENS = "twenty|thirty|forty|fifty|sixty|seventy|eighty|ninety"
_UNITS = "one|two|three|four|five|six|seven|eight|nine"
_COMPOUND = re.compile(rf"\b({_TENS}) ({_UNITS})\b")


def normalize_english(text: str) -> str:
    """The one spelling the numbers task trains on.

    Lower case; punctuation (hyphens too) and the word "and" dropped; "a hundred" / "a
    thousand" (and a leading "hundred" / "thousand") read with "one"; runs of spaces collapsed;
    tens and units joined by a hyphen; a whole line of digits below a million spelled out.
    ``"Three hundred and thirty-nine thousand, five hundred and sixty four."`` and
    ``"339,564"`` -> ``"three hundred thirty-nine thousand five hundred sixty-four"``.
    Idempotent; text that is not a number is only lower-cased and de-punctuated.
    """
    text = text.strip().rstrip(".!?").strip()
    if _DIGITS.fullmatch(text):
        value = int(re.sub(r"\D", "", text))
        if value < MAX_SUPPORTED:
            return english_words(value)
    text = _PUNCTUATION.sub(" ", text.lower())
    text = _SPACES.sub(" ", _AND.sub(" ", text)).strip()
    text = _A_HUNDRED.sub(r"one \1", text)
    return _COMPOUND.sub(r"\1-\2", text)


def english_words(n: int) -> str:
    """``n`` in English words, normalised: 4732 -> "four thousand seven hundred thirty-two"."""
    return normalize_english(num2words(int(n), lang="en"))


def english_spellings(n: int) -> dict[str, str]:
    """Ways people write ``n`` (for tests and evaluation), keyed by a short name.

    ``"plain"`` is the training spelling ("four thousand seven hundred thirty-two");
    ``"num2words"`` is that package's own ("four thousand, seven hundred and thirty-two");
    ``"capitalised"`` starts with a capital and has neither "and" nor hyphens ("Four thousand
    seven hundred thirty two"); ``"punctuated"`` is the num2words spelling as a sentence ("Four
    thousand, seven hundred and thirty-two."); ``"digits"`` is ``str(n)``.
    """
    raw = num2words(int(n), lang="en")
    no_hyphen = english_words(n).replace("-", " ")
    return {
        "plain": english_words(n),
        "num2words": raw,
        "capitalised": no_hyphen[:1].upper() + no_hyphen[1:],
        "punctuated": raw[:1].upper() + raw[1:] + ".",
        "digits": str(int(n)),
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


def digit_classes(max_number: int) -> list[tuple[int, int]]:
    """``[lo, hi)`` ranges of the numbers with 1, 2, 3, ... digits below ``max_number``:
    ``digit_classes(2500) == [(0, 10), (10, 100), (100, 1000), (1000, 2500)]``."""
    out, lo = [], 0
    while lo < max_number:
        hi = min(10 * max(lo, 1), max_number)
        out.append((lo, hi))
        lo = hi
    return out


def _equal_shares(capacities: list[int], size: int) -> list[int]:
    """``size`` split as evenly as possible over pools that hold ``capacities`` items; a pool
    that cannot take its share gives the rest to the others (the largest pools take the
    remainder). Raises ValueError when the pools together hold fewer than ``size``."""
    shares = [0] * len(capacities)
    order = sorted(range(len(capacities)), key=lambda i: capacities[i])
    left = size
    for rank, i in enumerate(order):
        shares[i] = min(capacities[i], left // (len(order) - rank))
        left -= shares[i]
    if left:
        raise ValueError(f"only {sum(capacities)} numbers are left to draw {size} from")
    return shares


def _train_numbers(classes, size: int, rng) -> np.ndarray:
    """``size`` numbers, an equal share per class: a class smaller than its share is repeated
    (each number ``share // len`` or one more times), a larger one gives a random subset."""
    share = [size // len(classes) + (i >= len(classes) - size % len(classes))
             for i in range(len(classes))]  # the remainder goes to the largest classes
    out = []
    for (lo, hi), want in zip(classes, share, strict=True):
        count = hi - lo
        if want >= count:
            copies = np.full(count, want // count)
            copies[rng.choice(count, want % count, replace=False)] += 1
            out.append(np.repeat(np.arange(lo, hi), copies))
        else:
            out.append(lo + rng.choice(count, want, replace=False))
    return np.concatenate(out)


def _held_out_pools(classes, train: np.ndarray, max_number: int) -> list[np.ndarray]:
    """Per class: the numbers not in ``train``, or the whole class if training holds it all."""
    in_train = np.zeros(max_number, bool)
    in_train[train] = True
    pools = []
    for lo, hi in classes:
        unseen = lo + np.flatnonzero(~in_train[lo:hi])
        pools.append(unseen if len(unseen) else np.arange(lo, hi))
    return pools


def _draw(pools: list[np.ndarray], size: int, rng, name: str) -> np.ndarray:
    try:
        shares = _equal_shares([len(p) for p in pools], size)
    except ValueError as err:
        raise ValueError(
            f"The numbers task {name} split asks for {size} numbers but {err} (held-out numbers "
            "never repeat and are not shared between splits); raise data.numbers_max or lower "
            "the split sizes."
        ) from None
    return np.concatenate([rng.choice(p, k, replace=False) for p, k in zip(pools, shares,
                                                                           strict=True)])


def split_numbers(
    max_number: int, train_size: int, validation_size: int, test_size: int, seed: int
) -> dict[str, np.ndarray]:
    """The numbers of each split, drawn from ``range(max_number)`` by digit class.

    Every split gives each digit class (:func:`digit_classes`) an equal share. Training repeats
    the numbers of a class smaller than its share; validation and test never repeat, are
    disjoint and hold no training number unless their class is entirely in training (see the
    module docstring for why).

    Returns:
      ``{"train": [train_size], "validation": [validation_size], "test": [test_size]}`` int64
      arrays, each sorted by class; the same arguments always give the same arrays.

    Raises:
      ValueError: a size is below 1, the held-out sizes do not fit, or the range is
        unsupported.
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
    rng_train, rng_test, rng_validation = (
        np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(3))
    classes = digit_classes(max_number)
    train = _train_numbers(classes, train_size, rng_train)
    pools = _held_out_pools(classes, train, max_number)
    test = _draw(pools, test_size, rng_test, "test")
    in_test = np.zeros(max_number, bool)
    in_test[test] = True
    pools = [p[~in_test[p]] for p in pools]
    validation = _draw(pools, validation_size, rng_validation, "validation")
    return {"train": train.astype(np.int64), "validation": validation.astype(np.int64),
            "test": test.astype(np.int64)}
