"""Masks against explicit loops."""

import numpy as np
import pytest

from transformer_jax import ops


def test_padding_mask_matches_loops():
    q_valid = np.array([[1, 1, 0], [1, 0, 0]], bool)
    k_valid = np.array([[1, 0, 1, 1], [1, 1, 1, 0]], bool)
    got = np.asarray(ops.padding_mask(q_valid, k_valid))
    assert got.shape == (2, 1, 3, 4) and got.dtype == bool
    for b in range(2):
        for t in range(3):
            for s in range(4):
                assert got[b, 0, t, s] == (q_valid[b, t] and k_valid[b, s])


@pytest.mark.parametrize("t,s,offset", [(4, None, 0), (2, 5, 3), (3, 6, 0), (1, 7, 4)])
def test_causal_mask_matches_loops(t, s, offset):
    got = np.asarray(ops.causal_mask(t, s, offset=offset))
    s = t if s is None else s
    assert got.shape == (1, 1, t, s)
    want = np.array([[j <= i + offset for j in range(s)] for i in range(t)])
    np.testing.assert_array_equal(got[0, 0], want)


def test_causal_mask_square_is_lower_triangular():
    np.testing.assert_array_equal(ops.causal_mask(5)[0, 0], np.tril(np.ones((5, 5), bool)))


def test_segment_mask_matches_loops():
    q_seg = np.array([[1, 1, 2, 0], [3, 3, 3, 3]])
    k_seg = np.array([[1, 2, 2, 0, 0], [3, 0, 3, 1, 3]])
    got = np.asarray(ops.segment_mask(q_seg, k_seg))
    assert got.shape == (2, 1, 4, 5)
    for b in range(2):
        for t in range(4):
            for s in range(5):
                assert got[b, 0, t, s] == (q_seg[b, t] == k_seg[b, s] != 0)


def test_combine_masks():
    a = ops.causal_mask(3)
    b = ops.padding_mask(np.ones((2, 3), bool), np.array([[1, 1, 0], [1, 0, 0]], bool))
    got = np.asarray(ops.combine_masks(a, None, b))
    assert got.shape == (2, 1, 3, 3)
    np.testing.assert_array_equal(got, np.asarray(a) & np.asarray(b))
    assert ops.combine_masks(None, None) is None
    assert ops.combine_masks() is None
    np.testing.assert_array_equal(ops.combine_masks(None, a), a)


def test_mask_errors_name_shapes():
    with pytest.raises(ValueError, match=r"q_valid must have shape \[batch, length\]; got shape"):
        ops.padding_mask(np.ones(3, bool), np.ones((1, 3), bool))
    with pytest.raises(ValueError, match=r"q_segments \(2, 3\) and k_segments \(3, 3\)"):
        ops.segment_mask(np.ones((2, 3)), np.ones((3, 3)))
    with pytest.raises(ValueError, match=r"rank-4 masks .* got shape \(3, 3\)"):
        ops.combine_masks(np.ones((3, 3), bool))
