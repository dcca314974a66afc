"""An adapter as per-weight patches of a host model held under its original names (ComfyUI).

A host such as ComfyUI keeps the denoiser's weights under the ldm / BFL / SAI names
(``diffusion_model.input_blocks.1.1.proj_in.weight``, ``diffusion_model.double_blocks.0.
img_attn.qkv.weight``) and patches them one state-dict key at a time, a patch optionally
covering a row slice ``(dim, start, length)`` of the key (ComfyUI's ``add_patches`` offsets).
:func:`plan_patches` turns an adapter into such patches:

* a layer named after the host's own module (kohya ``lora_unet_input_blocks_...``,
  ``diffusion_model.double_blocks...``, BFL/SAI fused ``qkv``/``linear1``) patches that whole
  key: its delta is computed on the host weight, which is the fused foreign weight our own
  merge reassembles (:mod:`lycoris_core.fused`), so it is the same delta;
* a layer named after a diffusers module (our own files, ``lycoris_<diffusers path>``)
  patches the row slice of the host key that the family's name map says the module occupies,
  after the row transform (adaLN halves) that puts the slice in our row order.

:meth:`HostPatch.weight_delta` is the change for the host's current (slice of the) weight at a
strength, in the host's row order, from the algorithm's own exact delta
(:func:`lycoris_core.algorithms.delta`): weight-dependent algorithms (DoRA, OFT, GLoRA, IA3,
T-LoRA) read the weight they are given. Bias changes never depend on the weight in any
algorithm (``diff_b``, ``b_norm``), so :meth:`HostPatch.bias_delta` may run at any time.
Strength 0 is never computed: the caller adds no patch (DoRA/rescaled OFT at 0 are then the base).
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import TYPE_CHECKING

import torch

from .algorithms import delta as algo_delta
from .errors import AdapterFormatError
from .fused import extra_bias
from .host_config import denoiser_config, family_of_keys
from .layouts import Target, apply_transform, denoiser_name_map, foreign_naming
from .layouts.keys import BIAS_DIFF
from .layouts.names import NameIndex, guess_file, text_component

if TYPE_CHECKING:
    from .adapters import Adapter, LayerAdapter

logger = logging.getLogger(__name__)

HOST = "host"
DENOISER_PREFIX = "diffusion_model."
_PARAMS = ("weight", "scale")  # BFL's RMSNorm keeps its weight as `scale`
_BIAS_TENSORS = (BIAS_DIFF, "b_norm")


@dataclass(frozen=True)
class HostPatch:
    """One patch of one host state-dict key: a file layer's change of (a slice of) it."""

    key: str  # the host state-dict key (weight or bias)
    offset: tuple[int, int, int] | None  # (dim, start, length) of the slice, or the whole key
    layer: LayerAdapter
    transform: str | None  # how the slice's rows relate to the layer's own (see Target)
    kind: str  # "weight" or "bias"
    weight_shape: tuple[int, ...] = ()  # the (slice of the) module weight's shape

    @property
    def host_key(self) -> str | tuple[str, tuple[int, int, int]]:
        """The key as ComfyUI's ``add_patches`` takes it: the name, or (name, offset)."""
        return self.key if self.offset is None else (self.key, self.offset)

    @torch.no_grad()
    def weight_delta(self, weight: torch.Tensor, strength: float) -> torch.Tensor:
        """dW (float32, host row order) for the current `weight` (this patch's slice)."""
        ours = apply_transform(self.transform, weight.float())
        dw, _ = algo_delta(self.layer, ours, None, float(strength))
        return apply_transform(self.transform, dw.reshape(weight.shape))

    def delta(self, tensor: torch.Tensor, strength: float) -> torch.Tensor:
        """The change of `tensor` (this patch's key, or its slice) at `strength`."""
        if self.kind == "weight":
            return self.weight_delta(tensor, strength)
        return self.bias_delta(tensor, strength)

    @torch.no_grad()
    def bias_delta(self, bias: torch.Tensor, strength: float) -> torch.Tensor:
        """db (float32, host row order) for this patch's slice of the bias."""
        ours_b = apply_transform(self.transform, bias.float())
        if set(_BIAS_TENSORS) & set(self.layer.algorithm.all_suffixes):  # full, norm
            w = torch.zeros(self.weight_shape, dtype=torch.float32, device=bias.device)
            _, db = algo_delta(self.layer, w, ours_b, float(strength))
        else:
            db = None
        db = _sum(db, extra_bias(self.layer, strength, ours_b))
        if db is None:
            return torch.zeros_like(bias, dtype=torch.float32)
        return apply_transform(self.transform, db.reshape(bias.shape))


