"""What a file holds, from its tensor names and shapes (header only).

:func:`classify` names the kind of one file (a full checkpoint of a family, a denoiser, a VAE,
a text encoder, an adapter); :func:`denoiser_variant` tells variants apart:

* ldm UNet with ``label_emb`` (added conditioning): SDXL; its input of ``pooled + 6 * 256``
  (2816) is the base, ``pooled + 5 * 256`` (2560, aesthetic score instead of the target size)
  the refiner; a checkpoint tells them by its text encoders too (the refiner has only CLIP-G
  as ``conditioner.embedders.0.model``).
* ldm UNet without it: SD2.x when the cross-attention context is 1024 wide (OpenCLIP ViT-H) or
  the text encoder is OpenCLIP (``cond_stage_model.model.``); SD1.x otherwise (768, CLIP-L in
  ``cond_stage_model.transformer.``). SD2 prediction type: see ``facts.SD2_DEFAULT_PREDICTION``.
* SAI MMDiT: SD3.5 when it has qk-norm (``attn.ln_q``); 3.5 medium when some blocks carry a
  second attention (``attn2``, MMDiT-X), else large; SD3 medium without qk-norm.
* BFL Flux: dev (guidance-distilled) with ``guidance_in``, schnell without.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ModelLoadError
from .header import Header

UNET = "model.diffusion_model."
VAE = "first_stage_model."
SD1_CLIP = "cond_stage_model.transformer."
SD2_CLIP = "cond_stage_model.model."
SDXL_CLIP_L = "conditioner.embedders.0.transformer."
SDXL_CLIP_G = "conditioner.embedders.1.model."
REFINER_CLIP_G = "conditioner.embedders.0.model."
SD3_TE = {
    "clip_l": "text_encoders.clip_l.transformer.",
    "clip_g": "text_encoders.clip_g.transformer.",
    "t5xxl": "text_encoders.t5xxl.transformer.",
}

_ADAPTER_MARKS = (
    ".lora_down.",
    ".lora_up.",
    ".lora_A.",
    ".lora_B.",
    ".hada_w1_a",
    ".lokr_w1",
    ".oft_blocks",
    ".oft_diag",
    "lora_unet_",
    "lora_te_",
    ".dora_scale",
    ".diff_b",
)


@dataclass(frozen=True)
class Part:
    """One component in one file: its names start with `prefix` and follow `layout`."""

    header: Header
    prefix: str
    layout: str  # ldm_unet, ldm_vae, hf_clip, open_clip, t5, sai_mmdit, bfl_flux

    def shapes(self) -> dict[str, tuple[int, ...]]:
        n = len(self.prefix)
        return {k[n:]: v.shape for k, v in self.header.tensors.items() if k.startswith(self.prefix)}

    @property
    def name(self) -> str:
        return self.header.path.name


@dataclass(frozen=True)
class FileKind:
    kind: str  # checkpoint, denoiser, vae, clip, t5
    family: str | None  # for checkpoints and denoisers
    parts: dict[str, Part]  # slot -> part (slots: denoiser, vae, clip_l, clip_g, t5xxl)


def _is_adapter(h: Header) -> bool:
    keys = h.keys()
    marks = sum(1 for k in keys if any(m in k for m in _ADAPTER_MARKS))
    return marks > 0 and marks >= len(keys) // 4


def _clip_part(h: Header, prefix: str) -> Part | None:
    if h.has(prefix + "text_model.embeddings.token_embedding.weight"):
        return Part(h, prefix, "hf_clip")
    if h.has(prefix + "embeddings.token_embedding.weight"):  # transformers 5 CLIPTextModel
        return Part(h, prefix, "hf_clip")
    if h.has(prefix + "token_embedding.weight") and h.with_prefix(
        prefix + "transformer.resblocks."
    ):
        return Part(h, prefix, "open_clip")
    return None


def _checkpoint(h: Header) -> FileKind | None:
    parts: dict[str, Part] = {}
    if h.with_prefix(VAE):
        parts["vae"] = Part(h, VAE, "ldm_vae")
    mmdit = h.with_prefix(UNET + "joint_blocks.")
    if mmdit or h.with_prefix(UNET + "double_blocks."):  # SD3, or Flux saved by ComfyUI
        parts["denoiser"] = Part(h, UNET, "sai_mmdit" if mmdit else "bfl_flux")
        for slot, prefix in SD3_TE.items():
            if slot == "t5xxl" and h.with_prefix(prefix + "encoder."):
                parts[slot] = Part(h, prefix, "t5")
            elif slot != "t5xxl" and (part := _clip_part(h, prefix)):
                parts[slot] = part
        return FileKind("checkpoint", "sd3" if mmdit else "flux", parts)
    if not h.with_prefix(UNET + "input_blocks."):
        return None
    parts["denoiser"] = Part(h, UNET, "ldm_unet")
    for slot, prefix in (
        ("clip_l", SD1_CLIP),
        ("clip_l", SDXL_CLIP_L),
        ("clip_g", SD2_CLIP),
        ("clip_g", SDXL_CLIP_G),
        ("clip_g", REFINER_CLIP_G),
    ):
        if (part := _clip_part(h, prefix)) is not None:
            parts[slot] = part
    family = "sdxl" if h.with_prefix(UNET + "label_emb.") else "sd15"
    return FileKind("checkpoint", family, parts)


def classify(h: Header) -> FileKind:
    """The kind of a file; a typed error for adapters and unknown layouts."""
    if _is_adapter(h):
        raise ModelLoadError(
            f"{h.path}: a LoRA/LyCORIS adapter file, not a base model; pick a checkpoint or "
            "diffusion model here and load the adapter with the Load LyCORIS node / --adapter"
        )
    found = _checkpoint(h)
    if found is not None:
        return found
    if h.has("joint_blocks.0.x_block.attn.qkv.weight"):
        return FileKind("denoiser", "sd3", {"denoiser": Part(h, "", "sai_mmdit")})
    if h.has("double_blocks.0.img_attn.qkv.weight"):
        return FileKind("denoiser", "flux", {"denoiser": Part(h, "", "bfl_flux")})
    if h.has("input_blocks.0.0.weight"):
        family = "sdxl" if h.has("label_emb.0.0.weight") else "sd15"
        return FileKind("denoiser", family, {"denoiser": Part(h, "", "ldm_unet")})
    if h.has("encoder.conv_in.weight") and h.has("decoder.conv_in.weight"):
        return FileKind("vae", None, {"vae": Part(h, "", "ldm_vae")})
    if h.has("shared.weight") and h.with_prefix("encoder.block."):
        return FileKind("t5", None, {"t5xxl": Part(h, "", "t5")})
    clip = _clip_part(h, "")
    if clip is not None:
        return FileKind("clip", None, {"clip": clip})
    if h.with_prefix("transformer_blocks.") or h.has(
        "encoder.down_blocks.0.resnets.0.conv1.weight"
    ):
        raise ModelLoadError(
            f"{h.path}: a diffusers-format component file; pass a diffusers folder of the "
            "same model as its config folder (config_dir / --config-dir / config_folder), or "
            "pick the original-layout file ComfyUI uses"
        )
    sample = ", ".join(h.keys()[:3])
    raise ModelLoadError(
        f"{h.path}: unsupported architecture (tensors like {sample}); supported: SD1.x/2.x, "
        "SDXL and SD3/3.5 checkpoints, Flux and SD3 diffusion models, VAE and CLIP/T5 files"
    )


def denoiser_variant(family: str, part: Part, parts: dict[str, Part]) -> str:
    """The variant name of a denoiser (see the module docstring)."""
    h, p = part.header, part.prefix
    if family == "sdxl":
        adm = h.shape(p + "label_emb.0.0.weight")[1]
        refiner_te = "clip_g" in parts and parts["clip_g"].prefix == REFINER_CLIP_G
        if refiner_te or ("clip_l" not in parts and adm % 256 == 0 and adm == 2560):
            return "sdxl-refiner"
        return "sdxl-base"
    if family == "sd15":
        key = next((k for k in h.with_prefix(p) if k.endswith("attn2.to_k.weight")), None)
        context = h.shape(key)[1] if key else 0
        sd2_te = "clip_g" in parts and parts["clip_g"].prefix == SD2_CLIP
        return "sd2" if sd2_te or context == 1024 else "sd1"
    if family == "sd3":
        if not h.has(p + "joint_blocks.0.x_block.attn.ln_q.weight"):
            return "sd3-medium"
        dual = any(".attn2." in k for k in h.with_prefix(p + "joint_blocks."))
        return "sd3.5-medium" if dual else "sd3.5-large"
    return "flux-dev" if h.has(p + "guidance_in.in_layer.weight") else "flux-schnell"
