"""LoHa: ``dW = (w1a @ w1b) * (w2a @ w2b) * alpha / rank`` (Hadamard product; tucker cores)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from ._common import f32
from .base import Layer, LowRank, agree, shape_or_none
from .dora import DORA

W1A, W1B, W2A, W2B = "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"
T1, T2 = "hada_t1", "hada_t2"


class LoHa(LowRank):
    name = "loha"
    suffixes = (W1A, W1B, W2A, W2B, T1, T2, "alpha")
    required = (W1A, W1B, W2A, W2B)
    modifiers = (DORA,)
    tucker_suffix = T1

    def detect(self, tensors: Mapping[str, torch.Tensor], config: Any) -> bool:
        return W1A in tensors

    def check(self, layer: Layer) -> str | None:
        problem = super().check(layer)
        if problem:
            return problem
        t = layer.tensors
        if any(t[s].dim() < 2 for s in (W1A, W1B, W2A, W2B)):
            return "hada_w1_a/b and hada_w2_a/b must be matrices"
        if T1 in t or T2 in t:  # tucker: t [r, r, k...], w*_a [r, out], w*_b [r, in]
            if T1 not in t or T2 not in t:
                return "a tucker LoHa layer needs both hada_t1 and hada_t2"
            return agree(
                ("hada_t1 dim 0", t[T1].shape[0], "hada_w1_a dim 0", t[W1A].shape[0]),
                ("hada_t1 dim 1", t[T1].shape[1], "hada_w1_b dim 0", t[W1B].shape[0]),
                ("hada_t2 dim 0", t[T2].shape[0], "hada_w2_a dim 0", t[W2A].shape[0]),
                ("hada_t2 dim 1", t[T2].shape[1], "hada_w2_b dim 0", t[W2B].shape[0]),
            )
        return agree(
            ("hada_w1_a dim 1", t[W1A].shape[1], "hada_w1_b dim 0", t[W1B].shape[0]),
            ("hada_w2_a dim 1", t[W2A].shape[1], "hada_w2_b dim 0", t[W2B].shape[0]),
            ("hada_w1_a dim 0", t[W1A].shape[0], "hada_w2_a dim 0", t[W2A].shape[0]),
            ("hada_w1_b dim 1", t[W1B].shape[1], "hada_w2_b dim 1", t[W2B].shape[1]),
        )

    def rank(self, layer: Layer) -> int | None:
        return layer.tensors[W1B].shape[0]

    def mismatch(self, layer: Layer, weight: torch.Tensor) -> str | None:
        t = layer.tensors
        if T1 in t:
            k = t[T1].shape[2:]
            got = (t[W1A].shape[1], t[W1B].shape[1] * int(math.prod(k)))
        else:
            got = (t[W1A].shape[0], t[W1B].shape[1])
        return shape_or_none(got, weight)

    def rebuild(self, layer: Layer, weight: torch.Tensor) -> torch.Tensor:
        from lycoris.functional import loha

        t = {k: f32(v, weight.device) for k, v in layer.tensors.items()}
        dw = loha.diff_weight(
            t[W1B], t[W1A], t[W2B], t[W2A], t.get(T1), t.get(T2), gamma=self.scale(layer)
        )
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
        t, dev, shape, out_dim = layer.tensors, weight.device, weight.shape, weight.shape[0]
        w1 = f32(t[W1A], dev) @ f32(t[W1B], dev)
        w2 = f32(t[W2A], dev) @ f32(t[W2B], dev)
        value = self.scale(layer) * float(strength)
        if acc is None:
            merged = torch.addcmul(weight.reshape(out_dim, -1), w1, w2, value=value)
            return merged.view(shape), None
        acc.view(out_dim, -1).addcmul_(w1, w2, value=value)
        return acc, None


LOHA = LoHa()
