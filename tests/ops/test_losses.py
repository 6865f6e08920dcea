"""Cross entropy with label smoothing and token accuracy against hand-computed numbers."""

import math

import numpy as np
import pytest

from transformer_jax import ops


def test_label_smoothing_hand_computed():
    # V=3, eps=0.3: smoothed target (0.7, 0.15, 0.15). Prediction p=(0.5, 0.25, 0.25).
    # cross entropy = -(0.7 ln .5 + 0.15 ln .25 + 0.15 ln .25) = 1.3 ln 2 = 0.9010913
    # entropy of the target = -(0.7 ln .7 + 0.3 ln .15) = 0.2496725 + 0.5691359 = 0.8188084
    # loss = 0.9010913 - 0.8188084 = 0.0822829
    logits = np.log(np.array([[0.5, 0.25, 0.25]], np.float32))
    loss, weight = ops.cross_entropy(logits, np.array([0]), label_smoothing=0.3)
    assert float(loss) == pytest.approx(0.0822829, abs=1e-6)
    assert float(weight) == 1.0


def test_perfect_smoothed_prediction_scores_zero():
    logits = np.log(np.array([[0.15, 0.7, 0.15], [0.15, 0.15, 0.7]], np.float32)) + 3.0
    loss, _ = ops.cross_entropy(logits, np.array([1, 2]), label_smoothing=0.3)
    assert float(loss) == pytest.approx(0.0, abs=1e-6)


def test_no_smoothing_is_negative_log_likelihood_and_weights_count():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((2, 3, 5)).astype(np.float32)
    targets = rng.integers(0, 5, size=(2, 3))
    weights = np.array([[1, 1, 0], [1, 0, 0]], np.float32)
    loss, weight = ops.cross_entropy(logits, targets, weights)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    want = sum(-logp[b, t, targets[b, t]] for b in range(2) for t in range(3) if weights[b, t])
    assert float(loss) == pytest.approx(want, rel=1e-5)
    assert float(weight) == 3.0
    # Changing a masked-out token does not change the loss.
    logits2 = logits.copy()
    logits2[0, 2] += 10.0
    assert float(ops.cross_entropy(logits2, targets, weights)[0]) == pytest.approx(float(loss))


def test_smoothed_loss_with_weights_and_bf16_logits():
    logits = np.log(np.array([[0.5, 0.25, 0.25], [0.1, 0.1, 0.8]], np.float32))
    loss, weight = ops.cross_entropy(
        logits.astype("bfloat16"), np.array([0, 2]), np.array([1.0, 0.0]), label_smoothing=0.3
    )
    assert loss.dtype == np.float32
    assert float(loss) == pytest.approx(0.0822829, abs=5e-3)
    assert float(weight) == 1.0


def test_uniform_smoothing_matches_kl_formula():
    # eps = 1 - 1/V makes the target uniform; loss = KL(uniform || p).
    v = 4
    p = np.array([0.1, 0.2, 0.3, 0.4])
    loss, _ = ops.cross_entropy(np.log(p)[None], np.array([2]), label_smoothing=1 - 1 / v)
    want = sum(0.25 * math.log(0.25 / pi) for pi in p)
    assert float(loss) == pytest.approx(want, abs=1e-6)


def test_token_accuracy():
    logits = np.array([[[0.1, 2.0], [3.0, 0.0], [0.0, 1.0]]], np.float32)
    correct, weight = ops.token_accuracy(logits, np.array([[1, 1, 1]]), np.array([[1, 1, 0]]))
    assert float(correct) == 1.0 and float(weight) == 2.0
    correct, weight = ops.token_accuracy(logits, np.array([[1, 0, 1]]))
    assert float(correct) == 3.0 and float(weight) == 3.0


def test_loss_errors():
    with pytest.raises(ValueError, match=r"logits \(2, 3, 5\) and targets \(2, 4\)"):
        ops.cross_entropy(np.zeros((2, 3, 5)), np.zeros((2, 4), int))
    with pytest.raises(ValueError, match=r"weights \(2,\) must have the same shape as targets"):
        ops.cross_entropy(np.zeros((2, 3, 5)), np.zeros((2, 3), int), np.ones(2))
    with pytest.raises(ValueError, match="label_smoothing must be in"):
        ops.cross_entropy(np.zeros((2, 5)), np.zeros(2, int), label_smoothing=1.0)


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_gradient_is_softmax_minus_smoothed_target(eps):
    # d loss / d logits = w * (softmax(logits) - q), q the (smoothed) target distribution.
    import jax

    rng = np.random.default_rng(1)
    vocab = 7
    logits = (3 * rng.standard_normal((2, 4, vocab))).astype(np.float32)
    targets = rng.integers(0, vocab, (2, 4))
    weights = (rng.random((2, 4)) > 0.3).astype(np.float32)
    grad = jax.grad(lambda x: ops.cross_entropy(x, targets, weights, label_smoothing=eps)[0])(
        logits
    )
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    q = np.full(logits.shape, eps / (vocab - 1))
    np.put_along_axis(q, targets[..., None], 1.0 - eps, axis=-1)
    np.testing.assert_allclose(np.asarray(grad), weights[..., None] * (p - q), atol=1e-6)
