"""The run length fitted to a time limit (``fit_steps_to_time``)."""

import math

import pytest

from transformer_jax.training.budget import FIT_RESERVE, Throughput, fit_num_train_steps


@pytest.mark.parametrize(("step", "per_update", "left", "cap", "want"), [
    (400, 0.5, 1000.0, 10_000, 400 + math.floor((1 - FIT_RESERVE) * 2000)),  # time-bound
    (400, 0.5, 1000.0, 1_000, 1_000),  # a fast machine trains the configured length
    (400, 0.5, -30.0, 10_000, 401),  # already past the limit: end after the next update
    (400, 0.5, 0.1, 10_000, 401),  # less than one update left
    (400, float("nan"), 1000.0, 5_000, 5_000),  # nothing timed: the configured length
    (400, 0.0, 1000.0, 5_000, 5_000),
])
def test_fit_num_train_steps(step, per_update, left, cap, want):
    assert fit_num_train_steps(step, per_update, left, cap) == want


def test_throughput_leaves_out_the_first_interval_and_restarts():
    t = Throughput()
    assert math.isnan(t.rate) and math.isnan(t.seconds_per_update)
    t.sync(tokens=100.0, updates=1.0)  # ends the compile interval: not counted
    assert t.updates == 0.0 and t.tokens == 0.0
    t.sync(tokens=300.0, updates=3.0)
    assert t.updates == 3.0 and t.tokens == 300.0 and t.seconds > 0.0
    assert t.seconds_per_update == pytest.approx(t.seconds / 3.0)
    before = t.seconds
    t.restart()  # evaluation/checkpoint time in between is not counted
    t.sync(tokens=100.0, updates=1.0)
    assert t.updates == 4.0 and t.seconds >= before
