"""Row streams: global batches and their state do not depend on the process count.

A synthetic source whose tokens spell the example id lets every test read back exactly
which examples each batch holds.
"""

import collections
import json

import numpy as np
import pytest
from helpers import small_numbers_config

from transformer_jax.data import BATCH_KEYS, PipelineStats, merge_states, train_iterator
from transformer_jax.data.streams import StreamSpec, TrainBatches

NUM_EXAMPLES = 300
LENGTH = 12
ROWS = 8


class IdSource:
    """Pair ``i`` is ("i", "i"); ``len`` examples."""

    def __len__(self):
        return NUM_EXAMPLES

    def __getitems__(self, indices):
        return [(str(i), str(i)) for i in indices]


class IdTokenizer:
    """Text "i" -> ``1 + i % 13`` copies of token ``i + 2`` (EOS = 1 is appended by the pipeline).

    With ``LENGTH = 12``, ids with ``i % 13 == 12`` (13 tokens + EOS) are too long.
    """

    def encode(self, texts):
        return [[int(t) + 2] * (1 + int(t) % 13) for t in texts]


def fits(i: int) -> bool:
    return 1 + i % 13 + 1 <= LENGTH


def make(process_index, process_count, *, seed=7, num_epochs=None, packing=True, bins=2,
         prefetch=0, stats=None):
    spec = StreamSpec(IdSource(), IdTokenizer(), stats or PipelineStats(), batch_size=ROWS,
                      seed=seed, max_length=LENGTH, packing=packing, bins=bins,
                      num_epochs=num_epochs)
    rows = ROWS // process_count
    return TrainBatches(spec, process_index * rows, (process_index + 1) * rows, gather=None,
                        prefetch=prefetch)


def global_batches(iterators, count):
    """``count`` global batches: the processes' rows concatenated in process order."""
    out = []
    for _ in range(count):
        parts = [next(it) for it in iterators]
        out.append({k: np.concatenate([p[k] for p in parts]) for k in BATCH_KEYS})
    return out


def example_ids(batch):
    """Ids of the examples in a batch, row by row, segment by segment."""
    ids = []
    for tokens, seg in zip(batch["inputs"], batch["inputs_segmentation"], strict=True):
        for k in range(1, int(seg.max()) + 1):
            ids.append(int(tokens[seg == k][0]) - 2)
    return ids


