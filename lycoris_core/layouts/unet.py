"""SD1.x/2.x/SDXL UNet: the original (ldm / CompVis) module names <-> diffusers, from the config.

Facts (block numbering, resnet internals, embeddings) from ComfyUI's ``comfy/utils.py``
(``unet_to_diffusers``) and diffusers' ``loaders/lora_conversion_utils.py`` (kohya SDXL
conversion), re-derived here from the UNet's own config so that any ``layers_per_block``
(also per level), block types and transformer depth map, not only the stock SD/SDXL ones:

* ``input_blocks.0.0`` = ``conv_in``; down level ``l``, resnet ``i`` is
  ``input_blocks.{n}.0`` with its attention at ``.1``, ``n`` counting from 1 over the levels'
  resnets and downsamplers (``input_blocks.{n}.0.op``, after each level but the last);
* ``middle_block.0`` / ``.2`` the mid resnets, ``.1`` its attention;
* up level ``x``, resnet ``i`` (``layers + 1`` per level) is ``output_blocks.{n}.0``, its
  attention ``.1`` and, in the level's last block, the upsampler ``.1.conv`` (no attention)
  or ``.2.conv``;
* resnet internals ``in_layers.0/2`` = ``norm1/conv1``, ``emb_layers.1`` = ``time_emb_proj``,
  ``out_layers.0/3`` = ``norm2/conv2``, ``skip_connection`` = ``conv_shortcut``; attention
  internals keep their diffusers names; ``time_embed.0/2`` = ``time_embedding.linear_1/2``,
  ``label_emb.0.0/0.2`` = ``add_embedding.linear_1/2``, ``out.0/2`` = ``conv_norm_out/conv_out``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .target import Target, single

COMPONENT = "denoiser"

_RESNET = (
    ("in_layers.0", "norm1"),
    ("in_layers.2", "conv1"),
    ("emb_layers.1", "time_emb_proj"),
    ("out_layers.0", "norm2"),
    ("out_layers.3", "conv2"),
)
_ATTN_LEAVES = ("to_q", "to_k", "to_v", "to_out.0")
_BLOCK_LEAVES = (
    "norm1",
    *(f"attn1.{leaf}" for leaf in _ATTN_LEAVES),
    "norm2",
    *(f"attn2.{leaf}" for leaf in _ATTN_LEAVES),
    "norm3",
    "ff.net.0.proj",
    "ff.net.2",
)


def _per_level(value: Any, levels: int) -> list[int]:
    if isinstance(value, Sequence) and not isinstance(value, str):
        out = [int(v) for v in value]
        if len(out) != levels:
            raise ValueError(f"expected {levels} per-level values, got {out}")
        return out
    return [int(value)] * levels


def _has_attention(block_type: str) -> bool:
    return "CrossAttn" in block_type


class _Builder:
    def __init__(self) -> None:
        self.out: dict[str, tuple[Target, ...]] = {}

    def add(self, ldm: str, ours: str) -> None:
        self.out[ldm] = single(COMPONENT, ours)

    def resnet(self, ldm: str, ours: str, shortcut: bool) -> None:
        for a, b in _RESNET:
            self.add(f"{ldm}.{a}", f"{ours}.{b}")
        if shortcut:
            self.add(f"{ldm}.skip_connection", f"{ours}.conv_shortcut")

    def attention(self, ldm: str, ours: str, depth: int) -> None:
        for leaf in ("norm", "proj_in", "proj_out"):
            self.add(f"{ldm}.{leaf}", f"{ours}.{leaf}")
        for j in range(depth):
            for leaf in _BLOCK_LEAVES:
                self.add(
                    f"{ldm}.transformer_blocks.{j}.{leaf}", f"{ours}.transformer_blocks.{j}.{leaf}"
                )


def ldm_unet_map(config: Mapping[str, Any]) -> dict[str, tuple[Target, ...]]:
    """ldm module name (no ``diffusion_model.`` prefix) -> its diffusers module, for a
    ``UNet2DConditionModel`` config."""
    down_types = list(config["down_block_types"])
    up_types = list(config["up_block_types"])
    channels = [int(c) for c in config["block_out_channels"]]
    levels = len(channels)
    layers = _per_level(config.get("layers_per_block", 2), levels)
    depth = _per_level(config.get("transformer_layers_per_block", 1), levels)
    up_depth = config.get("reverse_transformer_layers_per_block")
    up_depth = _per_level(up_depth, levels) if up_depth is not None else depth[::-1]
    b = _Builder()
    b.add("input_blocks.0.0", "conv_in")
    b.add("time_embed.0", "time_embedding.linear_1")
    b.add("time_embed.2", "time_embedding.linear_2")
    if config.get("addition_embed_type") == "text_time":
        b.add("label_emb.0.0", "add_embedding.linear_1")
        b.add("label_emb.0.2", "add_embedding.linear_2")
    b.add("out.0", "conv_norm_out")
    b.add("out.2", "conv_out")

    n = 1
    for lvl, kind in enumerate(down_types):
        for i in range(layers[lvl]):
            c_in = channels[lvl - 1] if (i == 0 and lvl > 0) else channels[lvl]
            ours = f"down_blocks.{lvl}"
            b.resnet(f"input_blocks.{n}.0", f"{ours}.resnets.{i}", c_in != channels[lvl])
            if _has_attention(kind):
                b.attention(f"input_blocks.{n}.1", f"{ours}.attentions.{i}", depth[lvl])
            n += 1
        if lvl < levels - 1:
            b.add(f"input_blocks.{n}.0.op", f"down_blocks.{lvl}.downsamplers.0.conv")
            n += 1

    mid = config.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    if mid is not None:
        b.resnet("middle_block.0", "mid_block.resnets.0", False)
        if _has_attention(mid):
            b.attention("middle_block.1", "mid_block.attentions.0", depth[-1])
        b.resnet("middle_block.2", "mid_block.resnets.1", False)

    rev_channels, rev_layers = channels[::-1], layers[::-1]
    n = 0
    for x, kind in enumerate(up_types):
        out_ch = rev_channels[x]
        prev_out = rev_channels[x - 1] if x > 0 else rev_channels[0]
        skip_in = rev_channels[min(x + 1, levels - 1)]
        count = rev_layers[x] + 1
        for i in range(count):
            skip = skip_in if i == count - 1 else out_ch
            c_in = (prev_out if i == 0 else out_ch) + skip
            ours = f"up_blocks.{x}"
            b.resnet(f"output_blocks.{n}.0", f"{ours}.resnets.{i}", c_in != out_ch)
            attn = _has_attention(kind)
            if attn:
                b.attention(f"output_blocks.{n}.1", f"{ours}.attentions.{i}", up_depth[x])
            if i == count - 1 and x < levels - 1:
                b.add(f"output_blocks.{n}.{2 if attn else 1}.conv", f"{ours}.upsamplers.0.conv")
            n += 1
    return b.out
