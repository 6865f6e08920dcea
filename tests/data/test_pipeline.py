"""Pipelines: packing keeps every token once, state restore, shards, eval coverage, Multi30k."""

import collections
import dataclasses
import json
import os

import numpy as np
import pytest
from helpers import small_numbers_config

from transformer_jax.data import (
    BATCH_KEYS,
    EOS_ID,
    PipelineStats,
    eval_batches,
    prepare,
    raw_pairs,
    train_iterator,
)

MULTI30K = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "data", "multi30k")


def variant(prepared, **overrides):
    """The same prepared data and tokenizer under changed pipeline settings."""
    config = small_numbers_config(**overrides)
    return dataclasses.replace(prepared, config=config, stats=PipelineStats(), _sources={})


def expected_examples(prepared, split, max_length):
    """(inputs, targets) token tuples (EOS appended) of every pair that fits, from raw text."""
    pairs = raw_pairs(prepared, split)
    src = prepared.tokenizer.encode([s for s, _ in pairs])
    tgt = prepared.tokenizer.encode([t for _, t in pairs])
    out = [(tuple(s + [EOS_ID]), tuple(t + [EOS_ID])) for s, t in zip(src, tgt, strict=True)]
    return [ex for ex in out if max(len(ex[0]), len(ex[1])) <= max_length]


def segments_of(batch):
    """Every packed example of a batch as (inputs tokens, targets tokens), by row and segment."""
    out = []
    for r in range(batch["inputs"].shape[0]):
        seg_in, seg_tgt = batch["inputs_segmentation"][r], batch["targets_segmentation"][r]
        for k in range(1, int(seg_in.max()) + 1):
            out.append((tuple(batch["inputs"][r][seg_in == k].tolist()),
                        tuple(batch["targets"][r][seg_tgt == k].tolist())))
    return out


def check_row_layout(batch, length, rows):
    for key in BATCH_KEYS:
        assert batch[key].shape == (rows, length) and batch[key].dtype == np.int32, key
    for side in ("inputs", "targets"):
        tokens, seg, pos = (batch[side], batch[f"{side}_segmentation"], batch[f"{side}_position"])
        assert np.array_equal(seg != 0, tokens != 0)  # segments cover exactly the tokens
        for r in range(rows):
            expected_pos = np.zeros(length, np.int64)
            for k in range(1, int(seg[r].max()) + 1):
                where = np.flatnonzero(seg[r] == k)
                assert np.array_equal(where, np.arange(where[0], where[-1] + 1))  # contiguous
                assert tokens[r, where[-1]] == EOS_ID  # each segment ends with its EOS
                expected_pos[where] = np.arange(len(where))  # positions restart per segment
            assert np.array_equal(pos[r], expected_pos)
            # Segment ids run 1..k in order of appearance.
            ids = [int(s) for s in seg[r] if s]
            assert ids == sorted(ids) and (not ids or set(ids) == set(range(1, ids[-1] + 1)))


@pytest.mark.parametrize("packing", [True, False])
def test_one_epoch_keeps_every_example_exactly_once(prepared_numbers, packing):
    prepared = variant(prepared_numbers, packing=packing, max_length=12)
    batches = list(train_iterator(prepared, batch_size=16, seed=1, num_epochs=1,
                                 process_index=0, process_count=1))
    got = [ex for b in batches for ex in segments_of(b)]
    want = expected_examples(prepared, "train", max_length=12)
    assert collections.Counter(got) == collections.Counter(want)
    assert 0 < len(want) < len(raw_pairs(prepared, "train"))  # max_length 12 drops some
    dropped = len(raw_pairs(prepared, "train")) - len(want)
    assert len(prepared.stats.dropped_train_ids) == dropped
    for b in batches:
        check_row_layout(b, 12, 16)
    used_rows = sum(int((b["inputs_segmentation"].max(axis=1) > 0).sum()) for b in batches)
    if packing:  # packing needs fewer rows than pairs
        assert used_rows < len(want)
    else:
        assert used_rows == len(want)


def test_epochs_are_reshuffled(prepared_numbers):
    prepared = variant(prepared_numbers, packing=False)
    batches = list(train_iterator(prepared, batch_size=20, seed=0, num_epochs=2,
                                 process_index=0, process_count=1))
    order = [ex for b in batches for ex in segments_of(b)]
    half = len(order) // 2
    assert collections.Counter(order[:half]) == collections.Counter(order[half:])
    assert order[:half] != order[half:]
    other_seed = list(train_iterator(prepared, batch_size=20, seed=5, num_epochs=1,
                                    process_index=0, process_count=1))
    assert [ex for b in other_seed for ex in segments_of(b)] != order[:half]


