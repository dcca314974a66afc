"""IA3: a learned per-channel scale of the weight, on its output or (``on_input``) input side.

``W' = W * (1 + s * v)``: the delta is ``W * s * v`` broadcast along the chosen side.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..quantization import base_bias, weight_like
from ._common import Contribution, bias_view, cast, f32, is_conv
from .base import Algorithm, Layer, shape_or_none

VECTOR, ON_INPUT = "weight", "on_input"


def _on_input(layer: Layer) -> bool:
    return bool(int(layer.tensors[ON_INPUT].item()))


class IA3Scaling(Algorithm):
    name = "ia3"
    suffixes = (VECTOR, ON_INPUT)
    required = (VECTOR, ON_INPUT)
    scalars = (ON_INPUT,)

    def detect(self, tensors: Mapping[str, torch.Tensor], config: Any) -> bool:
        return ON_INPUT in tensors

    def mismatch(self, layer: Layer, weight: torch.Tensor) -> str | None:
        n = layer.tensors[VECTOR].numel()
        if _on_input(layer):
            return None if n == weight.shape[1] else f"{n} input channels"
        return shape_or_none((n, int(math.prod(weight.shape[1:]))), weight)

    def delta(
        self, layer: Layer, weight: torch.Tensor, bias: torch.Tensor | None, strength: float
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        w = weight.float()
        vec = f32(layer.tensors[VECTOR], weight.device).reshape(-1) * float(strength)
        if _on_input(layer):
            return w * vec.view(1, -1, *([1] * (w.dim() - 2))), None
        return w * vec.view(-1, *([1] * (w.dim() - 1))), None

    def bypass(self, layer: Layer, module: nn.Module, strength: float) -> Contribution | None:
        if _on_input(layer):
            return None
        w, bias, conv = weight_like(module), base_bias(module), is_conv(module)
        vec = cast(layer.tensors[VECTOR].reshape(-1), w, strength)
        view = (-1, *([1] * (w.dim() - 2))) if conv else (-1,)

        def ia3(x: torch.Tensor, y0: torch.Tensor) -> torch.Tensor:
            return (y0 - bias_view(bias, y0, conv)) * vec.view(view)

        return ia3


IA3 = IA3Scaling()
