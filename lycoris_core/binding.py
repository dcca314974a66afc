"""Bind an adapter file's layers to the modules of one model component.

Each file layer gets one or more :class:`~lycoris_core.layouts.Target` s: its diffusers module,
or, for a foreign fused layer (Flux ``qkv``/``linear1``, SD3 ``qkv``), several modules with the
row slice each occupies, and the adaLN half swap. Names are looked up dotted, or with
``.`` -> ``_`` against an index of the model's diffusers paths and its family's foreign names
(:mod:`lycoris_core.layouts.names`). Layers of other components (text encoders) are set
aside, not counted as unmatched, when the caller applies those components itself.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from .errors import AdapterFormatError
from .layouts import Target, denoiser_name_map, foreign_naming
from .layouts.keys import LORA_DOWN
from .layouts.names import (
    DENOISER,
    Hit,
    NameIndex,
    describe_model,
    family_of,
    guess_file,
    module_index,
    text_component,
)
from .quantization import weight_like, weight_shape

if TYPE_CHECKING:
    from .adapters import Adapter, LayerAdapter

logger = logging.getLogger(__name__)


@dataclass
class Binding(Mapping):
    """Which file layers go where in one component, and what the file looked like.

    As a mapping: module path -> the layer adapting it (fused layers under each path).
    """

    component: str
    model: str  # "an SDXL UNet", ...
    targets: dict[str, tuple[Target, ...]] = field(default_factory=dict)
    # as applied (conv factors reshaped by conform_conv_factors)
    layers: dict[str, LayerAdapter] = field(default_factory=dict)
    layouts: dict[str, int] = field(default_factory=dict)  # detected layout -> layers
    unmatched: list[str] = field(default_factory=list)
    elsewhere: dict[str, list[str]] = field(default_factory=dict)  # component -> layer names
    problem: str | None = None  # what is wrong with the unmatched layers (report mode)

    @property
    def layout(self) -> str | None:
        """The layout most matched layers use."""
        return max(self.layouts, key=self.layouts.get) if self.layouts else None

    def paths(self) -> dict[str, LayerAdapter]:
        """Module path -> the layer adapting it (fused layers appear under each path)."""
        return {t.path: self.layers[n] for n, ts in self.targets.items() for t in ts}

    def __getitem__(self, path: str) -> LayerAdapter:
        return self.paths()[path]

    def __iter__(self) -> Iterator[str]:
        return iter(self.paths())

    def __len__(self) -> int:
        return sum(len(ts) for ts in self.targets.values())


def component_index(module: nn.Module, component: str, family: str | None) -> NameIndex:
    """The names `module` answers to (its diffusers paths, and its family's foreign names
    when it is the denoiser)."""
    if component == DENOISER and family is not None:
        cfg = getattr(module, "config", None)
        if cfg is not None:
            foreign = denoiser_name_map(family, dict(cfg))
            return module_index(module, component, foreign, foreign_naming(family))
        return module_index(module, component)
    return module_index(module, component, text_model_aliases(module, component), "diffusers")


def text_model_aliases(module: nn.Module, component: str) -> dict[str, tuple[Target, ...]]:
    """CLIP paths with and without the ``text_model.`` level: transformers 5's
    ``CLIPTextModel`` lacks it while files (and ``CLIPTextModelWithProjection``) have it."""
    if not type(module).__name__.startswith("CLIP"):
        return {}
    has_level = isinstance(getattr(module, "text_model", None), nn.Module)
    out = {}
    for path, _ in module.named_modules():
        if not path:
            continue
        if has_level and path.startswith("text_model."):
            out[path[len("text_model.") :]] = (Target(component, path),)
        elif not has_level:
            out["text_model." + path] = (Target(component, path),)
    return out


def bind_component(
    adapter: Adapter,
    module: nn.Module,
    *,
    component: str = DENOISER,
    family: str | None = None,
    strict: bool | None = True,
    elsewhere: Collection[str] = (),
    index: NameIndex | None = None,
) -> Binding:
    """Bind `adapter`'s layers of `component` to `module`.

    `family` defaults to the one `module`'s class belongs to. Layers whose prefix names
    another component listed in `elsewhere` are set aside; every other layer matching
    nothing is unmatched: :class:`AdapterFormatError` (counts, the layout detected, the fix),
    or with ``strict=False`` one summarised warning (an error still when nothing matches).
    ``strict=None`` only reports: the message goes to ``Binding.problem``.
    """
    family = family if family is not None else family_of(module)
    index = index if index is not None else component_index(module, component, family)
    out = Binding(component, describe_model(module) if component == DENOISER else component)
    owner: dict[str, str] = {}
    text_layers = 0
    for name, layer in adapter.layers.items():
        text = text_component(name, family)
        if text is not None and text[0] != component:
            if text[0] in elsewhere:
                out.elsewhere.setdefault(text[0], []).append(name)
                continue
            text_layers += 1
        if component != DENOISER:
            if text is None or text[0] != component:
                continue  # the denoiser's, or another encoder's: not ours
            hit = _lookup(adapter, index, text[1], ("",), name)
            if hit is not None:
                hit.prefix = name[: len(name) - len(text[1])]
        else:
            hit = _lookup(adapter, index, name, adapter.prefixes, name)
        if hit is None:
            out.unmatched.append(name)
            continue
        view = _check_fits(adapter.name, layer, module, hit.targets)
        for t in hit.targets:
            if t.path in owner:
                raise AdapterFormatError(
                    f"{adapter.name}: layers '{owner[t.path]}' and '{name}' both adapt "
                    f"'{t.path}'; the file mixes two layouts of the same module"
                )
            owner[t.path] = name
        out.targets[name] = hit.targets
        out.layers[name] = view
        out.layouts[hit.layout] = out.layouts.get(hit.layout, 0) + 1
    if out.unmatched:
        _report_unmatched(adapter, module, out, strict, text_layers)
    return out


def _lookup(
    adapter: Adapter, index: NameIndex, name: str, prefixes: tuple[str, ...], label: str
) -> Hit | None:
    try:
        return index.lookup(name, prefixes)
    except ValueError:
        raise AdapterFormatError(
            f"{adapter.name}: layer '{label}' maps to more than one module of this model "
            "(the '.'->'_' naming is ambiguous here)"
        ) from None


def _report_unmatched(
    adapter: Adapter, module: nn.Module, out: Binding, strict: bool | None, text_layers: int
) -> None:
    relevant = len(out.unmatched) + len(out.targets)
    first = ", ".join(out.unmatched[:5])
    what = out.model if out.component == DENOISER else f"{out.component} ({type(module).__name__})"
    msg = (
        f"{adapter.name}: {len(out.unmatched)} of {relevant} layers match no module of "
        f"this {type(module).__name__} (first: {first})"
    )
    guess = guess_file(out.unmatched)
    if guess is not None and not out.targets:
        msg += f". It looks like {guess}; this model is {what}: apply it to a model of that family"
    elif out.layout is not None:
        msg += f". Layout detected: {out.layout} ({len(out.targets)} layers matched)"
    else:
        msg += (
            ". Their names follow no layout this model answers to (its diffusers paths, "
            "dotted or with a lycoris_/lora_unet_/lora_transformer_ prefix, or its own "
            f"{'ldm/BFL/SAI' if out.component == DENOISER else 'module'} names): the file was "
            "probably made for another model or architecture"
        )
    if text_layers:
        msg += (
            f"; {text_layers} of them are text-encoder layers, which apply to a pipeline's "
            "text encoders, not to its denoiser"
        )
    if not out.targets:
        msg += "; it matches 0 modules, so applying it would do nothing."
    elif strict is not False:
        msg += "; pass strict=False to apply the layers that do match."
    if strict is None:
        out.problem = msg
    elif strict or not out.targets:
        raise AdapterFormatError(msg)
    else:
        logger.warning("%s; skipping them.", msg)


# --------------------------------------------------------------------------- shape checks


def _check_fits(
    name: str, layer: LayerAdapter, module: nn.Module, targets: tuple[Target, ...]
) -> LayerAdapter:
    """Check that `layer` fits its targets; returns the layer as it will be applied."""
    mods = []
    for t in targets:
        try:
            mod = module.get_submodule(t.path)
        except AttributeError:
            raise AdapterFormatError(
                f"{name}: layer '{layer.name}' maps to '{t.path}', which this model lacks; "
                "its config and its modules disagree"
            ) from None
        if not isinstance(getattr(mod, "weight", None), torch.Tensor):
            raise AdapterFormatError(
                f"{name}: layer '{layer.name}' targets '{t.path}' ({type(mod).__name__}), which "
                "has no weight to adapt"
            )
        if not isinstance(mod, layer.algorithm.targets):
            raise AdapterFormatError(
                f"{name}: layer '{layer.name}' ({layer.algo}) cannot adapt '{t.path}' "
                f"({type(mod).__name__})"
            )
        mods.append(mod)
    where = " + ".join(str(t) for t in targets)
    plain = len(targets) == 1 and targets[0].plain
    weight = weight_like(mods[0]) if plain else _fused_shape(name, layer, targets, mods)
    got = layer.algorithm.mismatch(layer, weight)
    if got is not None:
        kind = "weight" if plain else "fused weight"
        raise AdapterFormatError(
            f"{name}: layer '{layer.name}' ({layer.algo}, {got}) does not fit '{where}' ({kind} "
            f"shape {tuple(weight.shape)}); the file was made for another model or size"
        )
    return conform_conv_factors(layer, mods[0]) if len(mods) == 1 else layer


def _fused_shape(
    name: str, layer: LayerAdapter, targets: tuple[Target, ...], mods: list[nn.Module]
) -> torch.Tensor:
    """A meta tensor of the reassembled (foreign) weight's shape, after checking the rows."""
    shapes = [tuple(weight_shape(m)) for m in mods]
    if len(mods) > 1 and not all(isinstance(m, nn.Linear) for m in mods):
        raise AdapterFormatError(
            f"{name}: layer '{layer.name}' is fused over non-Linear modules; not supported"
        )
    if len({s[1:] for s in shapes}) != 1:
        raise AdapterFormatError(
            f"{name}: layer '{layer.name}' is fused over modules of different input widths "
            f"{[s[1:] for s in shapes]}"
        )
    start = 0
    for t, shape in zip(targets, shapes, strict=True):
        rows = t.rows or (start, start + shape[0])
        if rows != (start, start + shape[0]):
            raise AdapterFormatError(
                f"{name}: layer '{layer.name}': '{t.path}' has {shape[0]} rows, the name map "
                f"expects rows {rows[0]}:{rows[1]}; the model's config disagrees with its weights"
            )
        if t.transform == "swap_halves" and shape[0] % 2:
            raise AdapterFormatError(f"{name}: '{t.path}' has an odd number of rows to swap")
        start = rows[1]
    return torch.empty((start, *shapes[0][1:]), device="meta")


def conform_conv_factors(layer: LayerAdapter, mod: nn.Module) -> LayerAdapter:
    """`layer` with its LoRA down factor shaped like the kernel of `mod`'s conv weight.

    ComfyUI's trainer saves a conv LoRA's down factor 2-D (``[r, in*kh*kw]``); reshaped to
    ``[r, in, kh, kw]`` dynamic mode can run it as a convolution. Any other layer (no 2-D
    down factor, a Linear target, sizes that do not match) is returned as it is. `mod` needs
    only a ``weight`` (a meta tensor will do); :mod:`.host_patches` uses it for host models.
    """
    down = layer.tensors.get(LORA_DOWN)
    weight = weight_like(mod)
    if down is None or down.dim() != 2 or weight.dim() <= 2:
        return layer
    if down.shape[1] != math.prod(weight.shape[1:]):
        return layer
    from .adapters import LayerAdapter

    tensors = dict(layer.tensors)
    tensors[LORA_DOWN] = down.reshape(down.shape[0], *weight.shape[1:])
    return LayerAdapter(layer.name, layer.algo, tensors, layer.options)
