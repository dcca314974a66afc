"""FLUX.1: Black Forest Labs' own module names <-> diffusers, from the transformer's config.

Facts from ComfyUI's ``comfy/utils.py`` (``flux_to_diffusers``) and diffusers'
``loaders/lora_conversion_utils.py`` (BFL / kohya Flux conversion). With
``h = num_attention_heads * attention_head_dim`` and the MLP width ``mlp = h * mlp_ratio``
(diffusers' Flux hard-codes ``mlp_ratio`` 4):

* ``double_blocks.N.img_attn.qkv`` rows ``[0:h] [h:2h] [2h:3h]`` -> ``attn.to_q/to_k/to_v``;
  ``txt_attn.qkv`` -> ``attn.add_q_proj/add_k_proj/add_v_proj``;
* ``single_blocks.N.linear1`` -> ``attn.to_q, to_k, to_v`` then ``proj_mlp`` (rows
  ``[3h:3h+mlp]``); ``linear2`` -> ``proj_out``; ``modulation.lin`` -> ``norm.linear``;
* ``final_layer.adaLN_modulation.1`` -> ``norm_out.linear`` with its two row halves swapped
  (BFL ``shift, scale`` against diffusers ``scale, shift``).

The RMSNorms (``...norm.query_norm``) hold their parameter as ``scale`` where diffusers' hold
``weight``; the map names modules only.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .target import Target, single, split_rows

COMPONENT = "denoiser"

_DOUBLE = (
    ("img_attn.proj", "attn.to_out.0"),
    ("txt_attn.proj", "attn.to_add_out"),
    ("img_mlp.0", "ff.net.0.proj"),
    ("img_mlp.2", "ff.net.2"),
    ("txt_mlp.0", "ff_context.net.0.proj"),
    ("txt_mlp.2", "ff_context.net.2"),
    ("img_mod.lin", "norm1.linear"),
    ("txt_mod.lin", "norm1_context.linear"),
    ("img_attn.norm.query_norm", "attn.norm_q"),
    ("img_attn.norm.key_norm", "attn.norm_k"),
    ("txt_attn.norm.query_norm", "attn.norm_added_q"),
    ("txt_attn.norm.key_norm", "attn.norm_added_k"),
)
_SINGLE = (
    ("linear2", "proj_out"),
    ("modulation.lin", "norm.linear"),
    ("norm.query_norm", "attn.norm_q"),
    ("norm.key_norm", "attn.norm_k"),
)
_EMBEDDERS = (
    ("time_in", "time_text_embed.timestep_embedder"),
    ("vector_in", "time_text_embed.text_embedder"),
)


def bfl_flux_map(config: Mapping[str, Any]) -> dict[str, tuple[Target, ...]]:
    """BFL module name (no ``diffusion_model.`` prefix) -> its diffusers targets, for a
    ``FluxTransformer2DModel`` config."""
    h = int(config["num_attention_heads"]) * int(config["attention_head_dim"])
    mlp = int(h * float(config.get("mlp_ratio", 4.0)))
    out: dict[str, tuple[Target, ...]] = {}

    def one(theirs: str, ours: str, transform: str | None = None) -> None:
        out[theirs] = single(COMPONENT, ours, transform)

    one("img_in", "x_embedder")
    one("txt_in", "context_embedder")
    embedders = list(_EMBEDDERS)
    if config.get("guidance_embeds", False):
        embedders.append(("guidance_in", "time_text_embed.guidance_embedder"))
    for theirs, ours in embedders:
        one(f"{theirs}.in_layer", f"{ours}.linear_1")
        one(f"{theirs}.out_layer", f"{ours}.linear_2")
    for n in range(int(config.get("num_layers", 19))):
        theirs, ours = f"double_blocks.{n}", f"transformer_blocks.{n}"
        qkv = [f"{ours}.attn.to_q", f"{ours}.attn.to_k", f"{ours}.attn.to_v"]
        add = [f"{ours}.attn.add_q_proj", f"{ours}.attn.add_k_proj", f"{ours}.attn.add_v_proj"]
        out[f"{theirs}.img_attn.qkv"] = split_rows(COMPONENT, qkv, [h, h, h])
        out[f"{theirs}.txt_attn.qkv"] = split_rows(COMPONENT, add, [h, h, h])
        for a, b in _DOUBLE:
            one(f"{theirs}.{a}", f"{ours}.{b}")
    for n in range(int(config.get("num_single_layers", 38))):
        theirs, ours = f"single_blocks.{n}", f"single_transformer_blocks.{n}"
        fused = [f"{ours}.attn.to_q", f"{ours}.attn.to_k", f"{ours}.attn.to_v", f"{ours}.proj_mlp"]
        out[f"{theirs}.linear1"] = split_rows(COMPONENT, fused, [h, h, h, mlp])
        for a, b in _SINGLE:
            one(f"{theirs}.{a}", f"{ours}.{b}")
    one("final_layer.linear", "proj_out")
    one("final_layer.adaLN_modulation.1", "norm_out.linear", "swap_halves")
    return out
