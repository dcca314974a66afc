"""GLoRA: ``dW = (b1 @ b2 + W @ a1 @ a2) * scale`` (``bm``: a tucker core for ``b``).

The scale is alpha / rank, or alpha / sqrt(rank) with ``rs_lora``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from ._common import f32
from .base import Layer, LowRank, agree, alpha_or_rank, shape_or_none

A1, A2, B1, B2, BM = "a1.weight", "a2.weight", "b1.weight", "b2.weight", "bm.weight"


class GLoRA(LowRank):
    name = "glora"
    suffixes = (A1, A2, B1, B2, BM, "alpha")
    required = (A1, A2, B1, B2)

    def detect(self, tensors: Mapping[str, torch.Tensor], config: Any) -> bool:
        return A1 in tensors

    def options(self, keywords: Mapping[str, Any]) -> dict[str, Any]:
        return {"rs_lora": bool(keywords.get("rs_lora", False))}

    def check(self, layer: Layer) -> str | None:
        t = layer.tensors
        problem = super().check(layer)
        if problem:
            return problem
        inner = t[A1].numel() // t[A1].shape[0]
        problem = agree(("a1 columns", inner, "a2 dim 0", t[A2].shape[0]))
        if problem or BM in t:
            return problem
        return agree(("b1 columns", t[B1].numel() // t[B1].shape[0], "b2 dim 0", t[B2].shape[0]))

    def rank(self, layer: Layer) -> int | None:
        return layer.tensors[A2].shape[0]

    def scale(self, layer: Layer) -> float:
        r = self.rank(layer)
        alpha = alpha_or_rank(layer, r)
        return alpha / math.sqrt(r) if layer.options.get("rs_lora") else alpha / r

    def mismatch(self, layer: Layer, weight: torch.Tensor) -> str | None:
        t = layer.tensors
        kernel = int(math.prod(weight.shape[2:]))
        return shape_or_none((t[B1].shape[0], t[A2].shape[1] * kernel), weight)

    def rebuild(self, layer: Layer, weight: torch.Tensor) -> torch.Tensor:
        from lycoris.functional import tucker_weight_from_conv

        t = {k: f32(v, weight.device) for k, v in layer.tensors.items()}
        w = weight.float()
        b1, b2, bm = t[B1], t[B2], t.get(BM)
        if bm is not None:
            wb = tucker_weight_from_conv(b1, b2, bm)
        else:
            wb = (b1.view(b1.size(0), -1) @ b2.view(b2.size(0), -1)).view(w.shape)
        a1 = t[A1].view(t[A1].size(0), -1)
        a2 = t[A2].view(t[A2].size(0), -1)
        if w.dim() > 2:
            wa = torch.einsum("o i ..., i j -> o j ...", w, a1)
            wa = torch.einsum("o i ..., i j -> o j ...", wa, a2)
        else:
            wa = (w @ a1) @ a2
        return ((wb + wa) * self.scale(layer)).reshape(weight.shape)


GLORA = GLoRA()
