"""Step previews: latents -> a small RGB image, through a linear map fitted to the model's VAE.

ComfyUI's "latent2rgb" previews multiply each latent pixel by a fixed per-architecture table.
We fit that table instead, once per VAE: encode a few smooth colour fields, and solve the
least-squares map from the (scaled, shifted) latent channels plus a bias to the pixels' RGB,
averaged over each latent cell. It works for every family and for any fine-tune of a VAE
(the tiny random demo models included), with no tables to keep, and costs one small VAE
encode (12 images of 64x64 px) the first time a model is previewed.

A preview shows the model's clean estimate where the scheduler lets ``sample()`` read it
back (Euler schedulers: SD3, Flux, SDXL's default; from the second step), as ComfyUI's
samplers do, and the current noisy latents otherwise (SD 1.5's PNDM, the first step).
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from .models import LoadedModel

FIT_IMAGES = 12
FIT_SIZE = 64  # px; the map is per latent pixel, so a small size is enough
_FACTORS: weakref.WeakKeyDictionary[Any, torch.Tensor] = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def _colour_fields(count: int, size: int, seed: int = 0) -> torch.Tensor:
    """`count` smooth random colour images ``[N, 3, size, size]`` in -1..1, plus flat ones."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(count, 3, 4, 4, generator=g) * 2 - 1
    fields = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
    flat = torch.tensor([[1, 1, 1], [-1, -1, -1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]])
    fields[: len(flat)] = flat[: min(len(flat), count)].float()[:, :, None, None]
    return fields.clamp(-1, 1)


@torch.no_grad()
def fit_rgb_factors(
    vae: Any,
    device: torch.device | str | None = None,
    images: int = FIT_IMAGES,
    size: int = FIT_SIZE,
) -> torch.Tensor:
    """The ``[C + 1, 3]`` map (last row: bias) from scaled latents to RGB in 0..1, fitted to
    `vae` (a diffusers AutoencoderKL) on colour fields encoded on `device` (default: where
    its first weight is; with offload, the model's execution device); float32 on the CPU."""
    param = next(vae.parameters())
    pixels = _colour_fields(images, size)
    dist = vae.encode(pixels.to(device or param.device, param.dtype)).latent_dist
    cfg = vae.config
    shift = float(getattr(cfg, "shift_factor", None) or 0.0)
    latents = (dist.mean.float().cpu() - shift) * float(cfg.scaling_factor)
    _, c, h, w = latents.shape
    target = F.adaptive_avg_pool2d((pixels + 1) / 2, (h, w))  # RGB per latent cell, 0..1
    x = latents.permute(0, 2, 3, 1).reshape(-1, c)
    x = torch.cat([x, torch.ones(len(x), 1)], dim=1)
    y = target.permute(0, 2, 3, 1).reshape(-1, 3)
    # a little ridge keeps the fit finite when channels are (nearly) collinear
    ridge = 1e-4 * torch.eye(c + 1)
    return torch.linalg.solve(x.T @ x + ridge, x.T @ y)


def rgb_factors(model: LoadedModel) -> torch.Tensor:
    """:func:`fit_rgb_factors` for the model's VAE, fitted once and kept while the VAE lives."""
    vae = model.pipe.vae
    with _LOCK:
        factors = _FACTORS.get(vae)
        if factors is None:
            with torch.inference_mode():
                factors = fit_rgb_factors(vae, model.device)
            _FACTORS[vae] = factors
    return factors


def latents_to_image(latents: torch.Tensor, factors: torch.Tensor) -> Image.Image:
    """The first image of a ``[B, C, h, w]`` latent batch as an RGB PIL image of ``h x w``."""
    if latents.ndim != 4 or latents.shape[1] + 1 != factors.shape[0]:
        raise ValueError(
            f"latents of shape {tuple(latents.shape)} do not match a {factors.shape[0] - 1}-"
            "channel preview map (expected [B, C, h, w])"
        )
    x = latents[0].detach().float().cpu().permute(1, 2, 0)  # h, w, C
    rgb = (x @ factors[:-1] + factors[-1]).clamp(0, 1)
    return Image.fromarray((rgb * 255).round().to(torch.uint8).numpy(), "RGB")


def step_preview(model: LoadedModel, latents: torch.Tensor | None) -> Image.Image | None:
    """A preview of `latents` for `model`, or None when there is nothing to show."""
    if latents is None or getattr(model.pipe, "vae", None) is None:
        return None
    return latents_to_image(latents, rgb_factors(model))
