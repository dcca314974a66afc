"""Layer names of adapter files: prefixes, which component a name belongs to, and an index of
the names a model answers to (its diffusers paths and its family's foreign names).

Facts (from ComfyUI's ``comfy/lora.py`` ``model_lora_keys_unet/clip`` and diffusers'
``loaders/lora_conversion_utils.py``): denoiser layers come as a prefix plus a module name,
either dotted (``unet.``, ``transformer.``, ``diffusion_model.``, ``base_model.model.``, none)
or with ``.`` -> ``_`` (``lycoris_``, ``lora_unet_``, ``lora_transformer_``); the module name is
the diffusers path or the original one (ldm / BFL / SAI). Text-encoder layers carry
``lora_te_``, ``lora_te1_``..``lora_te3_`` (kohya), ``text_encoder.``/``text_encoder_2.``
(diffusers) or ``text_encoders.<clip_l|clip_g|t5xxl>.transformer.`` (ComfyUI).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .target import Target

DENOISER = "denoiser"

DOTTED_PREFIXES: tuple[str, ...] = (
    "model.diffusion_model.",
    "diffusion_model.",
    "base_model.model.",
    "unet.",
    "transformer.",
    "",
)
FLAT_PREFIXES: tuple[str, ...] = ("lycoris", "lora_unet", "lora_transformer", "lora")

# text-encoder prefixes -> the encoder they name (kohya index, diffusers attribute, ComfyUI)
_TEXT_PREFIX = re.compile(
    r"^(?:lora_(?P<te>te[1-3]?)_"
    r"|(?P<attr>text_encoder(?:_[23])?)\."
    r"|text_encoders\.(?P<comfy>clip_l|clip_g|t5xxl)\.transformer\.)"
)
# per family: kohya/ComfyUI encoder name -> pipeline attribute
_TEXT_ENCODERS: dict[str, dict[str, str]] = {
    "sd15": {"te": "text_encoder", "te1": "text_encoder", "clip_l": "text_encoder"},
    "sdxl": {
        "te": "text_encoder",
        "te1": "text_encoder",
        "te2": "text_encoder_2",
        "clip_l": "text_encoder",
        "clip_g": "text_encoder_2",
    },
    "sd3": {
        "te1": "text_encoder",
        "te2": "text_encoder_2",
        "te3": "text_encoder_3",
        "clip_l": "text_encoder",
        "clip_g": "text_encoder_2",
        "t5xxl": "text_encoder_3",
    },
    "flux": {
        "te": "text_encoder",
        "te1": "text_encoder",
        "te2": "text_encoder_2",
        "te3": "text_encoder_2",
        "clip_l": "text_encoder",
        "t5xxl": "text_encoder_2",
    },
}


def text_component(name: str, family: str | None) -> tuple[str, str, bool] | None:
    """``(pipeline attribute, module name without prefix, dotted)`` of a text-encoder layer
    name, or None when `name` is not one. Unknown families use the SDXL numbering."""
    m = _TEXT_PREFIX.match(name)
    if m is None:
        return None
    key = m.group("te") or m.group("comfy")
    rest = name[m.end() :]
    if key is None:
        return m.group("attr"), rest, True
    table = _TEXT_ENCODERS.get(family or "", _TEXT_ENCODERS["sdxl"])
    attr = table.get(key, f"<{key}>")  # an encoder this family does not have
    return attr, rest, m.group("comfy") is not None


def _old_processor(rest: str) -> str:
    """diffusers' old attention-processor names: ``attn1.processor.to_q`` = ``attn1.to_q``,
    ``processor.to_out`` = ``to_out.0``."""
    if ".processor." not in rest:
        return rest
    rest = rest.replace(".processor.", ".")
    return rest + ".0" if rest.endswith(".to_out") else rest


@dataclass
class Hit:
    targets: tuple[Target, ...]
    naming: str  # "diffusers" or the family's foreign naming ("ldm", "BFL", "SAI")
    prefix: str
    dotted: bool

    @property
    def layout(self) -> str:
        how = "dotted" if self.dotted else "'.'->'_'"
        where = f"prefix '{self.prefix}'" if self.prefix else "no prefix"
        return f"{self.naming} names, {how}, {where}"


@dataclass
class NameIndex:
    """The names one component of a model answers to, dotted and with ``.`` -> ``_``."""

    component: str
    dotted: dict[str, tuple[tuple[Target, ...], str]] = field(default_factory=dict)
    flat: dict[str, tuple[tuple[Target, ...], str]] = field(default_factory=dict)
    clashes: set[str] = field(default_factory=set)

    def add(self, name: str, targets: tuple[Target, ...], naming: str) -> None:
        self.dotted.setdefault(name, (targets, naming))
        flat = name.replace(".", "_")
        seen = self.flat.get(flat)
        if seen is not None and seen[0] != targets:
            self.clashes.add(flat)
        self.flat.setdefault(flat, (targets, naming))

    def lookup(self, name: str, flat_prefixes: Iterable[str]) -> Hit | None:
        """The targets of a file's layer name (prefix included), or None.

        Raises ValueError for a ``.``->``_`` name that stands for several modules."""
        if "." in name:
            for prefix in DOTTED_PREFIXES:
                if name.startswith(prefix):
                    entry = self.dotted.get(_old_processor(name[len(prefix) :]))
                    if entry is not None:
                        return Hit(entry[0], entry[1], prefix, True)
        for prefix in flat_prefixes:
            start = prefix + "_" if prefix else ""
            if name.startswith(start):
                rest = name[len(start) :]
                if rest in self.clashes:
                    raise ValueError(rest)
                entry = self.flat.get(rest)
                if entry is not None:
                    return Hit(entry[0], entry[1], start, False)
        return None


def module_index(
    module: nn.Module,
    component: str = DENOISER,
    foreign: Mapping[str, tuple[Target, ...]] | None = None,
    naming: str = "foreign",
) -> NameIndex:
    """The index of `module`'s diffusers paths plus the `foreign` names of its family."""
    index = NameIndex(component)
    for path, _ in module.named_modules():
        if path:
            index.add(path, (Target(component, path),), "diffusers")
    for name, targets in (foreign or {}).items():
        index.add(name, targets, naming)
    return index


