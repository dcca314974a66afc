"""SD3 / SD3.5 MMDiT: Stability AI's own module names <-> diffusers, from the config.

Facts from ComfyUI's ``comfy/utils.py`` (``mmdit_to_diffusers``) and diffusers'
``loaders/lora_conversion_utils.py``. With ``h = num_attention_heads * attention_head_dim``:

* ``joint_blocks.N.x_block.attn.qkv`` rows ``[0:h] [h:2h] [2h:3h]`` -> ``attn.to_q/k/v``,
  ``context_block.attn.qkv`` -> ``attn.add_q_proj/add_k_proj/add_v_proj``;
* ``x_block.attn.proj`` -> ``attn.to_out.0``, ``context_block.attn.proj`` -> ``attn.to_add_out``;
  ``mlp.fc1/fc2`` -> ``ff.net.0.proj/ff.net.2`` (context: ``ff_context``);
* ``x_block.adaLN_modulation.1`` -> ``norm1.linear``; ``context_block.adaLN_modulation.1`` ->
  ``norm1_context.linear``, with swapped row halves in the last block (``context_pre_only``:
  SAI ``shift, scale`` against diffusers ``scale, shift``), as ``final_layer.adaLN_modulation.1``
  -> ``norm_out.linear``;
* ``x_embedder.proj`` -> ``pos_embed.proj``, ``t_embedder.mlp.0/2`` and ``y_embedder.mlp.0/2``
  -> ``time_text_embed.{timestep,text}_embedder.linear_1/2``; SD3.5's ``attn.ln_q/ln_k`` ->
  ``norm_q/norm_k`` (context: ``norm_added_q/k``) and ``x_block.attn2`` -> ``attn2``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .target import Target, single, split_rows

COMPONENT = "denoiser"


def sai_sd3_map(config: Mapping[str, Any]) -> dict[str, tuple[Target, ...]]:
    """SAI module name (no ``diffusion_model.`` prefix) -> its diffusers targets, for an
    ``SD3Transformer2DModel`` config."""
    h = int(config["num_attention_heads"]) * int(config["attention_head_dim"])
    depth = int(config.get("num_layers", 18))
    dual = {int(i) for i in (config.get("dual_attention_layers") or ())}
    qk_norm = config.get("qk_norm") is not None
    out: dict[str, tuple[Target, ...]] = {}

    def one(theirs: str, ours: str, transform: str | None = None) -> None:
        out[theirs] = single(COMPONENT, ours, transform)

    one("x_embedder.proj", "pos_embed.proj")
    one("context_embedder", "context_embedder")
    for theirs, ours in (("t_embedder", "timestep_embedder"), ("y_embedder", "text_embedder")):
        one(f"{theirs}.mlp.0", f"time_text_embed.{ours}.linear_1")
        one(f"{theirs}.mlp.2", f"time_text_embed.{ours}.linear_2")
    for n in range(depth):
        x, c = f"joint_blocks.{n}.x_block", f"joint_blocks.{n}.context_block"
        ours = f"transformer_blocks.{n}"
        last = n == depth - 1
        attn = f"{ours}.attn"
        out[f"{x}.attn.qkv"] = split_rows(
            COMPONENT, [f"{attn}.to_q", f"{attn}.to_k", f"{attn}.to_v"], [h, h, h]
        )
        out[f"{c}.attn.qkv"] = split_rows(
            COMPONENT, [f"{attn}.add_q_proj", f"{attn}.add_k_proj", f"{attn}.add_v_proj"], [h, h, h]
        )
        one(f"{x}.attn.proj", f"{attn}.to_out.0")
        one(f"{x}.mlp.fc1", f"{ours}.ff.net.0.proj")
        one(f"{x}.mlp.fc2", f"{ours}.ff.net.2")
        one(f"{x}.adaLN_modulation.1", f"{ours}.norm1.linear")
        one(
            f"{c}.adaLN_modulation.1",
            f"{ours}.norm1_context.linear",
            "swap_halves" if last else None,
        )
        if not last:
            one(f"{c}.attn.proj", f"{attn}.to_add_out")
            one(f"{c}.mlp.fc1", f"{ours}.ff_context.net.0.proj")
            one(f"{c}.mlp.fc2", f"{ours}.ff_context.net.2")
        if qk_norm:
            one(f"{x}.attn.ln_q", f"{attn}.norm_q")
            one(f"{x}.attn.ln_k", f"{attn}.norm_k")
            one(f"{c}.attn.ln_q", f"{attn}.norm_added_q")
            one(f"{c}.attn.ln_k", f"{attn}.norm_added_k")
        if n in dual:
            a2 = f"{ours}.attn2"
            out[f"{x}.attn2.qkv"] = split_rows(
                COMPONENT, [f"{a2}.to_q", f"{a2}.to_k", f"{a2}.to_v"], [h, h, h]
            )
            one(f"{x}.attn2.proj", f"{a2}.to_out.0")
            if qk_norm:
                one(f"{x}.attn2.ln_q", f"{a2}.norm_q")
                one(f"{x}.attn2.ln_k", f"{a2}.norm_k")
    one("final_layer.linear", "proj_out")
    one("final_layer.adaLN_modulation.1", "norm_out.linear", "swap_halves")
    return out
