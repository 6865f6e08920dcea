"""Exact match by magnitude: each example counted once, in the bucket of its number."""

import pytest

from transformer_jax.metrics import MAGNITUDES, exact_match_by_magnitude


def test_buckets_count_each_example_once_by_its_number():
    values = [0, 9, 10, 99, 100, 999, 1_000, 9_999, 10_000, 999_999, 42]
    refs = [f"r{v}" for v in values]
    hyps = list(refs)
    hyps[1] = "wrong"  # 9: one of two in 0-9
    hyps[-1] = " r42 "  # surrounding spaces do not count
    hyps[8] = "wrong"  # 10,000: one of two in 10000-up
    got = exact_match_by_magnitude(hyps, refs, values)
    assert list(got) == [f"exact_match_{label}" for label, _ in MAGNITUDES]  # smallest first
    assert got == {"exact_match_0-9": 50.0, "exact_match_10-99": 100.0,
                   "exact_match_100-999": 100.0, "exact_match_1000-9999": 100.0,
                   "exact_match_10000-up": 50.0}


def test_empty_buckets_are_left_out_and_lengths_must_align():
    assert exact_match_by_magnitude(["a", "b"], ["a", "c"], [12_345, 54_321]) == {
        "exact_match_10000-up": 50.0}
    assert exact_match_by_magnitude([], [], []) == {}
    with pytest.raises(ValueError, match="2 values but 1 hypotheses"):
        exact_match_by_magnitude(["a"], ["a"], [1, 2])
