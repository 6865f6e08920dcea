"""Tokenizer: special ids, round trip, EOS/pad handling in decode, determinism, atomic save,
subword sampling."""

import os
import re

import numpy as np
import pytest
import sentencepiece as spm

from transformer_jax.data import EOS_ID, PAD_ID, UNK_ID, DataError, Tokenizer
from transformer_jax.data.config import check_data_config, default_data_config
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


def test_sampled_segmentations_spell_the_text_and_follow_p_to_the_alpha(tokenizer):
    text = "Zwei junge Mädchen spielen im Gras neben einem Brunnen."
    keys = range(4000)

    def draws(alpha, nbest_size=4, seed=0):
        return tokenizer.encode_sampled([text] * len(keys), list(keys), alpha=alpha,
                                        nbest_size=nbest_size, seed=seed)

    got = draws(0.5)
    assert set(tokenizer.decode([ids + [EOS_ID] for ids in got])) == {text}
    assert got == draws(0.5)  # a function of (seed, key)
    assert got != draws(0.5, seed=1)
    # The frequencies follow P(segmentation) ** alpha over the n best, computed independently
    # from SentencePiece's own n-best scores.
    sp = spm.SentencePieceProcessor(model_proto=tokenizer.model_proto)
    nbest = sp.nbest_encode_as_ids(text, nbest_size=4)
    assert len(set(map(tuple, nbest))) == 4
    log_p = np.array([sum(sp.get_score(i) for i in ids) for ids in nbest])
    want = np.exp(0.5 * log_p) / np.exp(0.5 * log_p).sum()
    freq = np.array([sum(g == ids for g in got) for ids in nbest]) / len(keys)
    assert np.all(np.abs(freq - want) <= 4 * np.sqrt(want * (1 - want) / len(keys)) + 1e-3), (
        freq, want)  # within 4 standard errors
    # The most frequent draw is the best segmentation, which is what encode gives.
    assert nbest[0] == tokenizer.encode_one(text) and freq.argmax() == 0


def test_sampling_needs_a_unigram_model():
    bpe = Tokenizer.train(SENTENCES, vocab_size=100, model_type="bpe")
    with pytest.raises(DataError, match="needs a unigram tokenizer"):
        bpe.encode_sampled(["a b"], [0], alpha=0.1, nbest_size=4, seed=0)


@pytest.mark.parametrize(("overrides", "words"), [
    ({"subword_sampling_alpha": -0.1}, "data.subword_sampling_alpha=-0.1 must be >= 0"),
    ({"subword_sampling_alpha": 0.1, "tokenizer_model_type": "bpe"},
     "needs data.tokenizer_model_type='unigram'"),
    ({"subword_sampling_alpha": 0.1, "subword_sampling_nbest": 1},
     "data.subword_sampling_nbest=1 must be >= 2"),
])
def test_bad_sampling_settings_are_named(overrides, words):
    cfg = default_data_config()
    cfg.update(overrides)
    with pytest.raises(ValueError, match=re.escape(words)):
        check_data_config(cfg)
