"""Model families: a plain registry of what differs between SD1.x/2.x, SDXL, SD3 and Flux.

``FAMILIES`` maps a family name to a :class:`Family`; node combo lists are
``list(FAMILIES)``. :func:`detect_family` recognises a loaded pipeline; anything with a
``unet`` or ``transformer`` that is none of the known families is ``generic`` (sampling works,
training does not).

The training objective's per-family parts live here too (the objective itself, in
``training/objectives.py``, names no family): whether the family trains by rectified flow or
DDPM noise, how its pipeline encodes captions (``encode_text``) and how its denoiser is called
on a noisy batch (``predict``: SDXL's size/crop time ids, SD3's timestep scale, Flux's 2x2
packing, position ids and guidance input).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import ModelLoadError
from .layouts import bfl_flux_map, ldm_unet_map, sai_sd3_map

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class DenoiserCall:
    """What a family's ``predict`` needs besides the batch: how to run the denoiser."""

    forward: Callable[..., Any]  # the denoiser, or its DDP wrapper when distributed
    dtype: torch.dtype  # the denoiser's weights dtype (inputs are cast to it)
    device: torch.device
    vae_scale: int  # pixels per latent side
    guidance: float | None  # Flux guidance input; None when the model takes none


TextEncoder = Callable[[Any, list[str], Any, "int | None"], dict[str, "torch.Tensor"]]
NameMap = Callable[[Any], dict[str, tuple[Any, ...]]]
Predictor = Callable[
    [DenoiserCall, "torch.Tensor", "torch.Tensor", "torch.Tensor", dict[str, "torch.Tensor"]],
    tuple["torch.Tensor", "torch.Tensor"],
]


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
    flow_matching: bool = False  # training by rectified flow (else DDPM noise)
    # (pipe, captions, device, max_sequence_length) -> text conditioning, batch first
    encode_text: TextEncoder | None = None
    # (call, noisy, target, timesteps or sigmas, cond) -> (prediction, target in its layout)
    predict: Predictor | None = None
    # denoiser config -> {foreign (ldm/BFL/SAI) module name: targets}; see lycoris_core.layouts
    name_map: NameMap | None = None

    def size_multiple(self, vae_scale_factor: int) -> int:
        """Width/height must be a multiple of this (pixels)."""
        return vae_scale_factor * self.patch


# --------------------------------------------------------------------------- training parts


def _clip_text(pipe: Any, captions: list[str], device: Any, max_len: int | None) -> dict:
    embeds = pipe.encode_prompt(captions, device, 1, False)[0]
    return {"prompt_embeds": embeds.float()}


def _sdxl_text(pipe: Any, captions: list[str], device: Any, max_len: int | None) -> dict:
    embeds, _, pooled, _ = pipe.encode_prompt(
        prompt=captions, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False
    )
    return {"prompt_embeds": embeds.float(), "pooled": pooled.float()}


def _sd3_text(pipe: Any, captions: list[str], device: Any, max_len: int | None) -> dict:
    kw = {} if max_len is None else {"max_sequence_length": max_len}
    embeds, _, pooled, _ = pipe.encode_prompt(
        prompt=captions,
        prompt_2=None,
        prompt_3=None,
        device=device,
        num_images_per_prompt=1,
        do_classifier_free_guidance=False,
        **kw,
    )
    return {"prompt_embeds": embeds.float(), "pooled": pooled.float()}


def _flux_text(pipe: Any, captions: list[str], device: Any, max_len: int | None) -> dict:
    kw = {} if max_len is None else {"max_sequence_length": max_len}
    embeds, pooled, _ = pipe.encode_prompt(
        prompt=captions, prompt_2=None, device=device, num_images_per_prompt=1, **kw
    )
    return {"prompt_embeds": embeds.float(), "pooled": pooled.float()}


def _unet_predict(call: DenoiserCall, noisy, target, t, cond, added=None) -> tuple:
    kwargs: dict[str, Any] = {"encoder_hidden_states": cond["prompt_embeds"].to(call.dtype)}
    if added is not None:
        kwargs["added_cond_kwargs"] = added
    pred = call.forward(noisy.to(call.dtype), t, return_dict=False, **kwargs)[0].float()
    return pred, target


def _sdxl_predict(call: DenoiserCall, noisy, target, t, cond) -> tuple:
    """SDXL's added conditioning: the pooled text and (size, crop, target size) time ids."""
    import torch

    b = noisy.shape[0]
    h, w = noisy.shape[-2] * call.vae_scale, noisy.shape[-1] * call.vae_scale
    time_ids = torch.tensor([[h, w, 0, 0, h, w]], device=call.device).repeat(b, 1)
    added = {"text_embeds": cond["pooled"].to(call.dtype), "time_ids": time_ids.to(call.dtype)}
    return _unet_predict(call, noisy, target, t, cond, added)


def _sd3_predict(call: DenoiserCall, noisy, target, sigmas, cond) -> tuple:
    pred = call.forward(
        hidden_states=noisy.to(call.dtype),
        timestep=sigmas * 1000,
        encoder_hidden_states=cond["prompt_embeds"].to(call.dtype),
        pooled_projections=cond["pooled"].to(call.dtype),
        return_dict=False,
    )[0].float()
    return pred, target


def _flux_predict(call: DenoiserCall, noisy, target, sigmas, cond) -> tuple:
    """Flux: latents packed 2x2 into tokens with position ids; the target packed alike."""
    import torch
    from diffusers import FluxPipeline

    b, c, h, w = noisy.shape
    dtype, device = call.dtype, call.device
    embeds = cond["prompt_embeds"].to(dtype)
    packed = FluxPipeline._pack_latents(noisy, b, c, h, w)
    img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, device, dtype)
    txt_ids = torch.zeros(embeds.shape[1], 3, device=device, dtype=dtype)
    guidance = None
    if call.guidance is not None:
        guidance = torch.full((b,), call.guidance, device=device)
    pred = call.forward(
        hidden_states=packed.to(dtype),
        timestep=sigmas,
        guidance=guidance,
        pooled_projections=cond["pooled"].to(dtype),
        encoder_hidden_states=embeds,
        txt_ids=txt_ids,
        img_ids=img_ids,
        return_dict=False,
    )[0].float()
    return pred, FluxPipeline._pack_latents(target, b, c, h, w)


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
        encode_text=_clip_text,
        predict=_unet_predict,
        name_map=ldm_unet_map,
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
        encode_text=_sdxl_text,
        predict=_sdxl_predict,
        name_map=ldm_unet_map,
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
        flow_matching=True,
        encode_text=_sd3_text,
        predict=_sd3_predict,
        name_map=sai_sd3_map,
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
        flow_matching=True,
        encode_text=_flux_text,
        predict=_flux_predict,
        name_map=bfl_flux_map,
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
