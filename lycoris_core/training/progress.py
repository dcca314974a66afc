"""Where a run is: step, data position, loss history and its smoothing, noise generators.

:class:`Progress` is the loop's own state. It is registered with accelerate
(``register_for_checkpointing``), so ``save_state``/``load_state`` store and restore it next to
the optimizer, LR schedule and RNG states. Its ``state_dict`` holds only numbers, lists and
tensors: it reads back with ``torch.load(weights_only=True)``, which cannot run code.

``Progress.record`` returns the smoothed loss of :mod:`lycoris_core.smoothing`, the function
the loss-curve image uses; after a resume the smoother replays the loss history.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..smoothing import LossSmoother


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
