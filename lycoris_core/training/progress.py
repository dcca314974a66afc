"""Where a run is: step, data position, loss history and its smoothing, noise generators.

:class:`Progress` is the loop's own state. It is registered with accelerate
(``register_for_checkpointing``), so ``save_state``/``load_state`` store and restore it next to
the optimizer, LR schedule and RNG states. Its ``state_dict`` holds only numbers, lists and
tensors: it reads back with ``torch.load(weights_only=True)``, which cannot run code.

:func:`smooth` / :class:`LossSmoother` are the one loss smoothing of the project: the
``smoothed_loss`` streamed to ``on_step`` (live chart, status line) and the dark curve of the
loss-curve image (``plots.loss_curve_image``) are both computed by it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

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


@dataclass
class Progress:
    """The loop's position; checkpointed by accelerate with the rest of the run state."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    position: int = 0  # batches of this epoch's order already drawn
    losses: list[float] = field(default_factory=list)
    kind: str = ""  # why the last checkpoint was written: periodic, cancelled, ...
    # one noise-generator state per process ([processes, state bytes]), gathered before saving
    noise_states: torch.Tensor | None = None
    smoother: LossSmoother = field(default_factory=LossSmoother)

    def record(self, loss: float) -> float:
        """One finished optimizer step with this loss; returns the smoothed loss."""
        self.step += 1
        self.losses.append(loss)
        return self.smoother.update(loss)

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "epoch": self.epoch,
            "position": self.position,
            "losses": list(self.losses),
            "kind": self.kind,
            "noise_states": self.noise_states,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.epoch, self.position = state["step"], state["epoch"], state["position"]
        self.losses = list(state["losses"])
        self.kind = state["kind"]
        self.noise_states = state["noise_states"]
        self.smoother = LossSmoother(self.smoother.beta)
        for loss in self.losses:  # the same updates as the uninterrupted run made
            self.smoother.update(loss)
