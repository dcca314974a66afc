"""T-LoRA: ``dW = (p @ diag(lambda) @ q - p0 @ diag(lambda0) @ q0) * alpha / rank``.

The frozen base factors ``p0, lambda0, q0`` are not saved: lycoris initialises them from
the SVD of the base weight (``use_data_init``), so they are rebuilt from it here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import AdapterFormatError
from ..quantization import base_weight
from ._common import Contribution, cast, f32, is_conv
from .base import Layer, LowRank, agree, shape_or_none

Q, P, LAMBDA = "q_layer.weight", "p_layer.weight", "lambda_layer"


def tlora_base(layer: Layer, weight: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """T-LoRA's frozen base factors (q0, p0, lambda0) from the SVD of the base weight."""
    if not layer.options.get("use_data_init", True):
        raise AdapterFormatError(
            f"layer '{layer.name}': T-LoRA trained with use_data_init=false subtracts a random "
            "matrix that the file does not store; it cannot be applied exactly"
        )
    r = layer.tensors[Q].shape[0]
    w = weight.float().reshape(weight.shape[0], -1)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    sig = layer.options.get("sig_type", "principal")
    if sig == "principal":
        sl = slice(0, r)
    elif sig == "last":
        sl = slice(-r, None)
    else:
        start = (s.shape[0] - r) // 2
        sl = slice(start, start + r)
    q0, p0, lam0 = vh[sl], u[:, sl], s[sl]
    if q0.shape[0] < r:
        pad = r - q0.shape[0]
        q0 = F.pad(q0, (0, 0, 0, pad))
        p0 = F.pad(p0, (0, pad))
        lam0 = F.pad(lam0, (0, pad), value=1e-6)
    return q0, p0, lam0.reshape(1, -1)


class TLoRA(LowRank):
    name = "tlora"
    suffixes = (Q, P, LAMBDA, "alpha")
    required = (Q, P, LAMBDA)

    def detect(self, tensors: Mapping[str, torch.Tensor], config: Any) -> bool:
        return LAMBDA in tensors

    def options(self, keywords: Mapping[str, Any]) -> dict[str, Any]:
        return {
            "sig_type": keywords.get("sig_type", "principal"),
            "use_data_init": keywords.get("use_data_init", True),
        }

    def check(self, layer: Layer) -> str | None:
        t = layer.tensors
        problem = super().check(layer)
        if problem:
            return problem
        return agree(
            (
                "q_layer dim 0",
                t[Q].shape[0],
                "p_layer dim 1",
                t[P].shape[-1] if t[P].dim() > 1 else 0,
            ),
            ("lambda_layer size", t[LAMBDA].numel(), "q_layer dim 0", t[Q].shape[0]),
        )

    def rank(self, layer: Layer) -> int | None:
        return layer.tensors[Q].shape[0]

    def mismatch(self, layer: Layer, weight: torch.Tensor) -> str | None:
        if weight.dim() > 2 and weight.shape[2:].numel() != 1:
            return "T-LoRA on a convolution with a kernel larger than 1 (not supported)"
        t = layer.tensors
        return shape_or_none((t[P].shape[0], t[Q].shape[1]), weight)

    def rebuild(self, layer: Layer, weight: torch.Tensor) -> torch.Tensor:
        t = {k: f32(v, weight.device) for k, v in layer.tensors.items()}
        q0, p0, lam0 = tlora_base(layer, weight)
        q = t[Q].reshape(t[Q].shape[0], -1)
        p = t[P].reshape(t[P].shape[0], -1)
        lam = t[LAMBDA].reshape(1, -1)
        dw = (p @ (lam.T * q) - p0 @ (lam0.T * q0)) * self.scale(layer)
        return dw.reshape(weight.shape)

    def bypass(self, layer: Layer, module: nn.Module, strength: float) -> Contribution | None:
        if is_conv(module):
            return None
        t, w = layer.tensors, base_weight(module)  # the SVD reads the values
        q0, p0, lam0 = tlora_base(layer, w)
        k = self.scale(layer) * strength
        q, p = cast(t[Q], w), cast(t[P], w, k)
        lam = cast(t[LAMBDA].reshape(-1), w)
        q0, p0, lam0 = cast(q0, w), cast(p0, w, k), cast(lam0.reshape(-1), w)
        return lambda x, y0: (
            F.linear(F.linear(x, q) * lam, p) - F.linear(F.linear(x, q0) * lam0, p0)
        )


TLORA = TLoRA()
