"""A diffusers-style denoiser config read off a host's (ComfyUI's) state dict, for the name maps.

A ComfyUI ``MODEL`` holds its denoiser under its original names (ldm UNet, BFL Flux, SAI SD3)
with the ``diffusion_model.`` prefix. The name maps of :mod:`lycoris_core.layouts` are derived
from a diffusers config; this module rebuilds the few config fields they read from the keys
and shapes alone, so nothing depends on a host's own config format:

* UNet: levels end at each ``input_blocks.N.0.op`` downsampler; a level's resnets are its
  ``input_blocks`` with ``out_layers.3`` (their width is the level's channels), its attention
  (``.1.proj_in``) and transformer depth (``transformer_blocks.J``), the up levels' depths from
  ``output_blocks`` likewise, ``label_emb`` = SDXL's ``text_time`` embedding, the mid block's
  attention from ``middle_block.1``.
* Flux: ``h`` = rows of ``double_blocks.0.img_attn.proj``; the head width = the q norm's scale;
  the MLP ratio from ``img_mlp.0``; counts of ``double_blocks`` / ``single_blocks``;
  ``guidance_in`` present or not.
* SD3: ``h`` = rows of ``joint_blocks.0.x_block.attn.proj``; head width 64 (SD3's) or the
  ``ln_q`` width; dual-attention blocks have ``x_block.attn2``; ``qk_norm`` from ``ln_q``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from .errors import IncompatibleModelError

Shapes = Mapping[str, Sequence[int]]
"""Host module weight key without prefix (``input_blocks.1.0.in_layers.2.weight``) -> shape."""


def _indices(shapes: Shapes, pattern: str) -> list[int]:
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in shapes if (m := rx.match(k))})


def _depth(shapes: Shapes, block: str) -> int:
    return len(_indices(shapes, re.escape(block) + r"\.transformer_blocks\.(\d+)\."))


def unet_config(shapes: Shapes) -> dict[str, Any]:
    """The ``UNet2DConditionModel`` fields ``ldm_unet_map`` reads, from ldm key names."""
    n_in = _indices(shapes, r"input_blocks\.(\d+)\.")
    if not n_in:
        raise IncompatibleModelError("host model: no 'input_blocks' keys; not an ldm UNet")
    levels: list[list[int]] = [[]]
    for n in n_in[1:]:
        if f"input_blocks.{n}.0.op.weight" in shapes:
            levels.append([])
        else:
            levels[-1].append(n)
    channels = [shapes[f"input_blocks.{lv[0]}.0.out_layers.3.weight"][0] for lv in levels]
    down_depth = [_depth(shapes, f"input_blocks.{lv[0]}.1") for lv in levels]
    n_out = _indices(shapes, r"output_blocks\.(\d+)\.")
    per_up = [len(lv) + 1 for lv in levels[::-1]]
    up_depth, start = [], 0
    for count in per_up:
        up_depth.append(_depth(shapes, f"output_blocks.{n_out[start]}.1") if n_out else 0)
        start += count
    mid = _depth(shapes, "middle_block.1")
    return {
        "block_out_channels": [int(c) for c in channels],
        "layers_per_block": [len(lv) for lv in levels],
        "down_block_types": ["CrossAttnDownBlock2D" if d else "DownBlock2D" for d in down_depth],
        "up_block_types": ["CrossAttnUpBlock2D" if d else "UpBlock2D" for d in up_depth],
        "transformer_layers_per_block": [max(d, 1) for d in down_depth],
        "reverse_transformer_layers_per_block": [max(d, 1) for d in up_depth],
        "mid_block_type": "UNetMidBlock2DCrossAttn" if mid else "UNetMidBlock2D",
        "addition_embed_type": "text_time" if "label_emb.0.0.weight" in shapes else None,
    }


def flux_config(shapes: Shapes) -> dict[str, Any]:
    """The ``FluxTransformer2DModel`` fields ``bfl_flux_map`` reads, from BFL key names."""
    proj = shapes.get("double_blocks.0.img_attn.proj.weight")
    if proj is None:
        raise IncompatibleModelError("host model: no 'double_blocks.0.img_attn.proj'; not Flux")
    h = int(proj[0])
    norm = shapes.get("double_blocks.0.img_attn.norm.query_norm.scale", (h,))
    head = int(norm[0])
    return {
        "num_attention_heads": h // head,
        "attention_head_dim": head,
        "mlp_ratio": shapes["double_blocks.0.img_mlp.0.weight"][0] / h,
        "num_layers": len(_indices(shapes, r"double_blocks\.(\d+)\.")),
        "num_single_layers": len(_indices(shapes, r"single_blocks\.(\d+)\.")),
        "guidance_embeds": "guidance_in.in_layer.weight" in shapes,
    }


def sd3_config(shapes: Shapes) -> dict[str, Any]:
    """The ``SD3Transformer2DModel`` fields ``sai_sd3_map`` reads, from SAI key names."""
    proj = shapes.get("joint_blocks.0.x_block.attn.proj.weight")
    if proj is None:
        raise IncompatibleModelError("host model: no 'joint_blocks.0.x_block.attn.proj'; not SD3")
    h = int(proj[0])
    ln_q = shapes.get("joint_blocks.0.x_block.attn.ln_q.weight")
    head = int(ln_q[0]) if ln_q is not None else 64
    return {
        "num_attention_heads": h // head,
        "attention_head_dim": head,
        "num_layers": len(_indices(shapes, r"joint_blocks\.(\d+)\.")),
        "dual_attention_layers": _indices(shapes, r"joint_blocks\.(\d+)\.x_block\.attn2\.qkv\."),
        "qk_norm": "rms_norm" if ln_q is not None else None,
    }


_BUILDERS = {"sd15": unet_config, "sdxl": unet_config, "flux": flux_config, "sd3": sd3_config}


def denoiser_config(family: str, shapes: Shapes) -> dict[str, Any]:
    """The diffusers-style config of `family`'s denoiser whose (unprefixed) host keys and
    shapes are `shapes`: what :func:`lycoris_core.layouts.denoiser_name_map` needs."""
    builder = _BUILDERS.get(family)
    if builder is None:
        raise IncompatibleModelError(
            f"host model: family {family!r} has no foreign naming to map; known: "
            f"{', '.join(_BUILDERS)}"
        )
    return builder(shapes)


def family_of_keys(shapes: Shapes) -> str | None:
    """Which family a host denoiser's (unprefixed) keys belong to, or None."""
    if "double_blocks.0.img_attn.proj.weight" in shapes:
        return "flux"
    if "joint_blocks.0.x_block.attn.proj.weight" in shapes:
        return "sd3"
    if "input_blocks.0.0.weight" in shapes:
        return "sdxl" if "label_emb.0.0.weight" in shapes else "sd15"
    return None
