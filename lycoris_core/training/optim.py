"""Optimizers and learning-rate schedules.

AdamW and Adafactor need nothing extra; AdamW 8-bit needs bitsandbytes and Prodigy needs
prodigyopt (imported lazily, with an "install X" error). Schedules come from
``diffusers.optimization.get_scheduler``.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from typing import Any

import torch

from ..errors import LycorisError

OPTIMIZERS = ("adamw", "adamw8bit", "prodigy", "adafactor")
SCHEDULERS = ("constant", "constant_with_warmup", "cosine", "linear", "polynomial")


class OptimizerError(LycorisError, ValueError):
    """An optimizer or schedule that is unknown or whose package is missing."""


def _optional(optimizer: str, module: str, package: str) -> Any:
    """`module`, imported on first use, or an error saying which package to install."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise OptimizerError(
            f"optimizer {optimizer!r} needs {package}: pip install {package} (or choose adamw)"
        ) from None


def build_optimizer(
    name: str, params: Iterable[torch.nn.Parameter], lr: float, weight_decay: float = 0.0
) -> torch.optim.Optimizer:
    """The optimizer `name` over `params`."""
    params = [p for p in params if p.requires_grad]
    if not params:
        raise OptimizerError("no trainable parameters: the LyCORIS network wrapped nothing")
    key = name.lower()
    if key == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if key == "adamw8bit":
        adamw8bit = _optional(key, "bitsandbytes", "bitsandbytes").optim.AdamW8bit
        return adamw8bit(params, lr=lr, weight_decay=weight_decay)
    if key == "prodigy":
        prodigy = _optional(key, "prodigyopt", "prodigyopt").Prodigy
        return prodigy(params, lr=lr, weight_decay=weight_decay)
    if key == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(
            params,
            lr=lr,
            weight_decay=weight_decay,
            scale_parameter=False,
            relative_step=False,
            warmup_init=False,
        )
    raise OptimizerError(f"optimizer {name!r} is unknown; use one of {', '.join(OPTIMIZERS)}")


def build_scheduler(
    name: str, optimizer: torch.optim.Optimizer, steps: int, warmup_steps: int = 0
) -> Any:
    """A diffusers learning-rate schedule over `steps` optimizer steps."""
    from diffusers.optimization import get_scheduler

    if name not in SCHEDULERS:
        raise OptimizerError(f"scheduler {name!r} is unknown; use one of {', '.join(SCHEDULERS)}")
    if warmup_steps and name in ("constant",):
        name = "constant_with_warmup"
    return get_scheduler(
        name, optimizer=optimizer, num_warmup_steps=warmup_steps, num_training_steps=steps
    )
