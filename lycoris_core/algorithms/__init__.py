"""Every LyCORIS algorithm, one object per module, and the exact math at any strength.

The reference for "layer L at strength s" is lycoris' own module forward with
``multiplier = s`` (the rebuild forward lycoris uses by default). Each algorithm object
(:class:`~.base.Algorithm`) knows its tensor suffixes, how to recognise a layer, its
rank/scale, the shape it fits, and gives:

* ``delta`` -- the weight (and bias) change that reproduces that forward when merged,
  computed in float32 with the alpha/rank scale applied once (lycoris' ``merge_to`` applies
  it twice for LoHa and low-rank LoKr);
* ``bypass`` / ``precomputed`` -- a function ``(x, y0) -> dy`` that adds the same change to a
  layer's output without touching its weight (``y0`` is the base layer's output).

Strength semantics (documented in the README): linear in ``s`` for LoRA/LoCon, LoHa, LoKr,
DyLoRA, GLoRA, full, IA3, T-LoRA and norms; for DoRA variants ``s`` interpolates the
magnitude rescale while the direction is fully applied; diag-OFT interpolates each rotation
block towards the identity (``I + s(R - I)``) and BOFT each butterfly stage, with the OFT
``rescale`` always applied. Strength 0 is never computed: callers skip the adapter.

Adding an algorithm: one module with its object, and one line in :data:`REGISTRY`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..errors import AdapterFormatError
from ._common import Contribution, is_conv
from .base import Algorithm, Layer, Modifier
from .dora import DORA
from .dylora import DYLORA
from .full import FULL
from .glora import GLORA
from .ia3 import IA3
from .locon import LOCON
from .loha import LOHA
from .lokr import LOKR
from .norm import NORM
from .oft import BOFT, DIAG_OFT
from .tlora import TLORA

__all__ = [
    "MODIFIERS",
    "REGISTRY",
    "Algorithm",
    "Contribution",
    "accumulate",
    "check_layer",
    "delta",
    "detect",
    "dynamic_contribution",
    "layer_label",
    "scale_of",
    "shape_mismatch",
]

# Name -> algorithm, in detection order: the first whose `detect` accepts a layer's tensors
# is its algorithm (DyLoRA before LoCon: same tensors, told apart by the file's metadata).
REGISTRY: dict[str, Algorithm] = {
    DYLORA.name: DYLORA,
    LOCON.name: LOCON,
    LOHA.name: LOHA,
    LOKR.name: LOKR,
    FULL.name: FULL,
    DIAG_OFT.name: DIAG_OFT,
    BOFT.name: BOFT,
    IA3.name: IA3,
    GLORA.name: GLORA,
    TLORA.name: TLORA,
    NORM.name: NORM,
}

# Modifiers saved beside an algorithm's tensors; each adds its label to the layer's.
MODIFIERS: tuple[Modifier, ...] = (DORA,)


def detect(name: str, tensors: Mapping[str, torch.Tensor], config: Any = None) -> Algorithm:
    """The algorithm of layer `name` from its tensors (and the file's LycorisConfig)."""
    for algorithm in REGISTRY.values():
        if algorithm.detect(tensors, config):
            return algorithm
    raise AdapterFormatError(
        f"layer '{name}' has tensors {sorted(tensors)} that match no LyCORIS algorithm"
    )


def check_layer(layer: Layer, source: str) -> None:
    """Raise :class:`AdapterFormatError` unless the layer's tensors are a valid set for its
    algorithm (:meth:`Algorithm.check`: scalars, shapes, ranks, finite values)."""
    problem = REGISTRY[layer.algo].check(layer)
    if problem is not None:
        raise AdapterFormatError(
            f"{source}: layer '{layer.name}' ({layer.algo}): {problem}; the file is damaged or "
            "was not written by a LyCORIS trainer"
        )


def layer_label(layer: Layer) -> str:
    """The layer's algorithm name followed by the labels of the modifiers it carries."""
    return layer.algo + "".join(m.label for m in MODIFIERS if m.present(layer.tensors))


def scale_of(layer: Layer) -> float:
    """The alpha/rank factor the lycoris forward applies once."""
    return REGISTRY[layer.algo].scale(layer)


def shape_mismatch(layer: Layer, weight: torch.Tensor) -> str | None:
    """None if the layer fits a weight of this shape, else a description of its shape."""
    return REGISTRY[layer.algo].mismatch(layer, weight)


@torch.no_grad()
def delta(
    layer: Layer, weight: torch.Tensor, bias: torch.Tensor | None, strength: float
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(dW, db) in float32: (W + dW, b + db) reproduces the lycoris forward at `strength`."""
    return REGISTRY[layer.algo].delta(layer, weight, bias, float(strength))


@torch.no_grad()
def accumulate(
    acc: torch.Tensor | None,
    layer: Layer,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    strength: float,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Add `layer` at `strength` to a merged weight; returns (merged, bias delta or None).

    `acc` is the float32 merged weight so far, or None while it is still the (float32) base
    `weight`, which is never modified: a new buffer is made on first use. Deltas that depend
    on the weight (DoRA, OFT, GLoRA, IA3, T-LoRA) are computed from the base `weight`, so
    stacked adapters each contribute relative to the base. LoRA, LoHa, LoKr and full are
    added without materialising a separate delta where possible.
    """
    return REGISTRY[layer.algo].accumulate(acc, layer, weight, bias, float(strength))


@torch.no_grad()
def dynamic_contribution(layer: Layer, module: nn.Module, strength: float) -> Contribution:
    """A function ``(x, y0) -> dy`` adding `layer` at `strength` to `module`'s output.

    Algorithms with a cheap bypass computation use it; the others, any layer with a
    modifier (DoRA) and grouped convolutions precompute their delta weight once.
    """
    s = float(strength)
    algorithm = REGISTRY[layer.algo]
    grouped = is_conv(module) and module.groups != 1
    modified = any(m.present(layer.tensors) for m in MODIFIERS)
    if not (modified or grouped):
        contribution = algorithm.bypass(layer, module, s)
        if contribution is not None:
            return contribution
    return algorithm.precomputed(layer, module, s)
