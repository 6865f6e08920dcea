"""Tokenizer: special ids, round trip, EOS/pad handling in decode, determinism, atomic save."""

import os

import numpy as np
import pytest
import sentencepiece as spm

from transformer_jax.data import EOS_ID, PAD_ID, UNK_ID, DataError, Tokenizer
from transformer_jax.data.numbers import english_words, german_words

SENTENCES = [
    "A man in a blue shirt is standing on a ladder.",
    "Ein Mann in einem blauen Hemd steht auf einer Leiter.",
    "Two young girls are playing in the grass near a fountain.",
    "Zwei junge Mädchen spielen im Gras neben einem Brunnen.",
    "Größere Straßen führen über die Brücke.",
    "The café serves crème brûlée and naïve drinks.",
    "Δύο σκύλοι τρέχουν στην παραλία.",
] * 20


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.train(SENTENCES, vocab_size=100)


def test_special_ids_and_vocab(tokenizer):
    assert (tokenizer.pad_id, tokenizer.eos_id, tokenizer.unk_id) == (PAD_ID, EOS_ID, UNK_ID)
    assert (PAD_ID, EOS_ID, UNK_ID) == (0, 1, 2)
    assert tokenizer.vocab_size == 100
    assert [tokenizer.id_to_piece(i) for i in range(3)] == ["<pad>", "</s>", "<unk>"]


def test_round_trip(tokenizer):
    ids = tokenizer.encode(SENTENCES[:7])
    assert all(EOS_ID not in row and PAD_ID not in row for row in ids)
    assert tokenizer.decode(ids) == SENTENCES[:7]
    # The pieces themselves spell the sentence (independent of decode).
    pieces = "".join(tokenizer.id_to_piece(i) for i in ids[4]).replace("\u2581", " ").strip()
    assert pieces == SENTENCES[4]


def test_decode_stops_at_eos_and_ignores_padding(tokenizer):
    a, b = tokenizer.encode(["A man is standing.", "Zwei Mädchen"])
    width = max(len(a), len(b)) + 4
    rows = np.zeros((3, width), np.int32)  # [B, T]
    rows[0, : len(a) + 1] = a + [EOS_ID]
    rows[0, len(a) + 1 : len(a) + 3] = b[:2]  # garbage after EOS is ignored
    rows[1, : len(b)] = b  # no EOS: everything up to the padding
    rows[2, :3] = [PAD_ID, b[0], PAD_ID]  # pad inside a row is dropped
    assert tokenizer.decode(rows) == ["A man is standing.", "Zwei Mädchen",
                                      tokenizer.decode([[b[0]]])[0]]
    assert tokenizer.decode([a + [EOS_ID] + a, b]) == ["A man is standing.", "Zwei Mädchen"]


def test_encode_rejects_a_bare_string(tokenizer):
    with pytest.raises(TypeError, match="list of strings"):
        tokenizer.encode("A man")


@pytest.mark.parametrize("model_type", ["unigram", "bpe"])
def test_training_is_deterministic(model_type):
    # Large enough that SentencePiece's worker threads each get a share of the text.
    corpus = SENTENCES + [f"{english_words(n)} = {german_words(n)}" for n in range(0, 30000, 7)]
    first = Tokenizer.train(corpus, vocab_size=300, model_type=model_type)
    second = Tokenizer.train(corpus, vocab_size=300, model_type=model_type)
    assert first.model_proto == second.model_proto
    other = Tokenizer.train(corpus[:-1], vocab_size=300, model_type=model_type)
    assert other.model_proto != first.model_proto


def test_save_is_atomic_and_loads_back(tokenizer, tmp_path):
    path = str(tmp_path / "tok" / "spm.model")
    tokenizer.save(path)
    assert os.listdir(tmp_path / "tok") == ["spm.model"]  # no temporary file left
    loaded = Tokenizer.load(path)
    assert loaded.model_proto == tokenizer.model_proto
    reference = spm.SentencePieceProcessor(model_file=path)  # SentencePiece reads it directly
    assert loaded.encode(SENTENCES[:3]) == [reference.encode(s) for s in SENTENCES[:3]]


def test_failed_write_leaves_nothing(tokenizer, tmp_path, monkeypatch):
    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        tokenizer.save(str(tmp_path / "spm.model"))
    assert os.listdir(tmp_path) == []


def test_vocabulary_too_large_suggests_a_size():
    with pytest.raises(DataError, match=r"data.vocab_size=5000 is too large .* to \d+ or less"):
        Tokenizer.train(SENTENCES, vocab_size=5000)


def test_unknown_model_type():
    with pytest.raises(DataError, match="model_type='word' must be 'unigram' or 'bpe'"):
        Tokenizer.train(SENTENCES, vocab_size=50, model_type="word")


def test_load_missing_file(tmp_path):
    with pytest.raises(DataError, match="No tokenizer model at"):
        Tokenizer.load(str(tmp_path / "missing.model"))
