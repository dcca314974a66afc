"""LoRA / LoCon: ``dW = up @ down * alpha / rank`` (tucker: with a ``lora_mid`` core)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..quantization import weight_like
from ._common import Contribution, cast, f32, is_conv, layer_op, plain_conv
from .base import Layer, LowRank, agree, shape_or_none
from .dora import DORA

UP, DOWN, MID = "lora_up.weight", "lora_down.weight", "lora_mid.weight"


class LoCon(LowRank):
    name = "locon"
    suffixes = (UP, DOWN, MID, "alpha")
    required = (UP, DOWN)
    modifiers = (DORA,)
    tucker_suffix = MID

    def detect(self, tensors: Mapping[str, torch.Tensor], config: Any) -> bool:
        return UP in tensors

    def check(self, layer: Layer) -> str | None:
        t = layer.tensors
        problem = super().check(layer)
        if problem or MID not in t:
            return problem or agree(("up dim 1", t[UP].shape[1], "down dim 0", t[DOWN].shape[0]))
        up, down, mid = t[UP], t[DOWN], t[MID]
        if mid.dim() < 2:
            return f"'{MID}' must have at least 2 dimensions, got shape {tuple(mid.shape)}"
        return agree(
            ("mid dim 0", mid.shape[0], "up dim 1", up.shape[1]),
            ("mid dim 1", mid.shape[1], "down dim 0", down.shape[0]),
        )

    def rank(self, layer: Layer) -> int | None:
        return layer.tensors[DOWN].shape[0]

    def mismatch(self, layer: Layer, weight: torch.Tensor) -> str | None:
        t = layer.tensors
        down, mid = t[DOWN], t.get(MID)
        k = (mid if mid is not None else down).shape[2:]
        return shape_or_none((t[UP].shape[0], down.shape[1] * int(math.prod(k))), weight)

    def rebuild(self, layer: Layer, weight: torch.Tensor) -> torch.Tensor:
        from lycoris.functional import locon

        t = {k: f32(v, weight.device) for k, v in layer.tensors.items()}
        dw = locon.diff_weight(t[DOWN], t[UP], t.get(MID), gamma=self.scale(layer))
        return dw.reshape(weight.shape)

    def accumulate(
        self,
        acc: torch.Tensor | None,
        layer: Layer,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        strength: float,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not self.plain_2d(layer):
            return super().accumulate(acc, layer, weight, bias, strength)
        dev, shape, out_dim = weight.device, weight.shape, weight.shape[0]
        up = f32(layer.tensors[UP], dev).reshape(out_dim, -1)
        down = f32(layer.tensors[DOWN], dev).reshape(up.shape[1], -1)
        alpha = self.scale(layer) * float(strength)
        if acc is None:
            return torch.addmm(weight.reshape(out_dim, -1), up, down, alpha=alpha).view(shape), None
        acc.view(out_dim, -1).addmm_(up, down, alpha=alpha)
        return acc, None

    def bypass(self, layer: Layer, module: nn.Module, strength: float) -> Contribution | None:
        t, w = layer.tensors, weight_like(module)
        down = cast(t[DOWN], w)
        up = cast(t[UP], w, self.scale(layer) * strength)
        up = up.reshape(up.shape[0], up.shape[1], *([1] * (w.dim() - 2)))  # DyLoRA saves 2D
        mid = t.get(MID)
        if not is_conv(module):
            return lambda x, y0: F.linear(F.linear(x, down), up)
        conv = layer_op(module)
        plain = plain_conv(module)
        if mid is None:
            return lambda x, y0: plain(conv(x, down), up)
        mid = cast(mid, w)
        return lambda x, y0: plain(conv(plain(x, down), mid), up)


LOCON = LoCon()
