"""Write an adapter in the layout another tool reads: ours (``lycoris``) or kohya/ComfyUI.

``lycoris`` writes every layer under its own name with lycoris' tensor suffixes: the file our
trainer writes, byte for byte.

``kohya`` writes the denoiser's layers under ``lora_unet_`` + the model's original module
names with ``.`` -> ``_``: ldm names for SD1.x/SDXL UNets, BFL names for Flux, SAI names for
SD3 (the names kohya's sd-scripts and most Civitai SDXL/Flux files use; ComfyUI maps
``lora_unet_`` + any of its own state-dict names, ``comfy/lora.py`` ``model_lora_keys_unet``).
The names come from the family's name map (:func:`lycoris_core.layouts.denoiser_name_map`),
derived from the model's config, so the model the adapter is for must be given.

Where one foreign weight holds several of our modules (Flux ``img_attn.qkv`` = ``to_q, to_k,
to_v``, ``single_blocks.N.linear1`` = ``to_q, to_k, to_v, proj_mlp``, SD3 ``qkv``) and every
adapted part is a plain LoRA, the parts are fused exactly into one LoRA (:func:`fuse_lora`).
A layer that cannot be fused exactly (LoKr, LoHa, OFT, DoRA, IA3, ... on a part of a fused
weight, or a fused weight whose parts mix algorithms) keeps, with all the other parts of
that weight, its split per-module name ``lycoris_`` + diffusers path with ``.`` -> ``_``:
the one naming ComfyUI maps for the UNet, SD3 and Flux alike (``model_lora_keys_unet``: the
SimpleTuner names, with row offsets into the fused weight and the adaLN swap applied by
ComfyUI itself), and the one our reader and lycoris' ``create_lycoris_from_weights`` read.
The adaLN half swap (``final_layer.adaLN_modulation.1`` <-> ``norm_out.linear``, SD3's last
``context_block.adaLN_modulation.1``) is applied to a LoRA's up rows (and ``diff_b``); other
algorithms there keep their split names (ComfyUI swaps their delta itself).
Layers of other components (text encoders) keep the names they have.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .errors import AdapterFormatError, ConfigError
from .fused import row_sliceable
from .io import write_safetensors
from .layouts import Target, apply_transform, denoiser_name_map
from .layouts.keys import BIAS_DIFF, LORA_DOWN, LORA_UP
from .layouts.names import family_of

if TYPE_CHECKING:
    from .adapters import Adapter, LayerAdapter

LAYOUTS: tuple[str, ...] = ("lycoris", "kohya")
"""Layouts an adapter can be written in (the first is the default)."""

FOREIGN_PREFIX = "lora_unet_"
SPLIT_PREFIX = "lycoris_"
_TEXT_COMPONENTS = ("text_encoder", "text_encoder_2", "text_encoder_3")

Tensors = dict[str, torch.Tensor]


def _flat(name: str) -> str:
    return name.replace(".", "_")


def lycoris_tensors(adapter: Adapter) -> Tensors:
    """Every layer's tensors under ``<layer name>.<lycoris suffix>`` (the ``lycoris`` layout)."""
    return {
        f"{layer}.{key}": t for layer, la in adapter.layers.items() for key, t in la.tensors.items()
    }


def layout_tensors(
    adapter: Adapter,
    layout: str = "lycoris",
    *,
    denoiser: nn.Module | None = None,
    family: str | None = None,
) -> Tensors:
    """The tensors of `adapter` written in `layout` (see the module docstring).

    ``kohya`` needs the `denoiser` the adapter is for (its config gives the names; its family
    defaults to the one its class belongs to); every denoiser layer must bind to it.
    """
    if layout not in LAYOUTS:
        raise ConfigError(f"layout {layout!r} is not one of {list(LAYOUTS)}; choose one of them")
    if layout == "lycoris":
        return lycoris_tensors(adapter)
    if denoiser is None:
        raise ConfigError(
            f"{adapter.name}: layout 'kohya' needs the model the adapter is for (its module "
            "names come from the model's config); connect the model, or save with layout "
            "'lycoris'"
        )
    family = family if family is not None else family_of(denoiser)
    cfg = getattr(denoiser, "config", None)
    fmap = denoiser_name_map(family or "", dict(cfg) if cfg is not None else {})
    if not fmap:
        raise ConfigError(
            f"{adapter.name}: the kohya layout has no names for {type(denoiser).__name__} "
            f"(family {family!r}); save with layout 'lycoris'"
        )
    binding = adapter.bind(denoiser, strict=True, family=family, elsewhere=_TEXT_COMPONENTS)
    out: Tensors = {}
    for names in binding.elsewhere.values():
        for name in names:
            _put(out, name, adapter.layers[name].tensors)
    for name, layer_name, tensors in _kohya_layers(adapter, binding.targets, fmap, denoiser):
        _put(out, layer_name, tensors, source=name)
    return out