def assert_same(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        for key in BATCH_KEYS:
            np.testing.assert_array_equal(g[key], w[key], err_msg=key)


def layout(process_count, **kwargs):
    return [make(p, process_count, **kwargs) for p in range(process_count)]


@pytest.mark.parametrize("packing", [True, False])
def test_global_batches_do_not_depend_on_the_process_count(packing):
    count = 40 if packing else 60  # past the first epoch either way
    reference = global_batches(layout(1, packing=packing), count)
    for process_count in (2, 4, 8):
        assert_same(global_batches(layout(process_count, packing=packing), count), reference)
    ids = [i for b in reference for i in example_ids(b)]
    assert len(ids) > NUM_EXAMPLES  # the test crosses an epoch boundary
    assert max(collections.Counter(ids[:NUM_EXAMPLES // 2]).values()) == 1
    if not packing:
        assert all(len(example_ids(b)) == ROWS for b in reference)


@pytest.mark.parametrize(("before", "after"), [(2, 1), (1, 2), (2, 4), (4, 2)])
def test_elastic_resume_continues_bit_identically(before, after):
    reference = global_batches(layout(1), 30)
    first = layout(before, prefetch=2)  # prefetching ahead must not leak into the state
    head = global_batches(first, 11)
    state = json.loads(json.dumps(merge_states([it.local_state() for it in first])))
    for it in first:
        it.close()
    second = layout(after)
    for it in second:
        it.set_state(state)
    assert_same(head + global_batches(second, 19), reference)


@pytest.mark.parametrize(("before", "after"), [(2, 1), (1, 2), (2, 4)])
def test_resume_within_an_epoch_neither_repeats_nor_skips(before, after):
    first = layout(before, num_epochs=1)
    seen = [i for b in global_batches(first, 5) for i in example_ids(b)]
    state = merge_states([it.local_state() for it in first])
    second = layout(after, num_epochs=1)
    for it in second:
        it.set_state(state)
    for it in second:  # each process to the end of its rows' epoch
        seen += [i for b in it for i in example_ids(b)]
    want = [i for i in range(NUM_EXAMPLES) if fits(i)]
    assert 0 < len(want) < NUM_EXAMPLES
    assert collections.Counter(seen) == collections.Counter(want)


def test_state_names_every_row_and_the_settings():
    its = layout(2)
    global_batches(its, 3)
    state = merge_states([its[1].local_state(), its[0].local_state()])  # any order
    assert len(state["positions"]) == ROWS and state["batch_size"] == ROWS
    assert state["positions"][:4] == its[0].local_state()["positions"]
    with pytest.raises(ValueError, match=r"cover rows \[0, 1, 2, 3\], not all of 0..7"):
        merge_states([its[0].local_state()])
    with pytest.raises(ValueError, match="saved with seed=7 but this run uses seed=8"):
        make(0, 1, seed=8).set_state(state)
    with pytest.raises(ValueError, match="saved with batch_size=4 but this run uses batch_size=8"):
        make(0, 1).set_state({**state, "batch_size": 4})
    with pytest.raises(ValueError, match="format None, expected 'row_streams/1'"):
        make(0, 1).set_state({"last_seen_indices": {}})


def test_train_iterator_two_processes_equal_one(prepared_numbers):
    """The real pipeline (tokenizer, TFDS source, prefetch thread), 2 processes vs 1."""
    def build(p, n):
        return train_iterator(prepared_numbers, 8, seed=4, process_index=p, process_count=n)

    reference = global_batches([build(0, 1)], 12)
    two = [build(0, 2), build(1, 2)]
    head = global_batches(two, 5)
    state = merge_states([it.local_state() for it in two])
    one = build(0, 1)
    one.set_state(state)
    assert_same(head + global_batches([one], 7), reference)
    with pytest.raises(ValueError, match="combine every process's local_state"):
        two[0].get_state()
    assert one.get_state() == json.loads(json.dumps(one.get_state()))


def test_more_bins_per_row_pack_more_pairs(prepared_numbers):
    def pairs_per_row(bins):
        prepared = with_data(prepared_numbers, packing_bins_per_row=bins, max_length=24)
        it = train_iterator(prepared, 16, seed=0, process_index=0, process_count=1)
        batches = [next(it) for _ in range(10)]
        return np.mean([b["inputs_segmentation"].max(axis=1).mean() for b in batches])

    assert pairs_per_row(4) > pairs_per_row(1) > 1.5


def test_prefetching_gives_the_same_batches_and_ends_cleanly():
    plain = list(make(0, 1, num_epochs=1))
    prefetched = make(0, 1, num_epochs=1, prefetch=3)
    assert_same(list(prefetched), plain)
    with pytest.raises(StopIteration):
        next(prefetched)
    prefetched.close()


def with_data(prepared, **overrides):
    """``prepared_numbers`` read with ``small_numbers_config(**overrides)`` as its data config."""
    return prepared.__class__(**{**prepared.__dict__, "config": small_numbers_config(**overrides)})

def test_subword_sampling_keeps_the_text_and_resumes_bit_identically(prepared_numbers):
    """Sampled segmentations spell the same pairs, differ from the best ones, and are a
    function of the position in the data: a resumed run under another process count reads
    the same tokens."""
    sampling = {"subword_sampling_alpha": 0.2, "subword_sampling_nbest": 8}
    on = with_data(prepared_numbers, **sampling)

    def build(prepared, p=0, n=1):
        return train_iterator(prepared, 8, seed=4, process_index=p, process_count=n)

    # One pair per row: the same pairs in the same order, segmented differently.
    plain, drawn = (global_batches([build(with_data(prepared_numbers, packing=False, **s))], 10)
                    for s in ({}, sampling))
    tok = prepared_numbers.tokenizer
    for key in ("inputs", "targets"):
        want = [s for b in plain for s in tok.decode(b[key])]
        assert [s for b in drawn for s in tok.decode(b[key])] == want
        differ = [not np.array_equal(p[key], d[key]) for p, d in zip(plain, drawn, strict=True)]
        assert sum(differ) >= 5, f"{key}: sampling changed only {sum(differ)} of 10 batches"

    reference = global_batches([build(on)], 12)
    two = [build(on, 0, 2), build(on, 1, 2)]
    head = global_batches(two, 5)
    state = merge_states([it.local_state() for it in two])
    assert state["subword_sampling"] == [0.2, 8]
    one = build(on)
    one.set_state(json.loads(json.dumps(state)))
    assert_same(head + global_batches([one], 7), reference)
    with pytest.raises(ValueError, match=r"saved with subword_sampling=\[0.2, 8\] but this run "
                                         "uses subword_sampling=None"):
        build(prepared_numbers).set_state(state)
