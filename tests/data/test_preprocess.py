"""data.lowercase / unicode_normalization / normalize_punctuation / max_length_ratio."""

import collections
import os
import re
import unicodedata

import pytest

from transformer_jax.data import default_data_config, load_split
from transformer_jax.data.config import check_data_config
from transformer_jax.data.preprocess import Preprocessor, source_transform

RAW = [
    ("\uff21 \ufb01ne \u201cDay\u201d\u2026", "Ein \u201eSch\u00f6ner\u201c Tag \u2013 ja"),
    ("Two  Dogs", "Zwei Hunde"),
]


def test_default_is_the_identity():
    pre = Preprocessor()
    assert pre.is_identity
    for src, tgt in RAW:
        assert (pre.source(src), pre.target(tgt)) == (src, tgt)
    assert Preprocessor.from_config(default_data_config()) == pre


def test_each_step_against_the_standard_library():
    src, tgt = RAW[0]
    nfkc = Preprocessor(unicode_normalization="NFKC")
    assert nfkc.source(src) == unicodedata.normalize("NFKC", src)
    assert nfkc.source(src).startswith("A fine")  # full-width A and the fi ligature folded
    lower = Preprocessor(lowercase=True)
    assert lower.target(tgt) == tgt.lower()
    punct = Preprocessor(normalize_punctuation=True, target_lang="de")
    assert punct.target(tgt) == 'Ein "Sch\u00f6ner" Tag - ja'
    assert punct.source(RAW[1][0]) == "Two Dogs"  # runs of spaces collapse


def test_steps_compose_in_order():
    pre = Preprocessor(lowercase=True, unicode_normalization="NFKC", normalize_punctuation=True)
    # (Moses' English rule moves the full stop inside the closing quote.)
    assert pre.source(RAW[0][0]) == 'a fine "day..."'


def test_length_ratio_filter():
    pre = Preprocessor(max_length_ratio=2.0)
    assert pre.keep(4, 8) and pre.keep(8, 4)
    assert not pre.keep(4, 9) and not pre.keep(9, 4)
    assert pre.keep(0, 2) and not pre.keep(0, 3)  # an empty side counts as one token
    assert Preprocessor().keep(1, 1000)


@pytest.mark.parametrize(
    "key, value, words",
    [("unicode_normalization", "NFKX", "must be one of"),
     ("max_length_ratio", 0.5, "must be 0 (off) or >= 1"),
     ("max_length_ratio", -1.0, "must be 0 (off) or >= 1")],
)
def test_bad_values_are_named(key, value, words):
    cfg = default_data_config()
    cfg[key] = value
    with pytest.raises(ValueError, match=rf"data\.{key}=.*{re.escape(words)}"):
        check_data_config(cfg)


def test_pairs_read_from_a_prepared_source_are_preprocessed(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    for lang, side in (("en", 0), ("de", 1)):
        with open(os.path.join(folder, f"train.{lang}"), "w", encoding="utf-8") as f:
            f.write("\n".join(pair[side] for pair in RAW * 2) + "\n")
    cfg = default_data_config()
    cfg.update(dict(source="text", path=str(folder), eval_split="train", test_split="",
                    lowercase=True, unicode_normalization="NFKC"))
    pairs = load_split(cfg, "train", str(tmp_path / "data"))
    got = collections.Counter(pairs[i] for i in range(len(pairs)))
    pre = Preprocessor(lowercase=True, unicode_normalization="NFKC")
    assert got == collections.Counter((pre.source(s), pre.target(t)) for s, t in RAW * 2)


def test_source_transform_is_what_translate_applies():
    numbers = default_data_config()  # the built-in numbers task: its spelling normaliser
    assert source_transform(numbers)("Three hundred and five") == "three hundred five"
    text = default_data_config()
    text.update(dict(source="text", lowercase=True, unicode_normalization="NFKC"))
    assert source_transform(text)("\uff21 Dog") == "a dog"
    text.update(dict(lowercase=False, unicode_normalization=""))
    assert source_transform(text) is None  # nothing to do: the input is used as typed
    both = default_data_config()
    both.update(dict(normalize_punctuation=True))
    assert source_transform(both)("One hundred and five") == "one hundred five"
