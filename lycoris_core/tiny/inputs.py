"""A pipeline's denoiser, and deterministic random inputs for one forward of it."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import DiffusionPipeline

from ..errors import LycorisError


def denoiser_of(pipe: DiffusionPipeline) -> torch.nn.Module:
    """The pipeline's denoiser: its ``transformer`` or ``unet``."""
    model = getattr(pipe, "transformer", None) or getattr(pipe, "unet", None)
    if model is None:
        raise LycorisError(f"{type(pipe).__name__} has no 'transformer' or 'unet' component")
    return model


def denoiser_inputs(
    model: torch.nn.Module, seed: int = 1, dtype: torch.dtype = torch.float32, tokens: int = 64
) -> dict[str, Any]:
    """Deterministic random keyword inputs for one forward of a tiny (or bigger) denoiser.

    Supports ``UNet2DConditionModel`` (SD 1.x and SDXL conditioning) and
    ``FluxTransformer2DModel``; `tokens` is the number of image tokens (a square latent of
    that many positions for the UNet).
    """
    g = torch.Generator().manual_seed(seed)
    cfg = model.config

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(dtype)

    side = max(2, round(tokens**0.5))
    if type(model).__name__ == "UNet2DConditionModel":
        out: dict[str, Any] = {
            "sample": rnd(1, cfg.in_channels, side, side),
            "timestep": torch.tensor([10]),
            "encoder_hidden_states": rnd(1, 6, cfg.cross_attention_dim),
            "return_dict": False,
        }
        if cfg.addition_embed_type == "text_time":
            n = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
            out["added_cond_kwargs"] = {"text_embeds": rnd(1, n), "time_ids": rnd(1, 6)}
        return out
    if type(model).__name__ == "FluxTransformer2DModel":
        txt = 6
        return {
            "hidden_states": rnd(1, tokens, cfg.in_channels),
            "encoder_hidden_states": rnd(1, txt, cfg.joint_attention_dim),
            "pooled_projections": rnd(1, cfg.pooled_projection_dim),
            "timestep": torch.tensor([0.5], dtype=dtype),
            "img_ids": torch.zeros(tokens, 3),
            "txt_ids": torch.zeros(txt, 3),
            "guidance": torch.tensor([3.5], dtype=dtype) if cfg.guidance_embeds else None,
            "return_dict": False,
        }
    raise LycorisError(f"denoiser_inputs: no input recipe for {type(model).__name__}")
