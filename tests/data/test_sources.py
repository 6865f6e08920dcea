"""Sources: your own text files (incl. bad input) and TFDS catalogue names (the numbers task is
tested in test_numbers.py)."""

import collections
import os
import subprocess
import sys
import textwrap

import pytest
import tensorflow_datasets as tfds

from transformer_jax.data import DataError, default_data_config, load_raw_pairs, load_split, sources

HERE = os.path.dirname(os.path.abspath(__file__))

# --------------------------------------------------------------------------- text files

PAIRS = [
    ("A dog runs.", "Ein Hund rennt."),
    ("Größe matters?", "Größe zählt?"),
    ("naïve café", "naives Café"),
    ("Ελληνικά και 日本語", "Griechisch und Japanisch"),
    ("two  spaces inside", "zwei  Leerzeichen"),
    ("emoji 🙂 here", "Emoji 🙂 hier"),
]


def write_split(folder, split, pairs, *, crlf=False, blank_at=()):
    """Writes {split}.en / {split}.de; blank_at inserts ("", "x") / ("x", "") style lines."""
    src_lines, tgt_lines = [], []
    for i, (s, t) in enumerate(pairs):
        if i in blank_at:
            src_lines.append("   ")
            tgt_lines.append("Lonely line")
        src_lines.append(s)
        tgt_lines.append(t)
    end = "\r\n" if crlf else "\n"
    for lang, lines in (("en", src_lines), ("de", tgt_lines)):
        with open(os.path.join(folder, f"{split}.{lang}"), "w", encoding="utf-8",
                  newline="") as f:
            f.write(end.join(lines) + end)


def text_config(path, **overrides):
    cfg = default_data_config()
    cfg.update(dict(source="text", path=str(path), train_split="train", eval_split="val",
                    test_split=""))
    cfg.update(overrides)
    return cfg


