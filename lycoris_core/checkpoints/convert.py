"""Original-layout tensors -> diffusers / transformers names.

diffusers' own single-file conversion functions (``diffusers.loaders.single_file_utils``) do
the UNet, VAE, OpenCLIP and SD3 transformer, fed with our configs so nothing is fetched. Three
parts are ours because diffusers' versions do not fit: HF-layout CLIP (diffusers dispatches
text encoders by shape and drops SD3's CLIP-L projection; here the prefix decides), T5 (its
tied embedding) and the BFL Flux transformer (diffusers hard-codes FLUX.1's 3072 width for
the single blocks; here every split size comes from the config).
"""

from __future__ import annotations

from typing import Any

import torch

from .detect import UNET, Part

Tensors = dict[str, torch.Tensor]


def _strip(state: Tensors, prefix: str) -> Tensors:
    n = len(prefix)
    return {k[n:]: v for k, v in state.items() if k.startswith(prefix)}


def unet(state: Tensors, part: Part, config: dict[str, Any]) -> Tensors:
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    body = _strip(state, part.prefix)
    return convert_ldm_unet_checkpoint({UNET + k: v for k, v in body.items()}, config)


def vae(state: Tensors, part: Part, config: dict[str, Any]) -> Tensors:
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    body = _strip(state, part.prefix)
    return convert_ldm_vae_checkpoint(
        {"first_stage_model." + k: v for k, v in body.items()}, config
    )


def clip(state: Tensors, part: Part, with_projection: bool) -> Tensors:
    """HF CLIP names; the ``text_model.`` level as the transformers class wants it."""
    body = _strip(state, part.prefix)
    if part.layout == "open_clip":
        body = _open_clip(body, part)
    keep = ("text_model.", "text_projection.weight", "embeddings.", "encoder.", "final_layer_norm.")
    body = {k: v for k, v in body.items() if k.startswith(keep)}  # no logit_scale and the like
    inner = {
        (k[len("text_model.") :] if k.startswith("text_model.") else k): v for k, v in body.items()
    }
    proj = inner.pop("text_projection.weight", None)
    if not with_projection:  # CLIPTextModel (transformers 5): no text_model. level
        return inner
    out = {"text_model." + k: v for k, v in inner.items()}
    if proj is not None:
        out["text_projection.weight"] = proj
    return out


def _open_clip(body: Tensors, part: Part) -> Tensors:
    """OpenCLIP names -> HF names, with diffusers' ``convert_open_clip_checkpoint``."""
    from types import SimpleNamespace

    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    hidden = body["token_embedding.weight"].shape[1]
    stub = SimpleNamespace(config=SimpleNamespace(hidden_size=hidden))
    out = convert_open_clip_checkpoint(stub, {"m." + k: v for k, v in body.items()}, prefix="m.")
    if "text_projection" not in body:
        out.pop("text_projection.weight", None)
    return out


def t5(state: Tensors, part: Part) -> Tensors:
    body = _strip(state, part.prefix)
    body.setdefault("encoder.embed_tokens.weight", body["shared.weight"])  # tied in T5
    return body


def sd3(state: Tensors, part: Part) -> Tensors:
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    return convert_sd3_transformer_checkpoint_to_diffusers(_strip(state, part.prefix))


def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    """BFL's final adaLN is (shift, scale); diffusers' AdaLayerNormContinuous is (scale, shift)."""
    shift, scale = t.chunk(2, dim=0)
    return torch.cat([scale, shift], dim=0)


_FLUX_DIRECT = {
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "final_layer.linear": "proj_out",
}
_FLUX_DOUBLE = {
    "img_mod.lin": "norm1.linear",
    "txt_mod.lin": "norm1_context.linear",
    "img_attn.proj": "attn.to_out.0",
    "txt_attn.proj": "attn.to_add_out",
    "img_mlp.0": "ff.net.0.proj",
    "img_mlp.2": "ff.net.2",
    "txt_mlp.0": "ff_context.net.0.proj",
    "txt_mlp.2": "ff_context.net.2",
}
_FLUX_NORMS = {
    "img_attn.norm.query_norm.scale": "attn.norm_q.weight",
    "img_attn.norm.key_norm.scale": "attn.norm_k.weight",
    "txt_attn.norm.query_norm.scale": "attn.norm_added_q.weight",
    "txt_attn.norm.key_norm.scale": "attn.norm_added_k.weight",
}


def flux(state: Tensors, part: Part, config: dict[str, Any]) -> Tensors:
    """BFL Flux names -> ``FluxTransformer2DModel`` names; split sizes from `config`."""
    body = _strip(state, part.prefix)
    hidden = config["num_attention_heads"] * config["attention_head_dim"]
    out: Tensors = {}
    for src, dst in _FLUX_DIRECT.items():
        for leaf in ("weight", "bias"):
            if f"{src}.{leaf}" in body:
                out[f"{dst}.{leaf}"] = body[f"{src}.{leaf}"]
    for leaf in ("weight", "bias"):
        out[f"norm_out.linear.{leaf}"] = _swap_halves(
            body[f"final_layer.adaLN_modulation.1.{leaf}"]
        )
    for i in range(config["num_layers"]):
        s, d = f"double_blocks.{i}.", f"transformer_blocks.{i}."
        for src, dst in _FLUX_DOUBLE.items():
            for leaf in ("weight", "bias"):
                out[f"{d}{dst}.{leaf}"] = body[f"{s}{src}.{leaf}"]
        for src, dst in _FLUX_NORMS.items():
            out[d + dst] = body[s + src]
        for stream, names in (
            ("img", ("to_q", "to_k", "to_v")),
            ("txt", ("add_q_proj", "add_k_proj", "add_v_proj")),
        ):
            for leaf in ("weight", "bias"):
                fused = body[f"{s}{stream}_attn.qkv.{leaf}"]
                for j, name in enumerate(names):
                    out[f"{d}attn.{name}.{leaf}"] = fused[j * hidden : (j + 1) * hidden]
    for i in range(config["num_single_layers"]):
        s, d = f"single_blocks.{i}.", f"single_transformer_blocks.{i}."
        for leaf in ("weight", "bias"):
            out[f"{d}norm.linear.{leaf}"] = body[f"{s}modulation.lin.{leaf}"]
            out[f"{d}proj_out.{leaf}"] = body[f"{s}linear2.{leaf}"]
            fused = body[f"{s}linear1.{leaf}"]
            for j, name in enumerate(("to_q", "to_k", "to_v")):
                out[f"{d}attn.{name}.{leaf}"] = fused[j * hidden : (j + 1) * hidden]
            out[f"{d}proj_mlp.{leaf}"] = fused[3 * hidden :]
        out[f"{d}attn.norm_q.weight"] = body[f"{s}norm.query_norm.scale"]
        out[f"{d}attn.norm_k.weight"] = body[f"{s}norm.key_norm.scale"]
    return out
