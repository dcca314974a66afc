"""LoKr: ``dW = kron(w1, w2) * alpha / rank``; each factor full or low-rank (w2: tucker too).

With two full factors lycoris forces the scale to 1 (no rank).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..quantization import weight_like
from ._common import Contribution, cast, f32, is_conv
from .base import Layer, LowRank, agree, shape_or_none
from .dora import DORA

W1, W1A, W1B = "lokr_w1", "lokr_w1_a", "lokr_w1_b"
W2, W2A, W2B = "lokr_w2", "lokr_w2_a", "lokr_w2_b"
T1, T2 = "lokr_t1", "lokr_t2"


def _factor(t: Mapping[str, torch.Tensor], full: str, a: str, b: str, dev: torch.device) -> Any:
    """A Kronecker factor in float32: the full matrix, or the product of its two halves."""
    w = t.get(full)
    return f32(w, dev) if w is not None else f32(t[a], dev) @ f32(t[b], dev)


class LoKr(LowRank):
    name = "lokr"
    suffixes = (W1, W1A, W1B, W2, W2A, W2B, T1, T2, "alpha")
    modifiers = (DORA,)
    tucker_suffix = T2

    def detect(self, tensors: Mapping[str, torch.Tensor], config: Any) -> bool:
        return W1 in tensors or W1A in tensors

    def check(self, layer: Layer) -> str | None:
        problem = super().check(layer)
        if problem:
            return problem
        t = layer.tensors
        for full, a, b, which in ((W1, W1A, W1B, "w1"), (W2, W2A, W2B, "w2")):
            if full not in t and not (a in t and b in t):
                return f"missing its {which} factor ('{full}', or '{a}' and '{b}')"
        if W1 not in t and t[W1A].dim() == 2 and t[W1B].dim() == 2:
            problem = agree(
                ("lokr_w1_a dim 1", t[W1A].shape[1], "lokr_w1_b dim 0", t[W1B].shape[0])
            )
        if problem or W2 in t:
            return problem
        if T2 in t:  # tucker: t2 [r, r, k...], w2_a [r, out], w2_b [r, in]
            return agree(
                ("lokr_t2 dim 0", t[T2].shape[0], "lokr_w2_a dim 0", t[W2A].shape[0]),
                ("lokr_t2 dim 1", t[T2].shape[1], "lokr_w2_b dim 0", t[W2B].shape[0]),
            )
        return agree(("lokr_w2_a dim 1", t[W2A].shape[-1], "lokr_w2_b dim 0", t[W2B].shape[0]))

    def rank(self, layer: Layer) -> int | None:
        t = layer.tensors
        if W1A in t:
            return t[W1A].shape[1]
        if W2A in t:
            return t[W2A].shape[1] if T2 not in t else t[W2A].shape[0]
        return None  # full matrices: scale 1

    def _w1_shape(self, layer: Layer) -> tuple[int, int]:
        t = layer.tensors
        w1 = t.get(W1)
        return tuple(w1.shape) if w1 is not None else (t[W1A].shape[0], t[W1B].shape[1])

    def mismatch(self, layer: Layer, weight: torch.Tensor) -> str | None:
        t = layer.tensors
        a, b = self._w1_shape(layer)
        if W2 in t:
            w2 = t[W2]
            c, d = w2.shape[0], int(math.prod(w2.shape[1:]))
        elif T2 in t:
            c = t[W2A].shape[1]
            d = t[W2B].shape[1] * int(math.prod(t[T2].shape[2:]))
        else:
            c, d = t[W2A].shape[0], t[W2B].shape[1]
        return shape_or_none((a * c, b * d), weight)

    def rebuild(self, layer: Layer, weight: torch.Tensor) -> torch.Tensor:
        from lycoris.functional import lokr

        t = {k: f32(v, weight.device) for k, v in layer.tensors.items()}
        dw = lokr.kron_weight(
            t.get(W1),
            t.get(W1A),
            t.get(W1B),
            t.get(W2),
            t.get(W2A),
            t.get(W2B),
            t.get(T2),
            scale=self.scale(layer),
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
        t, dev, shape, out_dim = layer.tensors, weight.device, weight.shape, weight.shape[0]
        if self.plain_2d(layer) and t.get(W2, weight).dim() == 2:
            w1 = _factor(t, W1, W1A, W1B, dev)
            w2 = _factor(t, W2, W2A, W2B, dev)
            (a, b), (c, d) = w1.shape, w2.shape
            if a * c == out_dim and b * d * out_dim == weight.numel():
                # kron(w1, w2) as a broadcast product over the (a, c, b, d) view: one pass
                w1v, w2v = w1.view(a, 1, b, 1), w2.view(1, c, 1, d)
                value = self.scale(layer) * float(strength)
                if acc is None:
                    merged = torch.addcmul(weight.reshape(a, c, b, d), w1v, w2v, value=value)
                    return merged.view(shape), None
                acc.view(a, c, b, d).addcmul_(w1v, w2v, value=value)
                return acc, None
        return super().accumulate(acc, layer, weight, bias, strength)

    def bypass(self, layer: Layer, module: nn.Module, strength: float) -> Contribution | None:
        if is_conv(module):
            return None
        t, w = layer.tensors, weight_like(module)
        scale = self.scale(layer) * strength
        w1 = cast(t[W1] if W1 in t else t[W1A].float() @ t[W1B].float(), w, scale)
        n_in = w1.shape[1]
        if W2 in t:
            w2 = cast(t[W2], w)

            def kron_full(x: torch.Tensor, y0: torch.Tensor) -> torch.Tensor:
                h = x.reshape(*x.shape[:-1], n_in, -1) @ w2.T
                return (w1 @ h).reshape(*x.shape[:-1], -1)

            return kron_full
        w2a, w2b = cast(t[W2A], w), cast(t[W2B], w)

        def kron_low(x: torch.Tensor, y0: torch.Tensor) -> torch.Tensor:
            h = (x.reshape(*x.shape[:-1], n_in, -1) @ w2b.T) @ w2a.T
            return (w1 @ h).reshape(*x.shape[:-1], -1)

        return kron_low

    def describe(self, layer: Layer) -> dict[str, Any]:
        t = layer.tensors
        w2 = "full" if W2 in t else "low-rank" + (" tucker" if T2 in t else "")
        return {"scale": round(self.scale(layer), 6), "w1": list(self._w1_shape(layer)), "w2": w2}


LOKR = LoKr()
