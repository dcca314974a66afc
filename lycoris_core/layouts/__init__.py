"""File and checkpoint layouts: key suffixes, name prefixes, and name maps derived from a model.

A foreign name (ldm UNet, BFL Flux, SAI SD3) maps to one or more :class:`Target` s: a module
of a pipeline component (dotted diffusers path), with a row slice for fused weights (qkv,
``linear1``) and a row transform (adaLN halves). The per-family map builders live one per
family (:mod:`.unet`, :mod:`.flux`, :mod:`.sd3`) and are referenced from the family registry
(``Family.name_map`` in :mod:`lycoris_core.families`). The facts come from ComfyUI's
``comfy/utils.py`` / ``comfy/lora.py`` and diffusers' ``loaders/lora_conversion_utils.py``;
the code derives every map from the model's own config.

The same maps serve weight conversion (single-file checkpoints): for a foreign tensor
``W`` and each target ``t``: ``ours(t.path) = apply_transform(t.transform, W[t.rows])``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .flux import bfl_flux_map
from .sd3 import sai_sd3_map
from .target import TRANSFORMS, Target, apply_transform
from .unet import ldm_unet_map

__all__ = [
    "TRANSFORMS",
    "Target",
    "apply_transform",
    "bfl_flux_map",
    "denoiser_name_map",
    "foreign_naming",
    "ldm_unet_map",
    "sai_sd3_map",
]


def denoiser_name_map(family: str, config: Mapping[str, Any]) -> dict[str, tuple[Target, ...]]:
    """Foreign dotted module name (no prefix) -> its diffusers targets, for `family`'s denoiser.

    `config` is the denoiser's config (``model.config``, or the dict a single-file loader
    builds). A family without a foreign naming (or unknown) gives an empty map.
    """
    from ..families import FAMILIES

    fam = FAMILIES.get(family)
    if fam is None or fam.name_map is None:
        return {}
    return fam.name_map(config)


def foreign_naming(family: str) -> str:
    """The name of `family`'s own (non-diffusers) naming: "ldm", "BFL", "SAI"."""
    from ..families import FAMILIES

    fam = FAMILIES.get(family)
    builder = None if fam is None else fam.name_map
    return {ldm_unet_map: "ldm", bfl_flux_map: "BFL", sai_sd3_map: "SAI"}.get(builder, "foreign")
