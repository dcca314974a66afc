"""Build a diffusers pipeline from a :class:`CheckpointSet`: configs, weights, tokenizers.

One component at a time: its config from shapes and facts, its tensors read (as stored, or
dequantised), renamed (``convert.py``) and assigned into a module built on the meta device
(``storage.build``), then the tensors are dropped before the next component is read.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from . import configs, convert
from .detect import Part
from .inspect import CheckpointSet, clip_projection
from .storage import build, read_part
from .tokenizers import find_folder, token_ids
from .tokenizers import load as load_tokenizer

logger = logging.getLogger(__name__)

# per family: slot -> (pipeline text encoder attribute, tokenizer attribute, with projection)
_TEXT_SLOTS: dict[str, dict[str, tuple[str, str, bool]]] = {
    "sd15": {
        "clip_l": ("text_encoder", "tokenizer", False),
        "clip_g": ("text_encoder", "tokenizer", False),
    },
    "sdxl": {
        "clip_l": ("text_encoder", "tokenizer", False),
        "clip_g": ("text_encoder_2", "tokenizer_2", True),
    },
    "sd3": {
        "clip_l": ("text_encoder", "tokenizer", True),
        "clip_g": ("text_encoder_2", "tokenizer_2", True),
        "t5xxl": ("text_encoder_3", "tokenizer_3", False),
    },
    "flux": {
        "clip_l": ("text_encoder", "tokenizer", False),
        "t5xxl": ("text_encoder_2", "tokenizer_2", False),
    },
}


def _overrides(config: dict, extra: dict[str, dict[str, Any]] | None, slot: str) -> dict:
    return {**config, **((extra or {}).get(slot) or {})}


def _clip_shapes(part: Part) -> dict[str, tuple[int, ...]]:
    s = part.shapes()
    if part.layout == "open_clip":  # the few names clip_config reads, in HF terms
        n = sum(1 for k in s if k.endswith(".attn.in_proj_weight"))
        w = s["token_embedding.weight"]
        out = {
            "embeddings.token_embedding.weight": w,
            "embeddings.position_embedding.weight": s["positional_embedding"],
            "encoder.layers.0.mlp.fc1.weight": s["transformer.resblocks.0.mlp.c_fc.weight"],
        }
        out.update({f"encoder.layers.{i}.x": (1,) for i in range(n)})
        proj = clip_projection(part)
        if proj is not None:
            out["text_projection.weight"] = (proj, w[1])
        return out
    return {
        (k[len("text_model.") :] if k.startswith("text_model.") else k): v for k, v in s.items()
    }


def _text_encoder(cs: CheckpointSet, slot: str, dirs, dtype, keep_fp8, extra) -> tuple[Any, Any]:
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        T5Config,
        T5EncoderModel,
    )

    part = cs.parts[slot]
    _, _, with_proj = _TEXT_SLOTS[cs.family][slot]
    if slot == "t5xxl":
        shapes = part.shapes()
        tok = load_tokenizer(cs.family, slot, dirs, shapes["shared.weight"][0])
        cfg = T5Config(
            **_overrides(configs.t5_config(shapes, cs.profile, token_ids(tok)), extra, slot)
        )
        cfg.decoder_start_token_id = tok.pad_token_id
        state = convert.t5(read_part(part, dtype, keep_fp8), part)
        return build(lambda: T5EncoderModel(cfg), state, dtype, f"{part.name} (T5)"), tok
    shapes = _clip_shapes(part)
    tok = load_tokenizer(cs.family, slot, dirs, shapes["embeddings.token_embedding.weight"][0])
    big = slot == "clip_g"
    kwargs = configs.clip_config(shapes, cs.profile, big, token_ids(tok))
    cfg = CLIPTextConfig(**_overrides(kwargs, extra, slot))
    cls = CLIPTextModelWithProjection if with_proj else CLIPTextModel
    state = convert.clip(read_part(part, dtype, keep_fp8), part, with_proj)
    if with_proj and "text_projection.weight" not in state:  # SD2-style G without projection
        from ..errors import ModelLoadError

        raise ModelLoadError(f"{part.name}: the {slot} text encoder has no text_projection")
    return build(lambda: cls(cfg), state, dtype, f"{part.name} ({slot})"), tok


def _denoiser(cs: CheckpointSet, dtype, keep_fp8, extra) -> Any:
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel

    part = cs.parts["denoiser"]
    shapes = part.shapes()
    what = f"{part.name} (denoiser)"
    if cs.family in ("sd15", "sdxl"):
        g = cs.parts.get("clip_g")
        pooled = (clip_projection(g) if g is not None else None) if cs.family == "sdxl" else None
        variant = "sdxl" if cs.family == "sdxl" else cs.variant
        cfg = _overrides(
            configs.unet_config(shapes, variant, cs.profile, pooled), extra, "denoiser"
        )
        state = convert.unet(read_part(part, dtype, keep_fp8), part, cfg)
        return build(lambda: UNet2DConditionModel(**cfg), state, dtype, what)
    if cs.family == "sd3":
        cfg = _overrides(configs.sd3_config(shapes, cs.profile), extra, "denoiser")
        state = convert.sd3(read_part(part, dtype, keep_fp8), part)
        return build(lambda: SD3Transformer2DModel(**cfg), state, dtype, what)
    cfg = _overrides(configs.flux_config(shapes), extra, "denoiser")
    state = convert.flux(read_part(part, dtype, keep_fp8), part, cfg)
    return build(lambda: FluxTransformer2DModel(**cfg), state, dtype, what)


def _vae(cs: CheckpointSet, dtype, keep_fp8, extra) -> Any:
    from diffusers import AutoencoderKL

    part = cs.parts["vae"]
    cfg = _overrides(configs.vae_config(part.shapes(), cs.family, cs.profile), extra, "vae")
    state = convert.vae(read_part(part, dtype, keep_fp8), part, cfg)
    return build(lambda: AutoencoderKL(**cfg), state, dtype, f"{part.name} (VAE)")


def _scheduler(cs: CheckpointSet) -> Any:
    """The released models' schedulers (their scheduler_config.json files), built locally."""
    from diffusers import EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler, PNDMScheduler

    betas = {
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "steps_offset": 1,
    }
    if cs.family == "sd15":
        return PNDMScheduler(
            **betas,
            skip_prk_steps=True,
            set_alpha_to_one=False,
            prediction_type=cs.prediction_type or "epsilon",
        )
    if cs.family == "sdxl":
        return EulerDiscreteScheduler(
            **betas,
            prediction_type="epsilon",
            timestep_spacing="leading",
            interpolation_type="linear",
            use_karras_sigmas=False,
        )
    if cs.family == "sd3":
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    if cs.variant == "flux-schnell":
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )


