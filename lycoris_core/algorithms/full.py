"""Full: the weight difference itself (``diff``), and the bias difference (``diff_b``) when
the layer has a bias."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..quantization import base_bias, weight_like
from ._common import Contribution, cast, f32, layer_op
from .base import Algorithm, Layer, agree, shape_or_none

DIFF, DIFF_B = "diff", "diff_b"


def _bias_delta(
    layer: Layer, weight: torch.Tensor, bias: torch.Tensor | None, s: float
) -> torch.Tensor | None:
    """``diff_b`` at strength `s` (float32), or None when the file or the layer has no bias."""
    db = layer.tensors.get(DIFF_B)
    return None if bias is None or db is None else f32(db, weight.device) * s


class Full(Algorithm):
    name = "full"
    suffixes = (DIFF, DIFF_B)

    def detect(self, tensors: Mapping[str, torch.Tensor], config: Any) -> bool:
        return DIFF in tensors

    def check(self, layer: Layer) -> str | None:
        t = layer.tensors
        problem = super().check(layer)
        if problem or DIFF_B not in t:
            return problem
        return agree(("diff_b size", t[DIFF_B].numel(), "diff dim 0", t[DIFF].shape[0]))

    def mismatch(self, layer: Layer, weight: torch.Tensor) -> str | None:
        diff = layer.tensors[DIFF]
        return shape_or_none((diff.shape[0], int(math.prod(diff.shape[1:]))), weight)

    def delta(
        self, layer: Layer, weight: torch.Tensor, bias: torch.Tensor | None, strength: float
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        s = float(strength)
        dw = f32(layer.tensors[DIFF], weight.device) * s
        return dw.reshape(weight.shape), _bias_delta(layer, weight, bias, s)

    def accumulate(
        self,
        acc: torch.Tensor | None,
        layer: Layer,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        strength: float,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        s = float(strength)
        diff = f32(layer.tensors[DIFF], weight.device).reshape(weight.shape)
        db = _bias_delta(layer, weight, bias, s)
        if acc is None:
            return torch.add(weight, diff, alpha=s), db
        return acc.add_(diff, alpha=s), db

    def bypass(self, layer: Layer, module: nn.Module, strength: float) -> Contribution | None:
        t, w, bias = layer.tensors, weight_like(module), base_bias(module)
        dw = cast(t[DIFF], w, strength).reshape(w.shape)
        db = None if bias is None or DIFF_B not in t else cast(t[DIFF_B], w, strength)
        op = layer_op(module)
        return lambda x, y0: op(x, dw, db)


FULL = Full()
