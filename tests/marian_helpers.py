"""Tiny random Marian models and SentencePiece models built in the test (no downloads)."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
spm = pytest.importorskip("sentencepiece")

SENTENCES = [
    "the cat sat on the mat", "a dog runs in the park", "birds sing in the morning",
    "the children play football", "we read books at night", "my friend likes green tea",
    "the river flows to the sea", "snow falls on the mountain", "she writes a long letter",
    "they build a small house", "the sun rises in the east", "he drinks coffee every day",
] * 3

V = 60  # vocabulary of the tiny models: 59 pieces + <pad>


def train_spm(sentences, vocab_size: int) -> bytes:
    """A unigram SentencePiece model with SentencePiece's default ids (unk 0, s 1, /s 2)."""
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=buffer, vocab_size=vocab_size,
        model_type="unigram", character_coverage=1.0, num_threads=1, minloglevel=2,
        hard_vocab_limit=False)
    return buffer.getvalue()


def write_tokenizer(path: str) -> dict:
    """source.spm / target.spm (different models) + a joint vocab.json as OPUS-MT lays it
    out: </s> 0, <unk> 1, the pieces of both models, <pad> last (id V - 1)."""
    source = train_spm(SENTENCES, 40)
    target = train_spm([s[::-1] for s in SENTENCES], 40)
    pieces = []
    for proto in (source, target):
        sp = spm.SentencePieceProcessor(model_proto=proto)
        pieces += [sp.id_to_piece(i) for i in range(3, sp.get_piece_size())]
    pieces = list(dict.fromkeys(pieces))[: V - 3]
    vocab = {"</s>": 0, "<unk>": 1}
    for piece in pieces:
        vocab[piece] = len(vocab)
    vocab["<pad>"] = len(vocab)
    with open(os.path.join(path, "source.spm"), "wb") as f:
        f.write(source)
    with open(os.path.join(path, "target.spm"), "wb") as f:
        f.write(target)
    with open(os.path.join(path, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f)
    with open(os.path.join(path, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump({"source_lang": "en", "target_lang": "xx"}, f)
    return vocab


def make_marian(path: str, *, seed: int = 0, vocab_size: int = V, eos_bias: float = 0.0,
                **overrides):
    """Saves a random ``MarianMTModel`` (with a random final_logits_bias, ``eos_bias`` added
    at EOS so that outputs end at different lengths) in ``path``."""
    kwargs = dict(
        vocab_size=vocab_size, d_model=16, encoder_layers=2, decoder_layers=1,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=24,
        decoder_ffn_dim=24, max_position_embeddings=64, activation_function="gelu",
        pad_token_id=vocab_size - 1, decoder_start_token_id=vocab_size - 1, eos_token_id=0,
        forced_eos_token_id=0, scale_embedding=True)
    kwargs.update(overrides)
    torch.manual_seed(seed)
    model = transformers.MarianMTModel(transformers.MarianConfig(**kwargs)).eval()
    with torch.no_grad():
        model.final_logits_bias.normal_(std=0.5)
        model.final_logits_bias[0, kwargs["eos_token_id"]] += eos_bias
    model.save_pretrained(path)
    return model


def hf_logits(model, src: np.ndarray, tgt_in: np.ndarray) -> np.ndarray:
    pad = model.config.pad_token_id
    src_t = torch.as_tensor(src, dtype=torch.long)
    with torch.no_grad():
        return model(input_ids=src_t, attention_mask=(src_t != pad).long(),
                     decoder_input_ids=torch.as_tensor(tgt_in, dtype=torch.long)).logits.numpy()


def hf_generate(model, src: np.ndarray, **kwargs) -> list[list[int]]:
    """``generate()`` outputs without the start token, cut after the first EOS."""
    pad, eos = model.config.pad_token_id, model.config.eos_token_id
    src_t = torch.as_tensor(src, dtype=torch.long)
    with torch.no_grad():
        out = model.generate(src_t, attention_mask=(src_t != pad).long(), do_sample=False,
                             early_stopping=False, forced_eos_token_id=eos,
                             bad_words_ids=[[pad]], **kwargs).numpy()
    return [cut(row[1:], eos) for row in out]


def cut(row, eos: int) -> list[int]:
    row = [int(i) for i in row]
    return row[: row.index(eos) + 1] if eos in row else row
