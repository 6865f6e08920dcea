"""configs/finetune_lora.py on an imported (tiny, random) Marian model: train.py's path trains
the adapters and leaves the imported weights bit for bit."""

import importlib.util
import os

import jax
import numpy as np
import pytest

pytest.importorskip("transformers")
from marian_helpers import make_marian, write_tokenizer  # noqa: E402

from transformer_jax.checkpoints import load_params, save_adapters  # noqa: E402
from transformer_jax.interop import marian  # noqa: E402
from transformer_jax.nn.adapters import adapter_params, base_params  # noqa: E402
from transformer_jax.training import train_and_evaluate  # noqa: E402
from transformer_jax.training.defaults import model_config  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SENTENCES = ["the cat sat", "a dog ran home", "the bird sang", "two cats sat down",
             "a red car", "the old man walked", "she reads a book", "we ate bread"]


def _get_config(workdir: str):
    spec = importlib.util.spec_from_file_location(
        "finetune_lora", os.path.join(ROOT, "configs", "finetune_lora.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(workdir)


def test_lora_finetune_of_an_imported_model(tmp_path):
    hf_dir, workdir, data = tmp_path / "hf", tmp_path / "work", tmp_path / "data"
    hf_dir.mkdir()
    data.mkdir()
    vocab = write_tokenizer(str(hf_dir))
    make_marian(str(hf_dir), seed=2, vocab_size=len(vocab))
    assert marian.main(["import", str(hf_dir), "--workdir", str(workdir)]) == 0
    for split in ("train", "val"):
        for lang, text in (("en", SENTENCES), ("xx", [s[::-1] for s in SENTENCES])):
            (data / f"{split}.{lang}").write_text("\n".join(text) + "\n", encoding="utf-8")
    c = _get_config(str(workdir))
    assert c.model.lora_rank > 0
    c.num_train_steps, c.batch_size, c.checkpoint_every_steps = 2, 4, 2
    c.parallelism = "none"
    c.eval_every_steps, c.eval_metrics, c.eval_num_sentences = 0, "", 0
    c.data.path, c.data.source_lang, c.data.target_lang = str(data), "en", "xx"
    c.data.max_length, c.data.prefetch_batches = 24, 0
    before = load_params(str(workdir), 0)
    assert train_and_evaluate(c, str(workdir))["step"] == 2
    after = load_params(str(workdir), 2)
    for a, b in zip(_sorted_leaves(base_params(after)), _sorted_leaves(before), strict=True):
        np.testing.assert_array_equal(a, b)  # the imported weights, bit for bit
    trained_b = [x for p, x in jax.tree_util.tree_leaves_with_path(adapter_params(after))
                 if jax.tree_util.keystr(p).endswith("['b']")]
    assert trained_b and all(np.abs(np.asarray(x)).max() > 0 for x in trained_b)  # from 0
    sha = save_adapters(str(tmp_path / "adapters"), after, model_config(c))
    assert len(sha) == 64


def _sorted_leaves(tree):
    return [x for _, x in sorted(jax.tree_util.tree_leaves_with_path(tree),
                                 key=lambda item: jax.tree_util.keystr(item[0]))]
