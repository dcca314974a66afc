"""Model families: a plain registry of what differs between SD1.x/2.x, SDXL, SD3 and Flux.

``FAMILIES`` maps a family name to a :class:`Family`; node combo lists are
``list(FAMILIES)``. :func:`detect_family` recognises a loaded pipeline; anything with a
``unet`` or ``transformer`` that is none of the known families is ``generic`` (sampling works,
training does not).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import ModelLoadError


@dataclass(frozen=True)
class Family:
    """What sampling and training need to know about a model family."""

    name: str
    label: str
    denoiser: str  # pipeline attribute holding the denoiser: "unet" or "transformer"
    pipelines: tuple[str, ...]  # diffusers pipeline class names of this family
    denoiser_classes: tuple[str, ...]
    target_modules: tuple[str, ...]  # default LyCORIS targets for training
    patch: int  # latent pixels per token side (Flux packs 2x2, SD3 patchifies by 2)
    packed_latents: bool  # Flux: latents are packed 2x2 into tokens
    steps: int  # default sampler settings
    guidance: float
    negative_prompt: bool  # whether the pipeline uses a negative prompt
    trainable: bool = True

    def size_multiple(self, vae_scale_factor: int) -> int:
        """Width/height must be a multiple of this (pixels)."""
        return vae_scale_factor * self.patch


FAMILIES: dict[str, Family] = {
    "sd15": Family(
        name="sd15",
        label="Stable Diffusion 1.x/2.x",
        denoiser="unet",
        pipelines=("StableDiffusionPipeline",),
        denoiser_classes=("UNet2DConditionModel",),
        target_modules=("Attention", "FeedForward"),
        patch=1,
        packed_latents=False,
        steps=25,
        guidance=7.5,
        negative_prompt=True,
    ),
    "sdxl": Family(
        name="sdxl",
        label="Stable Diffusion XL",
        denoiser="unet",
        pipelines=("StableDiffusionXLPipeline",),
        denoiser_classes=("UNet2DConditionModel",),
        target_modules=("Attention", "FeedForward"),
        patch=1,
        packed_latents=False,
        steps=30,
        guidance=5.0,
        negative_prompt=True,
    ),
    "sd3": Family(
        name="sd3",
        label="Stable Diffusion 3/3.5",
        denoiser="transformer",
        pipelines=("StableDiffusion3Pipeline",),
        denoiser_classes=("SD3Transformer2DModel",),
        target_modules=("Attention", "FeedForward"),
        patch=2,
        packed_latents=False,
        steps=28,
        guidance=7.0,
        negative_prompt=True,
    ),
    "flux": Family(
        name="flux",
        label="FLUX.1 (dev/schnell layout)",
        denoiser="transformer",
        pipelines=("FluxPipeline",),
        denoiser_classes=("FluxTransformer2DModel",),
        target_modules=("Attention", "FeedForward"),
        patch=2,
        packed_latents=True,
        steps=28,
        guidance=3.5,
        negative_prompt=False,
    ),
}

GENERIC = Family(
    name="generic",
    label="other diffusers pipeline",
    denoiser="transformer",
    pipelines=(),
    denoiser_classes=(),
    target_modules=(),
    patch=1,
    packed_latents=False,
    steps=30,
    guidance=5.0,
    negative_prompt=True,
    trainable=False,
)


def family_for_pipeline_class(class_name: str) -> Family | None:
    """The family whose pipelines include `class_name`, if any."""
    for family in FAMILIES.values():
        if class_name in family.pipelines:
            return family
    return None


def detect_family(pipe: Any) -> Family:
    """The family of a loaded pipeline (``generic`` for other unet/transformer pipelines)."""
    family = family_for_pipeline_class(type(pipe).__name__)
    if family is not None:
        denoiser = getattr(pipe, family.denoiser, None)
        if denoiser is None or type(denoiser).__name__ not in family.denoiser_classes:
            raise ModelLoadError(
                f"{type(pipe).__name__} should have a {family.denoiser} of class "
                f"{' or '.join(family.denoiser_classes)}, found "
                f"{type(denoiser).__name__ if denoiser is not None else 'none'}"
            )
        return family
    for attr in ("transformer", "unet"):
        if getattr(pipe, attr, None) is not None:
            return Family(**{**GENERIC.__dict__, "denoiser": attr})
    raise ModelLoadError(
        f"{type(pipe).__name__} has no 'unet' or 'transformer'; it is not a diffusion model "
        "pipeline this tool can sample or adapt"
    )


def require_trainable(family: Family) -> None:
    if not family.trainable:
        raise ModelLoadError(
            f"family '{family.name}' ({family.label}) is not supported for training; "
            f"supported: {', '.join(FAMILIES)}"
        )
