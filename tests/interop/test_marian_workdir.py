"""Marian directory -> work directory (translate, fine-tune) -> Marian directory."""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest
from marian_helpers import (
    SENTENCES,
    cut,
    hf_generate,
    hf_logits,
    make_marian,
    transformers,
    write_tokenizer,
)

from transformer_jax import translate
from transformer_jax.checkpoints import load_params
from transformer_jax.inference import Translator
from transformer_jax.interop import marian
from transformer_jax.training import train_and_evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TEXTS = ["the cat sat on the mat", "birds play football", "a dog reads XYZ 42"]


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    base = tmp_path_factory.mktemp("marian")
    hf_dir, workdir = base / "hf", base / "work"
    hf_dir.mkdir()
    vocab = write_tokenizer(str(hf_dir))
    hf = make_marian(str(hf_dir), seed=2, vocab_size=len(vocab), eos_bias=2.5)
    assert marian.main(["import", str(hf_dir), "--workdir", str(workdir)]) == 0
    hf_tok = transformers.MarianTokenizer.from_pretrained(str(hf_dir))
    return hf, hf_tok, hf_dir, workdir


def to_ours(ids, pad: int) -> list[int]:
    """Marian ids -> work-directory ids (pad, eos, unk first; others shifted up)."""
    order = [pad, 0, 1] + [i for i in range(pad) if i > 1]
    return [order.index(i) for i in ids]


def test_translate_equals_generate(imported, tmp_path, capfd):
    hf, hf_tok, _, workdir = imported
    pad = hf.config.pad_token_id
    translator = Translator.from_workdir(str(workdir))
    rows, cut_rows = translator.encode(TEXTS)
    assert not cut_rows
    for text, row in zip(TEXTS, rows, strict=True):  # the joint SentencePiece model
        assert row == to_ours(hf_tok(text)["input_ids"], pad), text
    got = translator.translate_ids(rows, beam_size=1)
    src = hf_tok(TEXTS, padding=True, return_tensors="np")["input_ids"]
    want = hf_generate(hf, src, num_beams=1, max_length=60)
    assert [cut(r, 1) for r in got] == [to_ours(w, pad) for w in want]
    texts = translator.translate(TEXTS, beam_size=1)
    assert texts == hf_tok.batch_decode(want, skip_special_tokens=True)
    # the command line reads the same work directory unchanged
    (tmp_path / "in.txt").write_text("\n".join(TEXTS) + "\n", encoding="utf-8")
    args = ["--workdir", str(workdir), "--beam", "1", "--input", str(tmp_path / "in.txt")]
    assert translate.main(args) == 0
    assert capfd.readouterr().out.splitlines() == texts


def test_export_round_trip(imported, tmp_path):
    hf, _, hf_dir, workdir = imported
    out = tmp_path / "exported"
    assert marian.main(["export", str(workdir), "--to", str(out)]) == 0
    back = transformers.MarianMTModel.from_pretrained(str(out)).eval()
    pad = hf.config.pad_token_id
    src = np.array([[5, 6, 7, 0], [8, 0, pad, pad]])
    tgt = np.array([[pad, 3, 4, 9], [pad, 10, 0, pad]])
    np.testing.assert_allclose(hf_logits(back, src, tgt), hf_logits(hf, src, tgt), atol=1e-6)
    assert {"config.json", "model.safetensors", "source.spm", "vocab.json"} <= set(os.listdir(out))
    tok = transformers.MarianTokenizer.from_pretrained(str(out))
    assert tok("the cat")["input_ids"] == transformers.MarianTokenizer.from_pretrained(
        str(hf_dir))("the cat")["input_ids"]


def test_cli_errors(imported, tmp_path, capsys):
    _, _, hf_dir, workdir = imported
    assert marian.main(["import", str(hf_dir), "--workdir", str(workdir)]) == 2
    assert marian.main(["import", str(tmp_path / "nothing"), "--workdir", str(tmp_path / "w")]) == 2
    assert marian.main(["export", str(tmp_path), "--to", str(tmp_path / "x")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 3 and all(line.startswith("error: ") for line in lines)
    assert "not empty" in lines[0] and "no directory" in lines[1] and "import" in lines[2]
    assert not os.path.exists(tmp_path / "w") and not os.path.exists(tmp_path / "x")


def _finetune_config(workdir, data_dir):
    spec = importlib.util.spec_from_file_location(
        "finetune_marian", os.path.join(ROOT, "configs", "finetune_marian.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config(str(workdir))
    c.num_train_steps, c.batch_size, c.checkpoint_every_steps = 2, 4, 2
    c.parallelism = "none"
    c.eval_every_steps, c.eval_metrics, c.eval_num_sentences = 0, "", 0
    c.data.path, c.data.source_lang, c.data.target_lang = str(data_dir), "en", "xx"
    c.data.max_length, c.data.prefetch_batches = 24, 0
    c.optimizer.learning_rate = 1e-3
    return c


def test_finetune_starts_from_imported_weights(imported, tmp_path):
    _, _, _, workdir = imported
    for split in ("train", "val"):
        for lang, text in (("en", SENTENCES[:12]), ("xx", [s[::-1] for s in SENTENCES[:12]])):
            (tmp_path / f"{split}.{lang}").write_text("\n".join(text) + "\n", encoding="utf-8")
    before = load_params(str(workdir), 0)
    summary = train_and_evaluate(_finetune_config(workdir, tmp_path), str(workdir))
    assert summary["step"] == 2
    after = load_params(str(workdir), 2)
    table = ("decoder", "embedding", "tokens", "embed", "embedding")
    a, b = before, after
    for key in table:
        if key not in a:  # shared table stored under the encoder
            a, b = before["encoder"], after["encoder"]
        a, b = a[key], b[key]
    change = np.abs(np.asarray(a) - np.asarray(b)).max()
    assert 0 < change < 0.01  # two Adam steps of 1e-3 away from the imported weights
    out = tmp_path / "finetuned"
    assert marian.main(["export", str(workdir), "--to", str(out)]) == 0
    assert transformers.MarianMTModel.from_pretrained(str(out)) is not None
