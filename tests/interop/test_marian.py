"""Marian (transformers) -> our Transformer: logits, decoding and tokenizer parity."""

from __future__ import annotations

import numpy as np
import pytest
from marian_helpers import (
    V,
    cut,
    hf_generate,
    hf_logits,
    make_marian,
    torch,
    transformers,
    write_tokenizer,
)

from transformer_jax.interop import marian

PAD = V - 1
SRC = np.array([[5, 6, 7, 8, 9, 0], [10, 11, 12, 0, PAD, PAD], [13, 0, PAD, PAD, PAD, PAD]])
TGT_IN = np.array([[PAD, 3, 4, 14, 15], [PAD, 16, 17, 2, 0], [PAD, 18, 0, PAD, PAD]])
# The labels whose shift right behind the pad id (Marian's decoder start) is TGT_IN: the
# model's call reads them as transformers' labels=.
BATCH = {"inputs": SRC, "targets": np.concatenate([TGT_IN[:, 1:], [[7], [8], [9]]], axis=1)}


@pytest.mark.parametrize("overrides", [
    dict(activation_function="gelu", scale_embedding=True),
    dict(activation_function="relu", scale_embedding=False, share_encoder_decoder_embeddings=False,
         normalize_before=True),  # an extra key transformers' Marian ignores (still post-LN)
    dict(activation_function="swish", tie_word_embeddings=False, encoder_layers=1,
         decoder_layers=2),
    dict(activation_function="gelu_new", d_model=24, encoder_attention_heads=3,
         decoder_attention_heads=2, encoder_ffn_dim=40, decoder_ffn_dim=20,
         share_encoder_decoder_embeddings=False, tie_word_embeddings=False),
], ids=["gelu", "relu-unshared", "swish-untied", "gelu_new-heads3+2"])
def test_logits_match_transformers(tmp_path, overrides):
    hf = make_marian(str(tmp_path), **overrides)
    model, config, tokenizer = marian.from_pretrained(str(tmp_path))
    assert tokenizer is None and config.pad_id == PAD
    got = np.asarray(model(BATCH))
    want = hf_logits(hf, SRC, TGT_IN)
    # Padded decoder positions are compared too: neither side masks decoder inputs.
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    assert np.abs(want).max() > 0.5  # not a trivially small comparison


def test_reads_pytorch_bin_with_weights_only(tmp_path):
    hf = make_marian(str(tmp_path), seed=3)
    (tmp_path / "model.safetensors").unlink()
    state = {k: v for k, v in hf.state_dict().items() if "embed_positions" not in k}
    torch.save(state, tmp_path / "pytorch_model.bin")
    model = marian.from_pretrained(str(tmp_path)).model
    np.testing.assert_allclose(np.asarray(model(BATCH)), hf_logits(hf, SRC, TGT_IN),
                               atol=1e-4, rtol=0)


@pytest.mark.parametrize("num_beams,length_penalty", [(1, 1.0), (4, 0.6), (2, 2.0)])
def test_generate_matches_transformers(tmp_path, num_beams, length_penalty):
    hf = make_marian(str(tmp_path), seed=1, activation_function="relu", eos_bias=2.5)
    model = marian.from_pretrained(str(tmp_path)).model
    settings = dict(num_beams=num_beams, length_penalty=length_penalty, max_length=12)
    want = hf_generate(hf, SRC, **settings)
    got = [cut(row, 0) for row in marian.generate(model, SRC, **settings)]
    assert got == want
    assert min(len(r) for r in want) < 11  # some end before max_length


def test_errors_are_one_sentence(tmp_path):
    with pytest.raises(marian.ConversionError, match="no directory"):
        marian.from_pretrained(str(tmp_path / "missing"))
    make_marian(str(tmp_path), decoder_vocab_size=V + 4)
    with pytest.raises(marian.ConversionError, match="decoder_vocab_size=64 differs"):
        marian.from_pretrained(str(tmp_path))
    make_marian(str(tmp_path), activation_function="linear")
    with pytest.raises(marian.ConversionError, match="activation_function='linear' is not"):
        marian.from_pretrained(str(tmp_path))


def test_tokenizer_matches_marian_tokenizer(tmp_path):
    vocab = write_tokenizer(str(tmp_path))
    hf_tok = transformers.MarianTokenizer(
        str(tmp_path / "source.spm"), str(tmp_path / "target.spm"), str(tmp_path / "vocab.json"))
    ours = marian.MarianTokenizer.from_directory(str(tmp_path))
    texts = ["the cat sat on the mat", "a dog likes tea!", "zebras XYZ 42", ">>xx<< the sun",
             "  spaces   here "]
    assert ours.vocab_size == len(vocab)
    for text in texts:
        want = hf_tok(text)["input_ids"]
        assert ours.encode_one(text) + [ours.eos_id] == want, text
        target = hf_tok(text_target=text)["input_ids"]
        assert ours.encode_target([text])[0] + [ours.eos_id] == target, text
    batch = ours.batch(texts[:2])
    assert batch.shape[0] == 2 and (batch == ours.pad_id).any()
    for text in texts[:2]:
        ids = hf_tok(text)["input_ids"]
        assert ours.decode([ids]) == [hf_tok.decode(ids, skip_special_tokens=True)]