# --------------------------------------------------------------------------- what a file is

_SIGNS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("a BFL-layout Flux file", ("double_blocks", "single_blocks")),
    ("an SAI-layout SD3 file", ("joint_blocks",)),
    ("an ldm-layout SD1.x/SDXL UNet file", ("input_blocks", "output_blocks", "middle_block")),
    ("a diffusers-layout Flux file", ("single_transformer_blocks",)),
    ("a diffusers-layout SD1.x/SDXL UNet file", ("down_blocks", "up_blocks", "mid_block")),
    ("a diffusers-layout SD3/Flux transformer file", ("transformer_blocks", "context_embedder")),
)


def guess_file(names: Iterable[str]) -> str | None:
    """What most of these layer names look like ("a BFL-layout Flux file"), or None."""
    names = list(names)
    counts = dict.fromkeys([label for label, _ in _SIGNS], 0)
    for name in names:
        for label, signs in _SIGNS:
            if any(s in name for s in signs):
                counts[label] += 1
                break
    label, n = max(counts.items(), key=lambda kv: kv[1])
    if not n:
        return None
    if label.startswith("an ldm") and _looks_sdxl(names):
        label = "an ldm-layout SDXL UNet file"
    return label


def _looks_sdxl(names: list[str]) -> bool:
    signs = ("label_emb", "transformer_blocks_1_", "transformer_blocks.1.", "lora_te2_")
    return any(s in n for n in names for s in signs)


def family_of(module: nn.Module) -> str | None:
    """The registered family whose denoiser class `module` is (SD1.x and SDXL share a UNet
    class and a name map; the config tells them apart), or None."""
    from ..families import FAMILIES

    kind = type(module).__name__
    if kind == "UNet2DConditionModel":
        cfg: Any = getattr(module, "config", None)
        return "sdxl" if getattr(cfg, "addition_embed_type", None) == "text_time" else "sd15"
    for family in FAMILIES.values():
        if kind in family.denoiser_classes:
            return family.name
    return None


def describe_model(module: nn.Module) -> str:
    """'an SDXL UNet', 'a Flux transformer', ... (the class name for anything else)."""
    kind = type(module).__name__
    cfg: Any = getattr(module, "config", None)
    if kind == "UNet2DConditionModel":
        sdxl = getattr(cfg, "addition_embed_type", None) == "text_time"
        return "an SDXL UNet" if sdxl else "an SD1.x/2.x UNet"
    return {
        "FluxTransformer2DModel": "a Flux transformer",
        "SD3Transformer2DModel": "an SD3 transformer",
    }.get(kind, f"a {kind}")
