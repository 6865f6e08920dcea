"""Token-id cache and the numpy epoch order: the same ids and order as tokenizing / grain."""

import dataclasses
import logging
import os

import grain
import numpy as np
import pytest
from grain.experimental import index_shuffle
from helpers import small_numbers_config

from transformer_jax.data import EOS_ID, PipelineStats, Tokenizer, prepare, raw_pairs
from transformer_jax.data.order import EpochOrder, epoch_permutation
from transformer_jax.data.token_cache import load_or_build


@pytest.mark.parametrize("n", [1, 2, 3, 600, 4097, 65537, 70001])
@pytest.mark.parametrize("seed", [0, 5, 2**32 - 1])
def test_epoch_permutation_is_grains_index_shuffle(n, seed):
    want = [index_shuffle(i, max_index=n - 1, seed=seed, rounds=4) for i in range(n)] if n > 1 \
        else [0]
    np.testing.assert_array_equal(epoch_permutation(n, seed), want)


def test_epoch_order_is_grains_shuffled_repeat():
    grain_order = grain.MapDataset.range(600).shuffle(seed=7).repeat(None)
    positions = np.arange(3, 4000, 7)  # several epochs
    want = [grain_order[int(p)] for p in positions]
    np.testing.assert_array_equal(EpochOrder(600, 7)(positions), want)


def cache_files(prepared, split):
    return sorted(f for f in os.listdir(prepared.cache_dir) if f.startswith(split + "."))


def test_cached_ids_are_the_tokenizers_with_eos(prepared_numbers):
    cached = prepared_numbers.token_ids("validation")
    assert cache_files(prepared_numbers, "validation") == [
        "validation.ids.npy", "validation.json", "validation.lengths.npy",
        "validation.starts.npy"]
    length = prepared_numbers.max_length
    pairs = raw_pairs(prepared_numbers, "validation")
    assert len(cached) == len(pairs)
    for side in (0, 1):
        encoded = prepared_numbers.tokenizer.encode([p[side] for p in pairs])
        for i, ids in enumerate(encoded):
            want = ids + [EOS_ID]
            assert cached.lengths[side, i] == len(want)
            if len(want) > length:
                want = want[: length - 1] + [EOS_ID]
            start = cached.starts[side, i]
            assert cached.ids[start : start + len(want)].tolist() == want


def test_key_change_rebuilds_with_one_log_line(prepared_numbers, tmp_path, caplog):
    source = prepared_numbers.source("validation")
    tokenizer = prepared_numbers.tokenizer
    first = load_or_build(str(tmp_path), "validation", source, tokenizer, 24)
    mtime = os.stat(tmp_path / "validation.ids.npy").st_mtime_ns
    with caplog.at_level(logging.INFO, logger="transformer_jax.data.token_cache"):
        again = load_or_build(str(tmp_path), "validation", source, tokenizer, 24)
        assert not caplog.records  # same key: read back, nothing rebuilt
        assert os.stat(tmp_path / "validation.ids.npy").st_mtime_ns == mtime
        np.testing.assert_array_equal(again.ids, first.ids)
        short = load_or_build(str(tmp_path), "validation", source, tokenizer, 8)
    assert [r.getMessage() for r in caplog.records] == [
        f"Token-id cache of 'validation' was built for another max_length; rebuilding it in "
        f"{tmp_path}."]
    assert short.stored_lengths.max() <= 8 and first.stored_lengths.max() > 8
    sentences = [s for pair in raw_pairs(prepared_numbers, "train") for s in pair]
    other = Tokenizer.train(sentences, vocab_size=60)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="transformer_jax.data.token_cache"):
        rebuilt = load_or_build(str(tmp_path), "validation", source, other, 8)
    assert "another tokenizer_sha256" in caplog.records[0].getMessage()
    assert rebuilt.ids.max() < 60
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")]  # no leftovers


def test_preprocessing_is_part_of_the_key(prepared_numbers, numbers_workdir):
    lower = prepare(small_numbers_config(lowercase=True), numbers_workdir)
    assert lower.cache_dir == prepared_numbers.cache_dir
    plain = dataclasses.replace(prepared_numbers, stats=PipelineStats(), _sources={},
                                _token_ids={})
    assert plain.token_ids("test").starts.shape == (2, 40)  # rebuilt for no lowercasing
