"""OFT: diag-OFT (block-diagonal rotation of the output channels) and BOFT (butterfly
stages of rotations), both with an optional per-channel ``rescale``.

The strength interpolates each rotation block towards the identity (diag-OFT: ``I + s(R - I)``;
BOFT: each butterfly stage); the rescale is always applied.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..quantization import base_bias, weight_like
from ._common import Contribution, bias_view, cast, channel_back, channel_last, f32, is_conv
from .base import Algorithm, Layer, agree, shape_or_none

BLOCKS, RESCALE = "oft_blocks", "rescale"


def _constraint(layer: Layer) -> float:
    blocks = layer.tensors[BLOCKS]
    out_dim = blocks.shape[-3] * blocks.shape[-1]
    return float(layer.alpha or 0.0) * out_dim


class _OFT(Algorithm):
    suffixes = (BLOCKS, RESCALE, "alpha")
    blocks_ndim: int

    def detect(self, tensors: Mapping[str, torch.Tensor], config: Any) -> bool:
        return BLOCKS in tensors and tensors[BLOCKS].ndim == self.blocks_ndim

    def check(self, layer: Layer) -> str | None:
        t = layer.tensors
        problem = super().check(layer)
        if problem:
            return problem
        blocks = t[BLOCKS]
        problem = agree(("oft_blocks dim -1", blocks.shape[-1], "dim -2", blocks.shape[-2]))
        if problem or RESCALE not in t:
            return problem
        out_dim = blocks.shape[-3] * blocks.shape[-1]
        return agree(("rescale size", t[RESCALE].numel(), "output channels", out_dim))

    def mismatch(self, layer: Layer, weight: torch.Tensor) -> str | None:
        blocks = layer.tensors[BLOCKS]
        flat_in = int(math.prod(weight.shape[1:]))
        return shape_or_none((blocks.shape[-3] * blocks.shape[-1], flat_in), weight)

    def describe(self, layer: Layer) -> dict[str, Any]:
        return {"blocks": list(layer.tensors[BLOCKS].shape), "rescaled": RESCALE in layer.tensors}


class DiagOFT(_OFT):
    name = "diag-oft"
    blocks_ndim = 3

    @staticmethod
    def matrix(layer: Layer, strength: float, device: torch.device) -> torch.Tensor:
        """Per-block operator ``I + s(R - I)`` (float32, [blocks, b, b])."""
        from lycoris.functional.diag_oft import get_r

        blocks = f32(layer.tensors[BLOCKS], device)
        eye = torch.eye(blocks.shape[1], device=device)
        r = get_r(blocks, eye, _constraint(layer))
        return r * strength + (1 - strength) * eye

    def delta(
        self, layer: Layer, weight: torch.Tensor, bias: torch.Tensor | None, strength: float
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        w = weight.float()
        m = self.matrix(layer, float(strength), weight.device)
        k, n = m.shape[0], m.shape[1]
        rotated = torch.einsum("k n m, k n ... -> k m ...", m, w.view(k, n, *w.shape[1:]))
        rotated = rotated.reshape(w.shape)
        if RESCALE in layer.tensors:
            rotated = f32(layer.tensors[RESCALE], weight.device) * rotated
        return rotated - w, None

    def bypass(self, layer: Layer, module: nn.Module, strength: float) -> Contribution | None:
        t, w, bias = layer.tensors, weight_like(module), base_bias(module)
        conv = is_conv(module)
        m = self.matrix(layer, strength, w.device).to(w.dtype)
        k, n = m.shape[0], m.shape[1]
        rescale = None if RESCALE not in t else cast(t[RESCALE].reshape(-1), w)

        def oft(x: torch.Tensor, y0: torch.Tensor) -> torch.Tensor:
            z = channel_last(y0 - bias_view(bias, y0, conv), conv)
            zr = torch.einsum("k n m, ... k n -> ... k m", m, z.reshape(*z.shape[:-1], k, n))
            zr = zr.reshape(z.shape)
            if rescale is not None:
                zr = zr * rescale
            return channel_back(zr - z, conv)

        return oft


class ButterflyOFT(_OFT):
    name = "boft"
    blocks_ndim = 4

    def delta(
        self, layer: Layer, weight: torch.Tensor, bias: torch.Tensor | None, strength: float
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        from lycoris.functional import boft

        dev = weight.device
        dw = boft.diff_weight(
            weight.float(),
            f32(layer.tensors[BLOCKS], dev),
            f32(layer.tensors.get(RESCALE), dev),
            constraint=_constraint(layer),
            scale=float(strength),
        )
        return dw, None

    def bypass(self, layer: Layer, module: nn.Module, strength: float) -> Contribution | None:
        from lycoris.functional import boft

        t, dev, bias = layer.tensors, weight_like(module).device, base_bias(module)
        conv = is_conv(module)
        blocks = f32(t[BLOCKS], dev)
        rescale = f32(t.get(RESCALE), dev)
        constraint = _constraint(layer)

        def butterfly(x: torch.Tensor, y0: torch.Tensor) -> torch.Tensor:
            z = (y0 - bias_view(bias, y0, conv)).float()
            d = boft.bypass_forward_diff(
                z, blocks, rescale, constraint=constraint, need_transpose=conv, scale=strength
            )
            return d.to(y0.dtype)

        return butterfly


DIAG_OFT = DiagOFT()
BOFT = ButterflyOFT()
