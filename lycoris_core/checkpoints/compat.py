"""Do the components fit each other? Checked from shapes, before any weight is read.

The denoiser's input widths fix what the other parts must produce: its latent channels (the
VAE's), its text context width (the text encoders' hidden sizes or T5's ``d_model``) and its
pooled-text width (the CLIP projections). A mismatch names both files and the fix.
"""

from __future__ import annotations

from ..errors import ModelLoadError
from .detect import Part


def denoiser_width(family: str, part: Part) -> int:
    s = part.shapes()
    key = {
        "sd15": "input_blocks.0.0.weight",
        "sdxl": "input_blocks.0.0.weight",
        "sd3": "x_embedder.proj.weight",
        "flux": "img_in.weight",
    }[family]
    return s[key][0]


def latent_channels(family: str, part: Part) -> int:
    s = part.shapes()
    if family in ("sd15", "sdxl"):
        return s["input_blocks.0.0.weight"][1]
    if family == "sd3":
        return s["x_embedder.proj.weight"][1]
    return s["img_in.weight"][1] // 4  # Flux packs 2x2 latent pixels per token


def _context(family: str, part: Part) -> int:
    s = part.shapes()
    if family in ("sd15", "sdxl"):
        key = next(k for k in s if k.endswith("attn2.to_k.weight"))
        return s[key][1]
    return s["context_embedder.weight" if family == "sd3" else "txt_in.weight"][1]


def _fail(a: Part, b: Part, what: str, fix: str) -> None:
    raise ModelLoadError(f"{b.name} does not fit {a.name}: {what}; {fix}")


def check_compatible(family: str, parts: dict[str, Part]) -> None:
    """Raise a ModelLoadError naming both files when two components do not fit."""
    from .inspect import clip_hidden, clip_projection

    den = parts["denoiser"]
    vae = parts["vae"]
    z = vae.shapes()["decoder.conv_in.weight"][1]
    need = latent_channels(family, den)
    if z != need:
        _fail(
            den,
            vae,
            f"a VAE with {z} latent channels, the denoiser takes {need}",
            "pick the VAE of the same model family (SD1/SDXL: 4 channels, SD3/Flux: 16)",
        )
    ctx = _context(family, den)
    clips = {s: parts[s] for s in ("clip_l", "clip_g") if s in parts}
    if family in ("sd15", "sdxl"):
        width = sum(clip_hidden(p) for p in clips.values())
        if width != ctx:
            other = next(iter(clips.values()))
            _fail(
                den,
                other,
                f"text encoders {width} wide in total, the UNet attends to {ctx}",
                "pick the text encoders of the same model",
            )
        return
    t5 = parts.get("t5xxl")
    if t5 is not None and t5.shapes()["shared.weight"][1] != ctx:
        _fail(
            den,
            t5,
            f"a T5 of width {t5.shapes()['shared.weight'][1]}, the denoiser takes {ctx}",
            "pick the T5 text encoder of the same model",
        )
    pooled_key = "y_embedder.mlp.0.weight" if family == "sd3" else "vector_in.in_layer.weight"
    pooled = den.shapes()[pooled_key][1]
    if family == "flux":
        got = clip_hidden(clips["clip_l"])  # CLIPTextModel's pooled output
        if got != pooled:
            _fail(
                den,
                clips["clip_l"],
                f"a CLIP of width {got}, the transformer pools {pooled}",
                "pick the CLIP-L text encoder (clip_l.safetensors) Flux uses",
            )
        return
    got = sum((clip_projection(p) or clip_hidden(p)) for p in clips.values())
    if got != pooled:
        _fail(
            den,
            next(iter(clips.values())),
            f"CLIP projections {got} wide in total, the transformer pools {pooled}",
            "pick the CLIP-L and CLIP-G text encoders of SD3",
        )