def _put(out: Tensors, layer: str, tensors: Mapping[str, torch.Tensor], source: str = "") -> None:
    for key, t in tensors.items():
        full = f"{layer}.{key}"
        if full in out:
            raise AdapterFormatError(
                f"two layers of the adapter ({source or layer} and another) are both written "
                f"as '{layer}'; the adapter adapts one module twice"
            )
        out[full] = t


def _inverse(fmap: Mapping[str, tuple[Target, ...]]) -> dict[str, tuple[str, Target]]:
    """Diffusers module path -> (the foreign name holding it, its target there)."""
    inv: dict[str, tuple[str, Target]] = {}
    for foreign, targets in fmap.items():
        for t in targets:
            inv.setdefault(t.path, (foreign, t))
    return inv


def _fusable(layer: LayerAdapter) -> bool:
    return layer.algo == "locon" and row_sliceable(layer) and layer.tensors[LORA_DOWN].dim() == 2


def _kohya_layers(
    adapter: Adapter,
    bound: Mapping[str, tuple[Target, ...]],
    fmap: Mapping[str, tuple[Target, ...]],
    denoiser: nn.Module,
) -> list[tuple[str, str, Mapping[str, torch.Tensor]]]:
    """(file layer, name to write, tensors) for every denoiser layer, fused groups fused."""
    inv = _inverse(fmap)
    by_targets = {targets: foreign for foreign, targets in fmap.items()}
    rows: list[tuple[str, str, Mapping[str, torch.Tensor]]] = []
    groups: dict[str, dict[str, str]] = {}  # foreign fused name -> {path: file layer}
    for name, targets in bound.items():
        layer = adapter.layers[name]
        split = (SPLIT_PREFIX + _flat(targets[0].path), layer.tensors)
        if targets in by_targets:  # the layer is one whole foreign weight (or read as one)
            rows.append((name, FOREIGN_PREFIX + _flat(by_targets[targets]), layer.tensors))
            continue
        path = targets[0].path
        if len(targets) != 1 or not targets[0].plain or path not in inv:
            rows.append((name, *split))
            continue
        foreign, target = inv[path]
        if len(fmap[foreign]) > 1:
            groups.setdefault(foreign, {})[path] = name
        elif target.plain:
            rows.append((name, FOREIGN_PREFIX + _flat(foreign), layer.tensors))
        elif _fusable(layer):
            swapped = _transformed(layer.tensors, target.transform)
            rows.append((name, FOREIGN_PREFIX + _flat(foreign), swapped))
        else:
            rows.append((name, *split))
    for foreign, parts in groups.items():
        layers = {path: adapter.layers[n] for path, n in parts.items()}
        if all(_fusable(la) for la in layers.values()):
            fused = fuse_lora(layers, fmap[foreign], _row_counts(denoiser, fmap[foreign]))
            rows.append((" + ".join(parts.values()), FOREIGN_PREFIX + _flat(foreign), fused))
        else:
            for path, n in parts.items():
                rows.append((n, SPLIT_PREFIX + _flat(path), adapter.layers[n].tensors))
    return rows


def _row_counts(denoiser: nn.Module, targets: tuple[Target, ...]) -> list[int]:
    return [int(denoiser.get_submodule(t.path).weight.shape[0]) for t in targets]


def _transformed(tensors: Mapping[str, torch.Tensor], transform: str | None) -> Tensors:
    out = dict(tensors)
    out[LORA_UP] = apply_transform(transform, tensors[LORA_UP])
    if BIAS_DIFF in out:
        out[BIAS_DIFF] = apply_transform(transform, tensors[BIAS_DIFF].reshape(-1))
    return out


