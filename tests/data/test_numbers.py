"""The numbers task: number words, the splits drawn by digit class, the dataset's ``value``
feature, and the English spellings people type, all normalised to the training spelling (also
by a trained run's Translator)."""

from __future__ import annotations

import collections

import numpy as np
import pytest
from helpers import small_numbers_config, trained_workdir
from num2words import num2words

from transformer_jax.data import load_raw_pairs, load_split
from transformer_jax.data import numbers as nums
from transformer_jax.inference import Translator

KNOWN = {
    0: ("zero", "null"),
    1: ("one", "eins"),
    16: ("sixteen", "sechzehn"),
    21: ("twenty-one", "einundzwanzig"),
    30: ("thirty", "dreißig"),
    101: ("one hundred one", "einhunderteins"),
    1100: ("one thousand one hundred", "eintausendeinhundert"),
    4732: ("four thousand seven hundred thirty-two", "viertausendsiebenhundertzweiunddreißig"),
    21000: ("twenty-one thousand", "einundzwanzigtausend"),
    99999: ("ninety-nine thousand nine hundred ninety-nine",
            "neunundneunzigtausendneunhundertneunundneunzig"),
    101000: ("one hundred one thousand", "einhunderteintausend"),
}
NUMBERS = [0, 2, 5, 13, 21, 100, 105, 110, 999, 1_001, 4_732, 20_020, 101_000, 339_564, 999_999]


@pytest.mark.parametrize("n", sorted(KNOWN))
def test_number_words(n):
    assert (nums.english_words(n), nums.german_words(n)) == KNOWN[n]


# --------------------------------------------------------------------------- splits


def test_digit_classes():
    assert nums.digit_classes(1) == [(0, 1)]
    assert nums.digit_classes(10) == [(0, 10)]
    assert nums.digit_classes(2500) == [(0, 10), (10, 100), (100, 1000), (1000, 2500)]
    assert nums.digit_classes(1_000_000)[-1] == (100_000, 1_000_000)


def _digits(values) -> np.ndarray:
    return np.array([len(str(int(v))) for v in values])


@pytest.fixture(scope="module")
def demo_split():
    """The split of configs/default.py: 54,000 training pairs below a million."""
    return nums.split_numbers(1_000_000, 54_000, 1_000, 1_000, seed=0)


def test_training_gives_each_digit_class_an_equal_share(demo_split):
    train = demo_split["train"]
    assert len(train) == 54_000
    np.testing.assert_array_equal(np.bincount(_digits(train))[1:], [9_000] * 6)
    counts = collections.Counter(train.tolist())
    # Every number below 10,000 is in training; the smaller the class, the more copies.
    assert all(counts[n] == 900 for n in range(10))
    assert all(counts[n] == 100 for n in range(10, 100))
    assert all(counts[n] == 10 for n in range(100, 1_000))
    assert all(counts[n] == 1 for n in range(1_000, 10_000))
    large = train[train >= 10_000]
    assert len(np.unique(large)) == len(large) == 18_000  # drawn without repeats


def test_held_out_splits_are_disjoint_stratified_and_unseen_where_possible(demo_split):
    train, validation, test = (demo_split[s] for s in nums.NUMBER_SPLITS)
    assert len(validation) == len(test) == 1_000
    assert len(np.unique(validation)) == 1_000 and len(np.unique(test)) == 1_000
    assert not set(validation.tolist()) & set(test.tolist())
    # The test split holds every number below 100 (classes smaller than their share) and an
    # equal share of each larger class; validation takes what the test left.
    np.testing.assert_array_equal(np.bincount(_digits(test))[1:], [10, 90, 225, 225, 225, 225])
    np.testing.assert_array_equal(np.bincount(_digits(validation))[1:],
                                  [0, 0, 250, 250, 250, 250])
    # Numbers that could be held out (classes not entirely in training) never were trained.
    seen = set(train.tolist())
    for split in (validation, test):
        assert not [n for n in split.tolist() if n >= 10_000 and n in seen]


def test_held_out_numbers_come_from_outside_training_when_the_class_has_any():
    parts = nums.split_numbers(5_000, 3_000, 500, 400, seed=3)
    assert [len(parts[s]) for s in nums.NUMBER_SPLITS] == [3_000, 500, 400]
    seen = set(parts["train"].tolist())
    # 0-99 are all in training (750 pairs for 10 and 90 numbers); 100-999 and 1000-4999 are
    # not, so the held-out numbers there are unseen.
    assert set(range(100)) <= seen and not set(range(100, 1_000)) <= seen
    for split in ("validation", "test"):
        held = parts[split].tolist()
        assert not [n for n in held if n >= 100 and n in seen]
        assert max(held) < 5_000 and min(held) >= 0
    assert not set(parts["validation"].tolist()) & set(parts["test"].tolist())


def test_splits_are_deterministic_for_a_seed():
    parts = nums.split_numbers(5_000, 3_000, 500, 400, seed=3)
    again = nums.split_numbers(5_000, 3_000, 500, 400, seed=3)
    other = nums.split_numbers(5_000, 3_000, 500, 400, seed=4)
    assert all(np.array_equal(parts[s], again[s]) for s in nums.NUMBER_SPLITS)
    assert not np.array_equal(parts["test"], other["test"])


