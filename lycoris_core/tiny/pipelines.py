"""The tiny pipelines, assembled per family: built in memory, or saved to a folder.

Weights depend only on ``(family, seed)``: every component is built under its own seed,
inside ``torch.random.fork_rng`` so the caller's RNG state is left untouched.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    DiffusionPipeline,
    FluxPipeline,
    FluxTransformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from ..errors import LycorisError
from ..io import atomic_folder
from .denoisers import _sd3_transformer, _sd15_unet, _sdxl_unet, flux_transformer_config
from .encoders import _clip_config, _t5_encoder, _vae
from .schedulers import _flux_scheduler, _sd3_scheduler, _sd15_scheduler, _sdxl_scheduler
from .vocabularies import _clip_tokenizer, _t5_tokenizer

logger = logging.getLogger(__package__)

FAMILIES: tuple[str, ...] = ("sd15", "sdxl", "sd3", "flux")

# Image side (pixels) used for sampling; the tiny VAEs downsample by 2, so the latents are
# 16x16 (UNets: one further downsampling; SD3: 2x2 patches; Flux: 2x2 packing).
DEFAULT_SIZE: dict[str, int] = {"sd15": 32, "sdxl": 32, "sd3": 32, "flux": 32}


def _component_seed(seed: int, family: str, component: str) -> int:
    """A 63-bit seed derived from (seed, family, component), distinct for each triple."""
    digest = hashlib.sha256(f"{seed}:{family}:{component}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def _seeded(seed: int, family: str, component: str, factory: Callable[[], Any]) -> Any:
    """Build one component under its own seed (the caller runs inside fork_rng)."""
    torch.manual_seed(_component_seed(seed, family, component))
    return factory()


def _build_sd15(seed: int) -> DiffusionPipeline:
    tokenizer = _clip_tokenizer()
    return StableDiffusionPipeline(
        vae=_seeded(seed, "sd15", "vae", lambda: _vae(4, None)),
        text_encoder=_seeded(
            seed, "sd15", "text_encoder", lambda: CLIPTextModel(_clip_config(tokenizer))
        ),
        tokenizer=tokenizer,
        unet=_seeded(seed, "sd15", "unet", _sd15_unet),
        scheduler=_sd15_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _build_sdxl(seed: int) -> DiffusionPipeline:
    tokenizer = _clip_tokenizer()
    tokenizer_2 = _clip_tokenizer()
    return StableDiffusionXLPipeline(
        vae=_seeded(seed, "sdxl", "vae", lambda: _vae(4, None)),
        text_encoder=_seeded(
            seed, "sdxl", "text_encoder", lambda: CLIPTextModel(_clip_config(tokenizer))
        ),
        text_encoder_2=_seeded(
            seed,
            "sdxl",
            "text_encoder_2",
            lambda: CLIPTextModelWithProjection(_clip_config(tokenizer_2)),
        ),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=_seeded(seed, "sdxl", "unet", _sdxl_unet),
        scheduler=_sdxl_scheduler(),
        add_watermarker=False,
    )


def _build_sd3(seed: int) -> DiffusionPipeline:
    tokenizer = _clip_tokenizer()
    tokenizer_2 = _clip_tokenizer()
    tokenizer_3 = _t5_tokenizer()
    return StableDiffusion3Pipeline(
        transformer=_seeded(seed, "sd3", "transformer", _sd3_transformer),
        scheduler=_sd3_scheduler(),
        vae=_seeded(seed, "sd3", "vae", lambda: _vae(16, 0.0)),
        text_encoder=_seeded(
            seed,
            "sd3",
            "text_encoder",
            lambda: CLIPTextModelWithProjection(_clip_config(tokenizer)),
        ),
        tokenizer=tokenizer,
        text_encoder_2=_seeded(
            seed,
            "sd3",
            "text_encoder_2",
            lambda: CLIPTextModelWithProjection(_clip_config(tokenizer_2)),
        ),
        tokenizer_2=tokenizer_2,
        text_encoder_3=_seeded(seed, "sd3", "text_encoder_3", lambda: _t5_encoder(tokenizer_3)),
        tokenizer_3=tokenizer_3,
    )


def _build_flux(seed: int) -> DiffusionPipeline:
    tokenizer = _clip_tokenizer()
    tokenizer_2 = _t5_tokenizer()
    return FluxPipeline(
        scheduler=_flux_scheduler(),
        vae=_seeded(seed, "flux", "vae", lambda: _vae(16, 0.0)),
        text_encoder=_seeded(
            seed, "flux", "text_encoder", lambda: CLIPTextModel(_clip_config(tokenizer))
        ),
        tokenizer=tokenizer,
        text_encoder_2=_seeded(seed, "flux", "text_encoder_2", lambda: _t5_encoder(tokenizer_2)),
        tokenizer_2=tokenizer_2,
        transformer=_seeded(
            seed,
            "flux",
            "transformer",
            lambda: FluxTransformer2DModel(**flux_transformer_config()),
        ),
    )


_BUILDERS: dict[str, Callable[[int], DiffusionPipeline]] = {
    "sd15": _build_sd15,
    "sdxl": _build_sdxl,
    "sd3": _build_sd3,
    "flux": _build_flux,
}


def _check_family(family: str) -> None:
    if family not in _BUILDERS:
        raise LycorisError(
            f"Unknown model family {family!r}; valid families are: {', '.join(FAMILIES)}."
        )


def build_pipeline(
    family: str, seed: int = 0, dtype: torch.dtype = torch.float32
) -> DiffusionPipeline:
    """Build the tiny random-weight pipeline of ``family`` in memory.

    Same ``(family, seed)`` gives bitwise identical weights; the global torch RNG state of
    the caller is preserved. Weights are initialised in float32 and then cast to ``dtype``.
    """
    _check_family(family)
    with torch.random.fork_rng(devices=[]):
        pipe = _BUILDERS[family](seed)
    if dtype != torch.float32:
        pipe.to(dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    logger.debug("built tiny %s pipeline (seed=%d, dtype=%s)", family, seed, dtype)
    return pipe


def make_tiny(family: str, out_dir: str | os.PathLike[str], seed: int = 0) -> Path:
    """Build the tiny ``family`` pipeline and save it (safetensors) to ``out_dir``.

    The pipeline is written into a temporary sibling folder and renamed into place, so
    ``out_dir`` either holds a complete pipeline or does not exist. ``out_dir`` must not
    exist yet or be an empty folder. Returns ``out_dir`` as a ``Path``; it loads offline
    with ``diffusers.DiffusionPipeline.from_pretrained(out_dir)``.
    """
    _check_family(family)
    target = Path(out_dir)
    with atomic_folder(target) as staging:
        build_pipeline(family, seed=seed).save_pretrained(staging, safe_serialization=True)
    logger.info("saved tiny %s pipeline (seed=%d) to %s", family, seed, target)
    return target
