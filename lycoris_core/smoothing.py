"""The one loss smoothing of the project (pure Python, no torch).

Training streams ``smoothed_loss`` with :class:`LossSmoother` (live chart, status line, CLI
progress bar), and the loss-curve image draws :func:`smooth` of the loss history: the same
updates in the same order, so the image's dark curve is exactly the streamed values.
"""

from __future__ import annotations

from collections.abc import Iterable

SMOOTHING = 0.9  # weight of the past in the exponential moving average


class LossSmoother:
    """Bias-corrected exponential moving average (the first value is returned as is)."""

    def __init__(self, beta: float = SMOOTHING) -> None:
        self.beta = beta
        self.average = 0.0
        self.count = 0

    def update(self, value: float) -> float:
        """Add one value; return the smoothed value up to and including it."""
        self.count += 1
        self.average = self.beta * self.average + (1 - self.beta) * value
        return self.average / (1 - self.beta**self.count)


def smooth(values: Iterable[float], beta: float = SMOOTHING) -> list[float]:
    """The smoothed value after each of `values` (what training streams as `smoothed_loss`)."""
    smoother = LossSmoother(beta)
    return [smoother.update(v) for v in values]