def test_split_sizes_must_fit():
    with pytest.raises(ValueError, match="validation split asks for 60 numbers but only 15"):
        nums.split_numbers(100, 50, 60, 60, seed=0)
    with pytest.raises(ValueError, match="must be between 1 and 1000000"):
        nums.split_numbers(2_000_000, 50, 60, 60, seed=0)
    with pytest.raises(ValueError, match="test size is 0"):
        nums.split_numbers(1_000, 50, 60, 0, seed=0)


def test_dataset_holds_exactly_the_split_numbers_and_their_values(prepared_numbers):
    cfg = small_numbers_config()
    parts = nums.split_numbers(cfg.numbers_max, cfg.numbers_train_size,
                               cfg.numbers_validation_size, cfg.numbers_test_size,
                               cfg.numbers_seed)
    for split in nums.NUMBER_SPLITS:
        got = collections.Counter(load_raw_pairs(cfg, split, prepared_numbers.data_dir))
        want = collections.Counter(
            (nums.english_words(n), nums.german_words(n)) for n in parts[split])
        assert got == want
        source = load_split(cfg, split, prepared_numbers.data_dir)
        values = source.values()
        assert values.dtype == np.int64 and len(values) == len(source)
        assert collections.Counter(values.tolist()) == collections.Counter(parts[split].tolist())
        for i in range(0, len(source), 7):
            assert source[i][0] == nums.english_words(values[i])


# --------------------------------------------------------------------------- spellings


def test_training_spelling_has_no_and_commas_or_capitals():
    assert nums.english_words(339_564) == (
        "three hundred thirty-nine thousand five hundred sixty-four")
    assert nums.english_words(105) == "one hundred five"
    for n in np.random.default_rng(0).integers(0, nums.MAX_SUPPORTED, 300):
        text = nums.english_words(n)
        assert "," not in text and " and " not in f" {text} " and text == text.lower()
        assert "  " not in text and text == text.strip()
        assert nums.normalize_english(text) == text  # idempotent


@pytest.mark.parametrize("n", NUMBERS)
def test_every_spelling_normalises_to_the_training_one(n):
    spellings = nums.english_spellings(n)
    assert set(spellings) == {"plain", "num2words", "capitalised", "punctuated", "digits"}
    assert spellings["num2words"] == num2words(n)
    if n >= 1_000 and n % 1_000 >= 100:
        assert "," in spellings["num2words"]
    if n > 100 and n % 100:
        assert " and " in spellings["num2words"] and " and " in spellings["punctuated"]
    assert spellings["capitalised"][0].isupper() and "-" not in spellings["capitalised"]
    assert spellings["punctuated"][0].isupper() and spellings["punctuated"].endswith(".")
    for name, text in spellings.items():
        assert nums.normalize_english(text) == nums.english_words(n), name


@pytest.mark.parametrize("text, want", [
    ("One hundred five", "one hundred five"),
    ("  Sixty   four, ", "sixty-four"),
    ("one-hundred and sixty four", "one hundred sixty-four"),
    ("Twenty-Two!", "twenty-two"),
    ("a hundred and five", "one hundred five"),
    ("A thousand", "one thousand"),
    ("hundred and one", "one hundred one"),
    ("one thousand", "one thousand"),  # the "and" inside "thousand" stays
    ("“Forty‐two”?", "forty-two"),  # typographic quotes and hyphen
    ("4,732", "four thousand seven hundred thirty-two"),
    ("4 732.", "four thousand seven hundred thirty-two"),
    ("0", "zero"),
    ("1000000", "1000000"),  # out of range: left as it is
    ("Hello, World", "hello world"),  # not a number: lower-cased and de-punctuated
])
def test_normaliser_cases(text, want):
    assert nums.normalize_english(text) == want


def test_the_normaliser_belongs_to_english_numbers_sources_only():
    assert nums.source_normalizer({"source": "numbers"}) is nums.normalize_english
    assert nums.source_normalizer({"source": "numbers", "source_lang": "en"}) is not None
    assert nums.source_normalizer({"source": "numbers", "source_lang": "de"}) is None
    assert nums.source_normalizer({"source": "text", "source_lang": "en"}) is None


def test_a_trained_run_translates_every_spelling_alike(tmp_path_factory):
    translator = Translator.from_workdir(trained_workdir(tmp_path_factory))
    assert translator.normalize is nums.normalize_english  # from the run's config
    chosen = [21, 105, 4_732, 8_019]
    groups = [list(nums.english_spellings(n).values()) for n in chosen]
    texts = [text for group in groups for text in group]
    ids, _ = translator.encode(texts)
    out = translator.translate(texts, beam_size=1)
    start = 0
    for group in groups:  # every spelling of a number: the same ids, the same output
        stop = start + len(group)
        assert all(i == ids[start] for i in ids[start:stop]), group
        assert len(set(out[start:stop])) == 1, group
        start = stop
    raw = Translator(translator.model_def.merge(translator.params), translator.tokenizer)
    raw_ids, _ = raw.encode(groups[1][:2])  # 105: plain and num2words
    assert raw_ids[0] != raw_ids[1]  # without the normaliser the spellings differ