def build_pipeline(
    cs: CheckpointSet,
    tokenizer_dirs: Sequence[str | os.PathLike[str]],
    *,
    dtype: torch.dtype = torch.float32,
    fp8: str = "keep",
    config_overrides: dict[str, dict[str, Any]] | None = None,
    allow_download: bool = False,
) -> Any:
    """The diffusers pipeline of `cs`, offline. `fp8`: "keep" (fp8 storage, compute in
    `dtype`) or "upcast" (cast to `dtype` while reading). `config_overrides`: per slot
    (denoiser, vae, clip_l, clip_g, t5xxl) config entries replacing the derived ones.
    Tokenizers: `tokenizer_dirs`, then the local HF cache; with `allow_download` a missing
    one is fetched from the hub into that cache (tokenizer files only)."""
    from diffusers import (
        FluxPipeline,
        StableDiffusion3Pipeline,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
    )

    dirs = [Path(d) for d in tokenizer_dirs]
    keep = fp8 == "keep"
    for slot in _TEXT_SLOTS[cs.family]:  # every tokenizer found before any weight is read
        if slot in cs.parts:
            find_folder(cs.family, slot, dirs, allow_download=allow_download)
    comps: dict[str, Any] = {}
    for slot, (enc, tok_name, _) in _TEXT_SLOTS[cs.family].items():
        if slot in cs.parts:
            comps[enc], comps[tok_name] = _text_encoder(
                cs, slot, dirs, dtype, keep, config_overrides
            )
    denoiser = _denoiser(cs, dtype, keep, config_overrides)
    comps["vae"] = _vae(cs, dtype, keep, config_overrides)
    comps["scheduler"] = _scheduler(cs)
    if cs.family == "sd15":
        pipe = StableDiffusionPipeline(
            unet=denoiser,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
            **comps,
        )
    elif cs.family == "sdxl":
        pipe = StableDiffusionXLPipeline(unet=denoiser, add_watermarker=False, **comps)
    elif cs.family == "sd3":
        comps.setdefault("text_encoder_3", None)
        comps.setdefault("tokenizer_3", None)
        pipe = StableDiffusion3Pipeline(transformer=denoiser, **comps)
    else:
        pipe = FluxPipeline(transformer=denoiser, **comps)
    logger.info("built %s from %s", cs.describe(), ", ".join(str(f) for f in cs.files))
    return pipe


def load_files(
    base: str | os.PathLike[str],
    text_encoders: Sequence[str | os.PathLike[str]] = (),
    vae: str | os.PathLike[str] | None = None,
    *,
    tokenizer_dirs: Sequence[str | os.PathLike[str]] = (),
    dtype: torch.dtype = torch.float32,
    fp8: str = "keep",
    variant: str | None = None,
    prediction_type: str | None = None,
    config_overrides: dict[str, dict[str, Any]] | None = None,
    allow_download: bool = False,
) -> tuple[Any, CheckpointSet]:
    """Inspect, check and build in one call: (pipeline, what was found)."""
    from ..errors import ModelLoadError
    from .inspect import inspect_files

    if fp8 not in ("keep", "upcast"):
        raise ModelLoadError(f"fp8={fp8!r}: use 'keep' (fp8 storage) or 'upcast'")
    found = inspect_files(
        base, text_encoders, vae, variant=variant, prediction_type=prediction_type
    )
    with _QuietCasts():
        pipe = build_pipeline(
            found,
            tokenizer_dirs,
            dtype=dtype,
            fp8=fp8,
            config_overrides=config_overrides,
            allow_download=allow_download,
        )
    return pipe, found


class _QuietCasts:
    """diffusers warns on every ``.to(dtype)`` of a model without fp32 modules; our casts
    happen on the meta device before any weight exists, so the warning says nothing here."""

    def __enter__(self) -> None:
        import diffusers.models.modeling_utils as mu

        self._logger = mu.logger
        self._level = mu.logger.level
        mu.logger.setLevel(logging.ERROR)

    def __exit__(self, *exc: object) -> None:
        self._logger.setLevel(self._level)
