"""Which components a set of files provides, checked against each other from headers only.

:func:`inspect_files` reads the headers of a base file (a full checkpoint, or a denoiser) and
optional separate text encoder and VAE files (as ComfyUI's UNETLoader / DualCLIPLoader /
VAELoader take them), assigns every component to a slot, detects family, variant and
profile, and refuses bad combinations (a Flux transformer with SDXL text encoders, a VAE of
another latent size, an adapter picked as a model) with both file names — all before any
weight is read.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ModelLoadError
from . import facts
from .detect import Part, classify, denoiser_variant
from .header import read_header

VARIANTS = {
    "sd15": ("sd1", "sd2"),
    "sdxl": ("sdxl-base", "sdxl-refiner"),
    "sd3": ("sd3-medium", "sd3.5-medium", "sd3.5-large"),
    "flux": ("flux-dev", "flux-schnell"),
}
_NEEDS = {
    "sd15": ("vae",),
    "sdxl": ("vae", "clip_l", "clip_g"),
    "sd3": ("vae", "clip_l", "clip_g"),
    "flux": ("vae", "clip_l", "t5xxl"),
}
_WHERE = {
    "vae": "a VAE file (ComfyUI models/vae, e.g. ae.safetensors for Flux)",
    "clip_l": "the CLIP-L text encoder (models/text_encoders/clip_l.safetensors)",
    "clip_g": "the CLIP-G text encoder (models/text_encoders/clip_g.safetensors)",
    "t5xxl": "the T5-XXL text encoder (models/text_encoders/t5xxl_*.safetensors)",
}


@dataclass
class CheckpointSet:
    """The components found, where each comes from, and what they are."""

    family: str
    variant: str
    profile: facts.Profile
    parts: dict[str, Part]
    prediction_type: str | None = None  # SD2 only: v_prediction or epsilon
    files: list[Path] = field(default_factory=list)

    @property
    def storage(self) -> str:
        """The storage dtype of the denoiser ("fp8_e4m3fn (scaled)", "bf16", ...)."""
        from .storage import is_scaled_fp8

        part = self.parts["denoiser"]
        dtype = part.header.storage_dtype(part.prefix)
        return f"{dtype} (scaled)" if is_scaled_fp8(part) else dtype

    def describe(self) -> str:
        pred = f", {self.prediction_type}" if self.prediction_type else ""
        return f"{self.family} ({self.variant}{pred}), stored {self.storage}"


def clip_hidden(part: Part) -> int:
    s = part.shapes()
    for key in (
        "text_model.embeddings.token_embedding.weight",
        "embeddings.token_embedding.weight",
        "token_embedding.weight",
    ):
        if key in s:
            return s[key][1]
    raise ModelLoadError(f"{part.name}: no token embedding under {part.prefix!r}")


def clip_projection(part: Part) -> int | None:
    s = part.shapes()
    if "text_projection.weight" in s:
        return s["text_projection.weight"][0]
    if "text_projection" in s:  # OpenCLIP: [width, projection]
        return s["text_projection"][1]
    return None


def _assign_text_encoders(parts: dict[str, Part], files: Sequence[Path]) -> None:
    """Separate text encoder files fill the slots (T5 by kind, CLIP-L/G by width or order)."""
    clips: list[Part] = []
    for f in files:
        kind = classify(read_header(f))
        if kind.kind == "t5":
            parts["t5xxl"] = kind.parts["t5xxl"]
        elif kind.kind == "clip":
            clips.append(kind.parts["clip"])
        else:
            raise ModelLoadError(
                f"{f}: is a {kind.kind} file, not a text encoder; pick CLIP/T5 files "
                "(models/text_encoders) as text encoders"
            )
    free = ["clip_l", "clip_g"]
    for part in sorted(clips, key=lambda p: {768: 0, 1280: 1}.get(clip_hidden(p), 2)):
        width = clip_hidden(part)
        slot = (
            "clip_l" if width == 768 else "clip_g" if width == 1280 else free[0] if free else None
        )
        if slot is None or slot not in free:
            raise ModelLoadError(f"{part.name}: more CLIP text encoders than the model uses (two)")
        free.remove(slot)
        parts[slot] = part


def inspect_files(
    base: str | os.PathLike[str],
    text_encoders: Sequence[str | os.PathLike[str]] = (),
    vae: str | os.PathLike[str] | None = None,
    *,
    variant: str | None = None,
    profile: str | None = None,
    prediction_type: str | None = None,
) -> CheckpointSet:
    """Detect and check a base file plus optional text encoder and VAE files."""
    base_path = Path(base)
    kind = classify(read_header(base_path))
    if kind.kind not in ("checkpoint", "denoiser"):
        raise ModelLoadError(
            f"{base_path}: is a {kind.kind} file, not a base model; pick a checkpoint or a "
            f"diffusion model as the base and this file as the {kind.kind}"
        )
    family = kind.family or ""
    parts = dict(kind.parts)
    _assign_text_encoders(parts, [Path(t) for t in text_encoders])
    if vae is not None:
        vk = classify(read_header(Path(vae)))
        if vk.kind != "vae":
            raise ModelLoadError(
                f"{vae}: is a {vk.kind} file, not a VAE; pick a file from models/vae"
            )
        parts["vae"] = vk.parts["vae"]
    found = denoiser_variant(family, parts["denoiser"], parts)
    if variant is not None and variant not in VARIANTS[family]:
        raise ModelLoadError(
            f"{base_path}: variant {variant!r} is not a {family} variant; use one of "
            f"{', '.join(VARIANTS[family])}"
        )
    chosen = variant or found
    if chosen == "sdxl-refiner":
        raise ModelLoadError(
            f"{base_path}: an SDXL refiner (an image-to-image model); this pack samples and "
            "trains text-to-image models: pick the SDXL base checkpoint"
        )
    needs = _NEEDS[family] + (
        ("clip_g",) if chosen == "sd2" else ("clip_l",) if family == "sd15" else ()
    )
    for slot in needs:
        if slot not in parts:
            raise ModelLoadError(
                f"{base_path}: has no {slot.replace('_', '-').upper()} component; add "
                f"{_WHERE[slot]} (its {family} {chosen} model needs it)"
            )
    pred = None
    if chosen == "sd2":
        pred = prediction_type or facts.SD2_DEFAULT_PREDICTION
    if pred not in (None, "v_prediction", "epsilon"):
        raise ModelLoadError(f"prediction_type {pred!r}: use v_prediction or epsilon")
    from .compat import check_compatible, denoiser_width

    check_compatible(family, parts)
    prof = facts.profile_for(family, denoiser_width(family, parts["denoiser"]), profile)
    files = sorted({p.header.path for p in parts.values()})
    return CheckpointSet(family, chosen, prof, parts, pred, files)
