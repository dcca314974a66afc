"""Nodes for ComfyUI's own models: apply a LyCORIS adapter to a ``MODEL`` and a ``CLIP``."""

from __future__ import annotations

import logging
from typing import Any

from ..lycoris_core import Adapter
from ..lycoris_core.host_config import family_of_keys
from ..lycoris_core.host_patches import DENOISER_PREFIX, plan_patches
from ..lycoris_core.host_text import plan_text_patches
from . import _host
from .handles import ADAPTER, LycorisNode

logger = logging.getLogger(__name__)


def _strength(tooltip: str) -> tuple[str, dict[str, Any]]:
    return (
        "FLOAT",
        {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01, "tooltip": tooltip},
    )


class ApplyLycorisComfy(LycorisNode):
    DESCRIPTION = (
        "Apply a LyCORIS adapter (any algorithm: LoRA, LoHa, LoKr, DoRA, OFT, BOFT, IA3, "
        "T-LoRA, DyLoRA, GLoRA, full) to ComfyUI's own MODEL and CLIP, e.g. from Load "
        "Checkpoint, exactly as lycoris' own forward at that strength. Returns patched clones "
        "(ComfyUI's patch mechanism and memory management), so KSampler and every other node "
        "use them. Files in any layout: ours, kohya/ldm, BFL/SAI, diffusers/PEFT."
    )
    RETURN_TYPES = ("MODEL", "CLIP")
    RETURN_NAMES = ("model", "clip")
    OUTPUT_TOOLTIPS = (
        "The model with the adapter's denoiser layers patched in.",
        "The CLIP with the adapter's text-encoder layers patched in.",
    )

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "A ComfyUI model (Load Checkpoint, UNet loader)."}),
                "clip": ("CLIP", {"tooltip": "Its CLIP (text encoders)."}),
                "adapter": (ADAPTER, {"tooltip": "The adapter, from Load LyCORIS or Train."}),
                "strength_model": _strength(
                    "Strength on the denoiser (lycoris' multiplier); 0 = off."
                ),
                "strength_clip": _strength("Strength on the text encoders; 0 = off."),
            }
        }

    def run(
        self,
        model: Any,
        clip: Any,
        adapter: Adapter,
        strength_model: float,
        strength_clip: float,
    ) -> tuple[Any, Any]:
        shapes = _host.state_shapes(model)
        family = family_of_keys(
            {
                k[len(DENOISER_PREFIX) :]: v
                for k, v in shapes.items()
                if k.startswith(DENOISER_PREFIX)
            }
        )
        plan = plan_patches(adapter, shapes, family)
        new_model = model
        if strength_model != 0 and plan.patches:
            new_model, _ = _host.patched_clone(model, plan.as_dict(), strength_model)
        new_clip = clip
        if plan.elsewhere and clip is not None:
            text = plan_text_patches(adapter, _host.state_shapes(clip), family or "sdxl")
            if strength_clip != 0 and text.patches:
                new_clip, _ = _host.patched_clone(clip, text.as_dict(), strength_clip)
        return new_model, new_clip
