"""The numbers task's English spellings: every variant people write normalises to the one
spelling the task trains on, and a trained run's Translator applies that normaliser."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import trained_workdir
from num2words import num2words

from transformer_jax.data import numbers
from transformer_jax.inference import Translator

NUMBERS = [0, 5, 13, 21, 100, 105, 110, 999, 1_001, 4_732, 20_020, 101_000, 339_564, 999_999]


def test_training_spelling_has_no_and_commas_or_capitals():
    assert numbers.english_words(339_564) == (
        "three hundred thirty-nine thousand five hundred sixty-four")
    assert numbers.english_words(105) == "one hundred five"
    for n in np.random.default_rng(0).integers(0, numbers.MAX_SUPPORTED, 300):
        text = numbers.english_words(n)
        assert "," not in text and " and " not in f" {text} " and text == text.lower()
        assert "  " not in text and text == text.strip()


@pytest.mark.parametrize("n", NUMBERS)
def test_every_spelling_normalises_to_the_training_one(n):
    spellings = numbers.english_spellings(n)
    assert set(spellings) == {"plain", "num2words", "capitalised", "and"}
    assert spellings["num2words"] == num2words(n)
    if n >= 1_000 and n % 1_000 >= 100:
        assert "," in spellings["num2words"]
    if n > 100 and n % 100:
        assert " and " in spellings["num2words"] and " and " in spellings["and"]
    assert spellings["capitalised"][0].isupper() and "-" not in spellings["capitalised"]
    for name, text in spellings.items():
        assert numbers.normalize_english(text) == numbers.english_words(n), name
    assert numbers.normalize_english(numbers.english_words(n)) == numbers.english_words(n)


def test_normaliser_cases():
    norm = numbers.normalize_english
    assert norm("One hundred five") == "one hundred five"
    assert norm("  Sixty   four, ") == "sixty-four"
    assert norm("one-hundred and sixty four") == "one hundred sixty-four"
    assert norm("thousand") == "thousand"  # "and" inside a word stays


def test_the_normaliser_belongs_to_english_numbers_sources_only():
    assert numbers.source_normalizer({"source": "numbers"}) is numbers.normalize_english
    assert numbers.source_normalizer({"source": "numbers", "source_lang": "en"}) is not None
    assert numbers.source_normalizer({"source": "numbers", "source_lang": "de"}) is None
    assert numbers.source_normalizer({"source": "text", "source_lang": "en"}) is None


def test_a_trained_run_translates_every_spelling_alike(tmp_path_factory):
    translator = Translator.from_workdir(trained_workdir(tmp_path_factory))
    assert translator.normalize is numbers.normalize_english  # from the run's config
    chosen = [21, 105, 4_732, 8_019]
    texts = [text for n in chosen for text in numbers.english_spellings(n).values()]
    ids, _ = translator.encode(texts)
    out = translator.translate(texts, beam_size=1)
    for i in range(0, len(texts), 4):  # four spellings per number: same ids, same output
        assert ids[i] == ids[i + 1] == ids[i + 2] == ids[i + 3], texts[i : i + 4]
        assert out[i] == out[i + 1] == out[i + 2] == out[i + 3]
    raw = Translator(translator.model_def.merge(translator.params), translator.tokenizer)
    raw_ids, _ = raw.encode(texts[4:8])  # 105
    assert raw_ids[0] != raw_ids[1]  # without the normaliser the spellings differ