@pytest.fixture
def corpus(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    write_split(folder, "train", PAIRS * 3)
    write_split(folder, "val", PAIRS[:4])
    return folder


def test_text_builder_reads_back_exactly_the_pairs(corpus, tmp_path):
    # Windows line ends and two pairs with a blank side: normalised and skipped (with a warning).
    write_split(corpus, "train", PAIRS * 3, crlf=True, blank_at=(2, 7))
    cfg = text_config(corpus)
    with pytest.warns(UserWarning, match="Skipped 2 of 20 line pairs"):
        train = load_split(cfg, "train", str(tmp_path / "data"))
    got = [train[i] for i in range(len(train))]
    assert collections.Counter(got) == collections.Counter(PAIRS * 3)
    assert all(isinstance(s, str) and isinstance(t, str) for s, t in got)
    assert train[-1] == got[-1]
    val = load_raw_pairs(cfg, "val", str(tmp_path / "data"))
    assert collections.Counter(val) == collections.Counter(PAIRS[:4])


def test_text_builder_prepares_once_and_again_when_files_change(corpus, tmp_path, monkeypatch):
    cfg, data_dir = text_config(corpus), str(tmp_path / "data")
    first = load_split(cfg, "train", data_dir)

    def refuse(*args, **kwargs):
        raise AssertionError("prepared again although nothing changed")

    with monkeypatch.context() as m:
        m.setattr(sources.TextPairs, "download_and_prepare", refuse)
        again = load_split(cfg, "train", data_dir)
    assert len(again) == len(first) == 18
    write_split(corpus, "train", PAIRS[:2])  # edit the files
    changed = load_split(cfg, "train", data_dir)
    assert collections.Counter(changed[i] for i in range(len(changed))) == collections.Counter(
        PAIRS[:2])
    assert len(os.listdir(os.path.join(data_dir, "text_pairs"))) == 2  # one folder per version


def _write_raw(folder, name, data: bytes):
    with open(os.path.join(folder, name), "wb") as f:
        f.write(data)


def test_missing_directory(tmp_path):
    with pytest.raises(DataError, match=r"Data directory '.*nowhere' does not exist"):
        load_split(text_config(tmp_path / "nowhere"), "train", str(tmp_path / "data"))


def test_missing_file(corpus, tmp_path):
    os.remove(corpus / "val.de")
    with pytest.raises(DataError, match=r"Missing file '.*val\.de': the 'val' split needs"):
        load_split(text_config(corpus), "train", str(tmp_path / "data"))


def test_mismatched_line_counts(corpus, tmp_path):
    _write_raw(corpus, "val.en", b"one\ntwo\nthree\n")
    _write_raw(corpus, "val.de", b"eins\nzwei\n")
    with pytest.raises(DataError, match=r"val\.en has 3 lines but .*val\.de has 2"):
        load_split(text_config(corpus), "train", str(tmp_path / "data"))


def test_empty_file(corpus, tmp_path):
    _write_raw(corpus, "val.de", b"")
    with pytest.raises(DataError, match=r"val\.de is empty"):
        load_split(text_config(corpus), "train", str(tmp_path / "data"))


def test_invalid_utf8_names_file_and_line(corpus, tmp_path):
    _write_raw(corpus, "val.en", b"fine\nalso fine\nbad \xe9 byte\nok\n")
    _write_raw(corpus, "val.de", b"gut\nauch gut\nschlecht\nok\n")
    with pytest.raises(DataError, match=r"val\.en:3 is not valid UTF-8"):
        load_split(text_config(corpus), "train", str(tmp_path / "data"))


def test_all_blank_pairs(corpus, tmp_path):
    _write_raw(corpus, "val.en", b"\n  \nx\n")
    _write_raw(corpus, "val.de", b"a\nb\n\n")
    with pytest.raises(DataError, match="no pair of non-blank lines"):
        load_split(text_config(corpus), "train", str(tmp_path / "data"))


def test_bad_input_leaves_no_prepared_data(corpus, tmp_path):
    _write_raw(corpus, "val.en", b"one\n")
    data_dir = tmp_path / "data"
    with pytest.raises(DataError):
        load_split(text_config(corpus), "train", str(data_dir))
    assert not list(data_dir.glob("text_pairs/*/*/dataset_info.json"))


def test_unknown_split_is_named(corpus, tmp_path):
    with pytest.raises(DataError, match=r"Split 'test' is not in dataset text_pairs"):
        load_split(text_config(corpus), "test", str(tmp_path / "data"))


# --------------------------------------------------------------------------- catalogue


def tfds_config(**overrides):
    cfg = default_data_config()
    cfg.update(dict(source="tfds", tfds_name="ted_hrlr_translate/pt_to_en", source_lang="pt",
                    target_lang="en"))
    cfg.update(overrides)
    return cfg


def test_catalogue_dataset_through_data_source(tmp_path):
    # mock_data replaces the download and the array_record reader with generated records;
    # what is tested is our path: builder lookup, feature mapping, bytes/str -> str pairs.
    with tfds.testing.mock_data(num_examples=7, policy=tfds.testing.MockPolicy.USE_CODE):
        pairs = load_split(tfds_config(), "train", str(tmp_path))
        items = [pairs[i] for i in range(len(pairs))]
    assert len(pairs) == 7
    assert all(isinstance(s, str) and isinstance(t, str) and s != t for s, t in items)


def test_catalogue_legacy_name_resolves_without_tensorflow(tmp_path):
    # WMT builders live in lazily imported modules; the name must still resolve.
    builder = sources._catalogue_builder("wmt14_translate/de-en", str(tmp_path))
    assert set(builder.info.features.keys()) == {"de", "en"}


def test_catalogue_wrong_language_is_named(tmp_path):
    with tfds.testing.mock_data(num_examples=2, policy=tfds.testing.MockPolicy.USE_CODE):
        with pytest.raises(DataError, match=r"has features \['pt', 'en'\].*\('de', 'en'\)"):
            load_split(tfds_config(source_lang="de"), "train", str(tmp_path))


def test_catalogue_needs_a_name(tmp_path):
    with pytest.raises(DataError, match="needs data.tfds_name"):
        load_split(tfds_config(tfds_name=""), "train", str(tmp_path))


# --------------------------------------------------------------------------- no TensorFlow


def test_building_and_reading_never_imports_tensorflow(tmp_path):
    script = textwrap.dedent(f"""
        import sys
        from transformer_jax.data import (default_data_config, load_raw_pairs, prepare,
                                          train_iterator)
        cfg = default_data_config()  # only the data package: no test helpers, no model code
        cfg.update(dict(numbers_max=300, numbers_train_size=100, numbers_validation_size=10,
                        numbers_test_size=10, vocab_size=60, max_length=24))
        prepared = prepare(cfg, {str(tmp_path)!r})
        assert len(load_raw_pairs(cfg, "test", prepared.data_dir)) == 10
        next(train_iterator(prepared, 4, seed=0, process_index=0, process_count=1))
        print("tensorflow loaded:", "tensorflow" in sys.modules)
    """)
    out = subprocess.run([sys.executable, "-c", script], cwd=HERE, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "tensorflow loaded: False" in out.stdout