@pytest.mark.parametrize("packing", [True, False])
def test_state_round_trip_through_json_gives_the_same_batches(prepared_numbers, packing):
    prepared = variant(prepared_numbers, packing=packing)
    it = train_iterator(prepared, 8, seed=3, process_index=0, process_count=1)
    for _ in range(70):  # past the end of the first epoch (600 pairs)
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    expected = [next(it) for _ in range(5)]
    restored = train_iterator(prepared, 8, seed=3, process_index=0, process_count=1)
    restored.set_state(state)
    for want, got in zip(expected, [next(restored) for _ in range(5)], strict=True):
        for key in BATCH_KEYS:
            np.testing.assert_array_equal(got[key], want[key])
    fresh = next(train_iterator(prepared, 8, seed=3, process_index=0, process_count=1))
    assert not np.array_equal(fresh["inputs"], expected[0]["inputs"])


def test_process_shards_partition_the_data(prepared_numbers):
    prepared = variant(prepared_numbers, packing=False, max_length=40)
    shards = []
    for index in range(3):
        batches = list(train_iterator(prepared, batch_size=12, seed=2, num_epochs=1,
                                     process_index=index, process_count=3))
        assert all(b["inputs"].shape == (4, 40) for b in batches)  # 12 global rows / 3
        shards.append([ex for b in batches for ex in segments_of(b)])
    # Each example exactly once over all shards (the numbers task repeats small numbers in
    # training, so the same pair can be in two shards as two examples).
    want = collections.Counter(expected_examples(prepared, "train", 40))
    assert collections.Counter(sum(shards, [])) == want
    once = {example for example, count in want.items() if count == 1}
    for i in range(3):
        for j in range(i + 1, 3):
            assert not set(shards[i]) & set(shards[j]) & once


def test_batch_size_must_split_over_processes(prepared_numbers):
    with pytest.raises(ValueError, match="batch_size=10 .* multiple of process_count=4"):
        train_iterator(prepared_numbers, 10, seed=0, process_index=0, process_count=4)


@pytest.mark.parametrize("process_count", [1, 2])
def test_eval_batches_cover_each_example_once(prepared_numbers, process_count):
    prepared = variant(prepared_numbers, max_length=8)  # short: some pairs get trimmed
    pairs = raw_pairs(prepared, "validation")
    seen = collections.Counter()
    trimmed = 0
    for p in range(process_count):
        batches = eval_batches(prepared, "validation", 32, process_index=p,
                               process_count=process_count)
        assert len(batches) == 3  # 70 examples, 32 per global batch
        for b in batches:
            assert b["index"].shape == (32 // process_count,)
            for r, index in enumerate(b["index"].tolist()):
                if index < 0:
                    assert not b["inputs"][r].any() and not b["targets"][r].any()
                    continue
                seen[index] += 1
                for side, text in (("inputs", pairs[index][0]), ("targets", pairs[index][1])):
                    ids = prepared.tokenizer.encode([text])[0] + [EOS_ID]
                    if len(ids) > 8:
                        ids, trimmed = ids[:7] + [EOS_ID], trimmed + 1
                    row = b[side][r]
                    assert row[: len(ids)].tolist() == ids and not row[len(ids):].any()
                    assert b[f"{side}_position"][r][: len(ids)].tolist() == list(range(len(ids)))
    assert seen == collections.Counter(range(len(pairs)))
    assert trimmed > 0
    assert len(prepared.stats.trimmed_eval_ids["validation"]) <= trimmed


def test_prepare_reuses_the_tokenizer(prepared_numbers, numbers_workdir):
    path = os.path.join(numbers_workdir, "tokenizer", "spm.model")
    before = os.stat(path).st_mtime_ns
    again = prepare(small_numbers_config(), numbers_workdir)
    assert os.stat(path).st_mtime_ns == before
    assert again.tokenizer.model_proto == prepared_numbers.tokenizer.model_proto
    with pytest.raises(ValueError, match="has 100 pieces but data.vocab_size=90"):
        prepare(small_numbers_config(vocab_size=90), numbers_workdir)


@pytest.mark.skipif(not os.path.isdir(MULTI30K), reason="Multi30k not present")
def test_multi30k(tmp_path):
    cfg = small_numbers_config(source="text", path=MULTI30K, eval_split="val",
                               test_split="test2016", vocab_size=2000, max_length=48,
                               tokenizer_sample_size=3000)
    prepared = prepare(cfg, str(tmp_path))
    assert [len(prepared.source(s)) for s in ("train", "val", "test2016")] == [29000, 1014, 1000]
    batch = next(train_iterator(prepared, 16, seed=0, process_index=0, process_count=1))
    check_row_layout(batch, 48, 16)
    first = segments_of(batch)[0]
    assert prepared.tokenizer.decode([first[0]])[0] in {s for s, _ in raw_pairs(prepared, "train")}
