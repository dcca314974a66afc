"""The tiny denoisers: SD 1.5 and SDXL UNets, the SD3 MMDiT, the Flux transformer config.

The real architectures with small, factorisable widths (32 and 64), so that adapter code
(LoKr factor splitting, BOFT butterflies, ...) meets the same module layout as on the
full-size models.
"""

from __future__ import annotations

import inspect
from typing import Any

from diffusers import FluxTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel

from ..errors import LycorisError
from .encoders import _CLIP_HIDDEN, _T5_DIM


def _sd15_unet() -> UNet2DConditionModel:
    # SD 1.5 layout: cross-attention in the high-resolution blocks, a plain lowest block.
    return UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        norm_num_groups=32,
        cross_attention_dim=_CLIP_HIDDEN,
        attention_head_dim=4,  # diffusers' name for the number of heads here
    )


_SDXL_TIME_EMBED_DIM = 16


def _sdxl_unet() -> UNet2DConditionModel:
    # SDXL layout: plain first block, cross-attention below, linear projections, text_time
    # conditioning on the pooled CLIP-G embedding plus 6 size/crop numbers.
    return UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        transformer_layers_per_block=(1, 2),
        norm_num_groups=32,
        cross_attention_dim=2 * _CLIP_HIDDEN,  # both text encoders' hidden states, concatenated
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=_SDXL_TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=6 * _SDXL_TIME_EMBED_DIM + _CLIP_HIDDEN,
    )


def _sd3_transformer() -> SD3Transformer2DModel:
    return SD3Transformer2DModel(
        sample_size=16,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=4,
        joint_attention_dim=_T5_DIM,
        caption_projection_dim=64,  # = num_attention_heads * attention_head_dim
        pooled_projection_dim=2 * _CLIP_HIDDEN,  # both CLIP projections, concatenated
        pos_embed_max_size=16,
    )


def _flux_rope_axes(attention_head_dim: int) -> tuple[int, int, int]:
    """Split a head dim over the 3 RoPE axes like FLUX.1 (16, 56, 56 of 128); all even."""
    if attention_head_dim < 8 or attention_head_dim % 4:
        raise LycorisError(
            f"flux_transformer_config: attention_head_dim={attention_head_dim} cannot be split "
            "over the 3 rotary axes; use a multiple of 4 that is at least 8, or pass "
            "axes_dims_rope explicitly (3 even numbers summing to attention_head_dim)."
        )
    first = max(2, (attention_head_dim // 8) // 2 * 2)
    rest = attention_head_dim - first
    second = (rest // 2) // 2 * 2
    return (first, second, rest - second)


def flux_transformer_config(**overrides: Any) -> dict[str, Any]:
    """The tiny ``FluxTransformer2DModel`` config (FLUX.1-dev layout) as a dict.

    Keyword overrides replace entries, e.g. to build a larger random transformer for a
    benchmark: ``FluxTransformer2DModel(**flux_transformer_config(num_layers=4, ...))``.
    When ``attention_head_dim`` is overridden without ``axes_dims_rope``, the rotary axes
    are re-derived so that they still sum to the head dim.
    """
    allowed = set(inspect.signature(FluxTransformer2DModel.__init__).parameters) - {"self"}
    unknown = sorted(set(overrides) - allowed)
    if unknown:
        raise LycorisError(
            f"flux_transformer_config: unknown option(s) {unknown}; valid options are "
            f"{sorted(allowed)}."
        )
    config: dict[str, Any] = {
        "patch_size": 1,
        "in_channels": 64,  # 16 latent channels packed 2x2
        "out_channels": None,
        "num_layers": 2,
        "num_single_layers": 2,
        "attention_head_dim": 32,
        "num_attention_heads": 2,
        "joint_attention_dim": _T5_DIM,
        "pooled_projection_dim": _CLIP_HIDDEN,  # CLIP pooler output
        "guidance_embeds": True,
    }
    config.update(overrides)
    if "axes_dims_rope" in overrides:
        axes = tuple(int(a) for a in overrides["axes_dims_rope"])
        if sum(axes) != config["attention_head_dim"] or any(a % 2 for a in axes):
            raise LycorisError(
                f"flux_transformer_config: axes_dims_rope={axes} must be even numbers summing "
                f"to attention_head_dim={config['attention_head_dim']}."
            )
        config["axes_dims_rope"] = axes
    else:
        config["axes_dims_rope"] = _flux_rope_axes(int(config["attention_head_dim"]))
    return config
