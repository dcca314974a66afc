"""Norm: the weight and bias differences of a LayerNorm / GroupNorm (``train_norm``)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ._common import Contribution, f32
from .base import Algorithm, Layer, agree, shape_or_none

W_NORM, B_NORM = "w_norm", "b_norm"


class Norm(Algorithm):
    name = "norm"
    suffixes = (W_NORM, B_NORM)
    targets = (nn.LayerNorm, nn.GroupNorm)

    def detect(self, tensors: Mapping[str, torch.Tensor], config: Any) -> bool:
        return W_NORM in tensors

    def check(self, layer: Layer) -> str | None:
        t = layer.tensors
        problem = super().check(layer)
        if problem or B_NORM not in t:
            return problem
        return agree(("b_norm size", t[B_NORM].numel(), "w_norm size", t[W_NORM].numel()))

    def mismatch(self, layer: Layer, weight: torch.Tensor) -> str | None:
        flat_in = int(math.prod(weight.shape[1:]))
        return shape_or_none((layer.tensors[W_NORM].shape[0], flat_in), weight)

    def delta(
        self, layer: Layer, weight: torch.Tensor, bias: torch.Tensor | None, strength: float
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        s = float(strength)
        dw = f32(layer.tensors[W_NORM], weight.device) * s
        db_t = layer.tensors.get(B_NORM)
        db = None if bias is None or db_t is None else f32(db_t, weight.device) * s
        return dw.reshape(weight.shape), db

    def precomputed(self, layer: Layer, module: nn.Module, strength: float) -> Contribution:
        w, b = module.weight, getattr(module, "bias", None)
        dw, db = self.delta(layer, w, b, strength)
        dw = dw.to(w.dtype)
        db = None if db is None else db.to(w.dtype)
        if isinstance(module, nn.LayerNorm):
            shape, eps = module.normalized_shape, module.eps
            return lambda x, y0: F.layer_norm(x, shape, dw, db, eps)
        groups, eps = module.num_groups, module.eps
        return lambda x, y0: F.group_norm(x, groups, dw, db, eps)


NORM = Norm()
