"""Layers whose targets are parts of modules: fused foreign weights (Flux/SD3 ``qkv``, Flux
``linear1``), the adaLN half swap, and the bias delta (``diff_b``) some files keep beside
any algorithm.

A fused layer's delta is computed once, by the algorithm, on the reassembled foreign weight
(the targets' base weights, each put in the foreign row order, concatenated along rows in
target order), then each target gets its row slice back in its own row order. That is exact
for every algorithm, also those that depend on the weight (DoRA's norms on the whole fused
``W + dW``, OFT, GLoRA, IA3, T-LoRA). In dynamic mode a plain LoRA instead slices its up
matrix (a cheap bypass per target); every other algorithm materialises the fused delta.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import torch
from torch import nn

from .algorithms import Contribution, delta
from .algorithms._common import layer_op
from .layouts import Target, apply_transform
from .layouts.keys import BIAS_DIFF, LORA_DOWN, LORA_UP
from .quantization import weight_like

if TYPE_CHECKING:
    from .adapters import LayerAdapter

Base = Mapping[str, tuple[torch.Tensor, "torch.Tensor | None"]]
"""Module path -> (base weight, base bias or None)."""


def extra_bias(layer: LayerAdapter, strength: float, like: torch.Tensor) -> torch.Tensor | None:
    """A ``diff_b`` saved beside an algorithm that does not own it, at `strength` (float32)."""
    db = layer.tensors.get(BIAS_DIFF)
    if db is None or BIAS_DIFF in layer.algorithm.all_suffixes:
        return None
    return db.to(device=like.device, dtype=torch.float32).reshape(-1) * float(strength)


def _add(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    if a is None:
        return b
    return a if b is None else a + b


def _rows(targets: tuple[Target, ...], weights: list[torch.Tensor]) -> list[tuple[int, int]]:
    out, start = [], 0
    for t, w in zip(targets, weights, strict=True):
        rows = t.rows or (start, start + w.shape[0])
        out.append(rows)
        start = rows[1]
    return out


def fused_deltas(
    layer: LayerAdapter, targets: tuple[Target, ...], base: Base, strength: float
) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """Per target path: (dW, db or None) in float32, from the delta of the fused weight."""
    ws = [apply_transform(t.transform, base[t.path][0].float()) for t in targets]
    biases = [base[t.path][1] for t in targets]
    fused_b = None
    if all(b is not None for b in biases):
        fused_b = torch.cat(
            [apply_transform(t.transform, b.float()) for t, b in zip(targets, biases, strict=True)]
        )
    fused_w = torch.cat(ws) if len(ws) > 1 else ws[0]
    dw, db = delta(layer, fused_w, fused_b, strength)
    if fused_b is not None:
        db = _add(db, extra_bias(layer, strength, fused_w))
    out = {}
    for t, (a, b), bias in zip(targets, _rows(targets, ws), biases, strict=True):
        dbt = None if db is None or bias is None else apply_transform(t.transform, db[a:b])
        out[t.path] = (apply_transform(t.transform, dw[a:b]), dbt)
    return out


def row_sliceable(layer: LayerAdapter) -> bool:
    """A plain LoRA (up @ down, no mid, no DoRA): each target's part is its rows of ``up``."""
    t = layer.tensors
    return LORA_UP in t and LORA_DOWN in t and set(t) <= {LORA_UP, LORA_DOWN, "alpha", BIAS_DIFF}


def sliced(layer: LayerAdapter, targets: tuple[Target, ...], base: Base) -> dict[str, LayerAdapter]:
    """Per target path: the LoRA layer with only that target's rows of ``up`` (and of
    ``diff_b``), in the target's row order. The rank (so the scale) is unchanged."""
    from .adapters import LayerAdapter

    weights = [base[t.path][0] for t in targets]
    out = {}
    for t, (a, b) in zip(targets, _rows(targets, weights), strict=True):
        tensors = dict(layer.tensors)
        tensors[LORA_UP] = apply_transform(t.transform, layer.tensors[LORA_UP][a:b])
        if BIAS_DIFF in tensors:
            tensors[BIAS_DIFF] = apply_transform(t.transform, tensors[BIAS_DIFF].reshape(-1)[a:b])
        out[t.path] = LayerAdapter(layer.name, layer.algo, tensors, layer.options)
    return out


Factory = Callable[[nn.Module], Contribution]
"""Builds a module's contribution ``(x, y0) -> dy`` for the device its weight is on now."""


def bias_factory(db: torch.Tensor) -> Factory:
    """A contribution adding a fixed bias delta to the output."""

    def make(m: nn.Module) -> Contribution:
        w = weight_like(m)
        d = db.to(device=w.device, dtype=w.dtype)
        conv = w.dim() > 2
        return lambda x, y0: d.view(1, -1, *([1] * (y0.dim() - 2))) if conv else d

    return make


def delta_factory(dw: torch.Tensor, db: torch.Tensor | None) -> Factory:
    """A contribution adding ``op(x, dW) + db`` (a materialised delta)."""

    def make(m: nn.Module) -> Contribution:
        w = weight_like(m)
        dwm = dw.to(device=w.device, dtype=w.dtype)
        dbm = None if db is None else db.to(device=w.device, dtype=w.dtype)
        op = layer_op(m)
        return lambda x, y0: op(x, dwm, dbm)

    return make