def fuse_lora(
    parts: Mapping[str, LayerAdapter], targets: tuple[Target, ...], rows: list[int]
) -> Tensors:
    """One LoRA for a fused foreign weight whose delta, row block by row block, is each
    part's delta exactly.

    Each part ``i`` (the LoRA of target ``i``, rank ``r_i``) has ``dW_i = s_i * up_i @ down_i``
    with ``s_i = alpha_i / r_i`` (``s_i = 1`` without alpha). The fused LoRA stacks the downs
    (``down = [down_1; down_2; ...]``, rank ``R = sum r_i``) and puts each up in its target's
    row block and its own rank columns (block-diagonal ``up``; a target without a part gets
    zero rows), so ``up @ down`` holds ``up_i @ down_i`` in block ``i`` and no cross terms.
    A file has one alpha per layer, read as ``alpha / R``, so the parts' scales are folded:

    * all ``s_i`` equal (every part trained with the same alpha and rank, the usual case):
      ``alpha = s * R`` and the ups are the parts' own tensors, unchanged;
    * otherwise ``alpha = R`` (scale 1) and each up block is ``s_i * up_i`` (computed in
      float32, stored in the up's dtype).

    Either way block ``i`` of the fused delta is ``s_i * up_i @ down_i = dW_i``. A target's
    row transform (the adaLN half swap) reorders its up rows (and ``diff_b``); ``diff_b`` is
    concatenated likewise (zeros for a target without one).
    """
    order = [t.path for t in targets if t.path in parts]
    first = parts[order[0]].tensors
    dtype, device = first[LORA_UP].dtype, first[LORA_UP].device
    scales = [parts[p].algorithm.scale(parts[p]) for p in order]
    same = all(s == scales[0] for s in scales)
    ranks = [int(parts[p].tensors[LORA_DOWN].shape[0]) for p in order]
    total = sum(ranks)
    up = torch.zeros(sum(rows), total, dtype=dtype, device=device)
    start, col = 0, 0
    bias: list[torch.Tensor] = []
    any_bias = any(BIAS_DIFF in parts[p].tensors for p in order)
    scale_of = dict(zip(order, scales, strict=True))
    for t, n in zip(targets, rows, strict=True):
        part = parts.get(t.path)
        if part is not None:
            r = int(part.tensors[LORA_DOWN].shape[0])
            block = part.tensors[LORA_UP].reshape(n, r)
            if not same:
                block = (block.float() * scale_of[t.path]).to(dtype)
            up[start : start + n, col : col + r] = apply_transform(t.transform, block)
            col += r
        if any_bias:
            db = None if part is None else part.tensors.get(BIAS_DIFF)
            db = torch.zeros(n, dtype=dtype) if db is None else db.reshape(-1).to(dtype)
            bias.append(apply_transform(t.transform, db))
        start += n
    down = torch.cat([parts[p].tensors[LORA_DOWN].to(dtype) for p in order])
    alpha = scales[0] * total if same else float(total)
    alpha_dtype = first["alpha"].dtype if "alpha" in first else torch.float32
    out = {LORA_DOWN: down, LORA_UP: up, "alpha": torch.tensor(alpha, dtype=alpha_dtype)}
    if any_bias:
        out[BIAS_DIFF] = torch.cat(bias)
    return out


def save_adapter(
    adapter: Adapter,
    path: str | os.PathLike[str],
    layout: str = "lycoris",
    *,
    denoiser: nn.Module | None = None,
    family: str | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Write `adapter` to `path` (atomically) in `layout`, with its metadata (or `metadata`).

    ``layout="lycoris"`` writes exactly what the trainer writes; ``"kohya"`` needs `denoiser`
    (see :func:`layout_tensors`). Nothing is written when the conversion fails.
    """
    tensors = layout_tensors(adapter, layout, denoiser=denoiser, family=family)
    meta = dict(adapter.metadata if metadata is None else metadata)
    return write_safetensors(path, tensors, meta)


__all__ = ["LAYOUTS", "fuse_lora", "layout_tensors", "lycoris_tensors", "save_adapter"]
