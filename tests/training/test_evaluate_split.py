"""Eval decoding split over processes and devices gives the sentences of a plain loop."""

import jax
import numpy as np
import pytest
from flax import nnx

from transformer_jax import data
from transformer_jax.config import ModelConfig
from transformer_jax.evaluation import make_translate_fn
from transformer_jax.nn import Transformer
from transformer_jax.training import split_model
from transformer_jax.training.evaluate import Evaluator, assemble_translations
from transformer_jax.training.parallel import DataParallel

LIMIT = 21  # sentences decoded: 3 global batches of 8, the last one partly filler


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    cfg = data.default_data_config()
    cfg.update(numbers_max=3000, numbers_train_size=200, numbers_validation_size=30,
               numbers_test_size=10, vocab_size=64, max_length=16)
    prepared = data.prepare(cfg, str(tmp_path_factory.mktemp("eval_split")))
    model_cfg = ModelConfig(vocab_size=64, d_model=32, num_heads=2, num_layers=1, d_ff=64,
                            max_len=32, dropout_rate=0.0)
    def build():
        return Transformer(model_cfg, rngs=nnx.Rngs(3))

    model_def, _ = split_model(nnx.eval_shape(build))
    # One compile, not one per op; scaled up so that outputs differ between sentences.
    params = jax.jit(lambda: jax.tree.map(lambda x: 4 * x, split_model(build())[1]))()
    return prepared, model_def, params


def evaluator(setup, devices):
    prepared, model_def, _ = setup
    mode = "none" if devices == 1 else "shard_map"
    return Evaluator(DataParallel(mode, jax.devices()[:devices]), model_def, prepared,
                     label_smoothing=0.0, batch_size=8, metric_names=("bleu", "exact_match"))


@pytest.fixture(scope="module")
def plain_loop(setup):
    """Reference: each sentence alone (a batch of one) through the decoder on one device."""
    prepared, model_def, params = setup
    translate = make_translate_fn(model_def, max_length=prepared.max_length)
    singles = data.eval_batches(prepared, "validation", 1, process_index=0, process_count=1)
    hyps = []
    for i in range(LIMIT):
        assert singles[i]["index"].tolist() == [i]
        hyps += prepared.tokenizer.decode(np.asarray(translate(params, singles[i]["inputs"])))
    return hyps


def test_one_process_on_one_or_four_devices_matches_a_plain_loop(setup, plain_loop):
    want = plain_loop
    assert len(set(want)) >= 4  # distinct outputs: a shuffled order would be caught
    for devices in (1, 4):
        indices, hyps, refs = evaluator(setup, devices).translations(setup[2], "validation",
                                                                     LIMIT)
        assert indices == list(range(LIMIT))
        assert hyps == want
        assert refs == [t for _, t in data.raw_pairs(setup[0], "validation")[:LIMIT]]


def test_rows_of_two_processes_gather_to_the_one_process_result(setup, plain_loop):
    processes = 2
    ev = evaluator(setup, 2)
    parts = [ev.decode_local(setup[2], "validation", LIMIT, process_index=p,
                             process_count=processes) for p in range(processes)]
    assert all(len(index) == 24 // processes for index, _ in parts)  # 1 / P of the rows each
    index = np.concatenate([i for i, _ in parts])
    ids = np.concatenate([x for _, x in parts])
    indices, hyps = assemble_translations(index, ids, LIMIT, setup[0].tokenizer)
    assert indices == list(range(LIMIT))
    assert hyps == plain_loop


def test_missing_rows_are_an_error(setup):
    ids = np.zeros((3, 4), np.int32)
    with pytest.raises(ValueError, match="not each of 0..2 once"):
        assemble_translations(np.array([0, 2, -1]), ids, 3, setup[0].tokenizer)
    with pytest.raises(ValueError, match="not each of 0..1 once"):
        assemble_translations(np.array([0, 1, 1]), ids, 2, setup[0].tokenizer)