def _sum(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    if a is None:
        return b
    return a if b is None else a + b


@dataclass
class HostPlan:
    """The patches of one adapter for one host component, and what did not match."""

    patches: list[HostPatch] = field(default_factory=list)
    matched: int = 0
    layouts: dict[str, int] = field(default_factory=dict)
    unmatched: list[str] = field(default_factory=list)
    elsewhere: list[str] = field(default_factory=list)  # text-encoder layers

    def as_dict(self) -> dict[str | tuple[str, tuple[int, int, int]], HostPatch]:
        return {p.host_key: p for p in self.patches}


def _module_shapes(shapes: Mapping[str, Sequence[int]], prefix: str) -> dict[str, str]:
    """Host module name (unprefixed) -> its weight parameter's full key."""
    out: dict[str, str] = {}
    for key in shapes:
        if not key.startswith(prefix):
            continue
        module, _, param = key[len(prefix) :].rpartition(".")
        if param in _PARAMS and module:
            out.setdefault(module, key)
    return out


def denoiser_index(
    family: str, shapes: Mapping[str, Sequence[int]], prefix: str = DENOISER_PREFIX
) -> NameIndex:
    """The names a host denoiser's modules answer to: their own (foreign) names, and each
    diffusers module of the family's name map, as (host module, rows, transform)."""
    modules = _module_shapes(shapes, prefix)
    config = denoiser_config(family, {k[len(prefix) :]: v for k, v in shapes.items()})
    naming = foreign_naming(family)
    index = NameIndex(HOST)
    for foreign, targets in denoiser_name_map(family, config).items():
        if foreign not in modules:
            continue
        index.add(foreign, (Target(HOST, foreign),), naming)
        for t in targets:
            index.add(t.path, (Target(HOST, foreign, t.rows, t.transform),), "diffusers")
    for module in modules:  # host modules the map does not name: by their own name
        if module not in index.dotted:
            index.add(module, (Target(HOST, module),), naming)
    return index


def plan_patches(
    adapter: Adapter,
    shapes: Mapping[str, Sequence[int]],
    family: str | None = None,
    *,
    prefix: str = DENOISER_PREFIX,
    strict: bool = True,
    index: NameIndex | None = None,
) -> HostPlan:
    """The patches applying `adapter`'s denoiser layers to a host denoiser whose state-dict
    keys (with `prefix`) have the given `shapes`. `family` defaults to the one the keys show.

    Text-encoder layers are set aside (``elsewhere``). Layers matching nothing raise
    :class:`AdapterFormatError` (counts, what the file looks like, the fix), or with
    ``strict=False`` are left out (an error still when nothing matches)."""
    if family is None:
        family = family_of_keys({k[len(prefix) :]: v for k, v in shapes.items()})
        if family is None:
            raise AdapterFormatError(
                f"{adapter.name}: the host model's keys ({prefix}...) are no SD1.x/SDXL UNet, "
                "Flux or SD3 denoiser this pack can map"
            )
    if index is None:
        index = denoiser_index(family, shapes, prefix)
    modules = _module_shapes(shapes, prefix)
    plan = HostPlan()
    for name, layer in adapter.layers.items():
        if text_component(name, family) is not None:
            plan.elsewhere.append(name)
            continue
        try:
            hit = index.lookup(name, adapter.prefixes)
        except ValueError:
            raise AdapterFormatError(
                f"{adapter.name}: layer '{name}' maps to more than one module of the host "
                "model (the '.'->'_' naming is ambiguous here)"
            ) from None
        if hit is None:
            plan.unmatched.append(name)
            continue
        (target,) = hit.targets
        plan.patches.extend(_layer_patches(adapter, layer, target, modules[target.path], shapes))
        plan.matched += 1
        plan.layouts[hit.layout] = plan.layouts.get(hit.layout, 0) + 1
    _check_overlaps(adapter, plan)
    if plan.unmatched:
        _report(adapter, plan, strict, f"{family} host denoiser")
    return plan


def _layer_patches(
    adapter: Adapter,
    layer: LayerAdapter,
    target: Target,
    weight_key: str,
    shapes: Mapping[str, Sequence[int]],
) -> list[HostPatch]:
    from .binding import conform_conv_factors  # 2-D conv LoRA factors (ComfyUI's trainer)

    full = tuple(shapes[weight_key])
    if target.rows is None:
        offset, shape = None, full
    else:
        start, stop = target.rows
        if stop > full[0]:
            raise AdapterFormatError(
                f"{adapter.name}: layer '{layer.name}' needs rows {start}:{stop} of "
                f"'{weight_key}', which has {full[0]}; the host model's shapes disagree"
            )
        offset, shape = (0, start, stop - start), (stop - start, *full[1:])
    meta = torch.empty(shape, device="meta")
    layer = conform_conv_factors(layer, SimpleNamespace(weight=meta))
    got = layer.algorithm.mismatch(layer, meta)
    if got is not None:
        rows = "" if offset is None else f" rows {offset[1]}:{offset[1] + offset[2]}"
        raise AdapterFormatError(
            f"{adapter.name}: layer '{layer.name}' ({layer.algo}, {got}) does not fit "
            f"'{weight_key}'{rows} (shape {shape}); the file was made for another model or size"
        )
    out = [HostPatch(weight_key, offset, layer, target.transform, "weight", shape)]
    bias_key = weight_key.rpartition(".")[0] + ".bias"
    if bias_key in shapes and any(t in layer.tensors for t in _BIAS_TENSORS):
        out.append(HostPatch(bias_key, offset, layer, target.transform, "bias", shape))
    return out


def _check_overlaps(adapter: Adapter, plan: HostPlan) -> None:
    seen: dict[str, list[tuple[int, int, str]]] = {}
    for p in plan.patches:
        if p.kind != "weight":
            continue
        a, b = (0, 1 << 62) if p.offset is None else (p.offset[1], p.offset[1] + p.offset[2])
        for c, d, other in seen.get(p.key, []):
            if a < d and c < b:
                raise AdapterFormatError(
                    f"{adapter.name}: layers '{other}' and '{p.layer.name}' both adapt "
                    f"'{p.key}'; the file mixes two layouts of the same module"
                )
        seen.setdefault(p.key, []).append((a, b, p.layer.name))


def _report(adapter: Adapter, plan: HostPlan, strict: bool, what: str) -> None:
    first = ", ".join(plan.unmatched[:5])
    msg = (
        f"{adapter.name}: {len(plan.unmatched)} of {len(plan.unmatched) + plan.matched} "
        f"layers match no weight of this {what} (first: {first})"
    )
    guess = guess_file(plan.unmatched)
    if guess is not None and not plan.matched:
        msg += f". It looks like {guess}: apply it to a model of that family"
    elif plan.layouts:
        layout = max(plan.layouts, key=plan.layouts.get)
        msg += f". Layout detected: {layout} ({plan.matched} layers matched)"
    if not plan.matched:
        raise AdapterFormatError(msg + "; it matches nothing, so applying it would do nothing.")
    if strict:
        raise AdapterFormatError(msg + "; pass strict=False to apply the layers that do match.")
    logger.warning("%s; skipping them.", msg)


def patched_weights(
    patches: Collection[HostPatch],
    weights: Mapping[str, torch.Tensor],
    strength: float,
) -> dict[str, torch.Tensor]:
    """The host weights with `patches` applied at `strength` (float32 copies of the touched
    keys), as a host applying them one by one would compute them. For tests and tools."""
    out: dict[str, torch.Tensor] = {}
    for p in patches:
        w = out.setdefault(p.key, weights[p.key].float().clone())
        part = w if p.offset is None else w.narrow(*p.offset)
        part += p.delta(part, strength)
    return out
