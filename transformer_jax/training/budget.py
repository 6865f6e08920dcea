"""Training time: the time limit, measured update speed, and a run length fitted to the limit.

``TimeBudget`` is ``max_train_minutes`` counted from the start of the process. ``Throughput``
times the updates between metric fetches (the device is idle at those points, so the time is
that of finished work). ``fit_num_train_steps`` turns that speed and the time left into a
number of updates; the trainer's ``FitToTime`` hook uses it for ``fit_steps_to_time``.
"""

from __future__ import annotations

import time

__all__ = ["FIT_RESERVE", "Throughput", "TimeBudget", "fit_num_train_steps"]

# Share of the time left that a fitted run keeps for evaluations and checkpoints between
# updates and for the machine slowing down (docs/training.md, "Training to a time limit").
FIT_RESERVE = 0.03


class TimeBudget:
    """``max_minutes`` (0: no limit) counted from ``start`` (a ``time.perf_counter()``)."""

    def __init__(self, max_minutes: float, start: float):
        self.max_minutes, self.start = float(max_minutes), float(start)

    def seconds_left(self) -> float:
        """Time until the limit (negative once it is passed)."""
        return 60.0 * self.max_minutes - (time.perf_counter() - self.start)

    def exhausted(self) -> bool:
        return self.max_minutes > 0 and self.seconds_left() <= 0


class Throughput:
    """Source + target tokens and updates per second between synchronisation points.

    The interval that ends with the first update of a run (compilation) is not counted, nor
    time spent in evaluation or checkpointing.
    """

    def __init__(self):
        self.tokens = 0.0
        self.updates = 0.0
        self.seconds = 0.0
        self._mark: float | None = None

    def sync(self, tokens: float, updates: float) -> None:
        """Called right after the metrics of the last steps were fetched (device idle)."""
        now = time.perf_counter()
        if self._mark is not None:
            self.tokens += tokens
            self.updates += updates
            self.seconds += now - self._mark
        self._mark = now

    def restart(self) -> None:
        """Called after work that should not count (evaluation, checkpoints)."""
        self._mark = time.perf_counter()

    @property
    def rate(self) -> float:
        """Tokens per second (NaN before anything was timed)."""
        return self.tokens / self.seconds if self.seconds > 0 else float("nan")

    @property
    def seconds_per_update(self) -> float:
        """Mean time of a timed update (NaN before anything was timed)."""
        return self.seconds / self.updates if self.updates > 0 else float("nan")


def fit_num_train_steps(step: int, seconds_per_update: float, seconds_left: float,
                        num_train_steps: int, reserve: float = FIT_RESERVE) -> int:
    """Updates to train in all so that the rest fit in ``seconds_left``.

    Args:
      step: updates done so far.
      seconds_per_update: measured time of one update.
      seconds_left: time until the limit.
      num_train_steps: the configured length, an upper bound.
      reserve: share of ``seconds_left`` not planned for updates.

    Returns:
      ``step + floor((1 - reserve) * seconds_left / seconds_per_update)``, at least
      ``step + 1`` (the schedule must end after the current update) and at most
      ``num_train_steps`` (a fast machine trains the configured length).
    """
    if not seconds_per_update > 0:  # nothing timed: keep the configured length
        return max(int(num_train_steps), step + 1)
    more = int((1.0 - reserve) * max(float(seconds_left), 0.0) / float(seconds_per_update))
    return max(step + 1, min(int(num_train_steps), step + more))
