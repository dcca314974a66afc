"""DoRA: the weight-decomposition modifier lycoris saves as ``dora_scale`` beside LoRA/LoCon,
LoHa and LoKr layers.

The merged weight is ``m * (W + dW) / ||W + dW||`` with the magnitude ``m`` interpolated by
the strength (lycoris' ``weight_decompose``); the direction is fully applied at any non-zero
strength.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ._common import f32
from .base import Layer


class DoRA:
    suffix = "dora_scale"
    label = "+dora"

    def present(self, tensors: Mapping[str, torch.Tensor]) -> bool:
        return self.suffix in tensors

    @staticmethod
    def wd_on_out(layer: Layer, weight: torch.Tensor) -> bool:
        """Whether the magnitude is per output channel (lycoris' ``wd_on_out``)."""
        ds = layer.tensors[DoRA.suffix]
        return not (ds.dim() >= 2 and ds.shape[0] == 1 and weight.shape[0] != 1)

    def merge(
        self, layer: Layer, weight: torch.Tensor, dw: torch.Tensor, strength: float
    ) -> torch.Tensor:
        from lycoris.functional import weight_decompose

        w = weight.float()
        scale = f32(layer.tensors[self.suffix], weight.device)
        merged = weight_decompose(w + dw, scale, strength, self.wd_on_out(layer, w))
        return merged - w


DORA = DoRA()
